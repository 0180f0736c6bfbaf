"""Captum baselines on the token embeddings, as methods of ``explain(method=...)``.

Every method here explains the same scalar as MambaLRP (REFERENCE.md section 2): ``f`` = the logit
of ``target`` at the explained ``position``, a function of the token embeddings ``e`` (B, L, D)::

    f(e) = head(hidden_states(inputs_embeds=e, attention_mask=mask)[b, position_b])[target_b]

The head (a 50K vocabulary for the public models) is applied at the explained positions only.
``target`` None means the model's top prediction; it is found once with a no-grad forward and then
passed to Captum as a per-example target, so every perturbed or interpolated input explains the
same logit. Each method returns one score per token, (B, L):

- ``integrated_gradients``: Captum ``IntegratedGradients`` (Sundararajan et al. 2017); score = sum over D.
- ``saliency``: Captum ``Saliency`` (Simonyan et al. 2014); score = L2 norm over D of ``df/de_t``.
- ``smoothgrad``: Captum ``NoiseTunnel(InputXGradient)`` (Smilkov et al. 2017); score = sum over D.
- ``occlusion``: Captum ``Occlusion`` (Zeiler and Fergus 2014); score = the drop ``f(x) - f(x~)``.
- ``feature_ablation``: Captum ``FeatureAblation``, one feature per token; score = the drop.
- ``shapley_sampling``: Captum ``ShapleyValueSampling`` (Castro et al. 2009); score = the token's
  sampled Shapley value.

Plain gradient x input is the composite ``gradient_x_input`` of :mod:`attribution_rules` (no rules).

Design choices, each for a reason:

- *Integrated Gradients on the embeddings.* Captum's ``LayerIntegratedGradients`` on the embedding
  layer computes IG with respect to that layer's output, i.e. exactly
  ``IntegratedGradients(f)(e, e_baseline)``. We call ``IntegratedGradients`` on the embeddings
  directly: our models accept ``inputs_embeds``, no hook is put on the user's model, and the
  default baseline, the all-zero embedding, is expressible (with ``LayerIntegratedGradients``
  the baseline must be token ids).
- *Perturbation = replacing a token.* Replacing the embedding of token ``t`` by the embedding of
  ``baseline_token`` is exactly replacing the token id (the embedding is a table look-up).
- *Padding.* Padded positions (``attention_mask`` 0) get relevance exactly 0 and are never
  perturbed: the baseline there equals the input (so ablating, occluding or interpolating leaves
  them as they are), and in feature masks they share the group of a real token of their example,
  so no forward pass and no Shapley player is spent on them. (Our models ignore padded positions
  anyway; SmoothGrad's Gaussian noise also lands on them, without effect.)
- *Precision.* Captum accumulates ``Occlusion`` and ``ShapleyValueSampling`` in float32 whatever
  the model's dtype; the scores are returned in the model's dtype but carry float32 rounding.
- *Randomness* (``smoothgrad``, ``shapley_sampling``) is drawn under ``torch.random.fork_rng`` seeded
  with the option ``seed`` (default 0): results are reproducible and the caller's global RNG state is
  left as it was.

Captum's own knobs pass through as options (``internal_batch_size``, ``perturbations_per_eval``,
``nt_samples_batch_size``, ``show_progress``, ...); the perturbation methods evaluate
``perturbations_per_eval=16`` perturbed inputs per forward by default (Captum: 1). IG's ``method``
(the quadrature) is named ``integration_method`` here, because ``explain`` uses ``method`` for the
method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from captum.attr import (
    FeatureAblation,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Occlusion,
    Saliency,
    ShapleyValueSampling,
)
from torch import nn

from mamba_lrp.methods import AttributionInputs, AttributionResult, register_method, select_outputs

__all__ = [
    "feature_ablation",
    "integrated_gradients",
    "logits_at",
    "occlusion",
    "saliency",
    "shapley_sampling",
    "smoothgrad",
]


def logits_at(model: nn.Module, hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) at ``position`` (B,) of the final hidden states ``hidden`` (B, L, D): the head
    applied to one position per example only."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.head(hidden[rows, position.to(hidden.device)])


def embedding_forward(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The function Captum explains: ``(embeddings (B, L, D), attention_mask (B, L) or None,
    position (B,)) -> logits (B, V)`` at each example's explained position. Captum selects the
    target column and expands ``attention_mask`` and ``position`` with the inputs (they are passed
    as ``additional_forward_args``)."""

    def forward(embeddings: torch.Tensor, attention_mask: torch.Tensor | None, position: torch.Tensor) -> torch.Tensor:
        hidden = model.hidden_states(inputs_embeds=embeddings, attention_mask=attention_mask)
        return logits_at(model, hidden, position)

    return forward


