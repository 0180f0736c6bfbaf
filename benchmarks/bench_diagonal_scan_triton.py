"""GPU benchmark of the ``"triton"`` diagonal scan (H3's diagonal SSM): correctness on CUDA, then throughput.

1. **Correctness** (float32 and bfloat16 ``u``; A, C, D, initial_state in float32 as H3 keeps them; H3's
   bilinear S4D-Lin parameters, REFERENCE.md 4). Every path runs on the same (rounded) inputs; the ground
   truth is the reference loop in float64. Reported: ``||x - x64|| / ||x64||`` of ``y``, the last state and
   the gradients of all five inputs, for the triton kernels, the reference loop run in the input dtype
   (for scale) and, for ``y``, the FFT path (``fft_causal_conv(u, diagonal_ssm_kernel(A, C, L), D)``).
   PASS when the triton error is at most ``max(tol, 4 * reference error)``, tol 1e-5 (fp32), 1e-2 (bf16).
2. **Throughput** at batch 8, H 768, M 32, L 2048 (H3-125M's diagonal SSM), fp32 and bf16 ``u``:

   * ``forward (no grad)``: inference; no checkpoints are written.
   * ``forward (saving checkpoints)``: A and C require grad, so the chunk-start states are written.
   * ``backward (all gradients)``: ``torch.autograd.grad`` of u, A, C, D, initial_state and from the last state.
   * ``backward (du only)``: only ``u`` requires grad (the LRP case; one reverse pass, no states).
   * ``fft path forward (no grad)`` / ``fft path backward (all gradients)``: the same map computed as
     H3 does, ``diagonal_ssm_kernel`` + ``fft_causal_conv``, for comparison.

   Time is the median of ``--repeats`` timings (wall clock around a synchronised call) after warm-up.
   "GB/s" counts the compulsory traffic of the scan (u read, y written, dy read and du written, the
   checkpoints written/read once; parameters are negligible).
3. ``--sweep`` (optional): the four scan passes in fp32 for a list of tile configurations
   (:class:`ssm_models.ops.diagonal_scan_triton.DiagonalScanTritonConfig`).

Markdown tables go to stdout. Exit status 1 when a correctness check fails, 2 when no CUDA device is
present. ``--dry-run`` runs the same code paths on CPU through Triton's interpreter with tiny shapes (a
check of this script, not a measurement).

Usage::

    python benchmarks/bench_diagonal_scan_triton.py [--repeats 20] [--sweep]
    python benchmarks/bench_diagonal_scan_triton.py --dry-run      # no GPU needed
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import device_timer  # noqa: E402

NAMES = ("u", "A", "C", "D", "initial_state")
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
CASES = (
    "forward (no grad)",
    "forward (saving checkpoints)",
    "backward (all gradients)",
    "backward (du only)",
    "fft path forward (no grad)",
    "fft path backward (all gradients)",
)
SWEEP = [
    dict(chunk_len=32, fwd_block_h=1, fwd_num_warps=4, bwd_block_h=1, bwd_num_warps=4),
    dict(chunk_len=32, fwd_block_h=1, fwd_num_warps=2, bwd_block_h=1, bwd_num_warps=2),
    dict(chunk_len=32, fwd_block_h=2, fwd_num_warps=8, bwd_block_h=1, bwd_num_warps=8),
    dict(chunk_len=16, fwd_block_h=2, fwd_num_warps=4, bwd_block_h=2, bwd_num_warps=4),
    dict(chunk_len=16, fwd_block_h=1, fwd_num_warps=2, bwd_block_h=1, bwd_num_warps=2),
    dict(chunk_len=64, fwd_block_h=1, fwd_num_warps=8, bwd_block_h=1, bwd_num_warps=8),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per case (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--modes", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--sweep", action="store_true", help="also time a list of tile configurations")
    parser.add_argument("--skip-correctness", action="store_true")
    return parser.parse_args(argv)


def make_inputs(torch, batch, channels, modes, length, dtype, device, seed=0):
    """H3's diagonal SSM (bilinear S4D-Lin: A_n = -0.5 + i pi n, dt ~ logU(1e-3, 1e-1), C ~ CN(0, 1),
    c = 2 C dt / (1 - dt A / 2)), standard normal u, D and initial state. u in ``dtype``, the rest float32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = torch.arange(modes, dtype=torch.float64)
    A_cont = torch.complex(torch.full((channels, modes), -0.5, dtype=torch.float64), math.pi * n.expand(channels, -1))
    dt = (math.log(1e-3) + torch.rand(channels, 1, generator=gen, dtype=torch.float64) * math.log(100.0)).exp()
    C = torch.complex(*torch.randn(2, channels, modes, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    A = torch.view_as_real((1 + dt * A_cont / 2) / (1 - dt * A_cont / 2))
    C = torch.view_as_real(2 * C * dt / (1 - dt * A_cont / 2))
    u = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)
    D = torch.randn(channels, generator=gen, dtype=torch.float64)
    init = torch.randn(batch, channels, modes, 2, generator=gen, dtype=torch.float64)
    return [u.to(device=device, dtype=dtype)] + [t.to(device=device, dtype=torch.float32) for t in (A, C, D, init)]


def traffic_bytes(case, batch, channels, modes, length, elem, chunk_len):
    """Compulsory bytes of one pass of the scan."""
    bhl = batch * channels * length * elem
    ckpt = batch * channels * (-(-length // chunk_len)) * modes * 2 * 4
    return {
        "forward (no grad)": 2 * bhl,
        "forward (saving checkpoints)": 2 * bhl + ckpt,
        "backward (all gradients)": 3 * bhl + ckpt,
        "backward (du only)": 2 * bhl,
    }.get(case)


def make_case(torch, ops, case, inputs, dy):
    """A zero-argument callable running one pass of ``case``."""
    diagonal_scan, diagonal_ssm_kernel, fft_causal_conv = ops
    length = inputs[0].shape[-1]

    def fft_path(u, A, C, D, init):
        del init  # the convolution starts from the zero state
        return fft_causal_conv(u, diagonal_ssm_kernel(A, C, length), D)

    if case == "forward (no grad)":

        def run():
            with torch.no_grad():
                diagonal_scan(*inputs, backend="triton")

        return run
    if case == "fft path forward (no grad)":

        def run_fft():
            with torch.no_grad():
                fft_path(*inputs)

        return run_fft
    if case == "forward (saving checkpoints)":
        leaves = [x.detach().requires_grad_(i in (1, 2)) for i, x in enumerate(inputs)]
        return lambda: diagonal_scan(*leaves, backend="triton")
    if case in ("backward (all gradients)", "fft path backward (all gradients)"):
        leaves = [x.detach().requires_grad_() for x in inputs]
        if case.startswith("fft"):
            leaves = leaves[:4] + [None]
            out = fft_path(*leaves)
        else:
            out = diagonal_scan(*leaves, backend="triton")
        wanted = [x for x in leaves if x is not None]
        return lambda: torch.autograd.grad(out, wanted, dy, retain_graph=True)
    if case == "backward (du only)":
        leaves = [x.detach().requires_grad_(i == 0) for i, x in enumerate(inputs)]
        out = diagonal_scan(*leaves, backend="triton")
        return lambda: torch.autograd.grad(out, [leaves[0]], dy, retain_graph=True)
    raise ValueError(case)


def run_correctness(torch, ops, device, shapes) -> bool:
    diagonal_scan, diagonal_ssm_kernel, fft_causal_conv = ops
    print("## Correctness (relative error to the float64 reference loop on the same inputs)\n")
    print("| shape (batch, H, M, L) | dtype | tensor | triton | reference in dtype | fft path | status |")
    print("|---|---|---|---|---|---|---|")
    all_ok = True
    for batch, channels, modes, length in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).removeprefix("torch.")
            inputs = make_inputs(torch, batch, channels, modes, length, dtype, device, seed=1)
            gen = torch.Generator(device="cpu").manual_seed(2)
            dy = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            dlast = torch.randn(batch, channels, modes, 2, generator=gen, dtype=torch.float64).to(device)

            def run(backend, cast, inputs=inputs, dy=dy, dlast=dlast):
                leaves = [(x.to(cast) if cast is not None else x).detach().requires_grad_() for x in inputs]
                y, last = diagonal_scan(*leaves, return_last_state=True, backend=backend)
                grads = torch.autograd.grad((y, last), leaves, (dy.to(y.dtype), dlast.to(last.dtype)))
                return {"y": y, "last_state": last, **{"d" + n: g for n, g in zip(NAMES, grads, strict=True)}}

            exact = run("reference", torch.float64)
            tri = run("triton", None)
            ref = run("reference", None)
            with torch.no_grad():
                u, A, C, D, _ = inputs
                fft_y = fft_causal_conv(u, diagonal_ssm_kernel(A, C, length), D)
                zero_state_y = diagonal_scan(*[t.double() for t in inputs[:4]], backend="reference")
            for key, x64 in exact.items():
                norm = x64.norm().clamp_min(1e-300)
                err_t = ((tri[key].double() - x64).norm() / norm).item()
                err_r = ((ref[key].double() - x64).norm() / norm).item()
                err_f = "-"
                if key == "y":  # the convolution has no initial state: compare with the zero-state scan
                    err_f = f"{((fft_y.double() - zero_state_y).norm() / zero_state_y.norm()).item():.2e}"
                ok = err_t <= max(TOLERANCE[dname], 4 * err_r)
                all_ok &= ok
                print(
                    f"| ({batch}, {channels}, {modes}, {length}) | {dname} | {key} | {err_t:.2e} | {err_r:.2e} | "
                    f"{err_f} | {'PASS' if ok else 'FAIL'} |"
                )
    print()
    return all_ok


def run_throughput(torch, ops, dst, device, args, measure):
    batch, channels, modes, length = args.batch, args.channels, args.modes, args.length
    chunk_len = dst.DEFAULT_CONFIG.chunk_len
    print(f"## Throughput (batch {batch}, H {channels}, M {modes}, L {length})\n")
    print(f"Configuration: `{dst.DEFAULT_CONFIG}`\n")
    print("| pass | input dtype | time (ms) | Melem/s (batch*H*L) | GB/s (compulsory) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(torch, batch, channels, modes, length, dtype, device)
        dy = torch.randn(batch, channels, length, device=device, dtype=dtype)
        elem = torch.finfo(dtype).bits // 8
        for case in CASES:
            fn = make_case(torch, ops, case, inputs, dy)
            seconds = measure(fn, args.warmup, args.repeats)
            nbytes = traffic_bytes(case, batch, channels, modes, length, elem, chunk_len)
            gbs = f"{nbytes / seconds / 1e9:.0f}" if nbytes is not None else "-"
            print(
                f"| {case} | {str(dtype).removeprefix('torch.')} | {seconds * 1e3:.3f} | "
                f"{batch * channels * length / seconds / 1e6:.1f} | {gbs} |"
            )
            del fn
        del inputs, dy
    print()


def run_sweep(torch, ops, dst, device, args, measure, configs):
    batch, channels, modes, length = args.batch, args.channels, args.modes, args.length
    cases = CASES[:4]
    print(f"## Tile sweep (float32, batch {batch}, H {channels}, M {modes}, L {length}; times in ms)\n")
    print("| T | fwd BH/warps | bwd BH/warps | " + " | ".join(cases) + " |")
    print("|---|---|---|" + "---|" * len(cases))
    inputs = make_inputs(torch, batch, channels, modes, length, torch.float32, device)
    dy = torch.randn(batch, channels, length, device=device)
    default = dst.DEFAULT_CONFIG
    try:
        for params in configs:
            cfg = dst.DiagonalScanTritonConfig(**params)
            dst.DEFAULT_CONFIG = cfg
            cells = []
            for case in cases:
                try:
                    cells.append(
                        f"{measure(make_case(torch, ops, case, inputs, dy), args.warmup, args.repeats) * 1e3:.3f}"
                    )
                except Exception as exc:  # a configuration that does not compile is reported, not fatal
                    cells.append(f"failed: {type(exc).__name__}")
            print(
                f"| {cfg.chunk_len} | {cfg.fwd_block_h}/{cfg.fwd_num_warps} | {cfg.bwd_block_h}/{cfg.bwd_num_warps} | "
                + " | ".join(cells)
                + " |"
            )
    finally:
        dst.DEFAULT_CONFIG = default
    print()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_diagonal_scan_triton: no CUDA device is available; this benchmark needs a GPU. "
            "(Run with --dry-run to check the script on CPU through the Triton interpreter.)",
            file=sys.stderr,
        )
        return 2
    try:
        import triton
    except ImportError:
        print("bench_diagonal_scan_triton: triton is not installed", file=sys.stderr)
        return 2

    from ssm_models.ops import diagonal_scan, diagonal_ssm_kernel, fft_causal_conv
    from ssm_models.ops import diagonal_scan_triton as dst

    ops = (diagonal_scan, diagonal_ssm_kernel, fft_causal_conv)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.batch, args.channels, args.modes, args.length = 1, 3, 4, 40
        args.repeats, args.warmup = 1, 0
        dst.DEFAULT_CONFIG = dst.DiagonalScanTritonConfig(chunk_len=16, fwd_block_h=2, bwd_block_h=2)
        correctness_shapes = [(1, 3, 3, 37)]
        sweep = [dict(chunk_len=16, fwd_block_h=1, bwd_block_h=1)]
    else:
        correctness_shapes = [(2, 64, 32, 1000), (1, 16, 7, 300)]
        sweep = SWEEP

    measure = device_timer(device)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, dry run)"
    print("# Triton diagonal scan benchmark\n")
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}\n")
    ok = True
    if not args.skip_correctness:
        ok = run_correctness(torch, ops, device, correctness_shapes)
    run_throughput(torch, ops, dst, device, args, measure)
    if args.sweep:
        run_sweep(torch, ops, dst, device, args, measure, sweep)
    if not ok:
        print("correctness: FAILED (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
