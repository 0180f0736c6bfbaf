"""Mamba-1 language model (Gu and Dao, 2023), numerics as in mamba_ssm and ``transformers``.

REFERENCE.md section 1. One layer::

    xz = in_proj(h);  x, z = split(xz)                      (B, L, 2 d_inner) -> 2 x (B, d_inner, L)
    x = silu(causal_conv1d(x))
    dt_low, B, C = split(x_proj(x));  dt = dt_proj.weight @ dt_low
    y = S6(x, dt, A = -exp(A_log), B, C, D, delta_bias = dt_proj.bias)   (fp32 scan)
    out = out_proj(y * silu(z))

Block: ``x_{l+1} = x_l + mixer(RMSNorm(x_l))`` with the residual stream kept in float32 (float64
for float64 models); then ``norm_f`` and the head, tied to the embedding by default.

The model is composed of the primitives of :mod:`ssm_models.primitives` (``SiLU`` twice,
``GatingProduct``, ``RMSNorm``, ``CausalConv1d``, ``SelectiveSSM``) and ``nn.Linear``, so that rules
attach per type. Parameter names follow the state-spaces checkpoints
(``backbone.layers.{i}.mixer.A_log`` ...), so our state dict *is* that naming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ssm_models.lm_base import SequenceLM
from ssm_models.primitives import CausalConv1d, GatingProduct, RMSNorm, SelectiveSSM, SiLU


@dataclass
class MambaConfig:
    """Hyper-parameters of a Mamba-1 LM. ``vocab_size`` is padded up to a multiple of
    ``pad_vocab_size_multiple`` for the embedding (50277 -> 50280 for the public models)."""

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    architecture: str = field(default="mamba", repr=False)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "d_conv", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaConfig: `{name}` must be a positive integer, got {value!r}")
        if self.dt_rank != "auto" and (
            not isinstance(self.dt_rank, int) or isinstance(self.dt_rank, bool) or self.dt_rank < 1
        ):
            raise ValueError(f"MambaConfig: `dt_rank` must be 'auto' or a positive integer, got {self.dt_rank!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"MambaConfig: `norm_eps` must be > 0, got {self.norm_eps!r}")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"MambaConfig: `dt_init` must be 'random' or 'constant', got {self.dt_init!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig: need 0 < `dt_min` <= `dt_max`, got {self.dt_min!r}, {self.dt_max!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MambaCache:
    """Recurrent state for decoding, per layer: ``conv_states[i]`` (B, d_inner, d_conv) with the
    last d_conv conv inputs, ``ssm_states[i]`` (B, d_inner, N) in the scan's compute dtype."""

    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]


