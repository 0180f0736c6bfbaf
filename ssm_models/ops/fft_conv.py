"""Long causal convolutions by FFT, and the convolution kernel of a diagonal SSM (H3, REFERENCE.md section 4).

H3 runs its SSMs as convolutions: the diagonal SSM ``s_t = a s_{t-1} + u_t``, ``y_t = sum_m Re(c_m s_t)``
is the causal convolution ``y = K * u`` with ``K_l = sum_m Re(c_m a_m^l)``
(:func:`diagonal_ssm_kernel`), and H3's shift SSM is a convolution with its learned taps directly.
:func:`fft_causal_conv` computes ``y_t = sum_j K_j u_{t-j} + D u_t`` with a zero-padded (linear, not
circular) FFT. Both functions are plain torch code, differentiable by autograd. The same results come
from :func:`ssm_models.ops.diagonal_scan.diagonal_scan` in O(L) time and O(1) state memory per channel.
"""

from __future__ import annotations

import math

import torch

from ssm_models.ops.diagonal_scan import _require_real_tensor
from ssm_models.ops.selective_scan import scan_compute_dtype

__all__ = ["diagonal_ssm_kernel", "fft_causal_conv"]

_KERNEL_BLOCK_ELEMENTS = 1 << 20
"""At most about this many complex power-table entries are built at once by :func:`diagonal_ssm_kernel`."""


