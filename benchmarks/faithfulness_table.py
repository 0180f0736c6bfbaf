"""The results table of issue 6: faithfulness (Delta A^F) and ground-truth localisation of every
method of the paper's Table 1 (REFERENCE.md section 2) on the shipped models, and the
one-rule-off ablation of MambaLRP.

    .venv/bin/python benchmarks/faithfulness_table.py [--examples 200] [--out benchmarks/results/faithfulness.md]
        [--models mamba-sentiment h3-sentiment bmojo-associative-recall ...] [--threads 1] [--batch-size 50]

writes a Markdown file (default ``benchmarks/results/faithfulness.md``) with the exact command, the
wall time and the machine.

What is measured, and why each choice (decided before looking at any number, and not changed after):

* **Examples.** The first ``--examples`` examples of each task's *test* split, drawn with the seed
  the checkpoint's ``task.json`` records for its test accuracy (``test_seed``). Every method sees the
  same examples; mean and standard error (sample std / sqrt(n)) over examples.
* **Explained output.** The logit of the *correct label* token at the last position (the position
  that predicts the answer), for every method and every metric. It is the quantity MambaLRP's
  relevance conserves, and the paper's Table 1 reports Delta A^F on it.
* **Delta A^F** = A^F(LeRF) - A^F(MoRF) (REFERENCE.md section 3; :mod:`mamba_lrp.faithfulness`),
  deletion curves, A^F the mean of the curve *including* k = 0. Steps: one token per step
  (``steps = n``, the number of tokens, so the curve has points k = 0..n). The inputs are short
  (8-49 tokens); a fixed grid of fractions would repeat token counts on short inputs and weight
  them unevenly, one token per step weights every deletion once. All tokens are flippable,
  including the explained (last) one (the engine's rule: it is an input like any other).
* **Replacement: the tokenizer's ``[UNK]`` token id.** Not ``"zero_embedding"``: with it the
  explained position's own flip makes a Mamba logit exactly 0 whatever the context (the RMSNorm of
  a zero residual stream is 0, so the gate silu(z) is 0; see faithfulness.py), a property of the
  replacement, not of the evidence. Not ``"delete"`` as the main setting: deleting tokens shifts the
  explained position (when the last token goes, f is read at another token that is asked a
  different question) and changes the length. ``[UNK]`` keeps the length and the positions, means
  "an unknown word here" (what removing a token's information should look like), and has an
  ordinary, non-zero embedding (it is a row of the trained table). It never occurs in training
  (no task has unknown words), so it is out of distribution -- as every replacement is. ``[PAD]``
  is no better (always masked in training). As a check that the conclusions do not hang on this
  choice, the file also reports Delta A^F with ``"delete"``, with ``[PAD]``, and with ``[UNK]`` on
  log-probabilities (secondary tables, clearly labelled; the main table stays ``[UNK]`` + logit).
* **Localisation** against the task's ground truth (``Example.evidence``): *top-1* = the most
  relevant token (argmax of the signed relevance) is an evidence token; *GT share* = the share of
  the positive relevance, sum_t max(R_t, 0), that lies on evidence tokens. The plain columns use all
  tokens. The tasks end in a fixed *query suffix* that poses the question (sentiment:
  ``. the review is``; associative recall: ``? <key>``; flip-flop: ``r``) which is never evidence by
  the task definitions, although the model cannot answer without it (the query key selects the
  pair). In a causal LM the explained position's own token often takes the most relevance, so the
  file also reports, as extra and clearly labelled columns, how often the top-1 token is in the
  query suffix, and top-1 / GT share computed over the tokens *before* the suffix only.
* **Methods**, each with the package's defaults: ``random`` (U[0,1) scores, seeded per batch),
  ``gradient_x_input`` (plain gradient x input), ``smoothgrad`` (25 samples, noise 15 % of the
  embedding scale, seeded per batch), ``integrated_gradients`` (50 steps, zero-embedding baseline),
  ``attention_rollout`` and ``mamba_attr`` (G x AttnRoll) on the hidden attention of every mixing
  layer (Mamba's selective SSM, H3's SSM layer, softmax attention; :mod:`mamba_lrp.hidden_attention`),
  ``lrp_ln_rule`` (gradient x input with the RMSNorm rule only) and ``mamba_lrp``; the ablations are
  ``mamba_lrp`` with one rule removed (on H3 there is no selective SSM, so ``mamba_lrp_no_ssm`` equals
  ``mamba_lrp``, and ``_no_silu`` removes the GELU rule). Explanations are computed in left-padded batches with an
  attention mask (exact for our models: padded positions get relevance 0 and change nothing).

Everything is seeded (torch, random; the tasks' generators are pure functions of their seed).
Threads: ``torch.set_num_threads(1)`` by default -- on the shared 2-core CPU, two threads per
process were up to 10x slower under load (oversubscription) for these tiny models.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

MAIN_METHODS = ("random", "gradient_x_input", "smoothgrad", "integrated_gradients", "attention_rollout",
                "mamba_attr", "lrp_ln_rule", "mamba_lrp")
ABLATION_METHODS = ("mamba_lrp_no_silu", "mamba_lrp_no_gate", "mamba_lrp_no_norm", "mamba_lrp_no_ssm", "mamba_lrp")
LABELS = {"random": "Random", "gradient_x_input": "Gradient x Input", "smoothgrad": "SmoothGrad",
          "integrated_gradients": "Integrated Gradients", "attention_rollout": "AttnRoll",
          "mamba_attr": "G x AttnRoll (MambaAttr)", "lrp_ln_rule": "LRP (LN-rule)", "mamba_lrp": "**MambaLRP**",
          "mamba_lrp_no_silu": "MambaLRP without SiLU rule", "mamba_lrp_no_gate": "MambaLRP without gate rule",
          "mamba_lrp_no_norm": "MambaLRP without RMSNorm rule", "mamba_lrp_no_ssm": "MambaLRP without SSM rule"}
#: Length of the fixed suffix that poses the question (never evidence), per task.
QUERY_SUFFIX = {"sentiment": 4, "associative_recall": 2, "flip_flop": 1}
#: Faithfulness settings: (key, replacement name, output). The first is the main one.
SETTINGS = (("unk_logit", "[UNK]", "logit"), ("delete_logit", "delete", "logit"), ("pad_logit", "[PAD]", "logit"),
            ("unk_logprob", "[UNK]", "logprob"))
SEEDED_METHODS = ("random", "smoothgrad")
CONSERVATION_EXAMPLES = 50  # examples of the float64 conservation check
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "faithfulness.md"
LOCALISATION_TASKS_WITH_GOAL = ("associative_recall", "flip_flop")
#: Tasks whose evidence is a (selector, content) pair: the matching key and its value; the last "w" and its bit.
PAIR_TASKS = {"associative_recall": ("matching key", "its value"), "flip_flop": ("last w", "its bit")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="test examples per model (default 200)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown file to write (default {DEFAULT_OUT})")
    parser.add_argument("--models", nargs="+", default=None,
                        help="shipped model names (mamba-sentiment, ...) or task names; default: all shipped")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=50, help="examples per explain() call (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    args = parser.parse_args(argv)
    if args.examples < 2:
        parser.error("--examples must be >= 2 (a standard error needs two)")
    if args.threads < 1 or args.batch_size < 1:
        parser.error("--threads and --batch-size must be >= 1")
    return args


# --------------------------------------------------------------------------- statistics
@dataclass
class Stat:
    mean: float
    se: float
    n: int

    def cell(self, digits: int = 3, bold: bool = False) -> str:
        text = f"{self.mean:.{digits}f} ± {self.se:.{digits}f}"
        return f"**{text}**" if bold else text


def stat(values: list[float]) -> Stat:
    data = torch.tensor(values, dtype=torch.float64)
    n = data.numel()
    return Stat(float(data.mean()), float(data.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan"), n)


def paired(a: list[float], b: list[float]) -> Stat:
    return stat([x - y for x, y in zip(a, b, strict=True)])


# --------------------------------------------------------------------------- per-model run
@dataclass
class ModelResult:
    name: str
    task: str
    n: int
    accuracy: float
    mean_length: float
    n_evidence: float
    label_logit: list[float]  # f(x) of every example
    last_unk_logit: list[float]  # f with only the last token replaced by [UNK]
    suffix_unk_logit: list[float]  # f with the whole query suffix replaced by [UNK]
    exact_conservation: dict[str, list[float]]  # conservation errors of a float64 copy with conv biases zeroed
    faithfulness: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # setting -> method -> values
    top1: dict[str, list[float]] = field(default_factory=dict)
    share: dict[str, list[float]] = field(default_factory=dict)
    top1_query: dict[str, list[float]] = field(default_factory=dict)
    top1_before: dict[str, list[float]] = field(default_factory=dict)
    share_before: dict[str, list[float]] = field(default_factory=dict)
    conservation: dict[str, list[float]] = field(default_factory=dict)
    selector_share: dict[str, list[float]] = field(default_factory=dict)  # pair tasks: the key / the "w"
    content_share: dict[str, list[float]] = field(default_factory=dict)  # pair tasks: the value / the bit
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_model_names(requested: list[str] | None) -> list[str]:
    from mamba_lrp.tasks import shipped_models

    shipped = shipped_models()
    if not requested:
        return shipped
    names = []
    for name in requested:
        candidate = name if name in shipped else f"mamba-{name.strip().lower().replace('_', '-')}"
        if candidate not in shipped:
            raise SystemExit(f"unknown model {name!r}; shipped: {', '.join(shipped)}")
        names.append(candidate)
    return names


def padded_batch(examples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, L), attention mask (B, L) and label ids (B,)."""
    width = max(len(example) for example in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, width - len(example):] = torch.tensor(example.input_ids)
        mask[row, width - len(example):] = 1
    return ids, mask, torch.tensor([example.label_id for example in examples])


