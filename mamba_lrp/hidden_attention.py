"""The hidden attention of Mamba (Ali, Zimerman, Wolf 2024) and the methods built on it:
``attention_rollout``, ``mamba_attr`` (G x AttnRoll), and the ``random`` baseline.

**Hidden attention.** Unrolled, the selective scan of one layer (REFERENCE.md section 1, step 5)
is a causal, per-channel attention over the scan inputs ``u``::

    y_i[d] = sum_{j <= i} alpha_ij[d] u_j[d] + D[d] u_i[d]
    alpha_ij[d] = sum_n C_i,n (prod_{k=j+1..i} dA_k[d,n]) dB_j[d,n]                (Ali et al., eq. 9-11)
    dA_k = exp(delta_k A),  dB_j = delta_j B_j,  delta = softplus(dt + dt_bias)

(the skip ``D u`` is not part of the attention). A causal LM has no class token; we explain the
output at position ``p``, so only the row ``alpha_p,:`` and products of row vectors with the
matrices are ever needed; no (B, d_inner, L, L) tensor is built.

**Channel aggregation** (as the authors' released code, ``vim/xai_utils.py``): the channel mean of
the *signed* attention, ``Abar_ij = mean_d alpha_ij[d]``, with columns of padded tokens set to 0.
The mean is linear, which is what makes the row-only computation below exact and cheap.

**Rollout** (Abnar and Zuidema 2020, with the residual identity; Ali et al. section 4)::

    Ahat_l = (Abar_l + I) / rowsum(Abar_l + I),     rollout = Ahat_{n-1} ... Ahat_{s+1} Ahat_s,
    R = row p of the rollout = e_p^T Ahat_{n-1} ... Ahat_s      (s = ``start_layer``, default 0)

computed as a row vector propagated from the last layer down: ``r <- w + w Abar_l`` with
``w_i = r_i / rowsum_i``. Both ``w Abar_l`` and the row sums are scans: ``sum_i w_i alpha_ij[d]``
is the vector-Jacobian product of the (linear in ``u``) scan ``u -> sum_j alpha_ij u_j`` with
cotangent ``w``, and ``rowsum_i = 1 + mean_d (scan of u = 1 over the real tokens)_i``. So each layer
costs one forward and one backward selective scan, ``O(B d_inner L N)`` time, through the model's own
scan op (its ``backend``), instead of ``O(B d_inner L^2 N)`` for the full matrices. The signed row
sums can come close to 0; their magnitude is floored at the dtype's eps (sign kept).

**MambaAttr / G x AttnRoll** (Ali et al.; the baseline "G x AttnRoll" of the MambaLRP paper),
exactly as defined here: each layer's attention is weighted per *column* (token ``j``) by a gradient
score, then rolled out as above::

    s^l_j = max_D relu(df/dh^l_j)   (h^l (B, L, D): the residual stream entering block l),
    s^l   = (s^l - min s^l) / (max s^l - min s^l)   over the real tokens of each example
            (all ones when max = min),
    Abar^G_l = Abar_l diag(s^l),    rollout of (Abar^G_l + I) / rowsum.

This follows the authors' ``generate_mamba_attr`` except for two things: they clamp ``alpha`` at 0
and min-max normalise it over the whole (d, L, L) tensor before the channel mean, which is not
linear and would need every channel's full L x L matrix (``O(d L^2 N)`` per layer); we keep the
signed mean used by their rollout. Neither method clamps its final row at 0 (the authors do, for
heat maps); negative scores keep their order for the flipping metrics.

**Random**: uniform ``U[0, 1)`` scores from a ``torch.Generator`` seeded with ``seed``.

All three give padded positions exactly 0 and support only models made of ``MambaMixer`` layers
(``ssm_models.MambaLM``); the relevance is at the embeddings (``layer`` is not supported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mamba_lrp.methods import AttributionInputs, AttributionResult, register_method, select_outputs
from ssm_models.ops import selective_scan

__all__ = [
    "ScanInputs",
    "attention_left_product",
    "attention_rollout",
    "capture_scan_inputs",
    "hidden_attention_row",
    "mamba_attr",
    "random_relevance",
    "rollout_row",
]


@dataclass
class ScanInputs:
    """The selective scan's inputs of one layer, detached, in the scan's compute dtype:
    ``delta`` (B, d_inner, L) before bias and softplus; ``A`` (d_inner, N); ``B``, ``C`` (B, N, L);
    ``delta_bias`` (d_inner,); ``backend`` the layer's scan backend."""

    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    delta_bias: torch.Tensor | None
    backend: str

    @property
    def softplus_delta(self) -> torch.Tensor:
        """``delta = softplus(dt + dt_bias)`` (B, d_inner, L), threshold 20 as in mamba_ssm."""
        delta = self.delta if self.delta_bias is None else self.delta + self.delta_bias[:, None]
        return F.softplus(delta)


