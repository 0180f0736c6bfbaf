"""The attention primitive and its two rules (CP-LRP, AttnLRP) against hand-derived relevance."""

from __future__ import annotations

import math

import torch

from attribution_rules import get_composite
from attribution_rules.rules import AttnLRPRule, CPLRPRule
from ssm_models.primitives import Attention

B, H, LQ, LK, DH = 2, 3, 5, 6, 4


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, DH, generator=generator, dtype=torch.float64, requires_grad=True)
               for n in (LQ, LK, LK))
    mask = torch.rand(B, 1, LQ, LK, generator=generator) > 0.4
    mask[..., 0] = True  # every query attends to at least one key
    upstream = torch.randn(B, H, LQ, DH, generator=generator, dtype=torch.float64)
    return q, k, v, mask, upstream


def loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) over allowed keys) v, one (b, h, i) at a time with Python floats."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(LQ):
                allowed = [j for j in range(LK) if bool(mask[b, 0, i, j])]
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(DH) for j in allowed]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for weight, j in zip(weights, allowed, strict=True):
                    out[b, h, i] += weight / total * v[b, h, j].detach()
    return out


def test_plain_attention_is_masked_softmax_attention() -> None:
    q, k, v, mask, _ = inputs()
    torch.testing.assert_close(Attention()(q, k, v, mask).detach(), loop_attention(q, k, v, mask))
    probabilities = Attention().probabilities(q, k, mask)
    assert bool((probabilities[~mask.expand_as(probabilities)] == 0).all())
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(B, H, LQ, dtype=torch.float64))


def test_cp_lrp_sends_all_relevance_to_the_values() -> None:
    q, k, v, mask, upstream = inputs(1)
    module = Attention()
    out = CPLRPRule().forward(module, module.forward, q, k, v, mask)
    torch.testing.assert_close(out.detach(), loop_attention(q, k, v, mask))
    out.backward(upstream)
    assert q.grad is None and k.grad is None
    probabilities = module.probabilities(q, k, mask).detach()
    # R_v[j, d] = v[j, d] * sum_i P[i, j] g[i, d]
    expected = v.detach() * torch.einsum("bhij,bhid->bhjd", probabilities, upstream)
    torch.testing.assert_close(v * v.grad, expected)
    torch.testing.assert_close((v * v.grad).sum(), (out.detach() * upstream).sum())  # conservative


def test_attn_lrp_uniform_products_and_softmax_gradient() -> None:
    q, k, v, mask, upstream = inputs(2)
    module = Attention()
    out = AttnLRPRule().forward(module, module.forward, q, k, v, mask)
    torch.testing.assert_close(out.detach(), loop_attention(q, k, v, mask))
    out.backward(upstream)
    scale = DH**-0.5
    scores = torch.einsum("bhid,bhjd->bhij", q.detach(), k.detach()) * scale
    probabilities = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    grad_p = 0.5 * torch.einsum("bhid,bhjd->bhij", upstream, v.detach())          # uniform rule on P v
    grad_scores = probabilities * (grad_p - (probabilities * grad_p).sum(-1, keepdim=True))  # softmax rule
    torch.testing.assert_close(v.grad, 0.5 * torch.einsum("bhij,bhid->bhjd", probabilities, upstream))
    torch.testing.assert_close(q.grad, 0.5 * scale * torch.einsum("bhij,bhjd->bhid", grad_scores, k.detach()))
    torch.testing.assert_close(k.grad, 0.5 * scale * torch.einsum("bhij,bhid->bhjd", grad_scores, q.detach()))
    # queries and keys together receive exactly the relevance of the scores (the product is conserved)
    relevance_qk = (q * q.grad).sum() + (k * k.grad).sum()
    torch.testing.assert_close(relevance_qk.detach(), (scores * grad_scores).sum())
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_mamba_lrp_composites_pick_the_attention_rule() -> None:
    module = Attention()
    assert isinstance(get_composite("mamba_lrp").rule_for("attn", module), CPLRPRule)
    assert isinstance(get_composite("mamba_lrp_attnlrp").rule_for("attn", module), AttnLRPRule)
    assert get_composite("gradient_x_input").rule_for("attn", module) is None
