"""Our MambaLM forward vs `transformers` MambaForCausalLM (its PyTorch fallback) on the same
weights, and the causal-conv backends. CPU; prints a Markdown table of medians and ratios.

    .venv/bin/python benchmarks/bench_mamba_forward.py [--length 1024] [--layers 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers
from same_weights import random_hf_and_ours
from timing import median_seconds

from ssm_models.ops import causal_conv1d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    hf, ours = random_hf_and_ours(arguments.d_model, arguments.layers)
    ids = torch.randint(0, 50280, (1, arguments.length))
    with torch.no_grad():
        error = float((ours(ids) - hf(ids).logits).norm() / hf(ids).logits.norm())
        ours_seconds = median_seconds(lambda: ours(ids), arguments.repeats)
        hf_seconds = median_seconds(lambda: hf(ids), arguments.repeats)
        ours_last = median_seconds(lambda: ours.head(ours.hidden_states(ids)[:, -1:]), arguments.repeats)
        hf_last = median_seconds(lambda: hf(ids, logits_to_keep=1), arguments.repeats)

    x = torch.randn(1, 2 * arguments.d_model, 2048, requires_grad=True)
    weight = torch.randn(2 * arguments.d_model, 1, 4, requires_grad=True)
    bias = torch.randn(2 * arguments.d_model, requires_grad=True)
    conv = {
        backend: median_seconds(lambda b=backend: causal_conv1d(x, weight, bias, backend=b).sum().backward(), 7)
        for backend in ("reference", "torch")
    }

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"\nForward, d_model={arguments.d_model}, {arguments.layers} layers, vocab 50280, L={arguments.length}, "
          f"fp32, median of {arguments.repeats}; relative logits error {error:.1e}\n")
    print("| logits | transformers MambaForCausalLM (s) | ssm_models.MambaLM (s) | speed-up |")
    print("|---|---|---|---|")
    print(f"| all L positions (head: 2*L*768*50280 FLOP in both) | {hf_seconds:.3f} | {ours_seconds:.3f} | "
          f"{hf_seconds / ours_seconds:.1f}x |")
    print(f"| last position only (`logits_to_keep=1` / `head(hidden_states()[:, -1:])`) | {hf_last:.3f} | "
          f"{ours_last:.3f} | {hf_last / ours_last:.1f}x |")
    print(f"\nCausal depthwise conv, (1, {2 * arguments.d_model}, 2048), K=4, forward+backward, median of 7\n")
    print("| backend | fwd+bwd (ms) |")
    print("|---|---|")
    for backend, seconds in conv.items():
        print(f"| {backend} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
