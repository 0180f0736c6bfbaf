"""H3's sample weighting on in-context linear regression, seen by MambaLRP and in the SSM's own filter.

    python demos/h3_icl_sample_weighting.py                     # trains ~20 s on one CPU thread
    python demos/h3_icl_sample_weighting.py --steps 100 --examples 32 --out /tmp/h3_icl

**What it shows.** Li et al. (REFERENCE.md section 4) read one H3 layer on in-context linear
regression as one step of preconditioned gradient descent, in which the diagonal SSM's
convolution filter ``K(l)`` *weights the in-context samples* by their distance from the query.
This script trains a tiny one-layer H3 (seeded, a few hundred steps inside the script) on the
built-in ``icl_regression`` task with a fixed number of in-context pairs::

    x 2 y 5 ; x -1 y -1 ; x 0 y 1 ; x 3 y      -> 7          (5 tokens per pair, then "x x_q y")

and then shows three things, printed and plotted into ``OUT/h3_icl_sample_weighting.png``:

(a) **Relevance per in-context example** (MambaLRP): the relevance of the four tokens
    ``x x_i y y_i`` of each example for the model's prediction at the query, as a share of the
    absolute relevance on all in-context pairs (a distribution over the pairs; uniform = 1/n),
    averaged over test prompts, against the example's *recency* (1 = the pair just before the
    query). This is the sample weighting the model actually applies.
(b) **The SSM kernel** ``K_h(l) = 2 Re sum_m C_m dB_m dA_m^l`` of every channel ``h`` of the H3
    layer(s), computed here from the parameters (``mixer.kernel.kernel.*``, the discretisation of
    ``ssm_models/h3.py``) and checked against the layer's impulse response. The mean ``|K_h(l)|``
    at the lags ``l = 5k - 1`` (query to the ``y_i`` value of the k-th most recent pair) is the
    weight the filter can give to that sample: the inductive bias behind (a); normalised over the
    pairs it is drawn into panel (a) as a dashed line.
(c) **Gradient x input** on the same prompts and targets, aggregated the same way, against (a).

**How to read it.** In panel (a) a flat curve at 1/n means every in-context example counts alike
(what least squares does); a curve that falls with recency means the model leans on the latest
pairs. Relevance is taken for the model's predicted token (right or wrong).
Panel (b) has one thin line per SSM channel and their mean ``|K|``; dots mark the lags of the
examples' ``y_i`` tokens. The printed correlations compare (a) with (b) and (a) with (c).

**Caveats, measured and printed, not hidden.** The model is tiny and trained for seconds: it learns
to *copy* the ``y`` of an in-context pair whose ``x`` equals the query (an associative-recall
shortcut available in most prompts, since ``x`` takes only 7 values) far better than it learns the
regression itself, so the accuracy is reported separately for prompts whose query ``x`` occurs in
the context ("seen") and for the others ("unseen", where only regression helps), and the relevance
profile for both groups. For seen prompts relevance concentrates on the matching pair wherever it
is, which flattens the recency profile; the unseen group is the cleaner view of sample weighting.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from mamba_lrp import explain, get_task
from mamba_lrp.tasks import Example
from mamba_lrp.training import TrainingConfig, build_model, train

TOKENS_PER_PAIR = 5  # "x x_i y y_i ;"


def pair_slices(n_pairs: int) -> list[slice]:
    """Token positions of the in-context pairs ``x x_i y y_i``, ordered by recency (index 0 = the
    pair just before the query). A prompt with ``n`` pairs has ``5 n + 3`` tokens."""
    return [slice(TOKENS_PER_PAIR * (n_pairs - k), TOKENS_PER_PAIR * (n_pairs - k) + 4) for k in range(1, n_pairs + 1)]


def query_seen(example: Example) -> bool:
    """Whether the query ``x`` also occurs as an in-context ``x`` (the answer can then be copied)."""
    xs = example.tokens[1::TOKENS_PER_PAIR]  # x_i of every pair, then x_q last
    return xs[-1] in xs[:-1]


def ssm_kernels(model: torch.nn.Module, length: int) -> dict[int, torch.Tensor]:
    """``{layer: K (H, length)}`` of each H3 layer's diagonal SSM, in float64, from the parameters
    (checkpoint names ``backbone.layers.{i}.mixer.kernel.kernel.*``): S4D-Lin with
    ``A = -exp(inv_A_real) + i A_imag``, ``dt = exp(log_dt)``, bilinear or ZOH discretisation,
    ``K_l = 2 Re sum_m C_m dB_m dA_m^l``."""
    state = model.state_dict()
    kernels = {}
    for index in range(model.config.n_layer):
        prefix = f"backbone.layers.{index}.mixer.kernel.kernel."
        if prefix + "log_dt" not in state:  # an attention layer
            continue
        dt = state[prefix + "log_dt"].double().exp()[:, None]  # (H, 1)
        A = torch.complex(-state[prefix + "inv_A_real"].double().exp(), state[prefix + "A_imag"].double())
        B = torch.view_as_complex(state[prefix + "B"].double().contiguous())
        C = torch.view_as_complex(state[prefix + "C"][0].double().contiguous())
        if model.config.discretization == "bilinear":
            dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), B * dt / (1 - dt * A / 2)
        else:  # "zoh"
            dA, dB = torch.exp(dt * A), B * torch.expm1(dt * A) / A
        lags = torch.arange(length, dtype=torch.float64)
        powers = dA[..., None] ** lags  # (H, M, length)
        kernels[index] = 2 * (C[..., None] * dB[..., None] * powers).sum(1).real
    return kernels


@torch.no_grad()
def impulse_response(model: torch.nn.Module, layer: int, length: int) -> torch.Tensor:
    """(H, length) the layer's diagonal SSM applied to a unit impulse with its skip ``D`` set to 0:
    the kernel the forward actually uses (a check of :func:`ssm_kernels`)."""
    ssm = model.get_submodule(f"backbone.layers.{layer}.mixer.kernel")
    channels = model.get_submodule(f"backbone.layers.{layer}.mixer").D.shape[0]
    impulse = torch.zeros(1, channels, length, dtype=torch.float64)
    impulse[..., 0] = 1.0
    return ssm.to(torch.float64)(impulse, torch.zeros(channels, dtype=torch.float64))[0]


def pair_weights(relevance: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (B, n_pairs), on_pairs (B,))``: the |relevance| of each pair's four tokens (by
    recency) as a share of the |relevance| of all pairs (each row sums to 1; uniform = 1 / n_pairs),
    and the share of the prompt's |relevance| that lies on the pairs at all."""
    per_pair = torch.stack([relevance[:, part].abs().sum(-1) for part in pair_slices(n_pairs)], dim=-1)
    on_pairs = per_pair.sum(-1)
    return per_pair / on_pairs[:, None].clamp_min(1e-300), on_pairs / relevance.abs().sum(-1).clamp_min(1e-300)


