"""Where examples come from: one function, :func:`load_data`, turns what a user names into a
``datasets.Dataset`` (used by the CLI's ``report`` and ``evaluate``, by reports and by
:func:`mamba_lrp.evaluate` for file paths).

Sources (``source``):

* ``task:NAME`` (e.g. ``task:sentiment``; names from :func:`mamba_lrp.task_names`): examples of a
  built-in task, :func:`task_dataset`: ``limit`` (default :data:`TASK_EXAMPLES`) examples of
  ``split`` (default ``test``) drawn with ``seed``. Columns ``text`` (the tokens joined by spaces,
  which the task's tokenizer maps back), ``input_ids`` (the task's ids), ``label`` (the answer
  word, one token) and ``evidence`` (the ground-truth positions).
* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, read with
  ``datasets.load_from_disk``; of a ``DatasetDict``, ``split`` (default: ``test`` when there is
  one, else its only split).
* a file (:func:`load_file`): ``.txt``, one text per non-empty line (column ``text``);
  ``.jsonl`` / ``.json`` / ``.csv``, read with ``datasets.load_dataset`` (the ``json``/``csv``
  builders; the file's own columns).

Nothing here reaches the network. Every problem (missing file, unknown task, missing column, bad
split) is a ``ValueError`` that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK_PREFIX = "task:"
#: Examples drawn from a built-in task when no ``limit`` is given.
TASK_EXAMPLES = 100
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def load_file(path: str | Path) -> Any:
    """A ``datasets.Dataset`` of a ``.txt`` (one text per non-empty line, column ``text``),
    ``.jsonl``, ``.json`` or ``.csv`` file."""
    import datasets

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: a data file must end in {', '.join(FILE_SUFFIXES[:-1])} or {FILE_SUFFIXES[-1]}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [line for line in lines if line]
        if not texts:
            raise ValueError(f"{path}: no text (the file has no non-empty line)")
        return datasets.Dataset.from_dict({"text": texts})
    builder = "csv" if suffix == ".csv" else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # a malformed file: name it, in one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: could not read it as {suffix[1:]} ({first})") from None


def task_dataset(task: Any, split: str = "test", n: int = TASK_EXAMPLES, seed: int = 0) -> Any:
    """``n`` examples of ``split`` of the built-in ``task`` (a name or a :class:`~mamba_lrp.tasks.Task`)
    as a ``datasets.Dataset`` with columns ``text``, ``input_ids``, ``label``, ``evidence``."""
    import datasets

    from mamba_lrp.tasks import Task, get_task

    task = task if isinstance(task, Task) else get_task(task)
    examples = task.examples(split, n, seed=seed)
    return datasets.Dataset.from_dict({
        "text": [example.text for example in examples],
        "input_ids": [list(example.input_ids) for example in examples],
        "label": [example.label for example in examples],
        "evidence": [list(example.evidence) for example in examples],
    })


def _pick_split(data: Any, split: str | None, source: str) -> Any:
    names = list(data.keys())
    if split is None:
        if "test" in names:
            return data["test"]
        if len(names) == 1:
            return data[names[0]]
        raise ValueError(f"{source} holds the splits {', '.join(names)}: choose one with --split")
    if split not in names:
        raise ValueError(f"{source} has no split {split!r}; its splits: {', '.join(names)}")
    return data[split]


def load_data(source: str | Path, split: str | None = None, text_column: str = "text", limit: int | None = None,
              seed: int = 0) -> Any:
    """A ``datasets.Dataset`` from ``source`` (see the module docstring), cut to its first ``limit``
    rows. Its rows have text in ``text_column`` or token ids in ``input_ids``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer, got {limit!r}")
    text = str(source)
    if text.startswith(TASK_PREFIX):
        from mamba_lrp.tasks import SPLITS

        if split is not None and split not in SPLITS:
            raise ValueError(f"a built-in task has the splits {', '.join(SPLITS)}, not {split!r}")
        data = task_dataset(text[len(TASK_PREFIX):], split or "test", TASK_EXAMPLES if limit is None else limit, seed)
        text_column = "text"
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            import datasets

            try:
                data = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                raise ValueError(f"{path}: not a dataset saved with save_to_disk") from None
            if isinstance(data, datasets.DatasetDict):
                data = _pick_split(data, split, str(path))
            elif split is not None:
                raise ValueError(f"{path} is one dataset without splits; leave out --split")
        elif path.suffix.lower() in FILE_SUFFIXES or path.exists():
            if split is not None:
                raise ValueError(f"{path}: a data file has no splits; leave out --split")
            data = load_file(path)
        else:
            raise ValueError(f"--data {text!r}: no such file or directory (or use {TASK_PREFIX}NAME for a built-in "
                             "task)")
    columns = list(data.column_names)
    if text_column not in columns and "input_ids" not in columns:
        raise ValueError(f"{source}: no text column {text_column!r} (and no input_ids); columns: {', '.join(columns)}")
    if len(data) == 0:
        raise ValueError(f"{source}: no examples")
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    return data


__all__ = ["FILE_SUFFIXES", "TASK_EXAMPLES", "TASK_PREFIX", "load_data", "load_file", "task_dataset"]
