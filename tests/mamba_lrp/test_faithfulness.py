"""The flipping engine and its metrics against hand-computed values on an additive model whose
true per-token contributions are known, and against direct forwards of a Mamba model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mamba_lrp import explain
from mamba_lrp.faithfulness import (
    ERASER_BINS,
    METRICS,
    FlipCurve,
    aopc,
    delta_af,
    evaluate_example,
    flip_curve,
    get_metric,
)
from ssm_models import MambaLM, from_hf
from tests.helpers import random_hf_mamba, single_torch_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_torch_thread():
        yield


class AdditiveModel(nn.Module):
    """``logit_c(x) = sum_t W[x_t, c]`` at the last position: the hidden state at ``t`` is the
    cumulative sum of the embeddings ``W[x_s]`` (s <= t, padding zeroed), the head is the identity.
    Relative to the zero embedding, token ``t`` contributes exactly ``W[x_t, c]``."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weights.double(), freeze=True)
        self.config = SimpleNamespace(vocab_size=weights.shape[1])
        self.calls: list[int] = []  # batch size of each forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None) -> torch.Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            hidden = hidden * attention_mask[:, :, None].to(hidden.dtype)
        self.calls.append(hidden.shape[0])
        return hidden.cumsum(1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def three_token_model() -> AdditiveModel:
    """Tokens 1, 2, 3 contribute 1, 3, -2 to class 0; token 4 contributes 0.5 (the replacement)."""
    weights = torch.zeros(5, 2, dtype=torch.float64)
    weights[1:, 0] = torch.tensor([1.0, 3.0, -2.0, 0.5])
    weights[1:, 1] = torch.tensor([0.2, -0.1, 0.3, 0.0])
    return AdditiveModel(weights)


IDS = torch.tensor([1, 2, 3])
TRUE = torch.tensor([1.0, 3.0, -2.0])  # MoRF order: t1, t0, t2; LeRF order: t2, t0, t1


@pytest.mark.parametrize(
    ("order", "mode", "replacement", "values", "n_flipped"),
    [
        # f(x) = 1 + 3 - 2 = 2; zero embedding removes a contribution
        ("morf", "deletion", "zero_embedding", [2, -1, -2, 0], [0, 1, 2, 3]),
        ("lerf", "deletion", "zero_embedding", [2, 4, 3, 0], [0, 1, 2, 3]),
        ("morf", "insertion", "zero_embedding", [0, 3, 4, 2], [0, 1, 2, 3]),
        ("lerf", "insertion", "zero_embedding", [0, -2, -1, 2], [0, 1, 2, 3]),
        # token 4 (0.5) replaces: 2 -> 2 - 3 + 0.5 -> ... ; insertion starts from 3 x 0.5
        ("morf", "deletion", 4, [2, -0.5, -1, 1.5], [0, 1, 2, 3]),
        ("morf", "insertion", 4, [1.5, 4, 4.5, 2], [0, 1, 2, 3]),
        # delete keeps one token: deletion stops at 2 of 3, insertion starts from the top token alone
        ("morf", "deletion", "delete", [2, -1, -2, -2], [0, 1, 2, 2]),
        ("morf", "insertion", "delete", [3, 3, 4, 2], [1, 1, 2, 3]),
        ("lerf", "deletion", "delete", [2, 4, 3, 3], [0, 1, 2, 2]),
    ],
)
def test_three_token_curves_by_hand(order, mode, replacement, values, n_flipped) -> None:
    curve = flip_curve(three_token_model(), IDS, TRUE, target=0, order=order, mode=mode,
                       replacement=replacement, steps=3)
    assert curve.values.tolist() == pytest.approx(values, abs=1e-12)
    assert curve.n_flipped.tolist() == n_flipped
    assert curve.fractions.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert curve.unperturbed == pytest.approx(2.0)
    assert (curve.order, curve.mode, curve.replacement, curve.output, curve.target) == (order, mode, replacement,
                                                                                        "logit", 0)


def test_three_token_metrics_by_hand() -> None:
    values = evaluate_example(three_token_model(), IDS, TRUE, ["delta_af", "delta_ai", "aopc"], target=0, steps=3)
    # A^F(MoRF) = (2 - 1 - 2 + 0)/4 = -0.25, A^F(LeRF) = (2 + 4 + 3 + 0)/4 = 2.25
    # A^I(MoRF) = (0 + 3 + 4 + 2)/4 = 2.25,  A^I(LeRF) = (0 - 2 - 1 + 2)/4 = -0.25
    # AOPC = ((2-2) + (2+1) + (2+2) + (2-0))/4 = 2.25
    assert values == pytest.approx({"delta_af": 2.5, "delta_ai": 2.5, "aopc": 2.25}, abs=1e-12)


def test_fractions_prepend_zero_and_round_half_up() -> None:
    curve = flip_curve(three_token_model(), IDS, TRUE, target=0, steps=[0.5, 1.0])
    assert curve.fractions.tolist() == [0.0, 0.5, 1.0]
    assert curve.n_flipped.tolist() == [0, 2, 3]  # 1.5 -> 2
    assert curve.values.tolist() == pytest.approx([2, -2, 0])


def softmax_first(logits: list[float]) -> float:
    return math.exp(logits[0]) / sum(math.exp(value) for value in logits)


def test_eraser_metrics_by_hand() -> None:
    weights = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 0.5], [1.0, 2.0, -1.0]])
    model = AdditiveModel(weights)
    ids = torch.tensor([1, 2, 3, 4])
    relevance = weights[ids, 0]  # [2, 0.5, -1, 1]: top-1 = {t0}, top-2 = {t0, t3}
    # n = 4: bins 1/5/10/20/50 % -> ceil(.04), ceil(.2), ceil(.4), ceil(.8), ceil(2) = 1, 1, 1, 1, 2 tokens
    p_x = softmax_first([2.5, 3.0, 0.5])
    without_1, without_2 = softmax_first([0.5, 3.0, -0.5]), softmax_first([-0.5, 1.0, 0.5])
    only_1, only_2 = softmax_first([2.0, 0.0, 1.0]), softmax_first([3.0, 2.0, 0.0])
    expected = {
        "comprehensiveness": (4 * (p_x - without_1) + (p_x - without_2)) / 5,
        "sufficiency": (4 * (p_x - only_1) + (p_x - only_2)) / 5,
    }
    values, curves = evaluate_example(model, ids, relevance, ["comprehensiveness", "sufficiency"], target=0,
                                      output="logit", return_curves=True)
    assert values == pytest.approx(expected, abs=1e-14)
    assert curves["eraser_deletion_morf"].n_flipped.tolist() == [0, 1, 1, 1, 1, 2]
    assert curves["eraser_deletion_morf"].output == "prob"  # ERASER is defined on probabilities
    logprob = flip_curve(model, ids, relevance, target=0, output="logprob", steps=1)
    assert logprob.values[0] == pytest.approx(math.log(p_x), abs=1e-14)


