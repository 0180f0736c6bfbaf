"""The ``mamba-lrp`` command. Thin: every subcommand calls the public API.

Subcommands so far: ``demo`` (the embedded default job). User errors print one line and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys


def _demo(arguments: argparse.Namespace) -> int:
    from mamba_lrp.demo import run_demo

    run_demo(out=arguments.out, examples_per_task=arguments.examples, eval_examples=arguments.eval_examples)
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
