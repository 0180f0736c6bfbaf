"""Cost of every explanation method relative to one ``mamba_lrp`` explanation, same model and input.

    .venv/bin/python benchmarks/bench_methods.py [--d-model 256] [--layers 4] [--length 256] [--repeats 3]

Random Mamba (vocab 1000, float32), batch 1, CPU; each method with its default options; medians.
"""

from __future__ import annotations

import argparse
import platform

import torch
from timing import median_seconds

from mamba_lrp import explain, method_names
from ssm_models import MambaConfig, MambaLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=arguments.d_model, n_layer=arguments.layers, vocab_size=1000)).eval()
    ids = torch.randint(0, 1000, (arguments.length,))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\nMamba d_model={arguments.d_model}, {arguments.layers} layers, L={arguments.length}, fp32, batch 1; "
          f"medians of {arguments.repeats}, default options; rows in the order measured\n")
    print("| method | seconds | cost / mamba_lrp |")
    print("|---|---|---|")
    explain(model, ids, target=0)  # compile the scan kernels once
    base = median_seconds(lambda: explain(model, ids, target=0), arguments.repeats)
    print(f"| mamba_lrp | {base:.4f} | 1.0 |", flush=True)
    for method in sorted(set(method_names()) - {"mamba_lrp"}):
        seconds = median_seconds(lambda m=method: explain(model, ids, target=0, method=m), arguments.repeats, warmup=0)
        print(f"| {method} | {seconds:.4f} | {seconds / base:.1f} |", flush=True)


if __name__ == "__main__":
    main()
