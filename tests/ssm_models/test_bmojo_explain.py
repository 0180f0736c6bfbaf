"""B'MOJO is ready for MambaLRP: with biases zeroed, explain() conserves relevance in float64 (the
attention gets CP-LRP, the eidetic selection passes none), and plain gradient x input does not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mamba_lrp import explain
from ssm_models import BMojoLM
from tests.helpers import single_torch_thread
from tests.ssm_models.test_bmojo import bmojo, random_ids


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


def without_biases(model: BMojoLM) -> BMojoLM:
    """Zero the conv1d and every linear bias (biases absorb relevance); the dt_proj bias stays: it is
    inside the SSM's delta, which the SSM rule detaches."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and not name.endswith("dt_proj.bias"):
                parameter.zero_()
    return model


CASES = [
    ("bmojo_f", dict(conv_bias=True, bias=True, attn_bias=True, mlp_expand=2)),
    ("bmojo", dict(conv_bias=True, attn_bias=True)),
    ("bmojo", dict(use_ssm=False, mlp_expand=1)),
]


@pytest.mark.parametrize(("variant", "fields"), CASES)
def test_mamba_lrp_conserves_relevance(variant: str, fields: dict) -> None:
    model = without_biases(bmojo(20, variant=variant, **fields))
    ids = random_ids(20, 2, 45)
    explanation = explain(model, ids)
    assert float(explanation.conservation_error.max()) <= 1e-6
    assert torch.allclose(explanation.layer_sums, explanation.output[:, None].expand(-1, 3), rtol=1e-6, atol=0)
    plain = explain(model, ids, target=explanation.target, method="gradient_x_input")
    assert float(plain.conservation_error.min()) > 1e-3
    recomputed = explain(model, ids, target=explanation.target, recompute_blocks=True)
    assert torch.allclose(recomputed.relevance, explanation.relevance, rtol=1e-10, atol=1e-14)


def test_padded_positions_get_no_relevance() -> None:
    model = without_biases(bmojo(21))
    ids = random_ids(21, 2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :7] = 0  # left padding
    mask[1, 33:] = 0  # right padding
    explanation = explain(model, ids, attention_mask=mask)
    assert torch.all(explanation.relevance[mask == 0] == 0)
    assert float(explanation.conservation_error.max()) <= 1e-6
    alone = explain(model, ids[0, 7:], target=int(explanation.target[0]))
    assert torch.allclose(explanation.relevance[0, 7:], alone.relevance, rtol=1e-8, atol=1e-12)
