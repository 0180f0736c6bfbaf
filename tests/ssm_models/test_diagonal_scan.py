"""The diagonal LTI scan: the reference loop against a complex float64 loop written here, the numba
``"cpu"`` backend against the reference (forward, last state, gradients of every input), gradcheck,
the state-free ``du`` path, initial/last states, chaining, decoding steps and bad inputs.

Relative errors are ``||x - ref|| / ||ref||``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssm_models.ops import DIAGONAL_SCAN_BACKENDS, diagonal_scan, diagonal_scan_reference, diagonal_scan_step
from tests.helpers import relative_error

NAMES = ("u", "A", "C", "D", "initial_state")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(batch=2, channels=3, modes=4, length=37, dtype=torch.float64, seed=0, radius=(0.5, 0.98)):
    """Random complex multipliers with ``radius[0] <= |a| <= radius[1]`` (one real mode per channel),
    standard normal C, D, initial state, u; all rounded to ``dtype`` (parameters stay float32 for
    half-precision ``u``, as models keep them)."""
    gen = torch.Generator().manual_seed(seed)
    mag = radius[0] + (radius[1] - radius[0]) * torch.rand(channels, modes, generator=gen, dtype=torch.float64)
    phase = (2 * torch.rand(channels, modes, generator=gen, dtype=torch.float64) - 1) * torch.pi
    phase[:, 0] = 0.0  # a real mode
    A = torch.stack((mag * torch.cos(phase), mag * torch.sin(phase)), dim=-1)
    C = torch.randn(channels, modes, 2, generator=gen, dtype=torch.float64)
    D = torch.randn(channels, generator=gen, dtype=torch.float64)
    init = torch.randn(batch, channels, modes, 2, generator=gen, dtype=torch.float64)
    u = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)
    param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return {"u": u.to(dtype), "A": A.to(param_dtype), "C": C.to(param_dtype), "D": D.to(param_dtype),
            "initial_state": init.to(param_dtype)}  # fmt: skip


def complex_loop(u, A, C, D=None, initial_state=None):
    """The recurrence with Python complex numbers in float64: s = a s + u, y = sum Re(c s) + D u."""
    u, A, C = (t.detach().double().numpy() for t in (u, A, C))
    batch, channels, length = u.shape
    modes = A.shape[1]
    y = np.zeros((batch, channels, length))
    last = np.zeros((batch, channels, modes, 2))
    for b in range(batch):
        for h in range(channels):
            for m in range(modes):
                a, c = complex(*A[h, m]), complex(*C[h, m])
                s = 0j if initial_state is None else complex(*initial_state[b, h, m].double().tolist())
                for t in range(length):
                    s = a * s + u[b, h, t]
                    y[b, h, t] += (c * s).real
                last[b, h, m] = (s.real, s.imag)
            if D is not None:
                y[b, h] += float(D[h]) * u[b, h]
    return torch.from_numpy(y), torch.from_numpy(last)


def run(backend, inputs, grad_names, *, use=NAMES, seed=1):
    """Scan with the inputs in ``use``, backprop fixed random cotangents of y and the last state;
    return (y, last_state, {name: grad})."""
    leaves = {n: (inputs[n].detach().clone().requires_grad_(n in grad_names) if n in use else None) for n in NAMES}
    y, last = diagonal_scan(*(leaves[n] for n in NAMES), return_last_state=True, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    dlast = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)
    wanted = [leaves[n] for n in grad_names if leaves[n] is not None]
    pairs = [(out, cot) for out, cot in ((y, dy), (last, dlast)) if out.requires_grad]  # last: not with C only
    outs, cots = zip(*pairs, strict=True) if pairs else ((), ())
    grads = iter(torch.autograd.grad(outs, wanted, cots) if wanted else ())
    return y, last, {n: next(grads) for n in grad_names if leaves[n] is not None}


# ---------------------------------------------------------------------------------------------
# reference


def test_reference_hand_derived() -> None:
    """One channel, one mode a = 0.5i, c = 1 - 2i, D = 3, u = (1, 2, 4), s_{-1} = 0:
    s = 1, 0.5i + 2, 0.5i (0.5i + 2) + 4 = 3.75 + i; Re(c s) = Re(s) + 2 Im(s)."""
    u = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=torch.float64)
    A = torch.tensor([[[0.0, 0.5]]], dtype=torch.float64)
    C = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    D = torch.tensor([3.0], dtype=torch.float64)
    y, last = diagonal_scan_reference(u, A, C, D, return_last_state=True)
    expected = torch.tensor([[[1.0 + 3.0, 2.0 + 2 * 0.5 + 6.0, 3.75 + 2 * 1.0 + 12.0]]], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(last, torch.tensor([[[[3.75, 1.0]]]], dtype=torch.float64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("with_d", [True, False])
@pytest.mark.parametrize("with_init", [True, False])
def test_reference_matches_complex_loop(with_d: bool, with_init: bool) -> None:
    x = make_inputs(length=23)
    D = x["D"] if with_d else None
    init = x["initial_state"] if with_init else None
    y, last = diagonal_scan(x["u"], x["A"], x["C"], D, init, return_last_state=True, backend="reference")
    y_loop, last_loop = complex_loop(x["u"], x["A"], x["C"], D, init)
    assert y.dtype == last.dtype == torch.float64 and y.shape == (2, 3, 23) and last.shape == (2, 3, 4, 2)
    assert relative_error(y, y_loop) <= 1e-13
    assert relative_error(last, last_loop) <= 1e-13


# ---------------------------------------------------------------------------------------------
# cpu backend against the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference_all_gradients(dtype: torch.dtype) -> None:
    x = make_inputs(dtype=dtype, length=150)  # crosses 3 checkpoint chunks (64), the last one ragged
    ref = run("reference", x, NAMES)
    got = run("cpu", x, NAMES)
    assert got[0].dtype == dtype and got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    errors = {"y": relative_error(got[0], ref[0]), "last_state": relative_error(got[1], ref[1])}
    for name in NAMES:
        assert got[2][name].dtype == x[name].dtype and got[2][name].shape == x[name].shape
        errors["d" + name] = relative_error(got[2][name], ref[2][name])
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all: {errors})"


@pytest.mark.parametrize(
    "grad_names",
    [("u",), ("A",), ("C",), ("D",), ("initial_state",), ("u", "D", "initial_state"), ("A", "C"), ("u", "C")],
)
def test_cpu_gradient_subsets(grad_names: tuple[str, ...]) -> None:
    """Each subset of gradients equals the reference's (the backward takes a different path for each)."""
    x = make_inputs(dtype=torch.float64, length=70, seed=3)
    ref = run("reference", x, grad_names)
    got = run("cpu", x, grad_names)
    assert relative_error(got[0], ref[0]) <= 1e-12
    for name in grad_names:
        assert relative_error(got[2][name], ref[2][name]) <= 1e-12, name


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend: str) -> None:
    x = make_inputs(batch=2, channels=2, modes=3, length=9, seed=4)
    leaves = [x[n].detach().clone().requires_grad_() for n in NAMES]

    def f(*args):
        return diagonal_scan(*args, return_last_state=True, backend=backend)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_du_only_path_stores_no_states_and_equals_full_du() -> None:
    """With A, C, D detached the forward saves no checkpoints and the du equals the full backward's."""
    x = make_inputs(length=130, seed=5)
    u = x["u"].clone().requires_grad_()
    y = diagonal_scan(u, x["A"], x["C"], x["D"], backend="cpu")
    assert y.grad_fn.saved_tensors[-1] is None  # the checkpoints slot
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (du_only,) = torch.autograd.grad(y, u, dy)
    leaves = [x[n].clone().requires_grad_() for n in ("u", "A", "C", "D")]
    y_full = diagonal_scan(*leaves, backend="cpu")
    assert y_full.grad_fn.saved_tensors[-1] is not None
    du_full = torch.autograd.grad(y_full, leaves, dy)[0]
    assert relative_error(du_only, du_full) <= 1e-14
    (du_ref,) = torch.autograd.grad(diagonal_scan(u, x["A"], x["C"], x["D"], backend="reference"), u, dy)
    assert relative_error(du_only, du_ref) <= 1e-12


