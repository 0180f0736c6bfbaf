"""The triton selective scan against the sequential reference (``backend="reference"``).

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set in tests/conftest.py), with a
small chunk length so that several chunks, a ragged last chunk, masked channels and the
multi-sub-block dB/dC reduction are all crossed. Compared: ``out``, ``last_state`` and the
gradients of every input (u, delta, A, B, C, D, z, delta_bias) by relative error
``||x - ref|| / ||ref||``: <= 1e-10 in float64, <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ssm_models.ops import selective_scan_triton as sst  # noqa: E402
from ssm_models.ops.selective_scan import selective_scan  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# chunk 16: L up to 70 crosses 5 chunks; block 2 with 4 channels per program gives dB/dC programs
# with two channel sub-blocks, and masked channels when dim // G is odd.
SMALL = sst.TritonScanConfig(
    chunk_len=16, fwd_block_d=2, fwd_num_warps=1, bwd_block_d=2, bwd_channels_per_program=4, bwd_num_warps=1
)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(sst, "DEFAULT_CONFIG", SMALL)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _inputs(
    batch,
    dim,
    length,
    n_state,
    groups,
    dtype,
    *,
    b3d=False,
    has_d=True,
    has_z=True,
    has_bias=True,
    transposed_bc=False,
    seed=0,
):
    """Random inputs in Mamba's ranges: A < 0, delta around softplus^-1 of small steps."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    u = rnd(batch, dim, length)
    delta = rnd(batch, dim, length, scale=0.5, shift=-1.0)
    A = (-torch.rand(dim, n_state, generator=gen, dtype=torch.float64) * 3 - 0.1).to(dtype)
    if transposed_bc:  # (batch, L, N) produced by a linear layer, seen as (batch, N, L): strided along L
        B = rnd(batch, length, n_state).transpose(1, 2)
        C = rnd(batch, length, n_state).transpose(1, 2)
    elif b3d:
        B = rnd(batch, n_state, length)
        C = rnd(batch, n_state, length)
    else:
        B = rnd(batch, groups, n_state, length)
        C = rnd(batch, groups, n_state, length)
    D = rnd(dim) if has_d else None
    z = rnd(batch, dim, length) if has_z else None
    delta_bias = rnd(dim, scale=0.5) if has_bias else None
    return [u, delta, A, B, C, D, z, delta_bias]


def _run(backend, inputs, grad_mask, dout, **kwargs):
    leaves = [
        None if x is None else x.detach().clone().requires_grad_(bool(m))
        for x, m in zip(inputs, grad_mask, strict=True)
    ]
    result = selective_scan(*leaves, backend=backend, **kwargs)
    out, last = result if kwargs.get("return_last_state") else (result, None)
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out, wanted, dout) if wanted else ()
    grad_iter = iter(grads)
    named = {
        n: (next(grad_iter) if x is not None and x.requires_grad else None)
        for n, x in zip(NAMES, leaves, strict=True)
    }
    return out, last, named


def _compare(inputs, grad_mask, tol, *, delta_softplus, return_last_state, seed=1):
    u = inputs[0]
    dout = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        u.dtype
    )
    kw = dict(delta_softplus=delta_softplus, return_last_state=return_last_state)
    out_t, last_t, grads_t = _run("triton", inputs, grad_mask, dout, **kw)
    out_r, last_r, grads_r = _run("reference", inputs, grad_mask, dout, **kw)
    assert out_t.dtype == out_r.dtype == u.dtype and out_t.shape == out_r.shape
    errors = {"out": _rel(out_t, out_r)}
    if return_last_state:
        assert last_t.dtype == last_r.dtype and last_t.shape == last_r.shape
        assert not last_t.requires_grad
        errors["last_state"] = _rel(last_t, last_r)
    for name, x, wanted in zip(NAMES, inputs, grad_mask, strict=True):
        g_t, g_r = grads_t[name], grads_r[name]
        if x is None or not wanted:
            assert g_t is None
            continue
        assert g_t.shape == x.shape and g_t.dtype == x.dtype, name
        errors["d" + name] = _rel(g_t, g_r)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


ALL = (True,) * 8

# (batch, dim, L, N, G, 3-D B/C, D, z, delta_bias, softplus, return_last_state)
CASES_F64 = [
    pytest.param(2, 4, 37, 16, 1, False, True, True, True, True, True, id="all-options-ragged"),
    pytest.param(1, 8, 70, 1, 2, False, False, False, True, True, False, id="N1-G2-noD-noz"),
    pytest.param(2, 6, 1, 16, 2, False, True, True, False, False, True, id="L1-G2-odd-group"),
    pytest.param(2, 4, 33, 4, 1, True, True, True, False, False, True, id="B3d-no-softplus"),
    pytest.param(1, 6, 48, 16, 2, False, True, False, True, True, True, id="L-multiple-of-chunk"),
    pytest.param(3, 2, 20, 16, 1, True, False, True, False, True, False, id="batch3-no-D"),
]


@pytest.mark.parametrize("batch,dim,length,n_state,groups,b3d,has_d,has_z,has_bias,softplus,last", CASES_F64)
def test_float64_matches_reference(
    batch, dim, length, n_state, groups, b3d, has_d, has_z, has_bias, softplus, last
):
    inputs = _inputs(
        batch,
        dim,
        length,
        n_state,
        groups,
        torch.float64,
        b3d=b3d,
        has_d=has_d,
        has_z=has_z,
        has_bias=has_bias,
    )
    _compare(inputs, ALL, TOL[torch.float64], delta_softplus=softplus, return_last_state=last)