def localisation(relevance: torch.Tensor, evidence: tuple[int, ...], suffix: int) -> tuple[float, ...]:
    """(top-1 in evidence, GT share of positive relevance, top-1 in query suffix,
    top-1 in evidence before the suffix, GT share before the suffix) of one example."""
    scores = relevance.double()
    evidence_mask = torch.zeros(scores.numel(), dtype=torch.bool)
    evidence_mask[list(evidence)] = True

    def share(values: torch.Tensor, mask: torch.Tensor) -> float:
        positive = values.clamp_min(0)
        total = float(positive.sum())
        return float(positive[mask].sum()) / total if total > 0 else 0.0

    top = int(scores.argmax())
    before = scores.numel() - suffix
    top_before = int(scores[:before].argmax())
    return (float(evidence_mask[top]), share(scores, evidence_mask), float(top >= before),
            float(evidence_mask[top_before]), share(scores[:before], evidence_mask[:before]))


def pair_shares(relevance: torch.Tensor, evidence: tuple[int, ...]) -> tuple[float, float]:
    """Shares of the positive relevance on the selector (evidence[0]) and the content (evidence[1])."""
    positive = relevance.double().clamp_min(0)
    total = float(positive.sum())
    if total <= 0:
        return 0.0, 0.0
    return float(positive[evidence[0]]) / total, float(positive[evidence[1]]) / total


