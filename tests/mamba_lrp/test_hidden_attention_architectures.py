"""Hidden attention on H3 and B'MOJO (issue #5): every layer kind's ``left_product`` and ``row_sums``
against a dense (L, L) hidden-attention matrix built here by brute force (H3: loops over the
parameters, checked to reproduce the mixer's output; attention: dense probabilities; B'MOJO: the
dense reference of tests/ssm_models/test_bmojo.py and the Jacobian of the sequential reference scan),
the full rollout and G x AttnRoll rows against the dense matrix products, and every method name
of ``explain()`` on MambaLM, H3LM and BMojoLM with padding."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

import mamba_lrp
from mamba_lrp import explain
from mamba_lrp.hidden_attention import capture_mixing_layers
from ssm_models import H3LM, BMojoConfig, BMojoLM, H3Config, MambaConfig, MambaLM
from ssm_models.h3 import H3Attention, H3Mixer
from ssm_models.lm_base import SequenceLM
from ssm_models.ops.selective_scan import selective_scan_reference
from tests.helpers import relative_error, single_torch_thread
from tests.ssm_models.test_bmojo import randomise, reference_bmojo_layer

VOCAB = 40
LENGTH = 24
PAD = 5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


# ----------------------------------------------------------------------------------- models
def h3_model(head_dim: int, attention: bool, discretization: str = "bilinear", path: str = "recurrent") -> H3LM:
    torch.manual_seed(0)
    config = H3Config(d_model=8, n_layer=3, vocab_size=VOCAB, d_state=4, head_dim=head_dim, n_head=2,
                      attn_layer_idx=(1,) if attention else (), discretization=discretization)
    model = randomise(H3LM(config).double().eval(), 1)
    with torch.no_grad():  # step sizes that give kernels of a few tens of taps
        for block in model.blocks:
            if isinstance(block.mixer, H3Mixer):
                log_dt = block.mixer.kernel.kernel.log_dt
                log_dt.copy_(torch.empty_like(log_dt).uniform_(math.log(0.05), math.log(0.5)))
    return model.set_backend(ssm=path)


def bmojo_model(variant: str = "bmojo") -> BMojoLM:
    torch.manual_seed(0)
    config = BMojoConfig(d_model=8, n_layer=2, vocab_size=VOCAB, d_state=4, window=6, n_head=2, n_memory_tokens=2,
                         eidetic_per_chunk=2, eidetic_budget=3, variant=variant)
    return randomise(BMojoLM(config).double().eval(), 2)


def mamba_model() -> MambaLM:
    torch.manual_seed(0)
    return randomise(MambaLM(MambaConfig(d_model=8, n_layer=2, vocab_size=VOCAB, d_state=4)).double().eval(), 3)


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of LENGTH tokens: row 0 with PAD padded positions (left or right), row 1 full."""
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    if side == "left":
        mask[0, :PAD] = 0
    else:
        mask[0, LENGTH - PAD:] = 0
    return ids * mask, mask


# --------------------------------------------------------------------- dense references (one row)
def h3_kernel(mixer: H3Mixer, length: int) -> torch.Tensor:
    """``K_h(l) = 2 Re sum_m C_m dB_m dA_m^l`` (H, length), from the S4D parameters by a power loop."""
    kernel = mixer.kernel.kernel
    dt = torch.exp(kernel.log_dt.detach())[:, None].to(torch.complex128)
    A = torch.complex(-torch.exp(kernel.inv_A_real.detach()), kernel.A_imag.detach())
    B = torch.complex(kernel.B[..., 0].detach(), kernel.B[..., 1].detach())
    C = torch.complex(kernel.C[0, ..., 0].detach(), kernel.C[0, ..., 1].detach())
    if kernel.discretization == "bilinear":
        dA, dB = (1 + dt * A / 2) / (1 - dt * A / 2), B * dt / (1 - dt * A / 2)
    else:
        dA, dB = torch.exp(dt * A), B * (torch.exp(dt * A) - 1) / A
    taps, power = [], torch.ones_like(dA)
    for _ in range(length):
        taps.append(2 * (C * dB * power).sum(-1).real)
        power = power * dA
    return torch.stack(taps, dim=1)


