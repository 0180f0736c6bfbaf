"""Peak resident memory and time of one MambaLRP explanation as the context grows, with and
without block recomputation (``explain(..., recompute_blocks=True)``).

    .venv/bin/python benchmarks/bench_explain_memory.py [--layers 24] [--lengths 2048,4096,8192]

Model: the 130M configuration (d_model 768, vocab 50280) with random weights, float32, batch 1.
Each measurement runs in a fresh subprocess; peak memory is that process's ``ru_maxrss`` (whole
process: weights, activations, the Python runtime).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys

CHILD = """
import resource, sys, time, torch
from mamba_lrp import explain
from ssm_models import MambaConfig, MambaLM
layers, length, recompute = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = MambaLM(MambaConfig(d_model=768, n_layer=layers, vocab_size=50277)).eval()
ids = torch.randint(0, 50277, (length,))
explain(model, ids[:64], target=0, recompute_blocks=recompute)  # compile the kernels
start = time.perf_counter()
explanation = explain(model, ids, target=0, recompute_blocks=recompute)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--recompute-only", action="store_true",
                        help="measure only recompute_blocks=True (without it, L=16K needs more than 24 GiB)")
    arguments = parser.parse_args()
    lengths = [int(value) for value in arguments.lengths.split(",")]
    print(f"machine: {platform.machine()}; Mamba d_model 768, {arguments.layers} layers, vocab 50280, fp32, batch 1\n")
    print("| L | recompute_blocks | explain (s) | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for length in lengths:
        for recompute in (True,) if arguments.recompute_only else (False, True):
            result = subprocess.run([sys.executable, "-c", CHILD, str(arguments.layers), str(length),
                                     "1" if recompute else "0"], capture_output=True, text=True)
            if result.returncode != 0:
                print(f"| {length} | {recompute} | failed: {result.stderr.strip().splitlines()[-1]} | |")
                continue
            seconds, gib = map(float, result.stdout.split())
            print(f"| {length} | {recompute} | {seconds:.1f} | {gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