def exact_conservation(model: torch.nn.Module, examples: list) -> dict[str, list[float]]:
    """Conservation errors on a float64 copy of ``model`` with its conv biases zeroed (REFERENCE.md section 2:
    MambaLRP then conserves exactly; removing a rule breaks it). A check of the rules, not of the shipped model."""
    from mamba_lrp.explain import explain

    copy = deepcopy(model).double()
    with torch.no_grad():
        for name, parameter in copy.named_parameters():
            if "conv" in name and name.endswith("bias"):
                parameter.zero_()
    ids, mask, labels = padded_batch(examples)
    return {method: explain(copy, ids, target=labels, method=method, attention_mask=mask).conservation_error.tolist()
            for method in ("gradient_x_input", "lrp_ln_rule") + ABLATION_METHODS}


def run_model(name: str, n_examples: int, batch_size: int, seed: int) -> ModelResult:
    from mamba_lrp.explain import explain
    from mamba_lrp.faithfulness import evaluate_example
    from mamba_lrp.tasks import load_shipped_model, task_from_info

    model, tokenizer, info = load_shipped_model(name)
    task = task_from_info(info)
    examples = task.examples("test", n_examples, seed=int(info.get("test_seed", 0)))
    suffix = QUERY_SUFFIX[task.name]
    replacements = {"[UNK]": tokenizer.unk_token_id, "[PAD]": tokenizer.pad_token_id, "delete": "delete"}
    correct, label_logits, last_unk_logits, suffix_unk_logits = 0, [], [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = padded_batch(examples[start:start + batch_size])
            rows = torch.arange(len(labels))
            logits = model.head(model.hidden_states(ids, attention_mask=mask)[:, -1])[:, : model.config.vocab_size]
            correct += int((logits.argmax(-1) == labels).sum())
            label_logits += logits[rows, labels].tolist()
            for count, values in ((1, last_unk_logits), (suffix, suffix_unk_logits)):
                perturbed = ids.clone()  # diagnostic: the last token / the whole query suffix replaced by [UNK]
                perturbed[:, -count:] = tokenizer.unk_token_id
                logits = model.head(model.hidden_states(perturbed, attention_mask=mask)[:, -1])
                values += logits[rows, labels].tolist()
    result = ModelResult(name=name, task=task.name, n=len(examples), accuracy=correct / len(examples),
                         mean_length=sum(len(example) for example in examples) / len(examples),
                         n_evidence=sum(len(example.evidence) for example in examples) / len(examples),
                         label_logit=label_logits, last_unk_logit=last_unk_logits,
                         suffix_unk_logit=suffix_unk_logits,
                         exact_conservation=exact_conservation(model, examples[:CONSERVATION_EXAMPLES]))
    print(f"\n=== {name} (task {task.name}): {len(examples)} test examples, mean length {result.mean_length:.1f}, "
          f"accuracy {result.accuracy:.3f}", flush=True)
    methods = list(dict.fromkeys(MAIN_METHODS + ABLATION_METHODS))
    for key, *_ in SETTINGS:
        result.faithfulness[key] = {}
    for method in methods:
        start_time = time.perf_counter()
        explanations = []
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = padded_batch(examples[start:start + batch_size])
            options = {"seed": seed + start} if method in SEEDED_METHODS else {}
            batch = explain(model, ids, target=labels, method=method, attention_mask=mask, **options)
            explanations += [batch[row] for row in range(len(labels))]
        explain_seconds = time.perf_counter() - start_time
        columns = [localisation(explanation.relevance[explanation.attention_mask.bool()], example.evidence, suffix)
                   for explanation, example in zip(explanations, examples, strict=True)]
        result.top1[method], result.share[method], result.top1_query[method], result.top1_before[method], \
            result.share_before[method] = (list(values) for values in zip(*columns, strict=True))
        result.conservation[method] = [float(explanation.conservation_error) for explanation in explanations]
        if task.name in PAIR_TASKS:  # evidence = (selector, content): the key and its value / the last w and its bit
            shares = [pair_shares(explanation.relevance[explanation.attention_mask.bool()], example.evidence)
                      for explanation, example in zip(explanations, examples, strict=True)]
            result.selector_share[method] = [selector for selector, _ in shares]
            result.content_share[method] = [content for _, content in shares]
        for key, replacement, output in SETTINGS:
            result.faithfulness[key][method] = [
                evaluate_example(model, None, explanation, ["delta_af"], replacement=replacements[replacement],
                                 output=output, steps=len(example), batch_size=256, seed=seed + index)["delta_af"]
                for index, (explanation, example) in enumerate(zip(explanations, examples, strict=True))
            ]
        result.seconds[method] = time.perf_counter() - start_time
        main = stat(result.faithfulness[SETTINGS[0][0]][method])
        print(f"  {method:>22}: dAF {main.mean:+8.3f} ± {main.se:.3f}  top-1 {stat(result.top1[method]).mean:.3f}  "
              f"GT share {stat(result.share[method]).mean:.3f}  top-1 excl. query "
              f"{stat(result.top1_before[method]).mean:.3f}  (explain {explain_seconds:.1f} s, "
              f"total {result.seconds[method]:.1f} s)", flush=True)
    return result


# --------------------------------------------------------------------------- report
def machine_description(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"{cpu}, {os.cpu_count()} logical CPUs (shared with other jobs; load average at the end {load}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {threads}, float32, no GPU")


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def column_name(result: ModelResult) -> str:
    return f"{result.name} ({result.task})"


def best_of(result: ModelResult, setting: str, methods: tuple[str, ...]) -> str:
    return max(methods, key=lambda method: stat(result.faithfulness[setting][method]).mean)


def faithfulness_table(results: list[ModelResult], setting: str, methods: tuple[str, ...]) -> list[str]:
    lines = ["| Method | " + " | ".join(column_name(result) for result in results) + " |",
             "|---|" + "---|" * len(results)]
    best = {result.name: best_of(result, setting, methods) for result in results}
    for method in methods:
        cells = [stat(result.faithfulness[setting][method]).cell(bold=best[result.name] == method)
                 for result in results]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def localisation_table(result: ModelResult) -> list[str]:
    suffix = QUERY_SUFFIX[result.task]
    lines = [f"**{column_name(result)}** ({result.n} examples; {result.n_evidence:.2f} evidence tokens of "
             f"{result.mean_length:.1f} on average; query suffix = last {suffix} token{'s' if suffix > 1 else ''})", "",
             "| Method | top-1 in GT | GT share of positive relevance | *extra:* top-1 in query suffix | "
             "*extra:* top-1 in GT, excl. query suffix | *extra:* GT share, excl. query suffix |",
             "|---|---|---|---|---|---|"]
    for method in MAIN_METHODS:
        lines.append(f"| {LABELS[method]} | {stat(result.top1[method]).cell()} | {stat(result.share[method]).cell()} | "
                     f"{stat(result.top1_query[method]).cell()} | {stat(result.top1_before[method]).cell()} | "
                     f"{stat(result.share_before[method]).cell()} |")
    return lines


def ablation_table(results: list[ModelResult]) -> list[str]:
    setting = SETTINGS[0][0]
    lines = ["| Method | " + " | ".join(f"{column_name(result)}: Delta A^F" for result in results) + " | "
             + " | ".join(f"{result.name}: conservation error" for result in results) + " |",
             "|---|" + "---|" * (2 * len(results))]
    for method in ABLATION_METHODS:
        cells = [stat(result.faithfulness[setting][method]).cell() for result in results]
        cells += [stat(result.conservation[method]).cell() for result in results]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", f"Check of the rules: conservation error on a float64 copy of each model with its conv biases zeroed "
              f"(then MambaLRP must conserve exactly and removing any rule should break it; first "
              f"{CONSERVATION_EXAMPLES} examples; not the shipped models, so not comparable to Delta A^F):", "",
              "| Method | " + " | ".join(result.name for result in results) + " |", "|---|" + "---|" * len(results)]
    for method in ("gradient_x_input", "lrp_ln_rule") + ABLATION_METHODS:
        lines.append(f"| {LABELS[method]} | "
                     + " | ".join(f"{stat(result.exact_conservation[method]).mean:.2e}" for result in results) + " |")
    lines += ["", "Drop of Delta A^F when a rule is removed (MambaLRP minus ablation; paired over the same examples, "
              "mean ± standard error; larger = the rule matters more):", "",
              "| Rule removed | " + " | ".join(column_name(result) for result in results) + " |",
              "|---|" + "---|" * len(results)]
    for method in ABLATION_METHODS[:-1]:
        cells = [paired(result.faithfulness[setting]["mamba_lrp"], result.faithfulness[setting][method]).cell()
                 for result in results]
        lines.append(f"| {method.removeprefix('mamba_lrp_no_')} | " + " | ".join(cells) + " |")
    most = []
    for result in results:
        drops = {method.removeprefix("mamba_lrp_no_"): paired(result.faithfulness[setting]["mamba_lrp"],
                                                                result.faithfulness[setting][method]).mean
                 for method in ABLATION_METHODS[:-1]}
        rule = max(drops, key=drops.get)
        most.append(f"{result.name}: **{rule}** (drop {drops[rule]:+.3f})")
    lines += ["", "The rule whose removal costs the most: " + "; ".join(most) + "."]
    return lines