class MambaMixer(nn.Module):
    """The selective-SSM mixer of one layer: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        d_inner, n_state, dt_rank = config.d_inner, config.d_state, config.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank = d_inner, n_state, dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = CausalConv1d(d_inner, config.d_conv, bias=config.conv_bias)
        self.act = SiLU()
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * n_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.ssm = SelectiveSSM()
        self.gate_act = SiLU()
        self.gate = GatingProduct()
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self._init_dt_proj(config)

    @torch.no_grad()
    def _init_dt_proj(self, config: MambaConfig) -> None:
        """dt_proj init of mamba_ssm: weight U(+-dt_rank^-0.5 * dt_scale) (or constant);
        bias = softplus^-1(dt), dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor."""
        std = self.dt_rank**-0.5 * config.dt_scale
        if config.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_min, log_max = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min).clamp(min=config.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        compute = SelectiveSSM.state_dtype(dtype)
        A = -torch.exp(self.A_log.to(compute))
        return A, self.D.to(compute), self.dt_proj.bias.to(compute)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: MambaCache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (B, L, d_model) -> (B, L, d_model). With ``cache``, the final conv and SSM
        states of this layer are written to ``cache.conv_states[layer_idx]`` / ``ssm_states``.

        ``padding_mask`` (B, L), 1 for real tokens and 0 for padding: padded positions are zeroed
        at the mixer input and at the scan input ``u``, so they leave the conv window and the SSM
        state as an unpadded sequence would (left or right padding; as in ``transformers``)."""
        if padding_mask is not None:
            hidden = hidden * padding_mask[:, :, None].to(hidden.dtype)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = x.transpose(1, 2)  # (B, d_inner, L)
        if cache is not None:
            kernel = self.conv1d.kernel_size
            cache.conv_states[layer_idx] = F.pad(x, (max(kernel - x.shape[-1], 0), 0))[:, :, -kernel:].detach()
        x = self.act(self.conv1d(x))
        if padding_mask is not None:
            x = x * padding_mask[:, None, :].to(x.dtype)
        dt_low, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt_low, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L)
        A, D, delta_bias = self._ssm_parameters(x.dtype)
        scanned = self.ssm(
            x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, delta_bias, return_last_state=cache is not None
        )
        if cache is not None:
            y, cache.ssm_states[layer_idx] = scanned[0], scanned[1].detach()
        else:
            y = scanned
        gated = self.gate(y, self.gate_act(z.transpose(1, 2)))
        return self.out_proj(gated.transpose(1, 2))

    def step(self, hidden: torch.Tensor, cache: MambaCache, layer_idx: int) -> torch.Tensor:
        """One decoding step: ``hidden`` (B, d_model) -> (B, d_model), updating ``cache`` in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner) each
        x, cache.conv_states[layer_idx] = self.conv1d.step(cache.conv_states[layer_idx], x)
        x = self.act(x)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt_low, self.dt_proj.weight)
        A, D, delta_bias = self._ssm_parameters(x.dtype)
        y, cache.ssm_states[layer_idx] = self.ssm.step(cache.ssm_states[layer_idx], x, delta, A, B, C, D, delta_bias)
        return self.out_proj(self.gate(y, self.gate_act(z)))


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(RMSNorm(x))``, residual in float32 if configured."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MambaMixer(config)

    def _residual(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(torch.promote_types(hidden.dtype, torch.float32)) if self.residual_in_fp32 else hidden

    def forward(
        self,
        hidden: torch.Tensor,
        cache: MambaCache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        return self._residual(hidden) + self.mixer(normed, cache, layer_idx, padding_mask)

    def step(self, hidden: torch.Tensor, cache: MambaCache, layer_idx: int) -> torch.Tensor:
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        return self._residual(hidden) + self.mixer.step(normed, cache, layer_idx)


class MambaBackbone(nn.Module):
    """Embedding, ``n_layer`` blocks and the final RMSNorm ``norm_f``."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([MambaBlock(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)


class MambaLM(SequenceLM):
    """Mamba language model: ``forward(input_ids) -> logits (B, L, padded_vocab_size)``; the
    shared machinery (checks, block loop, head, ``generate``, saving) is :class:`SequenceLM`'s."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """mamba_ssm's init: embedding N(0, initializer_range); out_proj rescaled by
        1/sqrt(n_layer) (GPT-2's scheme for pre-norm residual branches)."""
        config = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=config.initializer_range)
        for block in self.backbone.layers:
            for linear in (block.mixer.in_proj, block.mixer.out_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            if config.rescale_prenorm_residual:
                nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
                block.mixer.out_proj.weight /= math.sqrt(config.n_layer)

    @property
    def embedding(self) -> nn.Embedding:
        return self.backbone.embedding

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm_f

    # -------------------------------------------------------------- decoding
    def new_cache(self, batch_size: int) -> MambaCache:
        """An empty cache for ``batch_size`` sequences (filled by ``forward(..., cache=)``)."""
        n_layer = self.config.n_layer
        return MambaCache(conv_states=[torch.empty(0)] * n_layer, ssm_states=[torch.empty(0)] * n_layer)

    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """Logits (B, V) for the next token ``token_ids`` (B,), advancing ``cache`` by one step."""
        hidden = self.backbone.embedding(token_ids)
        for index, block in enumerate(self.backbone.layers):
            hidden = block.step(hidden, cache, index)
        return self.head(self.backbone.norm_f(hidden))

    # ------------------------------------------------------------- backends
    def set_backend(self, scan: str | None = None, conv: str | None = None) -> MambaLM:
        """Choose the selective-scan backend (``auto``/``reference``/``cpu``/``triton``) and the
        causal-conv backend (``auto``/``reference``/``torch``) of every layer. Returns self."""
        from ssm_models.ops import CAUSAL_CONV1D_BACKENDS, SELECTIVE_SCAN_BACKENDS

        if scan is not None and scan not in SELECTIVE_SCAN_BACKENDS:
            raise ValueError(f"`scan` must be one of {SELECTIVE_SCAN_BACKENDS}, got {scan!r}")
        if conv is not None and conv not in CAUSAL_CONV1D_BACKENDS:
            raise ValueError(f"`conv` must be one of {CAUSAL_CONV1D_BACKENDS}, got {conv!r}")
        for module in self.modules():
            if scan is not None and isinstance(module, SelectiveSSM):
                module.backend = scan
            if conv is not None and isinstance(module, CausalConv1d):
                module.backend = conv
        return self
