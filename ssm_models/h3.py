"""H3 language model ("Hungry Hungry Hippos", Fu, Dao et al. 2023), REFERENCE.md section 4.

One H3 layer, for ``u`` (B, L, d_model) and ``H = d_model / head_dim`` SSM channels::

    q, k, v = q_proj(u), k_proj(u), v_proj(u)                       (B, d_model, L) each, with bias
    k'      = SSM_shift(k) + ssm_k_D * k                             shift SSM: a causal FIR filter
    kv      = k'_{h, i} * v_{h, j}                                   (B, head_dim, head_dim, H, L)
    y       = SSM_diag(kv) + D * kv                                  S4D-Lin, shared over (i, j)
    o_{j, h} = sum_i q_{h, i} * y_{i, j, h}                          (B, head_dim * H, L)
    out     = output_linear(o)

with channel ``c = h * head_dim + i`` for q, k, v (``(h d)`` order) and ``c = j * H + h`` for ``o``
(``(d h)`` order), exactly as the public code wires ``head_dim > 1``; for ``head_dim = 1`` (the
released models) this is ``out = output_linear(q * SSM_diag(SSM_shift(k) * v))``.

**Shift SSM** (``mixer.ssm_k_kernel``): parameters ``kernel.B`` (d_model, N) (``e_0`` at init) and
``kernel.C`` (1, d_model, N); state = a shift register ``s_t = shift(s_{t-1}) + B u_t``, output
``C . s_t``. Its kernel is the N taps ``K_j = sum_m B_m C_{m+j}`` (``= C_j`` for ``B = e_0``), so
``SSM_shift(k)_t = sum_{j < N} K_j k_{t-j}``.

**Diagonal SSM** (``mixer.kernel``), S4D-Lin with ``M = N/2`` complex modes per channel:
parameters ``kernel.log_dt`` (H,), ``kernel.B`` (H, M, 2), ``kernel.inv_A_real`` (H, M),
``kernel.A_imag`` (H, M), ``kernel.C`` (1, H, M, 2) (complex numbers as trailing (re, im) pairs)::

    dt = exp(log_dt);  A = -exp(inv_A_real) + i A_imag
    bilinear (default):  dA = (1 + dt A/2) / (1 - dt A/2),  dB = B dt / (1 - dt A/2)
    zoh:                 dA = exp(dt A),                    dB = B (exp(dt A) - 1) / A
    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(sum_m C_m x_{t,m}) + D u_t
    (kernel form: K_l = 2 Re sum_m C_m dB_m dA_m^l, y = K * u + D u)

The factor 2 (the conjugate modes) and ``dB`` are folded into the output coefficients
``c = 2 C dB`` that :func:`ssm_models.ops.diagonal_scan` and
:func:`ssm_models.ops.diagonal_ssm_kernel` take; ``a = dA``.

Two computation paths (:meth:`H3LM.set_backend`), equal to float rounding:

* ``"fft"``: both SSMs as causal convolutions by FFT (:func:`ssm_models.ops.fft_causal_conv`,
  FFT size >= L + kernel length, fp32 compute; fp64 for fp64 models).
* ``"recurrent"``: the diagonal SSM through the scan (:func:`ssm_models.ops.diagonal_scan`,
  backends ``auto``/``reference``/``cpu``/``triton``); the shift SSM as what its shift register
  computes, the N-tap causal FIR filter (:func:`ssm_models.ops.causal_conv1d`).

Decoding (:meth:`H3LM.step`) is recurrent: per H3 layer a shift register of the last N k's
(B, d_model, N) and the diagonal SSM state (B * head_dim^2, H, M, 2); per attention layer a KV cache.
A forward that fills a cache runs the diagonal SSM through the scan to get its last state.

LM (flash-attn's ``SSMLMHeadModel``): word embeddings without positions, blocks
``x = x + mixer(norm1(x)); x = x + mlp(norm2(x))`` (LayerNorm with bias, MLP ``fc1 -> GELU(tanh) ->
fc2`` of width ``d_inner = 4 d_model``), causal multi-head attention (``Wqkv``, ``out_proj``, both with
bias) at ``attn_layer_idx``, ``ln_f``, head tied to the embedding.

Facts taken from the public code (HazyResearch/H3 ``src/models/ssm/h3.py``, ``ss_kernel.py``,
``ss_kernel_diag.py``, ``ss_kernel_shift.py``, ``dplr.py``, ``src/models/ssm_seq.py``,
``examples/generate_text_h3.py``), read for facts only:

* parameter shapes as listed above; the shift SSM runs on all d_model channels with N = d_state
  taps, the diagonal SSM on H = d_model/head_dim channels with N/2 modes; ``ssm_k_D`` (d_model,),
  ``D`` (H,), both ``randn`` at init; shift ``C`` gets ``nn.Conv1d``'s kaiming-uniform init on a
  (H, 1, N) tensor (bound ``1/sqrt(N)``), shift ``B = e_0``;
* S4D-Lin init ``A_n = -0.5 + i pi n``, ``B = 1``, ``C ~ CN(0, 1)``, ``log_dt ~ U(log dt_min,
  log dt_max)``; ``Re A = -exp(inv_A_real)`` (``real_type="exp"``);
* the kernel length is L (``l_max=None``), the FFT size ``L_kernel + L``, in fp32;
* checkpoint names are ``SSMLMHeadModel``'s; its ``load_state_dict`` renames ``s4seq.encoder.`` ->
  ``backbone.``, ``embedding.`` -> ``backbone.embeddings.word_embeddings.``, ``backbone.norm`` ->
  ``backbone.ln_f``, and converts the older post-norm layer ordering (``backbone.ln_0``) by moving
  every LayerNorm one slot; Lightning files keep the model under ``state_dict`` with prefix
  ``model.`` (the file has ``pytorch-lightning_version``);
* GPT-2-style init (Linear/Embedding N(0, 0.02), zero biases, ``out_proj``/``fc2`` weights with std
  ``0.02 / sqrt(2 n_layer)``); vocabulary padded to a multiple of 8 (50257 -> 50264);
* attention is flash-attn's ``MHA`` (``Wqkv`` rows ordered (q|k|v, head, dim), softmax scale
  ``1/sqrt(head dim)``), with optional rotary embeddings (``rotary_emb_dim``, GPT-NeoX
  non-interleaved, base 10000) in one of the released 2.7B models.

Decisions:

* The full-length kernel is always used (= the recurrent form); H3 with a finite ``l_max`` truncates
  the diagonal kernel at ``l_max``, which agrees for ``L <= l_max``.
* Only ``real_type="exp"``, one kernel channel and ``n_ssm = H`` (the defaults of every public
  model) are supported; the shift kernel's ``B`` is a trained parameter in the public code, so we
  keep it a parameter and use the general tap formula rather than assuming ``B = e_0``.
* The rotary ``inv_freq`` buffer that some checkpoints store is dropped and recomputed.
* Padding (``attention_mask``): k is zeroed before the shift SSM and kv before the diagonal SSM at
  padded positions, and attention masks padded keys (a padded query attends to itself only, so no
  row is empty); rotary positions count real tokens only. Each real position then gets exactly its
  unpadded output, with left or right padding.
* Path default: ``"recurrent"``, which is faster on the 2-core CPU at L = 1024 and 8192, d_model 512
  (benchmarks/RESULTS.md, "H3: FFT path vs recurrent path"): the numba scan costs less than building
  the (H, L) kernel alone. The scan backend ``"auto"`` is ``cpu`` for CPU tensors, ``triton`` for CUDA.
* For LRP the two products are :class:`~ssm_models.primitives.GatingProduct` instances, the norms
  ``nn.LayerNorm``, the MLP activation ``nn.GELU(approximate="tanh")`` and attention
  :class:`~ssm_models.primitives.Attention`; the LTI SSMs (parameters independent of the input) and
  the rotary rotation are linear in their input and need no rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssm_models.lm_base import SequenceLM
from ssm_models.loading import Architecture, load_state_dict_into, read_state_dict, register_architecture
from ssm_models.ops import (
    DIAGONAL_SCAN_BACKENDS,
    causal_conv1d,
    causal_conv1d_step,
    diagonal_scan,
    diagonal_scan_step,
    diagonal_ssm_kernel,
    fft_causal_conv,
    scan_compute_dtype,
)
from ssm_models.primitives import Attention, GatingProduct

SSM_PATHS = ("fft", "recurrent")
DISCRETIZATIONS = ("bilinear", "zoh")


# ------------------------------------------------------------------------------------- config
@dataclass
class H3Config:
    """Hyper-parameters of an H3 LM (names as the public code's where it has them).

    ``d_state`` is N: the shift SSM's number of taps and twice the diagonal SSM's number of complex
    modes (so it must be even). ``head_dim`` groups channels into ``d_model / head_dim`` SSM heads.
    ``attn_layer_idx`` lists the layers that are causal attention with ``n_head`` heads (default 1,
    flash-attn ``MHA``'s default; the released models use d_model / 64). ``discretization`` is the
    public ``disc`` (``"bilinear"`` or ``"zoh"``). ``d_inner`` is the MLP width (default 4 d_model).
    ``rotary_emb_dim`` > 0 applies rotary embeddings to that many dims of each attention head.

    ``initializer_range`` is the std of the GPT-2-style init (:meth:`H3LM._init_weights`). The public
    default 0.02 suits the released widths (d_model >= 768: q, k, v of std ``0.02 sqrt(d_model)``
    ~ 0.55); for a small model use about ``1/sqrt(d_model)`` (0.125 at d_model 64). At d_model 64
    with 0.02, q, k and v have std ~0.16, so the layer's cubic product ``q * SSM(SSM_shift(k) * v)``
    starts at ~0.003 and its projections get under 1% of the gradient norm: a 2-layer model then
    stays on the associative-recall plateau (31-33% after 8000 steps, also with an attention layer),
    while 0.125 leaves it (demos/train_default_models.py, ``h3-associative-recall``).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 64
    head_dim: int = 1
    attn_layer_idx: tuple[int, ...] = ()
    n_head: int = 1
    d_inner: int | None = None
    discretization: str = "bilinear"
    dt_min: float = 0.001
    dt_max: float = 0.1
    rotary_emb_dim: int = 0
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    residual_in_fp32: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    architecture: str = field(default="h3", repr=False)

    def __post_init__(self) -> None:
        positive = ("d_model", "n_layer", "vocab_size", "d_state", "head_dim", "n_head", "pad_vocab_size_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"H3Config: `{name}` must be a positive integer, got {value!r}")
        if self.d_state % 2:
            raise ValueError(f"H3Config: `d_state` must be even (N/2 complex modes), got {self.d_state}")
        if self.d_model % self.head_dim:
            raise ValueError(f"H3Config: `d_model`={self.d_model} is not divisible by `head_dim`={self.head_dim}")
        if self.d_model % self.n_head:
            raise ValueError(f"H3Config: `d_model`={self.d_model} is not divisible by `n_head`={self.n_head}")
        if self.d_inner is not None and (
            not isinstance(self.d_inner, int) or isinstance(self.d_inner, bool) or self.d_inner < 1
        ):
            raise ValueError(f"H3Config: `d_inner` must be None or a positive integer, got {self.d_inner!r}")
        if isinstance(self.attn_layer_idx, int | str) or not hasattr(self.attn_layer_idx, "__iter__"):
            raise ValueError(f"H3Config: `attn_layer_idx` must be a sequence of layer indices, got "
                             f"{self.attn_layer_idx!r}")
        indices = tuple(self.attn_layer_idx)
        for index in indices:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.n_layer:
                raise ValueError(
                    f"H3Config: `attn_layer_idx` entry {index!r} is not a layer index in [0, {self.n_layer - 1}]"
                )
        if len(set(indices)) != len(indices):
            raise ValueError(f"H3Config: `attn_layer_idx` has repeated entries: {indices}")
        self.attn_layer_idx = tuple(sorted(indices))
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(
                f"H3Config: `discretization` must be one of {DISCRETIZATIONS}, got {self.discretization!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"H3Config: need 0 < `dt_min` <= `dt_max`, got {self.dt_min!r}, {self.dt_max!r}")
        rotary = self.rotary_emb_dim
        if not isinstance(rotary, int) or isinstance(rotary, bool) or rotary < 0 or rotary % 2:
            raise ValueError(f"H3Config: `rotary_emb_dim` must be an even integer >= 0, got {rotary!r}")
        if rotary > self.d_model // self.n_head:
            raise ValueError(
                f"H3Config: `rotary_emb_dim`={rotary} exceeds the attention head size {self.d_model // self.n_head}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"H3Config: `norm_eps` must be > 0, got {self.norm_eps!r}")

    @property
    def n_ssm_heads(self) -> int:
        """H: the number of diagonal-SSM channels, ``d_model / head_dim``."""
        return self.d_model // self.head_dim

    @property
    def mlp_width(self) -> int:
        return 4 * self.d_model if self.d_inner is None else self.d_inner

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    def to_dict(self) -> dict:
        raw = asdict(self)
        raw["attn_layer_idx"] = list(self.attn_layer_idx)
        return raw

    @classmethod
    def from_dict(cls, raw: dict) -> H3Config:
        """The config of a ``config.json`` dict (without ``architecture``); unknown keys are an error."""
        fields = {key: value for key, value in raw.items() if key != "architecture"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"H3Config: unknown field(s) {unknown}")
        if "attn_layer_idx" in fields and isinstance(fields["attn_layer_idx"], list):
            fields["attn_layer_idx"] = tuple(fields["attn_layer_idx"])
        return cls(**fields)


# ------------------------------------------------------------------------------------- cache
@dataclass
class H3Cache:
    """Recurrent state for decoding, one entry per layer (``None`` where the layer kind has none).

    H3 layers: ``shift_states[i]`` (B, d_model, N), the last N (masked) k's, oldest first;
    ``ssm_states[i]`` (B * head_dim^2, H, N/2, 2), the diagonal SSM state. Both in the compute dtype.
    Attention layers: ``keys[i], values[i]`` (B, n_head, T, head size), ``key_masks[i]`` (B, T) bool,
    ``positions[i]`` (B,) the rotary position of the next token.
    """

    shift_states: list[torch.Tensor | None]
    ssm_states: list[torch.Tensor | None]
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    key_masks: list[torch.Tensor | None]
    positions: list[torch.Tensor | None]


# ------------------------------------------------------------------------------- LTI SSMs
class ShiftSSMKernel(nn.Module):
    """Parameters of the shift SSM: ``B`` (H, N), ``C`` (1, H, N) (public names and shapes)."""

    def __init__(self, channels: int, d_state: int) -> None:
        super().__init__()
        B = torch.zeros(channels, d_state)
        B[:, 0] = 1.0
        self.B = nn.Parameter(B)
        C = torch.empty(channels, 1, d_state)
        nn.init.kaiming_uniform_(C, a=math.sqrt(5))  # nn.Conv1d's init: U(+-1/sqrt(N))
        self.C = nn.Parameter(C.transpose(0, 1).contiguous())

    def taps(self) -> torch.Tensor:
        """The FIR taps (H, N): ``K_j = sum_m B_m C_{m+j}`` (``C`` zero beyond N); ``C`` if ``B = e_0``."""
        B, C = self.B, self.C[0]
        channels, n = B.shape
        # a depthwise cross-correlation of the zero-padded C (1, H, 2N) with B (H, 1, N): out[h, j] = sum_m B C_{j+m}
        return F.conv1d(F.pad(C, (0, n))[None], B[:, None, :], groups=channels)[0, :, :n]


class ShiftSSM(nn.Module):
    """H3's shift SSM ``y = SSM_shift(u) + D u``: (B, H, L) -> (B, H, L), linear in ``u``.

    ``path="fft"`` convolves with the taps by FFT; ``"recurrent"`` applies the N-tap causal filter
    directly, which is what the shift register computes. The output is in the compute dtype
    (float32, float64 for float64 inputs)."""

    def __init__(self, channels: int, d_state: int) -> None:
        super().__init__()
        self.kernel = ShiftSSMKernel(channels, d_state)
        self.path = "recurrent"

    def forward(self, u: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        compute = scan_compute_dtype(u.dtype)
        u = u.to(compute)
        taps = self.kernel.taps().to(compute)
        if self.path == "fft":
            return fft_causal_conv(u, taps[:, : u.shape[-1]], D.to(compute))
        return causal_conv1d(u, taps.flip(-1)) + D.to(compute)[:, None] * u

    def step(self, state: torch.Tensor, u_t: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``state`` (B, H, N) the last N inputs (oldest first), ``u_t`` (B, H) -> ``(y_t, new_state)``."""
        compute = state.dtype
        u_t = u_t.to(compute)
        y, new_state = causal_conv1d_step(state, u_t, self.kernel.taps().to(compute).flip(-1))
        return y + D.to(compute) * u_t, new_state


class S4DKernel(nn.Module):
    """Parameters of the diagonal SSM (S4D, public names and shapes): ``log_dt`` (H,), ``B`` (H, M, 2),
    ``inv_A_real`` (H, M), ``A_imag`` (H, M), ``C`` (1, H, M, 2); M = N/2 complex modes.

    Init S4D-Lin: ``A_n = -1/2 + i pi n``, ``B = 1``, ``C ~ CN(0, 1)``, ``log_dt ~ U(log dt_min, log dt_max)``.
    """

    def __init__(
        self, channels: int, d_state: int, discretization: str = "bilinear", dt_min: float = 0.001, dt_max: float = 0.1
    ) -> None:
        super().__init__()
        modes = d_state // 2
        self.discretization = discretization
        self.log_dt = nn.Parameter(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(channels, modes, dtype=torch.cfloat)).contiguous())
        self.inv_A_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(channels, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1, channels, modes, dtype=torch.cfloat)).contiguous())

    def discretize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)``, each (H, M, 2) in ``dtype``: ``a = dA`` and ``c = 2 C dB`` (module docstring)."""
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        real = torch.float64 if dtype == torch.float64 else torch.float32
        dt = torch.exp(self.log_dt.to(real))[:, None]
        A = torch.complex(-torch.exp(self.inv_A_real.to(real)), self.A_imag.to(real))
        B = torch.view_as_complex(self.B.to(real).contiguous())
        C = torch.view_as_complex(self.C[0].to(real).contiguous())
        dtA = dt * A
        if self.discretization == "bilinear":
            a = (1 + dtA / 2) / (1 - dtA / 2)
            dB = B * dt / (1 - dtA / 2)
        elif self.discretization == "zoh":
            a = torch.exp(dtA)
            dB = B * torch.expm1(dtA) / A
        else:
            raise ValueError(f"S4DKernel: unknown discretization {self.discretization!r}; expected {DISCRETIZATIONS}")
        c = 2 * C * dB
        return torch.view_as_real(a.to(complex_dtype)).to(dtype), torch.view_as_real(c.to(complex_dtype)).to(dtype)

    def extra_repr(self) -> str:
        return f"channels={self.log_dt.shape[0]}, modes={self.A_imag.shape[1]}, discretization={self.discretization!r}"


class DiagonalSSM(nn.Module):
    """H3's diagonal SSM ``y = SSM_diag(u) + D u``: (B, H, L) -> (B, H, L), linear in ``u``.

    ``path="fft"``: ``y = K * u + D u`` with the kernel of :meth:`S4DKernel.discretize` by FFT;
    ``"recurrent"``: :func:`ssm_models.ops.diagonal_scan` with backend ``scan_backend``. A call that
    asks for the last state (or passes one) always uses the scan. Output in the compute dtype."""

    def __init__(
        self, channels: int, d_state: int, discretization: str = "bilinear", dt_min: float = 0.001, dt_max: float = 0.1
    ) -> None:
        super().__init__()
        self.kernel = S4DKernel(channels, d_state, discretization, dt_min, dt_max)
        self.path = "recurrent"
        self.scan_backend = "auto"

    def forward(
        self,
        u: torch.Tensor,
        D: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        return_last_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        compute = scan_compute_dtype(u.dtype)
        u = u.to(compute)
        a, c = self.kernel.discretize(compute)
        if self.path == "fft" and initial_state is None and not return_last_state:
            return fft_causal_conv(u, diagonal_ssm_kernel(a, c, u.shape[-1]), D.to(compute))
        return diagonal_scan(u, a, c, D.to(compute), initial_state=initial_state,
                             return_last_state=return_last_state, backend=self.scan_backend)

    def step(self, state: torch.Tensor, u_t: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``state`` (B, H, M, 2), ``u_t`` (B, H) -> ``(y_t (B, H), new_state)``."""
        compute = state.dtype
        a, c = self.kernel.discretize(compute)
        return diagonal_scan_step(state, u_t.to(compute), a, c, D.to(compute))


# ---------------------------------------------------------------------------------- mixers
class H3Mixer(nn.Module):
    """One H3 layer: (B, L, d_model) -> (B, L, d_model) (module docstring)."""

    def __init__(self, config: H3Config) -> None:
        super().__init__()
        d_model, n_state = config.d_model, config.d_state
        self.d_model, self.head_dim, self.n_heads, self.d_state = d_model, config.head_dim, config.n_ssm_heads, n_state
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.ssm_k_kernel = ShiftSSM(d_model, n_state)
        self.ssm_k_D = nn.Parameter(torch.randn(d_model))
        self.kernel = DiagonalSSM(self.n_heads, n_state, config.discretization, config.dt_min, config.dt_max)
        self.D = nn.Parameter(torch.randn(self.n_heads))
        self.kv_product = GatingProduct()
        self.q_product = GatingProduct()
        self.output_linear = nn.Linear(d_model, d_model)

    def _outer(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``kv[b, i, j, h, ...] = k[b, h*hd + i, ...] * v[b, h*hd + j, ...]`` for k, v (B, d_model, ...)."""
        batch, rest = k.shape[0], k.shape[2:]
        k = k.reshape(batch, self.n_heads, self.head_dim, *rest).transpose(1, 2)  # (B, hd, H, ...)
        v = v.reshape(batch, self.n_heads, self.head_dim, *rest).transpose(1, 2)
        return self.kv_product(k[:, :, None], v[:, None, :])  # (B, hd, hd, H, ...)

    def _contract_q(self, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``o[b, j*H + h] = sum_i q[b, h*hd + i] y[b, i, j, h]``: y (B, hd, hd, H, ...), q (B, d_model, ...)."""
        batch, rest = q.shape[0], q.shape[2:]
        q = q.reshape(batch, self.n_heads, self.head_dim, *rest).transpose(1, 2)[:, :, None]  # (B, hd, 1, H, ...)
        return self.q_product(y, q.to(y.dtype)).sum(1).reshape(batch, self.d_model, *rest)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: H3Cache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (B, L, d_model) -> (B, L, d_model). ``padding_mask`` (B, L) bool, True for real
        tokens: k and kv are zeroed at padded positions, so the SSMs see what an unpadded sequence
        gives. With ``cache``, this layer's final shift register and SSM state are stored."""
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).transpose(1, 2)  # (B, d_model, L)
        k = self.k_proj(hidden).transpose(1, 2)
        v = self.v_proj(hidden).transpose(1, 2)
        compute = scan_compute_dtype(hidden.dtype)
        k = k.to(compute)
        mask = None if padding_mask is None else padding_mask[:, None, :].to(compute)
        if mask is not None:
            k = k * mask
        if cache is not None:
            cache.shift_states[layer_idx] = F.pad(k, (max(self.d_state - length, 0), 0))[:, :, -self.d_state:].detach()
        k = self.ssm_k_kernel(k, self.ssm_k_D)
        kv = self._outer(k, v.to(compute))  # (B, hd, hd, H, L)
        if mask is not None:
            kv = kv * mask[:, :, None, None]
        flat = kv.reshape(batch * self.head_dim**2, self.n_heads, length)
        if cache is not None:
            y, state = self.kernel(flat, self.D, return_last_state=True)
            cache.ssm_states[layer_idx] = state.detach()
        else:
            y = self.kernel(flat, self.D)
        y = y.reshape(batch, self.head_dim, self.head_dim, self.n_heads, length)
        out = self._contract_q(y, q)  # (B, d_model, L)
        return self.output_linear(out.transpose(1, 2).to(self.output_linear.weight.dtype))

    @torch.no_grad()
    def attention_factors(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of this layer's hidden attention (``mamba_lrp.hidden_attention``), without
        gradient: ``q`` and ``k~ = m * (SSM_shift(m * k) + ssm_k_D * m * k)``, each (B, d_model, L) in the
        compute dtype, ``m`` the padding mask (1 without one). Unrolled, the forward is, per head ``h``
        and value channel ``j`` (``<., .>_h`` the sum over the head's ``head_dim`` channels)::

            o_{j*H+h, t} = sum_{s <= t} K_h(t - s) <q_t, k~_s>_h v_{h*hd+j, s} + D_h <q_t, k~_t>_h v_{h*hd+j, t}

        with ``K_h`` the diagonal SSM's kernel. Same ops as :meth:`forward`."""
        compute = scan_compute_dtype(hidden.dtype)
        q = self.q_proj(hidden).transpose(1, 2).to(compute)
        k = self.k_proj(hidden).transpose(1, 2).to(compute)
        mask = None if padding_mask is None else padding_mask[:, None, :].to(compute)
        if mask is not None:
            k = k * mask
        k = self.ssm_k_kernel(k, self.ssm_k_D)
        return q, k if mask is None else k * mask

    def step(self, hidden: torch.Tensor, cache: H3Cache, layer_idx: int) -> torch.Tensor:
        """One decoding step: ``hidden`` (B, d_model) -> (B, d_model), updating ``cache`` in place."""
        batch = hidden.shape[0]
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        k, cache.shift_states[layer_idx] = self.ssm_k_kernel.step(cache.shift_states[layer_idx], k, self.ssm_k_D)
        kv = self._outer(k, v.to(k.dtype))  # (B, hd, hd, H)
        y, cache.ssm_states[layer_idx] = self.kernel.step(
            cache.ssm_states[layer_idx], kv.reshape(batch * self.head_dim**2, self.n_heads), self.D
        )
        out = self._contract_q(y.reshape(batch, self.head_dim, self.head_dim, self.n_heads), q)
        return self.output_linear(out.to(self.output_linear.weight.dtype))


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX, non-interleaved) of the first ``rotary_dim`` dims of ``x``
    (B, n_head, T, d) at ``positions`` (B, T): pairs ``(x_i, x_{i + r/2})`` rotate by angle
    ``position * base^(-2i/r)``. Linear in ``x``."""
    if rotary_dim == 0:
        return x
    compute = torch.promote_types(x.dtype, torch.float32)
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=x.device, dtype=compute) / rotary_dim)
    angle = positions.to(compute)[:, None, :, None] * inv_freq  # (B, 1, T, r/2)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class H3Attention(nn.Module):
    """Causal multi-head attention with flash-attn ``MHA``'s parameters: ``Wqkv`` (3 d_model, d_model)
    with rows (q|k|v, head, dim) and ``out_proj``, both with bias; softmax scale 1/sqrt(head size)."""

    def __init__(self, config: H3Config) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.d_model // config.n_head
        self.rotary_dim = config.rotary_emb_dim
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.attention = Attention()
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_model) -> q, k, v each (B, n_head, T, head size)."""
        batch, length, _ = hidden.shape
        qkv = self.Wqkv(hidden).reshape(batch, length, 3, self.n_head, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _masked_qkv(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v, mask, positions, key_mask)`` of the forward on ``hidden`` (B, L, d_model): q, k
        (rotated) and v (B, n_head, L, head size); ``mask`` bool (1 or B, 1, L, L), causal, padded keys
        masked, a padded query attending to itself only; rotary ``positions`` (B, L); ``key_mask`` (B, L)."""
        batch, length, _ = hidden.shape
        q, k, v = self._qkv(hidden)
        device = hidden.device
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if padding_mask is None:
            positions = torch.arange(length, device=device).expand(batch, length)
            mask = causal[None, None]
            key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
            eye = torch.eye(length, dtype=torch.bool, device=device)
            mask = ((causal & padding_mask[:, None, :]) | eye)[:, None]  # padded queries see themselves only
            key_mask = padding_mask
        q, k = rotate(q, positions, self.rotary_dim), rotate(k, positions, self.rotary_dim)
        return q, k, v, mask, positions, key_mask

    @torch.no_grad()
    def attention_probabilities(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities (B, n_head, L, L) of :meth:`forward` on ``hidden`` (B, L, d_model),
        without gradient: row ``t`` over keys ``s``, exactly 0 where masked (the same mask)."""
        q, k, _, mask, _, _ = self._masked_qkv(hidden, padding_mask)
        return self.attention.probabilities(q, k, mask)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: H3Cache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q, k, v, mask, positions, key_mask = self._masked_qkv(hidden, padding_mask)
        if cache is not None:
            cache.keys[layer_idx], cache.values[layer_idx] = k.detach(), v.detach()
            cache.key_masks[layer_idx] = key_mask.clone()
            cache.positions[layer_idx] = positions[:, -1] + 1
        out = self.attention(q, k, v, mask)  # (B, n_head, L, head size)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def step(self, hidden: torch.Tensor, cache: H3Cache, layer_idx: int) -> torch.Tensor:
        """One decoding step with the KV cache: ``hidden`` (B, d_model) -> (B, d_model)."""
        batch = hidden.shape[0]
        q, k, v = self._qkv(hidden[:, None])
        positions = cache.positions[layer_idx][:, None]
        q, k = rotate(q, positions, self.rotary_dim), rotate(k, positions, self.rotary_dim)
        keys = torch.cat([cache.keys[layer_idx], k], dim=2)
        values = torch.cat([cache.values[layer_idx], v], dim=2)
        real = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
        key_mask = torch.cat([cache.key_masks[layer_idx], real], dim=1)
        cache.keys[layer_idx], cache.values[layer_idx], cache.key_masks[layer_idx] = keys, values, key_mask
        cache.positions[layer_idx] = cache.positions[layer_idx] + 1
        out = self.attention(q, keys, values, key_mask[:, None, None, :])  # (B, n_head, 1, head size)
        return self.out_proj(out.reshape(batch, -1))


# ---------------------------------------------------------------------------------- blocks
class H3MLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``: (..., d_model) -> (..., d_model), width ``d_inner``."""

    def __init__(self, d_model: int, d_inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(d_inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class H3Block(nn.Module):
    """Pre-norm block: ``x = x + mixer(norm1(x)); x = x + mlp(norm2(x))`` (mixer: H3 or attention)."""

    def __init__(self, config: H3Config, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mixer = H3Attention(config) if layer_idx in config.attn_layer_idx else H3Mixer(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = H3MLP(config.d_model, config.mlp_width)

    def _residual(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(torch.promote_types(hidden.dtype, torch.float32)) if self.residual_in_fp32 else hidden

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm2(hidden.to(self.norm2.weight.dtype)))

    def forward(
        self,
        hidden: torch.Tensor,
        cache: H3Cache | None = None,
        layer_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.norm1(hidden.to(self.norm1.weight.dtype))
        return self._mlp(self._residual(hidden) + self.mixer(normed, cache, layer_idx, padding_mask))

    def step(self, hidden: torch.Tensor, cache: H3Cache, layer_idx: int) -> torch.Tensor:
        normed = self.norm1(hidden.to(self.norm1.weight.dtype))
        return self._mlp(self._residual(hidden) + self.mixer.step(normed, cache, layer_idx))


class H3Embeddings(nn.Module):
    """Word embeddings only (no positions): ``word_embeddings`` (padded vocab, d_model)."""

    def __init__(self, vocab: int, d_model: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class H3Backbone(nn.Module):
    """``embeddings``, ``n_layer`` blocks and the final LayerNorm ``ln_f``."""

    def __init__(self, config: H3Config) -> None:
        super().__init__()
        self.embeddings = H3Embeddings(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([H3Block(config, index) for index in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)


class H3LM(SequenceLM):
    """H3 language model: ``forward(input_ids) -> logits (B, L, padded_vocab_size)``; checks, block
    loop, head, padding, ``generate`` and saving are :class:`SequenceLM`'s. The SSM path is chosen
    with :meth:`set_backend` (default ``"recurrent"``)."""

    def __init__(self, config: H3Config) -> None:
        super().__init__()
        self.config = config
        self.backbone = H3Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 style, as the public code: Linear and Embedding weights N(0, initializer_range),
        biases 0; ``out_proj`` and ``fc2`` weights N(0, initializer_range / sqrt(2 n_layer)). (The
        public rescaling matches parameter names ``out_proj.weight``/``fc2.weight`` only, so the H3
        layer's ``output_linear`` keeps std ``initializer_range``, as here.) Choose
        ``initializer_range`` for the width (:class:`H3Config`)."""
        config = self.config
        std = config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                scaled = config.rescale_prenorm_residual and name.endswith(("out_proj", "fc2"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * config.n_layer) if scaled else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def embedding(self) -> nn.Embedding:
        return self.backbone.embeddings.word_embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.ln_f

    # -------------------------------------------------------------- decoding
    def new_cache(self, batch_size: int) -> H3Cache:
        """An empty cache (filled by ``forward(..., cache=)``); ``batch_size`` is implied by the prompt."""
        n_layer = self.config.n_layer
        return H3Cache(*([None] * n_layer for _ in range(6)))

    def step(self, token_ids: torch.Tensor, cache: H3Cache) -> torch.Tensor:
        """Logits (B, V) for the next token ``token_ids`` (B,), advancing ``cache`` by one step."""
        hidden = self.embedding(token_ids)
        for index, block in enumerate(self.blocks):
            hidden = block.step(hidden, cache, index)
        return self.head(self.final_norm(hidden))

    # ------------------------------------------------------------- backends
    def set_backend(self, ssm: str | None = None, scan: str | None = None) -> H3LM:
        """Choose the SSM path of every H3 layer, ``"recurrent"`` (default) or ``"fft"``, and the
        diagonal-scan backend (``auto``/``reference``/``cpu``/``triton``) used by the recurrent path
        and by cache-filling forwards. Returns self."""
        if ssm is not None and ssm not in SSM_PATHS:
            raise ValueError(f"`ssm` must be one of {SSM_PATHS}, got {ssm!r}")
        if scan is not None and scan not in DIAGONAL_SCAN_BACKENDS:
            raise ValueError(f"`scan` must be one of {DIAGONAL_SCAN_BACKENDS}, got {scan!r}")
        for module in self.modules():
            if isinstance(module, ShiftSSM | DiagonalSSM) and ssm is not None:
                module.path = ssm
            if isinstance(module, DiagonalSSM) and scan is not None:
                module.scan_backend = scan
        return self


# ------------------------------------------------------------------------------ checkpoints
_OLD_NAMES = ((r"^s4seq\.encoder\.", "backbone."), (r"^embedding\.", "backbone.embeddings.word_embeddings."),
              (r"^backbone\.norm\.", "backbone.ln_f."))


def rename_h3_key(key: str) -> str:
    """Map the older public key names to the current ones (idempotent on current names)."""
    for pattern, replacement in _OLD_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def prepare_h3_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A public H3 state dict in our (= the current public) key naming.

    Lightning's ``model.`` prefix is removed (other entries of the module are dropped), old names are
    renamed (:func:`rename_h3_key`), rotary ``inv_freq`` buffers are dropped, and the older post-norm
    ordering (``backbone.ln_0``; each block's LayerNorms one slot later) is converted as the public
    ``SSMLMHeadModel.load_state_dict`` does."""
    if any(key.startswith("model.") for key in state):
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    state = {rename_h3_key(key): value for key, value in state.items() if not key.endswith("rotary_emb.inv_freq")}
    if "backbone.ln_0.weight" in state:
        n_layer = 1 + max(int(match.group(1)) for key in state
                          if (match := re.match(r"backbone\.layers\.(\d+)\.", key)))
        layer = "backbone.layers.{}.norm{}".format
        sources = {"backbone.ln_f": layer(n_layer - 1, 2)}  # target norm -> the old norm holding its weights
        for index in range(n_layer):
            sources[layer(index, 2)] = layer(index, 1)
            sources[layer(index, 1)] = layer(index - 1, 2) if index > 0 else "backbone.ln_0"
        old = set(sources.values())
        moved = {key: value for key, value in state.items() if key.rsplit(".", 1)[0] not in old}
        for target, source in sources.items():
            for suffix in ("weight", "bias"):
                moved[f"{target}.{suffix}"] = state[f"{source}.{suffix}"]
        state = moved
    return state


def load_h3_checkpoint(path: str | Path, config: H3Config) -> H3LM:
    """An :class:`H3LM` with ``config`` from a public H3 weight file (``model.pt``, a Lightning
    ``.ckpt``, ``.bin`` or ``.safetensors``) or a directory holding one; any of the key namings of
    :func:`prepare_h3_state_dict`. Raises ``ValueError`` when keys or shapes do not match ``config``."""
    if not isinstance(config, H3Config):
        raise ValueError(f"`config` must be an H3Config, got {type(config).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    state = prepare_h3_state_dict(read_state_dict(path))
    with torch.device("meta"):
        model = H3LM(config)
    load_state_dict_into(model, state, source=str(path), assign=True, rename=rename_h3_key)
    return model


register_architecture(
    Architecture(
        name="h3",
        config_from_dict=H3Config.from_dict,
        build=H3LM,
        rename_key=rename_h3_key,
        prepare_state_dict=prepare_h3_state_dict,
    )
)
