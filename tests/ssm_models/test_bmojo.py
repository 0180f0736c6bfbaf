"""B'MOJO: the special cases (Mamba, causal transformer), the chunked attention against a dense
(L, L) reference written here from the rules of ssm_models/bmojo.py's docstring, the eidetic
selection, introspection, padding, decoding, saving and bad configs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssm_models import BMojoConfig, BMojoLM, MambaConfig, MambaLM, load_pretrained
from tests.helpers import relative_error, single_torch_thread

VOCAB = 40


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (norm weights, D, biases too), attention scores of order 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        if name.endswith("A_log"):
            parameter.add_(0.3 * noise)
        elif "norm" in name:
            parameter.copy_(1.0 + 0.3 * noise)
        elif name.endswith("dt_proj.bias"):
            parameter.copy_(noise - 2.0)
        elif parameter.dim() > 1:
            fan_in = 1 if name.endswith("embedding.weight") else math.prod(parameter.shape[1:])
            parameter.copy_(noise * fan_in**-0.5)
        else:
            parameter.copy_(0.3 * noise)
    return model


def bmojo(seed: int = 0, **fields) -> BMojoLM:
    defaults = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, window=8, n_head=2, n_memory_tokens=3,
                    eidetic_per_chunk=2, eidetic_budget=5)
    torch.manual_seed(seed)
    return randomise(BMojoLM(BMojoConfig(**{**defaults, **fields})).double().eval(), seed)


def random_ids(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def gelu_mlp(block, h: torch.Tensor, eps: float) -> torch.Tensor:
    a = rms_norm(h, block.mlp_norm.weight, eps)
    hidden = a @ block.mlp.fc1.weight.T
    return 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3))) @ \
        block.mlp.fc2.weight.T


def dense_attention(block, a: torch.Tensor, allowed: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d_head), masked by ``allowed`` (L, L)) v for one row ``a`` (L, D); returns the
    output projection (L, D) and the head-averaged probabilities (L, L)."""
    attn = block.attn
    length, d_model = a.shape
    d_head = d_model // n_head

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(length, n_head, d_head).transpose(0, 1)

    q, k, v = heads(a @ attn.q_proj.weight.T), heads(a @ attn.k_proj.weight.T), heads(a @ attn.v_proj.weight.T)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(d_head)
    probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (probabilities @ v).transpose(0, 1).reshape(length, d_model)
    return out @ attn.out_proj.weight.T, probabilities.mean(0)


