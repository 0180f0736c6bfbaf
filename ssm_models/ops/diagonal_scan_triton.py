"""Triton backend of the diagonal LTI scan (H3's diagonal SSM): forward and backward kernels.

Semantics are those of :func:`ssm_models.ops.diagonal_scan.diagonal_scan_reference`, per batch row ``b``,
channel ``h`` and complex mode ``m`` (complex numbers held as (re, im) pairs of real tensors)::

    s_t  = a_m s_{t-1} + u_t,        s_{-1} = initial_state
    y_t  = sum_m Re(c_m s_t) + D u_t

and the backward is the adjoint recurrence, with ``g_{L-1}`` seeded by the gradient of the last state::

    g_t  = conj(c_m) dy_t + conj(a_m) g_{t+1}
    du_t = sum_m Re g_t + D dy_t,    da_m = sum_{b,t} g_t conj(s_{t-1}),    dc_m = sum_{b,t} dy_t conj(s_t)
    d initial_state = conj(a_m) g_0, dD = sum_{b,t} dy_t u_t (a torch sum)

Design (that of :mod:`ssm_models.ops.selective_scan_triton`, with complex multipliers that do not
depend on time):

* **Grid** over (batch row, block of ``BLOCK_H`` channels). A program holds all M modes (padded to a
  power of two; padded modes have ``a = c = 0``) and walks the sequence in **chunks of T steps**.
* **Inside a chunk the recurrence is an associative scan** over the time axis of (BLOCK_H, BLOCK_M, T)
  register tiles, on the complex affine maps ``s -> a s + x`` composed as
  ``(a1, x1), (a2, x2) -> (a1 a2, a2 x1 + x2)``, written on four real tensors (re/im of ``a`` and ``x``).
  The carried state enters as ``s_t = P_t s_carry + S_t``. Steps past ``L`` are the identity map
  (``a = 1``, ``x = 0``), so the last column of the last chunk is the last state.
* **Checkpoints.** When ``dA`` or ``dC`` will be needed, the forward stores the state before each chunk,
  (batch, H, n_chunks, M, 2) in the compute dtype: O(L / T) per channel, never the (batch, H, M, L) states.
* **Backward** walks the chunks in reverse with a *reverse* associative scan of ``g`` (coefficient
  ``conj(a)``, the identity past ``L - 1`` so that ``d last_state`` seeds ``g_{L-1}``), seeded by the
  carry ``g`` at the next chunk's first step. ``du`` and ``d initial_state`` need nothing else: the ``u``-only
  backward (the LRP case) reads ``dy`` and writes ``du``, one reverse pass without states. For ``dA``/``dC``
  the states ``s_{t-1}`` of the chunk are recomputed in registers from its checkpoint by a forward scan of
  the inputs shifted by one step (the checkpoint enters as the first input), and ``s_t = a s_{t-1} + u_t``.
* **Reductions** of ``dA``/``dC`` over time stay in registers; over the batch they are per-row partials
  (batch, H, M, 2) summed in torch (deterministic, no atomics).

Status: correct against the reference under Triton's interpreter (float64, float32, bfloat16 inputs)
and compiled for sm_90 offline, but not yet run or timed on a GPU. :data:`DEFAULT_CONFIG` was chosen
from the register use of those compiles (float32, M = 32, 4 warps): with BLOCK_H = 1, T = 32 the forward
uses 96 registers, the ``du``-only backward 119 and the full backward 182, none spilling; BLOCK_H = 2
already spills in the forward (168 registers + stack), T = 64 in the full backward.
``benchmarks/bench_diagonal_scan_triton.py --sweep`` times alternatives.

Triton is imported lazily; the kernels run on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ssm_models.ops.selective_scan import scan_compute_dtype
from ssm_models.ops.selective_scan_triton import _cdiv, _interpreter_enabled, _next_pow2, _on_device

__all__ = ["DEFAULT_CONFIG", "DiagonalScanTritonConfig", "diagonal_scan_triton"]


@dataclass(frozen=True)
class DiagonalScanTritonConfig:
    """Tile sizes of the triton diagonal scan (all powers of two).

    ``chunk_len`` (T) is the time tile of the in-register scan and the checkpoint interval;
    ``fwd_block_h`` / ``bwd_block_h`` the channels of one program.
    """

    chunk_len: int = 32
    fwd_block_h: int = 1
    fwd_num_warps: int = 4
    bwd_block_h: int = 1
    bwd_num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk_len", "fwd_block_h", "fwd_num_warps", "bwd_block_h", "bwd_num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"DiagonalScanTritonConfig: `{name}` must be a power of two >= 1, got {value!r}")


DEFAULT_CONFIG = DiagonalScanTritonConfig()


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """Build the jitted kernels (cached per interpreter mode: ``triton.jit`` decides at decoration)."""
    del interpret  # only the cache key
    import triton
    import triton.language as tl

    @triton.jit
    def _ccombine(a1r, a1i, x1r, x1i, a2r, a2i, x2r, x2i):
        # (s -> a2 s + x2) after (s -> a1 s + x1) = (s -> a1 a2 s + a2 x1 + x2), complex
        return (
            a1r * a2r - a1i * a2i,
            a1r * a2i + a1i * a2r,
            a2r * x1r - a2i * x1i + x2r,
            a2r * x1i + a2i * x1r + x2i,
        )

    @triton.jit
    def _fwd_kernel(
        u_ptr, A_ptr, C_ptr, D_ptr, init_ptr, y_ptr, last_ptr, ckpt_ptr,
        L, H, M, n_hblocks, n_chunks, su_b, su_h, su_l,
        HAS_D: tl.constexpr, HAS_INIT: tl.constexpr, SAVE_CKPT: tl.constexpr, CDT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, T: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b64 = (pid // n_hblocks).to(tl.int64)
        h = (pid % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = h < H
        h64 = h.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        mask_hm = mask_h[:, None] & (offs_m < M)[None, :]
        offs_t = tl.arange(0, T)
        par = (h64[:, None] * M + offs_m[None, :]) * 2  # into (H, M, 2)
        ar = tl.load(A_ptr + par, mask=mask_hm, other=0.0)[:, :, None]
        ai = tl.load(A_ptr + par + 1, mask=mask_hm, other=0.0)[:, :, None]
        cr = tl.load(C_ptr + par, mask=mask_hm, other=0.0)[:, :, None]
        ci = tl.load(C_ptr + par + 1, mask=mask_hm, other=0.0)[:, :, None]
        if HAS_D:
            Dv = tl.load(D_ptr + h64, mask=mask_h, other=0.0)
        row = b64 * H + h64  # (batch, H) row index
        st = (row[:, None] * M + offs_m[None, :]) * 2  # into (batch, H, M, 2)
        if HAS_INIT:
            sr = tl.load(init_ptr + st, mask=mask_hm, other=0.0)
            si = tl.load(init_ptr + st + 1, mask=mask_hm, other=0.0)
        else:
            sr = tl.zeros((BLOCK_H, BLOCK_M), CDT)
            si = tl.zeros((BLOCK_H, BLOCK_M), CDT)
        u_row = u_ptr + b64 * su_b + h64 * su_h
        y_row = y_ptr + row * L
        zero3 = tl.zeros((BLOCK_H, BLOCK_M, T), CDT)
        for k in range(n_chunks):
            if SAVE_CKPT:
                ck = ((row[:, None] * n_chunks + k) * M + offs_m[None, :]) * 2
                tl.store(ckpt_ptr + ck, sr, mask=mask_hm)
                tl.store(ckpt_ptr + ck + 1, si, mask=mask_hm)
            t = k * T + offs_t
            mask_t = t < L
            m2 = mask_h[:, None] & mask_t[None, :]
            uu = tl.load(u_row[:, None] + t[None, :] * su_l, mask=m2, other=0.0).to(CDT)
            live = mask_t[None, None, :]
            a_r = tl.where(live, ar + zero3, 1.0)  # identity map past L
            a_i = tl.where(live, ai + zero3, 0.0)
            P_r, P_i, S_r, S_i = tl.associative_scan(
                (a_r, a_i, uu[:, None, :] + zero3, zero3), axis=2, combine_fn=_ccombine
            )
            hr = S_r + P_r * sr[:, :, None] - P_i * si[:, :, None]
            hi = S_i + P_r * si[:, :, None] + P_i * sr[:, :, None]
            y = tl.sum(cr * hr - ci * hi, axis=1)
            if HAS_D:
                y = y + Dv[:, None] * uu
            tl.store(y_row[:, None] + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
            last_col = (offs_t == T - 1)[None, None, :]
            sr = tl.sum(tl.where(last_col, hr, 0.0), axis=2)
            si = tl.sum(tl.where(last_col, hi, 0.0), axis=2)
        tl.store(last_ptr + st, sr, mask=mask_hm)
        tl.store(last_ptr + st + 1, si, mask=mask_hm)

    @triton.jit
    def _bwd_kernel(
        u_ptr, A_ptr, C_ptr, D_ptr, dy_ptr, dlast_ptr, ckpt_ptr, du_ptr, dA_ptr, dC_ptr, dinit_ptr,
        L, H, M, n_hblocks, n_chunks, su_b, su_h, su_l, sy_b, sy_h, sy_l,
        HAS_D: tl.constexpr, HAS_DLAST: tl.constexpr, NEED_DU: tl.constexpr, NEED_DA: tl.constexpr,
        NEED_DC: tl.constexpr, NEED_DINIT: tl.constexpr, CDT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, T: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b64 = (pid // n_hblocks).to(tl.int64)
        h = (pid % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = h < H
        h64 = h.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        mask_hm = mask_h[:, None] & (offs_m < M)[None, :]
        offs_t = tl.arange(0, T)
        par = (h64[:, None] * M + offs_m[None, :]) * 2
        ar = tl.load(A_ptr + par, mask=mask_hm, other=0.0)[:, :, None]
        ai = tl.load(A_ptr + par + 1, mask=mask_hm, other=0.0)[:, :, None]
        cr = tl.load(C_ptr + par, mask=mask_hm, other=0.0)[:, :, None]
        ci = tl.load(C_ptr + par + 1, mask=mask_hm, other=0.0)[:, :, None]
        if HAS_D:
            Dv = tl.load(D_ptr + h64, mask=mask_h, other=0.0)
        row = b64 * H + h64
        st = (row[:, None] * M + offs_m[None, :]) * 2
        if HAS_DLAST:
            gcr = tl.load(dlast_ptr + st, mask=mask_hm, other=0.0)
            gci = tl.load(dlast_ptr + st + 1, mask=mask_hm, other=0.0)
        else:
            gcr = tl.zeros((BLOCK_H, BLOCK_M), CDT)
            gci = tl.zeros((BLOCK_H, BLOCK_M), CDT)
        zero3 = tl.zeros((BLOCK_H, BLOCK_M, T), CDT)
        if NEED_DA:
            da_r = tl.zeros((BLOCK_H, BLOCK_M), CDT)
            da_i = tl.zeros((BLOCK_H, BLOCK_M), CDT)
        if NEED_DC:
            dc_r = tl.zeros((BLOCK_H, BLOCK_M), CDT)
            dc_i = tl.zeros((BLOCK_H, BLOCK_M), CDT)
        u_row = u_ptr + b64 * su_b + h64 * su_h
        dy_row = dy_ptr + b64 * sy_b + h64 * sy_h
        du_row = du_ptr + row * L
        first_col = (offs_t == 0)[None, None, :]
        for kk in range(n_chunks):
            k = n_chunks - 1 - kk
            t = k * T + offs_t
            mask_t = t < L
            m2 = mask_h[:, None] & mask_t[None, :]
            dyv = tl.load(dy_row[:, None] + t[None, :] * sy_l, mask=m2, other=0.0).to(CDT)
            dy3 = dyv[:, None, :]
            # g_t = conj(c) dy_t + alpha_t g_{t+1}, alpha_t = conj(a) (1 from L - 1 on: d last_state seeds g_{L-1})
            nxt = ((t + 1) < L)[None, None, :]
            al_r = tl.where(nxt, ar + zero3, 1.0)
            al_i = tl.where(nxt, zero3 - ai, 0.0)
            P_r, P_i, S_r, S_i = tl.associative_scan(
                (al_r, al_i, cr * dy3, zero3 - ci * dy3), axis=2, combine_fn=_ccombine, reverse=True
            )
            gr = S_r + P_r * gcr[:, :, None] - P_i * gci[:, :, None]
            gi = S_i + P_r * gci[:, :, None] + P_i * gcr[:, :, None]
            gcr = tl.sum(tl.where(first_col, gr, 0.0), axis=2)
            gci = tl.sum(tl.where(first_col, gi, 0.0), axis=2)
            if NEED_DU:
                du = tl.sum(gr, axis=1)
                if HAS_D:
                    du = du + Dv[:, None] * dyv
                tl.store(du_row[:, None] + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
            if NEED_DA or NEED_DC:
                # s_{t-1} over the chunk: the forward scan of (a, x) with x = checkpoint, u_{t0}, ..., u_{t0+T-2}
                ck = ((row[:, None] * n_chunks + k) * M + offs_m[None, :]) * 2
                ck_r = tl.load(ckpt_ptr + ck, mask=mask_hm, other=0.0)
                ck_i = tl.load(ckpt_ptr + ck + 1, mask=mask_hm, other=0.0)
                prev_mask = m2 & (offs_t > 0)[None, :]
                u_prev = tl.load(u_row[:, None] + (t[None, :] - 1) * su_l, mask=prev_mask, other=0.0).to(CDT)
                x_r = tl.where(first_col, ck_r[:, :, None] + zero3, u_prev[:, None, :] + zero3)
                x_i = tl.where(first_col, ck_i[:, :, None] + zero3, 0.0)
                _, _, p_r, p_i = tl.associative_scan((ar + zero3, ai + zero3, x_r, x_i), axis=2, combine_fn=_ccombine)
                live = mask_t[None, None, :]
                if NEED_DA:
                    da_r += tl.sum(tl.where(live, gr * p_r + gi * p_i, 0.0), axis=2)
                    da_i += tl.sum(tl.where(live, gi * p_r - gr * p_i, 0.0), axis=2)
                if NEED_DC:
                    uu = tl.load(u_row[:, None] + t[None, :] * su_l, mask=m2, other=0.0).to(CDT)
                    s_r = ar * p_r - ai * p_i + uu[:, None, :]
                    s_i = ar * p_i + ai * p_r
                    dc_r += tl.sum(dy3 * s_r, axis=2)  # dy = 0 past L
                    dc_i -= tl.sum(dy3 * s_i, axis=2)
        if NEED_DINIT:  # conj(a) g_0
            ar2 = tl.sum(ar, axis=2)
            ai2 = tl.sum(ai, axis=2)
            tl.store(dinit_ptr + st, ar2 * gcr + ai2 * gci, mask=mask_hm)
            tl.store(dinit_ptr + st + 1, ar2 * gci - ai2 * gcr, mask=mask_hm)
        if NEED_DA:
            tl.store(dA_ptr + st, da_r, mask=mask_hm)
            tl.store(dA_ptr + st + 1, da_i, mask=mask_hm)
        if NEED_DC:
            tl.store(dC_ptr + st, dc_r, mask=mask_hm)
            tl.store(dC_ptr + st + 1, dc_i, mask=mask_hm)

    # Triton resolves the names a kernel uses in the module's globals, not in this closure.
    globals().update(tl=tl, _ccombine=_ccombine)
    cdt = {torch.float32: tl.float32, torch.float64: tl.float64}
    return _fwd_kernel, _bwd_kernel, cdt


def _pairs(t: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(compute).contiguous()


def _forward(u, A, C, D, initial_state, save_ckpt, cfg):
    """Launch the forward kernel. Returns ``(y, last_state, checkpoints or None)``."""
    fwd_kernel, _, cdt = _kernels(_interpreter_enabled())
    batch, channels, length = u.shape
    modes = A.shape[1]
    compute = scan_compute_dtype(u.dtype)
    T = cfg.chunk_len
    n_chunks = _cdiv(length, T)
    block_h = min(cfg.fwd_block_h, _next_pow2(channels))
    n_hblocks = _cdiv(channels, block_h)
    dev = u.device
    y = torch.empty((batch, channels, length), dtype=u.dtype, device=dev)
    last = torch.empty((batch, channels, modes, 2), dtype=compute, device=dev)
    ckpt = torch.empty((batch, channels, n_chunks, modes, 2), dtype=compute, device=dev) if save_ckpt else None
    A_c, C_c = _pairs(A, compute), _pairs(C, compute)
    D_c, init_c = _pairs(D, compute), _pairs(initial_state, compute)
    with _on_device(dev):
        fwd_kernel[(batch * n_hblocks,)](
            u, A_c, C_c, D_c if D_c is not None else A_c, init_c if init_c is not None else last,
            y, last, ckpt if ckpt is not None else last,
            length, channels, modes, n_hblocks, n_chunks, *u.stride(),
            HAS_D=D is not None, HAS_INIT=initial_state is not None, SAVE_CKPT=save_ckpt, CDT=cdt[compute],
            BLOCK_H=block_h, BLOCK_M=_next_pow2(modes), T=T, num_warps=cfg.fwd_num_warps,
        )  # fmt: skip
    return y, last, ckpt


def _backward(dy, dlast, u, A, C, D, ckpt, needs, cfg):
    """Launch the backward kernel for ``needs`` = (du, dA, dC, d initial_state); returns those four."""
    _, bwd_kernel, cdt = _kernels(_interpreter_enabled())
    need_du, need_dA, need_dC, need_dinit = needs
    if (need_dA or need_dC) and ckpt is None:
        raise RuntimeError("diagonal_scan_triton: internal error, the forward saved no state checkpoints")
    batch, channels, length = u.shape
    modes = A.shape[1]
    compute = scan_compute_dtype(u.dtype)
    T = cfg.chunk_len
    n_chunks = _cdiv(length, T)
    block_h = min(cfg.bwd_block_h, _next_pow2(channels))
    n_hblocks = _cdiv(channels, block_h)
    dev = u.device
    A_c, C_c, D_c = _pairs(A, compute), _pairs(C, compute), _pairs(D, compute)
    dlast_c = _pairs(dlast, compute)
    pair_shape = (batch, channels, modes, 2)
    du = torch.empty((batch, channels, length), dtype=u.dtype, device=dev) if need_du else None
    dA_part = torch.empty(pair_shape, dtype=compute, device=dev) if need_dA else None
    dC_part = torch.empty(pair_shape, dtype=compute, device=dev) if need_dC else None
    dinit = torch.empty(pair_shape, dtype=compute, device=dev) if need_dinit else None

    def _or(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else A_c

    with _on_device(dev):
        bwd_kernel[(batch * n_hblocks,)](
            u, A_c, C_c, _or(D_c), dy, _or(dlast_c), _or(ckpt), _or(du), _or(dA_part), _or(dC_part), _or(dinit),
            length, channels, modes, n_hblocks, n_chunks, *u.stride(), *dy.stride(),
            HAS_D=D is not None, HAS_DLAST=dlast is not None, NEED_DU=need_du, NEED_DA=need_dA, NEED_DC=need_dC,
            NEED_DINIT=need_dinit, CDT=cdt[compute], BLOCK_H=block_h, BLOCK_M=_next_pow2(modes), T=T,
            num_warps=cfg.bwd_num_warps,
        )  # fmt: skip
    dA = dA_part.sum(0) if need_dA else None
    dC = dC_part.sum(0) if need_dC else None
    return du, dA, dC, dinit


class _DiagonalScanTriton(torch.autograd.Function):
    """``(y, last_state)``; saves the inputs and, when dA or dC will be needed, chunk checkpoints."""

    @staticmethod
    def forward(ctx, u, A, C, D, initial_state, cfg, grad_enabled):
        # needs_input_grad ignores an outer no_grad (grad mode is always off in here): the caller's
        # grad mode is passed in
        save_ckpt = bool(grad_enabled and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]))
        y, last, ckpt = _forward(u, A, C, D, initial_state, save_ckpt, cfg)
        ctx.save_for_backward(u, A, C, D, initial_state, ckpt)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        u, A, C, D, initial_state, ckpt = ctx.saved_tensors
        need_u, need_A, need_C, need_D, need_init = ctx.needs_input_grad[:5]
        need_D = need_D and D is not None
        need_init = need_init and initial_state is not None
        if (dy is None and dlast is None) or not any((need_u, need_A, need_C, need_D, need_init)):
            return (None,) * 7
        if dy is None:
            dy = torch.zeros(u.shape, dtype=u.dtype, device=u.device)
        dD = None
        if need_D:
            compute = scan_compute_dtype(u.dtype)
            dD = (dy.to(compute) * u.detach().to(compute)).sum((0, 2)).to(D.dtype)
        du = dA = dC = dinit = None
        if need_u or need_A or need_C or need_init:
            du, dA, dC, dinit = _backward(dy, dlast, u, A, C, D, ckpt, (need_u, need_A, need_C, need_init), ctx.cfg)
        return (
            du,
            dA.to(A.dtype) if dA is not None else None,
            dC.to(C.dtype) if dC is not None else None,
            dD,
            dinit.to(initial_state.dtype) if dinit is not None else None,
            None,
            None,
        )


def diagonal_scan_triton(
    u: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    *,
    config: DiagonalScanTritonConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal LTI scan on Triton kernels (equations and design in the module docstring).

    Args (validated by :func:`ssm_models.ops.diagonal_scan.diagonal_scan`): u: (batch, H, L); A, C:
    (H, M, 2); D: (H,) or None; initial_state: (batch, H, M, 2) or None. ``config`` overrides
    :data:`DEFAULT_CONFIG`. Returns ``y`` (batch, H, L) in ``u``'s dtype, or ``(y, last_state)`` with
    ``last_state`` (batch, H, M, 2) in the compute dtype (float64 for float64 ``u``, else float32);
    both carry gradients.
    """
    if u.device.type != "cuda" and not _interpreter_enabled():
        raise ValueError(
            "diagonal_scan: the triton backend needs CUDA tensors or TRITON_INTERPRET=1 (Triton's CPU "
            f"interpreter), got tensors on {u.device}"
        )
    cfg = config if config is not None else DEFAULT_CONFIG
    y, last = _DiagonalScanTriton.apply(u, A, C, D, initial_state, cfg, torch.is_grad_enabled())
    return (y, last) if return_last_state else y