def test_eraser_bins_round_up_with_float_tolerance() -> None:
    model = AdditiveModel(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)))
    ids = torch.arange(1, 31)
    curve = flip_curve(model, ids, torch.randn(30), target=0, steps=ERASER_BINS, rounding="ceil")
    assert curve.n_flipped.tolist() == [0, 1, 2, 3, 6, 15]  # 0.1 * 30 = 3.0000000000000004 -> 3, not 4


def random_additive(seed: int, length: int = 24) -> tuple[AdditiveModel, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    ids = torch.randint(1, 60, (length,), generator=generator)
    return AdditiveModel(weights), ids, weights[ids, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_true_contributions_beat_random_and_reversed_rankings(seed: int) -> None:
    model, ids, true = random_additive(seed)
    best = evaluate_example(model, ids, true, ["delta_af", "delta_ai"], target=2, steps=24)
    reversed_ = evaluate_example(model, ids, -true, ["delta_af", "delta_ai"], target=2, steps=24)
    assert best["delta_af"] > 0 and best["delta_ai"] > 0
    assert reversed_["delta_af"] == pytest.approx(-best["delta_af"], abs=1e-12)
    morf = flip_curve(model, ids, true, target=2, steps=24)
    generator = torch.Generator().manual_seed(100 + seed)
    random_scores = []
    for draw in range(8):
        scores = torch.randn(ids.numel(), generator=generator, dtype=torch.float64)
        random_scores.append(evaluate_example(model, ids, scores, ["delta_af"], target=2, steps=24)["delta_af"])
        # greedy removal of the largest contributions is optimal at every step of an additive model
        other = flip_curve(model, ids, scores, target=2, steps=24)
        assert bool((morf.values <= other.values + 1e-12).all())
        shuffled = flip_curve(model, ids, true, target=2, order="random", seed=draw, steps=24)
        assert bool((morf.values <= shuffled.values + 1e-12).all()) and shuffled.seed == draw
    assert all(best["delta_af"] > value for value in random_scores)
    assert abs(sum(random_scores) / len(random_scores)) < best["delta_af"] / 2


def mamba(seed: int = 0) -> MambaLM:
    return from_hf(random_hf_mamba(seed, dtype=torch.float64), share_weights=False)


def last_logit(model: MambaLM, ids: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return float(model(ids[None])[0, -1, target])


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_delete_equals_running_the_shortened_sequence(mode: str) -> None:
    model = mamba(1)
    ids = torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(1))
    relevance = torch.randn(11, generator=torch.Generator().manual_seed(2))
    position = 8  # tokens 9 and 10 cannot change the logit at 8: they are never flipped
    curve = flip_curve(model, ids, relevance, target=5, position=position, mode=mode, replacement="delete", steps=9)
    ranking = torch.sort(-relevance[: position + 1], stable=True).indices
    expected = []
    for count in curve.n_flipped.tolist():
        chosen = ranking[:count] if mode == "deletion" else ranking[count:]
        keep = torch.ones(position + 1, dtype=torch.bool)
        keep[chosen] = False
        expected.append(last_logit(model, ids[: position + 1][keep], 5))
    assert curve.values.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert curve.n_tokens == 9 and curve.position == position
    assert curve.unperturbed == pytest.approx(last_logit(model, ids[: position + 1], 5), rel=1e-12)
    # the same sequence left-padded: padding is never flipped and changes nothing
    padded = torch.cat([torch.zeros(3, dtype=torch.long), ids])
    mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(11, dtype=torch.long)])
    again = flip_curve(model, padded, torch.cat([torch.full((3,), 99.0), relevance]), target=5, position=position + 3,
                       mode=mode, replacement="delete", steps=9, attention_mask=mask)
    assert again.values.tolist() == pytest.approx(curve.values.tolist(), rel=1e-10, abs=1e-12)


