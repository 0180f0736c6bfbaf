"""The ``"cpu"`` backend of the diagonal LTI scan: numba kernels with a hand-written backward.

Equations (see :mod:`ssm_models.ops.diagonal_scan`), per batch row ``b``, channel ``h``, complex mode ``m``::

    s_t  = a_m s_{t-1} + u_t,   y_t = sum_m Re(c_m s_t) + D u_t                 (forward)
    g_t  = conj(c_m) dy_t + conj(a_m) g_{t+1},  g_{L-1} seeded by d last_state  (reverse)
    du_t = sum_m Re g_t + D dy_t,   da_m = sum g_t conj(s_{t-1}),   dc_m = sum dy_t conj(s_t),
    d initial_state = conj(a_m) g_0,   dD = sum dy_t u_t

written out in real arithmetic on (re, im) pairs. Work is split over (batch row, channel) with
``prange``; the modes are the inner, vectorised loop (the states live in two length-M arrays, re and
im, so LLVM vectorises the update and the sum over modes; fast-math ``reassoc``/``contract`` as in
:mod:`ssm_models.ops.selective_scan_cpu`).

Memory: the forward keeps one state (M,) per work item. When ``da`` or ``dc`` will be needed (``A`` or
``C`` requires grad and grad mode is on) it also stores the state at every chunk start,
(batch, H, ceil(L / T), 2, M) with T = :data:`CHUNK_LEN`; the backward walks the chunks in reverse,
recomputes one chunk's states from its checkpoint into a per-thread (T + 1, M) scratch (re and im), and
runs the adjoint through it, kept in a second such scratch. Without ``da``/``dc`` (the LRP case: only
``du``, maybe ``dD``/``d initial_state``) the backward is a single reverse pass that touches no state at
all. ``dD`` is a torch sum. The per-(b, h) partial sums of ``da``/``dc`` (accumulated per chunk in the
compute dtype, then in float64) are written to (batch, H, M, 2) buffers and summed over the batch in
torch, so no two threads write the same element.

Speed notes (measured on a 2-core AVX-512 machine, float32, M = 32): the forward takes about 0.2 ns
per complex mode-step per core, the ``du``-only backward about the same, the full backward about six
times that. LLVM vectorises a loop over modes only while it writes few
arrays (with six, as in a first version of the backward, it fell back to scalar code, 2x slower); each
loop here writes at most four. A chunk of 64 keeps both scratches in L1/L2. Each (b, h) item is a
separate non-parallel function called from a small ``prange`` loop: that cut numba's compile time
to about a third (the kernels are cached on disk, ``cache=True``). Below :data:`_PARALLEL_MIN_WORK`
mode-steps the kernels run on one thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import njit, prange
from torch.autograd.function import once_differentiable

from ssm_models.ops.selective_scan import scan_compute_dtype
from ssm_models.ops.selective_scan_cpu import _FASTMATH, _on_torch_threads

__all__ = ["CHUNK_LEN", "diagonal_scan_cpu"]

CHUNK_LEN = 64
"""Checkpoint interval T of the full backward (states are recomputed T steps at a time)."""


@njit(fastmath=_FASTMATH, cache=True)
def _fwd_item(b, h, u, a_re, a_im, c_re, c_im, D, init, has_D, has_init, chunk, save_ckpt, y, last, ckpt):
    """Forward scan of one (batch row b, channel h); arguments as in :func:`_fwd_kernel`."""
    length = u.shape[2]
    modes = a_re.shape[1]
    n_chunks = (length + chunk - 1) // chunk
    s_re = np.zeros(modes, dtype=a_re.dtype)
    s_im = np.zeros(modes, dtype=a_re.dtype)
    if has_init:
        for m in range(modes):
            s_re[m] = init[b, h, m, 0]
            s_im[m] = init[b, h, m, 1]
    ar = a_re[h]
    ai = a_im[h]
    cr = c_re[h]
    ci = c_im[h]
    u_row = u[b, h]
    y_row = y[b, h]
    for k in range(n_chunks):
        if save_ckpt:
            for m in range(modes):
                ckpt[b, h, k, 0, m] = s_re[m]
                ckpt[b, h, k, 1, m] = s_im[m]
        t_end = min(length, (k + 1) * chunk)
        for t in range(k * chunk, t_end):
            ut = u_row[t]
            acc = ut - ut
            for m in range(modes):
                xr = ar[m] * s_re[m] - ai[m] * s_im[m] + ut
                xi = ar[m] * s_im[m] + ai[m] * s_re[m]
                s_re[m] = xr
                s_im[m] = xi
                acc += cr[m] * xr - ci[m] * xi
            y_row[t] = acc
    if has_D:
        d_h = D[h]
        for t in range(length):
            y_row[t] += d_h * u_row[t]
    for m in range(modes):
        last[b, h, m, 0] = s_re[m]
        last[b, h, m, 1] = s_im[m]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _fwd_kernel(u, a_re, a_im, c_re, c_im, D, init, has_D, has_init, chunk, save_ckpt, y, last, ckpt):
    """Forward scan. u, y: (batch, H, L); a_re, a_im, c_re, c_im: (H, M); D: (H,); init, last:
    (batch, H, M, 2); ckpt: (batch, H, n_chunks, 2, M), written (state before each chunk of ``chunk``
    steps) only when ``save_ckpt``. One work item per (b, h) (a separate function: a small parallel
    loop body keeps numba's compile time down)."""
    batch, channels, _ = u.shape
    for q in prange(batch * channels):
        b = q // channels
        _fwd_item(
            b, q - b * channels, u, a_re, a_im, c_re, c_im, D, init, has_D, has_init, chunk, save_ckpt, y, last, ckpt
        )


@njit(fastmath=_FASTMATH, cache=True)
def _bwd_item(
    b, h, u, a_re, a_im, c_re, c_im, D, dy, dlast, ckpt, has_D, has_dlast, chunk,
    need_du, need_states, need_dinit,
    du, dA_part, dC_part, dinit,
):  # fmt: skip
    """Backward of one (batch row b, channel h); arguments as in :func:`_bwd_kernel`."""
    length = u.shape[2]
    modes = a_re.shape[1]
    n_chunks = (length + chunk - 1) // chunk
    ar = a_re[h]
    ai = a_im[h]
    cr = c_re[h]
    ci = c_im[h]
    d_h = D[h] if has_D else ar[0] - ar[0]
    u_row = u[b, h]
    dy_row = dy[b, h]
    rows = chunk + 1 if need_states else 1
    gs_re = np.zeros((rows, modes), dtype=a_re.dtype)
    gs_im = np.zeros((rows, modes), dtype=a_re.dtype)
    if has_dlast:
        last_row = length - (n_chunks - 1) * chunk if need_states else 0  # n of the last chunk
        for m in range(modes):
            gs_re[last_row, m] = dlast[b, h, m, 0]
            gs_im[last_row, m] = dlast[b, h, m, 1]
    if not need_states:
        g_re = gs_re[0]
        g_im = gs_im[0]
        for tt in range(length):
            t = length - 1 - tt
            dyt = dy_row[t]
            acc = dyt - dyt
            for m in range(modes):
                gr = g_re[m] + cr[m] * dyt
                gi = g_im[m] - ci[m] * dyt
                acc += gr
                g_re[m] = ar[m] * gr + ai[m] * gi  # conj(a) g_t, the carry into t - 1
                g_im[m] = ar[m] * gi - ai[m] * gr
            if need_du:
                du[b, h, t] = acc + d_h * dyt
    else:
        st_re = np.empty((chunk + 1, modes), dtype=a_re.dtype)
        st_im = np.empty((chunk + 1, modes), dtype=a_re.dtype)
        pa_re = np.empty(modes, dtype=a_re.dtype)  # per-chunk partial sums
        pa_im = np.empty(modes, dtype=a_re.dtype)
        pc_re = np.empty(modes, dtype=a_re.dtype)
        pc_im = np.empty(modes, dtype=a_re.dtype)
        da_re = np.zeros(modes, dtype=np.float64)
        da_im = np.zeros(modes, dtype=np.float64)
        dc_re = np.zeros(modes, dtype=np.float64)
        dc_im = np.zeros(modes, dtype=np.float64)
        for kk in range(n_chunks):
            k = n_chunks - 1 - kk
            t0 = k * chunk
            n = min(length, t0 + chunk) - t0
            for m in range(modes):
                st_re[0, m] = ckpt[b, h, k, 0, m]
                st_im[0, m] = ckpt[b, h, k, 1, m]
            pc_re[:] = 0.0
            pc_im[:] = 0.0
            for j in range(n):
                ut = u_row[t0 + j]
                dyt = dy_row[t0 + j]
                for m in range(modes):
                    xr = ar[m] * st_re[j, m] - ai[m] * st_im[j, m] + ut
                    xi = ar[m] * st_im[j, m] + ai[m] * st_re[j, m]
                    st_re[j + 1, m] = xr
                    st_im[j + 1, m] = xi
                    pc_re[m] += dyt * xr  # dc += dy_t conj(s_t)
                    pc_im[m] -= dyt * xi
            if kk > 0:  # the carry conj(a) g_{t0 + n} left in row 0 by the later chunk
                for m in range(modes):
                    gs_re[n, m] = gs_re[0, m]
                    gs_im[n, m] = gs_im[0, m]
            pa_re[:] = 0.0
            pa_im[:] = 0.0
            for jj in range(n):
                j = n - 1 - jj
                dyt = dy_row[t0 + j]
                acc = dyt - dyt
                for m in range(modes):
                    gr = gs_re[j + 1, m] + cr[m] * dyt
                    gi = gs_im[j + 1, m] - ci[m] * dyt
                    acc += gr
                    pa_re[m] += gr * st_re[j, m] + gi * st_im[j, m]  # da += g_t conj(s_{t-1})
                    pa_im[m] += gi * st_re[j, m] - gr * st_im[j, m]
                    gs_re[j, m] = ar[m] * gr + ai[m] * gi
                    gs_im[j, m] = ar[m] * gi - ai[m] * gr
                if need_du:
                    du[b, h, t0 + j] = acc + d_h * dyt
            for m in range(modes):
                da_re[m] += pa_re[m]
                da_im[m] += pa_im[m]
                dc_re[m] += pc_re[m]
                dc_im[m] += pc_im[m]
        for m in range(modes):
            dA_part[b, h, m, 0] = da_re[m]
            dA_part[b, h, m, 1] = da_im[m]
            dC_part[b, h, m, 0] = dc_re[m]
            dC_part[b, h, m, 1] = dc_im[m]
    if need_dinit:  # row 0 now holds conj(a) g_0
        for m in range(modes):
            dinit[b, h, m, 0] = gs_re[0, m]
            dinit[b, h, m, 1] = gs_im[0, m]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _bwd_kernel(
    u, a_re, a_im, c_re, c_im, D, dy, dlast, ckpt, has_D, has_dlast, chunk,
    need_du, need_states, need_dinit,
    du, dA_part, dC_part, dinit,
):  # fmt: skip
    """Backward (module docstring). dy, du: (batch, H, L); dlast, dinit: (batch, H, M, 2); dA_part,
    dC_part: (batch, H, M, 2) float64 per-(b, h) partial sums; ckpt as in :func:`_fwd_kernel`.

    Without ``need_states``: one reverse pass over ``g``. With it, per chunk in reverse: recompute the
    states ``st[j] = s_{t0 + j - 1}`` from the checkpoint (accumulating dc), then the reverse pass keeps
    ``gs[j] = conj(a) g_{t0 + j}`` (``gs[n]``: the carry from the later chunk, or d last_state) and
    accumulates da. Each vectorised loop writes at most four arrays (more and LLVM stops vectorising).
    """
    batch, channels, _ = u.shape
    for q in prange(batch * channels):
        b = q // channels
        _bwd_item(
            b, q - b * channels, u, a_re, a_im, c_re, c_im, D, dy, dlast, ckpt, has_D, has_dlast, chunk,
            need_du, need_states, need_dinit, du, dA_part, dC_part, dinit,
        )  # fmt: skip


_PARALLEL_MIN_WORK = 1 << 18
"""Below this many (batch * H * L * M) mode-steps a kernel runs on one thread: starting the thread team
costs more than it saves (measured: ~100x slower gradcheck on a loaded 2-core machine)."""


@contextlib.contextmanager
def _kernel_threads(work: int) -> Iterator[None]:
    """Torch's thread count for the kernels (:func:`_on_torch_threads`), or one thread for tiny work."""
    with _on_torch_threads():
        if work < _PARALLEL_MIN_WORK and numba.get_num_threads() != 1:
            numba.set_num_threads(1)
        yield


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _prep(t: torch.Tensor | None, compute: torch.dtype, ndim: int) -> torch.Tensor:
    """``t`` detached, contiguous, in ``compute`` (no copy if it already is), or an empty placeholder."""
    if t is None:
        return torch.empty((0,) * ndim, dtype=compute)
    return t.detach().to(compute).contiguous()


def _split(pairs: torch.Tensor, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, M, 2) -> contiguous real and imaginary parts (H, M) in ``compute``."""
    pairs = pairs.detach().to(compute)
    return pairs[..., 0].contiguous(), pairs[..., 1].contiguous()


class _DiagonalScanCPU(torch.autograd.Function):
    """``(y, last_state)``; saves the inputs and, when dA or dC will be needed, chunk checkpoints."""

    @staticmethod
    def forward(ctx, u, A, C, D, initial_state, grad_enabled):
        compute = scan_compute_dtype(u.dtype)
        batch, channels, length = u.shape
        modes = A.shape[1]
        needs = ctx.needs_input_grad
        save_ckpt = bool(grad_enabled and (needs[1] or needs[2]))
        a_re, a_im = _split(A, compute)
        c_re, c_im = _split(C, compute)
        y = torch.empty((batch, channels, length), dtype=compute)
        last = torch.empty((batch, channels, modes, 2), dtype=compute)
        n_chunks = -(-length // CHUNK_LEN)
        ckpt = torch.empty((batch, channels, n_chunks, 2, modes) if save_ckpt else (0,) * 5, dtype=compute)
        with _kernel_threads(batch * channels * length * modes):
            _fwd_kernel(
                _np(_prep(u, compute, 3)), _np(a_re), _np(a_im), _np(c_re), _np(c_im), _np(_prep(D, compute, 1)),
                _np(_prep(initial_state, compute, 4)), D is not None, initial_state is not None, CHUNK_LEN,
                save_ckpt, _np(y), _np(last), _np(ckpt),
            )  # fmt: skip
        ctx.save_for_backward(u, A, C, D, initial_state, ckpt if save_ckpt else None)
        ctx.set_materialize_grads(False)
        return y.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dlast):
        u, A, C, D, initial_state, ckpt = ctx.saved_tensors
        need_u, need_A, need_C, need_D, need_init = ctx.needs_input_grad[:5]
        need_D = need_D and D is not None
        need_init = need_init and initial_state is not None
        if dy is None and dlast is None or not any((need_u, need_A, need_C, need_D, need_init)):
            return (None,) * 6
        compute = scan_compute_dtype(u.dtype)
        batch, channels, length = u.shape
        modes = A.shape[1]
        dy = torch.zeros(u.shape, dtype=compute) if dy is None else dy.detach().to(compute).contiguous()
        grads: dict[str, torch.Tensor] = {}
        uc = _prep(u, compute, 3)
        if need_D:
            grads["D"] = (dy * uc).sum((0, 2))
        need_states = need_A or need_C
        if need_u or need_states or need_init:
            if need_states and ckpt is None:
                raise RuntimeError("diagonal_scan_cpu: internal error, the forward saved no state checkpoints")
            a_re, a_im = _split(A, compute)
            c_re, c_im = _split(C, compute)
            du = torch.empty((batch, channels, length) if need_u else (0, 0, 0), dtype=compute)
            part_shape = (batch, channels, modes, 2) if need_states else (0, 0, 0, 0)
            dA_part = torch.empty(part_shape, dtype=torch.float64)
            dC_part = torch.empty(part_shape, dtype=torch.float64)
            dinit = torch.empty((batch, channels, modes, 2) if need_init else (0, 0, 0, 0), dtype=compute)
            with _kernel_threads(batch * channels * length * modes):
                _bwd_kernel(
                    _np(uc), _np(a_re), _np(a_im), _np(c_re), _np(c_im), _np(_prep(D, compute, 1)), _np(dy),
                    _np(_prep(dlast, compute, 4)), _np(ckpt if ckpt is not None else _prep(None, compute, 5)),
                    D is not None, dlast is not None, CHUNK_LEN, need_u, need_states, need_init,
                    _np(du), _np(dA_part), _np(dC_part), _np(dinit),
                )  # fmt: skip
            grads.update(u=du, initial_state=dinit)
            if need_A:
                grads["A"] = dA_part.sum(0)
            if need_C:
                grads["C"] = dC_part.sum(0)
        inputs = {"u": u, "A": A, "C": C, "D": D, "initial_state": initial_state}
        needed = {"u": need_u, "A": need_A, "C": need_C, "D": need_D, "initial_state": need_init}
        return tuple(grads[n].to(inputs[n].dtype) if needed[n] else None for n in inputs) + (None,)


def diagonal_scan_cpu(
    u: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal LTI scan on CPU with numba kernels (equations in the module docstring).

    Args (validated by :func:`ssm_models.ops.diagonal_scan.diagonal_scan`): u: (batch, H, L);
    A, C: (H, M, 2); D: (H,) or None; initial_state: (batch, H, M, 2) or None.
    Returns ``y`` (batch, H, L) in ``u``'s dtype, or ``(y, last_state)`` with ``last_state``
    (batch, H, M, 2) in the compute dtype; both carry gradients.
    """
    y, last = _DiagonalScanCPU.apply(u, A, C, D, initial_state, torch.is_grad_enabled())
    return (y, last) if return_last_state else y
