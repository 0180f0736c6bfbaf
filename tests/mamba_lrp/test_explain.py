"""explain(): conservation, an independent reference, transformers models, backends, padding,
layers, the Explanation object, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_lrp import Explanation, explain, method_names
from ssm_models import MambaLM, from_hf
from tests.helpers import random_hf_mamba, relative_error

ABLATIONS = ["gradient_x_input", "mamba_lrp_no_silu", "mamba_lrp_no_gate", "mamba_lrp_no_norm", "mamba_lrp_no_ssm"]


def conservative_model(seed: int, n_layer: int, d_model: int = 16, d_state: int = 4) -> MambaLM:
    """A float64 model with randomised weights, conv biases zeroed (biases absorb relevance)."""
    hf = random_hf_mamba(seed, hidden_size=d_model, num_hidden_layers=n_layer, state_size=d_state,
                         use_conv_bias=False, residual_in_fp32=False, dtype=torch.float64)
    return from_hf(hf, share_weights=False)


CASES = [(0, 1, 1, 7), (1, 4, 2, 64), (2, 1, 4, 256), (3, 4, 3, 33)]


@pytest.mark.parametrize(("seed", "batch", "n_layer", "length"), CASES)
def test_mamba_lrp_conserves_relevance(seed: int, batch: int, n_layer: int, length: int) -> None:
    model = conservative_model(seed, n_layer)
    ids = torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(seed))
    explanation = explain(model, ids)
    assert explanation.relevance.shape == (batch, length)
    assert float(explanation.conservation_error.max()) <= 1e-6
    assert explanation.layer_sums.shape == (batch, n_layer + 1)
    assert torch.allclose(explanation.layer_sums, explanation.output[:, None].expand(-1, n_layer + 1),
                          rtol=1e-6, atol=0)
    for method in ABLATIONS:  # each rule is necessary
        ablated = explain(model, ids, target=explanation.target, method=method)
        assert float(ablated.conservation_error.min()) > 1e-3, method


def reference_mamba_lrp(hf, ids: torch.Tensor, position: int, target: int) -> torch.Tensor:
    """An independent MambaLRP: a sequential loop over the transformers model's own weights in
    float64 with the paper's detaches (1/rms, sigmoid of SiLU, A_bar/B_bar/C, half gate)."""
    weights = {key: value.double() for key, value in hf.state_dict().items()}
    config = hf.config
    n_state, rank, eps = config.state_size, config.time_step_rank, config.layer_norm_epsilon
    embeddings = weights["backbone.embeddings.weight"][ids].clone().requires_grad_(True)  # (L, D)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps).detach()

    def silu(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x).detach()

    hidden = embeddings
    length = ids.shape[0]
    for layer in range(config.num_hidden_layers):
        p = f"backbone.layers.{layer}."
        x_in = rms_norm(hidden, weights[p + "norm.weight"])
        xz = x_in @ weights[p + "mixer.in_proj.weight"].T
        x, z = xz[:, : xz.shape[1] // 2], xz[:, xz.shape[1] // 2 :]
        taps = weights[p + "mixer.conv1d.weight"][:, 0, :]  # (d_inner, K)
        kernel = taps.shape[1]
        conv = torch.stack([sum(taps[:, k] * x[t - (kernel - 1) + k] for k in range(kernel)
                                if t - (kernel - 1) + k >= 0) for t in range(length)])
        u = silu(conv + weights[p + "mixer.conv1d.bias"])
        dbc = u @ weights[p + "mixer.x_proj.weight"].T
        dt_low, B, C = dbc[:, :rank], dbc[:, rank : rank + n_state], dbc[:, rank + n_state :]
        dt = F.softplus(dt_low @ weights[p + "mixer.dt_proj.weight"].T + weights[p + "mixer.dt_proj.bias"])
        A = -torch.exp(weights[p + "mixer.A_log"])
        state = torch.zeros(u.shape[1], n_state, dtype=torch.float64)
        ys = []
        for t in range(length):
            a_bar = torch.exp(dt[t, :, None] * A).detach()
            b_bar = (dt[t, :, None] * B[t][None, :]).detach()
            state = a_bar * state + b_bar * u[t][:, None]
            ys.append((state * C[t].detach()[None, :]).sum(-1) + weights[p + "mixer.D"] * u[t])
        y = torch.stack(ys)
        product = y * silu(z)
        gated = product / 2 + (product / 2).detach()
        hidden = hidden + gated @ weights[p + "mixer.out_proj.weight"].T
    final = rms_norm(hidden, weights["backbone.norm_f.weight"])
    logit = final[position] @ weights["backbone.embeddings.weight"][target]
    (gradient,) = torch.autograd.grad(logit, embeddings)
    return (embeddings * gradient).sum(-1).detach()


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_reference(seed: int) -> None:
    hf = random_hf_mamba(seed, num_hidden_layers=2, residual_in_fp32=False, dtype=torch.float64)
    ids = torch.randint(0, 40, (19,), generator=torch.Generator().manual_seed(seed))
    explanation = explain(hf, ids, target=7, position=15)
    expected = reference_mamba_lrp(hf, ids, position=15, target=7)
    assert relative_error(explanation.relevance, expected) <= 1e-8


def test_transformers_model_given_directly() -> None:
    hf = random_hf_mamba(3)
    before = {key: value.clone() for key, value in hf.state_dict().items()}
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        logits_before = hf(ids).logits
    direct = explain(hf, ids)
    converted = explain(from_hf(hf), ids)
    assert torch.equal(direct.relevance, converted.relevance)
    assert all(torch.equal(before[key], value) for key, value in hf.state_dict().items())
    assert not any("forward" in module.__dict__ for module in hf.modules())
    assert all(parameter.grad is None for parameter in hf.parameters())
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, logits_before)