def test_token_and_zero_embedding_replacements_match_direct_forwards() -> None:
    model = mamba(2)
    ids = torch.randint(1, 40, (10,), generator=torch.Generator().manual_seed(3))
    relevance = torch.randn(10, generator=torch.Generator().manual_seed(4))
    ranking = torch.sort(-relevance, stable=True).indices
    by_token = flip_curve(model, ids, relevance, target=3, replacement=0, steps=5)
    by_zero = flip_curve(model, ids, relevance, target=3, replacement="zero_embedding", steps=5, output="prob")
    for step, count in enumerate(by_token.n_flipped.tolist()):
        perturbed = ids.clone()
        perturbed[ranking[:count]] = 0
        assert by_token.values[step] == pytest.approx(last_logit(model, perturbed, 3), rel=1e-10)
        with torch.no_grad():
            embeddings = model.embed(ids[None]).clone()
            embeddings[0, ranking[:count]] = 0
            logits = model.head(model.hidden_states(inputs_embeds=embeddings)[0, -1])[:40]
        assert by_zero.values[step] == pytest.approx(float(torch.softmax(logits, -1)[3]), rel=1e-10)


@pytest.mark.parametrize("replacement", ["zero_embedding", 0, "delete"])
def test_batch_size_does_not_change_curves(replacement) -> None:
    model = mamba(3)
    ids = torch.randint(1, 40, (13,), generator=torch.Generator().manual_seed(5))
    relevance = torch.randn(13, generator=torch.Generator().manual_seed(6))
    metrics = sorted(METRICS)
    one, curves_one = evaluate_example(model, ids, relevance, metrics, target=7, steps=6, replacement=replacement,
                                       batch_size=1, return_curves=True)
    many, curves_many = evaluate_example(model, ids, relevance, metrics, target=7, steps=6, replacement=replacement,
                                         batch_size=1000, return_curves=True)
    assert one == pytest.approx(many, rel=1e-10, abs=1e-12)
    for name, curve in curves_one.items():
        assert torch.allclose(curve.values, curves_many[name].values, rtol=1e-10, atol=1e-12), name


