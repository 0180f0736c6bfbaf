"""Mamba's selective scan (S6), behind one function with a ``backend=`` argument.

Semantics and shapes follow ``mamba_ssm.selective_scan_fn`` (REFERENCE.md section 1)::

    delta_t = softplus(delta_t + delta_bias)            (softplus only if delta_softplus;
                                                         threshold 20: x > 20 returns x)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (Euler B, h_{-1} = 0)
    y_t     = sum_n C_{t,n} h_{t,n} + D * u_t
    out_t   = y_t * silu(z_t)                           (only if z is given)

Shapes: ``u, delta, z``: (batch, dim, L); ``A``: (dim, N) real; ``B, C``: (batch, N, L) or
(batch, G, N, L) with ``dim % G == 0`` (channel ``c`` reads group ``c // (dim // G)``);
``D, delta_bias``: (dim,). The scan runs in float32 (float64 when ``u`` is float64); ``out``
has ``u``'s dtype; the optional last state (batch, dim, N) has the compute dtype and carries no
gradient in the fast backends.

Backends: ``"reference"`` (the obvious sequential loop; the ground truth of every test),
``"cpu"`` (compiled numba kernels, :mod:`ssm_models.ops.selective_scan_cpu`), ``"triton"``
(:mod:`ssm_models.ops.selective_scan_triton`; on CPU tensors only under ``TRITON_INTERPRET=1``)
and ``"auto"`` (triton for CUDA tensors, cpu otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTIVE_SCAN_BACKENDS = ("auto", "reference", "cpu", "triton")


def scan_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan runs in for inputs of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"selective_scan: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"selective_scan: `{name}` must be a floating-point tensor, got dtype {value.dtype}")
    if value.is_complex():
        raise ValueError(f"selective_scan: `{name}` must be real; complex A/B/C are not supported")
    return value


def validate_selective_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and dtypes; return B and C as (batch, G, N, L) views.

    Raises ``ValueError`` naming the argument and the expected shape.
    """
    for name, value in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _require_tensor(name, value)
    if u.dim() != 3:
        raise ValueError(f"selective_scan: `u` must have shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("selective_scan: `u` is an empty sequence (L = 0); expected L >= 1")
    if batch == 0 or dim == 0:
        raise ValueError(f"selective_scan: `u` has an empty batch or channel axis: {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(
            f"selective_scan: `delta` must have the shape of `u` {tuple(u.shape)}, got {tuple(delta.shape)}"
        )
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: `A` must have shape (dim={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    if n_state == 0:
        raise ValueError("selective_scan: `A` has N = 0 state dimensions; expected N >= 1")
    grouped = []
    for name, value in (("B", B), ("C", C)):
        if value.dim() == 3:
            value = value.unsqueeze(1)
        if value.dim() != 4 or value.shape[0] != batch or value.shape[2] != n_state or value.shape[3] != length:
            raise ValueError(
                f"selective_scan: `{name}` must have shape (batch={batch}, N={n_state}, L={length}) or "
                f"(batch={batch}, G, N={n_state}, L={length}), got {tuple(value.shape)}"
            )
        if dim % value.shape[1] != 0:
            raise ValueError(
                f"selective_scan: `{name}` has G={value.shape[1]} groups, which must divide dim={dim}"
            )
        grouped.append(value)
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is None:
            continue
        _require_tensor(name, value)
        if value.shape != (dim,):
            raise ValueError(f"selective_scan: `{name}` must have shape (dim={dim},), got {tuple(value.shape)}")
    if z is not None:
        _require_tensor("z", z)
        if z.shape != u.shape:
            raise ValueError(f"selective_scan: `z` must have the shape of `u` {tuple(u.shape)}, got {tuple(z.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {sorted(map(str, devices))}")
    return grouped[0], grouped[1]


def selective_scan_reference(
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
    """The obvious sequential loop over time, differentiable by autograd. B, C: (batch, G, N, L)."""
    compute = scan_compute_dtype(u.dtype)
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    u_c = u.to(compute)
    delta_c = delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)  # threshold 20, as in mamba_ssm
    A_c = A.to(compute)
    B_c = B.to(compute)
    C_c = C.to(compute)
    state = u_c.new_zeros(batch, dim, n_state)
    outputs = []
    for t in range(length):
        B_t = B_c[:, :, :, t].repeat_interleave(dim // groups, dim=1)  # (batch, dim, N)
        C_t = C_c[:, :, :, t].repeat_interleave(dim // groups, dim=1)
        delta_t = delta_c[:, :, t, None]  # (batch, dim, 1)
        state = torch.exp(delta_t * A_c) * state + delta_t * B_t * u_c[:, :, t, None]
        outputs.append((state * C_t).sum(-1))
    y = torch.stack(outputs, dim=-1)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    return (out, state) if return_last_state else out


def selective_scan(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with mamba_ssm's ``selective_scan_fn`` signature (see the module docstring).

    Returns ``out`` (batch, dim, L), or ``(out, last_state)`` with ``last_state`` (batch, dim, N).
    Every backend is a ``torch.autograd.Function`` (the reference is plain autograd) whose
    backward computes only the gradients that are needed.
    """
    if backend not in SELECTIVE_SCAN_BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; expected one of {SELECTIVE_SCAN_BACKENDS}")
    B4, C4 = validate_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if backend == "auto":
        backend = "triton" if u.is_cuda else "cpu"
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "cpu":
        if u.device.type != "cpu":
            raise ValueError(f"selective_scan: backend 'cpu' needs CPU tensors, got device {u.device}")
        from ssm_models.ops.selective_scan_cpu import selective_scan_cpu

        return selective_scan_cpu(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, return_last_state)
    from ssm_models.ops.selective_scan_triton import selective_scan_triton

    return selective_scan_triton(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of the selective scan, for decoding.

    ``state`` (batch, dim, N) in the compute dtype; ``u, delta`` (batch, dim); ``A`` (dim, N);
    ``B, C`` (batch, N); ``D, delta_bias`` (dim,). Returns ``(y (batch, dim) in u's dtype,
    new_state)`` with ``new_state = exp(delta A) state + delta B u`` and ``y = C . new_state + D u``.
    """
    compute = state.dtype
    delta_c = delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    u_c = u.to(compute)
    new_state = torch.exp(delta_c[:, :, None] * A.to(compute)) * state + (
        delta_c[:, :, None] * B.to(compute)[:, None, :] * u_c[:, :, None]
    )
    y = (new_state * C.to(compute)[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(compute) * u_c
    return y.to(u.dtype), new_state
