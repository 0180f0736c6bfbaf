"""The ``mamba-lrp`` command. Thin: every subcommand calls the public API.

Subcommands so far: ``demo`` (the embedded default job). User errors print one line and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys


def _demo(arguments: argparse.Namespace) -> int:
    from mamba_lrp.demo import run_demo

    run_demo(seed=arguments.seed, length=arguments.length)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba-lrp", description="Explain state-space sequence models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (default: off)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded default job")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the demo model (default: 0)")
    demo.add_argument("--length", type=int, default=32, help="prompt length in tokens (default: 32)")
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
