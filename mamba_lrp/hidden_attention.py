"""Hidden attention of state-space (and attention) LMs and the methods built on it: ``attention_rollout``,
``mamba_attr`` (G x AttnRoll), and the ``random`` baseline. They run on every model of :mod:`ssm_models`
(MambaLM, H3LM, BMojoLM).

**Mixing sub-layers.** A block mixes tokens in one or two residual sub-layers, ``h <- h + mix(norm(h))``
(the MLPs are token-wise). Unrolled, each mixing sub-layer is a causal attention ``alpha_ij`` (per channel
or per head) over its value inputs; we average it over channels (heads) into ``Abar`` (B, L, L). The
rollout uses it only through

* ``left_product(w) = w Abar`` (B, L): ``sum_i w_i Abar_ij`` for row weights ``w`` (B, L), and
* ``row_sums(c) = Abar c`` (B, L): ``sum_j Abar_ij c_j`` for column weights ``c`` (B, L) (the row sums of
  ``Abar diag(c)``; ``c`` = 1 on real tokens gives the plain row sums),

the interface :class:`MixingAttention`, implemented per layer kind (only full softmax attention holds an
(L, L) matrix, which the layer itself computes; no kind builds one per channel):

1. **Mamba's selective SSM** (:class:`SelectiveSSMAttention`; REFERENCE.md section 1, step 5), per channel
   ``d`` over the scan inputs ``u``::

       y_i[d] = sum_{j <= i} alpha_ij[d] u_j[d] + D[d] u_i[d]
       alpha_ij[d] = sum_n C_i,n (prod_{k=j+1..i} dA_k[d,n]) dB_j[d,n]              (Ali et al., eq. 9-11)
       dA_k = exp(delta_k A),  dB_j = delta_j B_j,  delta = softplus(dt + dt_bias)

   (the skip ``D u`` is not attention). ``Abar = mean_d alpha[d]``, the channel mean of the *signed*
   attention (as the authors' ``vim/xai_utils.py``). ``w Abar`` is the vector-Jacobian product of the
   (linear in ``u``) scan ``u -> sum_j alpha_ij u_j`` with cotangent ``w``; ``Abar c`` is one forward
   scan of ``u = c``. One forward and one backward selective scan through the model's own scan op (its
   ``backend``): ``O(B d_inner L N)`` instead of ``O(B d_inner L^2 N)``.

2. **H3's SSM layer** (:class:`H3SSMAttention`; ``ssm_models/h3.py``). With ``k~ = m (SSM_shift(m k) +
   ssm_k_D m k)`` (the shift SSM's output with its own skip, ``m`` the padding mask), ``K_h`` the diagonal
   SSM's kernel of head ``h`` (``H = d_model / head_dim`` heads), ``<a, b>_h = sum_{i < head_dim}
   a_{h hd + i} b_{h hd + i}``, the layer before ``output_linear`` is, per head ``h`` and value channel ``j``::

       o_{j H + h, t} = sum_{s <= t} alpha^h_ts v_{h hd + j, s} + D_h <q_t, k~_t>_h v_{h hd + j, t}
       alpha^h_ts = K_h(t - s) <q_t, k~_s>_h

   (the sum over ``i`` is the per-head outer product ``k~_s v_s^T`` of the public code contracted with
   ``q_t``; for ``head_dim = 1``, ``alpha_ts[c] = q_t[c] K_c(t - s) k~_s[c]``). The diagonal SSM's skip
   ``D`` is not attention, like Mamba's ``D``. ``alpha^h`` is the same for the ``head_dim`` value channels
   of head ``h``, so the mean over the ``d_model`` channels is ``Abar = mean_h alpha^h``. Then::

       (w Abar)_s = mean_h sum_i k~_{h hd + i, s} g_{h hd + i, s},  g_s = sum_{t >= s} K_h(t - s) w_t q_t
       (Abar c)_t = mean_h sum_i q_{h hd + i, t} (K_h * (c k~_{h hd + i}))_t

   ``g`` is an anti-causal correlation: the causal convolution with ``K_h`` of the time-reversed
   ``w q``. Both convolutions run through the layer's own diagonal SSM module with ``D = 0`` (its FFT
   path, ``O(B d_model L log L)``, or its scan, ``O(B d_model L N)``); no (L, L) matrix per channel.

3. **Softmax attention** (H3's ``H3Attention`` as :class:`DenseAttention`; B'MOJO's ``ChunkedAttention``
   as :class:`KeyedAttention`): ``Abar = mean over heads of the attention probabilities`` (the layer's own
   masked probabilities; rows sum to 1). H3's full causal attention is (B, n_head, L, L) already in the
   layer; its head mean (B, L, L) is kept, and ``w Abar`` and ``Abar c`` are batched matrix-vector
   products, ``O(B L^2)``. B'MOJO's chunked attention gives each query ``t`` at most ``n_keys = 2 w +
   n_memory + n_eidetic`` key slots with positions ``pos_tk`` and head-mean probabilities ``Pbar_tk``
   (window, memory and eidetic tokens, from :meth:`ssm_models.bmojo.ChunkedAttention.attention_map`: the
   forward's own masking), so ``(w Abar)_s = sum_{t, k: pos_tk = s} w_t Pbar_tk`` (a scatter-add) and
   ``(Abar c)_t = sum_k Pbar_tk c_{pos_tk}`` (a gather): ``O(B L n_keys)``, no (L, L) matrix.

4. **B'MOJO blocks** have two mixing sub-layers, the SSM (1.) then the chunked attention (3.), each
   residual; the rollout goes through both (the attention first when going down from the output).
   Token-wise sub-layers (MLPs, norms) are the identity of the rollout; so are the short convolutions
   on Mamba's value path (as Ali et al.); H3's shift SSM is part of ``k~``.

**Rollout** (Abnar and Zuidema 2020, with the residual identity; Ali et al. section 4), over the mixing
sub-layers ``m`` of blocks ``start_layer..n_layer-1`` in forward order::

    Ahat_m = (Abar_m + I) / rowsum(Abar_m + I),     R = row p of Ahat_M ... Ahat_1 = e_p^T Ahat_M ... Ahat_1

computed as a row vector propagated from the last sub-layer down: ``r <- w + w Abar_m`` with ``w_i = r_i /
rowsum_i``, ``rowsum = 1 + Abar_m 1``. A causal LM has no class token; we explain the output at position
``p``, so only row vectors are ever needed. The signed row sums of the SSMs can come close to 0; their
magnitude is floored at the dtype's eps (sign kept).

**MambaAttr / G x AttnRoll** (Ali et al.; the baseline "G x AttnRoll" of the MambaLRP paper), exactly as
defined here: each block's attention is weighted per *column* (token ``j``) by a gradient score, then rolled
out as above::

    s^l_j = max_D relu(df/dh^l_j)   (h^l (B, L, D): the residual stream entering block l),
    s^l   = (s^l - min s^l) / (max s^l - min s^l)   over the real tokens of each example
            (all ones when max = min),
    Abar^G_m = Abar_m diag(s^l)  for every mixing sub-layer m of block l,    rollout of (Abar^G + I) / rowsum.

This follows the authors' ``generate_mamba_attr`` except for two things: they clamp ``alpha`` at 0
and min-max normalise it over the whole (d, L, L) tensor before the channel mean, which is not
linear and would need every channel's full L x L matrix (``O(d L^2 N)`` per layer); we keep the
signed mean used by their rollout. Neither method clamps its final row at 0 (the authors do, for
heat maps); negative scores keep their order for the flipping metrics. In a B'MOJO block both sub-layers
get the score of the block's input (one score per block, as for Mamba).

**Padding**: columns of padded tokens are 0 (``c`` is 0 there, and the layers mask them as their forward
does), so padded positions get relevance exactly 0 and each real row is explained as if it were alone.

**Random**: uniform ``U[0, 1)`` scores from a ``torch.Generator`` seeded with ``seed``.

The relevance is at the embeddings (``layer`` is not supported).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mamba_lrp.methods import AttributionInputs, AttributionResult, register_method, select_outputs
from ssm_models.bmojo import ChunkedAttention
from ssm_models.h3 import H3Attention, H3Mixer
from ssm_models.mamba import MambaMixer
from ssm_models.ops import scan_compute_dtype, selective_scan

__all__ = [
    "DenseAttention",
    "H3SSMAttention",
    "KeyedAttention",
    "MixingAttention",
    "ScanInputs",
    "SelectiveSSMAttention",
    "SoftmaxAttention",
    "attention_left_product",
    "attention_rollout",
    "capture_mixing_layers",
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


class MixingAttention(Protocol):
    """The channel- (head-) mean causal attention ``Abar`` (B, L, L) of one mixing sub-layer, used only
    through row-vector products (module docstring). ``shape`` is (B, L); ``dtype`` and ``device`` are the
    layer's compute dtype and device, in which both methods take and return (B, L) tensors."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def left_product(self, weights: torch.Tensor) -> torch.Tensor:
        """``(w Abar)_j = sum_i w_i Abar_ij`` (B, L) for row weights ``w`` (B, L)."""
        ...

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        """``(Abar c)_i = sum_j Abar_ij c_j`` (B, L) for column weights ``c`` (B, L)."""
        ...


