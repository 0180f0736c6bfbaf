"""The numba ``"cpu"`` selective scan against the reference loop: forward, last state, and the
gradients of every input (u, delta, A, B, C, D, z, delta_bias), in float64 and float32.

Relative errors are ``||cpu - ref|| / ||ref||``; bounds: 1e-10 (float64), 1e-5 (float32).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ssm_models.ops import selective_scan_cpu as cpu_mod
from ssm_models.ops.selective_scan import selective_scan

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(
    batch, dim, length, n_state, groups, bc_ndim, dtype, *, seed=0, softplus=True, big_delta=False
):
    """Mamba-like inputs: A < 0, small positive step sizes. (B, C: 3-D only with groups == 1.)"""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    u = randn(batch, dim, length)
    if softplus:
        delta = randn(batch, dim, length) * 0.5 - 2.0  # softplus -> ~0.13
        if big_delta:  # exercise softplus' threshold (x > 20 returns x)
            big = torch.rand(delta[..., ::3].shape, generator=gen, dtype=torch.float64)
            delta[..., ::3] = 20.0 + 5.0 * big
    else:
        delta = 0.05 + 0.2 * torch.rand(batch, dim, length, generator=gen, dtype=torch.float64)
    A = -(0.5 + torch.rand(dim, n_state, generator=gen, dtype=torch.float64) * 4.0)
    bc_shape = (batch, groups, n_state, length) if bc_ndim == 4 else (batch, n_state, length)
    B, C = randn(*bc_shape), randn(*bc_shape)
    D, z, delta_bias = randn(dim), randn(batch, dim, length), randn(dim) * 0.2
    return {k: v.to(dtype) for k, v in zip(NAMES, (u, delta, A, B, C, D, z, delta_bias), strict=True)}


def run(backend, inputs, *, use, softplus, last, grad_names, dout_seed=1):
    """Run the scan with inputs ``use`` (names of the optional ones given), backprop a fixed random
    cotangent, return (out, last_state or None, {name: grad})."""
    leaves = {}
    for name, value in inputs.items():
        if name in ("D", "z", "delta_bias") and name not in use:
            leaves[name] = None
            continue
        leaves[name] = value.detach().clone().requires_grad_(name in grad_names)
    res = selective_scan(
        *(leaves[n] for n in NAMES), delta_softplus=softplus, return_last_state=last, backend=backend
    )
    out, state = res if last else (res, None)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    if grad_names:
        out.backward(dout)
    grads = {n: leaves[n].grad for n in grad_names}
    return out, state, grads


def compare(inputs, dtype, *, use, softplus, last, grad_names=None):
    if grad_names is None:
        grad_names = [n for n in NAMES if n not in ("D", "z", "delta_bias") or n in use]
    ref = run("reference", inputs, use=use, softplus=softplus, last=last, grad_names=grad_names)
    got = run("cpu", inputs, use=use, softplus=softplus, last=last, grad_names=grad_names)
    tol = TOL[dtype]
    assert got[0].dtype == inputs["u"].dtype and got[0].shape == ref[0].shape
    assert rel_err(got[0], ref[0]) <= tol, ("out", rel_err(got[0], ref[0]))
    if last:
        assert got[1].dtype == dtype and got[1].shape == ref[1].shape
        assert not got[1].requires_grad
        assert rel_err(got[1], ref[1]) <= tol, ("last_state", rel_err(got[1], ref[1]))
    for name in grad_names:
        g_got, g_ref = got[2][name], ref[2][name]
        assert g_got is not None, name
        assert g_got.dtype == inputs[name].dtype and g_got.shape == inputs[name].shape, name
        err = rel_err(g_got, g_ref)
        assert err <= tol, (name, err)


# (batch, dim, L, N, G, B/C ndim): L = 1, L prime, batch > 1, N in {1, 16}, grouped and 3-D B/C.
SHAPES = [
    (1, 4, 1, 16, 1, 4),
    (2, 6, 37, 16, 2, 4),
    (2, 4, 53, 1, 1, 3),
    (1, 8, 130, 16, 1, 3),
    (3, 4, 19, 1, 2, 4),
]
OPTIONS = list(itertools.product((False, True), repeat=3))  # (D, z, delta_bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}L{}N{}G{}bc{}".format(*s))
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "nosoftplus"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "D{:d}z{:d}bias{:d}".format(*o))
def test_matches_reference(dtype, shape, softplus, options):
    inputs = make_inputs(*shape, dtype, softplus=softplus)
    use = [n for n, on in zip(("D", "z", "delta_bias"), options, strict=True) if on]
    compare(inputs, dtype, use=use, softplus=softplus, last=options[0])  # last_state on half of them


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_softplus_threshold(dtype):
    """delta + bias > 20: softplus returns x with slope 1 (torch's threshold)."""
    inputs = make_inputs(2, 4, 29, 16, 2, 4, dtype, big_delta=True)
    compare(inputs, dtype, use=["D", "z", "delta_bias"], softplus=True, last=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_many_channels_per_group(dtype):
    """More channels than threads in one group: exercises the split of a group over work units."""
    inputs = make_inputs(2, 24, 41, 16, 1, 4, dtype, seed=3)
    compare(inputs, dtype, use=["D", "z", "delta_bias"], softplus=True, last=True)


@pytest.mark.parametrize("grad_names", [("u",), ("u", "z"), ("B",), ("C", "D"), ("delta",), ("delta_bias",)])
def test_partial_gradients(grad_names):
    """Only some inputs require grad: those match the reference, the others stay None."""
    inputs = make_inputs(2, 6, 23, 16, 2, 4, torch.float64)
    use = ["D", "z", "delta_bias"]
    compare(inputs, torch.float64, use=use, softplus=True, last=False, grad_names=list(grad_names))


def test_du_only_skips_other_gradients(monkeypatch):
    """The LRP case: only u requires grad. du equals the reference's, the Function returns None for
    every other input, and the kernel is asked for du only (no states: no delta/A/B/C work)."""
    inputs = make_inputs(2, 6, 23, 16, 1, 4, torch.float32)
    calls = []
    kernel = cpu_mod._bwd_kernel

    def spy(*args):
        calls.append(args[8:15])  # need_du, need_dd, need_dA, need_dB, need_dC, need_y, n_split
        return kernel(*args)

    monkeypatch.setattr(cpu_mod, "_bwd_kernel", spy)
    leaves = {n: v.clone() for n, v in inputs.items()}
    leaves["u"].requires_grad_(True)
    out = selective_scan(*(leaves[n] for n in NAMES), delta_softplus=True, backend="cpu")
    dout = torch.randn_like(out)
    grads = out.grad_fn.apply(dout)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    assert calls == [(True, False, False, False, False, False, calls[0][-1])]
    out.backward(dout)
    for name in NAMES[1:]:
        assert leaves[name].grad is None
    ref_u = inputs["u"].clone().requires_grad_(True)
    ref = selective_scan(ref_u, *(inputs[n] for n in NAMES[1:]), delta_softplus=True, backend="reference")
    ref.backward(dout)
    assert rel_err(leaves["u"].grad, ref_u.grad) <= TOL[torch.float32]


def test_double_backward_is_refused():
    inputs = make_inputs(1, 4, 9, 16, 1, 4, torch.float64)
    u = inputs["u"].requires_grad_(True)
    out = selective_scan(*(inputs[n] for n in NAMES), delta_softplus=True, backend="cpu")
    (du,) = torch.autograd.grad(out.square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        du.sum().backward()


def test_no_grad_inputs_no_graph():
    inputs = make_inputs(1, 4, 9, 16, 1, 4, torch.float32)
    out, state = selective_scan(*(inputs[n] for n in NAMES), return_last_state=True, backend="cpu")
    assert out.grad_fn is None and not state.requires_grad


def test_bfloat16_inputs():
    """bf16 in: computed in float32, out cast back to bf16 and close to the float32 result;
    gradients come back in bf16."""
    inputs = make_inputs(2, 8, 33, 16, 1, 4, torch.bfloat16)
    use = ["D", "z", "delta_bias"]
    out, state, grads = run("cpu", inputs, use=use, softplus=True, last=True, grad_names=list(NAMES))
    as32 = {n: v.float() for n, v in inputs.items()}
    out32, state32, grads32 = run("cpu", as32, use=use, softplus=True, last=True, grad_names=list(NAMES))
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(out, out32) <= 1e-2
    assert rel_err(state, state32) <= 1e-6  # the scan itself runs in float32 on the same values
    for name in NAMES:
        assert grads[name].dtype == torch.bfloat16, name
        assert rel_err(grads[name], grads32[name]) <= 1e-2, name


def test_mixed_dtypes_and_noncontiguous():
    """float32 u with float64 A/D: grads in each input's dtype; transposed (non-contiguous) B, C."""
    inputs = make_inputs(2, 6, 17, 16, 2, 4, torch.float32)
    inputs["A"] = inputs["A"].double()
    inputs["D"] = inputs["D"].double()
    for name in ("B", "C"):
        inputs[name] = inputs[name].transpose(2, 3).contiguous().transpose(2, 3)
        assert not inputs[name].is_contiguous()
    compare(inputs, torch.float32, use=["D", "z"], softplus=True, last=True)


@pytest.mark.parametrize("np_dtype,ulps", [(np.float32, 2.0), (np.float64, 4.0)])
def test_fast_exp_accuracy(np_dtype, ulps):
    """The inline exp, compiled with the kernels' fast-math flags: a few ulp over the normal range,
    IEEE results for the special values (0 / denormals below, inf above, NaN kept)."""
    from numba import njit

    @njit(fastmath=cpu_mod._FASTMATH)
    def vexp(x, out):
        for i in range(x.shape[0]):
            out[i] = cpu_mod._fast_exp(x[i])

    lo, hi = (-87.0, 88.0) if np_dtype == np.float32 else (-708.0, 709.0)
    x = np.concatenate([np.linspace(lo, hi, 200_001), np.linspace(-1, 1, 10_001)]).astype(np_dtype)
    out = np.empty_like(x)
    vexp(x, out)
    ref = np.exp(x.astype(np.float64))
    eps = np.finfo(np_dtype).eps
    assert np.max(np.abs(out - ref) / ref) <= ulps * eps
    special = np.array([-np.inf, np.inf, np.nan, 0.0, -1000.0, 1000.0, -100.0], dtype=np_dtype)
    out = np.empty_like(special)
    vexp(special, out)
    with np.errstate(over="ignore"):
        expected = np.exp(special.astype(np.float64)).astype(np_dtype)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=np.finfo(np_dtype).smallest_subnormal * 2)


def test_user_thread_setting_survives_the_first_scan() -> None:
    """Numba's OpenMP layer shares the OpenMP runtime with torch; its first launch must not undo
    ``torch.set_num_threads`` (checked in a fresh process, where that first launch happens)."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from ssm_models.ops import selective_scan\n"
        "u = torch.randn(1, 4, 8, requires_grad=True)\n"
        "out = selective_scan(u, torch.rand(1, 4, 8), -torch.rand(4, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8),"
        " backend='cpu')\n"
        "out.sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "1"