# --------------------------------------------------------------------------- shared preparation
class _Prepared:
    """What every baseline needs: ``embeddings`` (B, L, D) detached; ``mask`` (B, L) bool or None;
    ``position``, ``target`` (B,) long; ``output`` f (B,) at the real input; ``forward`` and
    ``forward_args`` for Captum."""

    def __init__(self, inputs: AttributionInputs, name: str) -> None:
        if inputs.layer is not None:
            raise ValueError(f"method {name!r} explains the token embeddings only; `layer` is not supported")
        model = inputs.model
        self.model = model
        self.mask = inputs.attention_mask
        with torch.no_grad():
            self.embeddings = model.embed(inputs.input_ids).detach()
            self.position = inputs.position.to(self.embeddings.device)
            hidden = model.hidden_states(inputs_embeds=self.embeddings, attention_mask=self.mask)
            output, target = select_outputs(hidden, inputs)
        self.output, self.target = output.detach(), target
        self.forward = embedding_forward(model)
        self.forward_args = (self.mask, self.position)

    def leaf(self) -> torch.Tensor:
        """A copy of the embeddings that requires grad, for Captum's gradient methods."""
        return self.embeddings.clone().requires_grad_(True)

    def baseline_embeddings(self, baseline_token: int | None) -> torch.Tensor:
        """(B, L, D): the embedding of ``baseline_token`` (zeros if None) at real positions, the input
        itself at padded positions (so they are never perturbed)."""
        if baseline_token is None:
            baseline = torch.zeros_like(self.embeddings)
        else:
            token = _check_token(self.model, baseline_token, "baseline_token")
            ids = torch.full(self.embeddings.shape[:2], token, dtype=torch.long, device=self.embeddings.device)
            with torch.no_grad():
                baseline = self.model.embed(ids).detach()
        if self.mask is not None:
            baseline = torch.where(self.mask[:, :, None], baseline, self.embeddings)
        return baseline

    def token_feature_mask(self) -> torch.Tensor:
        """(B, L, 1) long feature ids for Captum: real token ``k`` of an example (in order) is feature
        ``k``; a padded position shares the id of a neighbouring real token (its baseline is the input,
        so it is never changed)."""
        length = self.embeddings.shape[1]
        if self.mask is None:
            ids = torch.arange(length, device=self.embeddings.device).expand(self.embeddings.shape[0], length)
        else:
            ids = (self.mask.long().cumsum(dim=1) - 1).clamp_min(0)
        return ids[:, :, None].contiguous()

    def result(self, scores: torch.Tensor) -> AttributionResult:
        """Token scores (B, L) -> the result, with exact zeros at padded positions."""
        scores = scores.detach().to(self.embeddings.dtype)
        if self.mask is not None:
            scores = torch.where(self.mask, scores, torch.zeros_like(scores))
        return AttributionResult(relevance=scores, output=self.output, target=self.target)


def _check_token(model: nn.Module, token: Any, name: str) -> int:
    if isinstance(token, torch.Tensor) and token.numel() == 1:
        token = token.item()
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.num_embeddings:
        raise ValueError(f"`{name}` must be a token id in [0, {model.num_embeddings - 1}], got {token!r}")
    return token


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNG seeded with ``seed`` (CPU and ``device``), restoring
    the caller's RNG state afterwards. ``seed`` None: the global RNG as it is."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------- the methods
