"""Baselines of explain(): Captum methods on the embeddings, hidden-attention rollout and MambaAttr,
random, and the Captum wrapper MambaLRP. References are independent: explicit forwards, and a
float64 loop over the model's own weights for the hidden attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.metrics import infidelity, sensitivity_max

import mamba_lrp
from mamba_lrp import MambaLRP, explain, method_names
from mamba_lrp.captum import token_replacement_perturbation
from mamba_lrp.hidden_attention import capture_scan_inputs, hidden_attention_row
from ssm_models import MambaLM, from_hf
from ssm_models.mamba import MambaConfig
from tests.helpers import random_hf_mamba, relative_error

BASELINES = ["integrated_gradients", "saliency", "smoothgrad", "occlusion", "feature_ablation", "shapley_sampling",
             "attention_rollout", "mamba_attr", "random"]
DETERMINISTIC = ["integrated_gradients", "saliency", "occlusion", "feature_ablation", "attention_rollout", "mamba_attr"]
FAST_OPTIONS = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"nt_samples": 4},
                "shapley_sampling": {"n_samples": 3}}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, n_layer: int = 2) -> tuple[object, MambaLM]:
    hf = random_hf_mamba(seed, num_hidden_layers=n_layer, residual_in_fp32=False, dtype=dtype)
    return hf, from_hf(hf, share_weights=False)


@pytest.fixture(scope="module")
def model64() -> tuple[object, MambaLM]:
    return tiny_model(0)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of length 10: the first left-padded (6 real tokens), the second full; and the
    short sequence alone (6,)."""
    generator = torch.Generator().manual_seed(11)
    short, long = torch.randint(1, 40, (6,), generator=generator), torch.randint(1, 40, (10,), generator=generator)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, 4:], ids[1] = short, long
    mask = (torch.arange(10)[None] >= torch.tensor([[4], [0]])).long()
    return ids, mask, short


def snapshot(model: MambaLM) -> tuple[dict, dict, dict]:
    return ({key: value.clone() for key, value in model.state_dict().items()},
            {name: sorted(module.__dict__) for name, module in model.named_modules()},
            {name: module.training for name, module in model.named_modules()})


