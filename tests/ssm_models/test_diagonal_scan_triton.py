"""The triton diagonal scan against the sequential reference (``backend="reference"``).

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set in tests/conftest.py) with a chunk
length of 16 and four channels per program (one and two in one test each), so that L = 37 crosses three
chunks (the last one ragged), H = 3 leaves a masked channel and M = 3 a masked mode. Compared: ``y``,
the last state and the gradients of every input (u, A, C, D, initial_state) under cotangents of both ``y``
and the last state.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ssm_models.ops import diagonal_scan_triton as dst  # noqa: E402
from ssm_models.ops.diagonal_scan import diagonal_scan  # noqa: E402
from tests.helpers import relative_error  # noqa: E402
from tests.ssm_models.test_diagonal_scan import NAMES, make_inputs, run  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
SMALL = dst.DiagonalScanTritonConfig(chunk_len=16, fwd_block_h=4, fwd_num_warps=1, bwd_block_h=4, bwd_num_warps=1)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dst, "DEFAULT_CONFIG", SMALL)


def compare(x: dict, grad_names=NAMES, use=NAMES) -> dict[str, float]:
    ref = run("reference", x, grad_names, use=use)
    got = run("triton", x, grad_names, use=use)
    assert got[0].dtype == ref[0].dtype == x["u"].dtype and got[0].shape == ref[0].shape
    assert got[1].dtype == ref[1].dtype and got[1].shape == ref[1].shape
    errors = {"y": relative_error(got[0], ref[0]), "last_state": relative_error(got[1], ref[1])}
    for name in got[2]:
        assert got[2][name].dtype == x[name].dtype and got[2][name].shape == x[name].shape, name
        errors["d" + name] = relative_error(got[2][name], ref[2][name])
    return errors


@pytest.mark.parametrize("dtype, modes", [(torch.float64, 4), (torch.float32, 3)])
def test_matches_reference_all_gradients(dtype: torch.dtype, modes: int) -> None:
    errors = compare(make_inputs(batch=2, channels=3, modes=modes, length=37, dtype=dtype))
    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all: {errors})"


@pytest.mark.parametrize("block_h", [1, 2])
def test_several_channel_blocks(monkeypatch: pytest.MonkeyPatch, block_h: int) -> None:
    """Programs of one and two channels (three and two channel blocks for H = 3)."""
    cfg = dst.DiagonalScanTritonConfig(chunk_len=16, fwd_block_h=block_h, bwd_block_h=block_h)
    monkeypatch.setattr(dst, "DEFAULT_CONFIG", cfg)
    errors = compare(make_inputs(batch=1, channels=3, modes=3, length=37, seed=6))
    assert max(errors.values()) <= TOL[torch.float64], errors


def test_without_d_and_initial_state() -> None:
    x = make_inputs(batch=1, channels=2, modes=2, length=16)  # L = one full chunk
    errors = compare(x, grad_names=("u", "A", "C"), use=("u", "A", "C"))
    assert max(errors.values()) <= TOL[torch.float64], errors


def test_length_one() -> None:
    errors = compare(make_inputs(batch=2, channels=3, modes=4, length=1))
    assert max(errors.values()) <= TOL[torch.float64], errors


def test_bfloat16_inputs() -> None:
    """bf16 u (parameters float32): the scan runs in float32; y and du are rounded to bf16 (by truncation
    in Triton's interpreter, to nearest on GPUs), the float32 state and parameter gradients are not."""
    errors = compare(make_inputs(batch=1, channels=3, modes=4, length=37, dtype=torch.bfloat16))
    assert errors["y"] <= 1e-2 and errors["du"] <= 1e-2, errors
    for name in ("last_state", "dA", "dC", "dD", "dinitial_state"):
        assert errors[name] <= 1e-5, (name, errors)


@pytest.mark.parametrize("grad_names", [("u",), ("A",), ("C",), ("D", "initial_state")])
def test_gradient_subsets(grad_names: tuple[str, ...]) -> None:
    errors = compare(make_inputs(batch=1, channels=3, modes=3, length=37, seed=2), grad_names=grad_names)
    assert max(errors.values()) <= TOL[torch.float64], errors


def test_du_only_path_saves_no_states_and_equals_full_du(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    forward = dst._forward

    def spy(*args):
        seen.append(args[5])  # save_ckpt
        return forward(*args)

    monkeypatch.setattr(dst, "_forward", spy)
    x = make_inputs(batch=1, channels=3, modes=4, length=37, seed=3)
    dy = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = x["u"].clone().requires_grad_()
    (du_only,) = torch.autograd.grad(diagonal_scan(u, x["A"], x["C"], x["D"], backend="triton"), u, dy)
    leaves = [x[n].clone().requires_grad_() for n in ("u", "A", "C", "D")]
    du_full = torch.autograd.grad(diagonal_scan(*leaves, backend="triton"), leaves, dy)[0]
    assert seen == [False, True]
    assert relative_error(du_only, du_full) <= 1e-14


def test_no_grad_saves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    forward = dst._forward
    monkeypatch.setattr(dst, "_forward", lambda *args: seen.append(args[5]) or forward(*args))
    x = make_inputs(batch=1, channels=2, modes=2, length=20)
    A = x["A"].clone().requires_grad_()
    with torch.no_grad():
        y, last = diagonal_scan(x["u"], A, x["C"], return_last_state=True, backend="triton")
    assert seen == [False] and not y.requires_grad and not last.requires_grad
    assert relative_error(y, diagonal_scan(x["u"], x["A"], x["C"], backend="reference")) <= TOL[torch.float64]


def test_chaining_and_broadcast_cotangent() -> None:
    """Two chained scans equal one, with gradients through the carried state; ``y.sum()`` gives a
    cotangent with stride 0 along every axis."""
    x = make_inputs(batch=1, channels=3, modes=3, length=37, seed=5)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]
    y_full = diagonal_scan(*leaves, backend="reference")
    grads_full = torch.autograd.grad(y_full.sum(), leaves)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]
    u, A, C, D, init = leaves
    y1, s1 = diagonal_scan(u[..., :20], A, C, D, init, return_last_state=True, backend="triton")
    y2 = diagonal_scan(u[..., 20:], A, C, D, s1, backend="triton")
    y = torch.cat((y1, y2), dim=-1)
    assert relative_error(y, y_full) <= 1e-13
    for name, grad, grad_full in zip(NAMES, torch.autograd.grad(y.sum(), leaves), grads_full, strict=True):
        assert relative_error(grad, grad_full) <= 1e-12, name


def test_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dst, "_interpreter_enabled", lambda: False)
    x = make_inputs(batch=1, channels=1, modes=1, length=4)
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        diagonal_scan(x["u"], x["A"], x["C"], backend="triton")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="`chunk_len` must be a power of two"):
        dst.DiagonalScanTritonConfig(chunk_len=48)
    with pytest.raises(ValueError, match="`bwd_block_h`"):
        dst.DiagonalScanTritonConfig(bwd_block_h=0)
