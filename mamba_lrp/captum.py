"""Every method of ``explain()`` as a Captum attribution: :class:`MambaLRP`.

Captum's convention (``captum.attr.Attribution``): ``attribute(inputs, target=...,
additional_forward_args=...)`` returns attributions of the shape of ``inputs``, and the explained
function is ``forward_func(inputs, *additional_forward_args)`` followed by picking column
``target``. Here ``forward_func`` is :meth:`MambaLRP.logits`: ``(inputs, position=-1,
attention_mask=None) -> logits (B, V)`` at each example's explained position, so that Captum's
metrics explain exactly what :func:`mamba_lrp.explain` explains. Two kinds of ``inputs``:

- token ids (B, L) long -> relevance (B, L) = ``explain(...).relevance``, for every method name.
  Captum's ``infidelity`` (Yeh et al. 2019) works on ids: its perturbation replaces tokens (see
  :func:`token_replacement_perturbation`; the perturbation indicator ``I`` is the 0/1 mask of
  replaced tokens, so ``I . R`` is the relevance of the replaced tokens, compared with the drop of f).
- token embeddings (B, L, D) float -> relevance (B, L, D) = ``e * (modified) df/de`` per embedding
  entry (its sum over D is the token relevance), for the LRP composites (``mamba_lrp``, its
  ablations, ``gradient_x_input``, ...). Captum's ``sensitivity_max`` needs this path, since its
  perturbation adds noise to the inputs; ``infidelity`` with noise perturbations too.

Per-example ``position`` and ``attention_mask`` may be given as keywords or, Captum style, as
``additional_forward_args=(position, attention_mask)``; the latter are expanded along with the inputs
by Captum's metrics (keywords are not), so use them there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import Attribution
from torch import nn

from attribution_rules import composite_names, get_composite
from mamba_lrp.baselines import logits_at
from mamba_lrp.explain import _per_example, _resolve_positions, explain, resolve_model
from mamba_lrp.methods import get_method

__all__ = ["MambaLRP", "token_replacement_perturbation"]


class MambaLRP(Attribution):
    """A Captum ``Attribution`` for ``explain(model, ..., method=method, **options)``.

    ``model``: an ``ssm_models`` LM or a ``transformers`` ``MambaForCausalLM``; ``method``: any name of
    :func:`mamba_lrp.method_names`; ``options``: passed to the method on every call (and merged with
    the options of :meth:`attribute`).
    """

    def __init__(self, model: nn.Module, method: str = "mamba_lrp", **options: Any) -> None:
        get_method(method)  # raises ValueError listing the known names
        self.model = resolve_model(model)
        self.method = method
        self.options = options
        super().__init__(self.logits)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    # ------------------------------------------------------------------ the explained function
    def _resolve(self, inputs: Any, position: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                 torch.Tensor]:
        """``(inputs (B, L) ids or (B, L, D) embeddings, mask (B, L) bool or None, positions (B,))``."""
        if isinstance(inputs, tuple | list):
            if len(inputs) != 1:
                raise ValueError(f"MambaLRP takes one input tensor, got a tuple of {len(inputs)}")
            inputs = inputs[0]
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"`inputs` must be a tensor of token ids or embeddings, got {type(inputs).__name__}")
        if inputs.is_floating_point():
            if inputs.dim() != 3:  # hidden_states checks the rest
                raise ValueError(f"`inputs` embeddings must have shape (batch, L, d_model), got {tuple(inputs.shape)}")
        else:
            self.model.check_input_ids(inputs, "inputs")
        batch, length = inputs.shape[:2]
        mask = None
        if attention_mask is not None:
            mask = self.model.check_attention_mask(torch.as_tensor(attention_mask), (batch, length))
        positions = _resolve_positions(position.cpu() if isinstance(position, torch.Tensor) else position,
                                       None if mask is None else mask.cpu(), length, batch)
        return inputs, mask, positions

    def logits(self, inputs: torch.Tensor, position: Any = -1, attention_mask: Any = None) -> torch.Tensor:
        """Logits (B, V) at the explained position of each example; ``inputs`` ids (B, L) or
        embeddings (B, L, D). ``position`` as in :func:`mamba_lrp.explain` (negative: from each
        example's last real token)."""
        inputs, mask, positions = self._resolve(inputs, position, attention_mask)
        if inputs.is_floating_point():
            hidden = self.model.hidden_states(inputs_embeds=inputs, attention_mask=mask)
        else:
            hidden = self.model.hidden_states(inputs, attention_mask=mask)
        return logits_at(self.model, hidden, positions)

    # ------------------------------------------------------------------------------ attribute
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Any = None,
        position: Any = -1,
        attention_mask: Any = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Relevance of ``inputs``: token ids (B, L) -> (B, L); embeddings (B, L, D) -> (B, L, D)
        (composites only); a 1-tuple of either gives a 1-tuple back (Captum's convention, which its
        metrics rely on). ``target``: a token id or one per example (None: the top prediction);
        ``additional_forward_args``: ``(position,)`` or ``(position, attention_mask)``, instead of the
        keywords. ``options`` go to the method."""
        if additional_forward_args is not None:
            if attention_mask is not None or not (isinstance(position, int) and position == -1):
                raise ValueError("pass `position`/`attention_mask` either as keywords or in `additional_forward_args`")
            extra = additional_forward_args
            extra = extra if isinstance(extra, tuple) else (extra,)
            if not 1 <= len(extra) <= 2:
                raise ValueError("`additional_forward_args` must be (position,) or (position, attention_mask)")
            position, attention_mask = extra[0], extra[1] if len(extra) == 2 else None
        if isinstance(target, list | tuple):
            target = torch.as_tensor(target)
        options = {**self.options, **options}
        as_tuple = isinstance(inputs, tuple)
        inputs, mask, positions = self._resolve(inputs, position, attention_mask)
        if not inputs.is_floating_point():
            explanation = explain(self.model, inputs, target=target, position=positions, method=self.method,
                                  attention_mask=None if mask is None else mask.long(), **options)
            relevance = explanation.relevance.to(inputs.device)
        else:
            relevance = self._attribute_embeddings(inputs, target, mask, positions, **options)
        return (relevance,) if as_tuple else relevance

    def _attribute_embeddings(
        self, embeddings: torch.Tensor, target: Any, mask: torch.Tensor | None, positions: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """``e * df/de`` (B, L, D) under the composite ``self.method`` (LRP as gradient x input,
        REFERENCE.md section 2), f the target logit at ``positions``."""
        if self.method not in composite_names():
            raise ValueError(
                f"attribution over embeddings needs an LRP composite ({', '.join(composite_names())}); "
                f"{self.method!r} explains token ids only"
            )
        if options:
            raise ValueError(f"composite {self.method!r} takes no options, got {sorted(options)}")
        model = self.model
        batch = embeddings.shape[0]
        targets = None
        if target is not None:
            targets = _per_example(target.cpu() if isinstance(target, torch.Tensor) else target, batch, "target")
            if bool((targets < 0).any()) or bool((targets >= model.num_embeddings).any()):
                raise ValueError(f"`target` {targets.tolist()} is outside [0, {model.num_embeddings - 1}]")
        training = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with get_composite(self.method).context(model), torch.enable_grad():
                leaf = embeddings.detach().requires_grad_(True)
                hidden = model.hidden_states(inputs_embeds=leaf, attention_mask=mask)
                logits = logits_at(model, hidden, positions)
                if targets is None:
                    targets = logits.detach()[:, : model.config.vocab_size].argmax(-1)
                rows = torch.arange(batch, device=logits.device)
                output = logits[rows, targets.to(logits.device)]
                (gradient,) = torch.autograd.grad(output.sum(), leaf)
        finally:
            for module, was_training in training.items():
                module.training = was_training
        relevance = leaf.detach() * gradient
        if mask is not None:
            relevance = relevance * mask[:, :, None].to(relevance.dtype)
        return relevance


def token_replacement_perturbation(
    replacement_id: int = 0, probability: float = 0.25, generator: torch.Generator | None = None
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A ``perturb_func`` for ``captum.metrics.infidelity`` on token ids (B, L): each token is
    replaced by ``replacement_id`` with probability ``probability``. Returns ``(perturbation,
    perturbed_ids)`` with ``perturbation`` (B, L) float, 1 where a token was replaced (the binary
    perturbation of Yeh et al. 2019 for global attributions). ``generator``: a CPU generator."""
    if not 0 <= probability <= 1:
        raise ValueError(f"`probability` must be in [0, 1], got {probability!r}")

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        replaced = (torch.rand(inputs.shape, generator=generator) < probability).to(inputs.device)
        perturbed = torch.where(replaced, torch.full_like(inputs, replacement_id), inputs)
        return replaced.to(torch.get_default_dtype()), perturbed

    return perturb