def _mixers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    mixers = [getattr(layer, "mixer", None) for layer in layers] if layers is not None else []
    if not mixers or not all(hasattr(mixer, "ssm") and hasattr(mixer, "A_log") for mixer in mixers):
        raise ValueError(
            f"hidden attention needs a Mamba model (backbone.layers[i].mixer.ssm); got {type(model).__name__}"
        )
    return mixers


def capture_scan_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_block_inputs: bool = False,
) -> tuple[list[ScanInputs], torch.Tensor, list[torch.Tensor]]:
    """One forward of ``model`` on ``input_ids`` (B, L), keeping every layer's scan inputs.

    Returns ``(scans, hidden, block_inputs)``: ``scans[l]`` a :class:`ScanInputs`; ``hidden`` the
    final hidden states (B, L, D); ``block_inputs[l]`` (B, L, D) the residual stream entering block
    ``l`` (part of the autograd graph from the embeddings, for ``with_block_inputs``; else empty).
    Gradients are recorded only with ``with_block_inputs``. The hooks are removed before returning.
    """
    mixers = _mixers(model)
    scans: list[ScanInputs] = []
    block_inputs: list[torch.Tensor] = []

    def keep_scan(module: nn.Module, args: tuple) -> None:
        u, delta, A, B, C, _D, delta_bias = args[:7]
        compute = module.state_dtype(u.dtype)
        scans.append(ScanInputs(
            delta=delta.detach().to(compute), A=A.detach().to(compute), B=B.detach().to(compute),
            C=C.detach().to(compute), delta_bias=None if delta_bias is None else delta_bias.detach().to(compute),
            backend=module.backend,
        ))

    hooks = [mixer.ssm.register_forward_pre_hook(keep_scan) for mixer in mixers]
    if with_block_inputs:
        hooks += [layer.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0]))
                  for layer in model.backbone.layers]
    try:
        with torch.set_grad_enabled(with_block_inputs):
            embeddings = model.embed(input_ids).detach().requires_grad_(with_block_inputs)
            hidden = model.hidden_states(inputs_embeds=embeddings, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return scans, hidden, block_inputs


def hidden_attention_row(scan: ScanInputs, position: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """The hidden-attention row of the explained position, ``alpha_p,j[d]`` (B, d_inner, L) (zero for
    ``j > p``), from the closed form (Ali et al., eq. 11)::

        alpha_p,j[d] = delta_j[d] sum_n C_p,n B_j,n exp(A[d,n] * sum_{k=j+1..p} delta_k[d])

    The exponent's sum is a suffix sum of positive terms (no cancellation; the exponent is <= 0, so
    nothing overflows and vanishing products underflow to 0 as they should). ``position`` (B,) long.
    Work in chunks of channels so that at most ``chunk_elements`` of the (B, d_inner, L, N) tensor
    exist at once. Cost ``O(B d_inner L N)``.
    """
    delta = scan.softplus_delta  # (B, d, L)
    batch, channels, length = delta.shape
    position = position.to(delta.device)
    steps = torch.arange(length, device=delta.device)
    up_to_p = (steps[None, :] <= position[:, None]).to(delta.dtype)  # (B, L)
    masked = delta * up_to_p[:, None, :]
    suffix = masked.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= j, k <= p} delta_k
    decay_sum = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)  # k >= j + 1
    rows = torch.arange(batch, device=delta.device)
    c_p = scan.C[rows, :, position]  # (B, N)
    cb = (c_p[:, :, None] * scan.B).transpose(1, 2)  # (B, L, N): C_p,n B_j,n
    n_state = scan.A.shape[1]
    step = max(1, chunk_elements // max(1, batch * length * n_state))
    row = torch.empty_like(delta)
    for start in range(0, channels, step):
        part = slice(start, start + step)
        decay = torch.exp(scan.A[None, part, None, :] * decay_sum[:, part, :, None])  # (B, dc, L, N)
        row[:, part] = (decay * cb[:, None]).sum(-1)
    return row * delta * up_to_p[:, None, :]


def attention_left_product(scan: ScanInputs, weights: torch.Tensor) -> torch.Tensor:
    """``(w alpha)_j[d] = sum_i w_i alpha_ij[d]`` (B, d_inner, L) for row weights ``w`` (B, L)
    (shared by all channels): the vector-Jacobian product of the scan ``u -> y``, ``y_i = sum_j
    alpha_ij u_j`` (no ``D``), which is linear in ``u``; one forward and one backward scan with the
    layer's own backend, ``O(B d_inner L N)``."""
    delta = scan.delta
    u = torch.zeros_like(delta, requires_grad=True)
    with torch.enable_grad():
        y = selective_scan(u, delta, scan.A, scan.B, scan.C, D=None, delta_bias=scan.delta_bias,
                           delta_softplus=True, backend=scan.backend)
        (product,) = torch.autograd.grad(y, u, grad_outputs=weights.to(y.dtype)[:, None, :].expand_as(y))
    return product


def _attention_row_sums(scan: ScanInputs, columns: torch.Tensor) -> torch.Tensor:
    """``sum_j Abar_ij c_j`` (B, L) = ``mean_d sum_j alpha_ij[d] c_j`` for column weights ``c`` (B, L):
    one forward scan of ``u = c``, no ``D``."""
    u = columns.to(scan.delta.dtype)[:, None, :].expand_as(scan.delta).contiguous()
    with torch.no_grad():
        y = selective_scan(u, scan.delta, scan.A, scan.B, scan.C, D=None, delta_bias=scan.delta_bias,
                           delta_softplus=True, backend=scan.backend)
    return y.mean(1)


def rollout_row(
    scans: list[ScanInputs],
    position: torch.Tensor,
    mask: torch.Tensor | None = None,
    column_weights: list[torch.Tensor] | None = None,
    start_layer: int = 0,
) -> torch.Tensor:
    """Row ``p`` of the attention rollout ``Ahat_{n-1} ... Ahat_s`` (see the module docstring), (B, L).

    ``scans`` one per layer; ``position`` (B,) long; ``mask`` (B, L) bool (padded columns get 0);
    ``column_weights[l]`` (B, L) scales the columns of layer ``l``'s channel-mean attention (MambaAttr's
    gradient scores; None: rollout); ``start_layer`` the first layer rolled out.
    """
    delta = scans[0].delta
    batch, _, length = delta.shape
    dtype, device = delta.dtype, delta.device
    real = torch.ones(batch, length, dtype=dtype, device=device) if mask is None else mask.to(device, dtype)
    rows = torch.arange(batch, device=device)
    row = torch.zeros(batch, length, dtype=dtype, device=device)
    row[rows, position.to(device)] = 1.0
    tiny = torch.finfo(dtype).eps
    for index in reversed(range(start_layer, len(scans))):
        scan = scans[index]
        columns = real if column_weights is None else real * column_weights[index].to(device, dtype)
        sums = 1.0 + _attention_row_sums(scan, columns)  # (B, L): row sums of Abar^G + I
        sums = torch.where(sums < 0, -1.0, 1.0) * sums.abs().clamp_min(tiny)
        weights = row / sums
        row = weights + attention_left_product(scan, weights).mean(1) * columns
    return row * real


def _setup(inputs: AttributionInputs, name: str, start_layer: int) -> None:
    if inputs.layer is not None:
        raise ValueError(f"method {name!r} explains the token embeddings only; `layer` is not supported")
    n_layer = len(_mixers(inputs.model))
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n_layer:
        raise ValueError(f"`start_layer` must be an integer in [0, {n_layer - 1}], got {start_layer!r}")


def attention_rollout(inputs: AttributionInputs, start_layer: int = 0) -> AttributionResult:
    """Attention rollout of Mamba's hidden attention (Ali et al. 2024 section 4; Abnar and Zuidema
    2020): row ``p`` of ``prod_l (Abar_l + I) / rowsum`` over layers ``start_layer..n_layer-1``,
    ``Abar_l`` the channel mean of the signed hidden attention (module docstring). One forward, then
    per layer a forward and a backward scan: ``O(n_layer B d_inner L N)``. Returns (B, L)."""
    _setup(inputs, "attention_rollout", start_layer)
    scans, hidden, _ = capture_scan_inputs(inputs.model, inputs.input_ids, inputs.attention_mask)
    with torch.no_grad():
        output, target = select_outputs(hidden, inputs)
    relevance = rollout_row(scans, inputs.position, inputs.attention_mask, start_layer=start_layer)
    return AttributionResult(relevance=relevance.detach(), output=output.detach(), target=target)


def _gradient_scores(gradient: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``s_j = max_D relu(g_j)`` min-max normalised over each example's real tokens; (B, L, D) -> (B, L)."""
    score = gradient.clamp_min(0).amax(-1)
    real = torch.ones_like(score, dtype=torch.bool) if mask is None else mask.to(score.device)
    low = torch.where(real, score, torch.full_like(score, float("inf"))).amin(-1, keepdim=True)
    high = torch.where(real, score, torch.full_like(score, float("-inf"))).amax(-1, keepdim=True)
    spread = high - low
    normalised = (score - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, normalised, torch.ones_like(score)) * real


def mamba_attr(inputs: AttributionInputs, start_layer: int = 0) -> AttributionResult:
    """MambaAttr / G x AttnRoll (Ali et al. 2024; a baseline of the MambaLRP paper): the rollout of
    ``Abar_l diag(s^l)``, ``s^l`` the min-max normalised ``max_D relu(df/dh^l)`` at the input of each
    block (exact definition in the module docstring). One forward and backward of the model, then per
    layer a forward and a backward scan. Returns (B, L)."""
    _setup(inputs, "mamba_attr", start_layer)
    scans, hidden, block_inputs = capture_scan_inputs(
        inputs.model, inputs.input_ids, inputs.attention_mask, with_block_inputs=True
    )
    with torch.enable_grad():
        output, target = select_outputs(hidden, inputs)
        gradients = torch.autograd.grad(output.sum(), block_inputs, allow_unused=True)
    scores = [
        torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if gradient is None
        else _gradient_scores(gradient.detach(), inputs.attention_mask)
        for gradient in gradients
    ]
    relevance = rollout_row(scans, inputs.position, inputs.attention_mask, column_weights=scores,
                            start_layer=start_layer)
    return AttributionResult(relevance=relevance.detach(), output=output.detach(), target=target)


def random_relevance(inputs: AttributionInputs, seed: int = 0) -> AttributionResult:
    """The random baseline: relevance ``U[0, 1)`` (B, L) from a CPU ``torch.Generator`` seeded with
    ``seed`` (the same seed gives the same scores on every device); padded positions get 0. The
    explained output f comes from one no-grad forward."""
    if inputs.layer is not None:
        raise ValueError("method 'random' explains the token embeddings only; `layer` is not supported")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    with torch.no_grad():
        hidden = inputs.model.hidden_states(inputs.input_ids, attention_mask=inputs.attention_mask)
        output, target = select_outputs(hidden, inputs)
    generator = torch.Generator().manual_seed(seed)
    relevance = torch.rand(inputs.input_ids.shape, generator=generator, dtype=torch.float64).to(hidden.dtype)
    if inputs.attention_mask is not None:
        relevance = relevance * inputs.attention_mask.cpu().to(relevance.dtype)
    return AttributionResult(relevance=relevance.to(hidden.device), output=output.detach(), target=target)


register_method("attention_rollout", attention_rollout, overwrite=True)
register_method("mamba_attr", mamba_attr, overwrite=True)
register_method("random", random_relevance, overwrite=True)