def reference_bmojo_layer(block, config: BMojoConfig, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One B'MOJO layer on one row ``x`` (L, D), with the attention written densely from the rules
    (its record holds the head-mean probabilities (L, L) under ``probabilities``):
    window = s <= t in chunks c-1 and c; memory = ends of the n_memory most recent chunks j <= c-2;
    eidetic = the first `budget` of the per-chunk top-k selections of chunks c-2, c-3, ..."""
    length, w, eps = x.shape[0], config.window, config.norm_eps
    if config.use_ssm:
        u = rms_norm(x, block.norm.weight, eps)
        y = block.mixer(u[None])[0]  # the Mamba mixer is tested against transformers elsewhere
        h = x + y
    else:
        h = x
    a = rms_norm(h, block.attn_norm.weight, eps)
    if not config.use_ssm:
        u = y = a
    scores = [1.0] + [1 - float(u[t] @ y[t - 1] / (u[t].norm() * y[t - 1].norm())) for t in range(1, length)]
    n_chunks = math.ceil(length / w)
    selected = []
    k = config.eidetic_per_chunk if config.variant == "bmojo" else 0
    for chunk in range(n_chunks):
        candidates = [t for t in range(chunk * w, min(chunk * w + w, length)) if t != chunk * w + w - 1]
        selected.append(sorted(candidates, key=lambda t: -scores[t])[:k])
    allowed = torch.zeros(length, length, dtype=torch.bool)
    source = torch.zeros(length, length, dtype=torch.long)  # 0 window, 1 memory, 2 eidetic
    for t in range(length):
        chunk = t // w
        for s in range(max(chunk - 1, 0) * w, t + 1):
            allowed[t, s] = True
        memory = [j * w + w - 1 for j in range(chunk - 2, -1, -1)][: config.n_memory_tokens]
        eidetic = [s for j in range(chunk - 2, -1, -1) for s in selected[j]][: config.eidetic_budget]
        for s in memory:
            allowed[t, s], source[t, s] = True, 1
        for s in eidetic:
            allowed[t, s], source[t, s] = True, 2
    out, probabilities = dense_attention(block, a, allowed, config.n_head)
    h = h + out
    if config.mlp_expand:
        h = h + gelu_mlp(block, h, eps)
    mass = torch.stack([(probabilities * (source == index)).sum(-1) for index in range(3)], dim=-1)
    return h, {"scores": torch.tensor(scores, dtype=x.dtype), "selected": selected, "mass": mass,
               "probabilities": probabilities}


def reference_logits(model: BMojoLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Logits (L, V) of one row ``ids`` (L,) through :func:`reference_bmojo_layer`."""
    config = model.config
    hidden = model.backbone.embedding.weight[ids]
    details = []
    for block in model.backbone.layers:
        hidden, record = reference_bmojo_layer(block, config, hidden)
        details.append(record)
    return rms_norm(hidden, model.backbone.norm_f.weight, config.norm_eps) @ model.lm_head.weight.T, details


# ---------------------------------------------------------------------------- special cases
def test_attention_off_is_mamba_on_the_same_weights() -> None:
    torch.manual_seed(0)
    mamba = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)).double().eval()
    randomise(mamba, 1)
    model = BMojoLM(BMojoConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4, use_attention=False)).double()
    model.load_state_dict(mamba.state_dict())  # strict: exactly Mamba's parameter names
    assert sorted(model.state_dict()) == sorted(mamba.state_dict())
    ids = random_ids(2, 2, 50)
    with torch.no_grad():
        assert relative_error(model.eval()(ids), mamba(ids)) <= 1e-12


@pytest.mark.parametrize("mlp_expand", [0, 2])
def test_no_ssm_and_window_covering_the_sequence_is_a_causal_transformer(mlp_expand: int) -> None:
    length = 37
    model = bmojo(3, use_ssm=False, window=40, n_head=4, mlp_expand=mlp_expand)
    ids = random_ids(3, 2, length)
    config, eps = model.config, model.config.norm_eps
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = []
    with torch.no_grad():
        for row in ids:
            hidden = model.backbone.embedding.weight[row]
            for block in model.backbone.layers:
                out, _ = dense_attention(block, rms_norm(hidden, block.attn_norm.weight, eps), causal, config.n_head)
                hidden = hidden + out
                if mlp_expand:
                    hidden = hidden + gelu_mlp(block, hidden, eps)
            expected.append(rms_norm(hidden, model.backbone.norm_f.weight, eps) @ model.lm_head.weight.T)
        assert relative_error(model(ids), torch.stack(expected)) <= 1e-10


# ------------------------------------------------------------------- chunked attention, dense
CHUNKED_CASES = [
    dict(),  # L=70, w=8: short last chunk; budget 5 = two chunks and a half
    dict(window=16, n_memory_tokens=1, eidetic_per_chunk=3, eidetic_budget=6, mlp_expand=2),
    dict(use_ssm=False, window=8, eidetic_budget=64),
    dict(variant="bmojo_f", n_memory_tokens=10),
]


@pytest.mark.parametrize("fields", CHUNKED_CASES)
def test_chunked_attention_equals_the_dense_reference(fields: dict) -> None:
    model = bmojo(4, **fields)
    ids = random_ids(4, 2, 70 if fields.get("window", 8) == 8 else 64)
    with torch.no_grad():
        logits = model(ids)
        inspection = model.inspect(ids)
        for row in range(ids.shape[0]):
            expected, details = reference_logits(model, ids[row])
            assert relative_error(logits[row], expected) <= 1e-10
            for layer, record in enumerate(details):
                assert relative_error(inspection.innovation[layer, row], record["scores"]) <= 1e-10
                assert relative_error(inspection.attention_mass[layer, row], record["mass"]) <= 1e-10
                for chunk, positions in enumerate(record["selected"]):
                    got = [p for p in inspection.selected[layer, row, chunk].tolist() if p >= 0]
                    assert got == positions, (layer, chunk)
    assert torch.equal(inspection.logits, logits)


