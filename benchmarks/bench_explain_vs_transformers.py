"""One explanation through our MambaLRP vs gradient x input through `transformers`'
MambaForCausalLM (its PyTorch fallback, the path the paper's own code explains through), on the
same weights and input. CPU; prints a Markdown table of medians and the ratio.

    .venv/bin/python benchmarks/bench_explain_vs_transformers.py [--layers 2] [--length 1024] [--repeats 3]

The `transformers` backward at d_model 768 takes minutes per layer at L=1024, so the default is
2 layers of the 130M configuration (d_model 768, vocab 50280); both sides explain the logit of
the same target at the last position, relevance = sum over the embedding dimension.
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers
from same_weights import random_hf_and_ours
from timing import median_seconds

from mamba_lrp import explain


def transformers_gradient_x_input(model: transformers.MambaForCausalLM, ids: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient x input at the embeddings of ``model`` for ``logits[0, -1, target]``: (L,)."""
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logit = model(inputs_embeds=embeddings, logits_to_keep=1).logits[0, -1, target]
    (gradient,) = torch.autograd.grad(logit, embeddings)
    return (embeddings * gradient).sum(-1)[0].detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    hf, ours = random_hf_and_ours(arguments.d_model, arguments.layers)
    ids = torch.randint(0, 50280, (1, arguments.length))
    with torch.no_grad():
        target = int(ours.head(ours.hidden_states(ids)[:, -1])[0].argmax())

    ours_relevance = explain(ours, ids[0], target=target, method="gradient_x_input").relevance
    hf_relevance = transformers_gradient_x_input(hf, ids, target)
    agreement = float((ours_relevance - hf_relevance).norm() / hf_relevance.norm())
    ours_lrp = median_seconds(lambda: explain(ours, ids[0], target=target), arguments.repeats)
    ours_gxi = median_seconds(lambda: explain(ours, ids[0], target=target, method="gradient_x_input"),
                              arguments.repeats)
    hf_gxi = median_seconds(lambda: transformers_gradient_x_input(hf, ids, target), arguments.repeats, warmup=0)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"\nOne explanation, d_model={arguments.d_model}, {arguments.layers} layers, vocab 50280, "
          f"L={arguments.length}, fp32, batch 1, median of {arguments.repeats}; our gradient x input equals "
          f"transformers' to {agreement:.1e} (relative L2)\n")
    print("| what | seconds | transformers gradient x input / this |")
    print("|---|---|---|")
    print(f"| transformers MambaForCausalLM, gradient x input | {hf_gxi:.2f} | 1.0x |")
    print(f"| ours, `explain(method=\"gradient_x_input\")` | {ours_gxi:.3f} | {hf_gxi / ours_gxi:.0f}x |")
    print(f"| ours, `explain()` (MambaLRP) | {ours_lrp:.3f} | {hf_gxi / ours_lrp:.0f}x |")


if __name__ == "__main__":
    main()