def goal_check(results: list[ModelResult]) -> list[str]:
    setting = SETTINGS[0][0]
    lines = []
    for result in results:
        others = tuple(method for method in MAIN_METHODS if method != "mamba_lrp")
        rival = best_of(result, setting, others)
        difference = paired(result.faithfulness[setting]["mamba_lrp"], result.faithfulness[setting][rival])
        best = difference.mean > 0
        significant = abs(difference.mean) > 2 * difference.se
        verdict = ("**yes**" if best else "**NO**") + (
            "" if significant else " (the difference is within 2 standard errors: not resolved)")
        lines.append(f"- {column_name(result)}: MambaLRP has the best Delta A^F: {verdict}. MambaLRP minus the best "
                     f"other method ({LABELS[rival]}): {difference.cell()} (paired).")
        if result.task in LOCALISATION_TASKS_WITH_GOAL:
            top1 = stat(result.top1["mamba_lrp"])
            before = stat(result.top1_before["mamba_lrp"])
            query = stat(result.top1_query["mamba_lrp"])
            lines.append(f"- {column_name(result)}: MambaLRP top-1 localisation >= 0.9: "
                         f"{'**yes**' if top1.mean >= 0.9 else '**NO**'} (top-1 in GT {top1.cell()}; the top-1 token "
                         f"is in the query suffix in {query.mean:.3f} of the examples; top-1 in GT excluding the "
                         f"query suffix {before.cell()}).")
    return lines


