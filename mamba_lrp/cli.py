"""The ``mamba-lrp`` command. Thin: every subcommand parses its options and calls the public API.

Subcommands:

* ``demo``: the embedded default job (:mod:`mamba_lrp.demo`): explain and evaluate the shipped
  models, write a report;
* ``explain``: explain one text with one or more methods; a terminal heatmap, or an HTML / PNG /
  JSON file;
* ``report``: evaluate methods on a data set and write a self-contained report
  (:mod:`mamba_lrp.report`);
* ``evaluate``: the faithfulness evaluation alone (:func:`mamba_lrp.evaluate`; resumable, and
  sharded under ``torchrun --nproc_per_node K -m mamba_lrp.cli evaluate ...``);
* ``train``: train a model on a built-in task (:mod:`mamba_lrp.training`).

``--data`` is read by :func:`mamba_lrp.data.load_data`: ``task:NAME`` (a built-in task), a
folder saved with ``datasets``' ``save_to_disk``, or a ``.txt``/``.jsonl``/``.json``/``.csv``
file. The choices of methods, metrics, tasks and architectures come from their registries. User
errors (a missing file, an unknown name, a bad option, an existing output) print one line
``mamba-lrp: error: ...`` and exit with status 2, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

_OUT_SUFFIXES = (".html", ".png", ".json")
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- option values
def _method_names() -> list[str]:
    from mamba_lrp import method_names

    return method_names()


def _metric_names() -> list[str]:
    from mamba_lrp.faithfulness import metric_names

    return metric_names()


def _names(text: str, kind: str, known: list[str]) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known {kind}s: {', '.join(known)}")
    return names


def _replacement(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _label_to_token(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"--label-to-token {text!r} is not a JSON object such as "
                         "'{\"0\": \" negative\", \"1\": \" positive\"}'")
    return mapping


def _data(arguments: argparse.Namespace) -> tuple[Any, str | None, str | None]:
    """``(dataset, label column, task name or None)`` of the ``--data`` options."""
    from mamba_lrp.data import TASK_PREFIX, load_data

    data = load_data(arguments.data, split=arguments.split, text_column=arguments.text_column,
                     limit=arguments.limit)
    is_task = str(arguments.data).startswith(TASK_PREFIX)
    label_column = arguments.label_column if arguments.label_column is not None else ("label" if is_task else None)
    if label_column is not None and label_column not in data.column_names:
        raise ValueError(f"--label-column {label_column!r} is not a column of the data; columns: "
                         f"{', '.join(data.column_names)}")
    return data, label_column, str(arguments.data)[len(TASK_PREFIX):] if is_task else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------- subcommands
def _demo(arguments: argparse.Namespace) -> int:
    from mamba_lrp.demo import run_demo

    run_demo(out=arguments.out, examples_per_task=arguments.examples, eval_examples=arguments.eval_examples,
             force=arguments.force)
    return 0


def _load_model(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, task info)`` for a checkpoint directory, a shipped model name or a hub
    id; the task info is the checkpoint's ``task.json`` (written by ``mamba-lrp train``) or ``{}``."""
    from mamba_lrp.tasks import load_shipped_model, shipped_models

    path = Path(name).expanduser()
    if path.is_dir():
        from transformers import AutoTokenizer

        from ssm_models import load_pretrained

        model = load_pretrained(path).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: no usable tokenizer ({str(error).splitlines()[0]})") from None
        info = json.loads((path / "task.json").read_text()) if (path / "task.json").is_file() else {}
        return model, tokenizer, info
    if name in shipped_models():
        return load_shipped_model(name)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.parent.is_dir()
    if not looks_like_hub_id:
        raise ValueError(f"--model {name!r} is not a checkpoint directory, a hub id or a shipped model "
                         f"({', '.join(shipped_models()) or 'none shipped'})")
    from transformers import AutoTokenizer

    from ssm_models import load_pretrained

    try:
        model = load_pretrained(name).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    except ValueError:
        raise
    except Exception as error:  # network, missing repository, ...: a user error, one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--model {name!r}: could not load it from the hub ({first})") from None
    return model, tokenizer, {}


def _target_id(target: str | None, tokenizer: Any) -> int | None:
    """``--target`` as a token id: an integer, or a token of the vocabulary (as written, or as
    text that encodes to exactly one token)."""
    if target is None:
        return None
    if target.lstrip("-").isdigit():
        return int(target)
    vocabulary = tokenizer.get_vocab()
    if target in vocabulary:
        return int(vocabulary[target])
    ids = tokenizer.encode(target, add_special_tokens=False)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and (unknown is None or ids[0] != unknown):
        return int(ids[0])
    raise ValueError(f"--target {target!r} is neither a token id nor one token of the model's vocabulary")


