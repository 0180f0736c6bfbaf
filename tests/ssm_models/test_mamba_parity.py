"""Our MambaLM against `transformers` MambaForCausalLM on the same weights (REFERENCE.md 1)."""

from __future__ import annotations

import pytest
import torch

from ssm_models import from_hf
from tests.helpers import hf_keeps_float64, random_hf_mamba, relative_error

BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_logits_match_transformers_fp32(backend: str, seed: int, batch: int, length: int) -> None:
    hf = random_hf_mamba(seed, use_conv_bias=seed != 1, hidden_size=16 + 8 * seed, state_size=4 * (seed + 1))
    ours = from_hf(hf).set_backend(scan=backend)
    ids = torch.randint(0, hf.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    assert actual.shape == expected.shape == (batch, length, hf.config.vocab_size)
    assert actual.dtype == torch.float32
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_logits_match_transformers_fp64(backend: str, seed: int, length: int) -> None:
    hf = random_hf_mamba(seed, use_conv_bias=seed == 0, residual_in_fp32=False, dtype=torch.float64)
    ours = from_hf(hf).set_backend(scan=backend)
    ids = torch.randint(0, hf.config.vocab_size, (3, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), hf_keeps_float64():
        expected = hf(ids).logits
    with torch.no_grad():
        actual = ours(ids)
    assert expected.dtype == actual.dtype == torch.float64
    assert relative_error(actual, expected) <= 1e-10


def test_inputs_embeds_equals_input_ids() -> None:
    hf = random_hf_mamba(3)
    ours = from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids), ours(inputs_embeds=ours.embed(ids)))


def test_untied_head_matches_transformers() -> None:
    hf = random_hf_mamba(4, tie_word_embeddings=False)
    ours = from_hf(hf)
    assert ours.lm_head.weight is not ours.backbone.embedding.weight
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert relative_error(ours(ids), hf(ids).logits) <= 1e-5


def test_from_hf_shares_weights_and_leaves_user_model_unchanged() -> None:
    hf = random_hf_mamba(5)
    before = {key: value.clone() for key, value in hf.state_dict().items()}
    ours = from_hf(hf)
    assert ours.backbone.embedding.weight.data_ptr() == hf.backbone.embeddings.weight.data_ptr()
    copied = from_hf(hf, share_weights=False)
    assert copied.backbone.embedding.weight.data_ptr() != hf.backbone.embeddings.weight.data_ptr()
    ours(torch.randint(0, 40, (1, 5)))
    after = hf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_from_hf_rejects_other_models() -> None:
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        from_hf(torch.nn.Linear(2, 2))