@pytest.mark.slow
def test_backends_agree() -> None:
    hf = random_hf_mamba(4, hidden_size=8, state_size=4)
    model = from_hf(hf)
    ids = torch.randint(0, 40, (2, 21))
    results = {backend: explain(model.set_backend(scan=backend), ids, target=3).relevance
               for backend in ("reference", "cpu", "triton")}
    model.set_backend(scan="auto")
    for backend in ("cpu", "triton"):
        assert relative_error(results[backend], results["reference"]) <= 1e-5, backend


def test_padding_gives_each_example_its_own_relevance() -> None:
    model = conservative_model(5, n_layer=2)
    generator = torch.Generator().manual_seed(5)
    short, long = torch.randint(1, 40, (6,), generator=generator), torch.randint(1, 40, (10,), generator=generator)
    alone = [explain(model, seq, target=4) for seq in (short, long)]
    right = torch.zeros(2, 10, dtype=torch.long)
    right[0, :6], right[1] = short, long
    right_mask = (torch.arange(10)[None] < torch.tensor([[6], [10]])).long()
    left = torch.zeros(2, 10, dtype=torch.long)
    left[0, 4:], left[1] = short, long
    left_mask = (torch.arange(10)[None] >= torch.tensor([[4], [0]])).long()
    for ids, mask, offset in ((right, right_mask, 0), (left, left_mask, 4)):
        batch = explain(model, ids, target=4, attention_mask=mask)
        assert torch.allclose(batch.relevance[0, offset : offset + 6], alone[0].relevance, rtol=1e-10, atol=1e-13)
        assert torch.allclose(batch.relevance[1], alone[1].relevance, rtol=1e-10, atol=1e-13)
        assert torch.all(batch.relevance[0][mask[0] == 0] == 0)
        assert torch.allclose(batch.output, torch.stack([alone[0].output, alone[1].output]), rtol=1e-12)
        assert batch.position.tolist() == [offset + 5 if offset == 0 else 9, 9]


def test_latent_relevance_at_a_layer() -> None:
    model = conservative_model(6, n_layer=3)
    ids = torch.randint(0, 40, (1, 20))
    explanation = explain(model, ids, layer=2)
    assert explanation.layer == 2 and explanation.relevance.shape == (1, 20)
    assert torch.allclose(explanation.relevance.sum(-1), explanation.output, rtol=1e-6)
    assert torch.allclose(explanation.relevance.sum(-1), explanation.layer_sums[:, 2])