def _explain(arguments: argparse.Namespace) -> int:
    from mamba_lrp import explain

    methods = _names(arguments.methods, "method", _method_names())
    out = Path(arguments.out) if arguments.out else None
    if out is not None:
        if out.suffix.lower() not in _OUT_SUFFIXES:
            raise ValueError(f"--out {out}: unsupported format; use one of {', '.join(_OUT_SUFFIXES)}")
        if out.exists() and not arguments.force:
            raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    if not arguments.text:
        raise ValueError("--text is empty")
    model, tokenizer, _ = _load_model(arguments.model)
    target = _target_id(arguments.target, tokenizer)
    explanations = {}
    for name in methods:
        explanations[name] = explain(model, arguments.text, target=target, position=arguments.position,
                                     method=name, tokenizer=tokenizer)
        if target is None:  # every method explains the same output: the first one's top prediction
            target = int(explanations[name].target)
    from mamba_lrp import viz

    if out is None:
        for name, explanation in explanations.items():
            token = tokenizer.convert_ids_to_tokens(int(explanation.target))
            viz.print_heatmap(explanation, name=f"{name} (explaining {token!r})")
        return 0
    suffix = out.suffix.lower()
    if suffix == ".html":
        title = f"mamba-lrp: {arguments.model}"
        body = viz.html_comparison(explanations, normalize=arguments.normalize)
        viz.write_text_atomic(out, viz.html_document(body, title=title), force=True)
    elif suffix == ".json":
        first = next(iter(explanations.values()))
        record = {
            "model": arguments.model, "text": arguments.text, "tokens": first.tokens,
            "target": int(first.target), "target_token": tokenizer.convert_ids_to_tokens(int(first.target)),
            "position": int(first.position),
            "methods": {name: {"relevance": explanation.relevance.tolist(), "output": float(explanation.output),
                               "conservation_error": float(explanation.conservation_error),
                               "layer_sums": None if explanation.layer_sums is None
                               else explanation.layer_sums.tolist()}
                        for name, explanation in explanations.items()},
        }
        viz.write_text_atomic(out, json.dumps(record, indent=1) + "\n", force=True)
    else:
        viz.save(viz.plot_heatmap(explanations, normalize=arguments.normalize), out)
    print(f"wrote {out}")
    return 0


def _report(arguments: argparse.Namespace) -> int:
    from mamba_lrp.report import check_report, report_section, slug, write_report

    check_report(arguments.out, arguments.force)
    methods = _names(arguments.methods, "method", _method_names())
    metrics = _names(arguments.metrics, "metric", _metric_names())
    if arguments.show < 0:
        raise ValueError(f"--show must be >= 0, got {arguments.show}")
    label_to_token = _label_to_token(arguments.label_to_token)
    model, tokenizer, info = _load_model(arguments.model)
    data, label_column, data_task = _data(arguments)
    details = {"recorded test accuracy": info["test_accuracy"]} if "test_accuracy" in info else {}
    data_name = arguments.data + (f" ({arguments.split} split)" if arguments.split else "")
    section = report_section(
        model, tokenizer, data, methods, metrics, out_dir=arguments.out, name=slug(arguments.model),
        task=info.get("task") or data_task, data_name=data_name, show=arguments.show, limit=arguments.limit,
        text_column=arguments.text_column, label_column=label_column, label_to_token=label_to_token,
        position=arguments.position, steps=arguments.steps, replacement=_replacement(arguments.replacement),
        output=arguments.output, details=details)
    path = write_report(arguments.out, section, title=f"mamba-lrp report: {arguments.model}", force=arguments.force)
    print(path)
    return 0