@dataclass
class SelectiveSSMAttention:
    """Mamba's hidden attention (module docstring, 1.) from the scan inputs of one layer."""

    scan: ScanInputs

    @property
    def shape(self) -> tuple[int, int]:
        return self.scan.delta.shape[0], self.scan.delta.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.scan.delta.dtype

    @property
    def device(self) -> torch.device:
        return self.scan.delta.device

    def left_product(self, weights: torch.Tensor) -> torch.Tensor:
        """``mean_d sum_i w_i alpha_ij[d]`` (B, L): one forward and one backward scan."""
        return attention_left_product(self.scan, weights).mean(1)

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        """``mean_d sum_j alpha_ij[d] c_j`` (B, L): one forward scan."""
        return _attention_row_sums(self.scan, columns)


@dataclass
class H3SSMAttention:
    """H3's hidden attention (module docstring, 2.) of one H3 layer: ``q`` and ``k`` (= ``k~``), each
    (B, head_dim, H, L) in the compute dtype (channel ``h * head_dim + i`` at ``[:, i, h]``), and ``ssm``
    the layer's diagonal SSM module (``ssm_models.h3.DiagonalSSM``, with its path and scan backend)."""

    q: torch.Tensor
    k: torch.Tensor
    ssm: nn.Module

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def _causal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """``(K_h * x)_t = sum_{s <= t} K_h(t - s) x_s`` for ``x`` (B, head_dim, H, L): the layer's
        diagonal SSM with ``D = 0``."""
        batch, head_dim, heads, length = x.shape
        zero = torch.zeros(heads, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            y = self.ssm(x.reshape(batch * head_dim, heads, length), zero)
        return y.reshape(batch, head_dim, heads, length)

    def left_product(self, weights: torch.Tensor) -> torch.Tensor:
        """``mean_h sum_i k~_s g_s``, ``g`` the causal convolution of the time-reversed ``w q``, reversed."""
        correlated = self._causal_conv((self.q * weights[:, None, None, :]).flip(-1)).flip(-1)
        return (self.k * correlated).sum(1).mean(1)

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        """``mean_h sum_i q_t (K_h * (c k~))_t``."""
        return (self.q * self._causal_conv(self.k * columns[:, None, None, :])).sum(1).mean(1)


@dataclass
class SoftmaxAttention:
    """What the two softmax-attention kinds share: ``probabilities`` (B, L, ...) of the queries in
    the layer's compute dtype, from which shape (B, L), dtype and device are read."""

    probabilities: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.probabilities.shape[0], self.probabilities.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.probabilities.dtype

    @property
    def device(self) -> torch.device:
        return self.probabilities.device


@dataclass
class DenseAttention(SoftmaxAttention):
    """Full causal softmax attention (module docstring, 3.): ``probabilities`` (B, L, L), the head mean
    of the layer's attention probabilities (row = query)."""

    def left_product(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.bmm(weights[:, None, :], self.probabilities)[:, 0]

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.probabilities, columns[:, :, None])[..., 0]


@dataclass
class KeyedAttention(SoftmaxAttention):
    """Softmax attention over a few key slots per query (module docstring, 3.; B'MOJO's chunked
    attention): ``probabilities`` (B, L, n_keys) the head-mean probability of query ``t`` on slot ``k``,
    at position ``key_positions[b, t, k]`` (B, L, n_keys) long, -1 (and probability 0) for no key."""

    key_positions: torch.Tensor

    def _valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index (B, L n_keys), valid (B, L, n_keys))``: slot positions with -1 sent to 0, and which exist."""
        valid = self.key_positions >= 0
        return self.key_positions.clamp(min=0).flatten(1), valid

    def left_product(self, weights: torch.Tensor) -> torch.Tensor:
        """``sum_{t, k: pos_tk = s} w_t Pbar_tk``: a scatter-add into the key positions."""
        index, valid = self._valid()
        contributions = (weights[:, :, None] * self.probabilities * valid).flatten(1)
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device).scatter_add_(1, index, contributions)

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        """``sum_k Pbar_tk c_{pos_tk}``: a gather of the key positions' column weights."""
        index, valid = self._valid()
        gathered = torch.gather(columns, 1, index).view_as(self.probabilities)
        return (self.probabilities * gathered * valid).sum(-1)


