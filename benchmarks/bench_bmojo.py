"""B'MOJO vs Mamba of the same width and depth: forward and explanation time on CPU.

    .venv/bin/python benchmarks/bench_bmojo.py [--d-model 512] [--layers 4] [--lengths 4096] [--repeats 3]
        [--threads 1] [--breakdown]

Models: random ``MambaLM`` and ``BMojoLM`` (B'MOJO-F and full B'MOJO, the config defaults: 4 heads,
window 64, 4 memory tokens, 2 eidetic tokens per chunk, budget 64), d_model 512, 4 layers, vocab
50277, float32, batch 1. Forward = logits at the last position (no grad), the forward work that
``explain`` does; explain = ``mamba_lrp.explain(model, ids)`` (MambaLRP with CP-LRP for attention).
All timings in one process, medians of ``--repeats`` after one warm-up round; the models take
turns within each round. The explained logit is the top prediction at the last position.
``--breakdown`` also times the parts of one layer (SSM sub-layer, projections, whole layers).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from mamba_lrp import explain
from ssm_models import BMojoConfig, BMojoLM, MambaConfig, MambaLM
from ssm_models.lm_base import SequenceLM

VOCAB = 50277


def build_models(d_model: int, n_layer: int) -> dict[str, SequenceLM]:
    torch.manual_seed(0)
    return {
        "Mamba": MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)).eval(),
        "B'MOJO-F": BMojoLM(BMojoConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, variant="bmojo_f")).eval(),
        "B'MOJO": BMojoLM(BMojoConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)).eval(),
    }


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(models: dict[str, SequenceLM], ids: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of ``(forward with logits at the last position, explain)`` per model. The models
    take turns within each repeat, so a slow phase of a shared machine hits all of them alike."""

    def forward(model: SequenceLM) -> None:
        with torch.no_grad():
            model.head(model.hidden_states(ids)[:, -1])

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            timing = seconds(lambda model=model: forward(model)), seconds(lambda model=model: explain(model, ids))
            if repeat:
                times[name].append(timing)
    return {name: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
            for name, runs in times.items()}


def layer_breakdown(d_model: int, length: int, repeats: int) -> None:
    """Forward seconds of the parts of one layer (no grad), the parts taking turns in each round."""
    torch.manual_seed(0)
    full = BMojoLM(BMojoConfig(d_model=d_model, n_layer=1, vocab_size=8)).eval().backbone.layers[0]
    fading = BMojoLM(BMojoConfig(d_model=d_model, n_layer=1, vocab_size=8, variant="bmojo_f")).eval().backbone.layers[0]
    hidden = torch.randn(1, length, d_model)
    normed = full.attn_norm(hidden)
    attn = full.attn
    parts: dict[str, Callable[[], object]] = {
        "SSM sub-layer (RMSNorm + MambaMixer)": lambda: full.mixer(full.norm(hidden)),
        "q, k, v, out projections alone": lambda: [attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed),
                                                   attn.out_proj(normed)],
        "B'MOJO-F layer (SSM + attention)": lambda: fading(hidden),
        "B'MOJO layer (SSM + innovation scores + attention)": lambda: full(hidden),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for repeat in range(repeats + 1):
            for name, part in parts.items():
                elapsed = seconds(part)
                if repeat:
                    times[name].append(elapsed)
    print(f"\none layer, d_model={d_model}, L={length}, forward (no grad), medians of {repeats}\n")
    print("| part | seconds |")
    print("|---|---|")
    for name, runs in times.items():
        print(f"| {name} | {statistics.median(runs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of one layer")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    models = build_models(arguments.d_model, arguments.layers)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\nd_model={arguments.d_model}, {arguments.layers} layers, vocab {VOCAB}, fp32, batch 1; "
          f"medians of {arguments.repeats}\n")
    print("| L | model | parameters (M) | forward (s) | vs Mamba | explain (s) | vs Mamba | explain / forward |")
    print("|---|---|---|---|---|---|---|---|")
    for length in arguments.lengths:
        ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        results = measure(models, ids, arguments.repeats)
        base_forward, base_explain = results["Mamba"]
        for name, (forward_seconds, explain_seconds) in results.items():
            parameters = sum(parameter.numel() for parameter in models[name].parameters()) / 1e6
            print(f"| {length} | {name} | {parameters:.1f} | {forward_seconds:.3f} | "
                  f"{forward_seconds / base_forward:.2f}x | {explain_seconds:.3f} | "
                  f"{explain_seconds / base_explain:.2f}x | {explain_seconds / forward_seconds:.2f} |", flush=True)
    if arguments.breakdown:
        layer_breakdown(arguments.d_model, max(arguments.lengths), arguments.repeats)


if __name__ == "__main__":
    main()
