"""``explain()``: the one entry point that explains a prediction with any registered method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mamba_lrp.explanation import Explanation
from mamba_lrp.methods import AttributionInputs, get_method


def resolve_model(model: nn.Module) -> nn.Module:
    """Our model for ``model``: ours as is; a ``transformers`` ``MambaForCausalLM`` converted with
    :func:`ssm_models.from_hf` (weights shared, the user's model object untouched)."""
    from ssm_models.lm_base import SequenceLM

    if isinstance(model, SequenceLM):
        return model
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "mamba":
        from ssm_models import from_hf

        return from_hf(model)
    raise ValueError(
        f"`model` must be an ssm_models LM (MambaLM, H3LM, BMojoLM) or a transformers MambaForCausalLM, "
        f"got {type(model).__name__}"
    )


def _as_id_tensor(input_ids: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Returns ``(ids (B, L) long, attention_mask from the tokenizer or None, was_batched)``."""
    if isinstance(input_ids, str) or (isinstance(input_ids, list | tuple) and input_ids and
                                      all(isinstance(item, str) for item in input_ids)):
        if tokenizer is None:
            raise ValueError("`input_ids` is text: pass `tokenizer=` to turn it into token ids")
        batched = not isinstance(input_ids, str)
        if batched and getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("explaining several texts needs a tokenizer with a pad token (tokenizer.pad_token)")
        encoded = tokenizer(list(input_ids) if batched else [input_ids], return_tensors="pt", padding=batched)
        mask = encoded.get("attention_mask") if batched else None
        return encoded["input_ids"].long(), mask, batched
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    else:
        try:
            ids = torch.tensor(input_ids)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`input_ids` must be a LongTensor, a list of ids or text, could not read it: {error}"
            ) from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"`input_ids` must have shape (L,) or (batch, L), got {tuple(ids.shape)}")
    batched = ids.dim() == 2
    return (ids if batched else ids[None]).long(), None, batched


def _per_example(value: Any, batch: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"`{name}` must be an integer or integers, got {value!r}")
    if tensor.dim() == 0:
        return tensor.repeat(batch).long()
    if tensor.shape != (batch,):
        raise ValueError(f"`{name}` must be one integer or one per example ({batch}), got shape {tuple(tensor.shape)}")
    return tensor.long()


def _resolve_positions(position: Any, mask: torch.Tensor | None, length: int, batch: int) -> torch.Tensor:
    """Indices in [0, L). Negative positions count from the end; with a mask, from each example's
    last real token (-1 = the last real token)."""
    requested = _per_example(position, batch, "position")
    resolved = []
    for row in range(batch):
        real = torch.arange(length) if mask is None else mask[row].nonzero().flatten()
        index = int(requested[row])
        if index < 0:
            if -index > len(real):
                raise ValueError(f"`position` {index} is out of range for example {row} with {len(real)} real tokens")
            index = int(real[index])
        elif index >= length:
            raise ValueError(f"`position` {index} is out of range for sequences of length {length}")
        elif mask is not None and not bool(mask[row, index]):
            raise ValueError(f"`position` {index} of example {row} is a padding position")
        resolved.append(index)
    return torch.tensor(resolved, dtype=torch.long)


def explain(
    model: nn.Module,
    input_ids: Any,
    target: int | Sequence[int] | torch.Tensor | None = None,
    position: int | Sequence[int] | torch.Tensor = -1,
    method: str = "mamba_lrp",
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any = None,
    layer: int | None = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s output logit ``target`` at ``position`` with ``method``.

    Args:
        model: an ``ssm_models`` LM or a ``transformers`` ``MambaForCausalLM``.
        input_ids: (L,) or (B, L) ids (tensor or lists), or text / a list of texts with ``tokenizer``.
        target: token id(s) whose logit is explained, one or one per example; None: the model's top
            prediction at ``position``.
        position: index (or one per example) of the explained position; negative counts from the
            end, and with ``attention_mask`` from each example's last real token.
        method: a name from :func:`mamba_lrp.method_names` (composites such as ``mamba_lrp``).
        attention_mask: (B, L) of 0/1 for padded batches (left or right padding); padded positions
            get relevance exactly 0 and do not change the explained output.
        layer: relevance at the input of block ``layer`` (``n_layer`` = the final norm's input)
            instead of the embeddings.
        options: passed to the method.

    Returns an :class:`Explanation`; 1-D fields for a 1-D input. The model is left as it was.
    """
    explain_method = get_method(method)
    ours = resolve_model(model)
    ids, tokenizer_mask, batched = _as_id_tensor(input_ids, tokenizer)
    if attention_mask is None:
        attention_mask = tokenizer_mask
    ours.check_input_ids(ids)
    batch, length = ids.shape
    mask = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1 and not batched:
            attention_mask = attention_mask[None]
        mask = ours.check_attention_mask(attention_mask, (batch, length))
    positions = _resolve_positions(position, mask, length, batch)
    targets = None
    if target is not None:
        targets = _per_example(target, batch, "target")
        vocabulary = ours.num_embeddings
        if bool((targets < 0).any()) or bool((targets >= vocabulary).any()):
            raise ValueError(f"`target` {targets.tolist()} is outside the model's output range [0, {vocabulary - 1}]")
    n_layer = len(ours.blocks)
    if layer is not None and (not isinstance(layer, int) or not 0 <= layer <= n_layer):
        raise ValueError(
            f"`layer` must be an integer in [0, {n_layer}] (block inputs; {n_layer} = final norm), got {layer!r}"
        )

    device = next(ours.parameters()).device
    inputs = AttributionInputs(model=ours, input_ids=ids.to(device), target=targets, position=positions,
                               attention_mask=None if mask is None else mask.to(device), layer=layer)
    training = {module: module.training for module in ours.modules()}
    ours.eval()
    try:
        result = explain_method(inputs, **options)
    finally:
        for module, was_training in training.items():
            module.training = was_training

    relevance = result.relevance.detach().cpu()
    output = result.output.detach().cpu()
    error = (relevance.sum(-1) - output).abs() / output.abs().clamp_min(torch.finfo(output.dtype).tiny)
    tokens = None
    if tokenizer is not None:
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    explanation = Explanation(
        relevance=relevance, output=output, target=result.target.detach().cpu(), position=positions,
        method=method, input_ids=ids, conservation_error=error,
        layer_sums=None if result.layer_sums is None else result.layer_sums.detach().cpu(),
        attention_mask=None if mask is None else mask.long(), tokens=tokens, layer=layer,
    )
    return explanation if batched else explanation[0]
