"""Every rule against values derived by hand on tiny tensors (upstream gradient g given)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attribution_rules import EpsilonRule, GammaRule, IdentityRule, NormRule, PassRule, SSMRule, UniformProductRule
from ssm_models.primitives import CausalConv1d, GatingProduct, RMSNorm, SelectiveSSM, SiLU


def with_rule(module: nn.Module, rule, *args: torch.Tensor):
    return rule.forward(module, module.forward, *args)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_identity_rule_silu() -> None:
    x = leaf(1.0, -2.0, 0.0)
    y = with_rule(SiLU(), IdentityRule(), x)
    torch.testing.assert_close(y, torch.nn.functional.silu(x), rtol=0, atol=0)
    y.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    sigmoid = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0)), 0.5]
    torch.testing.assert_close(x.grad, torch.tensor([sigmoid[0], 2 * sigmoid[1], 3 * 0.5], dtype=torch.float64))
    # relevance x * grad equals the output relevance y * g
    torch.testing.assert_close(x * x.grad, y.detach() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_identity_rule_gelu() -> None:
    x = leaf(0.5, -1.5, 0.0)
    y = with_rule(nn.GELU(), IdentityRule(), x)
    expected = nn.GELU()(x.detach())
    torch.testing.assert_close(y.detach(), expected)
    y.sum().backward()
    torch.testing.assert_close((x * x.grad).detach(), expected)  # R_x = R_y


def test_half_rule_on_product() -> None:
    a, b = leaf(2.0), leaf(3.0)
    y = with_rule(GatingProduct(), UniformProductRule(2), a, b)
    assert float(y.detach()) == 6.0
    y.backward()
    assert float(a.grad) == 1.5 and float(b.grad) == 1.0  # halves of the plain gradients 3 and 2
    assert float((a * a.grad).detach()) == 3.0 and float((b * b.grad).detach()) == 3.0  # each factor gets R_y / 2


def test_uniform_rule_three_factors() -> None:
    a, b, c = leaf(1.0), leaf(2.0), leaf(4.0)
    y = UniformProductRule(3).forward(None, lambda *f: f[0] * f[1] * f[2], a, b, c)
    y.backward()
    for factor in (a, b, c):
        assert float((factor * factor.grad).detach()) == pytest.approx(8.0 / 3.0, rel=1e-15)


def test_norm_rule_rmsnorm() -> None:
    norm = RMSNorm(2, eps=0.0).double()
    x = leaf(3.0, 4.0)
    y = with_rule(norm, NormRule(), x)
    rms = math.sqrt(12.5)
    torch.testing.assert_close(y.detach(), torch.tensor([3 / rms, 4 / rms], dtype=torch.float64))
    y.backward(torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad, torch.tensor([1 / rms, 1 / rms], dtype=torch.float64))  # 1/rms is constant


def test_norm_rule_layernorm() -> None:
    norm = nn.LayerNorm(2, eps=0.0, elementwise_affine=False).double()
    x = leaf(1.0, 3.0)
    y = with_rule(norm, NormRule(), x)
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, 1.0], dtype=torch.float64))
    y.backward(torch.tensor([1.0, 0.0], dtype=torch.float64))
    # centring is linear: d(x - mean)/dx = I - 1/2; the std (= 1) is constant
    torch.testing.assert_close(x.grad, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert float((x * x.grad).sum()) == -1.0  # = y_0 * g_0


def test_ssm_rule_relevance_only_through_u() -> None:
    """One channel, N = 1, two steps: with A_bar, B_bar, C constant, y is linear in u, so
    sum_t u_t dF/du_t = F and delta, A, B, C get no gradient."""
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([[[0.5, 1.0]]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    B = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    C = torch.tensor([[[3.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    D = torch.tensor([0.5], dtype=torch.float64)
    ssm = SelectiveSSM(backend="reference")
    y = SSMRule().forward(ssm, ssm.forward, u, delta, A, B, C, D, None)
    # hand: delta = softplus(.) applied inside; compute expected y from the formula
    d = torch.nn.functional.softplus(delta.detach())[0, 0]
    h1 = d[0] * 1.0 * 1.0
    h2 = math.exp(-float(d[1])) * h1 + d[1] * 2.0 * 2.0
    torch.testing.assert_close(y.detach()[0, 0], torch.stack([3 * h1 + 0.5, 1 * h2 + 1.0]))
    y.sum().backward()
    assert delta.grad is None and A.grad is None and B.grad is None and C.grad is None
    torch.testing.assert_close((u * u.grad).sum(), y.detach().sum())


def test_epsilon_rule_linear() -> None:
    linear = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = leaf(1.0, 1.0)
    y = with_rule(linear, EpsilonRule(1.0), x)
    assert float(y.detach()) == 3.0
    y.backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.75, 1.5], dtype=torch.float64))  # w * z / (z + eps)


def test_gamma_rule_linear() -> None:
    linear = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = leaf(2.0, 1.0)
    y = with_rule(linear, GammaRule(gamma=1.0, epsilon=0.0), x)
    assert float(y.detach()) == 1.0
    y.backward()
    # W + gamma W+ = [2, -1]; z_gamma = 3; grad = [2, -1] * z / z_gamma
    torch.testing.assert_close(x.grad, torch.tensor([2 / 3, -1 / 3], dtype=torch.float64))
    assert float((x * x.grad).sum()) == pytest.approx(1.0, rel=1e-15)


def test_epsilon_rule_causal_conv() -> None:
    conv = CausalConv1d(1, 2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 1.0]]]))
    x = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64, requires_grad=True)
    y = with_rule(conv, EpsilonRule(0.0), x)
    torch.testing.assert_close(y.detach(), torch.tensor([[[1.0, 4.0]]], dtype=torch.float64))
    y.sum().backward()
    torch.testing.assert_close((x * x.grad).sum(), y.detach().sum())  # eps = 0 is LRP-0


def test_pass_rule() -> None:
    x = leaf(2.0, -3.0)
    y = PassRule().forward(None, lambda t: t * t, x)
    torch.testing.assert_close(y.detach(), torch.tensor([4.0, 9.0], dtype=torch.float64))
    y.backward(torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_rule_arguments_validated() -> None:
    with pytest.raises(ValueError, match="n_factors"):
        UniformProductRule(0)
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonRule(-1.0)
    with pytest.raises(ValueError, match="gamma"):
        GammaRule(-0.5)