_MIXING_KINDS = (MambaMixer, H3Mixer, H3Attention, ChunkedAttention)


def _argument(args: tuple, kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _mixing_modules(model: nn.Module) -> list[list[nn.Module]]:
    """The mixing sub-layer modules of every block of ``model`` (``model.blocks``), in module order;
    ``ValueError`` unless each block has at least one of a known kind."""
    kinds = _MIXING_KINDS
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"hidden attention needs an ssm_models LM (with `blocks`); got {type(model).__name__}")
    found = [[module for module in block.modules() if isinstance(module, kinds)] for block in blocks]
    for index, modules in enumerate(found):
        if not modules:
            names = ", ".join(kind.__name__ for kind in kinds)
            raise ValueError(
                f"hidden attention: block {index} ({type(blocks[index]).__name__}) of {type(model).__name__} has no "
                f"mixing layer of a known kind ({names})"
            )
    return found


def capture_mixing_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_block_inputs: bool = False,
) -> tuple[list[list[MixingAttention]], torch.Tensor, list[torch.Tensor]]:
    """One forward of ``model`` on ``input_ids`` (B, L), keeping every mixing sub-layer's hidden attention.

    Returns ``(blocks, hidden, block_inputs)``: ``blocks[l]`` the :class:`MixingAttention` of block ``l``'s
    mixing sub-layers in forward order (detached, in the compute dtype); ``hidden`` the final hidden states
    (B, L, D); ``block_inputs[l]`` (B, L, D) the residual stream entering block ``l`` (part of the autograd
    graph from the embeddings, for ``with_block_inputs``; else empty). Gradients are recorded only with
    ``with_block_inputs``. Each layer's factors come from its own code (the scan's inputs by a hook;
    :meth:`~ssm_models.h3.H3Mixer.attention_factors`, :meth:`~ssm_models.h3.H3Attention.attention_probabilities`,
    :meth:`~ssm_models.bmojo.ChunkedAttention.attention_map` on the sub-layer's inputs); hooks are removed
    before returning.
    """
    modules = _mixing_modules(model)
    blocks: list[list[MixingAttention]] = [[] for _ in modules]
    block_inputs: list[torch.Tensor] = []

    def keep_scan(index: int, module: nn.Module, args: tuple) -> None:
        u, delta, A, B, C, _D, delta_bias = args[:7]
        compute = module.state_dtype(u.dtype)
        blocks[index].append(SelectiveSSMAttention(ScanInputs(
            delta=delta.detach().to(compute), A=A.detach().to(compute), B=B.detach().to(compute),
            C=C.detach().to(compute), delta_bias=None if delta_bias is None else delta_bias.detach().to(compute),
            backend=module.backend,
        )))

    def keep_h3(index: int, module: H3Mixer, args: tuple, kwargs: dict) -> None:
        hidden, mask = args[0], _argument(args, kwargs, 3, "padding_mask")
        q, k = module.attention_factors(hidden, mask)
        batch, _, length = q.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, d_model, L) -> (B, head_dim, H, L)
            return x.reshape(batch, module.n_heads, module.head_dim, length).transpose(1, 2)

        blocks[index].append(H3SSMAttention(q=heads(q), k=heads(k), ssm=module.kernel))

    def keep_attention(index: int, module: H3Attention, args: tuple, kwargs: dict) -> None:
        hidden, mask = args[0], _argument(args, kwargs, 3, "padding_mask")
        probabilities = module.attention_probabilities(hidden, mask).mean(1)
        blocks[index].append(DenseAttention(probabilities.to(scan_compute_dtype(probabilities.dtype))))

    def keep_chunked(index: int, module: ChunkedAttention, args: tuple, kwargs: dict) -> None:
        normed, scores = args[0], _argument(args, kwargs, 1, "scores")
        probabilities, positions = module.attention_map(normed, scores, _argument(args, kwargs, 2, "padding_mask"))
        blocks[index].append(KeyedAttention(probabilities.to(scan_compute_dtype(probabilities.dtype)), positions))

    keepers = {MambaMixer: keep_scan, H3Mixer: keep_h3, H3Attention: keep_attention, ChunkedAttention: keep_chunked}
    hooks = []
    for index, block_modules in enumerate(modules):
        for module in block_modules:
            keep = next(function for kind, function in keepers.items() if isinstance(module, kind))
            if isinstance(module, MambaMixer):
                hooks.append(module.ssm.register_forward_pre_hook(partial(keep, index)))
            else:
                hooks.append(module.register_forward_pre_hook(partial(keep, index), with_kwargs=True))
    if with_block_inputs:
        hooks += [block.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0]))
                  for block in model.blocks]
    try:
        with torch.set_grad_enabled(with_block_inputs):
            embeddings = model.embed(input_ids).detach().requires_grad_(with_block_inputs)
            hidden = model.hidden_states(inputs_embeds=embeddings, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return blocks, hidden, block_inputs


def capture_scan_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_block_inputs: bool = False,
) -> tuple[list[ScanInputs], torch.Tensor, list[torch.Tensor]]:
    """As :func:`capture_mixing_layers`, returning only the :class:`ScanInputs` of the selective-SSM
    sub-layers (Mamba's, B'MOJO's), in forward order."""
    blocks, hidden, block_inputs = capture_mixing_layers(model, input_ids, attention_mask, with_block_inputs)
    scans = [layer.scan for block in blocks for layer in block if isinstance(layer, SelectiveSSMAttention)]
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
    blocks: list[list[MixingAttention]],
    position: torch.Tensor,
    mask: torch.Tensor | None = None,
    column_weights: list[torch.Tensor] | None = None,
    start_layer: int = 0,
) -> torch.Tensor:
    """Row ``p`` of the attention rollout over the mixing sub-layers (see the module docstring), (B, L).

    ``blocks[l]`` the :class:`MixingAttention` of block ``l``'s sub-layers in forward order; ``position``
    (B,) long; ``mask`` (B, L) bool (padded columns get 0); ``column_weights[l]`` (B, L) scales the columns
    of every sub-layer of block ``l`` (MambaAttr's gradient scores; None: rollout); ``start_layer`` the first
    block rolled out. Computed in the last sub-layer's compute dtype.
    """
    last = blocks[-1][-1]
    (batch, length), dtype, device = last.shape, last.dtype, last.device
    real = torch.ones(batch, length, dtype=dtype, device=device) if mask is None else mask.to(device, dtype)
    rows = torch.arange(batch, device=device)
    row = torch.zeros(batch, length, dtype=dtype, device=device)
    row[rows, position.to(device)] = 1.0
    tiny = torch.finfo(dtype).eps
    for index in reversed(range(start_layer, len(blocks))):
        columns = real if column_weights is None else real * column_weights[index].to(device, dtype)
        for layer in reversed(blocks[index]):
            sums = 1.0 + layer.row_sums(columns.to(layer.dtype)).to(dtype)  # (B, L): row sums of Abar^G + I
            sums = torch.where(sums < 0, -1.0, 1.0) * sums.abs().clamp_min(tiny)
            weights = row / sums
            row = weights + layer.left_product(weights.to(layer.dtype)).to(dtype) * columns
    return row * real


