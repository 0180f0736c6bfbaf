"""Triton backend of Mamba's selective scan (S6): forward and backward kernels in one autograd Function.

Semantics are those of :func:`ssm_models.ops.selective_scan.selective_scan_reference`
(REFERENCE.md section 1), per batch ``b``, channel ``c`` (group ``g = c // (dim // G)``),
state ``n`` and time ``t``::

    dt_t  = softplus(delta_t + delta_bias)          softplus only if delta_softplus; x > 20 -> x
    a_t   = exp(dt_t * A_n)                          (A: (dim, N), real)
    x_t   = dt_t * B_{g,n,t} * u_t                   (Euler B)
    h_t   = a_t * h_{t-1} + x_t,   h_{-1} = 0
    y_t   = sum_n C_{g,n,t} * h_t + D * u_t
    out_t = y_t * silu(z_t)                          (only if z is given)

and the backward pass is the adjoint recurrence, with ``dy_t = dout_t * silu(z_t)``::

    gh_t     = dy_t * C_t + a_{t+1} * gh_{t+1},  gh_{L} = 0     (gradient of the loss w.r.t. h_t)
    du_t     = dt_t * sum_n B_t gh_t + D * dy_t
    dB_t     = sum_{c in group} gh_t * dt_t * u_t,       dC_t = sum_{c in group} dy_t * h_t
    d(dt_t)  = u_t * sum_n B_t gh_t + sum_n A_n * gh_t * a_t h_{t-1}
    dA_n     = sum_{b,t} gh_t * a_t h_{t-1} * dt_t,     dD = sum_{b,t} dy_t u_t
    ddelta_t = d(dt_t) * sigmoid(pre_t)  (1 where pre_t > 20), d delta_bias = sum_{b,t} ddelta_t
    dz_t     = dout_t * y_t * sigmoid(z_t) * (1 + z_t * (1 - sigmoid(z_t)))

``a_t h_{t-1}`` is recovered as ``h_t - x_t`` (as mamba_ssm's CUDA backward does), so no shifted
copy of the state is needed.

Shapes: ``u, delta, z``: (batch, dim, L); ``A``: (dim, N); ``B, C``: (batch, G, N, L) (always 4-D
here; the dispatcher adds the group axis); ``D, delta_bias``: (dim,). Compute dtype float64 for
float64 ``u``, float32 otherwise (bf16/fp16 inputs are upcast in the kernels); ``out`` has ``u``'s
dtype; ``last_state`` (batch, dim, N) has the compute dtype and carries no gradient.

Design (and why it departs from "walk time one step at a time"):

* **Grid** over (batch, group, block of channels within the group), flattened to one axis so the
  programs that read the same B/C tile run side by side. A program owns ``BLOCK_D`` channels and
  all ``N`` states and walks the sequence in **chunks of T steps** (``chunk_len``, a power of two).
* **Inside a chunk the recurrence is a parallel scan** (``tl.associative_scan`` over the time axis
  of a (BLOCK_D, N, T) register tile, with the affine-map combine
  ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``), seeded by the state carried from the previous
  chunk: ``h_t = P_t * h_carry + S_t``. Compared with a sequential step-by-step walk this loads
  u, delta, z, B, C as coalesced (·, T) tiles along the contiguous L axis instead of one strided
  element per channel per step, and replaces T dependent steps by a log-depth scan.
* **Layout.** B and C are loaded as (1, N, T) tiles. That 3-D load, contiguous along T, is what
  Triton lays the whole (BLOCK_D, N, T) computation out after: 4 consecutive steps per thread,
  16 lanes along T (for T = 64), warps along N. The scan then runs mostly inside threads; loaded
  2-D, Triton picked one step per thread and the compiled sm_90 forward used ~2x the
  instructions and ~3x the warp shuffles per element (offline compiles, not timings).
* **Checkpoints.** The forward stores the state at every chunk start, (batch, dim, n_chunks, N)
  in the compute dtype, i.e. O(batch*dim*L*N/T) memory, never (batch, dim, L, N) — and only when a
  gradient that needs the states (delta, A, C, z or delta_bias) is wanted.
* **Backward** walks the chunks in reverse. The adjoint ``gh`` is a *reverse* associative scan
  with coefficients ``a_{t+1}`` (computed from delta loaded one step shifted; the tile of the next
  chunk's first step comes from memory) seeded by the carry from the later chunk. When states
  are needed, the chunk's states are recomputed from its checkpoint with the forward scan **in
  registers** (no global scratch of one chunk is needed, because the whole chunk is one tile).
* **Only the needed gradients** are computed: every one is behind a ``tl.constexpr`` flag, so
  the kernel is specialised. The LRP case (only ``du``, with delta, A, B, C, D detached) needs no
  states at all: ``du`` depends on ``gh`` alone, so the forward then saves no checkpoints and the
  backward runs one reverse scan per chunk.
* **Reductions without atomics** (deterministic): dB/dC are sums over the channels of a group.
  When they are needed, a backward program loops over ``channels_per_program // BLOCK_D`` channel
  sub-blocks inside each chunk and accumulates the (N, T) tile in registers, then writes one
  partial per program to (batch, G, n_blocks, N, L), summed in torch. The per-sub-block carries
  and dA/dD/d delta_bias accumulators then live in small per-program global scratch rows
  (read-modify-write by the owning program only, separated by barriers); with one sub-block they
  stay in registers. dA, dD, d delta_bias are per-batch partials (batch, dim[, N]) summed in torch.
* ``softplus`` uses ``max(x, 0) + log1p(exp(-|x|))`` with ``log1p`` from the atanh series
  ``log1p(e) = 2 atanh(e / (2 + e))`` (|e/(2+e)| <= 1/3), so it is accurate to the last bits for
  very negative inputs without relying on a library ``log1p`` (the interpreter has none).

Status: correct against the reference (interpreter, float64/float32/bf16) and compiled for sm_90
offline; the default tiles (:data:`DEFAULT_CONFIG`) were chosen from the register use and
instruction counts of those compiles, not from timings (``benchmarks/bench_selective_scan_triton.py
--sweep`` times alternatives on a GPU).

Triton is imported lazily: importing this module needs no triton. The kernels run on CUDA tensors,
and on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter; set it before triton is
first imported).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["TritonScanConfig", "DEFAULT_CONFIG", "selective_scan_triton"]


@dataclass(frozen=True)
class TritonScanConfig:
    """Tile sizes and launch settings of the triton selective scan.

    ``chunk_len`` (T, power of two) is both the time tile of the in-register scan and the
    checkpoint interval. ``fwd_block_d`` / ``bwd_block_d`` (powers of two) are the channels of one
    register tile; ``bwd_channels_per_program`` is how many channels one backward program reduces
    over for dB/dC (a multiple of ``bwd_block_d``; fewer programs mean smaller dB/dC partials).
    """

    chunk_len: int = 64
    fwd_block_d: int = 2
    fwd_num_warps: int = 4
    bwd_block_d: int = 2
    bwd_channels_per_program: int = 32
    bwd_num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk_len", "fwd_block_d", "bwd_block_d", "fwd_num_warps", "bwd_num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TritonScanConfig: `{name}` must be a power of two >= 1, got {value}")
        per_program = self.bwd_channels_per_program
        if per_program < self.bwd_block_d or per_program % self.bwd_block_d:
            raise ValueError(
                "TritonScanConfig: `bwd_channels_per_program` must be a positive multiple of `bwd_block_d`, "
                f"got {self.bwd_channels_per_program} and {self.bwd_block_d}"
            )


DEFAULT_CONFIG = TritonScanConfig()


def _interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """Build the jitted kernels. Cached per interpreter mode, because ``triton.jit`` decides at
    decoration time whether a kernel is compiled or interpreted."""
    del interpret  # only the cache key
    import triton
    import triton.language as tl

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # Composition of the affine maps h -> a1 h + b1 (earlier) and h -> a2 h + b2 (later).
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x, SP_TERMS: tl.constexpr):
        # softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3,
        # atanh(s) = s * sum_k s^(2k) / (2k + 1) by Horner. Coefficients are divided in the tensor's
        # dtype (a Python float literal would be rounded to float32 first).
        e = tl.exp(-tl.abs(x))
        s = e / (2.0 + e)
        s2 = s * s
        one = tl.full(s.shape, 1.0, s.dtype)
        p = one / (2 * SP_TERMS - 1)
        for i in tl.static_range(SP_TERMS - 1):
            p = p * s2 + one / (2 * (SP_TERMS - 2 - i) + 1)
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * p)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _load_dt(delta_row, t, mask, sd_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 CDT: tl.constexpr, SP_TERMS: tl.constexpr):
        # (BLOCK_D, T) tile of dt = softplus(delta + bias); 0 where masked. Also returns the
        # pre-activation (for the softplus derivative).
        pre = tl.load(delta_row[:, None] + t[None, :] * sd_l, mask=mask, other=0.0).to(CDT)
        if HAS_BIAS:
            pre = pre + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(pre, SP_TERMS)
        else:
            dt = pre
        return tl.where(mask, dt, 0.0), pre

    @triton.jit
    def _fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        out_ptr, last_ptr, ckpt_ptr,
        L, N, DPG, G, n_blocks, n_chunks,
        su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_CKPT: tl.constexpr, CDT: tl.constexpr, SP_TERMS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blk = pid % n_blocks
        g = (pid // n_blocks) % G
        b = (pid // n_blocks) // G
        dim = DPG * G
        cg = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = cg < DPG
        c = (g * DPG + cg).to(tl.int64)
        b64 = b.to(tl.int64)
        g64 = g.to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_t = tl.arange(0, T)
        mask_dn = mask_d[:, None] & mask_n[None, :]

        u_row = u_ptr + b64 * su_b + c * su_d
        d_row = delta_ptr + b64 * sd_b + c * sd_d
        z_row = z_ptr + b64 * sz_b + c * sz_d
        o_row = out_ptr + (b64 * dim + c) * L
        # B, C are loaded as (1, BLOCK_N, T) tiles: a 3-D load contiguous along T makes Triton lay
        # out the whole (BLOCK_D, BLOCK_N, T) computation with several consecutive steps per thread,
        # so the scan runs mostly inside threads (few warp shuffles)
        B_col = (B_ptr + b64 * sB_b + g64 * sB_g + offs_n * sB_n)[None, :, None]
        C_col = (C_ptr + b64 * sC_b + g64 * sC_g + offs_n * sC_n)[None, :, None]
        state_off = (b64 * dim + c)[:, None] * N + offs_n[None, :]  # into (batch, dim, N)

        A = tl.load(A_ptr + c[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
        A3 = A[:, :, None]
        if HAS_D:
            Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(CDT)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(CDT)
        else:
            bias = tl.zeros((BLOCK_D,), CDT)

        h = tl.zeros((BLOCK_D, BLOCK_N), CDT)
        for k in range(n_chunks):
            if SAVE_CKPT:
                ck_off = ((b64 * dim + c)[:, None] * n_chunks + k) * N + offs_n[None, :]
                tl.store(ckpt_ptr + ck_off, h, mask=mask_dn)
            t = k * T + offs_t
            mask_t = t < L
            m2 = mask_d[:, None] & mask_t[None, :]
            mnt = (mask_n[:, None] & mask_t[None, :])[None, :, :]
            uu = tl.load(u_row[:, None] + t[None, :] * su_l, mask=m2, other=0.0).to(CDT)
            dt, _ = _load_dt(d_row, t, m2, sd_l, bias, HAS_BIAS, SOFTPLUS, CDT, SP_TERMS)
            Bt = tl.load(B_col + t[None, None, :] * sB_l, mask=mnt, other=0.0).to(CDT)  # (1, BLOCK_N, T)
            Ct = tl.load(C_col + t[None, None, :] * sC_l, mask=mnt, other=0.0).to(CDT)
            a = tl.exp(dt[:, None, :] * A3)  # (BLOCK_D, BLOCK_N, T); 1 where masked
            x = (dt * uu)[:, None, :] * Bt  # 0 where masked
            P, S = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
            hs = S + P * h[:, :, None]
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y = y + Dv[:, None] * uu
            if HAS_Z:
                zz = tl.load(z_row[:, None] + t[None, :] * sz_l, mask=m2, other=0.0).to(CDT)
                y = y * (zz * _sigmoid(zz))
            tl.store(o_row[:, None] + t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
            # masked steps keep the state (a = 1, x = 0), so the last column is h at min(end, L) - 1
            h = tl.sum(tl.where((offs_t == T - 1)[None, None, :], hs, 0.0), axis=2)
        tl.store(last_ptr + state_off, h, mask=mask_dn)

    @triton.jit
    def _bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, carry_ptr,
        L, N, DPG, G, n_blocks, n_chunks,
        su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        NEED_DU: tl.constexpr, NEED_DDELTA: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
        NEED_DC: tl.constexpr, NEED_DD: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DBIAS: tl.constexpr,
        NEED_GH: tl.constexpr, NEED_STATE: tl.constexpr, NEED_U: tl.constexpr, NEED_DT_GRAD: tl.constexpr,
        CDT: tl.constexpr, SP_TERMS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, N_SUB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blk = pid % n_blocks
        g = (pid // n_blocks) % G
        b = (pid // n_blocks) // G
        dim = DPG * G
        b64 = b.to(tl.int64)
        g64 = g.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_t = tl.arange(0, T)
        B_col = (B_ptr + b64 * sB_b + g64 * sB_g + offs_n * sB_n)[None, :, None]  # (1, BLOCK_N, 1)
        C_col = (C_ptr + b64 * sC_b + g64 * sC_g + offs_n * sC_n)[None, :, None]
        part_row = ((b64 * G + g64) * n_blocks + blk) * N + offs_n  # into (batch, G, n_blocks, N, L)

        # register accumulators, used when a program has a single channel sub-block
        carry_r = tl.zeros((BLOCK_D, BLOCK_N), CDT)
        dA_r = tl.zeros((BLOCK_D, BLOCK_N), CDT)
        dD_r = tl.zeros((BLOCK_D,), CDT)
        dbias_r = tl.zeros((BLOCK_D,), CDT)

        for kk in range(n_chunks):
            k = n_chunks - 1 - kk
            t = k * T + offs_t
            mask_t = t < L
            t1 = t + 1
            mask_t1 = t1 < L
            mnt = mask_n[:, None] & mask_t[None, :]
            # (1, BLOCK_N, T) tiles; see the forward kernel for why they are loaded 3-D
            Bt = tl.load(B_col + t[None, None, :] * sB_l, mask=mnt[None, :, :], other=0.0).to(CDT)
            Ct = tl.load(C_col + t[None, None, :] * sC_l, mask=mnt[None, :, :], other=0.0).to(CDT)
            if NEED_DB:
                dB_acc = tl.zeros((BLOCK_N, T), CDT)
            if NEED_DC:
                dC_acc = tl.zeros((BLOCK_N, T), CDT)
            for j in range(N_SUB):
                cg = (blk * N_SUB + j) * BLOCK_D + offs_d
                mask_d = cg < DPG
                c = (g * DPG + cg).to(tl.int64)
                mask_dn = mask_d[:, None] & mask_n[None, :]
                m2 = mask_d[:, None] & mask_t[None, :]
                state_off = (b64 * dim + c)[:, None] * N + offs_n[None, :]  # (batch, dim, N)
                vec_off = b64 * dim + c  # (batch, dim)
                io_off = (b64 * dim + c)[:, None] * L + t[None, :]  # contiguous (batch, dim, L) outputs
                A = tl.load(A_ptr + c[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
                A3 = A[:, :, None]
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(CDT)
                else:
                    bias = tl.zeros((BLOCK_D,), CDT)
                d_row = delta_ptr + b64 * sd_b + c * sd_d

                gout = tl.load(dout_ptr + b64 * so_b + c[:, None] * so_d + t[None, :] * so_l,
                               mask=m2, other=0.0).to(CDT)
                if HAS_Z:
                    zz = tl.load(z_ptr + b64 * sz_b + c[:, None] * sz_d + t[None, :] * sz_l,
                                 mask=m2, other=0.0).to(CDT)
                    sz = _sigmoid(zz)
                    dy = gout * (zz * sz)
                else:
                    dy = gout
                dt, pre = _load_dt(d_row, t, m2, sd_l, bias, HAS_BIAS, SOFTPLUS, CDT, SP_TERMS)
                if NEED_U:
                    uu = tl.load(u_ptr + b64 * su_b + c[:, None] * su_d + t[None, :] * su_l,
                                 mask=m2, other=0.0).to(CDT)
                if HAS_D:
                    Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(CDT)

                # (the order below keeps few (BLOCK_D, BLOCK_N, T) tiles alive at a time)
                if NEED_STATE:
                    # recompute the chunk's states h_t from its checkpoint
                    ck_off = ((b64 * dim + c)[:, None] * n_chunks + k) * N + offs_n[None, :]
                    h0 = tl.load(ckpt_ptr + ck_off, mask=mask_dn, other=0.0)
                    a = tl.exp(dt[:, None, :] * A3)
                    x = (dt * uu)[:, None, :] * Bt
                    P, S = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
                    hs = S + P * h0[:, :, None]
                    if NEED_DZ:
                        y = tl.sum(hs * Ct, axis=1)
                        if HAS_D:
                            y = y + Dv[:, None] * uu
                        dz = gout * y * sz * (1.0 + zz * (1.0 - sz))
                        tl.store(dz_ptr + io_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                    if NEED_DC:
                        dC_acc += tl.sum(hs * dy[:, None, :], axis=0)
                    if NEED_DT_GRAD or NEED_DA:
                        hx = hs - x  # a_t * h_{t-1}

                if NEED_GH:
                    # gh_t = a_{t+1} gh_{t+1} + dy_t C_t, seeded by gh at the next chunk's start
                    m2n = mask_d[:, None] & mask_t1[None, :]
                    dtn, _ = _load_dt(d_row, t1, m2n, sd_l, bias, HAS_BIAS, SOFTPLUS, CDT, SP_TERMS)
                    a_next = tl.exp(dtn[:, None, :] * A3)
                    bb = dy[:, None, :] * Ct
                    Pg, Sg = tl.associative_scan((a_next, bb), axis=2, combine_fn=_combine, reverse=True)
                    if N_SUB == 1:
                        carry = carry_r
                    else:
                        carry = tl.load(carry_ptr + (b64 * dim + c)[:, None] * BLOCK_N + offs_n[None, :],
                                        mask=mask_dn, other=0.0)
                    gh = Sg + Pg * carry[:, :, None]
                    new_carry = tl.sum(tl.where((offs_t == 0)[None, None, :], gh, 0.0), axis=2)
                    if N_SUB == 1:
                        carry_r = new_carry
                    else:
                        tl.store(carry_ptr + (b64 * dim + c)[:, None] * BLOCK_N + offs_n[None, :], new_carry,
                                 mask=mask_dn)

                if NEED_DU or NEED_DT_GRAD:
                    sgB = tl.sum(gh * Bt, axis=1)  # (BLOCK_D, T): sum_n B_t gh_t
                if NEED_DU:
                    du = dt * sgB
                    if HAS_D:
                        du = du + Dv[:, None] * dy
                    tl.store(du_ptr + io_off, du.to(du_ptr.dtype.element_ty), mask=m2)
                if NEED_DB:
                    dB_acc += tl.sum(gh * (dt * uu)[:, None, :], axis=0)
                if NEED_DT_GRAD or NEED_DA:
                    w = gh * hx  # gh_t * a_t * h_{t-1}
                if NEED_DT_GRAD:
                    ddt = uu * sgB + tl.sum(w * A3, axis=1)
                    if SOFTPLUS:
                        ddt = ddt * tl.where(pre > 20.0, 1.0, _sigmoid(pre))
                    ddt = tl.where(m2, ddt, 0.0)
                    if NEED_DDELTA:
                        tl.store(ddelta_ptr + io_off, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
                    if NEED_DBIAS:
                        if N_SUB == 1:
                            dbias_r += tl.sum(ddt, axis=1)
                        else:
                            acc = tl.load(dbias_ptr + vec_off, mask=mask_d, other=0.0)
                            tl.store(dbias_ptr + vec_off, acc + tl.sum(ddt, axis=1), mask=mask_d)
                if NEED_DA:
                    contrib = tl.sum(w * dt[:, None, :], axis=2)
                    if N_SUB == 1:
                        dA_r += contrib
                    else:
                        acc = tl.load(dA_ptr + state_off, mask=mask_dn, other=0.0)
                        tl.store(dA_ptr + state_off, acc + contrib, mask=mask_dn)
                if NEED_DD:
                    contrib_d = tl.sum(dy * uu, axis=1)
                    if N_SUB == 1:
                        dD_r += contrib_d
                    else:
                        acc = tl.load(dD_ptr + vec_off, mask=mask_d, other=0.0)
                        tl.store(dD_ptr + vec_off, acc + contrib_d, mask=mask_d)
                if N_SUB > 1:
                    # the scratch rows written above are read back by other threads next chunk
                    tl.debug_barrier()
            if NEED_DB:
                tl.store(dB_ptr + part_row[:, None] * L + t[None, :], dB_acc, mask=mnt)
            if NEED_DC:
                tl.store(dC_ptr + part_row[:, None] * L + t[None, :], dC_acc, mask=mnt)

        if N_SUB == 1:
            cg = blk * BLOCK_D + offs_d
            mask_d = cg < DPG
            c = (g * DPG + cg).to(tl.int64)
            mask_dn = mask_d[:, None] & mask_n[None, :]
            if NEED_DA:
                tl.store(dA_ptr + (b64 * dim + c)[:, None] * N + offs_n[None, :], dA_r, mask=mask_dn)
            if NEED_DD:
                tl.store(dD_ptr + b64 * dim + c, dD_r, mask=mask_d)
            if NEED_DBIAS:
                tl.store(dbias_ptr + b64 * dim + c, dbias_r, mask=mask_d)

    # Triton resolves the names a kernel uses (``tl``, the helper functions) in the module's globals,
    # not in this closure; publish them there (this is what keeps the triton import lazy).
    globals().update(
        tl=tl, _combine=_combine, _softplus=_softplus, _sigmoid=_sigmoid, _load_dt=_load_dt,
    )
    cdt = {torch.float32: tl.float32, torch.float64: tl.float64}
    return _fwd_kernel, _bwd_kernel, cdt


def _on_device(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softplus_terms(compute: torch.dtype) -> int:
    # atanh series in s^2 <= 1/9: 9 terms reach ~1e-10 relative (float32), 17 terms ~1e-18 (float64)
    return 17 if compute == torch.float64 else 9


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_ckpt, cfg):
    """Launch the forward kernel. Returns ``(out, last_state, ckpt_or_None)``."""
    fwd_kernel, _, cdt = _kernels(_interpreter_enabled())
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    dpg = dim // groups
    compute = _compute_dtype(u.dtype)
    T = cfg.chunk_len
    n_chunks = _cdiv(length, T)
    block_d = min(cfg.fwd_block_d, _next_pow2(dpg))
    n_blocks = _cdiv(dpg, block_d)
    out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, n_state), dtype=compute, device=u.device)
    ckpt = (
        torch.empty((batch, dim, n_chunks, n_state), dtype=compute, device=u.device) if save_ckpt else None
    )
    A_c = A.detach().to(compute).contiguous()
    D_c = D.detach().to(compute).contiguous() if D is not None else None
    bias_c = delta_bias.detach().to(compute).contiguous() if delta_bias is not None else None
    zz = z if z is not None else u
    grid = (batch * groups * n_blocks,)
    with _on_device(u.device):
        fwd_kernel[grid](
            u, delta, A_c, B, C,
            D_c if D_c is not None else A_c, zz, bias_c if bias_c is not None else A_c,
            out, last, ckpt if ckpt is not None else last,
            length, n_state, dpg, groups, n_blocks, n_chunks,
            *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), SAVE_CKPT=save_ckpt, CDT=cdt[compute],
            SP_TERMS=_softplus_terms(compute),
            BLOCK_D=block_d, BLOCK_N=_next_pow2(n_state), T=T,
            num_warps=cfg.fwd_num_warps,
        )
    return out, last, ckpt


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, ckpt, needs, cfg):
    """Launch the backward kernel for the gradients flagged in ``needs`` (8 booleans, in the order
    u, delta, A, B, C, D, z, delta_bias). Returns the 8 gradients (None where not needed)."""
    _, bwd_kernel, cdt = _kernels(_interpreter_enabled())
    need_du, need_ddelta, need_dA, need_dB, need_dC, need_dD, need_dz, need_dbias = needs
    need_dD = need_dD and D is not None
    need_dz = need_dz and z is not None
    need_dbias = need_dbias and delta_bias is not None
    need_dt_grad = need_ddelta or need_dbias
    need_gh = need_du or need_dt_grad or need_dA or need_dB
    need_state = need_dt_grad or need_dA or need_dC or need_dz
    need_u = need_state or need_dD or need_dB or need_dt_grad
    if not (need_gh or need_state or need_dD):
        return (None,) * 8
    if need_state and ckpt is None:
        raise RuntimeError("selective_scan_triton: internal error, the forward saved no state checkpoints")

    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    dpg = dim // groups
    compute = _compute_dtype(u.dtype)
    dev = u.device
    T = cfg.chunk_len
    n_chunks = _cdiv(length, T)
    block_d = min(cfg.bwd_block_d, _next_pow2(dpg))
    block_n = _next_pow2(n_state)
    if need_dB or need_dC:
        n_sub = max(1, min(cfg.bwd_channels_per_program // block_d, _cdiv(dpg, block_d)))
    else:
        n_sub = 1
    n_blocks = _cdiv(dpg, block_d * n_sub)

    A_c = A.detach().to(compute).contiguous()
    D_c = D.detach().to(compute).contiguous() if D is not None else A_c
    bias_c = delta_bias.detach().to(compute).contiguous() if delta_bias is not None else A_c
    zz = z if z is not None else u
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev) if need_du else None
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=dev) if need_ddelta else None
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=dev) if need_dz else None
    dA_part = torch.zeros((batch, dim, n_state), dtype=compute, device=dev) if need_dA else None
    part_shape = (batch, groups, n_blocks, n_state, length)
    dB_part = torch.empty(part_shape, dtype=compute, device=dev) if need_dB else None
    dC_part = torch.empty(part_shape, dtype=compute, device=dev) if need_dC else None
    dD_part = torch.zeros((batch, dim), dtype=compute, device=dev) if need_dD else None
    dbias_part = torch.zeros((batch, dim), dtype=compute, device=dev) if need_dbias else None
    carry = (
        torch.zeros((batch, dim, block_n), dtype=compute, device=dev) if (need_gh and n_sub > 1) else None
    )
    dummy = A_c

    def _or(t):
        return t if t is not None else dummy

    grid = (batch * groups * n_blocks,)
    with _on_device(u.device):
        bwd_kernel[grid](
            u, delta, A_c, B, C, D_c, zz, bias_c, dout, _or(ckpt),
            _or(du), _or(ddelta), _or(dz), _or(dA_part), _or(dB_part), _or(dC_part), _or(dD_part),
            _or(dbias_part), _or(carry),
            length, n_state, dpg, groups, n_blocks, n_chunks,
            *u.stride(), *delta.stride(), *zz.stride(), *dout.stride(), *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus),
            NEED_DU=need_du, NEED_DDELTA=need_ddelta, NEED_DA=need_dA, NEED_DB=need_dB, NEED_DC=need_dC,
            NEED_DD=need_dD, NEED_DZ=need_dz, NEED_DBIAS=need_dbias,
            NEED_GH=need_gh, NEED_STATE=need_state, NEED_U=need_u, NEED_DT_GRAD=need_dt_grad,
            CDT=cdt[compute], SP_TERMS=_softplus_terms(compute),
            BLOCK_D=block_d, BLOCK_N=block_n, T=T, N_SUB=n_sub,
            num_warps=cfg.bwd_num_warps,
            # one program reads back scratch rows it wrote; keep loads in program order
            num_stages=1,
        )
    dA = dA_part.sum(0).to(A.dtype) if need_dA else None
    dB = (dB_part[:, :, 0] if n_blocks == 1 else dB_part.sum(2)).to(B.dtype) if need_dB else None
    dC = (dC_part[:, :, 0] if n_blocks == 1 else dC_part.sum(2)).to(C.dtype) if need_dC else None
    dD = dD_part.sum(0).to(D.dtype) if need_dD else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if need_dbias else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _SelectiveScanTriton(torch.autograd.Function):
    """``(out, last_state)`` of the selective scan; ``last_state`` is non-differentiable."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg, grad_enabled):
        # The states are needed by the gradients of delta, A, C, z and delta_bias only.
        # (needs_input_grad ignores an outer no_grad, and grad mode is always off in here,
        # so the caller's grad mode is passed in.)
        needs = ctx.needs_input_grad
        save_ckpt = grad_enabled and any(needs[i] for i in (1, 2, 4, 6, 7))
        out, last, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_ckpt, cfg)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.cfg = cfg
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        del dlast  # last_state carries no gradient
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        grads = _backward(
            dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ckpt,
            tuple(ctx.needs_input_grad[:8]), ctx.cfg,
        )
        return (*grads, None, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    config: TritonScanConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan on Triton kernels (see the module docstring for equations and design).

    Inputs are validated by :func:`ssm_models.ops.selective_scan.selective_scan`; here ``B, C``
    are (batch, G, N, L). ``u, delta, z``: (batch, dim, L); ``A``: (dim, N); ``D, delta_bias``:
    (dim,) or None. Returns ``out`` (batch, dim, L) in ``u``'s dtype, or ``(out, last_state)`` with
    ``last_state`` (batch, dim, N) in the compute dtype (float64 for float64 ``u``, else float32),
    without gradient. ``config`` overrides :data:`DEFAULT_CONFIG` (tile sizes, chunk length).
    """
    if u.device.type != "cuda" and not _interpreter_enabled():
        raise ValueError(
            f"selective_scan: the triton backend needs CUDA tensors or TRITON_INTERPRET=1 "
            f"(Triton's CPU interpreter), got tensors on {u.device}"
        )
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError(
            "selective_scan_triton: B and C must be (batch, G, N, L), "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    cfg = config if config is not None else DEFAULT_CONFIG
    out, last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), cfg, torch.is_grad_enabled()
    )
    return (out, last) if return_last_state else out
