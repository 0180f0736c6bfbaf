"""Primitive modules that the models are composed of.

Each nonlinear or multiplicative step of a model is its own module *type*, so that
``attribution_rules`` can attach an LRP rule to a type (or to a module name) by editing
instances, without touching model code (ARCHITECTURE.md). The plain forward of every primitive is
the ordinary computation. Linear maps are plain ``nn.Linear``; the residual sums are plain ``+``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssm_models.ops import (
    causal_conv1d,
    causal_conv1d_step,
    scan_compute_dtype,
    selective_scan,
    selective_scan_step,
)


class SiLU(nn.Module):
    """Elementwise ``x * sigmoid(x)``. Any shape in, same shape out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class GatingProduct(nn.Module):
    """Elementwise product of two factors, ``value * gate`` (Mamba's ``y * silu(z)``).

    Shapes broadcast as in ``torch.mul``; the output has ``value``'s dtype.
    """

    def forward(self, value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return value * gate.to(value.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last axis (REFERENCE.md section 1)::

        out = weight * (x / sqrt(mean(x^2) + eps))

    computed in float32 (float64 for float64 inputs) and returned in the input dtype, as the
    ``transformers`` implementation does. ``x``: (..., d); ``weight``: (d,).
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / sqrt(mean(x^2) + eps)`` over the last axis, shape (..., 1), in the compute dtype."""
        x_c = x.to(torch.promote_types(x.dtype, torch.float32))
        return torch.rsqrt(x_c.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (x_c * self.inverse_rms(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class CausalConv1d(nn.Module):
    """Causal depthwise convolution with ``nn.Conv1d``'s parameter layout (REFERENCE.md 1, step 2).

    ``weight`` (dim, 1, K), ``bias`` (dim,) or None; ``forward`` maps (batch, dim, L) to
    (batch, dim, L) through :func:`ssm_models.ops.causal_conv1d` with backend ``self.backend``.
    """

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.backend = backend
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = 1.0 / kernel_size**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_conv1d(x, self.weight, self.bias, backend=self.backend)

    def step(self, conv_state: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``x`` (batch, dim), ``conv_state`` (batch, dim, K)."""
        return causal_conv1d_step(conv_state, x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class SelectiveSSM(nn.Module):
    """Mamba's selective state-space operator S6, parameter-free (REFERENCE.md section 1, step 5).

    ``forward(u, delta, A, B, C, D, delta_bias)`` with ``u, delta`` (batch, dim, L),
    ``A`` (dim, N), ``B, C`` (batch, N, L), ``D, delta_bias`` (dim,) returns ``y`` (batch, dim, L)::

        delta_t = softplus(delta_t + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
        y_t = C_t . h_t + D u_t

    The parameters (``A_log``, ``D``, ``dt_proj``) live in the mixer that owns this module, so a
    rule can decide which inputs carry relevance. ``backend`` selects the scan implementation.
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        return_last_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            delta_bias=delta_bias,
            delta_softplus=True,
            return_last_state=return_last_state,
            backend=self.backend,
        )

    def step(
        self,
        state: torch.Tensor,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``u, delta`` (batch, dim), ``B, C`` (batch, N), ``state`` (batch, dim, N)."""
        return selective_scan_step(state, u, delta, A, B, C, D, delta_bias, delta_softplus=True)

    @staticmethod
    def state_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the recurrent state for activations of ``dtype``."""
        return scan_compute_dtype(dtype)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class Attention(nn.Module):
    """Scaled dot-product attention with an explicit boolean mask, parameter-free (the projections
    live in the layer that owns it, so a rule sees queries, keys and values)::

        out = softmax(q k^T / sqrt(d_head) + log(mask)) v

    ``q`` (B, H, Lq, d_head), ``k, v`` (B, H, Lk, d_head), ``mask`` bool broadcastable to
    (B, H, Lq, Lk), True where a query may attend to a key; every query needs at least one key.
    The plain forward is ``torch.nn.functional.scaled_dot_product_attention``.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q k^T / sqrt(d_head)``: (B, H, Lq, Lk), finite everywhere."""
        return torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5

    @staticmethod
    def probabilities_from_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked softmax over the last axis; exactly 0 where ``mask`` is False."""
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention probabilities (B, H, Lq, Lk), for introspection and for rules."""
        return self.probabilities_from_scores(self.scores(q, k), mask)
