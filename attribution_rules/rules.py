"""LRP rules as value-identical forwards with modified gradients (REFERENCE.md section 2).

Relevance is computed as Gradient x Input (the LXT idea): a rule replaces the forward of one
primitive instance by a computation with the *same value* whose gradient is the LRP-modified one,
so that one forward and one backward pass give the relevance ``R = x * dF/dx``. Each rule is a
small object; :meth:`Rule.forward` receives the module, its original (class) forward and the
call's arguments.

Relevance bookkeeping used in the docstrings: for an output ``y`` with upstream gradient ``g``,
the relevance of ``y`` is ``R_y = y * g``; a rule is conservative when the relevance of its inputs
sums to ``sum(R_y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssm_models.ops import causal_conv1d
from ssm_models.primitives import Attention, CausalConv1d, RMSNorm, SiLU

Forward = Callable[..., Any]


class Rule:
    """Base class: ``forward(module, original_forward, *args, **kwargs)`` must return the same value
    as ``original_forward(*args, **kwargs)``."""

    name = "rule"

    def forward(self, module: nn.Module, original: Forward, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityRule(Rule):
    """Identity rule for an elementwise activation ``y = f(x)``: all relevance of ``y`` goes to ``x``.

    ``y = x * (f(x) / x).detach()`` so ``dR``: ``R_x = x * g * f(x)/x = R_y``. For SiLU the ratio is
    ``sigmoid(x)`` exactly (MambaLRP, Section 4: "SiLU: identity rule"); for other activations it is
    ``f(x)/x`` with ``0`` where ``x = 0`` (``f(0) = 0`` for SiLU, GELU and the like).
    """

    name = "identity"

    def forward(self, module: nn.Module, original: Forward, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, SiLU | nn.SiLU):
            return x * torch.sigmoid(x).detach()
        y = original(x)
        nonzero = x != 0
        ratio = torch.where(nonzero, y / torch.where(nonzero, x, torch.ones_like(x)), torch.zeros_like(y))
        return x * ratio.detach()


class UniformProductRule(Rule):
    """Uniform rule for an ``n``-factor product ``y = a_1 * ... * a_n`` (the half rule for n = 2).

    ``y / n + (y - y / n).detach()``: the gradient of every factor is scaled by ``1/n``, so each
    factor receives ``R_y / n`` and the factors together receive ``R_y`` (MambaLRP, Section 4,
    gating: "half rule").
    """

    name = "uniform_product"

    def __init__(self, n_factors: int = 2) -> None:
        if n_factors < 1:
            raise ValueError(f"UniformProductRule: `n_factors` must be >= 1, got {n_factors}")
        self.n_factors = n_factors

    def forward(self, module: nn.Module, original: Forward, *factors: torch.Tensor) -> torch.Tensor:
        y = original(*factors)
        share = y / self.n_factors
        return share + (y - share).detach()

    def __repr__(self) -> str:
        return f"UniformProductRule(n_factors={self.n_factors})"


class NormRule(Rule):
    """LN-rule (Ali et al., 2022): the normaliser is treated as a constant.

    RMSNorm: ``y = w * x * rsqrt(mean(x^2) + eps).detach()``; LayerNorm:
    ``y = w * (x - mean(x)) / std(x).detach() + b`` (the centring is linear and kept). The layer
    is then linear in ``x`` and relevance passes as through a linear map.
    """

    name = "norm"

    def forward(self, module: nn.Module, original: Forward, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, RMSNorm):
            compute = torch.promote_types(x.dtype, torch.float32)
            return module.weight * (x.to(compute) * module.inverse_rms(x).detach()).to(x.dtype)
        if isinstance(module, nn.LayerNorm):
            dims = tuple(range(-len(module.normalized_shape), 0))
            centred = x - x.mean(dim=dims, keepdim=True)
            inverse_std = torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + module.eps).detach()
            y = centred * inverse_std
            if module.weight is not None:
                y = y * module.weight
            if module.bias is not None:
                y = y + module.bias
            return y
        raise TypeError(f"NormRule does not know {type(module).__name__}")


class SSMRule(Rule):
    """MambaLRP's rule for the selective SSM (Section 4): ``A_bar = exp(delta A)``,
    ``B_bar = delta B`` and ``C`` are constants, so relevance flows only through ``u``:
    ``delta, A, B, C, D, delta_bias`` are detached (``D u`` stays linear in ``u``). The scan's
    backward then computes ``du`` alone."""

    name = "ssm"

    def forward(self, module: nn.Module, original: Forward, u: torch.Tensor, delta: torch.Tensor,
                A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
                delta_bias: torch.Tensor | None, **kwargs: Any) -> Any:
        def detach(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach()

        return original(u, delta.detach(), A.detach(), B.detach(), C.detach(), detach(D), detach(delta_bias),
                        **kwargs)


def _affine(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The affine map of ``module`` with the given parameters: Linear or (causal) Conv1d."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, CausalConv1d):
        return causal_conv1d(x, weight, bias, backend=module.backend)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    raise TypeError(f"rule for affine layers does not know {type(module).__name__}")


def _stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)``, with sign(0) = +1, so the denominator is never zero."""
    return z + epsilon * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


