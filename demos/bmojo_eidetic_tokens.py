"""B'MOJO's eidetic tokens on associative recall: what the innovation test stores, what attention
reads from it, and where MambaLRP puts the relevance for the answer.

    python demos/bmojo_eidetic_tokens.py                       # ~100 test examples, a few seconds
    python demos/bmojo_eidetic_tokens.py --examples 20 --show 3 --out /tmp/bmojo_eidetic

**What it shows.** The shipped ``bmojo-associative-recall`` model (2 layers, chunks of ``window =
8`` tokens, 2 eidetic tokens per chunk, one memory token per chunk end) reads prompts such as::

    d 8 m 0 f 3 o 5 l 5 k 5 j 9 p 5 ? m      -> 0        (ground truth: the pair "m 0")

Only test examples with at least 3 chunks (>= 17 tokens: 8 pairs) are used, so that the query
(the last position, in chunk 2) has pairs *outside* its sliding window (chunks 1 and 2): chunk 0's
tokens reach it only through the SSM's fading memory, the memory token (the post-SSM state at the
end of chunk 0, position 7) or as **eidetic tokens**: the 2 positions per chunk and layer whose
innovation score ``1 - cos(x_t, y_{t-1})`` (how badly the SSM predicted the token) was highest,
kept verbatim as attention keys and values (REFERENCE.md section 5; ``ssm_models/bmojo.py``).
For each example the script takes ``model.inspect(ids)`` (selections, memory positions, attention
mass of the query on window / memory / eidetic keys, per layer) and ``explain(model, ids,
target=label)`` (MambaLRP relevance of every token for the true answer's logit), and prints:

* the eidetic tokens selected per layer and the attention mass by source at the query;
* where the relevance lands: the share of |relevance| on the eidetic tokens visible to the query,
  on the memory position, on the other out-of-window tokens and on the window, and per token
  (eidetic vs not-selected tokens of the same chunk, the fair comparison);
* whether the ground-truth key/value (``Example.evidence``) were selected when they lie outside
  the window, against chance, with the model's accuracy in both cases.

``OUT/bmojo_eidetic_tokens.html`` has the summary and one heatmap row per shown example (red for,
blue against the answer; ground truth underlined); each token is annotated ``{E0}`` / ``{E1}`` when
layer 0 / 1 selected it as eidetic and the query sees it, ``{M}`` at the memory position, and
``|`` marks the start of the query's window.

**How to read it.** If the innovation test stores what matters, the ground truth outside the
window is selected more often than chance, and relevance per eidetic token exceeds that per
non-selected token of the same chunk. Relevance is signed: MambaLRP's relevance on a token
accounts for every path from it (the SSM included), not only the attention to its eidetic copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
from pathlib import Path

import torch

from mamba_lrp import explain, load_default_model, viz
from mamba_lrp.tasks import Example, Task, task_from_info

SOURCES = ("window", "memory", "eidetic")


def long_examples(task: Task, n: int, min_length: int, seed: int = 0) -> list[Example]:
    """The first ``n`` test examples (seed ``seed``) with at least ``min_length`` tokens."""
    found: list[Example] = []
    for example in task.stream("test", seed=seed):
        if len(example) >= min_length:
            found.append(example)
            if len(found) == n:
                return found
    raise AssertionError("unreachable: the stream is endless")


def share(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over rows of ``sum(|values| on mask) / sum(|values|)`` for (B, L) tensors."""
    magnitude = values.abs()
    return float(((magnitude * mask).sum(-1) / magnitude.sum(-1).clamp_min(1e-300)).mean())