def mean_and_error(values: torch.Tensor) -> tuple[list[float], list[float]]:
    """Column means and standard errors of a (N, K) tensor."""
    count = max(values.shape[0], 1)
    mean = values.mean(0) if values.shape[0] else torch.full(values.shape[1:], math.nan, dtype=values.dtype)
    error = values.std(0) / math.sqrt(count) if values.shape[0] > 1 else torch.zeros_like(mean)
    return mean.tolist(), error.tolist()


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation of two equally long lists (nan when either is constant or has nans)."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def plot(out: Path, recency: list[int], profiles: dict[str, tuple[list[float], list[float]]],
         kernels: dict[int, torch.Tensor], example_lags: list[int], kernel_at_examples: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, (mean, error) in profiles.items():
        left.errorbar(recency, mean, yerr=error, marker="o", capsize=3, label=name)
    left.plot(recency, kernel_at_examples, "k--", alpha=0.6, label="kernel: mean |K(5k-1)|, normalised to sum 1")
    left.set_xlabel("recency k of the in-context pair (1 = just before the query)")
    left.axhline(1 / len(recency), color="grey", linestyle=":", linewidth=1, label="uniform")
    left.set_ylabel("share of the pairs' |relevance|")
    left.set_title("(a, c) relevance per in-context example")
    left.legend(fontsize=8)
    for layer, kernel in kernels.items():
        lags = torch.arange(kernel.shape[1])
        for channel in kernel:
            right.plot(lags, channel, color=f"C{layer}", alpha=0.15, linewidth=0.7)
        mean_abs = kernel.abs().mean(0)
        right.plot(lags, mean_abs, color="k" if layer == min(kernels) else f"C{layer + 3}", linewidth=2,
                   label=f"layer {layer}: mean |K_h(l)|")
        right.plot(example_lags, mean_abs[example_lags], "o", color="red", markersize=4)
    right.axhline(0.0, color="grey", linewidth=0.5)
    right.set_xlabel("lag l (tokens back from the query); red dots: y_i of the pairs")
    right.set_ylabel("K_h(l)")
    right.set_title("(b) the H3 diagonal SSM's kernel per channel")
    right.legend(fontsize=8)
    figure.tight_layout()
    path = out / "h3_icl_sample_weighting.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out/h3_icl_sample_weighting",
                        help="folder for the figure (default: demo_out/h3_icl_sample_weighting)")
    parser.add_argument("--steps", type=int, default=800, help="training steps (default: 800)")
    parser.add_argument("--examples", type=int, default=256, help="test prompts explained (default: 256)")
    parser.add_argument("--pairs", type=int, default=6, help="in-context pairs per prompt (default: 6)")
    parser.add_argument("--d-model", type=int, default=32, help="model width (default: 32)")
    parser.add_argument("--n-layer", type=int, default=1, help="H3 layers (default: 1, as in Li et al.)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, training and data (default: 0)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    n_pairs = arguments.pairs

    task = get_task("icl_regression", min_pairs=n_pairs, max_pairs=n_pairs)
    start = time.perf_counter()
    model = build_model(task, "h3", seed=arguments.seed, d_model=arguments.d_model, n_layer=arguments.n_layer,
                        d_state=16)
    config = TrainingConfig(steps=arguments.steps, batch_size=64, lr=1e-2, warmup_steps=min(50, arguments.steps // 5),
                            seed=arguments.seed, test_examples=8, log_every=max(1, arguments.steps // 4))
    result = train(model, task, config, progress=False)
    model = result.model.eval()
    print(f"trained a {arguments.n_layer}-layer H3 (d_model {arguments.d_model}) for {arguments.steps} steps in "
          f"{time.perf_counter() - start:.1f} s; final training loss {result.losses[-1]:.2f} "
          f"(chance: {math.log(len(task.answers())):.2f})")

    examples = task.examples("test", arguments.examples, seed=arguments.seed)
    ids = torch.tensor([example.input_ids for example in examples])
    labels = torch.tensor([example.label_id for example in examples])
    seen = torch.tensor([query_seen(example) for example in examples])
    with torch.no_grad():
        predictions = model(ids)[:, -1].argmax(-1)
    correct = predictions == labels
    def accuracy(mask: torch.Tensor) -> str:
        return f"{float(correct[mask].float().mean()):.0%} of {int(mask.sum())}" if bool(mask.any()) else "n/a"
    print(f"test accuracy: {float(correct.float().mean()):.1%} of {len(examples)} prompts; query x seen in the "
          f"context (copying suffices): {accuracy(seen)}; unseen (needs regression): {accuracy(~seen)}")

    # (a) and (c): relevance of each in-context pair for the predicted token, by recency
    lrp = explain(model, ids, target=predictions, method="mamba_lrp")
    gxi = explain(model, ids, target=predictions, method="gradient_x_input")
    recency = list(range(1, n_pairs + 1))
    weights, on_pairs = {}, {}
    for name, explanation in (("MambaLRP", lrp), ("gradient x input", gxi)):
        weights[name], on_pairs[name] = pair_weights(explanation.relevance.double(), n_pairs)
    profiles = {}
    for name, weight in weights.items():
        profiles[name] = mean_and_error(weight)
        if bool(seen.any()) and bool((~seen).any()):
            profiles[f"{name}, unseen query"] = mean_and_error(weight[~seen])
    print(f"(a) sample weighting: each in-context pair's share of the |relevance| on all pairs (uniform: "
          f"{1 / n_pairs:.3f}), by recency k = {recency} (1 = newest), mean +- s.e. over {len(examples)} prompts:")
    for name, (mean, error) in profiles.items():
        cells = "  ".join(f"{value:.3f}+-{err:.3f}" for value, err in zip(mean, error, strict=True))
        print(f"    {name:<32s} {cells}")
    print(f"    the pairs hold {float(on_pairs['MambaLRP'].mean()):.0%} of the prompt's |relevance| under MambaLRP and "
          f"{float(on_pairs['gradient x input'].mean()):.0%} under gradient x input (the rest: the query tokens "
          f"'x x_q y' and the separators); MambaLRP's mean conservation error "
          f"{float(lrp.conservation_error.mean()):.3f}")

    # (b) the SSM kernel
    length = ids.shape[1]
    kernels = ssm_kernels(model, length)
    example_lags = [TOKENS_PER_PAIR * k - 1 for k in recency]  # query position -> y_i of the k-th newest pair
    for layer, kernel in kernels.items():
        check = float((kernel - impulse_response(model, layer, length)).abs().max() / kernel.abs().max())
        at_examples = kernel.abs().mean(0)[example_lags].tolist()
        print(f"(b) layer {layer}: mean |K_h(l)| over {kernel.shape[0]} channels at the pairs' lags "
              f"l = {example_lags}: "
              + " ".join(f"{value:.3f}" for value in at_examples)
              + f" (K(0) {float(kernel.abs().mean(0)[0]):.3f}; kernel from the parameters vs impulse response: "
              f"relative difference {check:.1e})")
    first = min(kernels)
    at_examples = kernels[first].abs().mean(0)[example_lags]
    kernel_at_examples = (at_examples / at_examples.sum()).tolist()  # a distribution over the pairs, as (a)
    print(f"    layer {first}'s kernel as weights over the pairs (normalised to sum 1), newest first: "
          + " ".join(f"{value:.3f}" for value in kernel_at_examples))
    lrp_mean, gxi_mean = profiles["MambaLRP"][0], profiles["gradient x input"][0]
    top_lrp, top_gxi = weights["MambaLRP"].argmax(-1), weights["gradient x input"].argmax(-1)
    print(f"(c) correlation over recency: MambaLRP vs gradient x input {correlation(lrp_mean, gxi_mean):+.2f}; "
          f"MambaLRP vs layer-{first} mean |K| {correlation(lrp_mean, kernel_at_examples):+.2f}; "
          f"per prompt, the pair with the most MambaLRP relevance is the one with the most gradient x input in "
          f"{float((top_lrp == top_gxi).float().mean()):.0%}")
    newest, oldest = lrp_mean[0], lrp_mean[-1]
    peak = recency[max(range(n_pairs), key=lambda index: lrp_mean[index])]
    print(f"summary: MambaLRP sample weighting (share of the pairs' |relevance|): newest {newest:.3f}, oldest "
          f"{oldest:.3f}, largest at recency {peak}; ratio newest / oldest {newest / oldest:.2f}")
    path = plot(out, recency, profiles, kernels, example_lags, kernel_at_examples)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