def integrated_gradients(
    inputs: AttributionInputs,
    n_steps: int = 50,
    baseline_token: int | None = None,
    internal_batch_size: int | None = None,
    integration_method: str = "gausslegendre",
    **captum_options: Any,
) -> AttributionResult:
    """Integrated Gradients (Sundararajan, Taly, Yan 2017, eq. 1) on the embeddings::

        IG_t,d = (e - e')_t,d * integral_0^1 df/de_t,d (e' + a (e - e')) da,   R_t = sum_d IG_t,d

    ``e'`` = the embedding of ``baseline_token`` at every real position, or zeros (default). By
    completeness ``sum_t R_t ~ f(e) - f(e')``, up to the quadrature error of ``n_steps`` points
    (``integration_method``, Captum's ``method``; ``internal_batch_size`` bounds memory). Near the
    zero baseline the first RMSNorm, ``x / sqrt(mean(x^2) + eps)``, is steep, so models with large,
    rough weights may need many more steps; compare ``sum_t R_t`` with ``f(e) - f(e')`` when it matters.
    Returns relevance (B, L)."""
    prepared = _Prepared(inputs, "integrated_gradients")
    n_steps = _check_positive_int(n_steps, "n_steps")
    attributions = IntegratedGradients(prepared.forward).attribute(
        prepared.leaf(), baselines=prepared.baseline_embeddings(baseline_token), target=prepared.target,
        additional_forward_args=prepared.forward_args, n_steps=n_steps, method=integration_method,
        internal_batch_size=internal_batch_size, **captum_options,
    )  # (B, L, D)
    return prepared.result(attributions.sum(-1))


def saliency(inputs: AttributionInputs, **captum_options: Any) -> AttributionResult:
    """Saliency (Simonyan, Vedaldi, Zisserman 2014): the gradient ``g = df/de`` (B, L, D); the token
    score is its L2 norm over the embedding dimension, ``R_t = ||g_t||_2`` (>= 0, unsigned: it says
    how sensitive f is to token t, not in which direction). Returns relevance (B, L)."""
    prepared = _Prepared(inputs, "saliency")
    gradients = Saliency(prepared.forward).attribute(
        prepared.leaf(), target=prepared.target, abs=False, additional_forward_args=prepared.forward_args,
        **captum_options,
    )  # (B, L, D)
    return prepared.result(gradients.norm(dim=-1))


def smoothgrad(
    inputs: AttributionInputs,
    nt_samples: int = 25,
    stdevs: float | None = None,
    seed: int | None = 0,
    **captum_options: Any,
) -> AttributionResult:
    """SmoothGrad (Smilkov et al. 2017) over **gradient x input**, as in the MambaLRP paper's baseline::

        R_t = sum_d mean_{k=1..nt_samples} (e_k * df/de (e_k))_t,d,   e_k = e + N(0, stdevs^2)

    (Captum ``NoiseTunnel(InputXGradient)``, ``nt_type="smoothgrad"``; the input multiplied is the
    noisy one, as Captum does.) ``stdevs`` default: 0.15 x the standard deviation of the entries of
    the embedding matrix (rows of the real vocabulary), Smilkov et al.'s 15 % noise level measured in
    the embedding space's own scale. ``seed`` seeds the noise (None: the global RNG).
    ``nt_samples_batch_size`` and other Captum knobs pass through. Returns relevance (B, L)."""
    prepared = _Prepared(inputs, "smoothgrad")
    nt_samples = _check_positive_int(nt_samples, "nt_samples")
    if stdevs is None:
        weight = prepared.model.embedding.weight[: prepared.model.config.vocab_size]
        stdevs = 0.15 * float(weight.detach().double().std())
    if not stdevs >= 0:
        raise ValueError(f"`stdevs` must be >= 0, got {stdevs!r}")
    with seeded(seed, prepared.embeddings.device):
        attributions = NoiseTunnel(InputXGradient(prepared.forward)).attribute(
            prepared.leaf(), nt_type="smoothgrad", nt_samples=nt_samples, stdevs=float(stdevs),
            target=prepared.target, additional_forward_args=prepared.forward_args, **captum_options,
        )  # (B, L, D)
    return prepared.result(attributions.sum(-1))


