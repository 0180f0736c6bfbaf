"""The one registry of attribution methods that ``explain(method=...)`` chooses from.

A method is a function ``(inputs: AttributionInputs, **options) -> AttributionResult``. Every
composite of :mod:`attribution_rules` (built-in or registered by the user) is a method through
:func:`lrp_attribution`; other methods (baselines) register themselves with
:func:`register_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from attribution_rules import Composite, composite_names, get_composite


@dataclass
class AttributionInputs:
    """What a method explains. ``input_ids`` (B, L); ``target``, ``position`` (B,) long with
    positions already resolved to indices in ``[0, L)``, or ``target`` None for the top
    prediction; ``attention_mask`` (B, L) bool or None; ``layer``: relevance at the input of this
    block instead of the embeddings (None)."""

    model: nn.Module
    input_ids: torch.Tensor
    target: torch.Tensor | None
    position: torch.Tensor
    attention_mask: torch.Tensor | None
    layer: int | None


@dataclass
class AttributionResult:
    """``relevance`` (B, L); ``output`` (B,) the explained value f; ``target`` (B,) long;
    ``layer_sums`` (B, n_layer + 1) or None."""

    relevance: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor
    layer_sums: torch.Tensor | None = None


Method = Callable[..., AttributionResult]
_METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method, overwrite: bool = False) -> None:
    """Register an attribution method under ``name`` (composites need no registration here)."""
    if name in _METHODS and not overwrite:
        raise ValueError(f"register_method: {name!r} is already registered (pass overwrite=True to replace it)")
    _METHODS[name] = method


def method_names() -> list[str]:
    """Every name ``explain(method=...)`` accepts: registered methods and all composites."""
    return sorted(set(_METHODS) | set(composite_names()))


def get_method(name: str) -> Method:
    if name in _METHODS:
        return _METHODS[name]
    if name in composite_names():
        return lambda inputs, **options: lrp_attribution(inputs, get_composite(name), **options)
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")


def select_outputs(hidden: torch.Tensor, inputs: AttributionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The explained values f (B,) = ``logits[b, position_b, target_b]`` from the final hidden
    states (B, L, D), with the head applied at the explained positions only; ``target`` None
    picks the top prediction among the model's ``config.vocab_size`` real ids. Returns ``(f, target)``."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    at_position = inputs.model.head(hidden[rows, inputs.position.to(hidden.device)])  # (B, V)
    vocab_size = inputs.model.config.vocab_size
    target = inputs.target
    if target is None:
        target = at_position.detach()[:, :vocab_size].argmax(-1)
    target = target.to(hidden.device)
    return at_position[rows, target], target


def lrp_attribution(
    inputs: AttributionInputs, composite: Composite, recompute_blocks: bool = False
) -> AttributionResult:
    """LRP as Gradient x Input under ``composite``: one forward and one backward pass.

    The embeddings ``e`` (B, L, D) and the input ``h_l`` of every block (and of the final norm)
    are kept; relevance at a layer is ``sum_d h_l * dF/dh_l`` with ``F = sum_b f_b`` (the examples
    of a batch are independent). ``layer_sums[:, l]`` is its sum over tokens.

    ``recompute_blocks``: keep only the block inputs for the backward pass and recompute each
    block during it (the model's ``recompute_blocks`` switch, restored afterwards): activation
    memory O(n_layer * B * L * D) plus one block's, for a second forward pass.
    """
    model = inputs.model
    layers = list(model.blocks) + [model.final_norm]
    captured: list[torch.Tensor] = []

    def capture(_module: torch.nn.Module, args: tuple) -> None:
        if len(captured) < len(layers):  # recomputation calls the blocks again during the backward
            captured.append(args[0])

    hooks = [layer.register_forward_pre_hook(capture) for layer in layers]
    previous_recompute = getattr(model, "recompute_blocks", False)
    if recompute_blocks and not hasattr(model, "recompute_blocks"):
        raise ValueError(f"`recompute_blocks`: {type(model).__name__} cannot recompute its blocks")
    try:
        if recompute_blocks:
            model.recompute_blocks = True
        with composite.context(model), torch.enable_grad():
            embeddings = model.embed(inputs.input_ids).detach().requires_grad_(True)
            hidden = model.hidden_states(inputs_embeds=embeddings, attention_mask=inputs.attention_mask)
            output, target = select_outputs(hidden, inputs)
            gradients = torch.autograd.grad(output.sum(), captured, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        if hasattr(model, "recompute_blocks"):
            model.recompute_blocks = previous_recompute
    per_layer = [
        (hidden.detach() * gradient).sum(-1) if gradient is not None else torch.zeros(hidden.shape[:2])
        for hidden, gradient in zip(captured, gradients, strict=True)
    ]  # each (B, L)
    relevance = per_layer[0] if inputs.layer is None else per_layer[inputs.layer]
    layer_sums = torch.stack([layer.sum(-1) for layer in per_layer], dim=1)
    return AttributionResult(relevance=relevance, output=output.detach(), target=target, layer_sums=layer_sums)