def sensitivity_lines(results: list[ModelResult]) -> list[str]:
    lines = []
    for key, replacement, output in SETTINGS[1:]:
        lines += ["", f"**Replacement {replacement}, output {output}** (best per column in bold):", ""]
        lines += faithfulness_table(results, key, MAIN_METHODS + ABLATION_METHODS[:-1])
    lines += ["", "Is MambaLRP best among the Table-1 methods in each setting? (best other method in parentheses)", "",
              "| Setting | " + " | ".join(column_name(result) for result in results) + " |",
              "|---|" + "---|" * len(results)]
    for key, replacement, output in SETTINGS:
        cells = []
        for result in results:
            rival = best_of(result, key, tuple(method for method in MAIN_METHODS if method != "mamba_lrp"))
            difference = paired(result.faithfulness[key]["mamba_lrp"], result.faithfulness[key][rival])
            cells.append(f"{'yes' if difference.mean > 0 else 'no'} ({rival}; diff {difference.cell()})")
        lines.append(f"| {replacement}, {output} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: list[ModelResult], args: argparse.Namespace, seconds: float, command: str) -> str:
    setting_key, replacement, output = SETTINGS[0]
    n_text = ", ".join(f"{result.name}: {result.n}" for result in results)
    lines = [
        "# Faithfulness and ground-truth localisation of MambaLRP and the baselines (issue 6)",
        "",
        "Generated by `benchmarks/faithfulness_table.py` (do not edit by hand; its docstring explains every choice).",
        "",
        f"- Command: `{command}`",
        f"- Wall time: **{seconds / 60:.1f} min** ({seconds:.0f} s), all models, all methods and settings.",
        f"- Machine: {machine_description(args.threads)}.",
        f"- Date (UTC): {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')}; code revision {git_revision()}.",
        f"- Examples: the first N test-split examples of each task (seed = the checkpoint's `test_seed`); "
        f"N = {n_text}. Mean ± standard error over examples.",
        "- Models (tiny 2-layer Mamba LMs, d_model 64) and their accuracy on these examples: "
        + ", ".join(f"{result.name} {result.accuracy:.3f}" for result in results) + ".",
        "- **Explained output**: the logit of the correct label token at the last position (the position that "
        "predicts the answer), for every method and every metric.",
        f"- **Delta A^F** = A^F(LeRF) - A^F(MoRF) on deletion curves of that logit; A^F includes k = 0; one token per "
        f"step (all n tokens, the last one included). **Replacement: the tokenizer's `{replacement}` token id; "
        f"output: {output}.** Why not `zero_embedding` (it sets the explained Mamba logit to exactly 0 when the "
        "last token is flipped) nor `delete` (it moves the explained position): see the script's docstring. "
        "Other replacements/outputs are in the sensitivity section. Higher is better; random ~ 0.",
        "",
        "## Table 1: Delta A^F (higher is better; best per column in bold)",
        "",
    ]
    lines += faithfulness_table(results, setting_key, MAIN_METHODS)
    lines += ["", "## Goal check (issue 6)", ""]
    lines += goal_check(results)
    lines += ["", "## Ground-truth localisation", "",
              "*top-1 in GT*: the most relevant token (argmax of the signed relevance, over all tokens) is a "
              "ground-truth evidence token. *GT share*: share of the positive relevance on evidence tokens. The "
              "*extra* columns (not the goal metric) locate the top-1 token in the query suffix, and recompute both "
              "scores over the tokens before the query suffix only (the suffix is the question itself: "
              "`. the review is`, `? <key>`, `r`; never evidence by the task definitions). The random row gives "
              "the chance level.", ""]
    for result in results:
        lines += localisation_table(result) + [""]
    pair_results = [result for result in results if result.task in PAIR_TASKS]
    if pair_results:
        lines += ["### Where the ground-truth relevance goes in the pair tasks (diagnostic)", "",
                  "Share of the positive relevance on the *selector* evidence token (it decides *which* value or bit "
                  "is read: it acts through the input-dependent selection, i.e. B, C and delta of the selective "
                  "SSM) and on the *content* token (the value or bit that is read out), all tokens counted.", "",
                  "| Method | " + " | ".join(f"{result.name}: {PAIR_TASKS[result.task][0]} | "
                                            f"{result.name}: {PAIR_TASKS[result.task][1]}" for result in pair_results)
                  + " |", "|---|" + "---|" * (2 * len(pair_results))]
        for method in dict.fromkeys(MAIN_METHODS + ABLATION_METHODS):
            cells = [f"{stat(result.selector_share[method]).cell()} | {stat(result.content_share[method]).cell()}"
                     for result in pair_results]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Ablation: MambaLRP with one rule removed (Delta A^F, main setting)", "",
              "Conservation error = |sum_t R_t - f| / |f| (not exactly 0 even for MambaLRP: the conv biases of the "
              "shipped models absorb relevance).", ""]
    lines += ablation_table(results)
    lines += ["", "## Sensitivity: other replacements and outputs (secondary; the main table is above)"]
    lines += sensitivity_lines(results)
    lines += ["", "## Interpretation", ""]
    lines += interpretation(results)
    lines += ["", "## Per-model time (s, explain + localisation + all four faithfulness settings)", "",
              "| Method | " + " | ".join(result.name for result in results) + " |",
              "|---|" + "---|" * len(results)]
    for method in dict.fromkeys(MAIN_METHODS + ABLATION_METHODS):
        lines.append(f"| {method} | " + " | ".join(f"{result.seconds[method]:.1f}" for result in results) + " |")
    return "\n".join(lines) + "\n"


