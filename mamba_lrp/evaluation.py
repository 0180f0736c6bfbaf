"""``evaluate()``: faithfulness of several attribution methods over a data set, resumable and sharded.

For every example and every method: ``explain()`` the target, then the metrics of
:mod:`mamba_lrp.faithfulness` (:func:`~mamba_lrp.faithfulness.evaluate_example`, all curves of an
example in shared batches). Files written to ``out``:

* ``results.jsonl``: one JSON row per (example, method), appended, flushed and fsynced as each
  finishes: ``{"index", "method", "target", "position", "length", "output", "conservation_error",
  "metrics": {name: value}}`` (``length`` counts the real tokens; non-finite values are ``null``).
  A row is the commit mark of its pair: an interrupted run loses only the pairs in flight.
* ``curves.jsonl``: the flipping curves for plotting, one row per (example, method, curve):
  ``{"index", "method", "curve", **FlipCurve.to_dict()}`` (curve names as in ``evaluate_example``).
  Written before the result row; rows whose result row is missing are dropped at the end.
* ``summary.json``: per method and metric the mean, its standard error (sample standard deviation
  with ddof 1 over sqrt(n); null for n < 2), ``n`` (finite values) and the direction, plus the
  settings every number depends on; ``summary.md`` the same as a Markdown table. Sums use
  ``math.fsum`` (exactly rounded), so the summary does not depend on the order rows were written.
* ``run.json``: the settings; ``resume=True`` refuses to continue a run made with other settings.

``resume=True`` skips the (index, method) pairs that already have a row (no duplicates); a
half-written last line (a crash mid-write) is ignored and trimmed. ``resume=False`` starts afresh:
the files above in ``out`` are replaced.

Scale-out: with ``RANK``/``WORLD_SIZE`` in the environment (``torchrun --nproc_per_node K``), the
process group is initialised if it is not already (``gloo`` for a CPU model, ``nccl`` for CUDA:
place the model on ``cuda:LOCAL_RANK`` first; 2 h timeout), example ``i`` goes to rank
``i % world_size``, each rank appends to ``results.rank{r}.jsonl`` / ``curves.rank{r}.jsonl``,
and after a barrier rank 0 merges them into ``results.jsonl`` / ``curves.jsonl`` (sorted by index
and method) and writes the summary, identical to a one-process run's. Every rank returns it.

Targets. ``target="prediction"``, or no ``label_column``: the model's top prediction at
``position`` on the unperturbed input. ``target="label"`` with a ``label_column``: the label's
token id: ``label_to_token[label]`` when given (keys: the label or its ``str``; values: a token
id, or a string that ``tokenizer`` turns into exactly one token), else the label itself when it
is an integer token id, or a string encoded to exactly one token by ``tokenizer``. For a
classification set, end each text with a prompt and map classes to answer tokens, e.g.
``label_to_token={0: " negative", 1: " positive"}``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamba_lrp.data import load_file
from mamba_lrp.explain import explain, resolve_model
from mamba_lrp.faithfulness import OUTPUTS, FlipCurve, evaluate_example, get_metric, resolve_fractions
from mamba_lrp.methods import get_method
from mamba_lrp.progress import progress_bar

RESULTS = "results.jsonl"
CURVES = "curves.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RUN_JSON = "run.json"
DISTRIBUTED_TIMEOUT = timedelta(hours=2)
_NUMBER_SETTINGS = ("metrics", "replacement", "output", "steps", "position", "target", "label_column",
                    "label_to_token", "seed", "method_options")


# --------------------------------------------------------------------------- data
class ExampleSource:
    """The examples of ``data`` as :func:`evaluate` reads them (also used by :mod:`mamba_lrp.report`):
    ``examples[i] -> (ids list[int], label or None)``; text is tokenised with ``tokenizer(text)["input_ids"]``."""

    def __init__(self, data: Any, tokenizer: Any, text_column: str, ids_column: str, label_column: str | None):
        self.tokenizer, self.label_column = tokenizer, label_column
        self.rows: Any
        if isinstance(data, str | os.PathLike):
            data = load_file(data)
        if _is_dataset(data):
            if isinstance(data.column_names, Mapping):
                raise ValueError(f"`data` holds several splits {list(data.column_names)}: pass one, e.g. data['train']")
            columns = list(data.column_names)
            if text_column in columns:
                if tokenizer is None:
                    raise ValueError(f"the data has text in column {text_column!r}: pass `tokenizer=`")
                self.column = text_column
            elif ids_column in columns:
                self.column = ids_column
            else:
                raise ValueError(f"the data has neither a {text_column!r} (text) nor an {ids_column!r} column; "
                                 f"columns: {columns}")
            if label_column is not None and label_column not in columns:
                raise ValueError(f"`label_column` {label_column!r} is not a column of the data; columns: {columns}")
            self.rows, self.is_dataset = data, True
        elif (isinstance(data, torch.Tensor) and data.dim() == 2) or isinstance(data, Sequence):
            if label_column is not None:
                raise ValueError("`label_column` needs a datasets.Dataset or a JSONL/CSV file, not a list of ids")
            self.rows, self.is_dataset, self.column = data, False, None
        else:
            raise ValueError("`data` must be a datasets.Dataset, a .txt/.jsonl/.json/.csv path or a list of id "
                             f"sequences, got {type(data).__name__}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], Any]:
        if not self.is_dataset:
            return _id_list(self.rows[index], index), None
        row = self.rows[index]
        value = row[self.column]
        if isinstance(value, str):
            encoded = self.tokenizer(value)
            value = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
        label = row[self.label_column] if self.label_column is not None else None
        return _id_list(value, index), label


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _id_list(value: Any, index: int) -> list[int]:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.numel() == 0 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"example {index}: expected a non-empty sequence of token ids, got {value!r:.80}")
    return [int(item) for item in tensor.tolist()]


def _single_token(text: str, tokenizer: Any, what: str) -> int:
    if tokenizer is None:
        raise ValueError(f"{what} {text!r} is text: pass `tokenizer=` or map it to a token id with `label_to_token`")
    encoded = tokenizer(text)
    ids = _id_list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded, -1)
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} is {len(ids)} tokens {ids}; it must be exactly one token")
    return ids[0]


def _label_token(label: Any, label_to_token: Mapping | None, tokenizer: Any) -> int:
    value = label
    if label_to_token is not None:
        if label in label_to_token:
            value = label_to_token[label]
        elif str(label) in label_to_token:
            value = label_to_token[str(label)]
        else:
            raise ValueError(f"label {label!r} is not in `label_to_token` (keys: {sorted(map(str, label_to_token))})")
    if isinstance(value, str):
        return _single_token(value, tokenizer, "label")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"label {label!r} maps to {value!r}: expected a token id (int) or a one-token string")
    return value


@torch.no_grad()
def _prediction(model: nn.Module, ids: list[int], position: int) -> int:
    tensor = torch.tensor([ids], device=next(model.parameters()).device)
    index = position if position >= 0 else len(ids) + position
    if not 0 <= index < len(ids):
        raise ValueError(f"`position` {position} is out of range for a sequence of {len(ids)} tokens")
    logits = model.head(model.hidden_states(tensor[:, : index + 1])[:, -1])[0]
    return int(logits[: model.config.vocab_size].argmax())


# --------------------------------------------------------------------------- files
def _read_rows(path: Path) -> list[dict]:
    """The complete JSON rows of ``path``; a last line without its newline (a crash mid-write) or
    an unreadable line is skipped."""
    if not path.is_file():
        return []
    rows = []
    text = path.read_text()
    lines = text.split("\n")
    for line in lines[:-1]:  # lines[-1] is "" for a complete file, a fragment otherwise
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _trim_partial_line(path: Path) -> None:
    """Cut a half-written last line, so that appended rows start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())