@pytest.mark.parametrize("length", [1, 2, 5, 11])
@pytest.mark.parametrize("fields", [dict(window=1, eidetic_per_chunk=0), dict(window=2, eidetic_per_chunk=1),
                                    dict(use_ssm=False, window=3, eidetic_budget=3)])
def test_short_sequences_and_tiny_windows_equal_the_dense_reference(fields: dict, length: int) -> None:
    model = bmojo(14, **fields)
    ids = random_ids(14, 1, length)
    with torch.no_grad():
        expected, _ = reference_logits(model, ids[0])
        assert relative_error(model(ids)[0], expected) <= 1e-10
        ids_out, step_logits = model.generate(ids, max_new_tokens=2, return_logits=True)
        assert relative_error(step_logits, model(ids_out[:, :-1])[:, length - 1:]) <= 1e-12


def test_selected_positions_are_the_top_k_innovations_of_each_chunk() -> None:
    model = bmojo(5, window=8, eidetic_per_chunk=3)
    inspection = model.inspect(random_ids(5, 2, 60))
    w = 8
    for layer in range(2):
        for row in range(2):
            scores = inspection.innovation[layer, row]
            for chunk in range(8):
                candidates = [t for t in range(chunk * w, min(chunk * w + w - 1, 60))]
                top = sorted(candidates, key=lambda t: -float(scores[t]))[:3]
                assert inspection.selected[layer, row, chunk].tolist() == top
    assert float(inspection.innovation.min()) >= 0 and float(inspection.innovation.max()) <= 2
    assert torch.all(inspection.innovation[:, :, 0] == 1)


def test_bmojo_f_never_uses_eidetic_tokens_and_budget_zero_equals_it() -> None:
    ids = random_ids(6, 2, 64)
    full = bmojo(6)
    fading = bmojo(6, variant="bmojo_f")
    no_budget = bmojo(6, eidetic_budget=0)
    inspection = fading.inspect(ids)
    assert inspection.selected.shape[-1] == 0 and inspection.eidetic.shape[-1] == 0
    assert torch.all(inspection.attention_mass[..., 2] == 0)
    assert torch.all(no_budget.inspect(ids).attention_mass[..., 2] == 0)
    full_inspection = full.inspect(ids)
    assert float(full_inspection.attention_mass[..., 2].max()) > 0.01
    assert torch.allclose(full_inspection.attention_mass.sum(-1), torch.ones(2, 2, 64, dtype=torch.float64))
    with torch.no_grad():
        assert torch.equal(no_budget(ids), fading(ids))
        assert relative_error(full(ids), fading(ids)) > 1e-6


def test_visible_memory_and_eidetic_positions_follow_the_rules() -> None:
    model = bmojo(7, window=4, n_memory_tokens=2, eidetic_per_chunk=1, eidetic_budget=3)
    inspection = model.inspect(random_ids(7, 1, 32))
    assert inspection.memory.shape == (2, 1, 8, 2) and inspection.eidetic.shape == (2, 1, 8, 3)
    assert inspection.memory[0, 0].tolist() == [[-1, -1], [-1, -1], [3, -1], [7, 3], [11, 7], [15, 11], [19, 15],
                                                 [23, 19]]
    selected = inspection.selected[0, 0, :, 0].tolist()
    for chunk in range(8):
        expected = [selected[j] for j in range(chunk - 2, -1, -1)][:3]
        assert inspection.eidetic[0, 0, chunk].tolist() == expected + [-1] * (3 - len(expected))