def test_every_curve_of_an_example_goes_through_bounded_batches_once() -> None:
    model, ids, true = random_additive(7, length=10)
    model.calls.clear()
    _, curves = evaluate_example(model, ids, true, sorted(METRICS), target=2, steps=5, batch_size=4,
                                 return_curves=True)
    distinct = set()
    for curve in curves.values():  # each perturbed input, identified by its replaced set
        ranking = torch.sort(-true if curve.order == "morf" else true, stable=True).indices
        for count in curve.n_flipped.tolist():
            chosen = ranking[:count] if curve.mode == "deletion" else ranking[count:]
            distinct.add(frozenset(chosen.tolist()))
    distinct.add(frozenset())
    assert all(size <= 4 for size in model.calls)
    assert sum(model.calls) == len(distinct)
    assert len(model.calls) == math.ceil(len(distinct) / 4)


def test_evaluate_example_reads_an_explanation() -> None:
    model = mamba(4)
    ids = torch.randint(1, 40, (9,), generator=torch.Generator().manual_seed(7))
    explanation = explain(model, ids, position=6)
    values, curves = evaluate_example(model, None, explanation, ["delta_af", "aopc"], steps=4, return_curves=True)
    morf = flip_curve(model, ids, explanation.relevance, int(explanation.target), 6, steps=4)
    lerf = flip_curve(model, ids, explanation.relevance, int(explanation.target), 6, order="lerf", steps=4)
    assert values["delta_af"] == pytest.approx(delta_af(morf, lerf), rel=1e-12)
    assert values["aopc"] == pytest.approx(aopc(morf), rel=1e-12)
    assert morf.unperturbed == pytest.approx(float(explanation.output), rel=1e-10)
    assert set(curves) == {"deletion_morf", "deletion_lerf"}
    assert FlipCurve.from_dict(curves["deletion_morf"].to_dict()).to_dict() == curves["deletion_morf"].to_dict()
    top = flip_curve(model, ids, explanation.relevance, position=6, steps=2)  # target None: the prediction
    assert top.target == int(explanation.target)


def test_metric_registry_directions() -> None:
    assert {name: metric.higher_is_better for name, metric in METRICS.items()} == {
        "delta_af": True, "delta_ai": True, "aopc": True, "comprehensiveness": True, "sufficiency": False}
    morf = flip_curve(three_token_model(), IDS, TRUE, target=0, steps=3)
    lerf = flip_curve(three_token_model(), IDS, TRUE, target=0, steps=3, order="lerf")
    assert get_metric("delta_af").compute(morf=morf, lerf=lerf) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="takes the curves"):
        get_metric("delta_af").compute(morf=morf)
    with pytest.raises(ValueError, match="must be a lerf deletion curve"):
        delta_af(morf, morf)
    with pytest.raises(ValueError, match="output='prob'"):
        get_metric("comprehensiveness").compute(morf=morf)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"order": "best"}, "`order` must be one of"),
        ({"mode": "swap"}, "`mode` must be one of"),
        ({"output": "score"}, "`output` must be one of"),
        ({"replacement": "unk"}, "`replacement` must be one of"),
        ({"replacement": -1}, "`replacement` must be a token id"),
        ({"steps": 0}, "`steps` must be a positive"),
        ({"steps": [0.5, 0.2]}, "non-decreasing"),
        ({"steps": [1.5]}, r"in \[0, 1\]"),
        ({"relevance": torch.ones(4)}, "`relevance` must have the shape"),
        ({"relevance": torch.tensor([1.0, float("nan"), 0.0])}, "NaN"),
        ({"position": 3}, "`position` 3 is out of range"),
        ({"position": -4}, "`position` -4 is out of range"),
        ({"target": 7}, "`target` 7 is outside"),
        ({"batch_size": 0}, "`batch_size`"),
    ],
)
def test_bad_arguments(arguments: dict, message: str) -> None:
    call = {"input_ids": IDS, "relevance": TRUE, "target": 0, **arguments}
    with pytest.raises(ValueError, match=message):
        flip_curve(three_token_model(), **call)


def test_unknown_metric_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown metric 'faith'; known metrics: aopc, comprehensiveness, delta_af"):
        evaluate_example(three_token_model(), IDS, TRUE, ["faith"], target=0)