@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,b3d",
    [
        pytest.param(2, 4, 37, 16, 2, False, id="G2-ragged"),
        pytest.param(1, 6, 70, 16, 1, True, id="B3d-long"),
        pytest.param(2, 3, 1, 1, 1, False, id="L1-N1"),
    ],
)
def test_float32_matches_reference(batch, dim, length, n_state, groups, b3d):
    inputs = _inputs(batch, dim, length, n_state, groups, torch.float32, b3d=b3d)
    _compare(inputs, ALL, TOL[torch.float32], delta_softplus=True, return_last_state=True)


def test_softplus_threshold_branches():
    """delta + delta_bias far beyond +-20: the x > 20 branch (softplus = x, derivative 1) and the
    exp(x) ~ 0 tail; float64 must still agree to 1e-10."""
    inputs = _inputs(2, 4, 37, 16, 1, torch.float64)
    gen = torch.Generator().manual_seed(5)
    inputs[1] = torch.randn(inputs[1].shape, generator=gen, dtype=torch.float64) * 25
    pre = inputs[1] + inputs[7][:, None]
    assert (pre > 20).any() and (pre < -20).any()
    inputs[2] = inputs[2] * 0.01  # keep exp(delta * A) away from total underflow
    _compare(inputs, ALL, TOL[torch.float64], delta_softplus=True, return_last_state=True)


def test_strided_B_C_and_default_tiles(monkeypatch):
    """Non-contiguous u, z, B, C (transposed (batch, L, ·) layouts) and the default tile sizes."""
    monkeypatch.setattr(sst, "DEFAULT_CONFIG", sst.TritonScanConfig())
    inputs = _inputs(2, 6, 70, 16, 1, torch.float64, transposed_bc=True)
    inputs[0] = inputs[0].transpose(1, 2).contiguous().transpose(1, 2)  # u strided along L
    inputs[6] = inputs[6].transpose(1, 2).contiguous().transpose(1, 2)  # z too
    assert not inputs[3].is_contiguous() and inputs[0].stride(2) != 1
    _compare(inputs, ALL, TOL[torch.float64], delta_softplus=True, return_last_state=True)


def test_du_only_skips_states(monkeypatch):
    """The LRP case: only u needs a gradient (delta, A, B, C, D, z detached); no checkpoints."""
    seen = {}
    forward = sst._forward

    def spy(*args):
        seen["save_ckpt"] = args[9]
        return forward(*args)

    monkeypatch.setattr(sst, "_forward", spy)
    inputs = _inputs(2, 6, 45, 16, 2, torch.float64)
    mask = (True,) + (False,) * 7
    _compare(inputs, mask, TOL[torch.float64], delta_softplus=True, return_last_state=False)
    assert seen["save_ckpt"] is False


def test_du_only_minimal_arguments():
    """du only, with D, z and delta_bias left None."""
    inputs = _inputs(2, 4, 40, 16, 1, torch.float64, has_d=False, has_z=False, has_bias=False)
    _compare(
        inputs, (True,) + (False,) * 7, TOL[torch.float64], delta_softplus=False, return_last_state=False
    )


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param((False, True, False, False, False, False, False, False), id="delta-only"),
        pytest.param((False, False, False, True, True, False, False, False), id="B-and-C"),
        pytest.param((False, False, True, False, False, True, True, True), id="A-D-z-bias"),
    ],
)
def test_partial_gradients(mask):
    inputs = _inputs(2, 6, 35, 16, 2, torch.float64)
    _compare(inputs, mask, TOL[torch.float64], delta_softplus=True, return_last_state=True)


def test_bfloat16_inputs():
    """bf16 u, delta, z, B, C (A, D, delta_bias in float32): the scan runs in float32."""
    inputs = _inputs(2, 4, 37, 16, 2, torch.float32)
    for i in (0, 1, 3, 4, 6):
        inputs[i] = inputs[i].to(torch.bfloat16)
    errors = _compare(inputs, ALL, 2e-2, delta_softplus=True, return_last_state=True)
    # out and the u/delta/z/B/C gradients are rounded to bf16 by both backends; the last state and
    # the float32 parameter gradients are not
    for name in ("last_state", "dA", "dD", "ddelta_bias"):
        assert errors[name] <= 1e-5, (name, errors)


def test_no_grad_saves_nothing(monkeypatch):
    seen = {}
    forward = sst._forward

    def spy(*args):
        seen["save_ckpt"] = args[9]
        return forward(*args)

    monkeypatch.setattr(sst, "_forward", spy)
    inputs = [None if x is None else x.requires_grad_() for x in _inputs(1, 4, 20, 4, 1, torch.float64)]
    with torch.no_grad():
        out, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True, backend="triton")
    assert seen["save_ckpt"] is False
    assert not out.requires_grad and not last.requires_grad
    ref = selective_scan(*inputs, delta_softplus=True, backend="reference")
    assert _rel(out, ref) <= TOL[torch.float64]


def test_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(sst, "_interpreter_enabled", lambda: False)
    inputs = _inputs(1, 2, 4, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        selective_scan(*inputs, backend="triton")


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        sst.TritonScanConfig(chunk_len=48)
    with pytest.raises(ValueError, match="multiple"):
        sst.TritonScanConfig(bwd_block_d=4, bwd_channels_per_program=6)
