"""Causal depthwise 1-D convolution, as in Mamba's short convolution (REFERENCE.md section 1, step 2).

    out[b, c, t] = bias[c] + sum_{k=0}^{K-1} weight[c, k] * x[b, c, t - (K - 1) + k]

with ``x[b, c, s] = 0`` for ``s < 0``. Shapes: ``x`` (batch, dim, L), ``weight`` (dim, K) or
(dim, 1, K) (``nn.Conv1d``'s layout), ``bias`` (dim,) or None; ``out`` (batch, dim, L).

Backends: ``"reference"`` sums the K shifted copies (obvious; the ground truth of the tests) and
``"torch"`` calls ``F.conv1d`` with ``groups=dim`` (oneDNN on CPU, cuDNN on CUDA). Measured on the
2-core CPU at (1, 1536, 2048), K=4, float32, forward+backward: F.conv1d 10 ms, shifted sum 24 ms
(see benchmarks/RESULTS.md), so ``"auto"`` is ``"torch"`` on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CAUSAL_CONV1D_BACKENDS = ("auto", "reference", "torch")


def _weight_2d(weight: torch.Tensor, dim: int) -> torch.Tensor:
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0, :]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] == 0:
        raise ValueError(
            f"causal_conv1d: `weight` must have shape (dim={dim}, K) or (dim, 1, K), got {tuple(weight.shape)}"
        )
    return weight


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Causal depthwise convolution of ``x`` (batch, dim, L) with taps ``weight`` (dim, K)."""
    if backend not in CAUSAL_CONV1D_BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}; expected one of {CAUSAL_CONV1D_BACKENDS}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: `x` must have shape (batch, dim, L), got {tuple(x.shape)}")
    dim, length = x.shape[1], x.shape[2]
    if length == 0:
        raise ValueError("causal_conv1d: `x` is an empty sequence (L = 0); expected L >= 1")
    taps = _weight_2d(weight, dim)
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"causal_conv1d: `bias` must have shape (dim={dim},), got {tuple(bias.shape)}")
    kernel_size = taps.shape[1]
    if backend == "reference":
        padded = F.pad(x, (kernel_size - 1, 0))
        out = sum(taps[:, k, None] * padded[:, :, k : k + length] for k in range(kernel_size))
        return out if bias is None else out + bias[:, None]
    return F.conv1d(x, taps[:, None, :], bias, padding=kernel_size - 1, groups=dim)[:, :, :length]


def causal_conv1d_step(
    conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. ``conv_state`` (batch, dim, K) holds the last K inputs (oldest first);
    ``x`` (batch, dim) is the new input. Returns ``(out (batch, dim), new_state (batch, dim, K))``."""
    taps = _weight_2d(weight, x.shape[1])
    new_state = torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1)
    out = (new_state * taps).sum(-1)
    if bias is not None:
        out = out + bias
    return out, new_state