def assert_unchanged(model: MambaLM, before: tuple[dict, dict, dict]) -> None:
    state, attributes, training = before
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert {name: sorted(module.__dict__) for name, module in model.named_modules()} == attributes
    assert {name: module.training for name, module in model.named_modules()} == training
    assert all(parameter.grad is None for parameter in model.parameters())
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def logit(model: MambaLM, ids: torch.Tensor, position: int, target: int, mask: torch.Tensor | None = None,
          embeds: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        logits = model(None if embeds is not None else ids[None], inputs_embeds=embeds,
                       attention_mask=None if mask is None else mask[None])
    return float(logits[0, position, target])


# ----------------------------------------------------------------------------- registry, shapes
def test_registered_and_unknown_names() -> None:
    names = method_names()
    assert set(BASELINES) <= set(names) and "gradient_x_input" in names and "mamba_lrp" in names
    _, model = tiny_model(1, torch.float32, n_layer=1)
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: .*integrated_gradients"):
        explain(model, torch.tensor([1, 2, 3]), method="nope")


@pytest.mark.parametrize("method", BASELINES)
def test_every_method_shapes_padding_and_model_unchanged(model64, method: str) -> None:
    _, model = model64
    ids, mask, short = padded_batch()
    model.train()  # explain() must evaluate in eval mode and restore this flag
    before = snapshot(model)
    options = FAST_OPTIONS.get(method, {})
    full = explain(model, ids, method=method, target=[3, 5], **options)
    assert full.relevance.shape == (2, 10) and torch.isfinite(full.relevance).all()
    padded = explain(model, ids, method=method, attention_mask=mask, **options)
    assert padded.relevance.shape == (2, 10) and torch.isfinite(padded.relevance).all()
    assert torch.all(padded.relevance[0, :4] == 0) and padded.method == method
    assert_unchanged(model, before)
    model.eval()
    expected = [logit(model, ids[0], 9, int(padded.target[0]), mask[0]), logit(model, ids[1], 9, int(padded.target[1]))]
    assert torch.allclose(padded.output, torch.tensor(expected, dtype=torch.float64), rtol=1e-10)
    with torch.no_grad():
        top = model(ids[1:])[0, 9, :40].argmax()
    assert int(padded.target[1]) == int(top)
    if method in DETERMINISTIC:  # a padded example is explained as if it were alone (left and right padding)
        alone = explain(model, short, method=method, target=int(padded.target[0]), **options)
        assert torch.allclose(padded.relevance[0, 4:], alone.relevance, rtol=1e-5, atol=1e-6)
        right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
        right_ids[0, :6], right_mask[0, :6], right_ids[1], right_mask[1] = short, 1, ids[1], 1
        right = explain(model, right_ids, method=method, target=padded.target, attention_mask=right_mask, **options)
        assert right.position.tolist() == [5, 9] and torch.all(right.relevance[0, 6:] == 0)
        assert torch.allclose(right.relevance[0, :6], alone.relevance, rtol=1e-5, atol=1e-6)
        assert torch.allclose(right.relevance[1], padded.relevance[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        explain(model, ids, method=method, layer=1, **options)


# ------------------------------------------------------------------------- Captum baselines
def test_integrated_gradients_completeness() -> None:
    """sum_t R_t = f(x) - f(baseline) up to the quadrature error. A model with mamba_ssm's own init:
    the randomised test models are so rough along the path (RMSNorm of near-zero embeddings) that
    no affordable number of steps converges there."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=40, d_state=4)).double()
    ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(3))
    explanation = explain(model, ids, method="integrated_gradients", target=7, position=8, n_steps=128)
    zeros = torch.zeros(1, 12, 16, dtype=torch.float64)
    expected = logit(model, ids, 8, 7) - logit(model, ids, 8, 7, embeds=zeros)
    assert abs(float(explanation.relevance.sum()) - expected) <= 1e-6 * abs(expected)
    assert torch.all(explanation.relevance[9:] == 0)  # tokens after the position cannot matter
    coarse = explain(model, ids, method="integrated_gradients", target=7, position=8, n_steps=8)
    assert abs(float(coarse.relevance.sum()) - expected) > 1e-6 * abs(expected)  # the steps matter
    # a token baseline: the baseline input is every token replaced by id 2
    explanation = explain(model, ids, method="integrated_gradients", target=7, position=8, n_steps=128,
                          baseline_token=2)
    expected = logit(model, ids, 8, 7) - logit(model, torch.full_like(ids, 2), 8, 7)
    assert abs(float(explanation.relevance.sum()) - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("padded", [False, True])
def test_occlusion_and_ablation_equal_explicit_drops(model64, padded: bool) -> None:
    _, model = model64
    ids, mask, _ = padded_batch()
    mask = mask if padded else None
    occluded = explain(model, ids, method="occlusion", target=[3, 5], attention_mask=mask)
    ablated = explain(model, ids, method="feature_ablation", target=[3, 5], attention_mask=mask)
    window = explain(model, ids, method="occlusion", window=2, target=[3, 5], attention_mask=mask)
    for row, target in enumerate([3, 5]):
        row_mask = None if mask is None else mask[row]
        f = logit(model, ids[row], 9, target, row_mask)
        real = range(10) if row_mask is None else [t for t in range(10) if row_mask[t]]
        drops = torch.zeros(10, dtype=torch.float64)
        for t in real:
            replaced = ids[row].clone()
            replaced[t] = 0
            drops[t] = f - logit(model, replaced, 9, target, row_mask)
        assert torch.allclose(occluded.relevance[row], drops, rtol=1e-5, atol=1e-5)  # Captum sums in float32
        assert torch.allclose(ablated.relevance[row], drops, rtol=1e-10, atol=1e-10)
        pair_drops = []
        for t in range(9):  # windows of two tokens; a token's score is the mean over its windows
            replaced = ids[row].clone()
            replaced[t : t + 2] = torch.where(row_mask[t : t + 2].bool(), 0, replaced[t : t + 2]) if padded else 0
            pair_drops.append(f - logit(model, replaced, 9, target, row_mask))
        expected = torch.tensor([pair_drops[0]] + [(pair_drops[t - 1] + pair_drops[t]) / 2 for t in range(1, 9)]
                                + [pair_drops[8]], dtype=torch.float64)
        if padded:
            expected = expected * mask[row]
        assert torch.allclose(window.relevance[row], expected, rtol=1e-5, atol=1e-5)


def test_shapley_sampling_is_efficient_and_seeded(model64) -> None:
    _, model = model64
    ids = torch.randint(1, 40, (7,), generator=torch.Generator().manual_seed(4))
    first = explain(model, ids, method="shapley_sampling", target=3, n_samples=5, seed=1)
    again = explain(model, ids, method="shapley_sampling", target=3, n_samples=5, seed=1)
    assert torch.equal(first.relevance, again.relevance)
    expected = logit(model, ids, 6, 3) - logit(model, torch.zeros_like(ids), 6, 3)
    assert abs(float(first.relevance.sum()) - expected) <= 1e-4 * max(1.0, abs(expected))


def test_saliency_and_smoothgrad_definitions(model64) -> None:
    _, model = model64
    ids = torch.randint(1, 40, (8,), generator=torch.Generator().manual_seed(5))
    embeddings = model.embed(ids[None]).detach().requires_grad_(True)
    f = model(inputs_embeds=embeddings)[0, 7, 9]
    (gradient,) = torch.autograd.grad(f, embeddings)
    saliency = explain(model, ids, method="saliency", target=9)
    assert torch.allclose(saliency.relevance, gradient[0].norm(dim=-1), rtol=1e-10)
    # SmoothGrad with zero noise is gradient x input
    smooth = explain(model, ids, method="smoothgrad", target=9, stdevs=0.0, nt_samples=2)
    assert torch.allclose(smooth.relevance, (gradient * embeddings).detach()[0].sum(-1), rtol=1e-8)
    state = torch.random.get_rng_state()
    a = explain(model, ids, method="smoothgrad", target=9, nt_samples=3, seed=7)
    b = explain(model, ids, method="smoothgrad", target=9, nt_samples=3, seed=7)
    assert torch.equal(a.relevance, b.relevance) and torch.equal(torch.random.get_rng_state(), state)


# --------------------------------------------------------------------- hidden attention: reference
def reference_layers(hf, ids: torch.Tensor) -> tuple[list[dict], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A float64 forward over the transformers model's weights, loops over time. Returns per layer
    ``{"delta": (L, d), "A": (d, N), "B": (L, N), "C": (L, N)}``, the embeddings (L, D) leaf, the
    block inputs (L, D) and the final hidden states (L, D)."""
    weights = {key: value.double() for key, value in hf.state_dict().items()}
    config = hf.config
    n_state, rank, eps = config.state_size, config.time_step_rank, config.layer_norm_epsilon
    embeddings = weights["backbone.embeddings.weight"][ids].clone().requires_grad_(True)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    hidden, length, layers, block_inputs = embeddings, ids.shape[0], [], []
    for layer in range(config.num_hidden_layers):
        p = f"backbone.layers.{layer}."
        block_inputs.append(hidden)
        xz = rms_norm(hidden, weights[p + "norm.weight"]) @ weights[p + "mixer.in_proj.weight"].T
        x, z = xz[:, : xz.shape[1] // 2], xz[:, xz.shape[1] // 2 :]
        taps = weights[p + "mixer.conv1d.weight"][:, 0, :]
        kernel = taps.shape[1]
        conv = torch.stack([sum(taps[:, k] * x[t - (kernel - 1) + k] for k in range(kernel)
                                if t - (kernel - 1) + k >= 0) for t in range(length)])
        u = F.silu(conv + weights[p + "mixer.conv1d.bias"])
        dbc = u @ weights[p + "mixer.x_proj.weight"].T
        dt_low, B, C = dbc[:, :rank], dbc[:, rank : rank + n_state], dbc[:, rank + n_state :]
        delta = F.softplus(dt_low @ weights[p + "mixer.dt_proj.weight"].T + weights[p + "mixer.dt_proj.bias"])
        A = -torch.exp(weights[p + "mixer.A_log"])
        layers.append({"delta": delta.detach(), "A": A, "B": B.detach(), "C": C.detach()})
        state, ys = torch.zeros(u.shape[1], n_state, dtype=torch.float64), []
        for t in range(length):
            state = torch.exp(delta[t, :, None] * A) * state + delta[t, :, None] * B[t][None, :] * u[t][:, None]
            ys.append((state * C[t][None, :]).sum(-1) + weights[p + "mixer.D"] * u[t])
        gated = torch.stack(ys) * F.silu(z)
        hidden = hidden + gated @ weights[p + "mixer.out_proj.weight"].T
    return layers, embeddings, block_inputs, rms_norm(hidden, weights["backbone.norm_f.weight"])


def reference_alpha(layer: dict, i: int, j: int) -> torch.Tensor:
    """alpha_ij (d,) = sum_n C_i,n (prod_{k=j+1..i} exp(delta_k A)) delta_j B_j,n, by loops."""
    if j > i:
        return torch.zeros(layer["A"].shape[0], dtype=torch.float64)
    product = torch.ones_like(layer["A"])
    for k in range(j + 1, i + 1):
        product = product * torch.exp(layer["delta"][k][:, None] * layer["A"])
    return (layer["C"][i][None, :] * product * layer["delta"][j][:, None] * layer["B"][j][None, :]).sum(-1)


def reference_rollout(
    layers: list[dict], position: int, columns: list[torch.Tensor] | None, start: int
) -> torch.Tensor:
    """Row ``position`` of prod (Abar_l [diag(columns_l)] + I) / rowsum, full L x L matrices by loops."""
    length = layers[0]["delta"].shape[0]
    joint = None
    for index in range(start, len(layers)):
        mean = torch.stack([torch.stack([reference_alpha(layers[index], i, j).mean() for j in range(length)])
                            for i in range(length)])  # (L, L) channel mean of the signed attention
        if columns is not None:
            mean = mean * columns[index][None, :]
        augmented = mean + torch.eye(length, dtype=torch.float64)
        normalised = augmented / augmented.sum(-1, keepdim=True)
        joint = normalised if joint is None else normalised @ joint
    return joint[position]


def test_hidden_attention_row_matches_loops(model64) -> None:
    hf, model = model64
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(6))
    positions = torch.tensor([6, 4])
    scans, _, _ = capture_scan_inputs(model, ids)
    for row in range(2):
        layers, *_ = reference_layers(hf, ids[row])
        for index, layer in enumerate(layers):
            computed = hidden_attention_row(scans[index], positions, chunk_elements=64)[row]  # (d, L)
            expected = torch.stack([reference_alpha(layer, int(positions[row]), j) for j in range(7)], dim=1)
            assert relative_error(computed, expected) <= 1e-12


@pytest.mark.parametrize("start_layer", [0, 1])
def test_attention_rollout_and_mamba_attr_match_loops(model64, start_layer: int) -> None:
    hf, model = model64
    ids = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(7))
    position, target = 4, 11
    layers, _, block_inputs, final = reference_layers(hf, ids)
    rollout = explain(model, ids, method="attention_rollout", position=position, start_layer=start_layer)
    expected = reference_rollout(layers, position, None, start_layer)
    assert relative_error(rollout.relevance, expected) <= 1e-10
    f = final[position] @ hf.state_dict()["backbone.embeddings.weight"].double()[target]
    gradients = torch.autograd.grad(f, block_inputs)
    columns = []
    for gradient in gradients:
        score = gradient.clamp_min(0).amax(-1)
        columns.append((score - score.min()) / (score.max() - score.min()))
    attr = explain(model, ids, method="mamba_attr", position=position, target=target, start_layer=start_layer)
    assert relative_error(attr.relevance, reference_rollout(layers, position, columns, start_layer)) <= 1e-10


def test_random_is_seeded(model64) -> None:
    _, model = model64
    ids, mask, _ = padded_batch()
    first = explain(model, ids, method="random", attention_mask=mask, seed=3)
    assert torch.equal(first.relevance, explain(model, ids, method="random", attention_mask=mask, seed=3).relevance)
    assert not torch.equal(first.relevance, explain(model, ids, method="random", attention_mask=mask).relevance)
    assert bool((first.relevance[mask.bool()] > 0).all()) and bool((first.relevance <= 1).all())


# ------------------------------------------------------------------------------ Captum wrapper
def test_captum_wrapper_equals_explain_and_metrics_run(model64) -> None:
    _, model = model64
    ids, mask, _ = padded_batch()
    before = snapshot(model)
    explainer = MambaLRP(model)
    attributions = explainer.attribute(ids, target=[3, 5], additional_forward_args=(-1, mask))
    expected = explain(model, ids, target=[3, 5], attention_mask=mask)
    assert torch.equal(attributions, expected.relevance)
    ig = MambaLRP(model, method="integrated_gradients", n_steps=8)
    assert torch.equal(ig.attribute(ids, target=torch.tensor([3, 5]), position=7),
                       explain(model, ids, target=[3, 5], position=7, method="integrated_gradients",
                               n_steps=8).relevance)
    # the embeddings path: per-entry relevance whose sum over D is the token relevance
    embeddings = model.embed(ids).detach()
    per_entry = explainer.attribute(embeddings, target=[3, 5], attention_mask=mask)
    assert per_entry.shape == (2, 10, 16)
    assert torch.allclose(per_entry.sum(-1), expected.relevance, rtol=1e-10, atol=1e-12)
    assert torch.allclose(explainer.logits(ids, -1, mask)[[0, 1], [3, 5]], expected.output, rtol=1e-12)
    # Captum's metrics: infidelity on token ids (tokens replaced), sensitivity on the embeddings
    perturb = token_replacement_perturbation(0, 0.3, torch.Generator().manual_seed(0))
    scores = infidelity(explainer.forward_func, perturb, ids, attributions, additional_forward_args=(-1, mask),
                        target=torch.tensor([3, 5]), n_perturb_samples=4)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    sensitivity = sensitivity_max(explainer.attribute, embeddings, n_perturb_samples=2,
                                  target=torch.tensor([3, 5]), additional_forward_args=(-1, mask))
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()

    def noise(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perturbation = 0.01 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1), dtype=inputs.dtype)
        return perturbation, inputs - perturbation

    scores = infidelity(explainer.forward_func, noise, embeddings, per_entry, additional_forward_args=(-1, mask),
                        target=torch.tensor([3, 5]), n_perturb_samples=3)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="composite"):
        MambaLRP(model, method="saliency").attribute(embeddings)
    with pytest.raises(ValueError, match="known methods"):
        MambaLRP(model, method="nope")
    assert mamba_lrp.MambaLRP is MambaLRP
