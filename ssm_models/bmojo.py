"""B'MOJO language model (Zancato et al., NeurIPS 2024): Mamba's fading memory plus an eidetic memory
of exact tokens read by chunked attention (REFERENCE.md section 5).

No public code of B'MOJO exists; this module follows the paper's description, and every choice
the paper leaves open is written down here (and in the README's "Models" section).

Layer
-----
Each of the ``n_layer`` layers is two (or three) pre-norm residual sub-layers::

    h   = x + MambaMixer(RMSNorm_ssm(x))                       fading memory   (skipped if not use_ssm)
    a   = RMSNorm_attn(h)                                      (B, L, d_model)
    out = h + W_o ChunkedAttention(W_q a, W_k a, W_v a)        eidetic memory  (skipped if not use_attention)
    out = out + W_2 GELU_tanh(W_1 RMSNorm_mlp(out))            optional MLP    (only if mlp_expand > 0)

The SSM sub-layer is :class:`ssm_models.mamba.MambaMixer` with Mamba's parameter names
(``backbone.layers.{i}.norm``, ``backbone.layers.{i}.mixer.*``, ``backbone.embedding``,
``backbone.norm_f``, ``lm_head``), so a :class:`~ssm_models.mamba.MambaLM` state dict loads into a
``BMojoLM`` with ``use_attention=False`` and gives the same logits. The attention sub-layer is
``backbone.layers.{i}.attn_norm`` and ``backbone.layers.{i}.attn.{q,k,v,out}_proj`` (``n_head``
heads of size ``d_model / n_head``, bias only with ``attn_bias``); the MLP is
``backbone.layers.{i}.mlp_norm`` and ``mlp.{fc1,fc2}`` (bias as Mamba's ``bias`` field). No positional
encoding: order comes from the SSM and the causal mask.

Chunked attention (linear in L)
-------------------------------
The sequence is cut into ``n_chunks = ceil(L / w)`` chunks of ``w = window`` positions (chunk ``c``
holds positions ``c w .. c w + w - 1``; the last chunk may be short and is padded internally).
A query at position ``t`` of chunk ``c`` attends, with one softmax over the union, to

1. **window**: every position ``s <= t`` of chunks ``c - 1`` and ``c`` (between w + 1 and 2 w keys:
   a block-causal sliding window);
2. **memory tokens**: the last position ``j w + w - 1`` of each chunk ``j <= c - 2``, at most the
   ``n_memory_tokens`` most recent ones (``j = c - 2, c - 3, ...``). The key and value there come
   from the post-SSM stream ``h``, which carries the SSM's fading memory of everything up to that
   chunk end: these tokens are the fading memory *read out* at chunk ends;
3. **eidetic tokens**: positions of chunks ``j <= c - 2`` chosen by the innovation test (below),
   ``eidetic_per_chunk`` per chunk (never the chunk's memory position), of which chunk ``c`` sees the
   ``eidetic_budget`` most recent selections: the selections are queued chunk by chunk
   (``c - 2`` first, each chunk's in decreasing score), and the first ``eidetic_budget`` are kept,
   a FIFO memory of fixed size. With a budget that is not a multiple of ``eidetic_per_chunk`` the
   oldest chunk kept contributes its highest-scored selections only.

Chunks ``c - 1`` and ``c`` are in the window, so memory and eidetic tokens never repeat a window key.
All keys and values come from the one stream ``RMSNorm_attn(h)``. Implementation: per chunk one
key set of ``n_keys = 2 w + n_memory + n_eidetic`` slots, where ``n_memory = min(n_memory_tokens,
n_chunks - 2)`` and ``n_eidetic = min(eidetic_budget, eidetic_per_chunk (n_chunks - 2))`` (0 when
fewer than 3 chunks), is gathered from the projected keys/values; a bool mask (B, n_chunks, w,
n_keys) says which slots exist, are real tokens and are causal; one call of the
:class:`~ssm_models.primitives.Attention` primitive (``F.scaled_dot_product_attention`` with that
explicit mask) over queries (B n_chunks, H, w, d_head). Memory O(L (2 w + n_memory + n_eidetic)),
never an (L, L) matrix.

Innovation test (the eidetic selection)
---------------------------------------
Parameter-free and deterministic. With ``u_t`` the normalised layer input that the SSM reads
(``RMSNorm_ssm(x)_t``) and ``y_{t-1}`` the SSM branch's output at ``t - 1`` (the fading memory's
readout before it has seen token t)::

    score_t = 1 - cos(u_t, y_{t-1})  in [0, 2],      score_0 = 1 (nothing predicts the first token)

A high score means the past predicted the token badly, so it is worth storing. With
``use_ssm=False`` the prediction is the previous normalised input, ``u_t = RMSNorm_attn(x)_t`` and
``y_{t-1} = u_{t-1}``. In each chunk the candidates are its real positions except its memory
(last) position; the top ``eidetic_per_chunk`` by score are selected (a stable sort: ties go to
the earlier position). The paper describes the test as a one-step prediction error of the state;
we use the cosine between the SSM readout and the next input because it needs no trained
predictor and is invariant to the scale of either vector. The scores are computed without
gradient: selection is a discrete choice that passes no relevance; the selected tokens receive
relevance through the attention values (``attribution_rules``: CP-LRP by default).

Variants and special cases
--------------------------
``variant="bmojo"`` (full B'MOJO) or ``"bmojo_f"`` (B'MOJO-F: fading memory and window, no eidetic
selection; the same as ``eidetic_budget=0``). ``use_attention=False`` is exactly Mamba;
``use_ssm=False`` with ``window >= L`` is exactly a causal transformer without positions (one
chunk, the window covers all of it). The switches are per model, not per layer: a model that
alternates Mamba-only and attention-only layers is not expressible with this config.

Padding
-------
``attention_mask`` (B, L) of 0/1. Chunk boundaries are counted from each row's first real token, so
the attention sub-layer shifts (rolls) each row's real tokens to the start, runs, and shifts back;
the real tokens of a row must be contiguous (left or right padding), otherwise ``ValueError``
(a model with ``use_attention=False`` is Mamba and accepts any mask).
Padded keys are masked; a padded query attends to itself only (its output is never read). The
SSM handles padding as in Mamba. Every real position gets the logits it gets without the padding.

Decoding
--------
The cache holds the token ids so far and :meth:`BMojoLM.step` re-runs the forward on the grown
sequence: exact (step logits = the full forward's), at O(L) cost per step.

Initialisation
--------------
As Mamba (``mamba_ssm``): embedding N(0, initializer_range); the output projection of each residual
branch (``mixer.out_proj``, ``attn.out_proj``, ``mlp.fc2``) rescaled by ``1 / sqrt(n_branches *
n_layer)`` (GPT-2's scheme; ``n_branches`` = residual branches per layer, 1 for pure Mamba, which
then gets Mamba's init); biases zero; other linear maps PyTorch's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssm_models.lm_base import SequenceLM
from ssm_models.loading import Architecture, register_architecture
from ssm_models.mamba import MambaConfig, MambaLM, MambaMixer
from ssm_models.primitives import Attention, RMSNorm

VARIANTS = ("bmojo", "bmojo_f")
#: Sources of the keys of each chunk, in slot order (``BMojoInspection.attention_mass`` axis -1).
SOURCES = ("window", "memory", "eidetic")


@dataclass
class BMojoConfig(MambaConfig):
    """Hyper-parameters of a B'MOJO LM: Mamba's fields (inherited from
    :class:`~ssm_models.mamba.MambaConfig`) plus the attention's. Every field is validated (``ValueError`` naming it).

    ``n_head``: attention heads (``d_model % n_head == 0``); ``window``: chunk length ``w`` (>= 1);
    ``n_memory_tokens``: memory tokens (SSM readouts at chunk ends) visible per chunk; ``eidetic_per_chunk``:
    tokens selected per chunk by the innovation test (``< window`` for ``variant="bmojo"``);
    ``eidetic_budget``: eidetic tokens visible per chunk; ``variant``: ``"bmojo"`` or ``"bmojo_f"``
    (no eidetic selection); ``use_ssm`` / ``use_attention``: the two sub-layers (not both off);
    ``mlp_expand``: 0 = no MLP, ``> 0`` adds a pre-norm GELU(tanh) MLP of width ``mlp_expand * d_model``;
    ``attn_bias``: biases on the q/k/v/out projections.
    """

    n_head: int = 4
    window: int = 64
    n_memory_tokens: int = 4
    eidetic_per_chunk: int = 2
    eidetic_budget: int = 64
    variant: str = "bmojo"
    use_ssm: bool = True
    use_attention: bool = True
    mlp_expand: int = 0
    attn_bias: bool = False
    architecture: str = field(default="bmojo", repr=False)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ValueError(str(error).replace("MambaConfig:", "BMojoConfig:", 1)) from None
        for name in ("n_head", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BMojoConfig: `{name}` must be a positive integer, got {value!r}")
        for name in ("n_memory_tokens", "eidetic_per_chunk", "eidetic_budget", "mlp_expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"BMojoConfig: `{name}` must be a non-negative integer, got {value!r}")
        for name in ("use_ssm", "use_attention", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BMojoConfig: `{name}` must be True or False, got {getattr(self, name)!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"BMojoConfig: `variant` must be one of {VARIANTS}, got {self.variant!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"BMojoConfig: `d_model` ({self.d_model}) must be divisible by `n_head` ({self.n_head})")
        if self.variant == "bmojo" and self.eidetic_per_chunk > self.window - 1:
            raise ValueError(
                f"BMojoConfig: `eidetic_per_chunk` ({self.eidetic_per_chunk}) must be <= window - 1 "
                f"({self.window - 1}): a chunk has window - 1 candidates besides its memory position"
            )
        if not (self.use_ssm or self.use_attention):
            raise ValueError("BMojoConfig: `use_ssm` and `use_attention` cannot both be False")
        if self.architecture != "bmojo":
            raise ValueError(f"BMojoConfig: `architecture` must be 'bmojo', got {self.architecture!r}")

    def mamba_config(self) -> MambaConfig:
        """The :class:`MambaConfig` of the fading-memory sub-layer (Mamba's fields of this config)."""
        mamba_fields = {item.name for item in fields(MambaConfig)} - {"architecture"}
        return MambaConfig(**{name: getattr(self, name) for name in mamba_fields})

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def selects_eidetic(self) -> bool:
        """Whether the innovation test selects tokens (full B'MOJO with ``eidetic_per_chunk > 0``)."""
        return self.use_attention and self.variant == "bmojo" and self.eidetic_per_chunk > 0

    def key_slots(self, n_chunks: int) -> tuple[int, int]:
        """``(n_memory, n_eidetic)``: memory and eidetic key slots per chunk for ``n_chunks`` chunks."""
        older = max(n_chunks - 2, 0)
        n_eidetic = min(self.eidetic_budget, self.eidetic_per_chunk * older) if self.selects_eidetic else 0
        return min(self.n_memory_tokens, older), n_eidetic


# ------------------------------------------------------------------------ padding and selection
def row_alignment(padding_mask: torch.Tensor | None, batch: int, length: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, lengths)``, both (B,) long: each row's first real position and its number of real
    tokens (0 and L without a mask). Raises ``ValueError`` unless each row's real tokens of
    ``padding_mask`` (B, L) bool are contiguous."""
    if padding_mask is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), length, dtype=torch.long, device=device))
    lengths = padding_mask.sum(1)
    offsets = padding_mask.long().argmax(1)
    position = torch.arange(length, device=device)
    contiguous = (position >= offsets[:, None]) & (position < (offsets + lengths)[:, None])
    if not torch.equal(contiguous, padding_mask):
        row = int((contiguous != padding_mask).any(1).nonzero()[0])
        raise ValueError(
            f"`attention_mask`: B'MOJO needs the real tokens of each row to be contiguous (left or right "
            f"padding); row {row} is not"
        )
    return offsets, lengths


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, (i + shift[b]) mod L]`` for ``x`` (B, L, ...) and ``shift`` (B,): a gather,
    so linear and exactly invertible by ``roll_rows(out, -shift)``."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None] + shift[:, None]) % length  # (B, L)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)


@torch.no_grad()
def innovation_scores(inputs: torch.Tensor, readout: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The innovation test: ``score_t = 1 - cos(inputs_t, readout_{t-1})`` (B, L), without gradient.

    ``inputs``, ``readout`` (B, L, D); ``offsets`` (B,) the first real position of each row, whose
    score is 1 (nothing predicts the first token). Computed in float32 (float64 for float64 inputs)."""
    compute = torch.promote_types(inputs.dtype, torch.float32)
    cosine = F.cosine_similarity(inputs[:, 1:].to(compute), readout[:, :-1].to(compute), dim=-1)
    first = torch.ones(inputs.shape[0], 1, dtype=cosine.dtype, device=cosine.device)
    scores = torch.cat([first, 1 - cosine.view(inputs.shape[0], -1)], dim=1)
    scores[torch.arange(scores.shape[0], device=scores.device), offsets] = 1.0
    return scores


@torch.no_grad()
def select_eidetic(scores: torch.Tensor, real: torch.Tensor, window: int, k: int) -> torch.Tensor:
    """The top ``k`` positions by score of each chunk: (B, n_chunks, k) long, in decreasing score,
    -1 where a chunk has fewer candidates.

    ``scores`` (B, n_chunks w) and ``real`` (B, n_chunks w) bool, in chunk coordinates. Candidates
    are a chunk's real positions except its last (memory) position; ties go to the earlier
    position (stable sort)."""
    batch, padded = scores.shape
    n_chunks = padded // window
    masked = scores.masked_fill(~real, float("-inf")).view(batch, n_chunks, window).clone()
    masked[..., window - 1] = float("-inf")
    values, order = torch.sort(masked, dim=-1, descending=True, stable=True)
    chunk_start = torch.arange(n_chunks, device=scores.device)[None, :, None] * window
    positions = order[..., :k] + chunk_start
    return torch.where(values[..., :k] > float("-inf"), positions, -1)


def chunk_key_positions(n_chunks: int, window: int, n_memory: int, selected: torch.Tensor,
                        n_eidetic: int) -> torch.Tensor:
    """Positions (B, n_chunks, n_keys) of the key slots of every chunk, -1 for an empty slot:
    ``2 w`` window slots (chunks c - 1 and c), ``n_memory`` memory slots (ends of chunks c - 2,
    c - 3, ...), ``n_eidetic`` eidetic slots (the selections ``selected`` (B, n_chunks, k) of chunks
    c - 2, c - 3, ..., each chunk's in its order, cut at ``n_eidetic``)."""
    batch, device = selected.shape[0], selected.device
    chunk = torch.arange(n_chunks, device=device)[:, None]
    window_positions = (chunk - 1) * window + torch.arange(2 * window, device=device)
    memory_chunk = chunk - 2 - torch.arange(n_memory, device=device)
    slots = [window_positions.clamp(min=-1), torch.where(memory_chunk >= 0, memory_chunk * window + window - 1, -1)]
    positions = torch.cat(slots, dim=1).expand(batch, -1, -1)
    if n_eidetic:
        k = selected.shape[-1]
        slot = torch.arange(n_eidetic, device=device)
        source_chunk = chunk - 2 - slot // k  # (n_chunks, n_eidetic)
        rank = (slot % k).expand_as(source_chunk)
        eidetic = selected[:, source_chunk.clamp(min=0), rank]  # (B, n_chunks, n_eidetic)
        positions = torch.cat([positions, torch.where(source_chunk >= 0, eidetic, -1)], dim=2)
    return positions


def chunk_attention_mask(positions: torch.Tensor, real: torch.Tensor, window: int) -> torch.Tensor:
    """Bool mask (B, n_chunks, w, n_keys), True where query ``i`` of chunk ``c`` may attend to slot
    ``s``: the slot holds a real token, and window slots are causal (``s <= w + i``). A padded query
    attends to itself only (window slot ``w + i``), so that no softmax row is empty.

    ``positions`` (B, n_chunks, n_keys) from :func:`chunk_key_positions`; ``real`` (B, n_chunks w)."""
    batch, n_chunks, n_keys = positions.shape
    device = positions.device
    key_real = (positions >= 0) & torch.gather(real, 1, positions.clamp(min=0).flatten(1)).view_as(positions)
    slot = torch.arange(n_keys, device=device)[None, :]
    query = torch.arange(window, device=device)[:, None]
    causal = (slot <= window + query) | (slot >= 2 * window)  # (w, n_keys)
    query_real = real.view(batch, n_chunks, window)[..., None]
    mask = key_real[:, :, None, :] & causal & query_real
    return mask | (~query_real & (slot == window + query))


# ------------------------------------------------------------------------------------ modules
class ChunkedAttention(nn.Module):
    """The eidetic-memory attention of one layer: q/k/v projections of ``RMSNorm_attn(h)``,
    block-causal chunked attention over window, memory and eidetic keys (see the module docstring)
    through the :class:`Attention` primitive, and the output projection. (B, L, d_model) ->
    (B, L, d_model)."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=config.attn_bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.attn_bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.attn_bias)
        self.attention = Attention()
        self.out_proj = nn.Linear(d_model, d_model, bias=config.attn_bias)

    def forward(self, normed: torch.Tensor, scores: torch.Tensor | None, padding_mask: torch.Tensor | None,
                record: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``normed`` (B, L, d_model) = ``RMSNorm_attn(h)``; ``scores`` (B, L) innovation scores
        (needed when the config selects eidetic tokens or ``record``); ``padding_mask`` (B, L) bool.

        Returns the sub-layer output (B, L, d_model) and, with ``record``, a dict of introspection
        tensors in original coordinates (see :class:`BMojoInspection`; also the per-query
        ``probabilities`` and ``key_positions`` of :meth:`attention_map`), else None."""
        config, window, heads = self.config, self.config.window, self.config.n_head
        batch, length, d_model = normed.shape
        device = normed.device
        offsets, lengths = row_alignment(padding_mask, batch, length, device)
        shifted = bool(offsets.any())
        if shifted:  # chunks count from each row's first real token
            normed = roll_rows(normed, offsets)
            scores = None if scores is None else roll_rows(scores, offsets)
        n_chunks = -(-length // window)
        padded = n_chunks * window
        real = torch.arange(padded, device=device)[None] < lengths[:, None]  # (B, padded), chunk coordinates
        n_memory, n_eidetic = config.key_slots(n_chunks)
        k = config.eidetic_per_chunk if config.selects_eidetic else 0
        if k:
            selected = select_eidetic(F.pad(scores, (0, padded - length)), real, window, k)
        else:
            selected = torch.full((batch, n_chunks, 0), -1, dtype=torch.long, device=device)
        positions = chunk_key_positions(n_chunks, window, n_memory, selected, n_eidetic)
        n_keys = positions.shape[-1]
        mask = chunk_attention_mask(positions, real, window)  # (B, n_chunks, w, n_keys)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0, 0, padded - length))

        query = pad(self.q_proj(normed)).view(batch, n_chunks, window, heads, -1).transpose(2, 3)
        index = positions.clamp(min=0).flatten(1)[..., None].expand(-1, -1, d_model)  # (B, n_chunks n_keys, D)

        def gather_keys(x: torch.Tensor) -> torch.Tensor:
            gathered = torch.gather(pad(x), 1, index).view(batch, n_chunks, n_keys, heads, -1)
            return gathered.transpose(2, 3).reshape(batch * n_chunks, heads, n_keys, -1)

        key, value = gather_keys(self.k_proj(normed)), gather_keys(self.v_proj(normed))
        query = query.reshape(batch * n_chunks, heads, window, -1)
        flat_mask = mask.view(batch * n_chunks, 1, window, n_keys)
        attended = self.attention(query, key, value, flat_mask)  # (B n_chunks, H, w, d_head)
        attended = attended.view(batch, n_chunks, heads, window, -1).transpose(2, 3).reshape(batch, padded, d_model)
        attended = attended[:, :length]
        if shifted:
            attended = roll_rows(attended, -offsets)
        output = self.out_proj(attended)
        if not record:
            return output, None
        with torch.no_grad():
            probabilities = self.attention.probabilities(query, key, flat_mask).mean(1)  # (B n_chunks, w, n_keys)
            bounds = [0, 2 * window, 2 * window + n_memory, n_keys]  # window | memory | eidetic slots
            mass = torch.stack([probabilities[..., bounds[i]:bounds[i + 1]].sum(-1) for i in range(3)], -1)
            mass = (mass.view(batch, padded, 3) * real[..., None])[:, :length]
            key_real = mask.any(2)  # (B, n_chunks, n_keys): the slot is a real key for some query
            key_positions = torch.where(key_real, positions, -1)

            def original(position: torch.Tensor) -> torch.Tensor:
                return torch.where(position >= 0, position + offsets.view(-1, 1, 1), -1)

            # per query (original coordinates): head-mean probabilities and the positions of its keys
            query_real = real[..., None]  # (B, padded, 1)
            per_query = (probabilities.view(batch, padded, n_keys) * query_real)[:, :length]
            query_keys = torch.where(mask, positions[:, :, None, :], -1).view(batch, padded, n_keys)
            query_keys = original(torch.where(query_real, query_keys, -1))[:, :length]
            if shifted:
                per_query, query_keys = roll_rows(per_query, -offsets), roll_rows(query_keys, -offsets)
            return output, {
                "selected": original(selected),
                "memory": original(key_positions[..., 2 * window: 2 * window + n_memory]),
                "eidetic": original(key_positions[..., 2 * window + n_memory:]),
                "attention_mass": roll_rows(mass, -offsets) if shifted else mass,
                "probabilities": per_query,
                "key_positions": query_keys,
            }

    @torch.no_grad()
    def attention_map(self, normed: torch.Tensor, scores: torch.Tensor | None,
                      padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of :meth:`forward` (same arguments) as ``(probabilities, key_positions)``, each
        (B, L, n_keys), without gradient: query ``t`` (input coordinates) puts the head-mean probability
        ``probabilities[b, t, s]`` on position ``key_positions[b, t, s]`` (-1 and probability 0 for a
        masked slot); padded queries have no keys. It is the record path of :meth:`forward`, so the
        masking is the forward's."""
        _, details = self.forward(normed, scores, padding_mask, record=True)
        return details["probabilities"], details["key_positions"]


class GeluMLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``: (B, L, d_model) -> (B, L, d_model), width ``mlp_expand * d_model``."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__()
        width = config.mlp_expand * config.d_model
        self.fc1 = nn.Linear(config.d_model, width, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(width, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BMojoBlock(nn.Module):
    """One B'MOJO layer (module docstring): SSM, attention and MLP pre-norm residual sub-layers.
    ``forward(hidden (B, L, d_model), cache, layer_idx, padding_mask) -> (B, L, d_model)``; the
    residual stream is kept in float32 (float64 for float64 models) if ``residual_in_fp32``."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__()
        self.config = config
        if config.use_ssm:
            self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.mixer = MambaMixer(config.mamba_config())
        if config.use_attention:
            self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.attn = ChunkedAttention(config)
        if config.mlp_expand:
            self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = GeluMLP(config)

    def _residual(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.residual_in_fp32:
            return hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        return hidden

    def forward(self, hidden: torch.Tensor, cache: Any = None, layer_idx: int = 0,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(hidden, padding_mask)[0]

    def run(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None,
            record: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The layer on ``hidden`` (B, L, d_model); with ``record`` also its introspection dict
        (innovation scores and the attention's record), else None."""
        config = self.config
        inputs = readout = None
        if config.use_ssm:
            normed = self.norm(hidden.to(self.norm.weight.dtype))
            mixed = self.mixer(normed, None, 0, padding_mask)
            inputs, readout = normed, mixed
            hidden = self._residual(hidden) + mixed
        details = None
        if config.use_attention:
            normed = self.attn_norm(hidden.to(self.attn_norm.weight.dtype))
            scores = None
            if config.selects_eidetic or record:
                if not config.use_ssm:
                    inputs = readout = normed
                offsets, _ = row_alignment(padding_mask, *hidden.shape[:2], hidden.device)
                scores = innovation_scores(inputs, readout, offsets)
            attended, details = self.attn(normed, scores, padding_mask, record)
            hidden = self._residual(hidden) + attended
            if record:
                real = 1.0 if padding_mask is None else padding_mask.to(scores.dtype)
                details["innovation"] = scores * real
        if config.mlp_expand:
            hidden = self._residual(hidden) + self.mlp(self.mlp_norm(hidden.to(self.mlp_norm.weight.dtype)))
        return hidden, details


class BMojoBackbone(nn.Module):
    """Embedding, ``n_layer`` :class:`BMojoBlock` and the final RMSNorm ``norm_f`` (Mamba's names)."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([BMojoBlock(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)


@dataclass
class BMojoCache:
    """Decoding cache: the token ids so far (B, L), or None before the first forward."""

    input_ids: torch.Tensor | None = None


@dataclass
class BMojoInspection:
    """What :meth:`BMojoLM.inspect` returns; layers on the first axis, positions in the input's
    coordinates (chunk ``c`` of row ``b`` starts at position ``chunk_offset[b] + c * window``).

    * ``logits`` (B, L, V): the forward's logits;
    * ``chunk_offset`` (B,): each row's first real position;
    * ``innovation`` (n_layer, B, L): innovation scores ``1 - cos(u_t, y_{t-1})``, 0 at padding;
    * ``selected`` (n_layer, B, n_chunks, k): the positions chunk c selects (decreasing score), -1 for
      none; k = ``eidetic_per_chunk`` for B'MOJO, 0 for B'MOJO-F;
    * ``memory`` (n_layer, B, n_chunks, n_memory): memory positions visible to chunk c, -1 for none;
    * ``eidetic`` (n_layer, B, n_chunks, n_eidetic): eidetic positions visible to chunk c, -1 for none;
    * ``attention_mass`` (n_layer, B, L, 3): the attention probability mass of each query on
      ``SOURCES`` = window / memory tokens / eidetic tokens, averaged over heads (rows sum to 1; 0 at
      padding).
    """

    logits: torch.Tensor
    chunk_offset: torch.Tensor
    innovation: torch.Tensor
    selected: torch.Tensor
    memory: torch.Tensor
    eidetic: torch.Tensor
    attention_mass: torch.Tensor


class BMojoLM(SequenceLM):
    """B'MOJO language model: ``forward(input_ids) -> logits (B, L, padded_vocab_size)``; checks,
    block loop, head, ``generate`` and saving are :class:`SequenceLM`'s. :meth:`inspect` returns the
    innovation scores, the selected positions and the attention mass by source."""

    def __init__(self, config: BMojoConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = BMojoBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mamba's scheme (module docstring): embedding N(0, initializer_range); each residual
        branch's output projection rescaled by ``1/sqrt(n_branches * n_layer)``; biases zero."""
        config = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=config.initializer_range)
        n_branches = int(config.use_ssm) + int(config.use_attention) + int(config.mlp_expand > 0)
        for block in self.backbone.layers:
            outputs = []
            if config.use_ssm:
                outputs.append(block.mixer.out_proj)
                if block.mixer.in_proj.bias is not None:
                    nn.init.zeros_(block.mixer.in_proj.bias)
            if config.use_attention:
                outputs.append(block.attn.out_proj)
                for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                    if linear.bias is not None:
                        nn.init.zeros_(linear.bias)
            if config.mlp_expand:
                outputs.append(block.mlp.fc2)
                if block.mlp.fc1.bias is not None:
                    nn.init.zeros_(block.mlp.fc1.bias)
            for linear in outputs:
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
                if config.rescale_prenorm_residual:
                    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                    linear.weight /= math.sqrt(n_branches * config.n_layer)

    @property
    def embedding(self) -> nn.Embedding:
        return self.backbone.embedding

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm_f

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
    ) -> torch.Tensor:
        """As :meth:`SequenceLM.hidden_states`; a ``cache`` (:meth:`new_cache`) records ``input_ids``
        for :meth:`step` (decoding re-runs the forward on the grown sequence)."""
        if cache is not None:
            if input_ids is None or attention_mask is not None:
                raise ValueError("B'MOJO decoding (`cache=`) needs `input_ids` and no `attention_mask`")
            cache.input_ids = input_ids
        return super().hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    # -------------------------------------------------------------- decoding
    def new_cache(self, batch_size: int) -> BMojoCache:
        """An empty cache (filled by ``forward(..., cache=)``)."""
        return BMojoCache()

    def step(self, token_ids: torch.Tensor, cache: BMojoCache) -> torch.Tensor:
        """Logits (B, V) after appending ``token_ids`` (B,) to the cached ids: the full forward on the
        grown sequence (exact; O(L) per step)."""
        if cache.input_ids is None:
            raise ValueError("`cache` is empty: run forward(input_ids, cache=cache) first")
        input_ids = torch.cat([cache.input_ids, token_ids.view(-1, 1).to(cache.input_ids)], dim=1)
        return self.head(self.hidden_states(input_ids, cache=cache)[:, -1])

    # --------------------------------------------------------- introspection
    @torch.no_grad()
    def inspect(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BMojoInspection:
        """The forward on ``input_ids`` (B, L), recording per layer the innovation scores, the
        selected and visible eidetic positions, the memory positions and the attention mass by source
        (:class:`BMojoInspection`). Same code path as the forward (the blocks' ``run(record=True)``)."""
        if not self.config.use_attention:
            raise ValueError("inspect: this model has no attention (`use_attention=False`): nothing to inspect")
        hidden = self.input_hidden(input_ids, None)
        padding_mask = None
        if attention_mask is not None:
            padding_mask = self.check_attention_mask(attention_mask, hidden.shape[:2])
        offsets, _ = row_alignment(padding_mask, *hidden.shape[:2], hidden.device)
        records = []
        for block in self.blocks:
            hidden, details = block.run(hidden, padding_mask, record=True)
            records.append(details)
        logits = self.head(self.final_norm(hidden))

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([record[name] for record in records])

        return BMojoInspection(
            logits=logits, chunk_offset=offsets, innovation=stacked("innovation"), selected=stacked("selected"),
            memory=stacked("memory"), eidetic=stacked("eidetic"), attention_mass=stacked("attention_mass"),
        )

    # ------------------------------------------------------------- backends
    def set_backend(self, scan: str | None = None, conv: str | None = None) -> BMojoLM:
        """Choose the selective-scan and causal-conv backends of the SSM sub-layers (as
        :meth:`MambaLM.set_backend`). Returns self."""
        MambaLM.set_backend(self, scan, conv)  # it only walks self.modules()
        return self


def config_from_dict(raw: dict[str, Any]) -> BMojoConfig:
    """A :class:`BMojoConfig` from a saved ``config.json`` dict (without ``architecture``)."""
    return BMojoConfig(**raw)


register_architecture(Architecture(name="bmojo", config_from_dict=config_from_dict, build=BMojoLM))
