"""The embedded default job of ``make demo`` / ``mamba-lrp demo``.

For now (the foundation issue): build a small random Mamba LM, run its forward pass with the fast
CPU scan, check it against the sequential reference scan, decode a few tokens greedily with the
recurrent cache, and save/reload it. Later issues replace this with explanations of the shipped
trained models.
"""

from __future__ import annotations

import tempfile
import time

import torch

from ssm_models import MambaConfig, MambaLM, load_pretrained


def run_demo(seed: int = 0, length: int = 32) -> dict[str, float]:
    if length < 1:
        raise ValueError(f"`length` must be >= 1, got {length}")
    torch.manual_seed(seed)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=100)
    model = MambaLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids)
        fast_seconds = time.perf_counter() - start
        reference = model.set_backend(scan="reference")(input_ids)
        model.set_backend(scan="auto")
    difference = float((logits - reference).norm() / reference.norm())
    generated = model.generate(input_ids, max_new_tokens=8)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reloaded = load_pretrained(directory)
        with torch.no_grad():
            reload_equal = bool(torch.equal(reloaded(input_ids), logits))
    print(f"Mamba LM: d_model={config.d_model}, n_layer={config.n_layer}, vocab={config.padded_vocab_size}")
    print(f"input ids {tuple(input_ids.shape)} -> logits {tuple(logits.shape)} in {fast_seconds * 1e3:.1f} ms")
    print(f"logits[0, -1, :5] = {[round(v, 4) for v in logits[0, -1, :5].tolist()]}")
    print(f"fast CPU scan vs sequential reference: relative error {difference:.2e}")
    print(f"greedy continuation: {generated[0, length:].tolist()}")
    print(f"save_pretrained -> load_pretrained gives identical logits: {reload_equal}")
    return {"relative_error": difference, "reload_equal": float(reload_equal)}