class EpsilonRule(Rule):
    """LRP-epsilon for Linear / Conv1d: ``R_i = x_i sum_j w_ij R_j / (z_j + eps sign(z_j))``.

    Value ``z`` (exactly), gradient ``W^T (g * z / (z + eps sign z))``. Absorbs some relevance
    (not conservative for eps > 0); LRP-0 is eps = 0.
    """

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        if epsilon < 0:
            raise ValueError(f"EpsilonRule: `epsilon` must be >= 0, got {epsilon}")
        self.epsilon = epsilon

    def forward(self, module: nn.Module, original: Forward, x: torch.Tensor) -> torch.Tensor:
        z = _affine(module, x, module.weight, module.bias)
        factor = (z / _stabilise(z, self.epsilon)).detach()
        return z.detach() + (z - z.detach()) * factor

    def __repr__(self) -> str:
        return f"EpsilonRule(epsilon={self.epsilon})"


class GammaRule(Rule):
    """LRP-gamma for Linear / Conv1d: positive weights are favoured,
    ``R_i = x_i sum_j (w_ij + gamma w_ij^+) R_j / z^gamma_j`` with
    ``z^gamma = x (W + gamma W^+) + (b + gamma b^+)``.

    Value ``z`` exactly; gradient ``(W + gamma W^+)^T (g * z / z^gamma)`` (denominator stabilised by
    ``epsilon``). gamma = 0 is LRP-0.
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        if gamma < 0:
            raise ValueError(f"GammaRule: `gamma` must be >= 0, got {gamma}")
        self.gamma, self.epsilon = gamma, epsilon

    def forward(self, module: nn.Module, original: Forward, x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        z = _affine(module, x, weight, bias).detach()
        weight_gamma = weight + self.gamma * weight.clamp(min=0)
        bias_gamma = None if bias is None else bias + self.gamma * bias.clamp(min=0)
        z_gamma = _affine(module, x, weight_gamma, bias_gamma)
        factor = (z / _stabilise(z_gamma.detach(), self.epsilon)).detach()
        return z + (z_gamma - z_gamma.detach()) * factor

    def __repr__(self) -> str:
        return f"GammaRule(gamma={self.gamma}, epsilon={self.epsilon})"


class PassRule(Rule):
    """Pass rule for elementwise modules whose input and output have one shape: the module is
    treated as the identity in the backward pass, ``y = x + (f(x) - x).detach()``, so the upstream
    gradient reaches ``x`` unchanged (zennit's ``Pass``)."""

    name = "pass"

    def forward(self, module: nn.Module, original: Forward, x: torch.Tensor) -> torch.Tensor:
        y = original(x)
        if y.shape != x.shape:
            raise ValueError(f"PassRule needs equal input and output shapes, got {tuple(x.shape)} -> {tuple(y.shape)}")
        return x + (y - x).detach()


def _uniform_bilinear(product: torch.Tensor) -> torch.Tensor:
    """A bilinear product with the uniform rule: same value, each factor gets half the gradient."""
    half = product / 2
    return half + (product - half).detach()


class CPLRPRule(Rule):
    """CP-LRP for attention (Ali et al. 2022, REFERENCE.md 6): the attention probabilities are
    constants, ``out = P.detach() v``, so attention is linear in the values and all relevance flows
    through them (conservative); queries and keys receive none."""

    name = "cp_lrp"

    def forward(self, module: nn.Module, original: Forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(module, Attention):
            raise TypeError(f"CPLRPRule does not know {type(module).__name__}")
        return torch.matmul(module.probabilities(q, k, mask).detach(), v)


class AttnLRPRule(Rule):
    """AttnLRP for attention (Achtibat et al. 2024, REFERENCE.md 6): the products ``q k^T`` and
    ``P v`` get the uniform rule (half the relevance to each factor) and the softmax its AttnLRP rule
    ``R_x = x (R_y - y sum R_y)``, which is exactly gradient x input of the softmax, so it needs no
    modification. Relevance reaches queries, keys and values. Not exactly conservative: the
    softmax rule's Taylor bias ``sum_i x_i y_i sum_j R_j`` is absorbed (it vanishes only when the
    scores are equal); ``cp_lrp`` is the conservative choice."""

    name = "attn_lrp"

    def forward(self, module: nn.Module, original: Forward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(module, Attention):
            raise TypeError(f"AttnLRPRule does not know {type(module).__name__}")
        scores = _uniform_bilinear(module.scores(q, k))
        probabilities = module.probabilities_from_scores(scores, mask)
        return _uniform_bilinear(torch.matmul(probabilities, v))
