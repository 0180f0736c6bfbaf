"""FFT causal convolution against a direct O(L^2) loop, the diagonal SSM kernel against a float64 loop
of complex powers, and the two together against the diagonal scan (H3's SSM computed both ways).

Relative errors are ``||x - ref|| / ||ref||``.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssm_models.ops import diagonal_scan, diagonal_ssm_kernel, fft_causal_conv
from ssm_models.ops import fft_conv as fft_mod
from tests.helpers import relative_error


def direct_causal_conv(u: torch.Tensor, kernel: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y_t = sum_{j <= min(Lk - 1, t)} K_j u_{t-j} + D u_t, as a plain loop over t (differentiable)."""
    length = u.shape[-1]
    outputs = []
    for t in range(length):
        taps = min(kernel.shape[1], t + 1)
        window = u[..., t - taps + 1 : t + 1].flip(-1)  # u_t, u_{t-1}, ...
        outputs.append((window * kernel[:, :taps]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    return y + D[:, None] * u if D is not None else y


def kernel_loop(A: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """K_{h,l} = sum_m Re(c a^l) with Python complex numbers in float64, powers by repeated multiplication."""
    channels, modes, _ = A.shape
    K = torch.zeros(channels, length, dtype=torch.float64)
    for h in range(channels):
        for m in range(modes):
            a, c = complex(*A[h, m].double().tolist()), complex(*C[h, m].double().tolist())
            power = 1 + 0j
            for l in range(length):  # noqa: E741
                K[h, l] += (c * power).real
                power *= a
    return K


def h3_parameters(channels: int, modes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H3's S4D-Lin diagonal SSM, bilinear (REFERENCE.md 4): A_n = -0.5 + i pi n, dt ~ logU(1e-3, 1e-1),
    dA = (1 + dt A / 2) / (1 - dt A / 2), c = 2 C dt / (1 - dt A / 2), C ~ CN(0, 1). Float64 (H, M, 2)."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.arange(modes, dtype=torch.float64)
    A_cont = torch.complex(torch.full((channels, modes), -0.5, dtype=torch.float64), math.pi * n.expand(channels, -1))
    log_dt = math.log(1e-3) + torch.rand(channels, 1, generator=gen, dtype=torch.float64) * math.log(100.0)
    dt = log_dt.exp()
    C = torch.complex(*torch.randn(2, channels, modes, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    dA = (1 + dt * A_cont / 2) / (1 - dt * A_cont / 2)
    c = 2 * C * dt / (1 - dt * A_cont / 2)
    return torch.view_as_real(dA).contiguous(), torch.view_as_real(c).contiguous()


# ---------------------------------------------------------------------------------------------
# fft_causal_conv


@pytest.mark.parametrize("kernel_len", [5, 40, 57])  # Lk < L, Lk = L, Lk > L
@pytest.mark.parametrize("with_d", [True, False])
def test_fft_conv_matches_direct_loop(kernel_len: int, with_d: bool) -> None:
    gen = torch.Generator().manual_seed(kernel_len)
    u = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, kernel_len, generator=gen, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) if with_d else None
    leaves = [t for t in (u, kernel, D) if t is not None]
    dy = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
    expected = direct_causal_conv(u, kernel, D)
    got = fft_causal_conv(u, kernel, D)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 40)
    assert relative_error(got, expected) <= 1e-13
    grads = torch.autograd.grad(got, leaves, dy)
    for grad, grad_ref in zip(grads, torch.autograd.grad(expected, leaves, dy), strict=True):
        assert relative_error(grad, grad_ref) <= 1e-13
    if kernel_len > 40:  # taps beyond L reach no output
        assert grads[1][:, 40:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fft_conv_low_precision_computes_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(1, 2, 300, generator=gen).to(dtype)
    kernel = torch.randn(2, 300, generator=gen) * 0.1
    got = fft_causal_conv(u, kernel)
    assert got.dtype == dtype
    expected = direct_causal_conv(u.double(), kernel.double(), None)
    assert relative_error(got, expected) <= {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def test_fft_conv_length_one() -> None:
    u = torch.tensor([[[2.0]]], dtype=torch.float64)
    got = fft_causal_conv(u, torch.tensor([[3.0, 5.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[[7.0]]], dtype=torch.float64))


def _five_smooth(m: int) -> bool:
    for prime in (2, 3, 5):
        while m % prime == 0:
            m //= prime
    return m == 1


def test_fast_fft_size() -> None:
    """The smallest 2^i 3^j 5^k at or above n."""
    for n in [1, 2, 7, 11, 17, 97, 1000, 4097, 8193]:
        size = fft_mod.fast_fft_size(n)
        assert size >= n and _five_smooth(size)
        assert not any(_five_smooth(m) for m in range(n, size))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(u=torch.randn(3, 9)), "`u`"),
        (dict(u=torch.randn(2, 3, 0)), "`u`"),
        (dict(kernel=torch.randn(2, 4)), "`kernel`"),
        (dict(kernel=torch.randn(3, 0)), "`kernel`"),
        (dict(kernel=torch.randn(3, 4, dtype=torch.complex64)), "`kernel`"),
        (dict(D=torch.randn(4)), "`D`"),
        (dict(u=torch.randn(2, 3, 9).to(torch.int32)), "`u`"),
    ],
)
def test_fft_conv_bad_inputs(kwargs: dict, name: str) -> None:
    args = {"u": torch.randn(2, 3, 9), "kernel": torch.randn(3, 4), "D": torch.randn(3), **kwargs}
    with pytest.raises(ValueError, match=name):
        fft_causal_conv(**args)


# ---------------------------------------------------------------------------------------------
# diagonal_ssm_kernel


def _mixed_modes(channels: int = 3, modes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random |a| <= 1 with special modes: a = 0, a real, |a| = 1 (on the unit circle)."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(channels, modes, generator=gen, dtype=torch.float64) ** 0.1
    phase = (2 * torch.rand(channels, modes, generator=gen, dtype=torch.float64) - 1) * math.pi
    mag[0, 0] = 0.0
    phase[1, 1] = 0.0
    mag[2, 2] = 1.0
    A = torch.stack((mag * torch.cos(phase), mag * torch.sin(phase)), dim=-1)
    return A, torch.randn(channels, modes, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("length", [1, 2, 7, 100, 1500])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_float64_loop(length: int, dtype: torch.dtype) -> None:
    A, C = (t.to(dtype) for t in _mixed_modes())
    got = diagonal_ssm_kernel(A, C, length)
    assert got.dtype == dtype and got.shape == (3, length)
    expected = kernel_loop(A, C, length)  # from the same (rounded) parameters
    assert relative_error(got, expected) <= (1e-13 if dtype == torch.float64 else 1e-6)


def test_kernel_h3_parameters_and_channel_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """H3's parameters at L = 2000, in one block and in blocks of one channel: the same numbers."""
    A, C = h3_parameters(2, 32)
    expected = kernel_loop(A, C, 2000)
    whole = diagonal_ssm_kernel(A, C, 2000)
    assert relative_error(whole, expected) <= 1e-12
    monkeypatch.setattr(fft_mod, "_KERNEL_BLOCK_ELEMENTS", 1)
    assert relative_error(diagonal_ssm_kernel(A, C, 2000), whole) <= 1e-15


def test_kernel_gradcheck() -> None:
    A, C = _mixed_modes(channels=3, modes=3, seed=1)
    A[0, 0] = torch.tensor([0.3, 0.0], dtype=torch.float64)  # gradcheck needs no special point
    A.requires_grad_()
    C.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: diagonal_ssm_kernel(a, c, 37), (A, C), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "A, C, length, name",
    [
        (torch.randn(3, 4), torch.randn(3, 4), 5, "`A`"),
        (torch.randn(3, 4, 2), torch.randn(3, 5, 2), 5, "`C`"),
        (torch.randn(3, 0, 2), torch.randn(3, 0, 2), 5, "`A`"),
        (torch.randn(3, 4, 2), torch.randn(3, 4, 2), 0, "`length`"),
        (torch.randn(3, 4, 2), torch.randn(3, 4, 2), 2.0, "`length`"),
        (torch.randn(3, 4, dtype=torch.complex64), torch.randn(3, 4, 2), 5, "`A`"),
    ],
)
def test_kernel_bad_inputs(A: torch.Tensor, C: torch.Tensor, length: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        diagonal_ssm_kernel(A, C, length)


# ---------------------------------------------------------------------------------------------
# the scan and the convolution agree


@pytest.mark.parametrize("backend, length", [("cpu", 3000), ("reference", 700)])
def test_scan_equals_fft_conv_of_kernel(backend: str, length: int) -> None:
    """diagonal_scan(u, A, C, D) == fft_causal_conv(u, diagonal_ssm_kernel(A, C, L), D) in float32, on
    H3's bilinear S4D-Lin parameters (|a| < 1, memory up to thousands of steps)."""
    A, C = (t.float() for t in h3_parameters(8, 32, seed=2))
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, 8, length, generator=gen)
    D = torch.randn(8, generator=gen)
    scanned = diagonal_scan(u, A, C, D, backend=backend)
    convolved = fft_causal_conv(u, diagonal_ssm_kernel(A, C, length), D)
    assert scanned.dtype == convolved.dtype == torch.float32
    assert relative_error(scanned, convolved) <= 1e-5