def h3_alpha(mixer: H3Mixer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one unpadded row ``hidden`` (L, D) entering the mixer: ``alpha`` (H, L, L) with ``alpha[h, t, s]
    = K_h(t - s) <q_t, k~_s>_h`` by loops, and ``q``, ``k~`` (L, D)."""
    length, d_model = hidden.shape
    hd, heads, n = mixer.head_dim, mixer.n_heads, mixer.d_state
    q = hidden @ mixer.q_proj.weight.T + mixer.q_proj.bias
    k = hidden @ mixer.k_proj.weight.T + mixer.k_proj.bias
    shift_B, shift_C = mixer.ssm_k_kernel.kernel.B, mixer.ssm_k_kernel.kernel.C[0]  # (D, N) each
    taps = torch.stack([sum(shift_B[:, m] * shift_C[:, m + j] for m in range(n - j)) for j in range(n)], dim=1)
    k_tilde = torch.stack([sum(taps[:, j] * k[t - j] for j in range(min(t + 1, n))) + mixer.ssm_k_D * k[t]
                           for t in range(length)])
    K = h3_kernel(mixer, length)
    alpha = torch.zeros(heads, length, length, dtype=torch.float64)
    for h in range(heads):
        channels = slice(h * hd, h * hd + hd)
        for t in range(length):
            for s in range(t + 1):
                alpha[h, t, s] = K[h, t - s] * (q[t, channels] * k_tilde[s, channels]).sum()
    return alpha.detach(), q.detach(), k_tilde.detach()


def h3_attention_probabilities(attention: H3Attention, hidden: torch.Tensor) -> torch.Tensor:
    """Head mean (L, L) of softmax(q k^T / sqrt(d)) under the causal mask, for one unpadded row (L, D)."""
    length = hidden.shape[0]
    qkv = (hidden @ attention.Wqkv.weight.T + attention.Wqkv.bias).view(length, 3, attention.n_head, -1)
    q, k = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1)  # (n_head, L, d)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).mean(0).detach()


def selective_ssm_alpha(args: tuple) -> torch.Tensor:
    """Channel mean (L, L) of Mamba's hidden attention for one row, from the scan inputs ``args`` (u, delta,
    A, B, C, D, delta_bias) of a batch of one: the Jacobian of the sequential reference scan (no D) in u."""
    u, delta, A, B, C, _D, delta_bias = (x.detach() for x in args[:7])
    length = u.shape[-1]
    u = u.clone().requires_grad_(True)
    y = selective_scan_reference(u, delta, A, B[:, None], C[:, None], delta_bias=delta_bias, delta_softplus=True)
    rows = []
    for i in range(length):  # channels do not mix: one backward pass per output position
        (grad,) = torch.autograd.grad(y[0, :, i].sum(), u, retain_graph=True)
        rows.append(grad[0].mean(0))  # (L,): mean_d alpha_ij[d]
    return torch.stack(rows)


def dense_blocks(model: SequenceLM, ids: torch.Tensor) -> list[list[torch.Tensor]]:
    """The channel/head-mean hidden-attention matrices (L, L) of every mixing sub-layer of every block, in
    forward order, for one unpadded row ``ids`` (L,), from the references above."""
    blocks: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    if isinstance(model, BMojoLM):
        config, inputs, scans = model.config, [], []
        hooks = [block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for block in model.blocks]
        hooks += [block.mixer.ssm.register_forward_pre_hook(lambda _m, args: scans.append(args))
                  for block in model.blocks]
        with torch.no_grad():
            model(ids[None])
        for hook in hooks:
            hook.remove()
        for index, block in enumerate(model.blocks):
            with torch.no_grad():
                _, record = reference_bmojo_layer(block, config, inputs[index][0])
            blocks[index] = [selective_ssm_alpha(scans[index]), record["probabilities"].detach()]
        return blocks
    mixer_inputs: list[torch.Tensor] = []
    hooks = [block.mixer.register_forward_pre_hook(lambda _m, args: mixer_inputs.append(args[0]))
             for block in model.blocks]
    with torch.no_grad():
        model(ids[None])
    for hook in hooks:
        hook.remove()
    for index, block in enumerate(model.blocks):
        hidden = mixer_inputs[index][0]
        if isinstance(block.mixer, H3Attention):
            blocks[index] = [h3_attention_probabilities(block.mixer, hidden)]
        else:
            blocks[index] = [h3_alpha(block.mixer, hidden)[0].mean(0)]
    return blocks


def dense_rollout(blocks: list[list[torch.Tensor]], position: int, columns: list[torch.Tensor] | None,
                  start: int) -> torch.Tensor:
    """Row ``position`` of prod over sub-layers (forward order) of (Abar [diag(columns_l)] + I) / rowsum."""
    length = blocks[0][0].shape[0]
    eye = torch.eye(length, dtype=torch.float64)
    joint = eye
    for index in range(start, len(blocks)):
        for matrix in blocks[index]:
            weighted = matrix if columns is None else matrix * columns[index][None, :]
            augmented = weighted + eye
            joint = (augmented / augmented.sum(-1, keepdim=True)) @ joint
    return joint[position]


def gradient_columns(model: SequenceLM, ids: torch.Tensor, position: int, target: int) -> list[torch.Tensor]:
    """min-max normalised ``max_D relu(df/dh^l)`` (L,) per block, one unpadded row, by plain autograd."""
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for block in model.blocks]
    embeddings = model.embed(ids[None]).detach().requires_grad_(True)
    f = model(inputs_embeds=embeddings)[0, position, target]
    for hook in hooks:
        hook.remove()
    columns = []
    for gradient in torch.autograd.grad(f, inputs):
        score = gradient[0].clamp_min(0).amax(-1)
        columns.append((score - score.min()) / (score.max() - score.min()))
    return columns


# -------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("head_dim", "discretization"), [(2, "bilinear"), (1, "zoh")])
def test_h3_alpha_reproduces_the_mixer(head_dim: int, discretization: str) -> None:
    """The H3 definition: ``o_{jH+h,t} = sum_{s<=t} alpha^h_ts v_{h hd+j,s} + D_h <q_t, k~_t>_h v_{h hd+j,t}``
    equals the mixer's pre-``output_linear`` activations."""
    mixer = h3_model(head_dim, attention=False, discretization=discretization).blocks[0].mixer
    hidden = torch.randn(11, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    captured: list[torch.Tensor] = []
    hook = mixer.output_linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        mixer(hidden[None])
    hook.remove()
    alpha, q, k_tilde = h3_alpha(mixer, hidden)
    v = (hidden @ mixer.v_proj.weight.T + mixer.v_proj.bias).detach()
    hd, heads = mixer.head_dim, mixer.n_heads
    expected = torch.zeros(11, 8, dtype=torch.float64)
    for h in range(heads):
        channels = slice(h * hd, h * hd + hd)
        skip = mixer.D[h].detach() * (q[:, channels] * k_tilde[:, channels]).sum(-1)  # (L,)
        for j in range(hd):
            expected[:, j * heads + h] = alpha[h] @ v[:, h * hd + j] + skip * v[:, h * hd + j]
    assert relative_error(captured[0][0], expected) <= 1e-12


MODELS = {
    "h3 head_dim 2 +attention": lambda: h3_model(2, attention=True),
    "h3 head_dim 1 zoh fft": lambda: h3_model(1, attention=False, discretization="zoh", path="fft"),
    "bmojo": lambda: bmojo_model("bmojo"),
    "bmojo_f": lambda: bmojo_model("bmojo_f"),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_layer_products_equal_the_dense_matrices(name: str, side: str) -> None:
    """Per sub-layer, on a padded batch: ``left_product(w)`` = ``w Abar`` and ``row_sums(c)`` = ``Abar c``
    on the real tokens (``w``, ``c`` zero at padding), and exactly 0 in padded columns."""
    model = MODELS[name]()
    ids, mask = padded_batch(side)
    layers, _, _ = capture_mixing_layers(model, ids, mask)
    kinds = {"h3 head_dim 2 +attention": ["H3SSMAttention", "DenseAttention", "H3SSMAttention"],
             "h3 head_dim 1 zoh fft": ["H3SSMAttention"] * 3}.get(name, ["SelectiveSSMAttention", "KeyedAttention"] * 2)
    assert [type(layer).__name__ for block in layers for layer in block] == kinds
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(2, LENGTH, generator=generator, dtype=torch.float64) * mask
    c = torch.rand(2, LENGTH, generator=generator, dtype=torch.float64) * mask
    for row in range(2):
        real = mask[row].bool()
        expected_blocks = dense_blocks(model, ids[row, real])
        for block, expected_block in zip(layers, expected_blocks, strict=True):
            for layer, dense in zip(block, expected_block, strict=True):
                left = layer.left_product(w)[row]
                assert relative_error(left[real], w[row, real] @ dense) <= 1e-10
                assert bool((left[~real] == 0).all())
                assert relative_error(layer.row_sums(c)[row, real], dense @ c[row, real]) <= 1e-10


@pytest.mark.parametrize("start_layer", [0, 1])
@pytest.mark.parametrize("name", ["h3 head_dim 2 +attention", "bmojo"])
def test_rollout_and_mamba_attr_equal_the_dense_products(name: str, start_layer: int) -> None:
    model = MODELS[name]()
    ids, mask = padded_batch("left")
    rollout = explain(model, ids, method="attention_rollout", attention_mask=mask, start_layer=start_layer)
    attr = explain(model, ids, method="mamba_attr", attention_mask=mask, start_layer=start_layer)
    for row in range(2):
        real = mask[row].bool()
        row_ids = ids[row, real]
        position = int(real.sum()) - 1
        blocks = dense_blocks(model, row_ids)
        expected = dense_rollout(blocks, position, None, start_layer)
        assert relative_error(rollout.relevance[row, real], expected) <= 1e-10
        columns = gradient_columns(model, row_ids, position, int(attr.target[row]))
        expected = dense_rollout(blocks, position, columns, start_layer)
        assert relative_error(attr.relevance[row, real], expected) <= 1e-10
        assert bool((rollout.relevance[row, ~real] == 0).all() and (attr.relevance[row, ~real] == 0).all())


FAST_OPTIONS = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"nt_samples": 2},
                "shapley_sampling": {"n_samples": 1}}
ARCHITECTURES = {"mamba": mamba_model, "h3": lambda: h3_model(2, attention=True), "bmojo": bmojo_model}


@pytest.fixture(scope="module")
def every_architecture() -> dict[str, SequenceLM]:
    return {name: build() for name, build in ARCHITECTURES.items()}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_method_runs_on_every_architecture(every_architecture: dict[str, SequenceLM],
                                                 architecture: str) -> None:
    """Issue #5 acceptance: every name of ``method_names()`` on a padded batch of 2: relevance (2, L),
    finite, exactly 0 at padded positions."""
    model = every_architecture[architecture]
    ids, mask = padded_batch("left")
    for method in mamba_lrp.method_names():
        explanation = explain(model, ids, method=method, attention_mask=mask, **FAST_OPTIONS.get(method, {}))
        relevance = explanation.relevance
        assert relevance.shape == (2, LENGTH), method
        assert bool(torch.isfinite(relevance).all()), method
        assert bool((relevance[0, :PAD] == 0).all()), method
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: .*attention_rollout"):
        explain(model, ids, method="nope")
