"""A diagonal linear time-invariant recurrence (H3's diagonal SSM), behind one function with ``backend=``.

Per batch row ``b``, channel ``h`` and mode ``m`` (complex numbers; a real mode has ``Im a_m = 0``),
with the input entering the real part of the state (``B = 1``, REFERENCE.md section 4)::

    s_t = a_m * s_{t-1} + u_t                 s_{-1} = initial_state (zeros by default)
    y_t = sum_m Re(c_m * s_t) + D * u_t

``a_m`` is the discretised multiplier (H3's ``dA``, e.g. bilinear ``(1 + dt A/2) / (1 - dt A/2)``) and
``c_m`` the output coefficient with every constant factor folded in (H3's ``2 * C~``), so
``y = u * K + D u`` with the kernel ``K_l = sum_m Re(c_m a_m^l)``
(:func:`ssm_models.ops.fft_conv.diagonal_ssm_kernel`, :func:`ssm_models.ops.fft_conv.fft_causal_conv`).

Shapes: ``u``: (batch, H, L); ``A, C``: (H, M, 2), complex numbers as (re, im) pairs; ``D``: (H,);
``initial_state`` and the last state: (batch, H, M, 2). The recurrence runs in float32 (float64 for
float64 ``u``); ``y`` has ``u``'s dtype, the last state the compute dtype.

Gradients (all backends; the fast ones compute only those asked for), with ``dy_t = dL/dy_t``, the
complex state adjoint ``g_t = (dL/d Re s_t) + i (dL/d Im s_t)`` and ``g_{L-1}`` seeded by the
gradient of the last state::

    g_t  = conj(c_m) dy_t + conj(a_m) g_{t+1}           (reverse in time)
    du_t = sum_m Re g_t + D dy_t                        dD = sum_{b,t} dy_t u_t
    dc_m = sum_{b,t} dy_t conj(s_t)                     da_m = sum_{b,t} g_t conj(s_{t-1})
    d initial_state = conj(a_m) g_0

``du`` needs no states (one reverse pass, the LRP case); ``da`` and ``dc`` need them.

Backends: ``"reference"`` (the obvious sequential loop, differentiable by autograd: the ground truth),
``"cpu"`` (numba kernels, :mod:`ssm_models.ops.diagonal_scan_cpu`), ``"triton"``
(:mod:`ssm_models.ops.diagonal_scan_triton`; CPU tensors only under ``TRITON_INTERPRET=1``) and
``"auto"`` (triton for CUDA tensors, cpu otherwise). Unlike the selective scan's, the last state here
carries a gradient in every backend, so that scans can be chained.
"""

from __future__ import annotations

import torch

from ssm_models.ops.selective_scan import scan_compute_dtype

DIAGONAL_SCAN_BACKENDS = ("auto", "reference", "cpu", "triton")

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_real_tensor(name: str, value: object, where: str = "diagonal_scan") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.is_complex():
        raise ValueError(
            f"{where}: `{name}` must be real; pass complex numbers as (re, im) pairs in a trailing axis of "
            "size 2 (torch.view_as_real)"
        )
    if value.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{where}: `{name}` must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def validate_diagonal_scan_inputs(
    u: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    """Check shapes, dtypes and devices; raise ``ValueError`` naming the argument and the expected shape."""
    for name, value in (("u", u), ("A", A), ("C", C)):
        _require_real_tensor(name, value)
    if u.dim() != 3:
        raise ValueError(f"diagonal_scan: `u` must have shape (batch, H, L), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("diagonal_scan: `u` is an empty sequence (L = 0); expected L >= 1")
    if batch == 0 or channels == 0:
        raise ValueError(f"diagonal_scan: `u` has an empty batch or channel axis: {tuple(u.shape)}")
    if A.dim() != 3 or A.shape[0] != channels or A.shape[2] != 2:
        raise ValueError(f"diagonal_scan: `A` must have shape (H={channels}, M, 2), got {tuple(A.shape)}")
    modes = A.shape[1]
    if modes == 0:
        raise ValueError("diagonal_scan: `A` has M = 0 modes; expected M >= 1")
    if C.shape != A.shape:
        raise ValueError(f"diagonal_scan: `C` must have shape (H={channels}, M={modes}, 2), got {tuple(C.shape)}")
    if D is not None:
        _require_real_tensor("D", D)
        if D.shape != (channels,):
            raise ValueError(f"diagonal_scan: `D` must have shape (H={channels},), got {tuple(D.shape)}")
    if initial_state is not None:
        _require_real_tensor("initial_state", initial_state)
        if initial_state.shape != (batch, channels, modes, 2):
            raise ValueError(
                f"diagonal_scan: `initial_state` must have shape (batch={batch}, H={channels}, M={modes}, 2), "
                f"got {tuple(initial_state.shape)}"
            )
    devices = {t.device for t in (u, A, C, D, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"diagonal_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def diagonal_scan_reference(
    u: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The obvious sequential loop over time in real arithmetic, differentiable by autograd.

    ``u``: (batch, H, L); ``A, C``: (H, M, 2); ``D``: (H,) or None; ``initial_state``: (batch, H, M, 2)
    or None. Returns ``y`` (batch, H, L) in ``u``'s dtype, or ``(y, last_state)`` with
    ``last_state`` (batch, H, M, 2) in the compute dtype. Keeps every state for autograd:
    O(batch * H * M * L) memory, meant for tests and small inputs.
    """
    compute = scan_compute_dtype(u.dtype)
    batch, channels, length = u.shape
    u_c = u.to(compute)
    a_re, a_im = A.to(compute).unbind(-1)  # (H, M) each
    c_re, c_im = C.to(compute).unbind(-1)
    if initial_state is None:
        s_re = u_c.new_zeros(batch, channels, A.shape[1])
        s_im = u_c.new_zeros(batch, channels, A.shape[1])
    else:
        s_re, s_im = initial_state.to(compute).unbind(-1)
    outputs = []
    for t in range(length):
        u_t = u_c[:, :, t, None]  # (batch, H, 1)
        s_re, s_im = a_re * s_re - a_im * s_im + u_t, a_re * s_im + a_im * s_re
        outputs.append((c_re * s_re - c_im * s_im).sum(-1))
    y = torch.stack(outputs, dim=-1)  # (batch, H, L)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    y = y.to(u.dtype)
    if return_last_state:
        return y, torch.stack((s_re, s_im), dim=-1)
    return y


def diagonal_scan(
    u: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal LTI scan ``s_t = a s_{t-1} + u_t``, ``y_t = sum_m Re(c s_t) + D u_t`` (module docstring).

    Args:
        u: (batch, H, L), float16/bfloat16/float32/float64.
        A: (H, M, 2) the complex multipliers ``a_m`` as (re, im) pairs (the discretised ``dA``).
        C: (H, M, 2) the complex output coefficients ``c_m`` (constant factors folded in).
        D: (H,) skip coefficient, or None.
        initial_state: (batch, H, M, 2) state before the first step, or None (zeros).
        return_last_state: also return the state after the last step.
        backend: one of :data:`DIAGONAL_SCAN_BACKENDS`.

    Returns ``y`` (batch, H, L) in ``u``'s dtype, or ``(y, last_state)`` with ``last_state``
    (batch, H, M, 2) in the compute dtype (float64 for float64 ``u``, else float32). Gradients flow
    to ``u, A, C, D, initial_state`` and from ``last_state``; the fast backends compute only the
    ones needed, and the ``u``-only backward (parameters detached) is one reverse pass without states.
    """
    if backend not in DIAGONAL_SCAN_BACKENDS:
        raise ValueError(f"diagonal_scan: unknown backend {backend!r}; expected one of {DIAGONAL_SCAN_BACKENDS}")
    validate_diagonal_scan_inputs(u, A, C, D, initial_state)
    if backend == "auto":
        backend = "triton" if u.is_cuda else "cpu"
    if backend == "reference":
        return diagonal_scan_reference(u, A, C, D, initial_state, return_last_state)
    if backend == "cpu":
        if u.device.type != "cpu":
            raise ValueError(f"diagonal_scan: backend 'cpu' needs CPU tensors, got device {u.device}")
        from ssm_models.ops.diagonal_scan_cpu import diagonal_scan_cpu

        return diagonal_scan_cpu(u, A, C, D, initial_state, return_last_state)
    from ssm_models.ops.diagonal_scan_triton import diagonal_scan_triton

    return diagonal_scan_triton(u, A, C, D, initial_state, return_last_state)


def diagonal_scan_step(
    state: torch.Tensor,
    u_t: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of :func:`diagonal_scan`, for decoding.

    ``state``: (batch, H, M, 2) (the last state of a scan, or zeros); ``u_t``: (batch, H);
    ``A, C``: (H, M, 2); ``D``: (H,) or None. Computes in the scan's dtype for ``u_t`` (float64 for
    float64 ``u_t``, else float32). Returns ``(y_t (batch, H) in u_t's dtype, new_state (batch, H, M, 2)
    in the compute dtype)`` with ``new_state = a * state + u_t`` and ``y_t = sum_m Re(c * new_state) + D u_t``.
    """
    _require_real_tensor("state", state, "diagonal_scan_step")
    _require_real_tensor("u_t", u_t, "diagonal_scan_step")
    if state.dim() != 4 or state.shape[-1] != 2:
        raise ValueError(f"diagonal_scan_step: `state` must have shape (batch, H, M, 2), got {tuple(state.shape)}")
    batch, channels, modes, _ = state.shape
    if u_t.shape != (batch, channels):
        raise ValueError(
            f"diagonal_scan_step: `u_t` must have shape (batch={batch}, H={channels}), got {tuple(u_t.shape)}"
        )
    for name, value in (("A", A), ("C", C)):
        _require_real_tensor(name, value, "diagonal_scan_step")
        if value.shape != (channels, modes, 2):
            raise ValueError(
                f"diagonal_scan_step: `{name}` must have shape (H={channels}, M={modes}, 2), got {tuple(value.shape)}"
            )
    if D is not None and D.shape != (channels,):
        raise ValueError(f"diagonal_scan_step: `D` must have shape (H={channels},), got {tuple(D.shape)}")
    compute = scan_compute_dtype(u_t.dtype)
    s_re, s_im = state.to(compute).unbind(-1)
    a_re, a_im = A.to(compute).unbind(-1)
    c_re, c_im = C.to(compute).unbind(-1)
    u_c = u_t.to(compute)
    new_re = a_re * s_re - a_im * s_im + u_c[:, :, None]
    new_im = a_re * s_im + a_im * s_re
    y = (c_re * new_re - c_im * new_im).sum(-1)
    if D is not None:
        y = y + D.to(compute) * u_c
    return y.to(u_t.dtype), torch.stack((new_re, new_im), dim=-1)