# --------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("variant", ["bmojo", "bmojo_f"])
def test_left_and_right_padding_give_the_unpadded_logits(variant: str) -> None:
    model = bmojo(8, variant=variant, mlp_expand=1)
    lengths, total = [45, 30, 19], 50
    rows = [random_ids(10 + index, 1, length)[0] for index, length in enumerate(lengths)]
    with torch.no_grad():
        unpadded = [model(row[None])[0] for row in rows]
        unpadded_inspection = [model.inspect(row[None]) for row in rows]
        for side in ("left", "right"):
            ids = torch.zeros(3, total, dtype=torch.long)
            mask = torch.zeros(3, total, dtype=torch.long)
            starts = [total - length if side == "left" else 0 for length in lengths]
            for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
                ids[index, start:start + len(row)] = row
                mask[index, start:start + len(row)] = 1
            logits = model(ids, attention_mask=mask)
            inspection = model.inspect(ids, attention_mask=mask)
            for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
                span = slice(start, start + len(row))
                assert relative_error(logits[index, span], unpadded[index]) <= 1e-10, (side, index)
                single = unpadded_inspection[index]
                n_chunks = single.selected.shape[2]
                shifted = torch.where(single.selected >= 0, single.selected + start, -1)[:, 0]
                assert torch.equal(inspection.selected[:, index, :n_chunks], shifted)
                assert torch.all(inspection.selected[:, index, n_chunks:] == -1)
                assert relative_error(inspection.attention_mass[:, index, span], single.attention_mass[:, 0]) <= 1e-10
                assert torch.all(inspection.attention_mass[:, index, mask[index] == 0] == 0)
                assert int(inspection.chunk_offset[index]) == start


def test_non_contiguous_padding_is_refused() -> None:
    model = bmojo(9)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 10] = 0
    with pytest.raises(ValueError, match="contiguous"):
        model(random_ids(9, 1, 20), attention_mask=mask)


# ------------------------------------------------------------------------ decoding, saving
def test_generate_logits_equal_the_full_forward() -> None:
    model = bmojo(11, window=4)
    prompt = random_ids(11, 2, 13)
    ids, step_logits = model.generate(prompt, max_new_tokens=8, return_logits=True)
    assert ids.shape == (2, 21) and torch.equal(ids[:, :13], prompt)
    with torch.no_grad():
        full = model(ids[:, :-1])[:, 12:]
    assert relative_error(step_logits, full) <= 1e-12
    assert torch.equal(ids[:, 13:], step_logits[..., :VOCAB].argmax(-1))


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path: Path, tie: bool) -> None:
    model = bmojo(12, tie_embeddings=tie, mlp_expand=2, attn_bias=True, variant="bmojo_f")
    model.save_pretrained(tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    assert isinstance(loaded, BMojoLM) and loaded.config == model.config
    ids = random_ids(12, 2, 30)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    assert BMojoLM.from_pretrained(tmp_path / "model").config.variant == "bmojo_f"


# ----------------------------------------------------------------------------- bad configs
BAD_CONFIGS = [
    ("window", 0), ("window", 2.5), ("n_head", 0), ("n_head", 3), ("n_memory_tokens", -1), ("eidetic_budget", -1),
    ("eidetic_per_chunk", -2), ("eidetic_per_chunk", 8), ("mlp_expand", -1), ("variant", "bmojo-x"),
    ("use_ssm", 1), ("use_attention", "yes"), ("attn_bias", None), ("d_model", 0), ("d_state", 0),
    ("dt_rank", "big"), ("norm_eps", 0.0), ("architecture", "mamba"),
]


@pytest.mark.parametrize(("name", "value"), BAD_CONFIGS)
def test_bad_config_fields_raise_value_error_naming_them(name: str, value: object) -> None:
    fields = dict(d_model=16, n_layer=2, vocab_size=VOCAB, window=8)
    match = "d_model" if (name, value) == ("n_head", 3) else name
    with pytest.raises(ValueError, match=match):
        BMojoConfig(**{**fields, name: value})


def test_both_sublayers_off_is_refused() -> None:
    with pytest.raises(ValueError, match="use_ssm"):
        BMojoConfig(d_model=16, n_layer=1, vocab_size=VOCAB, use_ssm=False, use_attention=False)


def test_inspect_needs_attention() -> None:
    model = bmojo(13, use_attention=False)
    with pytest.raises(ValueError, match="use_attention"):
        model.inspect(random_ids(13, 1, 8))
