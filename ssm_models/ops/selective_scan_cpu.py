"""The ``"cpu"`` backend of the selective scan: numba kernels with a hand-written backward.

Shapes (as passed by :func:`ssm_models.ops.selective_scan.selective_scan`): ``u, delta, z``:
(batch, dim, L); ``A``: (dim, N); ``B, C``: (batch, G, N, L) with channel ``c`` reading group
``c // (dim // G)``; ``D, delta_bias``: (dim,). Everything runs in the compute dtype (float64 for
float64 ``u``, float32 otherwise). With ``x_t = delta_t + delta_bias`` and
``d_t = softplus(x_t)`` (threshold 20; ``d_t = x_t`` without ``delta_softplus``), per channel
``c`` and batch row ``b``::

    a_t = exp(d_t * A)                      (N,)   decay of the state
    h_t = a_t * h_{t-1} + d_t * u_t * B_t   (N,)   h_{-1} = 0
    y_t = sum_n C_{t,n} h_{t,n} + D * u_t
    out_t = y_t * silu(z_t)

Backward, with ``dy_t = dout_t * silu(z_t)`` and the state adjoint
``g_t = dL/dh_t = C_t dy_t + a_{t+1} * g_{t+1}`` (``g_L = 0``) run in reverse time::

    du_t     = d_t * sum_n g_t B_t + D dy_t
    dd_t     = sum_n g_t (A a_t h_{t-1}) + u_t sum_n g_t B_t     (dL/d d_t)
    ddelta_t = dd_t * sigmoid(x_t)  (softplus, x_t <= 20)   else dd_t
    dA       = sum_{b,t} g_t a_t h_{t-1} d_t        dB_t = sum_{c in group} g_t d_t u_t
    dC_t     = sum_{c in group} dy_t h_t            dD   = sum_{b,t} dy_t u_t
    dz_t     = dout_t y_t silu'(z_t)                d delta_bias = sum_{b,t} ddelta_t

Split of the work: the element-wise parts that need transcendental functions once per
(b, c, t) (softplus, silu and their derivatives) and the plain sums over (b, t) (dD,
d delta_bias) are done by torch's vectorised ops; the numba kernels do everything that touches
the state (one exp per (b, c, t, n)). The backward only computes what ``ctx.needs_input_grad``
asks for. When only ``du`` (and/or ``dB``, ``dD``) is needed, e.g. the LRP case, the states
are never needed (``du`` and ``dB`` use only ``g_t`` and ``a_t``), so the backward is a single
reverse pass that recomputes ``a_t`` on the fly. The states are recomputed (pass 1, forward in
time, stored for the reverse pass) only for ddelta, d delta_bias, dA, dC or dz.

Memory: nothing of size (batch, dim, L, N) is ever built. The forward keeps one state vector
(N,) per (batch row, channel); the autograd context saves only the inputs, and the backward
recomputes the states of one (batch row, channel) at a time into per-thread scratch buffers
(L + 1, N) (h) and (L, N) (a). Everything else is O(batch * dim * L) (element-wise temporaries
such as softplus(delta + delta_bias), silu(z), dy) or O(dim * N). The sums over channels of dB
and dC go into per-work-unit partial buffers (K, batch, G, L, N) with
``K = min(ceil(threads / G), dim // G)``, summed afterwards, so no two threads ever write the
same element; dA (summed over batch and time, accumulated in float64) stays per channel in one
thread.

``exp`` dominates the cost (batch*dim*L*N of them per pass). numba has no vectorised exp without
Intel SVML, so :func:`_fast_exp` is an inline range reduction + polynomial (Cody-Waite, 2^k
built from the exponent bits) that LLVM vectorises over N. Measured accuracy: <= 1 ulp in
float32 (Cephes ``expf`` polynomial) and in float64 (degree-13 Taylor on |r| <= ln2/2);
overflow gives ``inf``, underflow gradual (denormals) then 0, NaN propagates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from torch.autograd.function import once_differentiable

from ssm_models.ops.selective_scan import scan_compute_dtype

__all__ = ["selective_scan_cpu"]

# Reassociation lets LLVM vectorise the sums over N; contraction allows FMAs. No 'nnan'/'ninf':
# infinities and NaNs keep their IEEE meaning. numba applies these flags to inlined callees too,
# so the exp below is written with explicit fma intrinsics, which reassociation leaves alone.
_FASTMATH = {"reassoc", "contract"}


# --------------------------------------------------------------------------------------------
# Vectorisable exp
# --------------------------------------------------------------------------------------------


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (``llvm.fma``). Used in the exp so that fast-math reassociation
    of the surrounding kernel cannot rewrite the range reduction or the polynomial."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@intrinsic
def _pow2_split(typingctx, k):
    """2**k for an integral-valued float ``k`` (float32 or float64) as ``(2**k1, 2**k2)`` with
    ``k1 + k2 == k``, each factor a normal number for |k| up to ~2 * max exponent."""
    if not isinstance(k, types.Float):
        return None
    if k == types.float32:
        ibits, mant, bias, fty = 32, 23, 127, ir.FloatType()
    else:
        ibits, mant, bias, fty = 64, 52, 1023, ir.DoubleType()

    def codegen(context, builder, signature, args):
        ity = ir.IntType(ibits)
        ki = builder.fptosi(args[0], ity)
        k1 = builder.ashr(ki, ir.Constant(ity, 1))
        k2 = builder.sub(ki, k1)
        factors = []
        for part in (k1, k2):
            biased = builder.add(part, ir.Constant(ity, bias))
            factors.append(builder.bitcast(builder.shl(biased, ir.Constant(ity, mant)), fty))
        return context.make_tuple(builder, signature.return_type, factors)

    return types.UniTuple(k, 2)(k), codegen


# Cephes expf: exp(r) ~ 1 + r + r^2 * P(r) on |r| <= ln2 / 2.
_P32 = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Taylor coefficients 1 / k!, k = 13 .. 2 (truncation error < 1e-17 on |r| <= ln2 / 2).
_P64 = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))


@njit(cache=True)
def _exp_f32(x):
    """exp(x) for float32 x: Cody-Waite reduction x = k ln2 + r, exp(r) by polynomial, 2^k built
    from exponent bits in two factors (so gradual underflow and overflow come out right)."""
    f32 = np.float32
    xc = x if x > f32(-110.0) else f32(-110.0)  # beyond these the result is 0 / inf anyway
    xc = xc if xc < f32(100.0) else f32(100.0)
    k = np.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = _fma(-k, f32(0.693359375), xc)  # ln2 split in an exact head and a tail
    r = _fma(-k, f32(-2.12194440e-4), r)
    p = f32(_P32[0])
    p = _fma(p, r, f32(_P32[1]))
    p = _fma(p, r, f32(_P32[2]))
    p = _fma(p, r, f32(_P32[3]))
    p = _fma(p, r, f32(_P32[4]))
    p = _fma(p, r, f32(_P32[5]))
    p = _fma(p, r * r, r) + f32(1.0)
    s1, s2 = _pow2_split(k)
    res = (p * s1) * s2
    return res if x == x else x


@njit(cache=True)
def _exp_f64(x):
    """exp(x) for float64 x, as :func:`_exp_f32` with a degree-13 Taylor polynomial."""
    xc = x if x > -760.0 else -760.0
    xc = xc if xc < 720.0 else 720.0
    k = np.floor(xc * 1.4426950408889634074 + 0.5)
    r = _fma(-k, 6.93147180369123816490e-01, xc)  # fdlibm's ln2_hi (k * ln2_hi exact) ...
    r = _fma(-k, 1.90821492927058770002e-10, r)  # ... and ln2_lo
    p = _P64[0]
    p = _fma(p, r, _P64[1])
    p = _fma(p, r, _P64[2])
    p = _fma(p, r, _P64[3])
    p = _fma(p, r, _P64[4])
    p = _fma(p, r, _P64[5])
    p = _fma(p, r, _P64[6])
    p = _fma(p, r, _P64[7])
    p = _fma(p, r, _P64[8])
    p = _fma(p, r, _P64[9])
    p = _fma(p, r, _P64[10])
    p = _fma(p, r, _P64[11])
    p = _fma(p, r * r, r) + 1.0
    s1, s2 = _pow2_split(k)
    res = (p * s1) * s2
    return res if x == x else x


def _fast_exp(x):  # pragma: no cover - replaced by the numba overload below
    return math.exp(x)


@overload(_fast_exp, jit_options={"cache": True})
def _fast_exp_impl(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _fwd_kernel(u, dt, A, Bt, Ct, D, gate, has_D, has_gate, out, last_state):
    """Scan forward. u, dt (= d_t, bias and softplus applied), gate (= silu(z)), out: (batch, dim, L);
    A: (dim, N); Bt, Ct: (batch, G, L, N); D: (dim,); last_state: (batch, dim, N).

    out[b, c, t] = (sum_n C h_t + D u_t) * gate. One work item per (b, c); the state h (N,) is the
    only per-item buffer.
    """
    batch, dim, length = u.shape
    n_state = A.shape[1]
    cpg = dim // Bt.shape[1]
    for q in prange(batch * dim):
        b = q // dim
        c = q - b * dim
        g = c // cpg
        h = np.zeros(n_state, dtype=A.dtype)
        a_row = A[c]
        b_bg = Bt[b, g]
        c_bg = Ct[b, g]
        u_row = u[b, c]
        dt_row = dt[b, c]
        out_row = out[b, c]
        for t in range(length):
            d = dt_row[t]
            ut = u_row[t]
            dtu = d * ut
            y = ut - ut
            for n in range(n_state):
                hn = _fast_exp(d * a_row[n]) * h[n] + dtu * b_bg[t, n]
                h[n] = hn
                y += c_bg[t, n] * hn
            out_row[t] = y
        if has_D:
            d_c = D[c]
            for t in range(length):
                out_row[t] += d_c * u_row[t]
        if has_gate:
            gate_row = gate[b, c]
            for t in range(length):
                out_row[t] *= gate_row[t]
        for n in range(n_state):
            last_state[b, c, n] = h[n]


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _bwd_kernel(
    u, dt, A, Bt, Ct, D, dy, has_D,
    need_du, need_dd, need_dA, need_dB, need_dC, need_y, n_split,
    du, dd, dA, dB_part, dC_part, y_out,
):  # fmt: skip
    """Scan backward; each output is written only when its ``need_*`` flag is set.

    Inputs as in :func:`_fwd_kernel`, plus dy = dL/dy (batch, dim, L) (the gate already applied).
    Outputs: du, dd (= dL/d d_t), y_out (= sum_n C h_t + D u_t, for dz): (batch, dim, L);
    dA: (dim, N); dB_part, dC_part: (n_split, batch, G, L, N), zero on entry, partial sums over
    the channels of one work unit. Work unit q = (group g, split k) owns the channels
    g * cpg + [k * cpg // n_split, (k + 1) * cpg // n_split) and loops over the batch inside, so
    the per-channel sum dA stays in one thread and no two units write the same element.
    """
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    cpg = dim // groups
    need_states = need_dd or need_dA or need_dC or need_y
    for q in prange(groups * n_split):
        g = q // n_split
        k = q - g * n_split
        c_lo = g * cpg + (k * cpg) // n_split
        c_hi = g * cpg + ((k + 1) * cpg) // n_split
        gv = np.empty(n_state, dtype=A.dtype)
        av = np.empty(n_state, dtype=A.dtype)
        h = np.empty(n_state, dtype=A.dtype)
        dA_acc = np.empty(n_state, dtype=np.float64)
        scratch_len = length if need_states else 0
        hs = np.zeros((scratch_len + 1, n_state), dtype=A.dtype)  # hs[t + 1] = h_t, hs[0] = 0
        as_ = np.empty((scratch_len, n_state), dtype=A.dtype)  # a_t
        for c in range(c_lo, c_hi):
            a_row = A[c]
            dA_acc[:] = 0.0
            d_c = D[c] if has_D else a_row[0] - a_row[0]
            for b in range(batch):
                b_bg = Bt[b, g]
                c_bg = Ct[b, g]
                u_row = u[b, c]
                dt_row = dt[b, c]
                dy_row = dy[b, c]
                # ---- pass 1 (forward in time): states h_t, decays a_t; dC and y
                if need_states:
                    h[:] = 0.0
                    for t in range(length):
                        d = dt_row[t]
                        dtu = d * u_row[t]
                        y = dtu - dtu
                        for n in range(n_state):
                            an = _fast_exp(d * a_row[n])
                            hn = an * h[n] + dtu * b_bg[t, n]
                            h[n] = hn
                            hs[t + 1, n] = hn
                            as_[t, n] = an
                            y += c_bg[t, n] * hn
                        if need_y:
                            y_out[b, c, t] = y + d_c * u_row[t]
                    if need_dC:
                        dcp = dC_part[k, b, g]
                        for t in range(length):
                            dyt = dy_row[t]
                            for n in range(n_state):
                                dcp[t, n] += dyt * hs[t + 1, n]
                # ---- pass 2 (reverse in time): state adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}
                gv[:] = 0.0
                av[:] = 0.0
                if need_states:
                    for tt in range(length):
                        t = length - 1 - tt
                        d = dt_row[t]
                        ut = u_row[t]
                        dyt = dy_row[t]
                        s_b = ut - ut
                        s_a = s_b
                        for n in range(n_state):
                            gn = gv[n] * av[n] + c_bg[t, n] * dyt
                            gv[n] = gn
                            s_b += gn * b_bg[t, n]
                            an = as_[t, n]
                            av[n] = an
                            w = gn * an * hs[t, n]
                            s_a += w * a_row[n]
                            dA_acc[n] += np.float64(w * d)
                        if need_dB:
                            dtu = d * ut
                            dbp = dB_part[k, b, g, t]
                            for n in range(n_state):
                                dbp[n] += gv[n] * dtu
                        if need_du:
                            du[b, c, t] = d * s_b + d_c * dyt
                        if need_dd:
                            dd[b, c, t] = s_a + ut * s_b
                else:
                    for tt in range(length):
                        t = length - 1 - tt
                        d = dt_row[t]
                        dyt = dy_row[t]
                        s_b = dyt - dyt
                        for n in range(n_state):
                            gn = gv[n] * av[n] + c_bg[t, n] * dyt
                            gv[n] = gn
                            s_b += gn * b_bg[t, n]
                            av[n] = _fast_exp(d * a_row[n])
                        if need_dB:
                            dtu = d * u_row[t]
                            dbp = dB_part[k, b, g, t]
                            for n in range(n_state):
                                dbp[n] += gv[n] * dtu
                        if need_du:
                            du[b, c, t] = d * s_b + d_c * dyt
            if need_dA:
                for n in range(n_state):
                    dA[c, n] = dA_acc[n]


# --------------------------------------------------------------------------------------------
# torch glue
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _on_torch_threads() -> Iterator[None]:
    """Run a kernel on torch's thread count and leave torch's setting as it was. Numba's OpenMP
    layer shares the process's OpenMP runtime with torch, and its first launch sets the runtime's
    thread count to numba's own (measured: a user's ``torch.set_num_threads(1)`` became 2)."""
    threads = torch.get_num_threads()
    wanted = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _empty(compute: torch.dtype, ndim: int) -> torch.Tensor:
    return torch.empty((0,) * ndim, dtype=compute)


def _prep(t: torch.Tensor | None, compute: torch.dtype, ndim: int) -> torch.Tensor:
    """``t`` detached, contiguous, in the compute dtype (no copy if it already is), or an empty
    placeholder with ``ndim`` axes."""
    if t is None:
        return _empty(compute, ndim)
    return t.detach().to(compute).contiguous()


def _prep_bc(t: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """(batch, G, N, L) -> contiguous (batch, G, L, N) in the compute dtype."""
    return t.detach().to(compute).transpose(2, 3).contiguous()


def _delta_pre(delta: torch.Tensor, delta_bias: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor:
    """x = delta + delta_bias (batch, dim, L) in the compute dtype, as the reference computes it."""
    x = delta.detach().to(compute)
    if delta_bias is not None:
        x = x + delta_bias.detach().to(compute)[:, None]
    return x.contiguous()


class _SelectiveScanCPU(torch.autograd.Function):
    """Saves only the inputs; the backward recomputes the states (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        compute = scan_compute_dtype(u.dtype)
        batch, dim, _ = u.shape
        dt = _delta_pre(delta, delta_bias, compute)
        if delta_softplus:
            dt = F.softplus(dt)  # threshold 20, as the reference
        gate = F.silu(z.detach().to(compute)) if z is not None else _empty(compute, 3)
        out = torch.empty(u.shape, dtype=compute)
        last = torch.empty((batch, dim, A.shape[1]), dtype=compute)
        with _on_torch_threads():
            _fwd_kernel(
                _np(_prep(u, compute, 3)), _np(dt.contiguous()), _np(_prep(A, compute, 2)),
                _np(_prep_bc(B, compute)), _np(_prep_bc(C, compute)), _np(_prep(D, compute, 1)),
                _np(gate.contiguous()), D is not None, z is not None, _np(out), _np(last),
            )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = bool(delta_softplus)
        out = out.to(u.dtype)
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *_unused):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias = ctx.needs_input_grad[:8]
        need_D = need_D and D is not None
        need_z = need_z and z is not None
        need_bias = need_bias and delta_bias is not None
        if not any((need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias)):
            return (None,) * 10
        compute = scan_compute_dtype(u.dtype)
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], B.shape[2]
        need_dd = need_delta or need_bias
        uc = _prep(u, compute, 3)
        dt = _delta_pre(delta, delta_bias, compute)
        x = None  # delta + delta_bias, kept only for softplus' backward
        if ctx.delta_softplus:
            x = dt if need_dd else None
            dt = F.softplus(dt)
        dout = dout.to(compute)
        zc = z.detach().to(compute) if z is not None else None
        dy = F.silu(zc).mul_(dout).contiguous() if zc is not None else dout.contiguous()
        grads: dict[str, torch.Tensor] = {}
        if need_D:
            grads["D"] = (dy * uc).sum((0, 2))
        if any((need_u, need_dd, need_A, need_B, need_C, need_z)):
            n_split = min(max(1, -(-numba.get_num_threads() // groups)), dim // groups)

            def buf(flag: bool, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
                if not flag:
                    return _empty(compute, len(shape))
                return torch.zeros(shape, dtype=compute) if zero else torch.empty(shape, dtype=compute)

            du = buf(need_u, (batch, dim, length))
            dd = buf(need_dd, (batch, dim, length))
            y = buf(need_z, (batch, dim, length))
            dA = buf(need_A, (dim, n_state))
            dB_part = buf(need_B, (n_split, batch, groups, length, n_state), zero=True)
            dC_part = buf(need_C, (n_split, batch, groups, length, n_state), zero=True)
            with _on_torch_threads():
                _bwd_kernel(
                    _np(uc), _np(dt.contiguous()), _np(_prep(A, compute, 2)), _np(_prep_bc(B, compute)),
                    _np(_prep_bc(C, compute)), _np(_prep(D, compute, 1)), _np(dy), D is not None,
                    need_u, need_dd, need_A, need_B, need_C, need_z, n_split,
                    _np(du), _np(dd), _np(dA), _np(dB_part), _np(dC_part), _np(y),
                )  # fmt: skip
            grads.update(u=du, A=dA, z=y)
            if need_B:
                grads["B"] = dB_part.sum(0).transpose(2, 3)
            if need_C:
                grads["C"] = dC_part.sum(0).transpose(2, 3)
            if need_z:
                grads["z"] = torch.ops.aten.silu_backward(y.mul_(dout), zc)
            if need_dd:
                ddelta = torch.ops.aten.softplus_backward(dd, x, 1.0, 20.0) if x is not None else dd
                grads["delta"] = ddelta
                if need_bias:
                    grads["delta_bias"] = ddelta.sum((0, 2))
        inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
        needed = {"u": need_u, "delta": need_delta, "A": need_A, "B": need_B, "C": need_C, "D": need_D,
                  "z": need_z, "delta_bias": need_bias}  # fmt: skip
        return tuple(
            grads[name].to(inputs[name].dtype) if needed[name] else None for name in inputs
        ) + (None, None)


def selective_scan_cpu(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan on CPU with numba kernels (see the module docstring for the equations).

    Args: u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L) (already validated
    and made 4-D by the dispatcher); D, delta_bias: (dim,) or None.
    Returns ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with ``last_state``
    (batch, dim, N) in the compute dtype and without gradient.
    """
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
