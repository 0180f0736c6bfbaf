"""Train any of our LMs on a built-in task (:mod:`mamba_lrp.tasks`), evaluate it, save a checkpoint.

It lives in ``mamba_lrp`` (not ``ssm_models``) because it depends on the tasks, and the tasks are
part of what users touch (ARCHITECTURE.md: ``ssm_models`` knows nothing above it).

* **Model**: anything with ``forward(input_ids, attention_mask=...) -> logits (B, L, V)``;
  :func:`build_model` makes a fresh one for a task (``arch`` from the architecture registry of ``ssm_models.loading``).
* **Objective** ``"last"`` (default): cross-entropy of the logits at the last position (over the
  whole vocabulary) against the label token: the LM is a classifier by its next-token prediction.
  ``"next_token"``: the label is appended and every real next token is predicted (padding
  excluded); accuracy is still read at the last input position.
* **Data**: a fresh batch from the task's ``train`` stream at every step (``stream("train",
  seed)``), left-padded with an ``attention_mask`` (our ``MambaLM`` treats padding exactly: each
  real position gets the logits it gets unpadded; no mask is passed when a batch needs no padding).
* **Optimiser**: AdamW (no weight decay on biases, norms, ``A_log``, ``D``, H3's SSM kernel
  parameters ``*.kernel.*`` (as S4/H3 train them: decay would pull ``inv_A_real`` and the
  discretisation towards values that forget faster)), linear warmup then
  cosine decay to ``min_lr_ratio * lr``, gradient-norm clipping, a ``rich`` progress bar
  (:mod:`mamba_lrp.progress`) with the running loss and accuracy.
* **Determinism**: ``torch.manual_seed(seed)`` before building and training, the task's stream
  seeded by ``seed``; with the same thread count the run repeats bit for bit on one machine.
* **Checkpoint** (:func:`save_checkpoint`): ``save_pretrained`` (``config.json`` +
  ``model.safetensors``), the tokenizer files, and ``task.json`` with the task, its options, the
  architecture, the seed, the test accuracy and the training settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mamba_lrp.progress import progress_bar
from mamba_lrp.tasks import Example, Task, collate

OBJECTIVES = ("last", "next_token")
#: Model size of :func:`build_model` unless given (every architecture's config has these fields).
DEFAULT_MODEL_SIZE = {"d_model": 64, "n_layer": 2}


@dataclass
class TrainingConfig:
    """Settings of :func:`train`. ``steps`` optimiser steps of ``batch_size`` fresh examples;
    ``lr`` peak learning rate after ``warmup_steps``; cosine decay to ``min_lr_ratio * lr``;
    ``grad_clip`` maximal gradient norm (None: off); ``test_examples`` examples of the test split
    (seed ``seed``) for the final accuracy."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    objective: str = "last"
    seed: int = 0
    test_examples: int = 1000
    eval_batch_size: int = 128
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("steps", "batch_size", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class TrainingResult:
    """What :func:`train` returns: the trained ``model`` (eval mode), the mean loss of every
    ``log_every`` steps in ``losses``, ``test_accuracy`` on ``test_examples`` test examples."""

    model: nn.Module
    losses: list[float]
    test_accuracy: float
    test_examples: int
    config: TrainingConfig
    history: list[dict[str, float]] = field(default_factory=list)


def architecture_names() -> list[str]:
    """The architectures :func:`build_model` (and ``mamba-lrp train --arch``) can build: those
    registered in ``ssm_models`` (:func:`ssm_models.loading.architecture_names`), ``mamba`` first."""
    from ssm_models.loading import architecture_names as registered

    return registered()


def build_model(task: Task, arch: str = "mamba", seed: int = 0, **config: Any) -> nn.Module:
    """A fresh ``arch`` LM sized for ``task``'s vocabulary, initialised under ``torch.manual_seed(seed)``.

    ``arch``: one of :func:`architecture_names`. ``config``: fields of the architecture's config
    (e.g. :class:`ssm_models.MambaConfig`); ``d_model`` and ``n_layer`` default to
    :data:`DEFAULT_MODEL_SIZE`, ``vocab_size`` is the task's. A bad field is a ``ValueError``.
    """
    from ssm_models.loading import get_architecture

    architecture = get_architecture(arch)
    settings = {**DEFAULT_MODEL_SIZE, **config, "vocab_size": task.vocab_size}
    try:
        model_config = architecture.config_from_dict(settings)
    except TypeError as error:
        raise ValueError(f"{arch} config: bad settings {sorted(settings)} ({error})") from None
    torch.manual_seed(seed)
    return architecture.build(model_config)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, L, V); the mask is passed only when the batch has padding."""
    mask = batch["attention_mask"]
    return model(batch["input_ids"], attention_mask=None if bool(mask.all()) else mask)


def batch_loss(model: nn.Module, examples: Sequence[Example], objective: str = "last",
               pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, (B,) correct)`` of ``model`` on ``examples``; correct = argmax of the logits at
    the last input position equals the label."""
    if objective == "last":
        batch = collate(examples, pad_id=pad_id, padding_side="left")
        last = _forward(model, batch)[:, -1]
        loss = F.cross_entropy(last.float(), batch["labels"])
        return loss, last.argmax(-1) == batch["labels"]
    if objective != "next_token":
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    extended = [dataclasses.replace(example, input_ids=example.input_ids + (example.label_id,),
                                    tokens=example.tokens + (example.label,), evidence=()) for example in examples]
    batch = collate(extended, pad_id=pad_id, padding_side="left")
    logits = _forward(model, batch)[:, :-1]
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    # the first real token of a left-padded row has no prediction from a real position
    first_real = batch["attention_mask"][:, :-1] == 0
    targets = targets.masked_fill(first_real, -100)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, logits[:, -1].argmax(-1) == batch["input_ids"][:, -1]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, examples: Sequence[Example], batch_size: int = 128, pad_id: int = 0) -> float:
    """Fraction of ``examples`` whose label is the argmax (over the whole vocabulary) of the
    model's logits at the last input position."""
    if not examples:
        raise ValueError("`examples` is empty")
    training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            _, hits = batch_loss(model, chunk, "last", pad_id)
            correct += int(hits.sum())
    finally:
        model.train(training)
    return correct / len(examples)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        short = name.rsplit(".", 1)[-1]
        if parameter.dim() < 2 or short in ("A_log", "D") or "norm" in name or ".kernel." in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, config: TrainingConfig) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: nn.Module, task: Task, config: TrainingConfig | None = None, *, progress: bool = True,
          output_dir: str | Path | None = None) -> TrainingResult:
    """Train ``model`` on ``task`` with ``config``; evaluate on the test split; save to ``output_dir``
    (with :func:`save_checkpoint`) when given. Returns a :class:`TrainingResult`."""
    config = config or TrainingConfig()
    torch.manual_seed(config.seed)
    pad_id = task.token_to_id()["[PAD]"]
    stream = task.stream("train", seed=config.seed)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model.train()
    losses: list[float] = []
    history: list[dict[str, float]] = []
    window_loss, window_correct, window_count = 0.0, 0, 0
    with progress_bar(config.steps, f"train {task.name}", enabled=progress) as bar:
        for step in range(config.steps):
            examples = [next(stream) for _ in range(config.batch_size)]
            loss, hits = batch_loss(model, examples, config.objective, pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            window_loss += loss.item()
            window_correct += int(hits.sum())
            window_count += 1
            if window_count == config.log_every or step == config.steps - 1:
                mean_loss = window_loss / window_count
                accuracy = window_correct / (window_count * config.batch_size)
                losses.append(mean_loss)
                history.append({"step": step + 1, "loss": mean_loss, "train_accuracy": accuracy})
                bar.status(f"loss {mean_loss:.4f}, accuracy {accuracy:.3f}")
                window_loss, window_correct, window_count = 0.0, 0, 0
            bar.advance()
    model.eval()
    test = task.examples("test", config.test_examples, seed=config.seed)
    accuracy = evaluate_accuracy(model, test, config.eval_batch_size, pad_id)
    result = TrainingResult(model=model, losses=losses, test_accuracy=accuracy, test_examples=len(test),
                            config=config, history=history)
    if output_dir is not None:
        save_checkpoint(model, task, output_dir, result)
    return result


def save_checkpoint(model: nn.Module, task: Task, directory: str | Path, result: TrainingResult) -> Path:
    """Write ``model.save_pretrained(directory)``, the task's tokenizer and ``task.json`` (whose
    ``arch`` is the model's ``config.architecture``)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    task.save_tokenizer(directory)
    info = {
        "task": task.name,
        "task_options": task.options(),
        "arch": model.config.architecture,
        "seed": result.config.seed,
        "test_accuracy": result.test_accuracy,
        "test_examples": result.test_examples,
        "test_seed": result.config.seed,
        "accuracy_definition": "argmax over the whole vocabulary of the logits at the last input position == label",
        "training": dataclasses.asdict(result.config),
        "final_train_loss": result.losses[-1] if result.losses else None,
    }
    (directory / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory
