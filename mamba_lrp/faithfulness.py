"""Faithfulness of explanations: one input-flipping engine and the metrics derived from its curves.

Definitions (REFERENCE.md section 3). ``f(x^(k))`` is the explained output after ``k`` perturbation
steps, ``x^(0) = x``.

* **Flipping curve** (:func:`flip_curve`): features (tokens) are replaced *cumulatively* in an
  order, ``f`` is recorded after each step. MoRF = most relevant first, LeRF = least relevant
  first, ``random`` = a seeded random permutation. *Deletion* starts from ``x`` and replaces the
  first ``n_k`` tokens of the order; *insertion* starts from the fully replaced input and puts
  the first ``n_k`` tokens of the order back (Bach et al. 2015; Samek et al. 2016; Petsiuk et al.
  2018 for insertion).
* ``A^F = 1/(K+1) sum_{k=0..K} f(x^(k))``, the mean of a deletion curve including ``k = 0``;
  ``A^I`` the same for an insertion curve.
* ``delta_af = A^F(LeRF) - A^F(MoRF)`` (MambaLRP, Jafari et al. 2024, Table 1): higher is better,
  a random ranking gives ~0, a perfect ranking of an additive model gives the maximum.
* ``delta_ai = A^I(MoRF) - A^I(LeRF)``: higher is better, random ~0.
* ``aopc = 1/(K+1) sum_{k=0..K} [f(x^(0)) - f(x^(k))]`` on the MoRF deletion curve (Samek et al.
  2016): higher is better (the ``k = 0`` term is 0 and is counted, as in the definition).
* ``comprehensiveness = mean_b [p(y|x) - p(y|x without r_b)]`` and
  ``sufficiency = mean_b [p(y|x) - p(y|r_b)]`` (ERASER, DeYoung et al. 2020), ``r_b`` the top
  ``b`` % tokens, ``b`` in :data:`ERASER_BINS` = {1, 5, 10, 20, 50} %, always on probabilities.
  Comprehensiveness: higher is better; sufficiency: lower is better (it may be negative: the
  rationale alone can raise ``p``). ``r_b`` has ``max(1, ceil(b n / 100))`` tokens (n = number of
  flippable tokens): rounding up keeps every bin non-empty for short inputs.

Choices every reported number depends on (record them with the number):

* **Which tokens are flipped.** The real (unpadded) tokens at or before the explained position,
  *including the explained position itself*. For a causal LM explaining the next-token logit at
  the last position, the last token is an input like any other: it often carries most of the
  relevance, and excluding it would hide the model's most important input from the test (and
  favour methods that rank it low). Tokens after the explained position cannot change ``f`` of a
  causal model; they are dropped before evaluation and never flipped. ``n`` below is the number
  of flippable tokens.
* **Step counts.** ``steps=K`` (int) gives fractions ``0, 1/K, ..., 1``; a sequence gives the
  fractions themselves (``0`` is prepended if missing: every curve starts at ``k = 0``). The
  number of tokens at fraction ``q`` is ``round(q n)`` with halves rounded up (``rounding="nearest"``)
  or ``max(1, ceil(q n))`` for ``q > 0`` (``rounding="ceil"``, used by the ERASER bins).
  Short inputs repeat counts; repeated inputs are evaluated once.
* **Ties** in the relevance are broken by position, earlier token first, in every order.
* **Replacement** (``replacement=``): a token id (UNK / PAD / mask token of the tokenizer; the
  id replaces the token), ``"zero_embedding"`` (the token's embedding vector is set to zero, the
  default: it needs no tokenizer; see the caveat below), or ``"delete"`` (the token is removed and the sequence gets
  shorter; batches of different lengths are left-padded with an ``attention_mask``, which our
  models treat exactly). With ``"delete"`` the explained position moves with the deletions: ``f``
  is read at the last remaining token, the position that predicts the next token after the
  shortened context. A sequence model has no output for an empty input, so ``"delete"`` always
  keeps one token: a deletion curve stops at ``n - 1`` deleted tokens and an insertion curve
  starts from the first token of the order alone (``FlipCurve.n_flipped`` records the counts used).
* **Caveat of the zero embedding for Mamba**: a Mamba block without ``in_proj`` bias maps a zero
  residual stream at position ``t`` to a zero update there (``RMSNorm(0) = 0``, so the gate
  ``silu(z_t) = 0``), so zeroing the explained position's embedding makes the final hidden state
  there 0 and the logit exactly 0 (uniform probabilities) whatever the context. A curve that
  flips the explained position early drops at once; a token id or ``"delete"`` has no such effect.
* **Output** (``output=``): ``"logit"`` (the target logit, the explained value of ``explain``),
  ``"logprob"`` or ``"prob"``: the log-softmax / softmax over the model's ``config.vocab_size``
  real ids (rows added to pad the vocabulary are left out), computed in float64.

The model protocol. The engine needs only::

    hidden_states(input_ids=None, *, inputs_embeds=None, attention_mask=None) -> (B, L, D)
    head(hidden (B, D)) -> logits (B, V)
    embed(input_ids (B, L)) -> (B, L, D)      # only for replacement="zero_embedding"
    config.vocab_size                          # optional: the real vocabulary (softmax, prediction)

and the model must be causal (the output at position ``p`` depends on tokens ``<= p`` only) and
exact under left padding with ``attention_mask``. Every ``ssm_models`` LM qualifies; a
``transformers`` ``MambaForCausalLM`` is converted with :func:`ssm_models.from_hf`. The head is
applied at the explained position only. All perturbed inputs of an example go through the model
in batches of at most ``batch_size``, under ``torch.no_grad`` and in eval mode (restored after).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from mamba_lrp.explanation import Explanation

ORDERS = ("morf", "lerf", "random")
MODES = ("deletion", "insertion")
OUTPUTS = ("logit", "logprob", "prob")
NAMED_REPLACEMENTS = ("zero_embedding", "delete")
ROUNDINGS = ("nearest", "ceil")
#: ERASER's rationale sizes, fractions of the flippable tokens (DeYoung et al. 2020).
ERASER_BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
_TOLERANCE = 1e-9  # absorbs float error in q * n before rounding (0.1 * 30 = 3.0000000000000004)


class FlippableModel(Protocol):
    """What :func:`flip_curve` needs of a model (see the module docstring)."""

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class FlipCurve:
    """One flipping curve of one example.

    ``fractions`` (K+1,) float64: the requested fractions of the ``n_tokens`` flippable tokens,
    ``fractions[0] = 0``; ``n_flipped`` (K+1,) long: the tokens replaced (deletion) or put back
    (insertion) at each step; ``values`` (K+1,) float64: ``f`` at each step. ``values[0]`` is
    ``f(x)`` for deletion and ``f`` of the fully replaced input for insertion (for ``"delete"``:
    of the first token of the order alone). ``unperturbed`` is ``f(x)``. ``target`` is the token
    whose ``output`` is recorded, ``position`` the explained index in the caller's ``input_ids``.
    """

    fractions: torch.Tensor
    n_flipped: torch.Tensor
    values: torch.Tensor
    unperturbed: float
    n_tokens: int
    target: int
    position: int
    order: str
    mode: str
    replacement: int | str
    output: str
    seed: int | None = None

    def area(self) -> float:
        """``A^F`` (deletion) or ``A^I`` (insertion): the mean of ``values`` including ``k = 0``."""
        return float(self.values.mean())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists of floats/ints)."""
        return {"fractions": self.fractions.tolist(), "n_flipped": self.n_flipped.tolist(),
                "values": self.values.tolist(), "unperturbed": self.unperturbed, "n_tokens": self.n_tokens,
                "target": self.target, "position": self.position, "order": self.order, "mode": self.mode,
                "replacement": self.replacement, "output": self.output, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlipCurve:
        return cls(fractions=torch.tensor(data["fractions"], dtype=torch.float64),
                   n_flipped=torch.tensor(data["n_flipped"], dtype=torch.long),
                   values=torch.tensor(data["values"], dtype=torch.float64),
                   **{key: data[key] for key in ("unperturbed", "n_tokens", "target", "position", "order", "mode",
                                                 "replacement", "output", "seed")})


# --------------------------------------------------------------------------- validation
def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_replacement(model: Any, replacement: Any) -> int | str:
    if isinstance(replacement, str):
        return _choice(replacement, "replacement", NAMED_REPLACEMENTS)
    if isinstance(replacement, torch.Tensor) and replacement.dim() == 0 and not replacement.is_floating_point():
        replacement = int(replacement)
    if not isinstance(replacement, int) or isinstance(replacement, bool) or replacement < 0:
        raise ValueError(f"`replacement` must be a token id (int >= 0), 'zero_embedding' or 'delete'; "
                         f"got {replacement!r}")
    limit = getattr(model, "num_embeddings", None)
    if isinstance(limit, int) and replacement >= limit:
        raise ValueError(f"`replacement` token id {replacement} is outside the vocabulary [0, {limit - 1}]")
    return replacement


def resolve_fractions(steps: int | Sequence[float]) -> torch.Tensor:
    """The fractions (K+1,) float64 of a ``steps`` argument: ``K`` -> ``0, 1/K, ..., 1``; a sequence of
    fractions in [0, 1], non-decreasing -> itself with ``0`` prepended when missing."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 1:
            raise ValueError(f"`steps` must be a positive number of steps or a sequence of fractions, got {steps}")
        return torch.arange(steps + 1, dtype=torch.float64) / steps
    try:
        fractions = torch.as_tensor([float(value) for value in steps], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`steps` must be an int or a sequence of fractions in [0, 1], got {steps!r}") from None
    if fractions.numel() == 0 or not bool(((fractions >= 0) & (fractions <= 1)).all()):
        raise ValueError(f"`steps` fractions must be in [0, 1] (and at least one), got {fractions.tolist()}")
    if bool((fractions[1:] < fractions[:-1]).any()):
        raise ValueError(f"`steps` fractions must be non-decreasing, got {fractions.tolist()}")
    if float(fractions[0]) != 0.0:
        fractions = torch.cat([torch.zeros(1, dtype=torch.float64), fractions])
    return fractions


def fraction_counts(fractions: torch.Tensor, n_tokens: int, rounding: str = "nearest") -> torch.Tensor:
    """Numbers of tokens (K+1,) long for ``fractions`` of ``n_tokens``: ``round(q n)`` halves up
    (``"nearest"``), or ``max(1, ceil(q n))`` for ``q > 0`` (``"ceil"``); within ``[0, n]``."""
    _choice(rounding, "rounding", ROUNDINGS)
    counts = []
    for fraction in fractions.tolist():
        exact = fraction * n_tokens
        if rounding == "nearest":
            count = math.floor(exact + 0.5 + _TOLERANCE)
        else:
            count = max(1, math.ceil(exact - _TOLERANCE)) if fraction > 0 else 0
        counts.append(min(max(count, 0), n_tokens))
    return torch.tensor(counts, dtype=torch.long)


def flip_order(relevance: torch.Tensor, order: str, seed: int | None = 0) -> torch.Tensor:
    """Token indices (n,) in flipping order: ``morf`` by decreasing, ``lerf`` by increasing
    relevance (ties: earlier token first), ``random`` a permutation drawn with ``seed``."""
    _choice(order, "order", ORDERS)
    if order == "random":
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        return torch.randperm(relevance.numel(), generator=generator)
    keys = -relevance if order == "morf" else relevance
    return torch.sort(keys.double(), stable=True).indices


# --------------------------------------------------------------------------- the example
@dataclass
class _Example:
    """One sequence ready to flip: ``ids`` (n,) the real tokens up to and including the explained
    position (all flippable), ``relevance`` (n,) float64, ``target``, the explained ``position`` in
    the caller's input and the output over every (deduplicated) perturbed input computed so far."""

    model: Any
    ids: torch.Tensor
    relevance: torch.Tensor
    target: int
    position: int
    replacement: int | str
    batch_size: int
    cache: dict[bytes, torch.Tensor] = field(default_factory=dict)  # replaced-mask bytes -> (logit, logprob, prob)

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def _resolve_model(model: nn.Module) -> Any:
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        return model
    from mamba_lrp.explain import resolve_model

    return resolve_model(model)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _prepare(model: Any, input_ids: Any, relevance: Any, target: int | None, position: int,
             attention_mask: Any, replacement: Any, batch_size: int) -> _Example:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` must be one non-empty sequence of token ids (L,) or (1, L), "
                         f"got shape {tuple(ids.shape)} dtype {ids.dtype}")
    length = ids.numel()
    scores = torch.as_tensor(relevance).detach().cpu()
    if scores.dim() == 2 and scores.shape[0] == 1:
        scores = scores[0]
    if tuple(scores.shape) != (length,):
        raise ValueError(f"`relevance` must have the shape of `input_ids` ({length},), got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores.double()).all()):
        raise ValueError("`relevance` contains NaN or infinite values")
    real = torch.ones(length, dtype=torch.bool)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask).cpu()
        if mask.dim() == 2 and mask.shape[0] == 1:
            mask = mask[0]
        if tuple(mask.shape) != (length,) or not bool(((mask == 0) | (mask == 1)).all()) or not bool(mask.any()):
            raise ValueError(f"`attention_mask` must be 0/1 of shape ({length},) with at least one real token")
        real = mask.bool()
    real_index = real.nonzero().flatten()
    if isinstance(position, torch.Tensor):
        position = int(position)
    if not isinstance(position, int) or isinstance(position, bool):
        raise ValueError(f"`position` must be an int, got {position!r}")
    if position < 0:
        if -position > real_index.numel():
            raise ValueError(f"`position` {position} is out of range for {real_index.numel()} real tokens")
        position = int(real_index[position])
    elif position >= length or not bool(real[position]):
        raise ValueError(f"`position` {position} is out of range or a padding position (length {length})")
    kept = real_index[real_index <= position]
    example = _Example(model=model, ids=ids.cpu().long()[kept], relevance=scores.double()[kept], target=-1,
                       position=position, replacement=_check_replacement(model, replacement),
                       batch_size=_check_batch_size(batch_size))
    if hasattr(model, "check_input_ids"):
        model.check_input_ids(example.ids[None])
    if target is None:
        example.target = int(_outputs(example, [torch.zeros(example.n_tokens, dtype=torch.bool)], need_logits=True))
    else:
        if isinstance(target, torch.Tensor):
            target = int(target)
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise ValueError(f"`target` must be a token id (int >= 0) or None, got {target!r}")
        example.target = target
    return example


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    return batch_size


def _vocab_size(model: Any, width: int) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return min(int(size), width) if isinstance(size, int) else width


@torch.no_grad()
def _forward_last(example: _Example, masks: list[torch.Tensor]) -> torch.Tensor:
    """Logits (B, V) at the explained position of the perturbed inputs ``masks`` (each (n,) bool,
    True = replaced)."""
    model, ids, replacement = example.model, example.ids, example.replacement
    device = _device(model)
    replaced = torch.stack(masks)  # (B, n)
    batch = replaced.shape[0]
    if replacement == "delete":
        lengths = (~replaced).sum(1)
        width = int(lengths.max())
        padded = torch.zeros(batch, width, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        for row in range(batch):  # left padding: the explained (last kept) token ends every row
            kept = ids[~replaced[row]]
            padded[row, width - kept.numel():] = kept
            attention[row, width - kept.numel():] = 1
        mask = None if bool(attention.all()) else attention.to(device)
        hidden = model.hidden_states(padded.to(device), attention_mask=mask)
    elif replacement == "zero_embedding":
        embeddings = model.embed(ids[None].to(device))  # (1, n, D)
        embeddings = embeddings.expand(batch, -1, -1) * (~replaced).to(device)[:, :, None].to(embeddings.dtype)
        hidden = model.hidden_states(inputs_embeds=embeddings)
    else:
        perturbed = torch.where(replaced, torch.full_like(ids, int(replacement)), ids)
        hidden = model.hidden_states(perturbed.to(device))
    return model.head(hidden[:, -1])


def _outputs(example: _Example, masks: list[torch.Tensor], need_logits: bool = False) -> torch.Tensor | int:
    """(logit, logprob, prob) (M, 3) float64 of the target for each perturbed input in ``masks``,
    computed in batches of ``example.batch_size`` over the inputs not yet in the cache. With
    ``need_logits`` (one mask), returns the top prediction instead (used to choose the target)."""
    model = example.model
    training = {module: module.training for module in model.modules()} if isinstance(model, nn.Module) else {}
    if isinstance(model, nn.Module):
        model.eval()
    try:
        if need_logits:
            logits = _forward_last(example, masks)
            return int(logits[0, : _vocab_size(model, logits.shape[-1])].argmax())
        missing: dict[bytes, torch.Tensor] = {}
        for mask in masks:
            key = mask.numpy().tobytes()
            if key not in example.cache:
                missing.setdefault(key, mask)
        pending = list(missing.items())
        for start in range(0, len(pending), example.batch_size):
            chunk = pending[start:start + example.batch_size]
            logits = _forward_last(example, [mask for _, mask in chunk]).double()
            real = logits[:, : _vocab_size(model, logits.shape[-1])]
            if not 0 <= example.target < real.shape[-1]:
                raise ValueError(f"`target` {example.target} is outside the model's output range "
                                 f"[0, {real.shape[-1] - 1}]")
            log_probs = torch.log_softmax(real, dim=-1)[:, example.target]
            values = torch.stack([logits[:, example.target], log_probs, log_probs.exp()], dim=1).cpu()
            for (key, _), row in zip(chunk, values, strict=True):
                example.cache[key] = row
    finally:
        for module, was_training in training.items():
            module.training = was_training
    return torch.stack([example.cache[mask.numpy().tobytes()] for mask in masks])


@dataclass(frozen=True)
class CurveSpec:
    """Which curve a metric needs: ``order``, ``mode``; ``steps`` None = the caller's steps, else
    these fractions; ``rounding`` of fractions to counts; ``output`` None = the caller's output."""

    order: str
    mode: str
    steps: tuple[float, ...] | None = None
    rounding: str = "nearest"
    output: str | None = None

    @property
    def name(self) -> str:
        prefix = "eraser_" if self.steps == ERASER_BINS else ""
        return f"{prefix}{self.mode}_{self.order}"


def _curve_inputs(example: _Example, order: str, mode: str, fractions: torch.Tensor, rounding: str,
                  seed: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The counts (K+1,) of a curve and its perturbed inputs as replaced-masks, K+1 of (n,) bool,
    followed by the unperturbed input (all False)."""
    n = example.n_tokens
    ranking = flip_order(example.relevance, order, seed)
    counts = fraction_counts(fractions, n, rounding)
    if example.replacement == "delete":  # keep one token: a sequence model has no output for an empty input
        counts = counts.clamp(max=n - 1) if mode == "deletion" else counts.clamp(min=1)
    masks = []
    for count in counts.tolist():
        replaced = torch.zeros(n, dtype=torch.bool)
        replaced[ranking[:count] if mode == "deletion" else ranking[count:]] = True
        masks.append(replaced)
    masks.append(torch.zeros(n, dtype=torch.bool))
    return counts, masks


def _curve(example: _Example, order: str, mode: str, fractions: torch.Tensor, rounding: str, output: str,
           seed: int | None) -> FlipCurve:
    n = example.n_tokens
    counts, masks = _curve_inputs(example, order, mode, fractions, rounding, seed)
    column = OUTPUTS.index(output)
    values = _outputs(example, masks)[:, column]
    return FlipCurve(fractions=fractions.clone(), n_flipped=counts, values=values[:-1].clone(),
                     unperturbed=float(values[-1]), n_tokens=n, target=example.target, position=example.position,
                     order=order, mode=mode, replacement=example.replacement, output=output,
                     seed=seed if order == "random" else None)


def flip_curve(
    model: nn.Module,
    input_ids: Any,
    relevance: Any,
    target: int | None = None,
    position: int = -1,
    *,
    order: str = "morf",
    mode: str = "deletion",
    replacement: int | str = "zero_embedding",
    output: str = "logit",
    steps: int | Sequence[float] = 20,
    rounding: str = "nearest",
    attention_mask: Any = None,
    batch_size: int = 16,
    seed: int | None = 0,
) -> FlipCurve:
    """The flipping curve of one sequence (see the module docstring for every definition).

    Args:
        model: see the module's model protocol; ``ssm_models`` LMs and ``transformers`` Mamba.
        input_ids: (L,) or (1, L) token ids, possibly padded (then pass ``attention_mask``).
        relevance: (L,) or (1, L) relevance of each token (padding entries are ignored).
        target: the token whose output is recorded; None = the model's top prediction on ``x``.
        position: the explained index in ``input_ids``; negative counts from the last real token.
        order: ``"morf"``, ``"lerf"`` or ``"random"`` (a permutation drawn with ``seed``).
        mode: ``"deletion"`` (start from ``x``) or ``"insertion"`` (start from the replaced input).
        replacement: a token id, ``"zero_embedding"`` or ``"delete"``.
        output: ``"logit"``, ``"logprob"`` or ``"prob"``.
        steps: ``K`` (fractions ``0, 1/K, ..., 1``) or a sequence of fractions.
        rounding: ``"nearest"`` or ``"ceil"``, fractions to numbers of tokens.
        attention_mask: (L,) 0/1, 1 = real token.
        batch_size: the most perturbed inputs in one forward pass.

    Returns a :class:`FlipCurve` with K+1 points.
    """
    _choice(order, "order", ORDERS)
    _choice(mode, "mode", MODES)
    _choice(output, "output", OUTPUTS)
    fractions = resolve_fractions(steps)
    example = _prepare(_resolve_model(model), input_ids, relevance, target, position, attention_mask, replacement,
                       batch_size)
    return _curve(example, order, mode, fractions, rounding, output, seed)


# --------------------------------------------------------------------------- metrics
def _check_curve(curve: FlipCurve, name: str, order: str, mode: str, output: str | None = None) -> None:
    if curve.order != order or curve.mode != mode:
        raise ValueError(f"`{name}` must be a {order} {mode} curve, got a {curve.order} {curve.mode} curve")
    if output is not None and curve.output != output:
        raise ValueError(f"`{name}` must be computed with output={output!r}, got {curve.output!r}")


def _check_pair(morf: FlipCurve, lerf: FlipCurve) -> None:
    if (morf.fractions.shape != lerf.fractions.shape or not torch.equal(morf.fractions, lerf.fractions)
            or morf.output != lerf.output or morf.replacement != lerf.replacement or morf.target != lerf.target):
        raise ValueError("the MoRF and LeRF curves must share fractions, output, replacement and target")


def delta_af(morf: FlipCurve, lerf: FlipCurve) -> float:
    """``A^F(LeRF) - A^F(MoRF)`` from two deletion curves. Higher is better; random ~ 0."""
    _check_curve(morf, "morf", "morf", "deletion")
    _check_curve(lerf, "lerf", "lerf", "deletion")
    _check_pair(morf, lerf)
    return lerf.area() - morf.area()


def delta_ai(morf: FlipCurve, lerf: FlipCurve) -> float:
    """``A^I(MoRF) - A^I(LeRF)`` from two insertion curves. Higher is better; random ~ 0."""
    _check_curve(morf, "morf", "morf", "insertion")
    _check_curve(lerf, "lerf", "lerf", "insertion")
    _check_pair(morf, lerf)
    return morf.area() - lerf.area()


def aopc(morf: FlipCurve) -> float:
    """``1/(K+1) sum_{k=0..K} [f(x^(0)) - f(x^(k))]`` on a MoRF deletion curve. Higher is better."""
    _check_curve(morf, "morf", "morf", "deletion")
    return float((morf.values[0] - morf.values).mean())


def comprehensiveness(morf: FlipCurve) -> float:
    """``mean_b [p(y|x) - p(y|x without r_b)]`` over the bins of a MoRF deletion curve of
    probabilities (``values[1:]``; ``values[0] = p(y|x)``). Higher is better."""
    _check_curve(morf, "morf", "morf", "deletion", "prob")
    if morf.values.numel() < 2:
        raise ValueError("comprehensiveness needs at least one bin after k = 0")
    return float((morf.values[0] - morf.values[1:]).mean())


def sufficiency(morf: FlipCurve) -> float:
    """``mean_b [p(y|x) - p(y|r_b)]`` over the bins of a MoRF insertion curve of probabilities
    (``values[1:]`` = the top-b % tokens alone; ``unperturbed = p(y|x)``). Lower is better."""
    _check_curve(morf, "morf", "morf", "insertion", "prob")
    if morf.values.numel() < 2:
        raise ValueError("sufficiency needs at least one bin after k = 0")
    return float((morf.unperturbed - morf.values[1:]).mean())


@dataclass(frozen=True)
class Metric:
    """A faithfulness metric: ``compute(**curves)`` with one :class:`FlipCurve` per role in
    ``curves`` (e.g. ``morf=..., lerf=...``); ``higher_is_better`` its direction; ``best`` in words."""

    name: str
    curves: Mapping[str, CurveSpec]
    function: Callable[..., float]
    higher_is_better: bool
    best: str
    description: str

    def compute(self, **curves: FlipCurve) -> float:
        if set(curves) != set(self.curves):
            raise ValueError(f"metric {self.name!r} takes the curves {sorted(self.curves)}, got {sorted(curves)}")
        return self.function(**curves)


_ERASER = dict(steps=ERASER_BINS, rounding="ceil", output="prob")
METRICS: dict[str, Metric] = {
    "delta_af": Metric("delta_af", {"morf": CurveSpec("morf", "deletion"), "lerf": CurveSpec("lerf", "deletion")},
                       delta_af, True, "as large as possible; random ~ 0",
                       "A^F(LeRF) - A^F(MoRF), deletion curves, mean including k = 0"),
    "delta_ai": Metric("delta_ai", {"morf": CurveSpec("morf", "insertion"), "lerf": CurveSpec("lerf", "insertion")},
                       delta_ai, True, "as large as possible; random ~ 0",
                       "A^I(MoRF) - A^I(LeRF), insertion curves from the fully replaced input"),
    "aopc": Metric("aopc", {"morf": CurveSpec("morf", "deletion")}, aopc, True, "as large as possible",
                   "1/(K+1) sum_k [f(x) - f(x^(k))], MoRF deletion (Samek et al. 2016)"),
    "comprehensiveness": Metric("comprehensiveness", {"morf": CurveSpec("morf", "deletion", **_ERASER)},
                                comprehensiveness, True, "as large as possible (at most p(y|x))",
                                "mean over bins {1,5,10,20,50}% of p(y|x) - p(y|x without r) (ERASER)"),
    "sufficiency": Metric("sufficiency", {"morf": CurveSpec("morf", "insertion", **_ERASER)},
                          sufficiency, False, "as small as possible (may be negative)",
                          "mean over bins {1,5,10,20,50}% of p(y|x) - p(y|r only) (ERASER)"),
}


def metric_names() -> list[str]:
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")
    return METRICS[name]


def evaluate_example(
    model: nn.Module,
    input_ids: Any,
    explanation_or_relevance: Explanation | Any,
    metrics: Sequence[str] = ("delta_af",),
    *,
    target: int | None = None,
    position: int | None = None,
    attention_mask: Any = None,
    replacement: int | str = "zero_embedding",
    output: str = "logit",
    steps: int | Sequence[float] = 20,
    batch_size: int = 16,
    seed: int | None = 0,
    return_curves: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, FlipCurve]]:
    """The ``metrics`` of one explained sequence, each needed curve computed once.

    ``explanation_or_relevance``: an unbatched :class:`Explanation` (its input ids, target,
    position and attention mask are used; ``input_ids`` may then be None) or relevance (L,).
    With plain relevance, ``target`` None = the top prediction and ``position`` None = -1.
    ``replacement``/``output``/``steps``/``batch_size``/``seed`` as in :func:`flip_curve`;
    ``output``/``steps`` do not apply to the ERASER metrics (probabilities on :data:`ERASER_BINS`).
    All perturbed inputs of all curves are deduplicated and batched together.

    Returns ``{metric: value}``, and with ``return_curves`` also ``{curve name: FlipCurve}``
    (names ``deletion_morf``, ``deletion_lerf``, ``insertion_morf``, ``insertion_lerf``,
    ``eraser_deletion_morf``, ``eraser_insertion_morf``).
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = [get_metric(name) for name in metrics]
    _choice(output, "output", OUTPUTS)
    fractions = resolve_fractions(steps)
    if isinstance(explanation_or_relevance, Explanation):
        explanation = explanation_or_relevance
        if explanation.is_batched:
            raise ValueError("evaluate_example takes one sequence: index the batched Explanation first")
        if input_ids is not None and not torch.equal(torch.as_tensor(input_ids).flatten().cpu(),
                                                     explanation.input_ids.flatten()):
            raise ValueError("`input_ids` differ from the explanation's input ids")
        input_ids, relevance = explanation.input_ids, explanation.relevance
        target = int(explanation.target) if target is None else target
        position = int(explanation.position) if position is None else position
        if attention_mask is None:
            attention_mask = explanation.attention_mask
    else:
        relevance = explanation_or_relevance
        if input_ids is None:
            raise ValueError("`input_ids` are needed when relevance (not an Explanation) is given")
    example = _prepare(_resolve_model(model), input_ids, relevance, target, -1 if position is None else position,
                       attention_mask, replacement, batch_size)
    specs = {spec.name: spec for metric in chosen for spec in metric.curves.values()}
    resolved = {name: (spec, fractions if spec.steps is None else resolve_fractions(spec.steps),
                       spec.output or output) for name, spec in specs.items()}
    # one batched pass over the perturbed inputs of every curve; the curves then read the cache
    _outputs(example, [mask for spec, spec_fractions, _ in resolved.values()
                       for mask in _curve_inputs(example, spec.order, spec.mode, spec_fractions, spec.rounding,
                                                 seed)[1]])
    curves = {name: _curve(example, spec.order, spec.mode, spec_fractions, spec.rounding, spec_output, seed)
              for name, (spec, spec_fractions, spec_output) in resolved.items()}
    values = {metric.name: float(metric.compute(**{role: curves[spec.name] for role, spec in metric.curves.items()}))
              for metric in chosen}
    return (values, curves) if return_curves else values
