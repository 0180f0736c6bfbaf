"""H3 forward on CPU: the FFT path vs the recurrent path (diagonal scan, ``cpu`` backend), same
weights; prints a Markdown table of medians, the ratio, and the paths' agreement. Timed: the
backbone (embeddings, blocks, ln_f: ``model.hidden_states``); the vocabulary projection, the same
on both paths, is timed once on its own.

    .venv/bin/python benchmarks/bench_h3.py [--lengths 1024 8192] [--d-model 512] [--layers 2] [--repeats 5]

Config: H3 layers only (no attention layers, which cost the same on both paths), d_state 64,
head_dim 1, GPT-2 vocabulary (50264 rows), batch 1, float32, ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from timing import median_seconds

from ssm_models import H3LM, H3Config
from ssm_models.ops import causal_conv1d, diagonal_scan, diagonal_ssm_kernel, fft_causal_conv

PATHS = ("fft", "recurrent")


def run(model: H3LM, path: str, ids: torch.Tensor) -> torch.Tensor:
    """The backbone's output (B, L, d_model) on ``path`` (the recurrent one with the ``cpu`` scan)."""
    return model.set_backend(ssm=path, scan="cpu").hidden_states(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    config = H3Config(d_model=arguments.d_model, n_layer=arguments.layers, vocab_size=50257)
    model = H3LM(config).eval()
    print(f"H3 d_model={config.d_model}, n_layer={config.n_layer}, d_state={config.d_state}, head_dim=1, no "
          f"attention; batch 1, float32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; median of {arguments.repeats} runs, paths alternating\n")
    print("| L | FFT path (s) | recurrent path, cpu scan (s) | recurrent / FFT | rel. difference | LM head (s) |")
    print("|---|---|---|---|---|---|")
    for length in arguments.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length))
        with torch.no_grad():
            hidden = {path: run(model, path, ids) for path in PATHS}  # warm-up; compiles the numba kernels
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for _ in range(arguments.repeats):  # alternate the paths, so that both see the same machine load
                for path in PATHS:
                    times[path].append(median_seconds(lambda p=path, i=ids: run(model, p, i), 1, warmup=0))
            fft, recurrent = statistics.median(times["fft"]), statistics.median(times["recurrent"])
            head = median_seconds(lambda h=hidden["fft"]: model.head(h), 1, warmup=0)
            recurrent_hidden, fft_hidden = hidden["recurrent"], hidden["fft"]
        difference = float((recurrent_hidden - fft_hidden).norm() / fft_hidden.norm())
        print(f"| {length} | {fft:.3f} | {recurrent:.3f} | {recurrent / fft:.2f} | {difference:.1e} | {head:.2f} |",
              flush=True)

    print("\nOne layer's SSMs on u (1, d_model, L), median of the same number of runs (s):\n")
    print("| L | diag. kernel K | FFT conv with K | shift SSM by FFT | shift SSM as FIR (conv1d) | diag. scan, cpu |")
    print("|---|---|---|---|---|---|")
    for length in arguments.lengths:
        seconds = ssm_part_seconds(model, length, arguments.repeats)
        print(f"| {length} | " + " | ".join(f"{value:.3f}" for value in seconds) + " |", flush=True)


@torch.no_grad()
def ssm_part_seconds(model: H3LM, length: int, repeats: int) -> list[float]:
    """Median seconds of the SSM pieces of the first layer: the diagonal kernel ``K`` (H, L), the FFT
    convolution with it, the shift SSM by FFT and as a direct FIR filter, and the diagonal scan."""
    mixer = model.backbone.layers[0].mixer
    a, c = mixer.kernel.kernel.discretize(torch.float32)
    taps, D = mixer.ssm_k_kernel.kernel.taps(), mixer.D
    u = torch.randn(1, model.config.d_model, length)
    kernel = diagonal_ssm_kernel(a, c, length)
    parts = [
        lambda: diagonal_ssm_kernel(a, c, length),
        lambda: fft_causal_conv(u, kernel, D),
        lambda: fft_causal_conv(u, taps, D),
        lambda: causal_conv1d(u, taps.flip(-1)),
        lambda: diagonal_scan(u, a, c, D, backend="cpu"),
    ]
    return [median_seconds(part, repeats) for part in parts]


if __name__ == "__main__":
    main()