def per_token(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``|values| / sum_row |values|`` over the positions in ``mask`` (nan for none)."""
    normalised = values.abs() / values.abs().sum(-1, keepdim=True).clamp_min(1e-300)
    return float(normalised[mask].mean()) if bool(mask.any()) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/bmojo_eidetic_tokens",
                        help="folder for the HTML page (default: demo_out/bmojo_eidetic_tokens)")
    parser.add_argument("--examples", type=int, default=100, help="test examples with >= 3 chunks (default: 100)")
    parser.add_argument("--show", type=int, default=8, help="examples shown as heatmaps (default: 8)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, info = load_default_model("associative_recall", "bmojo")
    task = task_from_info(info)
    window = model.config.window
    examples = long_examples(task, arguments.examples, 2 * window + 1)
    length = max(len(example) for example in examples)
    if any(len(example) != length for example in examples):  # all 18 tokens for the shipped task
        raise SystemExit(f"expected equally long examples, got lengths {sorted({len(e) for e in examples})}")
    ids = torch.tensor([example.input_ids for example in examples])
    labels = torch.tensor([example.label_id for example in examples])
    batch, query = len(examples), length - 1
    chunk = query // window  # the query's chunk; its window starts at the previous chunk
    window_start = (chunk - 1) * window

    with torch.no_grad():
        seen = model.inspect(ids)
    correct = seen.logits[:, query].argmax(-1) == labels
    explanation = explain(model, ids, target=labels, method="mamba_lrp")
    relevance = explanation.relevance.double()
    n_layer = seen.selected.shape[0]

    lines = [f"B'MOJO on associative recall: {batch} test examples of {length} tokens ({chunk + 1} chunks of "
             f"{window}); the query (position {query}) sees the window {window_start}..{query}; model accuracy on "
             f"them {float(correct.float().mean()):.1%}"]
    # which tokens the query sees as eidetic / memory, per layer and in any layer
    eidetic = torch.zeros(n_layer, batch, length, dtype=torch.bool)
    memory = torch.zeros(n_layer, batch, length, dtype=torch.bool)
    for layer in range(n_layer):
        for row in range(batch):
            for position in seen.eidetic[layer, row, chunk].tolist():
                if position >= 0:
                    eidetic[layer, row, position] = True
            for position in seen.memory[layer, row, chunk].tolist():
                if position >= 0:
                    memory[layer, row, position] = True
    any_eidetic, any_memory = eidetic.any(0), memory.any(0)
    out_of_window = torch.zeros(batch, length, dtype=torch.bool)
    out_of_window[:, :window_start] = True
    others = out_of_window & ~any_eidetic & ~any_memory
    in_window = ~out_of_window

    lines.append("selected eidetic tokens (positions per chunk, by innovation score), first example:")
    for layer in range(n_layer):
        chunks = "; ".join(f"chunk {index}: {[p for p in picks if p >= 0]}"
                           for index, picks in enumerate(seen.selected[layer, 0].tolist()))
        visible = [p for p in seen.eidetic[layer, 0, chunk].tolist() if p >= 0]
        tokens = [examples[0].tokens[p] for p in visible]
        lines.append(f"    layer {layer}: {chunks}; the query sees {visible} = {tokens}")
    keys = [query - window_start + 1, int(any_memory[0].sum()), int(eidetic[0, 0].sum())]
    uniform = " / ".join(f"{count / sum(keys):.3f}" for count in keys)
    lines.append(f"attention mass of the query by source ({' / '.join(SOURCES)}), mean over examples "
                 f"(uniform attention over its {' / '.join(map(str, keys))} keys would give {uniform}):")
    for layer in range(n_layer):
        mass = seen.attention_mass[layer, :, query].mean(0).tolist()
        lines.append(f"    layer {layer}: " + " / ".join(f"{name} {value:.3f}" for name, value in zip(SOURCES, mass,
                                                                                                       strict=True)))

    # relevance by group
    evidence = torch.stack([example.evidence_mask() for example in examples])
    lines.append(f"MambaLRP relevance for the true answer (share of |relevance|, mean over {batch} examples; "
                 f"conservation error {float(explanation.conservation_error.mean()):.3f}):")
    groups = {"eidetic tokens seen by the query (any layer)": any_eidetic, "memory position": any_memory,
              "other out-of-window tokens": others, "window (query included)": in_window,
              "ground-truth key + value": evidence}
    for name, mask in groups.items():
        lines.append(f"    {name:<46s} {share(relevance, mask):6.1%} of |R| "
                     f"({float(mask.sum(-1).double().mean()):.1f} tokens; per token {per_token(relevance, mask):.1%})")
    eidetic_per_token = per_token(relevance, any_eidetic)
    other_per_token = per_token(relevance, others)
    lines.append(f"    per out-of-window token: eidetic {eidetic_per_token:.1%} vs not selected {other_per_token:.1%} "
                 f"of |R| (ratio {eidetic_per_token / other_per_token:.2f})")

    # were the ground-truth tokens selected?
    outside = (evidence & out_of_window).any(-1)  # the pair lies before the window
    hit = (evidence & any_eidetic).any(-1)
    both = ((evidence & out_of_window) & ~(evidence & any_eidetic)).sum(-1) == 0
    n_outside = int(outside.sum())
    hit_rate = chance = float("nan")
    if n_outside:
        hit_rate = float(hit[outside].double().mean())
        both_rate = float(both[outside].double().mean())
        by_layer = " ".join(f"layer {layer} {float((evidence & eidetic[layer]).any(-1)[outside].double().mean()):.0%}"
                            for layer in range(n_layer))
        # chance: each layer picks as many positions as it did, uniformly among the out-of-window
        # positions other than the memory position (1000 seeded draws per example)
        generator = torch.Generator().manual_seed(0)
        draws = 1000
        chance_hits = []
        for row in torch.nonzero(outside).flatten().tolist():
            candidates = torch.nonzero(out_of_window[row] & ~any_memory[row]).flatten()
            picked = torch.zeros(draws, length, dtype=torch.bool)
            for layer in range(n_layer):
                count = int(eidetic[layer, row].sum())
                order = torch.rand(draws, len(candidates), generator=generator).argsort(-1)[:, :count]
                picked[torch.arange(draws)[:, None], candidates[order]] = True
            chance_hits.append(float((picked & evidence[row]).any(-1).double().mean()))
        chance = sum(chance_hits) / len(chance_hits)
        lines.append(f"ground truth outside the window in {n_outside} of {batch} examples: the key or the value is "
                     f"an eidetic token in {hit_rate:.0%} ({by_layer}; random selection: {chance:.0%}), both in "
                     f"{both_rate:.0%}")
        for name, mask in (("selected", outside & hit), ("not selected", outside & ~hit)):
            if bool(mask.any()):
                lines.append(f"    relevance on the ground truth when outside the window and {name}: "
                             f"{share(relevance[mask], evidence[mask]):.1%} of |R| ({int(mask.sum())} examples)")

        def accuracy(mask: torch.Tensor) -> str:
            return f"{float(correct[mask].double().mean()):.0%} of {int(mask.sum())}" if bool(mask.any()) else "n/a"

        lines.append(f"    accuracy when the evidence is outside the window: selected {accuracy(outside & hit)}, "
                     f"not selected {accuracy(outside & ~hit)}; inside the window {accuracy(~outside)}")
    summary_ratio = f"{eidetic_per_token / other_per_token:.2f}"
    selection = f"; ground truth selected {hit_rate:.0%} vs {chance:.0%} by chance" if n_outside else ""
    lines.append(f"summary: eidetic tokens hold {share(relevance, any_eidetic):.1%} of |relevance| on "
                 f"{float(any_eidetic.sum(-1).double().mean()):.1f} tokens; per token {summary_ratio} x the "
                 f"not-selected out-of-window tokens{selection}")
    for line in lines:
        print(line)

    # the page: summary, then heatmaps with eidetic / memory / window marks
    rows = {}
    for row in range(min(arguments.show, batch)):
        example = examples[row]
        tokens = []
        for position, token in enumerate(example.tokens):
            marks = [f"E{layer}" for layer in range(n_layer) if bool(eidetic[layer, row, position])]
            marks += ["M"] if bool(any_memory[row, position]) else []
            text = ("| " if position == window_start else "") + token
            tokens.append(text + ("{" + ",".join(marks) + "}" if marks else ""))
        verdict = "right" if bool(correct[row]) else "wrong"
        name = f"example {row}: answer {example.label} ({verdict})"
        rows[name] = dataclasses.replace(explanation[row], tokens=tokens)
    # every example has the same length, so one evidence set per row would differ: one block per example
    blocks = [viz.html_comparison({name: item}, evidence=examples[index].evidence)
              for index, (name, item) in enumerate(rows.items())]
    legend = ("<p>{E0}/{E1}: selected as eidetic by layer 0/1 and visible to the query; {M}: memory position; "
              "| : start of the query's window; underlined: ground-truth key and value. Each row on its own "
              "colour scale.</p>")
    body = "<h2>B'MOJO eidetic tokens</h2><pre>" + html.escape("\n".join(lines)) + "</pre>" + legend + "".join(blocks)
    path = viz.write_text_atomic(out / "bmojo_eidetic_tokens.html",
                                 viz.html_document(body, title="B'MOJO eidetic tokens"), force=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