def _setup(inputs: AttributionInputs, name: str, start_layer: int) -> None:
    if inputs.layer is not None:
        raise ValueError(f"method {name!r} explains the token embeddings only; `layer` is not supported")
    n_layer = len(_mixing_modules(inputs.model))
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n_layer:
        raise ValueError(f"`start_layer` must be an integer in [0, {n_layer - 1}], got {start_layer!r}")


def attention_rollout(inputs: AttributionInputs, start_layer: int = 0) -> AttributionResult:
    """Attention rollout of the hidden attention (Ali et al. 2024 section 4; Abnar and Zuidema 2020): row
    ``p`` of ``prod_m (Abar_m + I) / rowsum`` over the mixing sub-layers of blocks ``start_layer..n_layer-1``,
    ``Abar_m`` the channel (head) mean of each sub-layer's attention (module docstring). One forward, then
    per sub-layer a left product and a row-sum pass (Mamba: a forward and a backward scan; H3: two diagonal
    SSM convolutions; attention: O(L^2) or O(L n_keys)). Returns (B, L)."""
    _setup(inputs, "attention_rollout", start_layer)
    blocks, hidden, _ = capture_mixing_layers(inputs.model, inputs.input_ids, inputs.attention_mask)
    with torch.no_grad():
        output, target = select_outputs(hidden, inputs)
    relevance = rollout_row(blocks, inputs.position, inputs.attention_mask, start_layer=start_layer)
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
    ``Abar_m diag(s^l)``, ``s^l`` the min-max normalised ``max_D relu(df/dh^l)`` at the input of block ``l``
    applied to each mixing sub-layer ``m`` of the block (exact definition in the module docstring). One
    forward and backward of the model, then the rollout's passes. Returns (B, L)."""
    _setup(inputs, "mamba_attr", start_layer)
    blocks, hidden, block_inputs = capture_mixing_layers(
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
    relevance = rollout_row(blocks, inputs.position, inputs.attention_mask, column_weights=scores,
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