def test_no_grad_forward_saves_nothing() -> None:
    x = make_inputs(length=20)
    A = x["A"].clone().requires_grad_()
    with torch.no_grad():
        y = diagonal_scan(x["u"], A, x["C"], backend="cpu")
    assert y.grad_fn is None
    assert relative_error(y, diagonal_scan(x["u"], x["A"], x["C"], backend="reference")) <= 1e-13


def test_cpu_strided_inputs() -> None:
    """Non-contiguous views give the result of their contiguous copies."""
    x = make_inputs(length=40)
    u_t = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L) view with stride 1 along H
    A_t = x["A"].transpose(0, 1).contiguous().transpose(0, 1)
    got = diagonal_scan(u_t, A_t, x["C"], x["D"], backend="cpu")
    assert relative_error(got, diagonal_scan(x["u"], x["A"], x["C"], x["D"], backend="reference")) <= 1e-13


def test_auto_is_cpu_on_cpu_tensors() -> None:
    x = make_inputs(length=12)
    torch.testing.assert_close(
        diagonal_scan(x["u"], x["A"], x["C"], x["D"]), diagonal_scan(x["u"], x["A"], x["C"], x["D"], backend="cpu"),
        rtol=0, atol=0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# states: chaining and decoding


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_chaining_equals_one_scan(backend: str) -> None:
    """Scanning [0:L1] then [L1:L] from the returned state equals one scan, gradients included."""
    x = make_inputs(length=100, seed=6)
    dy = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]
    y_full, last_full = diagonal_scan(*leaves, return_last_state=True, backend=backend)
    grads_full = torch.autograd.grad(y_full, leaves, dy)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]
    u, A, C, D, init = leaves
    y1, s1 = diagonal_scan(u[..., :67], A, C, D, init, return_last_state=True, backend=backend)
    y2, s2 = diagonal_scan(u[..., 67:], A, C, D, s1, return_last_state=True, backend=backend)
    y = torch.cat((y1, y2), dim=-1)
    assert relative_error(y, y_full) <= 1e-13 and relative_error(s2, last_full) <= 1e-13
    for name, grad, grad_full in zip(NAMES, torch.autograd.grad(y, leaves, dy), grads_full, strict=True):
        assert relative_error(grad, grad_full) <= 1e-12, name


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradient_from_last_state_only(backend: str) -> None:
    """A loss on the last state alone (no cotangent for y): d last_state seeds the adjoint at L - 1."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = make_inputs(batch=1, channels=2, modes=3, length=21, seed=8)
    grads = []
    for name in ("reference", backend):
        leaves = [x[n].clone().requires_grad_() for n in NAMES]
        _, last = diagonal_scan(*leaves, return_last_state=True, backend=name)
        grads.append(torch.autograd.grad((last * last).sum(), [leaves[0], leaves[1], leaves[4]]))
    for grad, grad_ref in zip(grads[1], grads[0], strict=True):
        assert relative_error(grad, grad_ref) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_scan(dtype: torch.dtype) -> None:
    x = make_inputs(length=15, dtype=dtype, seed=7)
    y_full, last_full = diagonal_scan(x["u"], x["A"], x["C"], x["D"], x["initial_state"], return_last_state=True)
    state = x["initial_state"]
    for t in range(15):
        y_t, state = diagonal_scan_step(state, x["u"][..., t], x["A"], x["C"], x["D"])
        assert y_t.dtype == dtype and state.shape == (2, 3, 4, 2)
        torch.testing.assert_close(y_t, y_full[..., t], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(state, last_full, rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    x = make_inputs(length=5)
    u, A, C, D, init = (x[n] for n in NAMES)
    return [
        ("u", dict(u=u[0])),
        ("u", dict(u=u[..., :0])),
        ("u", dict(u=u.to(torch.int64))),
        ("u", dict(u=torch.complex(u, u))),
        ("u", dict(u=u.numpy())),
        ("A", dict(A=A[:2])),
        ("A", dict(A=A[..., :1])),
        ("A", dict(A=A[:, :0])),
        ("A", dict(A=torch.view_as_complex(A.contiguous()))),
        ("C", dict(C=C[:, :3])),
        ("C", dict(C=C.to(torch.int32))),
        ("D", dict(D=D[:2])),
        ("D", dict(D=D[:, None])),
        ("initial_state", dict(initial_state=init[:1])),
        ("initial_state", dict(initial_state=init[..., 0])),
        ("backend", dict(backend="cuda")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case: int) -> None:
    x = make_inputs(length=5)
    name, change = _bad_cases()[case]
    kwargs = {**{n: x[n] for n in NAMES}, "backend": "cpu", **change}
    with pytest.raises(ValueError, match=f"`{name}`" if name != "backend" else "backend"):
        diagonal_scan(**kwargs)


def test_cpu_backend_refuses_other_devices() -> None:
    x = make_inputs(length=5)
    with pytest.raises(ValueError, match="one device"):
        diagonal_scan(x["u"], x["A"].to("meta"), x["C"], backend="cpu")


def test_step_bad_inputs() -> None:
    x = make_inputs(length=5)
    state = x["initial_state"]
    with pytest.raises(ValueError, match="`u_t`"):
        diagonal_scan_step(state, x["u"], x["A"], x["C"])
    with pytest.raises(ValueError, match="`A`"):
        diagonal_scan_step(state, x["u"][..., 0], x["A"][:, :2], x["C"])
    with pytest.raises(ValueError, match="`state`"):
        diagonal_scan_step(state[..., 0], x["u"][..., 0], x["A"], x["C"])


def test_backends_listed() -> None:
    assert DIAGONAL_SCAN_BACKENDS == ("auto", "reference", "cpu", "triton")
