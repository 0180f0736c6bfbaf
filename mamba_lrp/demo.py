"""The embedded default job of ``make demo`` / ``mamba-lrp demo``.

On the Mamba models shipped in ``mamba_lrp/models`` (trained on the built-in tasks), it explains
built-in test examples with MambaLRP and baselines, prints each explanation as a line of tokens
with their relevance, checks where the relevance lands against the task's known evidence, and
runs a small faithfulness evaluation (Delta A^F, AOPC) whose files go to ``out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mamba_lrp.evaluation import evaluate
from mamba_lrp.explain import explain
from mamba_lrp.tasks import load_default_model, shipped_models, task_from_info

DEMO_METHODS = ("mamba_lrp", "gradient_x_input", "integrated_gradients", "random")


def format_tokens(tokens: list[str], relevance: torch.Tensor, evidence: set[int]) -> str:
    """One line: each token followed by its relevance in percent of the total absolute relevance;
    ground-truth tokens are marked with ``*``."""
    scale = float(relevance.abs().sum()) or 1.0
    return " ".join(
        f"{token}{'*' if index in evidence else ''}({100 * float(score) / scale:+.0f})"
        for index, (token, score) in enumerate(zip(tokens, relevance, strict=True))
    )


def run_demo(out: str | Path = "demo_out", examples_per_task: int = 2, eval_examples: int = 24) -> dict:
    """Run the demo; returns (and writes to ``out/demo.json``) what it measured."""
    if examples_per_task < 1 or eval_examples < 1:
        raise ValueError("`examples_per_task` and `eval_examples` must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict = {}
    for name in shipped_models():
        model, tokenizer, info = load_default_model(name.split("-", 1)[1].replace("-", "_"))
        task = task_from_info(info)
        print(f"\n=== {name}: task {task.name}, recorded test accuracy {info.get('test_accuracy')}")
        examples = task.examples("test", examples_per_task + eval_examples, seed=1)
        for example in examples[:examples_per_task]:
            ids = torch.tensor(example.input_ids)
            for method in DEMO_METHODS:
                explanation = explain(model, ids, target=example.label_id, method=method)
                top = int(explanation.relevance.argmax())
                line = format_tokens(list(example.tokens), explanation.relevance, set(example.evidence))
                print(f"  {method:>22}: {line}")
                print(f"  {'':>22}  logit {float(explanation.output):+.3f}, conservation error "
                      f"{float(explanation.conservation_error):.3f}, top token {example.tokens[top]!r} "
                      f"{'is' if top in example.evidence else 'is not'} evidence")
            print()
        data = [list(example.input_ids) for example in examples[examples_per_task:]]
        result = evaluate(model, data, methods=list(DEMO_METHODS), metrics=["delta_af", "aopc"],
                          out=out / name, target="prediction", steps=10, progress=False)
        summary[name] = result
        print(f"  faithfulness on {len(data)} test examples (files in {out / name}):")
        print((out / name / "summary.md").read_text())
    seconds = time.perf_counter() - start
    (out / "demo.json").write_text(json.dumps({"seconds": seconds, "evaluation": summary}, indent=1, default=str))
    print(f"demo finished in {seconds:.0f} s; results in {out}/")
    return summary
