"""Cost of one MambaLRP explanation on CPU: explanation time / forward time, and MambaLRP vs
Captum LayerIntegratedGradients (n_steps=50) on the same model and input.

    .venv/bin/python benchmarks/bench_explain.py [--layers 8] [--length 1024] [--repeats 5]

Model: random Mamba, d_model 768, vocab 50280, float32; all timings in one process, medians.
"""

from __future__ import annotations

import argparse
import platform

import torch
from captum.attr import LayerIntegratedGradients
from timing import median_seconds

from mamba_lrp import explain
from ssm_models import MambaConfig, MambaLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-repeats", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--ig-batch", type=int, default=10,
                        help="Captum's internal_batch_size (24 layers at L=1024 need <= 2 in 23 GiB)")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=arguments.d_model, n_layer=arguments.layers, vocab_size=50277)).eval()
    ids = torch.randint(0, 50277, (1, arguments.length))
    with torch.no_grad():
        target = int(model(ids)[0, -1].argmax())

    def forward_all_logits() -> None:
        with torch.no_grad():
            model(ids)

    def forward_last_logits() -> None:  # the forward work that explain() does
        with torch.no_grad():
            model.head(model.hidden_states(ids)[:, -1])

    forward_all = median_seconds(forward_all_logits, arguments.repeats)
    forward_seconds = median_seconds(forward_last_logits, arguments.repeats)
    explain_seconds = median_seconds(lambda: explain(model, ids, target=target), arguments.repeats)

    def last_logit(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids)[:, -1, target]

    integrated = LayerIntegratedGradients(last_logit, model.backbone.embedding)
    ig_seconds = median_seconds(
        lambda: integrated.attribute(ids, baselines=torch.zeros_like(ids), n_steps=arguments.ig_steps,
                                     internal_batch_size=arguments.ig_batch),
        arguments.ig_repeats, warmup=0,
    )
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\nMamba d_model={arguments.d_model}, {arguments.layers} layers, L={arguments.length}, fp32, batch 1; "
          f"medians of {arguments.repeats} (IG: {arguments.ig_repeats})\n")
    print("| what | seconds | ratio |")
    print("|---|---|---|")
    print(f"| forward, logits at the last position (no grad) | {forward_seconds:.3f} | 1.00 x forward |")
    print(f"| forward, logits at all positions (no grad) | {forward_all:.3f} | "
          f"{forward_all / forward_seconds:.2f} x forward |")
    print(f"| explain(method='mamba_lrp') | {explain_seconds:.3f} | "
          f"{explain_seconds / forward_seconds:.2f} x forward |")
    print(f"| Captum LayerIntegratedGradients, n_steps={arguments.ig_steps} | {ig_seconds:.1f} | "
          f"mamba_lrp is {ig_seconds / explain_seconds:.0f}x faster |")


if __name__ == "__main__":
    main()