def _evaluate(arguments: argparse.Namespace) -> int:
    from mamba_lrp.evaluation import SUMMARY_JSON, evaluate, has_results, summary_markdown

    methods = _names(arguments.methods, "method", _method_names())
    metrics = _names(arguments.metrics, "metric", _metric_names())
    out = Path(arguments.out)
    if arguments.resume and arguments.force:
        raise ValueError("--resume continues an evaluation and --force replaces it: choose one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if _rank() == 0 and has_results(out) and not (arguments.resume or arguments.force):
        raise FileExistsError(f"{out} holds an evaluation; pass --resume to continue it or --force to replace it")
    label_to_token = _label_to_token(arguments.label_to_token)
    model, tokenizer, _ = _load_model(arguments.model)
    data, label_column, _ = _data(arguments)
    summary = evaluate(model, data, methods, metrics, tokenizer, out=out, text_column=arguments.text_column,
                       label_column=label_column, label_to_token=label_to_token,
                       target="label" if label_column else "prediction", resume=arguments.resume,
                       replacement=_replacement(arguments.replacement), output=arguments.output,
                       steps=arguments.steps, batch_size=arguments.batch_size, position=arguments.position,
                       seed=arguments.seed)
    if _rank() == 0:
        print(summary_markdown(summary))
        print(out / SUMMARY_JSON)
    return 0


def _train(arguments: argparse.Namespace) -> int:
    from mamba_lrp.tasks import get_task
    from mamba_lrp.training import TrainingConfig, build_model, train

    out = Path(arguments.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = [name for name in ("config.json", "model.safetensors", "task.json") if (out / name).exists()]
    if existing and not arguments.force:
        raise FileExistsError(f"{out} holds a checkpoint ({', '.join(existing)}); pass --force to overwrite it")
    task = get_task(arguments.task)
    warmup = min(100, arguments.steps // 10) if arguments.warmup_steps is None else arguments.warmup_steps
    config = TrainingConfig(steps=arguments.steps, batch_size=arguments.batch_size, lr=arguments.lr,
                            warmup_steps=warmup, seed=arguments.seed, test_examples=arguments.test_examples,
                            log_every=max(1, min(50, arguments.steps)))
    model = build_model(task, arguments.arch, seed=arguments.seed, d_model=arguments.d_model,
                        n_layer=arguments.n_layer)
    result = train(model, task, config, output_dir=out)
    print(f"test accuracy {result.test_accuracy:.3f} on {result.test_examples} test examples "
          f"(final training loss {result.losses[-1]:.4f})")
    print(out)
    return 0


# --------------------------------------------------------------------------- parser
def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint directory (with its tokenizer), Hugging Face hub id in the local cache, "
                             "or shipped model name (e.g. mamba-sentiment) (required)")


def _add_data(parser: argparse.ArgumentParser, limit_default: int | None) -> None:
    from mamba_lrp.data import TASK_EXAMPLES

    parser.add_argument("--data", required=True,
                        help="task:NAME (a built-in task's examples, e.g. task:sentiment), a folder saved with "
                             "datasets' save_to_disk, or a .txt (one text per line) / .jsonl / .json / .csv file "
                             "(required)")
    parser.add_argument("--split", default=None,
                        help="split of a task (train or test) or of a saved DatasetDict (default: test for a task; "
                             "test or the only split of a DatasetDict)")
    parser.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    parser.add_argument("--label-column", default=None,
                        help="column holding each example's label, whose token is explained (default: label for "
                             "task: data; none otherwise: the model's top prediction is explained)")
    parser.add_argument("--label-to-token", default=None,
                        help="JSON object mapping labels to token ids or one-token strings, e.g. "
                             "'{\"0\": \" negative\", \"1\": \" positive\"}' (default: the label is the token)")
    parser.add_argument("--limit", type=int, default=limit_default,
                        help="use the first N examples (default: "
                             + (f"{limit_default})" if limit_default else f"all; {TASK_EXAMPLES} for task: data)"))


def _add_evaluation(parser: argparse.ArgumentParser, metrics_default: str) -> None:
    methods, metrics = _method_names(), _metric_names()
    parser.add_argument("--methods", default="mamba_lrp,integrated_gradients",
                        help=f"comma-separated methods, from: {', '.join(methods)} "
                             "(default: mamba_lrp,integrated_gradients)")
    parser.add_argument("--metrics", default=metrics_default,
                        help=f"comma-separated faithfulness metrics, from: {', '.join(metrics)} "
                             f"(default: {metrics_default})")
    parser.add_argument("--steps", type=int, default=20,
                        help="perturbation steps of each flipping curve (default: 20)")
    parser.add_argument("--replacement", default="zero_embedding",
                        help="what replaces a flipped token: zero_embedding, delete, or a token id "
                             "(default: zero_embedding)")
    parser.add_argument("--output", choices=("logit", "logprob", "prob"), default="logit",
                        help="the explained output measured along the curves (default: logit)")
    parser.add_argument("--position", type=int, default=-1,
                        help="explained position; negative counts from the end (default: -1, the last token)")


def build_parser() -> argparse.ArgumentParser:
    """The ``mamba-lrp`` argument parser (its choices read from the registries)."""
    from mamba_lrp.tasks import task_names
    from mamba_lrp.training import architecture_names

    parser = _Parser(prog="mamba-lrp", description="Explain state-space sequence models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (default: off)")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks (default: off)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", parents=[common], help="explain and evaluate the shipped models, write a report (make demo)",
        description="Explain test examples of the shipped models with MambaLRP and baselines, evaluate their "
                    "faithfulness, and write OUT/report.html and OUT/results.json; print the report's path.")
    demo.add_argument("--out", default="demo_out", help="folder for the report and evaluation files "
                                                        "(default: demo_out)")
    demo.add_argument("--examples", type=int, default=2, help="examples shown per model (default: 2)")
    demo.add_argument("--eval-examples", type=int, default=24,
                      help="examples in the faithfulness evaluation per model (default: 24)")
    demo.add_argument("--force", action="store_true", help="overwrite an existing report in --out (default: off)")
    demo.set_defaults(handler=_demo)

    explain = commands.add_parser(
        "explain", parents=[common], help="explain a model's prediction for one text",
        description="Explain the model's output logit for TARGET at POSITION of TEXT with one or more methods. "
                    "Without --out, print a heatmap per method to the terminal.")
    _add_model(explain)
    explain.add_argument("--text", required=True, help="the input text (required)")
    explain.add_argument("--target", default=None,
                         help="token id or token whose logit is explained (default: the model's top prediction)")
    explain.add_argument("--position", type=int, default=-1,
                         help="explained position; negative counts from the end (default: -1, the last token)")
    explain.add_argument("--methods", default="mamba_lrp",
                         help=f"comma-separated methods, from: {', '.join(_method_names())} (default: mamba_lrp)")
    explain.add_argument("--out", default=None,
                         help="write FILE.html (side-by-side heatmaps, self-contained), FILE.png (heatmap figure) "
                              "or FILE.json (the numbers) instead of printing (default: print to the terminal)")
    explain.add_argument("--normalize", choices=("shared", "row"), default="shared",
                         help="colour scale of the .html/.png rows: one shared by all methods, or one per row "
                              "(default: shared)")
    explain.add_argument("--force", action="store_true", help="overwrite an existing --out file (default: off)")
    explain.set_defaults(handler=_explain)

    report = commands.add_parser(
        "report", parents=[common], help="evaluate methods on a data set and write a self-contained HTML report",
        description="Evaluate the faithfulness of METHODS on the examples of --data, explain the first --show "
                    "examples with every method, and write OUT/report.html (inline CSS, embedded figures, no "
                    "external resources) and OUT/results.json (the numbers); the evaluation files go to "
                    "OUT/evaluation/. Prints the report's path.")
    _add_model(report)
    _add_data(report, limit_default=20)
    _add_evaluation(report, "delta_af,aopc")
    report.add_argument("--show", type=int, default=5, help="examples shown as heatmaps (default: 5)")
    report.add_argument("--out", required=True, help="folder for the report (required)")
    report.add_argument("--force", action="store_true", help="overwrite an existing report in --out (default: off)")
    report.set_defaults(handler=_report)

    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="evaluate the faithfulness of methods on a data set",
        description="Evaluate the faithfulness of METHODS with METRICS on the examples of --data; write "
                    "OUT/results.jsonl, curves.jsonl, summary.json and summary.md and print the summary. Under "
                    "torchrun (torchrun --nproc_per_node K -m mamba_lrp.cli evaluate ...) the examples are "
                    "sharded over the processes.")
    _add_model(evaluate)
    _add_data(evaluate, limit_default=None)
    _add_evaluation(evaluate, "delta_af")
    evaluate.add_argument("--batch-size", type=int, default=16,
                          help="perturbed inputs per forward pass (default: 16)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random orders (default: 0)")
    evaluate.add_argument("--out", required=True, help="folder for the evaluation files (required)")
    evaluate.add_argument("--resume", action="store_true",
                          help="continue an interrupted evaluation in --out (default: off)")
    evaluate.add_argument("--force", action="store_true",
                          help="replace an existing evaluation in --out (default: off)")
    evaluate.set_defaults(handler=_evaluate)

    train = commands.add_parser(
        "train", parents=[common], help="train a model on a built-in task",
        description="Train a fresh model of architecture ARCH on the built-in task TASK, report its test accuracy "
                    "and save a checkpoint (config.json, model.safetensors, tokenizer, task.json) to OUT, which "
                    "--model of the other commands accepts.")
    train.add_argument("--task", required=True, choices=task_names(), help="the built-in task (required)")
    train.add_argument("--arch", default="mamba", choices=architecture_names(),
                       help="the architecture (default: mamba)")
    train.add_argument("--out", required=True, help="checkpoint folder (required)")
    train.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: 2000)")
    train.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 0.003)")
    train.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warm-up steps (default: a tenth of --steps, at most 100)")
    train.add_argument("--d-model", type=int, default=64, help="model width (default: 64)")
    train.add_argument("--n-layer", type=int, default=2, help="number of blocks (default: 2)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: 0)")
    train.add_argument("--test-examples", type=int, default=1000,
                       help="test examples for the final accuracy (default: 1000)")
    train.add_argument("--force", action="store_true", help="overwrite a checkpoint in --out (default: off)")
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mamba-lrp`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except _USER_ERRORS as error:
        if getattr(arguments, "debug", False):
            raise
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"mamba-lrp: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mamba-lrp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
