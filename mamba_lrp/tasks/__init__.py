"""Built-in tasks with known answers and known evidence, and the small models trained on them.

Tasks (one module each; the definitions are in the module docstrings):

* ``sentiment``: English reviews; the label is the majority of the (negatable) polarity words.
* ``associative_recall``: key-value pairs and a query key; the answer is the key's value.
* ``needle``: a fact (``the code is 7``) at a random depth of long distractor text.
* ``flip_flop``: write/ignore instructions with bits; the answer is the bit of the last write.
* ``icl_regression``: in-context integer linear regression with number tokens.

Every example (:class:`Example`) ends where its one-token label is to be predicted, so an LM is a
classifier by its logits at the last position, and carries its ground-truth positions
(``evidence``) for checking explanations. ``get_task(name, **options)`` builds a task;
:func:`load_default_model` loads a model shipped under ``mamba_lrp/models/<arch>-<task>/``
(trained by ``demos/train_default_models.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mamba_lrp.tasks.associative_recall import AssociativeRecallTask
from mamba_lrp.tasks.base import SPLITS, Example, Task, build_tokenizer, collate, split_of
from mamba_lrp.tasks.flip_flop import FlipFlopTask
from mamba_lrp.tasks.icl_regression import ICLRegressionTask
from mamba_lrp.tasks.needle import NeedleTask
from mamba_lrp.tasks.sentiment import SentimentTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (SentimentTask, AssociativeRecallTask, NeedleTask, FlipFlopTask, ICLRegressionTask)
}
#: Where the shipped models live: ``MODELS_DIR / f"{arch}-{task with '-' for '_'}"``.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def task_names() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return sorted(TASKS)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_") if isinstance(name, str) else name


def get_task(name: str, **options: Any) -> Task:
    """The task ``name`` (``-`` and ``_`` are the same) with ``options`` (its dataclass fields).

    Raises ``ValueError`` for an unknown name (listing the known ones) or bad options.
    """
    key = _canonical(name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    try:
        return TASKS[key](**options)
    except TypeError as error:
        raise ValueError(f"task {key!r}: bad options {sorted(options)}: {error}") from None


def default_model_dir(task: str, arch: str = "mamba") -> Path:
    """The directory of the shipped ``arch`` model for ``task`` (which may not exist)."""
    return MODELS_DIR / f"{arch}-{_canonical(task).replace('_', '-')}"


def shipped_models() -> list[str]:
    """Names of the shipped model directories (``mamba-sentiment``, ...)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(path.name for path in MODELS_DIR.iterdir() if (path / "task.json").is_file())


def load_shipped_model(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the shipped model named ``name`` (a directory name of :func:`shipped_models`, i.e.
    ``"{arch}-{task}"`` such as ``"bmojo-associative-recall"``): ``(model, tokenizer, task_info)``."""
    if name not in shipped_models():
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(shipped_models()) or 'none'}")
    arch, task = name.split("-", 1)
    return load_default_model(task, arch)


def load_default_model(task: str, arch: str = "mamba") -> tuple[Any, Any, dict[str, Any]]:
    """Load the model shipped for ``task``: ``(model in eval mode, tokenizer, task_info)``.

    ``task_info`` is the checkpoint's ``task.json``: ``task``, ``task_options``, ``arch``, ``seed``,
    ``test_accuracy`` (argmax of the last-position logits over the whole vocabulary equals the
    label), ``test_examples``, ``test_seed`` and the training settings; rebuild the task with
    :func:`task_from_info`. Raises ``ValueError`` when no such model is shipped.
    """
    from transformers import AutoTokenizer

    from ssm_models import load_pretrained

    directory = default_model_dir(task, arch)
    if not (directory / "task.json").is_file():
        raise ValueError(
            f"no shipped {arch!r} model for task {task!r} (looked in {directory}); "
            f"shipped: {', '.join(shipped_models()) or 'none'}"
        )
    info = json.loads((directory / "task.json").read_text())
    model = load_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer, info


def task_from_info(info: dict[str, Any]) -> Task:
    """The task of a checkpoint's ``task.json`` dict, with its recorded options."""
    options = dict(info.get("task_options") or {})
    for key, value in options.items():
        if isinstance(value, list):  # JSON turns tuples into lists
            options[key] = tuple(value)
    return get_task(info["task"], **options)


__all__ = [
    "MODELS_DIR", "SPLITS", "TASKS", "AssociativeRecallTask", "Example", "FlipFlopTask", "ICLRegressionTask",
    "NeedleTask", "SentimentTask", "Task", "build_tokenizer", "collate", "default_model_dir", "get_task",
    "load_default_model", "load_shipped_model", "shipped_models", "split_of", "task_from_info", "task_names",
]
