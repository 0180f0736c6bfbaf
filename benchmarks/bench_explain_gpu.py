"""Explain the 130M Mamba configuration on a GPU: time and peak GPU memory of one MambaLRP
explanation at long context, and our Triton scan vs the PyTorch ``reference`` backend.

    python benchmarks/bench_explain_gpu.py [--lengths 8192,65536] [--repeats 3]

Model: d_model 768, 24 layers, vocab 50280, random weights, float32, batch 1, on ``cuda``;
``recompute_blocks=True`` (activation memory bounded per block). Needs a CUDA device.
"""

from __future__ import annotations

import argparse

import torch
from timing import device_timer

from mamba_lrp import explain
from ssm_models import MambaConfig, MambaLM
from ssm_models.ops import selective_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,65536")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_explain_gpu.py needs a CUDA device")
    device = torch.device("cuda")
    measure = device_timer("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=768, n_layer=arguments.layers, vocab_size=50277)).to(device).eval()
    print(f"Explain, Mamba d_model 768, {arguments.layers} layers, fp32, batch 1, recompute_blocks=True, "
          f"median of {arguments.repeats}\n")
    print("| L | forward (s) | explain (s) | explain / forward | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|")
    for length in [int(value) for value in arguments.lengths.split(",")]:
        ids = torch.randint(0, 50277, (length,), device=device)

        def forward(ids: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model.head(model.hidden_states(ids[None])[:, -1])

        forward_seconds = measure(forward, 1, arguments.repeats)
        torch.cuda.reset_peak_memory_stats(device)
        explain_seconds = measure(lambda ids=ids: explain(model, ids, target=0, recompute_blocks=True), 1,
                                  arguments.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"| {length} | {forward_seconds:.3f} | {explain_seconds:.3f} | {explain_seconds / forward_seconds:.2f} "
              f"| {peak:.2f} |", flush=True)

    batch, dim, n_state, length = 1, 1536, 16, 4096
    u, delta = torch.randn(2, batch, dim, length, device=device).unbind(0)
    A = -torch.rand(dim, n_state, device=device)
    B, C = torch.randn(2, batch, n_state, length, device=device).unbind(0)
    print(f"\nSelective scan forward, B={batch}, d={dim}, N={n_state}, L={length}, fp32, "
          f"median of {arguments.repeats}\n")
    print("| backend | seconds | reference / this |")
    print("|---|---|---|")
    seconds = {backend: measure(lambda b=backend: selective_scan(u, delta, A, B, C, delta_softplus=True, backend=b),
                                1, arguments.repeats) for backend in ("reference", "triton")}
    for backend, value in seconds.items():
        print(f"| {backend} | {value:.4f} | {seconds['reference'] / value:.0f}x |")


if __name__ == "__main__":
    main()
