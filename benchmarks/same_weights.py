"""A random `transformers` MambaForCausalLM and our MambaLM sharing its weights, for the benchmarks
that compare the two (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import logging

import torch
import transformers

from ssm_models import MambaLM, from_hf


def random_hf_and_ours(d_model: int, n_layer: int, vocab_size: int = 50280,
                       seed: int = 0) -> tuple[transformers.MambaForCausalLM, MambaLM]:
    """``(hf, ours)`` in eval mode: a seeded random ``MambaForCausalLM`` (state size 16) and
    :func:`ssm_models.from_hf` of it (the same weight storage); `transformers`' logging silenced."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.MambaConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layer,
                                      state_size=16)
    hf = transformers.MambaForCausalLM(config).eval()
    return hf, from_hf(hf)
