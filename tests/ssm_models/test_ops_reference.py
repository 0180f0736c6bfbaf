"""The reference ops against hand-derived values, and the causal conv backends against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssm_models.ops import causal_conv1d, causal_conv1d_step, selective_scan, selective_scan_step
from tests.helpers import relative_error


def test_reference_scan_hand_derived() -> None:
    """N = 1, one channel, three steps, values worked out by hand:
    h_t = exp(d_t a) h_{t-1} + d_t b_t u_t, y_t = c_t h_t + D u_t, out = y silu(z)."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 1.0, 2.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0, 0.5, 2.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 1.0, -1.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    z = torch.tensor([[[0.0, 1.0, 30.0]]], dtype=torch.float64)
    h1 = 0.5 * 1.0 * 1.0
    h2 = math.exp(-1.0) * h1 + 1.0 * 0.5 * 2.0
    h3 = math.exp(-2.0) * h2 + 2.0 * 2.0 * -1.0
    y = [2.0 * h1 + 0.5, 1.0 * h2 + 1.0, -1.0 * h3 - 0.5]
    silu = [0.0, 1.0 / (1.0 + math.exp(-1.0)), 30.0 / (1.0 + math.exp(-30.0))]
    expected = torch.tensor([[[y[i] * silu[i] for i in range(3)]]], dtype=torch.float64)
    out, last = selective_scan(u, delta, A, B, C, D, z, return_last_state=True, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(last, torch.tensor([[[h3]]], dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_reference_softplus_threshold() -> None:
    """delta + bias > 20 is used as is (softplus threshold 20), below it softplus is applied."""
    u = torch.ones(1, 2, 1, dtype=torch.float64)
    delta = torch.tensor([[[21.0], [0.0]]], dtype=torch.float64)
    A = -torch.ones(2, 1, dtype=torch.float64)
    ones = torch.ones(1, 1, 1, dtype=torch.float64)
    out = selective_scan(u, delta, A, ones, ones, delta_bias=torch.tensor([0.5, 0.0], dtype=torch.float64),
                         delta_softplus=True, backend="reference")
    torch.testing.assert_close(out[0, :, 0], torch.tensor([21.5, math.log(2.0)], dtype=torch.float64))


def test_step_equals_scan() -> None:
    torch.manual_seed(0)
    batch, dim, n, length = 2, 6, 4, 5
    u, delta = torch.randn(batch, dim, length), torch.randn(batch, dim, length)
    A = -torch.rand(dim, n) - 0.1
    B, C = torch.randn(batch, n, length), torch.randn(batch, n, length)
    D, bias = torch.randn(dim), torch.randn(dim)
    full = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, backend="reference")
    state = torch.zeros(batch, dim, n)
    for t in range(length):
        y, state = selective_scan_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, bias, True)
        torch.testing.assert_close(y, full[..., t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_backends_agree_with_conv1d(length: int, with_bias: bool) -> None:
    torch.manual_seed(length)
    x = torch.randn(2, 5, length, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    expected = F.conv1d(x, weight, bias, padding=3, groups=5)[..., :length]
    weights = torch.linspace(-1, 1, expected.numel(), dtype=torch.float64).view_as(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, weight])
    for backend in ("reference", "torch"):
        out = causal_conv1d(x, weight, bias, backend=backend)
        assert relative_error(out, expected) <= 1e-14
        grads = torch.autograd.grad((out * weights).sum(), [x, weight])
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            assert relative_error(grad, expected_grad) <= 1e-14


def test_causal_conv_step_equals_full() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 6), torch.randn(3, 4), torch.randn(3)
    full = causal_conv1d(x, weight, bias)
    state = torch.zeros(2, 3, 4)
    for t in range(6):
        out, state = causal_conv1d_step(state, x[..., t], weight, bias)
        torch.testing.assert_close(out, full[..., t])
