"""H3 (REFERENCE.md 4): one layer against a hand-written fp64 loop over time with complex numbers,
the attention layer against a hand-written softmax, FFT path = recurrent path (every scan backend),
decoding with the state cache = the full forward, padding, and config / input validation."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from ssm_models import H3LM, H3Config
from ssm_models.h3 import H3Attention, H3Mixer
from tests.helpers import relative_error, single_torch_thread

VOCAB = 45


@pytest.fixture(autouse=True)
def _one_thread():
    with single_torch_thread():
        yield


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter perturbed (biases, norms, SSM parameters, shift B too), so that every one matters."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        if name.endswith("log_dt"):
            parameter.copy_(torch.empty_like(parameter).uniform_(math.log(0.01), math.log(0.5), generator=generator))
        elif name.endswith(("inv_A_real", "A_imag")):
            parameter.add_(0.2 * noise)
        elif name.endswith("ssm_k_kernel.kernel.B"):
            parameter.add_(0.3 * noise)
        elif name.endswith(("norm1.weight", "norm2.weight", "ln_f.weight")):
            parameter.copy_(1 + 0.3 * noise)
        elif name.endswith("bias"):
            parameter.copy_(0.3 * noise)
        elif name.endswith(("weight",)) and parameter.dim() == 2:
            parameter.copy_(noise / math.sqrt(parameter.shape[-1]))
        else:
            parameter.add_(0.1 * noise)
    return module


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> H3LM:
    torch.manual_seed(seed)
    fields = dict(d_model=16, n_layer=3, vocab_size=VOCAB, d_state=8, attn_layer_idx=(1,), n_head=2)
    fields.update(overrides)
    return randomise(H3LM(H3Config(**fields)), seed).to(dtype).eval()


# ----------------------------------------------------------------------- hand-written references
def reference_h3_layer(mixer: H3Mixer, u: torch.Tensor) -> torch.Tensor:
    """One H3 layer for ``u`` (L, d_model), explicit loops over time with Python complex numbers,
    discretised from the raw parameters (REFERENCE.md 4). Returns (L, d_model) float64."""
    d, hd = mixer.d_model, mixer.head_dim
    H = d // hd
    L = u.shape[0]
    n_taps = mixer.d_state
    p = {name: value.detach().double() for name, value in mixer.named_parameters()}
    q = (u @ p["q_proj.weight"].T + p["q_proj.bias"]).tolist()
    k = (u @ p["k_proj.weight"].T + p["k_proj.bias"]).tolist()
    v = (u @ p["v_proj.weight"].T + p["v_proj.bias"]).tolist()
    shift_B, shift_C = p["ssm_k_kernel.kernel.B"].tolist(), p["ssm_k_kernel.kernel.C"][0].tolist()
    D_k, D = p["ssm_k_D"].tolist(), p["D"].tolist()
    kernel = {name[len("kernel.kernel."):]: value for name, value in p.items() if name.startswith("kernel.kernel.")}
    modes = kernel["A_imag"].shape[1]
    dA, dB, C = [[0j] * modes for _ in range(H)], [[0j] * modes for _ in range(H)], [[0j] * modes for _ in range(H)]
    for h in range(H):
        dt = math.exp(float(kernel["log_dt"][h]))
        for n in range(modes):
            A = complex(-math.exp(float(kernel["inv_A_real"][h, n])), float(kernel["A_imag"][h, n]))
            B = complex(*kernel["B"][h, n].tolist())
            C[h][n] = complex(*kernel["C"][0, h, n].tolist())
            if mixer.kernel.kernel.discretization == "bilinear":
                dA[h][n] = (1 + dt * A / 2) / (1 - dt * A / 2)
                dB[h][n] = B * dt / (1 - dt * A / 2)
            else:
                dA[h][n] = cmath.exp(dt * A)
                dB[h][n] = B * (cmath.exp(dt * A) - 1) / A
    register = [[0.0] * n_taps for _ in range(d)]  # shift SSM state per channel
    state = [[[[0j] * modes for _ in range(H)] for _ in range(hd)] for _ in range(hd)]  # [i][j][h][n]
    out = []
    for t in range(L):
        shifted = [0.0] * d
        for c in range(d):
            register[c] = [0.0] + register[c][:-1]
            register[c] = [register[c][n] + shift_B[c][n] * k[t][c] for n in range(n_taps)]
            shifted[c] = sum(shift_C[c][n] * register[c][n] for n in range(n_taps)) + D_k[c] * k[t][c]
        o = [0.0] * d
        for h in range(H):
            for i in range(hd):
                for j in range(hd):
                    kv = shifted[h * hd + i] * v[t][h * hd + j]
                    s = state[i][j][h]
                    for n in range(modes):
                        s[n] = dA[h][n] * s[n] + dB[h][n] * kv
                    y = 2 * sum(C[h][n] * s[n] for n in range(modes)).real + D[h] * kv
                    o[j * H + h] += q[t][h * hd + i] * y
        out.append(o)
    o = torch.tensor(out, dtype=torch.float64)
    return o @ p["output_linear.weight"].T + p["output_linear.bias"]


def reference_attention(attention: H3Attention, u: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention for ``u`` (L, d_model) by loops over queries, rotary embedding as a
    complex rotation of the pairs (x_i, x_{i + r/2}). Returns (L, d_model) float64."""
    p = {name: value.detach().double() for name, value in attention.named_parameters()}
    L, d = u.shape
    heads, size, rotary = attention.n_head, attention.head_size, attention.rotary_dim
    qkv = u @ p["Wqkv.weight"].T + p["Wqkv.bias"]
    q, k, v = (qkv[:, index * d:(index + 1) * d].reshape(L, heads, size) for index in range(3))

    def rotated(x: torch.Tensor, position: int) -> torch.Tensor:
        x = x.clone()
        for i in range(rotary // 2):
            z = complex(x[i], x[i + rotary // 2]) * cmath.exp(1j * position * 10000 ** (-2 * i / rotary))
            x[i], x[i + rotary // 2] = z.real, z.imag
        return x

    out = torch.zeros(L, heads, size, dtype=torch.float64)
    for h in range(heads):
        keys = [rotated(k[s, h], s) for s in range(L)]
        for t in range(L):
            query = rotated(q[t, h], t)
            scores = torch.stack([query @ keys[s] / math.sqrt(size) for s in range(t + 1)])
            weights = torch.softmax(scores, 0)
            out[t, h] = sum(weights[s] * v[s, h] for s in range(t + 1))
    return out.reshape(L, d) @ p["out_proj.weight"].T + p["out_proj.bias"]


@pytest.mark.parametrize("head_dim, discretization", [(1, "bilinear"), (2, "bilinear"), (1, "zoh"), (4, "zoh")])
@pytest.mark.parametrize("path", ["fft", "recurrent"])
def test_layer_equals_hand_written_loop(head_dim: int, discretization: str, path: str) -> None:
    torch.manual_seed(head_dim)
    config = H3Config(d_model=8, n_layer=1, vocab_size=10, d_state=6, head_dim=head_dim,
                      discretization=discretization)
    mixer = randomise(H3Mixer(config), head_dim).double()
    for module in (mixer.ssm_k_kernel, mixer.kernel):
        module.path = path
    u = torch.randn(2, 11, 8, dtype=torch.float64)
    ours = mixer(u)
    for row in range(2):
        assert relative_error(ours[row], reference_h3_layer(mixer, u[row])) < 1e-12


@pytest.mark.parametrize("rotary", [0, 4])
def test_attention_equals_hand_written_softmax(rotary: int) -> None:
    config = H3Config(d_model=12, n_layer=1, vocab_size=10, attn_layer_idx=(0,), n_head=2, rotary_emb_dim=rotary)
    attention = randomise(H3Attention(config), 3).double()
    u = torch.randn(1, 9, 12, dtype=torch.float64)
    assert relative_error(attention(u)[0], reference_attention(attention, u[0])) < 1e-12


def test_model_is_built_from_primitives_with_public_names() -> None:
    model = H3LM(H3Config(d_model=16, n_layer=2, vocab_size=50257, d_state=8, attn_layer_idx=(1,), n_head=2))
    names = dict(model.named_parameters())
    assert model.embedding.weight.shape == (50264, 16)  # padded to a multiple of 8, as the public models
    assert model.lm_head.weight is model.embedding.weight
    shapes = {
        "backbone.embeddings.word_embeddings.weight": (50264, 16),
        "backbone.layers.0.norm1.weight": (16,),
        "backbone.layers.0.mixer.q_proj.bias": (16,),
        "backbone.layers.0.mixer.ssm_k_D": (16,),
        "backbone.layers.0.mixer.ssm_k_kernel.kernel.B": (16, 8),
        "backbone.layers.0.mixer.ssm_k_kernel.kernel.C": (1, 16, 8),
        "backbone.layers.0.mixer.D": (16,),
        "backbone.layers.0.mixer.kernel.kernel.log_dt": (16,),
        "backbone.layers.0.mixer.kernel.kernel.B": (16, 4, 2),
        "backbone.layers.0.mixer.kernel.kernel.inv_A_real": (16, 4),
        "backbone.layers.0.mixer.kernel.kernel.A_imag": (16, 4),
        "backbone.layers.0.mixer.kernel.kernel.C": (1, 16, 4, 2),
        "backbone.layers.0.mixer.output_linear.weight": (16, 16),
        "backbone.layers.0.mlp.fc1.weight": (64, 16),
        "backbone.layers.1.mixer.Wqkv.weight": (48, 16),
        "backbone.layers.1.mixer.out_proj.bias": (16,),
        "backbone.ln_f.bias": (16,),
    }
    for name, shape in shapes.items():
        assert tuple(names[name].shape) == shape, name
    kernel = model.backbone.layers[0].mixer.kernel.kernel  # S4D-Lin init
    assert torch.allclose(-torch.exp(kernel.inv_A_real), torch.full((16, 4), -0.5))
    assert torch.allclose(kernel.A_imag[3], math.pi * torch.arange(4.0))
    assert torch.equal(kernel.B, torch.stack([torch.ones(16, 4), torch.zeros(16, 4)], -1))
    assert bool((kernel.log_dt >= math.log(1e-3)).all() and (kernel.log_dt <= math.log(1e-1)).all())
    assert torch.equal(model.backbone.layers[0].mixer.ssm_k_kernel.kernel.B[:, 0], torch.ones(16))
    from ssm_models.primitives import Attention, GatingProduct

    kinds = [type(module) for module in model.modules()]
    assert kinds.count(GatingProduct) == 2 and kinds.count(Attention) == 1
    assert kinds.count(torch.nn.LayerNorm) == 5
    gelus = [module for module in model.modules() if isinstance(module, torch.nn.GELU)]
    assert len(gelus) == 2 and all(gelu.approximate == "tanh" for gelu in gelus)


# ------------------------------------------------------------------------------ the two paths
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("head_dim", [1, 2])
def test_fft_path_equals_recurrent_path(dtype: torch.dtype, tolerance: float, head_dim: int) -> None:
    model = tiny_lm(head_dim, dtype, head_dim=head_dim)
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        fft = model.set_backend(ssm="fft")(ids)
        for scan in ("reference", "cpu"):
            recurrent = model.set_backend(ssm="recurrent", scan=scan)(ids)
            assert relative_error(recurrent, fft) <= tolerance, scan


def test_paths_agree_at_length_256_with_zoh() -> None:
    model = tiny_lm(5, torch.float32, discretization="zoh", d_state=16)
    ids = torch.randint(0, VOCAB, (1, 256))
    with torch.no_grad():
        assert relative_error(model.set_backend(ssm="recurrent", scan="cpu")(ids), model.set_backend(ssm="fft")(ids)) \
            <= 1e-5


def test_triton_scan_backend_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("ssm_models.ops.diagonal_scan_triton")
    model = tiny_lm(2, torch.float32, n_layer=1, attn_layer_idx=())
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = model.set_backend(ssm="fft")(ids)
        assert relative_error(model.set_backend(ssm="recurrent", scan="triton")(ids), expected) <= 1e-5


def test_gradients_agree_between_paths() -> None:
    model = tiny_lm(3, torch.float64, n_layer=2, attn_layer_idx=())
    ids = torch.randint(0, VOCAB, (1, 20))
    gradients = []
    for path in ("fft", "recurrent"):
        model.zero_grad()
        model.set_backend(ssm=path, scan="cpu")(ids)[0, -1].logsumexp(-1).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert relative_error(gradients[1], gradients[0]) < 1e-10


# ----------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("prompt_length", [1, 5, 11])
@pytest.mark.parametrize("path", ["fft", "recurrent"])
def test_generate_equals_full_forward(prompt_length: int, path: str) -> None:
    model = tiny_lm(prompt_length, torch.float64, head_dim=2, rotary_emb_dim=4).set_backend(ssm=path)
    prompt = torch.randint(0, VOCAB, (2, prompt_length))
    ids, step_logits = model.generate(prompt, max_new_tokens=7, return_logits=True)
    assert ids.shape == (2, prompt_length + 7)
    with torch.no_grad():
        full = model(ids[:, :-1])[:, prompt_length - 1:]
    assert relative_error(step_logits, full) <= 1e-12  # the acceptance bound is 1e-6
    assert torch.equal(ids[:, prompt_length:], step_logits[..., :VOCAB].argmax(-1))


def test_generate_in_float32() -> None:
    model = tiny_lm(4, torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 6))
    ids, step_logits = model.generate(prompt, max_new_tokens=5, return_logits=True)
    with torch.no_grad():
        assert relative_error(step_logits, model(ids[:, :-1])[:, 5:]) <= 1e-5


# ------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", ["fft", "recurrent"])
def test_padding_gives_each_real_position_its_unpadded_output(side: str, path: str) -> None:
    model = tiny_lm(7, torch.float64, head_dim=2, rotary_emb_dim=4).set_backend(ssm=path)
    lengths, total = [9, 5, 13], 13
    rows = [torch.randint(0, VOCAB, (length,)) for length in lengths]
    ids = torch.full((3, total), 3, dtype=torch.long)  # pad id 3: a real id, so its embedding is not zero
    mask = torch.zeros(3, total, dtype=torch.long)
    for index, row in enumerate(rows):
        where = slice(total - len(row), total) if side == "left" else slice(0, len(row))
        ids[index, where], mask[index, where] = row, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        for index, row in enumerate(rows):
            alone = model(row[None])[0]
            assert relative_error(padded[index][mask[index].bool()], alone) < 1e-12
        assert torch.isfinite(padded).all()
        if side == "left":  # (right padding is invisible to a causal model even without the mask)
            unmasked = model(ids)[1][mask[1].bool()]
            assert relative_error(unmasked, model(rows[1][None])[0]) > 1e-3  # the mask matters


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 10, "head_dim": 4}, "head_dim"),
        ({"d_model": 10, "n_head": 4}, "n_head"),
        ({"d_state": 7}, "d_state"),
        ({"d_state": 0}, "d_state"),
        ({"discretization": "euler"}, "discretization"),
        ({"attn_layer_idx": (3,)}, "attn_layer_idx"),
        ({"attn_layer_idx": (-1,)}, "attn_layer_idx"),
        ({"attn_layer_idx": (1, 1)}, "attn_layer_idx"),
        ({"attn_layer_idx": 1}, "attn_layer_idx"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"rotary_emb_dim": 3}, "rotary_emb_dim"),
        ({"rotary_emb_dim": 32, "n_head": 2}, "rotary_emb_dim"),
        ({"d_inner": 0}, "d_inner"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str) -> None:
    fields = dict(d_model=16, n_layer=3, vocab_size=VOCAB, d_state=8)
    fields.update(overrides)
    with pytest.raises(ValueError, match=field):
        H3Config(**fields)


def test_config_from_dict_rejects_unknown_fields() -> None:
    config = H3Config.from_dict({"d_model": 8, "n_layer": 2, "vocab_size": 9, "attn_layer_idx": [1]})
    assert config.attn_layer_idx == (1,)
    with pytest.raises(ValueError, match="d_modle"):
        H3Config.from_dict({"d_modle": 8, "n_layer": 2, "vocab_size": 9})


def test_bad_inputs_and_backends() -> None:
    model = tiny_lm(0, torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[0, 1000]]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="ssm"):
        model.set_backend(ssm="direct")
    with pytest.raises(ValueError, match="scan"):
        model.set_backend(scan="cuda")


def test_bfloat16_model_runs_its_ssms_in_float32() -> None:
    model = tiny_lm(8, torch.float32)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = model(ids)
        low = model.to(torch.bfloat16)(ids)
        generated = model.generate(ids[:, :4], max_new_tokens=3)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert relative_error(low, expected) < 0.05
    assert generated.shape == (2, 7)