def fast_fft_size(n: int) -> int:
    """The smallest ``2^i 3^j 5^k >= n`` (sizes the FFT libraries handle fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution by FFT: ``y_t = sum_{0 <= j < min(Lk, t + 1)} K_{h,j} u_{t-j} + D_h u_t``.

    Args:
        u: (batch, H, L), float16/bfloat16/float32/float64.
        kernel: (H, Lk), any ``Lk >= 1``; only the first ``min(Lk, L)`` taps can reach an output.
        D: (H,) skip coefficient, or None.

    The kernel is cut to ``Lk' = min(Lk, L)`` taps and both signals are zero-padded to an FFT size
    ``n >= L + Lk'`` (:func:`fast_fft_size`), so the product of the spectra is a linear convolution.
    Computed in float32 (float64 for float64 ``u``); returns ``y`` (batch, H, L) in ``u``'s dtype.
    Differentiable in ``u``, ``kernel`` and ``D`` (torch autograd).
    """
    for name, value in (("u", u), ("kernel", kernel)):
        _require_real_tensor(name, value, "fft_causal_conv")
    if u.dim() != 3:
        raise ValueError(f"fft_causal_conv: `u` must have shape (batch, H, L), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("fft_causal_conv: `u` is an empty sequence (L = 0); expected L >= 1")
    if kernel.dim() != 2 or kernel.shape[0] != channels or kernel.shape[1] == 0:
        raise ValueError(
            f"fft_causal_conv: `kernel` must have shape (H={channels}, Lk >= 1), got {tuple(kernel.shape)}"
        )
    if D is not None:
        _require_real_tensor("D", D, "fft_causal_conv")
        if D.shape != (channels,):
            raise ValueError(f"fft_causal_conv: `D` must have shape (H={channels},), got {tuple(D.shape)}")
    devices = {t.device for t in (u, kernel, D) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"fft_causal_conv: all tensors must be on one device, got {sorted(map(str, devices))}")
    compute = scan_compute_dtype(u.dtype)
    u_c = u.to(compute)
    taps = kernel[:, :length].to(compute)
    n = fast_fft_size(length + taps.shape[1])
    spectrum = torch.fft.rfft(u_c, n=n) * torch.fft.rfft(taps, n=n)
    y = torch.fft.irfft(spectrum, n=n)[..., :length]
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    return y.to(u.dtype)


def _powers(a: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a^0, ..., a^(count-1))`` along a new last axis, and ``a^count``, for complex ``a`` (...,),
    ``count`` a power of two, by doubling: ``P[0:2k] = (P[0:k], a^k P[0:k])``, ``a^2k = (a^k)^2``.
    Each entry is a product of at most ``log2(count) + 1`` rounded factors."""
    table = torch.ones_like(a)[..., None]
    a_k = a
    while table.shape[-1] < count:
        table = torch.cat((table, table * a_k[..., None]), dim=-1)
        a_k = a_k * a_k
    return table, a_k


def diagonal_ssm_kernel(A: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """Convolution kernel of the diagonal SSM: ``K_{h,l} = sum_m Re(c_{h,m} a_{h,m}^l)``, ``l = 0..length-1``.

    Args:
        A: (H, M, 2) the complex multipliers ``a_m`` as (re, im) pairs (H3's discretised ``dA``).
        C: (H, M, 2) the complex output coefficients ``c_m`` (H3's ``2 * C~``).
        length: number of taps ``>= 1``.

    Returns ``K`` (H, length) in float32 (float64 when ``A`` or ``C`` is float64), differentiable in
    ``A`` and ``C`` (torch autograd). With ``l = q T + r`` (``T`` a power of two near ``sqrt(length)``),
    ``a^l = (a^T)^q a^r``: the two power tables (T and ``ceil(length / T)`` entries per mode) are built by
    doubling in float64 (accurate for ``|a| <= 1``, exact at ``a = 0``), and
    ``K_{qT + r} = Re sum_m (c_m (a_m^T)^q) a_m^r`` is one batched matrix product over the modes in the
    compute dtype. Channels are processed in blocks so that at most about a million complex table entries
    exist at once; nothing of size (H, M, length) is ever built.
    """
    for name, value in (("A", A), ("C", C)):
        _require_real_tensor(name, value, "diagonal_ssm_kernel")
    if A.dim() != 3 or A.shape[2] != 2 or A.shape[1] == 0:
        raise ValueError(f"diagonal_ssm_kernel: `A` must have shape (H, M >= 1, 2), got {tuple(A.shape)}")
    if C.shape != A.shape:
        raise ValueError(f"diagonal_ssm_kernel: `C` must have the shape of `A` {tuple(A.shape)}, got {tuple(C.shape)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"diagonal_ssm_kernel: `length` must be an int >= 1, got {length!r}")
    if A.device != C.device:
        raise ValueError(f"diagonal_ssm_kernel: `A` and `C` must be on one device, got {A.device} and {C.device}")
    compute = torch.float64 if torch.float64 in (A.dtype, C.dtype) else torch.float32
    channels, modes, _ = A.shape
    inner = _next_pow2(math.isqrt(length - 1) + 1)  # T: the power of two >= ceil(sqrt(length))
    outer = -(-length // inner)  # Q
    block = max(1, _KERNEL_BLOCK_ELEMENTS // (modes * (inner + 3 * _next_pow2(outer))))
    kernels = []
    for start in range(0, channels, block):
        a = torch.view_as_complex(A[start : start + block].to(torch.float64).contiguous())  # (h, M)
        c = torch.view_as_complex(C[start : start + block].to(torch.float64).contiguous())
        low, a_inner = _powers(a, inner)  # (h, M, T): a^r
        high, _ = _powers(a_inner, _next_pow2(outer))  # (h, M, >= Q): a^(qT)
        weighted = c[..., None] * high[..., :outer]  # (h, M, Q): c a^(qT)
        # Re(sum_m w_mq p_mr) = sum_m (Re w Re p - Im w Im p): one real (h, Q, 2M) @ (h, 2M, T) product
        left = torch.cat((weighted.real, -weighted.imag), dim=1).transpose(1, 2).to(compute)
        right = torch.cat((low.real, low.imag), dim=1).to(compute)
        kernels.append(torch.bmm(left, right).reshape(left.shape[0], outer * inner)[:, :length])
    return torch.cat(kernels, dim=0) if len(kernels) > 1 else kernels[0]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