def _append(handle: Any, rows: Iterable[dict]) -> None:
    for row in rows:
        handle.write(json.dumps(row) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _write_atomic(path: Path, text: str) -> None:
    descriptor, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _result_files(directory: Path, stem: str) -> list[Path]:
    return [directory / f"{stem}.jsonl"] + sorted(directory.glob(f"{stem}.rank*.jsonl"))


def _done_pairs(directory: Path) -> set[tuple[int, str]]:
    return {(row["index"], row["method"]) for path in _result_files(directory, "results") for row in _read_rows(path)}


def has_results(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds results of an evaluation: a summary, or at least one result row."""
    directory = Path(out)
    return (directory / SUMMARY_JSON).is_file() or any(
        path.is_file() and path.stat().st_size > 0 for path in _result_files(directory, "results"))


def read_curves(out: str | os.PathLike, kinds: Sequence[str] = ("deletion",)) -> dict[str, list[FlipCurve]]:
    """The flipping curves that :func:`evaluate` wrote to ``out/curves.jsonl``, per method (in file
    order), for :func:`mamba_lrp.viz.plot_flip_curves`: only the curves ``{kind}_{order}`` of
    ``kinds`` (``deletion``, ``insertion``; the ERASER curves have other steps and are left out)."""
    path = Path(out) / CURVES
    if not path.is_file():
        raise ValueError(f"{path}: no such file (not the output folder of an evaluation)")
    curves: dict[str, list[FlipCurve]] = {}
    for row in _read_rows(path):
        if row["curve"].split("_", 1)[0] in kinds:
            curves.setdefault(row["method"], []).append(FlipCurve.from_dict(row))
    return curves


# --------------------------------------------------------------------------- summary
def summarize(rows: Sequence[dict], methods: Sequence[str], metrics: Sequence[str], settings: dict) -> dict:
    """The summary dict of result rows (see the module docstring)."""
    results: dict[str, dict] = {}
    for method in methods:
        per_metric = {}
        for name in metrics:
            values = [row["metrics"][name] for row in rows if row["method"] == method]
            values = [float(value) for value in values if value is not None and math.isfinite(value)]
            n = len(values)
            mean = math.fsum(values) / n if n else None
            stderr = None
            if n >= 2:
                variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
                stderr = math.sqrt(variance / n)
            per_metric[name] = {"mean": mean, "stderr": stderr, "n": n}
        results[method] = per_metric
    return {
        "metrics": {name: {"higher_is_better": get_metric(name).higher_is_better, "best": get_metric(name).best,
                           "definition": get_metric(name).description} for name in metrics},
        "results": results,
        "n_examples": len({row["index"] for row in rows}),
        "settings": settings,
    }


def summary_markdown(summary: dict) -> str:
    """A Markdown table of a summary: mean ± standard error per method and metric."""
    metrics = list(summary["metrics"])
    arrows = {name: "↑" if summary["metrics"][name]["higher_is_better"] else "↓" for name in metrics}
    lines = ["| method | " + " | ".join(f"{name} {arrows[name]}" for name in metrics) + " | n |",
             "|---|" + "---|" * len(metrics) + "---|"]
    for method, per_metric in summary["results"].items():
        cells = []
        for name in metrics:
            entry = per_metric[name]
            if entry["mean"] is None:
                cells.append("–")
            else:
                error = "" if entry["stderr"] is None else f" ± {entry['stderr']:.4g}"
                cells.append(f"{entry['mean']:.4g}{error}")
        count = max((entry["n"] for entry in per_metric.values()), default=0)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {count} |")
    settings = summary["settings"]
    lines += ["", f"{summary['n_examples']} examples; replacement={settings['replacement']!r}, "
              f"output={settings['output']!r} (ERASER metrics: probabilities), steps={settings['steps']}, "
              f"target={settings['target']!r}, position={settings['position']}. "
              "Mean ± standard error; ↑ higher is better, ↓ lower is better."]
    return "\n".join(lines) + "\n"


def _finish(directory: Path, methods: Sequence[str], metrics: Sequence[str], indices: Sequence[int],
            settings: dict) -> dict:
    """Merge every results/curves file into results.jsonl/curves.jsonl (deduplicated, sorted),
    remove the per-rank files, and write the summary."""
    method_rank = {method: rank for rank, method in enumerate(methods)}
    def key(row: dict) -> tuple:
        return (row["index"], method_rank.get(row["method"], len(method_rank)), row["method"], row.get("curve", ""))
    results: dict[tuple, dict] = {}
    for path in _result_files(directory, "results"):
        for row in _read_rows(path):
            results.setdefault((row["index"], row["method"]), row)
    curves: dict[tuple, dict] = {}
    for path in _result_files(directory, "curves"):
        for row in _read_rows(path):
            if (row["index"], row["method"]) in results:
                curves[(row["index"], row["method"], row["curve"])] = row
    ordered = sorted(results.values(), key=key)
    _write_atomic(directory / RESULTS, "".join(json.dumps(row) + "\n" for row in ordered))
    _write_atomic(directory / CURVES, "".join(json.dumps(row) + "\n" for row in sorted(curves.values(), key=key)))
    for stem in ("results", "curves"):
        for path in _result_files(directory, stem)[1:]:
            path.unlink()
    wanted = set(indices)
    selected = [row for row in ordered if row["index"] in wanted and row["method"] in method_rank]
    summary = summarize(selected, methods, metrics, settings)
    _write_atomic(directory / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
    _write_atomic(directory / SUMMARY_MD, summary_markdown(summary))
    return summary


# --------------------------------------------------------------------------- distribution
def _distributed(model: nn.Module) -> tuple[int, int, bool]:
    """``(rank, world_size, created)``: from torch.distributed when RANK and WORLD_SIZE are set."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        device = next(model.parameters()).device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


# --------------------------------------------------------------------------- evaluate
def evaluate(
    model: nn.Module,
    data: Any,
    methods: Sequence[str],
    metrics: Sequence[str],
    tokenizer: Any = None,
    *,
    out: str | os.PathLike,
    text_column: str = "text",
    ids_column: str = "input_ids",
    label_column: str | None = None,
    label_to_token: Mapping[Any, int | str] | None = None,
    target: str = "label",
    limit: int | None = None,
    resume: bool = False,
    replacement: int | str = "zero_embedding",
    output: str = "logit",
    steps: int | Sequence[float] = 20,
    batch_size: int = 16,
    position: int = -1,
    seed: int = 0,
    progress: bool = True,
    **method_options: Any,
) -> dict:
    """Evaluate the faithfulness of ``methods`` on ``data`` with ``metrics``; write to ``out``.

    Args:
        model: an ``ssm_models`` LM or a ``transformers`` ``MambaForCausalLM``.
        data: a ``datasets.Dataset``, a ``.txt``/``.jsonl``/``.json``/``.csv`` path (read with
            :func:`mamba_lrp.data.load_file`), or a list of id sequences (lists or 1-D tensors) or an
            (N, L) tensor. Dataset rows hold text in ``text_column`` (tokenised with ``tokenizer``,
            ``tokenizer(text)["input_ids"]``) or ids in ``ids_column``.
        methods: names from :func:`mamba_lrp.method_names`.
        metrics: names from :data:`mamba_lrp.faithfulness.METRICS`.
        label_column, label_to_token, target: which token is explained (module docstring).
        limit: evaluate the first ``limit`` examples only.
        resume: continue a run in ``out`` (module docstring).
        replacement, output, steps, batch_size: as in :func:`mamba_lrp.faithfulness.flip_curve`.
        position: the explained position (negative: from the end), as in :func:`mamba_lrp.explain`.
        seed: per-example seed ``seed + index`` for random orders.
        progress: a ``rich`` progress bar on stderr (:mod:`mamba_lrp.progress`).
        method_options: passed to :func:`mamba_lrp.explain` (and so to the method).

    Returns the summary dict (also written to ``out/summary.json``).
    """
    methods, metrics = list(methods), list(metrics)
    if not methods or not metrics:
        raise ValueError("`methods` and `metrics` must each name at least one")
    for method in methods:
        get_method(method)
    for name in metrics:
        get_metric(name)
    if target not in ("label", "prediction"):
        raise ValueError(f"`target` must be 'label' or 'prediction', got {target!r}")
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {', '.join(map(repr, OUTPUTS))}; got {output!r}")
    resolve_fractions(steps)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"`limit` must be a non-negative integer or None, got {limit!r}")
    model = resolve_model(model)
    examples = ExampleSource(data, tokenizer, text_column, ids_column, label_column)
    count = len(examples) if limit is None else min(limit, len(examples))
    settings = _jsonable({
        "metrics": metrics, "replacement": replacement, "output": output,
        "steps": steps if isinstance(steps, int) else list(steps), "position": position, "target": target,
        "label_column": label_column, "label_to_token": None if label_to_token is None else
        {str(key): value for key, value in label_to_token.items()}, "seed": seed, "method_options": method_options,
    })
    directory = Path(out)
    rank, world_size, created = _distributed(model)
    try:
        problem = _prepare_directory(directory, settings, resume) if rank == 0 else None
        if world_size > 1:  # every rank raises rank 0's error instead of waiting at a barrier
            import torch.distributed as dist

            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem is not None:
            raise ValueError(problem)
        done = _done_pairs(directory)
        suffix = "" if world_size == 1 else f".rank{rank}"
        results_path, curves_path = directory / f"results{suffix}.jsonl", directory / f"curves{suffix}.jsonl"
        for path in (results_path, curves_path):
            _trim_partial_line(path)
        mine = [index for index in range(count) if index % world_size == rank]
        todo = [(index, method) for index in mine for method in methods if (index, method) not in done]
        _run(model, examples, todo, results_path, curves_path, tokenizer=tokenizer, label_to_token=label_to_token,
             target=target, metrics=metrics, replacement=replacement, output=output, steps=steps,
             batch_size=batch_size, position=position, seed=seed, progress=progress and rank == 0,
             method_options=method_options)
        _barrier(world_size)
        if rank == 0:
            summary = _finish(directory, methods, metrics, range(count), settings)
        _barrier(world_size)
        if rank != 0:
            summary = json.loads((directory / SUMMARY_JSON).read_text())
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return summary


def _prepare_directory(directory: Path, settings: dict, resume: bool) -> str | None:
    """Create ``directory``, check or clear it, write run.json. Returns an error message or None."""
    directory.mkdir(parents=True, exist_ok=True)
    run_path = directory / RUN_JSON
    if resume and run_path.is_file():
        previous = json.loads(run_path.read_text())
        changed = [key for key in _NUMBER_SETTINGS if previous.get(key) != settings.get(key)]
        if changed:
            return (f"resume=True: {directory} holds a run with other settings ({', '.join(changed)}); "
                    "use another `out` or resume=False")
    if not resume:
        for stem in ("results", "curves"):
            for path in _result_files(directory, stem):
                path.unlink(missing_ok=True)
        for name in (SUMMARY_JSON, SUMMARY_MD):
            (directory / name).unlink(missing_ok=True)
    _write_atomic(run_path, json.dumps(settings, indent=1) + "\n")
    return None


def _run(model: nn.Module, examples: ExampleSource, todo: list[tuple[int, str]], results_path: Path, curves_path: Path,
         *, tokenizer: Any, label_to_token: Mapping | None, target: str, metrics: list[str], replacement: Any,
         output: str, steps: Any, batch_size: int, position: int, seed: int, progress: bool,
         method_options: dict) -> None:
    current: tuple[int, list[int], int] | None = None  # (index, ids, target token) of the example in hand
    with results_path.open("a") as results, curves_path.open("a") as curves, \
            progress_bar(len(todo), "faithfulness", enabled=progress) as bar:
        for index, method in todo:
            if current is None or current[0] != index:
                ids, label = examples[index]
                if target == "label" and label is not None:
                    token = _label_token(label, label_to_token, tokenizer)
                else:
                    token = _prediction(model, ids, position)
                current = (index, ids, token)
            _, ids, token = current
            explanation = explain(model, torch.tensor(ids), target=token, position=position, method=method,
                                  **method_options)
            values, flip_curves = evaluate_example(
                model, None, explanation, metrics, replacement=replacement, output=output, steps=steps,
                batch_size=batch_size, seed=seed + index, return_curves=True)
            _append(curves, ({"index": index, "method": method, "curve": name, **curve.to_dict()}
                             for name, curve in flip_curves.items()))
            _append(results, [{
                "index": index, "method": method, "target": token, "position": int(explanation.position),
                "length": len(ids), "output": _finite(float(explanation.output)),
                "conservation_error": _finite(float(explanation.conservation_error)),
                "metrics": {name: _finite(value) for name, value in values.items()},
            }])
            bar.advance()
