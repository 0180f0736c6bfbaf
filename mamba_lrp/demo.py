"""The embedded default job of ``make demo`` / ``mamba-lrp demo``.

For every Mamba model shipped in ``mamba_lrp/models`` (trained on a built-in task), on test
examples of its task (:func:`mamba_lrp.data.task_dataset`, seed 1):

* a small faithfulness evaluation (Delta A^F and AOPC, zero-embedding replacement, logits,
  10 steps) of MambaLRP, gradient x input, Captum's Integrated Gradients and Occlusion, and a
  random baseline, explaining the logit of the true answer;
* the first examples explained with every method, printed as lines of tokens with their share of
  relevance (``*`` marks the task's ground-truth tokens);
* one self-contained report (:mod:`mamba_lrp.report`): ``out/report.html`` and
  ``out/results.json``, the evaluation files in ``out/evaluation/<model>/``, and
  ``out/heatmap.png`` (the first sentiment example, every method on one colour scale).

An existing report in ``out`` is not overwritten unless ``force``; that is checked before any work.
The models are tiny (d_model 64), so the demo runs torch (and the numba scan, which follows torch's
setting) on one thread: more threads only add start-up and, on a busy machine, contention (measured
on 2 shared cores under load: one sentiment explanation 8 ms on one thread, 0.6 s on two).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mamba_lrp import viz
from mamba_lrp.data import task_dataset
from mamba_lrp.evaluation import summary_markdown
from mamba_lrp.report import ReportSection, check_report, report_section, write_report
from mamba_lrp.tasks import load_shipped_model, shipped_models, task_from_info

DEMO_METHODS = ("mamba_lrp", "gradient_x_input", "integrated_gradients", "occlusion", "random")
DEMO_METRICS = ("delta_af", "aopc")
DEMO_STEPS = 10
HEATMAP_PNG = "heatmap.png"


def format_tokens(tokens: list[str], relevance: torch.Tensor, evidence: set[int]) -> str:
    """One line: each token followed by its relevance in percent of the total absolute relevance;
    ground-truth tokens are marked with ``*``."""
    scale = float(relevance.abs().sum()) or 1.0
    return " ".join(
        f"{token}{'*' if index in evidence else ''}({100 * float(score) / scale:+.0f})"
        for index, (token, score) in enumerate(zip(tokens, relevance, strict=True))
    )


def _print_section(section: ReportSection) -> None:
    for example in section.examples:
        for method, explanation in example.explanations.items():
            tokens = [str(token) for token in explanation.tokens]
            top = int(explanation.relevance.argmax())
            print(f"  {method:>22}: {format_tokens(tokens, explanation.relevance, set(example.evidence))}")
            print(f"  {'':>22}  logit {float(explanation.output):+.3f}, conservation error "
                  f"{float(explanation.conservation_error):.3f}, top token {tokens[top]!r} "
                  f"{'is' if top in example.evidence else 'is not'} evidence")
        print()


def run_demo(out: str | Path = "demo_out", examples_per_task: int = 2, eval_examples: int = 24,
             force: bool = False, progress: bool = True) -> Path:
    """Run the demo (module docstring); returns the path of ``out/report.html``."""
    if examples_per_task < 1 or eval_examples < 1:
        raise ValueError("`examples_per_task` and `eval_examples` must be >= 1")
    out = Path(out)
    check_report(out, force)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, examples_per_task, eval_examples, force, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, examples_per_task: int, eval_examples: int, force: bool, progress: bool) -> Path:
    start = time.perf_counter()
    sections = []
    for name in shipped_models():
        model, tokenizer, info = load_shipped_model(name)
        task = task_from_info(info)
        print(f"\n=== {name}: task {task.name}, recorded test accuracy {info.get('test_accuracy')}")
        data = task_dataset(task, "test", max(eval_examples, examples_per_task), seed=1)
        section = report_section(
            model, tokenizer, data, DEMO_METHODS, DEMO_METRICS, out_dir=out, name=name, task=task.name,
            data_name=f"task:{task.name} (test split, seed 1)", show=examples_per_task, limit=eval_examples,
            label_column="label", steps=DEMO_STEPS, progress=progress,
            details={"recorded test accuracy": info.get("test_accuracy")})
        sections.append(section)
        _print_section(section)
        print(f"  faithfulness on {eval_examples} test examples:")
        print(summary_markdown(section.summary))
    seconds = time.perf_counter() - start
    chosen = next((section for section in sections if section.task == "sentiment"), sections[0] if sections else None)
    if chosen is None:
        raise ValueError("no shipped models to run the demo on")
    report = write_report(out, sections, title="mamba-lrp demo: the shipped models",
                          details={"run time": f"{seconds:.0f} s"}, force=force)
    viz.save(viz.plot_heatmap(chosen.examples[0].explanations), out / HEATMAP_PNG, dpi=110)
    print(f"demo finished in {seconds:.0f} s; report:")
    print(report)
    return report