def interpretation(results: list[ModelResult]) -> list[str]:
    """The reading of the tables: every number is taken from this run; the reasoning is ours."""
    setting = SETTINGS[0][0]
    by_task = {result.task: result for result in results}

    def faith(result: ModelResult, method: str, key: str = setting) -> list[float]:
        return result.faithfulness[key][method]

    def mean(values: list[float]) -> float:
        return stat(values).mean

    lines = ["Per row:", ""]
    for result in results:
        others = tuple(method for method in MAIN_METHODS if method != "mamba_lrp")
        rival = best_of(result, setting, others)
        ranking = sorted(MAIN_METHODS, key=lambda method: -mean(faith(result, method)))
        above = [LABELS[method] for method in ranking[: ranking.index("mamba_lrp")]]
        lines.append(
            f"- **{column_name(result)}**: MambaLRP ranks {ranking.index('mamba_lrp') + 1} of {len(MAIN_METHODS)} by "
            f"Delta A^F" + (f" (above it: {', '.join(above)})" if above else "") + f"; MambaLRP minus the best other "
            f"method ({LABELS[rival]}) = {paired(faith(result, 'mamba_lrp'), faith(result, rival)).cell()}, paired. "
            f"Its top-1 token is in the query suffix in {mean(result.top1_query['mamba_lrp']):.0%} of the examples; "
            f"before the suffix its top-1 is ground truth in {mean(result.top1_before['mamba_lrp']):.0%}.")
    lines += ["", "Why, as far as we can tell:", ""]
    recall = by_task.get("associative_recall")
    if recall is not None:
        lines.append(
            "- **Associative recall: the SSM rule hides the matching key.** The query finds "
            "its pair through the input-dependent *selection* of the scan: C at the query position against B (and "
            "delta) at the pair, which the short causal conv mixes from the key and value tokens. MambaLRP's SSM "
            "rule treats dA, dB and C as constants (as CP-LRP detaches attention weights), so relevance reaches the "
            "matching key only through its small part of the scanned content u: the key gets "
            f"{mean(recall.selector_share['mamba_lrp']):.1%} of the positive relevance under MambaLRP, against "
            f"{mean(recall.selector_share['mamba_lrp_no_ssm']):.1%} without the SSM rule and "
            f"{mean(recall.selector_share['lrp_ln_rule']):.1%} under LRP (LN-rule) (diagnostic table). Replacing the "
            "key, however, breaks the match and the logit falls, so a ranking that puts the key low loses Delta A^F: "
            "removing the SSM rule alone changes Delta A^F by "
            f"{paired(faith(recall, 'mamba_lrp_no_ssm'), faith(recall, 'mamba_lrp')).cell()} (paired; MambaLRP "
            f"without SSM rule {stat(faith(recall, 'mamba_lrp_no_ssm')).cell()}, LRP (LN-rule) "
            f"{stat(faith(recall, 'lrp_ln_rule')).cell()}), at the price of conservation (relative error "
            f"{mean(recall.conservation['mamba_lrp_no_ssm']):.2f} instead of "
            f"{mean(recall.conservation['mamba_lrp']):.2f}). So on a model whose answer is *routed* by the selection, "
            "the SSM rule's choice (relevance flows through the content u only) costs deletion faithfulness; this is "
            "the design of the rule (REFERENCE.md section 2), not, as far as we can tell, an implementation error: "
            "with the conv biases zeroed (float64) MambaLRP conserves to "
            f"{max(stat(result.exact_conservation['mamba_lrp']).mean for result in results):.0e} and removing the "
            "SSM rule breaks it (rule check under the ablation table).")
    sentiment = by_task.get("sentiment")
    if sentiment is not None:
        better = [f"{LABELS[method]} ({paired(faith(sentiment, method), faith(sentiment, 'mamba_lrp')).cell()})"
                  for method in dict.fromkeys(MAIN_METHODS + ABLATION_METHODS)
                  if method != "mamba_lrp" and mean(faith(sentiment, method)) > mean(faith(sentiment, "mamba_lrp"))]
        lines.append(
            "- **Sentiment.** Methods with a higher Delta A^F than MambaLRP (paired difference to MambaLRP): "
            + (", ".join(better) or "none") + ". Where these include MambaLRP without its SSM or SiLU rule, the "
            "rule itself costs faithfulness here. Our guess, not tested further: the polarity words and negators "
            "also act through the selection and through the SiLU non-linearities (a negator flips the next "
            "adjective: a multiplicative interaction), which the identity and SSM rules do not credit to them; IG "
            "follows the true non-linear path from its zero baseline.")
    suffix_rows = [result for result in results if result.task in QUERY_SUFFIX]
    if suffix_rows:
        drops = "; ".join(f"{result.task}: {mean(result.label_logit):.2f} -> {mean(result.last_unk_logit):.2f} "
                          f"(whole suffix: {mean(result.suffix_unk_logit):.2f})" for result in suffix_rows)
        needed = [result for result in suffix_rows
                  if mean(result.label_logit) - mean(result.last_unk_logit) > 0.5 * abs(mean(result.label_logit))]
        spare = [result for result in suffix_rows if result not in needed]
        text = ("- **Plain top-1 localisation and the query suffix.** MambaLRP's top-1 token is in the query suffix "
                "in " + ", ".join(f"{mean(result.top1_query['mamba_lrp']):.0%} ({result.task})"
                                  for result in suffix_rows)
                + " of the examples. Is the suffix really that important to the model? Replacing only the last "
                f"token by [UNK] moves the mean label logit as follows: {drops}.")
        if needed:
            text += (" On " + ", ".join(result.task for result in needed) + " the last token (the query key; the "
                     "read instruction `r`) is an input without which the model does not give the answer: a "
                     "faithful explanation of the *raw* logit must rank it high, and the deletion curves agree. The "
                     "task's ground truth lists only the tokens that decide *which* answer is right (a constant `r` "
                     "cannot), so the plain top-1 column counts these explanations as misses although they are "
                     "faithful; this is a mismatch between the raw-logit explanation and the localisation metric.")
        if spare:
            text += (" On " + ", ".join(result.task for result in spare) + ", however, the last token barely "
                     "matters to the model, yet MambaLRP gives it the top relevance: there the relevance on the "
                     "suffix is not supported by the deletion test, and it is probably part of why MambaLRP loses "
                     "Delta A^F on that row (MoRF spends its first steps on tokens that do not move the logit). A "
                     "possible cause: conservation forces the whole logit level (not only its dependence on the "
                     "evidence) onto some tokens, and the rules hand the part built at the last position to the "
                     "tokens in the conv window of that position, i.e. the prompt (a guess; not tested).")
        text += (" Before the suffix, MambaLRP's top-1 token is ground truth in "
                 + ", ".join(f"{mean(result.top1_before['mamba_lrp']):.0%} ({result.task})" for result in suffix_rows)
                 + ". A contrastive output (the label logit minus the other answers' logits) would cancel the "
                 "shared level; the issue fixes the explained output to the label logit, so it is not used here.")
        lines.append(text)
    if results:
        norm_drops = ", ".join(
            f"{paired(faith(result, 'mamba_lrp'), faith(result, 'mamba_lrp_no_norm')).mean:+.2f} ({result.task})"
            for result in results)
        top_rules = {max(ABLATION_METHODS[:-1], key=lambda method: paired(
            faith(result, "mamba_lrp"), faith(result, method)).mean) for result in results}
        heading = ("the RMSNorm rule matters most" if top_rules == {"mamba_lrp_no_norm"}
                   else "the RMSNorm rule matters a lot")
        lines.append(
            f"- **Ablation: {heading}** (Delta A^F drop when it is removed: " + norm_drops + "). "
            "RMSNorm is invariant to the scale of its input, so its gradient is orthogonal to its input and gradient "
            "x input through it sums to zero at every position (Euler's theorem for degree-0 homogeneous functions): "
            "without the rule the relevance sums to ~0 (conservation error "
            + ", ".join(f"{mean(result.conservation['mamba_lrp_no_norm']):.2f}" for result in results)
            + ") and is mostly noise; plain Gradient x Input and SmoothGrad fail for the same reason. The other "
            "drops (negative = removing the rule *raises* Delta A^F): "
            + "; ".join(f"{result.task}: " + ", ".join(
                f"{method.removeprefix('mamba_lrp_no_')} "
                f"{paired(faith(result, 'mamba_lrp'), faith(result, method)).mean:+.2f}"
                for method in ABLATION_METHODS[:-1] if method != "mamba_lrp_no_norm") for result in results)
            + ". So on these models the SiLU, gate and SSM rules buy conservation (rule check), not deletion "
            "faithfulness.")
    verdicts = []
    for result in results:
        wins = []
        for key, replacement, output in SETTINGS:
            rival = best_of(result, key, tuple(method for method in MAIN_METHODS if method != "mamba_lrp"))
            difference = paired(faith(result, "mamba_lrp", key), faith(result, rival, key))
            if difference.mean > 0:
                wins.append(f"{replacement}/{output}" + ("" if difference.mean > 2 * difference.se else " (< 2 SE)"))
        verdicts.append(f"{result.task}: best in {len(wins)} of {len(SETTINGS)} settings"
                        + (f" ({', '.join(wins)})" if wins else ""))
    lines.append("- **Sensitivity.** MambaLRP has the best Delta A^F among the Table-1 methods in: "
                 + "; ".join(verdicts) + " (last sensitivity table).")
    lines += ["", "Doubts:", "",
              "- The paper's numbers are for pretrained 130M/1.4B Mamba models on natural language; ours are tiny "
              "2-layer models on synthetic tasks whose answers are routed by the selection, where MambaLRP's SSM rule "
              "is at its weakest. We do not claim that the ranking transfers either way.",
              "- The shipped models have conv biases, so no method is exactly conservative (MambaLRP's mean relative "
              "error is " + ", ".join(f"{stat(result.conservation['mamba_lrp']).mean:.2f} ({result.task})"
                                      for result in results) + "; see the ablation table).",
              "- [UNK] never occurs in training: every replacement is out of distribution; the sensitivity section "
              "shows how much the numbers move with the replacement.",
              f"- {', '.join(sorted({str(result.n) for result in results}))} examples per cell: differences below "
              "about two paired standard errors are not resolved."]
    return lines


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # gradient_x_input and the ablations leave nonlinear layers without a rule on purpose: their warning is expected
    warnings.filterwarnings("ignore", message="composite leaves .* without a rule")
    names = resolve_model_names(args.models)
    command = ".venv/bin/python benchmarks/faithfulness_table.py " + " ".join(
        shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv))
    print(f"faithfulness table: models {', '.join(names)}; {args.examples} examples each; "
          f"{args.threads} torch thread(s)", flush=True)
    results = [run_model(name, args.examples, args.batch_size, args.seed) for name in names]
    seconds = time.perf_counter() - start
    report = write_report(results, args, seconds, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"\nwrote {args.out} in {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