def test_targets_positions_and_top_prediction() -> None:
    model = conservative_model(7, n_layer=1)
    ids = torch.randint(0, 40, (3, 8))
    explanation = explain(model, ids, target=[1, 2, 3], position=[2, -1, 5])
    assert explanation.target.tolist() == [1, 2, 3] and explanation.position.tolist() == [2, 7, 5]
    with torch.no_grad():
        logits = model(ids)
    assert torch.allclose(explanation.output, logits[[0, 1, 2], [2, 7, 5], [1, 2, 3]])
    top = explain(model, ids[0])
    assert int(top.target) == int(logits[0, -1, :40].argmax())


class WordTokenizer:
    """A tiny word-piece-like tokenizer: words split into 2-letter pieces, continuation '##'."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {"[PAD]": 0}
        self.pad_token_id = 0

    def _pieces(self, text: str) -> list[str]:
        pieces = []
        for word in text.split():
            pieces += [word[:2]] + ["##" + word[i : i + 2] for i in range(2, len(word), 2)]
        return pieces

    def __call__(self, texts: list[str], return_tensors: str = "pt", padding: bool = False) -> dict:
        rows = [[self.vocabulary.setdefault(piece, len(self.vocabulary)) % 40 for piece in self._pieces(t)]
                for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        inverse = {value % 40: key for key, value in self.vocabulary.items()}
        return [inverse.get(i, "[UNK]") for i in ids]


def test_text_input_save_load_and_words(tmp_path) -> None:
    model = conservative_model(8, n_layer=1)
    tokenizer = WordTokenizer()
    explanation = explain(model, "hello big world", tokenizer=tokenizer)
    assert explanation.tokens == ["he", "##ll", "##o", "bi", "##g", "wo", "##rl", "##d"]
    words = explanation.to_words()
    assert [word for word, _ in words] == ["hello", "big", "world"]
    assert sum(score for _, score in words) == pytest.approx(float(explanation.relevance.sum()), rel=1e-12)
    path = explanation.save(tmp_path / "saved")
    loaded = Explanation.load(path)
    assert torch.equal(loaded.relevance, explanation.relevance) and loaded.tokens == explanation.tokens
    assert loaded.method == "mamba_lrp" and torch.equal(loaded.target, explanation.target)
    assert "Explanation(method='mamba_lrp'" in repr(explanation)
    batch = explain(model, ["hello big world", "tiny"], tokenizer=tokenizer)
    assert batch.relevance.shape == (2, 8) and batch.position.tolist() == [7, 1]


def test_every_composite_is_a_method() -> None:
    assert {"mamba_lrp", "lrp_ln_rule", "gradient_x_input", "mamba_lrp_no_ssm"} <= set(method_names())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.tensor([1, 2, 99])}, "token id 99"),
        ({"input_ids": torch.tensor([1.0, 2.0])}, "integer token ids"),
        ({"target": 41}, "`target`"),
        ({"target": -1}, "`target`"),
        ({"position": 5}, "`position` 5 is out of range"),
        ({"position": -6}, "`position` -6 is out of range"),
        ({"attention_mask": torch.ones(1, 4)}, "`attention_mask` must be a tensor of shape"),
        ({"attention_mask": torch.tensor([[1, 2, 1, 1, 1]])}, "only 0"),
        ({"method": "magic"}, "unknown method 'magic'; known methods: .*mamba_lrp"),
        ({"layer": 9}, "`layer`"),
        ({"input_ids": "some text"}, "tokenizer"),
    ],
)
def test_bad_input(arguments: dict, message: str) -> None:
    model = conservative_model(9, n_layer=1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    call = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), **arguments}
    with pytest.raises(ValueError, match=message):
        explain(model, **call)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_recomputing_blocks_gives_the_same_relevance() -> None:
    model = conservative_model(10, n_layer=3)
    ids = torch.randint(0, 40, (2, 30))
    plain = explain(model, ids, target=5)
    recomputed = explain(model, ids, target=5, recompute_blocks=True)
    assert model.recompute_blocks is False
    assert torch.allclose(recomputed.relevance, plain.relevance, rtol=1e-12, atol=1e-15)
    assert torch.allclose(recomputed.layer_sums, plain.layer_sums, rtol=1e-12)
