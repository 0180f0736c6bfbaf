"""The ``mamba-lrp`` command. Thin: every subcommand calls the public API.

Subcommands: ``demo`` (the embedded default job) and ``explain`` (explain one text with one or
more methods; a terminal heatmap, or an HTML / PNG / JSON file). User errors print one line and
exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_OUT_SUFFIXES = (".html", ".png", ".json")


def _demo(arguments: argparse.Namespace) -> int:
    from mamba_lrp.demo import run_demo

    run_demo(out=arguments.out, examples_per_task=arguments.examples, eval_examples=arguments.eval_examples)
    return 0


def _load_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a checkpoint directory, a shipped model name or a hub id."""
    from mamba_lrp.tasks import load_default_model, shipped_models

    path = Path(name).expanduser()
    if path.is_dir():
        from transformers import AutoTokenizer

        from ssm_models import load_pretrained

        model = load_pretrained(path).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: no usable tokenizer ({str(error).splitlines()[0]})") from None
        return model, tokenizer
    if name in shipped_models():
        arch, task = name.split("-", 1)
        model, tokenizer, _ = load_default_model(task, arch)
        return model, tokenizer
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
    return model, tokenizer


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
    from mamba_lrp import explain, method_names

    methods = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    known = method_names()
    unknown = [name for name in methods if name not in known]
    if not methods or unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known methods: {', '.join(known)}")
    out = Path(arguments.out) if arguments.out else None
    if out is not None:
        if out.suffix.lower() not in _OUT_SUFFIXES:
            raise ValueError(f"--out {out}: unsupported format; use one of {', '.join(_OUT_SUFFIXES)}")
        if out.exists() and not arguments.force:
            raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    if not arguments.text:
        raise ValueError("--text is empty")
    model, tokenizer = _load_model(arguments.model)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba-lrp", description="Explain state-space sequence models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (default: off)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="explain and evaluate the shipped models (the embedded default job)")
    demo.add_argument("--out", default="demo_out", help="folder for the evaluation files (default: demo_out)")
    demo.add_argument("--examples", type=int, default=2, help="examples shown per model (default: 2)")
    demo.add_argument("--eval-examples", type=int, default=24,
                      help="examples in the faithfulness evaluation per model (default: 24)")
    demo.set_defaults(handler=_demo)

    from mamba_lrp import method_names

    explain = commands.add_parser(
        "explain", help="explain a model's prediction for one text",
        description="Explain the model's output logit for TARGET at POSITION of TEXT with one or more methods. "
                    "Without --out, print a heatmap per method to the terminal.")
    explain.add_argument("--model", required=True,
                         help="checkpoint directory, Hugging Face hub id, or shipped model name "
                              "(e.g. mamba-sentiment) (required)")
    explain.add_argument("--text", required=True, help="the input text (required)")
    explain.add_argument("--target", default=None,
                         help="token id or token whose logit is explained (default: the model's top prediction)")
    explain.add_argument("--position", type=int, default=-1,
                         help="explained position; negative counts from the end (default: -1, the last token)")
    explain.add_argument("--methods", default="mamba_lrp",
                         help=f"comma-separated methods, from: {', '.join(method_names())} (default: mamba_lrp)")
    explain.add_argument("--out", default=None,
                         help="write FILE.html (side-by-side heatmaps, self-contained), FILE.png (heatmap figure) "
                              "or FILE.json (the numbers) instead of printing (default: print to the terminal)")
    explain.add_argument("--normalize", choices=("shared", "row"), default="shared",
                         help="colour scale of the .html/.png rows: one shared by all methods, or one per row "
                              "(default: shared)")
    explain.add_argument("--force", action="store_true", help="overwrite an existing --out file (default: off)")
    explain.set_defaults(handler=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except (ValueError, FileNotFoundError) as error:
        if arguments.debug:
            raise
        print(f"mamba-lrp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