def occlusion(
    inputs: AttributionInputs,
    window: int = 1,
    stride: int = 1,
    baseline_token: int = 0,
    perturbations_per_eval: int = 16,
    **captum_options: Any,
) -> AttributionResult:
    """Occlusion (Zeiler and Fergus 2014) with a sliding window of ``window`` tokens moved by
    ``stride``: each window's tokens are replaced by ``baseline_token`` (default 0, the pad id of
    the public Mamba tokenizer) and the drop ``f(x) - f(x~)`` is recorded; a token's score is the
    mean drop over the windows that contain it (Captum ``Occlusion``; windows lie fully inside the
    sequence). With ``window=1``: ``R_t = f(x) - f(x with token t replaced)``. Returns (B, L)."""
    prepared = _Prepared(inputs, "occlusion")
    window, stride = _check_positive_int(window, "window"), _check_positive_int(stride, "stride")
    length, width = prepared.embeddings.shape[1:]
    if window > length:
        raise ValueError(f"`window` ({window}) is longer than the sequence ({length})")
    with torch.no_grad():
        attributions = Occlusion(prepared.forward).attribute(
            prepared.embeddings, sliding_window_shapes=(window, width), strides=(stride, width),
            baselines=prepared.baseline_embeddings(baseline_token), target=prepared.target,
            additional_forward_args=prepared.forward_args, perturbations_per_eval=perturbations_per_eval,
            **captum_options,
        )  # (B, L, D), equal along D
    return prepared.result(attributions[..., 0])


def feature_ablation(
    inputs: AttributionInputs, baseline_token: int = 0, perturbations_per_eval: int = 16, **captum_options: Any
) -> AttributionResult:
    """Feature ablation, one feature per token (Captum ``FeatureAblation``): ``R_t = f(x) - f(x with
    token t replaced by baseline_token)`` (default 0 / pad). The same numbers as ``occlusion`` with
    window 1, computed with one forward per real token of the longest example. Returns (B, L)."""
    prepared = _Prepared(inputs, "feature_ablation")
    with torch.no_grad():
        attributions = FeatureAblation(prepared.forward).attribute(
            prepared.embeddings, baselines=prepared.baseline_embeddings(baseline_token), target=prepared.target,
            additional_forward_args=prepared.forward_args, feature_mask=prepared.token_feature_mask(),
            perturbations_per_eval=perturbations_per_eval, **captum_options,
        )  # (B, L, D), equal along D
    return prepared.result(attributions[..., 0])


def shapley_sampling(
    inputs: AttributionInputs,
    n_samples: int = 25,
    baseline_token: int = 0,
    perturbations_per_eval: int = 16,
    seed: int | None = 0,
    **captum_options: Any,
) -> AttributionResult:
    """Shapley value sampling (Castro, Gomez, Tejada 2009; Captum ``ShapleyValueSampling``), the
    tokens being the players and an absent token being replaced by ``baseline_token``::

        R_t = mean over n_samples random orders pi of [f(S_pi,t + t) - f(S_pi,t)]

    ``S_pi,t`` the tokens before t in pi. Efficiency: ``sum_t R_t = f(x) - f(all replaced)`` exactly
    for every sample. ``seed`` seeds the orders (None: the global RNG). Cost: ``n_samples x
    (n_tokens + 1)`` forwards. Returns relevance (B, L)."""
    prepared = _Prepared(inputs, "shapley_sampling")
    n_samples = _check_positive_int(n_samples, "n_samples")
    with torch.no_grad(), seeded(seed, prepared.embeddings.device):
        attributions = ShapleyValueSampling(prepared.forward).attribute(
            prepared.embeddings, baselines=prepared.baseline_embeddings(baseline_token), target=prepared.target,
            additional_forward_args=prepared.forward_args, feature_mask=prepared.token_feature_mask(),
            n_samples=n_samples, perturbations_per_eval=perturbations_per_eval, **captum_options,
        )  # (B, L, D), equal along D
    return prepared.result(attributions[..., 0])


for _name, _method in (
    ("integrated_gradients", integrated_gradients),
    ("saliency", saliency),
    ("smoothgrad", smoothgrad),
    ("occlusion", occlusion),
    ("feature_ablation", feature_ablation),
    ("shapley_sampling", shapley_sampling),
):
    register_method(_name, _method, overwrite=True)
