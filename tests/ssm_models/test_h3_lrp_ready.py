"""H3 is composed of primitives so that MambaLRP's rules attach by type: in float64 with every bias
zeroed, ``mamba_lrp`` conserves the explained logit exactly (both products get the half rule,
LayerNorm the norm rule, GELU the identity rule, attention CP-LRP; the LTI SSMs are linear) while
plain gradient x input does not."""

from __future__ import annotations

import pytest
import torch

from mamba_lrp import explain
from ssm_models import H3LM, H3Config
from tests.helpers import single_torch_thread


@torch.no_grad()
def model_without_biases(seed: int, **overrides) -> H3LM:
    torch.manual_seed(seed)
    fields = dict(d_model=16, n_layer=3, vocab_size=40, d_state=8, n_head=2)
    fields.update(overrides)
    model = H3LM(H3Config(**fields)).double().eval()
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.zero_()
        elif name.endswith(("norm1.weight", "norm2.weight", "ln_f.weight")):
            parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
        elif parameter.dim() == 2 and not name.endswith(("inv_A_real", "A_imag", "kernel.B")):
            parameter.mul_(20)  # away from the tiny init, so that the nonlinearities matter
    return model


@pytest.mark.parametrize("overrides", [{}, {"attn_layer_idx": (1,)}, {"head_dim": 2, "attn_layer_idx": (0,)}])
@pytest.mark.parametrize("path", ["fft", "recurrent"])
def test_mamba_lrp_conserves_and_gradient_x_input_does_not(overrides: dict, path: str) -> None:
    model = model_without_biases(len(overrides), **overrides).set_backend(ssm=path)
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    with single_torch_thread():
        lrp = explain(model, ids, method="mamba_lrp")
        plain = explain(model, ids, method="gradient_x_input")
    assert float(lrp.conservation_error.max()) < 1e-6
    assert float(plain.conservation_error.min()) > 1e-3
