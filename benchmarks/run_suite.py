"""The benchmark suite's one entry point: runs each benchmark script and writes its Markdown output
into its own section of ``benchmarks/RESULTS.md`` (between ``<!-- suite:NAME -->`` and
``<!-- /suite:NAME -->`` markers; a missing section is appended), with the command and the date.

    .venv/bin/python benchmarks/run_suite.py                 # every CPU entry
    .venv/bin/python benchmarks/run_suite.py --only explain-cost vs-transformers
    python benchmarks/run_suite.py --gpu                     # the GPU entries (needs CUDA)
    .venv/bin/python benchmarks/run_suite.py --list

Entries time the 130M Mamba configuration (d_model 768, 24 layers, vocab 50280, random weights)
unless their script says otherwise. Every figure is a median of several runs and every comparison
a ratio measured in one run (see each script's docstring).
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"

#: name -> (script and arguments, needs a GPU)
ENTRIES: dict[str, tuple[list[str], bool]] = {
    "explain-cost": (["bench_explain.py", "--layers", "24", "--length", "1024", "--repeats", "5", "--ig-batch", "2"],
                     False),
    "vs-transformers": (["bench_explain_vs_transformers.py", "--layers", "2", "--length", "1024"], False),
    "forward-vs-transformers": (["bench_mamba_forward.py"], False),
    "memory": (["bench_explain_memory.py", "--recompute-only", "--lengths", "2048,4096,8192,16384,32768"], False),
    "h3-paths": (["bench_h3.py"], False),
    "bmojo-vs-mamba": (["bench_bmojo.py"], False),
    "gpu-selective-scan": (["bench_selective_scan_triton.py"], True),
    "gpu-diagonal-scan": (["bench_diagonal_scan_triton.py"], True),
    "gpu-explain": (["bench_explain_gpu.py", "--lengths", "8192,65536"], True),
}


def write_section(name: str, command: str, body: str, results: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of ``results`` with ``command`` and ``body``."""
    begin, end = f"<!-- suite:{name} -->", f"<!-- /suite:{name} -->"
    stamp = datetime.date.today().isoformat()
    block = f"{begin}\n### {name}\n\n`{command}` ({stamp})\n\n{body.strip()}\n{end}"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    temporary = results.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(ENTRIES), help="run only these entries")
    parser.add_argument("--gpu", action="store_true", help="run the GPU entries instead of the CPU ones")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    arguments = parser.parse_args(argv)
    if arguments.list:
        for name, (command, gpu) in ENTRIES.items():
            print(f"{name:<26} {'GPU' if gpu else 'CPU'}  {' '.join(command)}")
        return 0
    names = arguments.only or [name for name, (_, gpu) in ENTRIES.items() if gpu == arguments.gpu]
    failed = []
    for name in names:
        script, *options = ENTRIES[name][0]
        command = [sys.executable, str(HERE / script), *options]
        shown = " ".join(["python", f"benchmarks/{script}", *options])
        print(f"== {name}: {shown}", flush=True)
        if arguments.dry_run:
            continue
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr[-2000:], file=sys.stderr)
            continue
        print(result.stdout)
        write_section(name, shown, result.stdout)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
