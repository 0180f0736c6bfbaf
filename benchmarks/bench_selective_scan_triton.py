"""GPU benchmark of the ``"triton"`` selective scan: correctness on CUDA, then throughput.

1. **Correctness** (fp32 and bf16 inputs; u, delta, z, B, C in the input dtype, A, D, delta_bias in
   float32 as Mamba keeps them). Every backend runs on the *same* (rounded) inputs; the ground truth
   is the reference loop in float64. Reported: ``||x - x64|| / ||x64||`` of ``out``, ``last_state``
   and the gradients of all eight inputs, for the triton kernels and, for scale, for the
   reference loop run in the input dtype. PASS when the triton error is at most
   ``max(tol, 4 * reference error)`` with tol 1e-5 (fp32) and 1e-2 (bf16).
2. **Throughput** at batch 8, dim 3072, N 16, L 4096, G 1 (3-D B/C, as Mamba-1), D, z,
   delta_bias and delta_softplus as Mamba calls the scan, fp32 and bf16 inputs:

   * ``forward (no grad)``: inference; no state checkpoints are written.
   * ``forward (saving checkpoints)``: delta, A, B, C, D, z, delta_bias require grad, so the
     chunk-boundary states (batch, dim, L/T, N) are written for the backward.
   * ``backward (all gradients)``: ``torch.autograd.grad`` of all eight inputs (includes the
     torch sums of the dB/dC/dA/dD partials).
   * ``backward (du only)``: only ``u`` requires grad (the MambaLRP case).

   Time is the median of ``--repeats`` CUDA-event timings after warm-up. "GB/s" counts the
   compulsory traffic only (each input read once, each output written once, the checkpoints
   written/read once; the dB/dC partials are overhead and not counted), and is also given as a
   share of a measured device-to-device copy (``dst.copy_(src)`` of 1 GiB, read + write bytes).
3. ``--sweep`` (optional): the four passes in fp32 for a list of tile configurations
   (:class:`ssm_models.ops.selective_scan_triton.TritonScanConfig`).

Markdown tables go to stdout. Exit status 1 when a correctness check fails, 2 when no CUDA device
is present. ``--dry-run`` runs the same code paths on CPU through Triton's interpreter with tiny
shapes (a check of this script, not a measurement).

Usage::

    python benchmarks/bench_selective_scan_triton.py [--repeats 20] [--sweep]
    python benchmarks/bench_selective_scan_triton.py --dry-run      # no GPU needed
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import device_timer  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per case (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--nstate", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true", help="also time a list of tile configurations")
    parser.add_argument("--skip-correctness", action="store_true")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# inputs, timing, traffic


def make_inputs(torch, batch, dim, length, n_state, groups, dtype, device, *, three_d=False, seed=0):
    """Mamba-like inputs: A = -(1..N) with noise, delta pre-activation around softplus^-1(0.01..0.1),
    B, C standard normal; u, delta, z, B, C in ``dtype``, A, D, delta_bias in float32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    bc_shape = (batch, n_state, length) if three_d else (batch, groups, n_state, length)
    tensors = [
        rnd(batch, dim, length),
        rnd(batch, dim, length, scale=0.5, shift=-3.5),
        -(
            torch.arange(1, n_state + 1, dtype=torch.float64).repeat(dim, 1) * (1 + 0.1 * rnd(dim, n_state))
        ).abs(),
        rnd(*bc_shape),
        rnd(*bc_shape),
        rnd(dim, scale=0.5, shift=1.0),
        rnd(batch, dim, length),
        rnd(dim, scale=0.5),
    ]
    low = {0, 1, 3, 4, 6}  # in the input dtype; the rest stay float32
    return [t.to(device=device, dtype=dtype if i in low else torch.float32) for i, t in enumerate(tensors)]


def copy_bandwidth(torch, device, measure, nbytes, repeats):
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), 3, max(repeats, 5))
    return 2 * nbytes / seconds


def traffic_bytes(case, batch, dim, length, n_state, groups, elem, chunk_len):
    """Compulsory bytes moved by one pass (inputs read once, outputs written once)."""
    bdl = batch * dim * length * elem
    bgnl = batch * groups * n_state * length * elem
    ckpt = batch * dim * (-(-length // chunk_len)) * n_state * 4
    params = dim * (n_state + 2) * 4
    if case == "forward (no grad)":
        return 3 * bdl + 2 * bgnl + bdl + params
    if case == "forward (saving checkpoints)":
        return 3 * bdl + 2 * bgnl + bdl + ckpt + params
    if case == "backward (all gradients)":
        return 4 * bdl + 2 * bgnl + ckpt + params + 3 * bdl + 2 * bgnl + params
    if case == "backward (du only)":
        return 3 * bdl + 2 * bgnl + params + bdl
    raise ValueError(case)


CASES = (
    "forward (no grad)",
    "forward (saving checkpoints)",
    "backward (all gradients)",
    "backward (du only)",
)


def make_case(torch, selective_scan, case, inputs, dout):
    """A zero-argument callable running one pass of ``case`` with the triton backend."""
    kw = dict(delta_softplus=True, backend="triton")
    if case == "forward (no grad)":

        def run():
            with torch.no_grad():
                selective_scan(*inputs, **kw)

        return run
    if case == "forward (saving checkpoints)":
        leaves = [x.detach().requires_grad_(i != 0) for i, x in enumerate(inputs)]
        return lambda: selective_scan(*leaves, **kw)
    if case == "backward (all gradients)":
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = selective_scan(*leaves, **kw)
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    if case == "backward (du only)":
        leaves = [x.detach().requires_grad_(i == 0) for i, x in enumerate(inputs)]
        out = selective_scan(*leaves, **kw)
        return lambda: torch.autograd.grad(out, [leaves[0]], dout, retain_graph=True)
    raise ValueError(case)


# ----------------------------------------------------------------------------------------------
# sections


def run_correctness(torch, selective_scan, device, shapes, dry_run) -> bool:
    print("## Correctness (relative error to the float64 reference loop on the same inputs)\n")
    print("| shape (batch, dim, N, L, G) | dtype | tensor | triton | reference in dtype | status |")
    print("|---|---|---|---|---|---|")
    all_ok = True
    for batch, dim, n_state, length, groups, three_d in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).removeprefix("torch.")
            inputs = make_inputs(
                torch, batch, dim, length, n_state, groups, dtype, device, three_d=three_d, seed=1
            )
            gen = torch.Generator(device="cpu").manual_seed(2)
            # rounded to the input dtype once, so that every run sees the same output gradient
            dout = torch.randn(batch, dim, length, generator=gen, dtype=torch.float64).to(
                device=device, dtype=dtype
            )

            def run(backend, cast, inputs=inputs, dout=dout):
                leaves = [(x.to(cast) if cast is not None else x).detach().requires_grad_() for x in inputs]
                out, last = selective_scan(
                    *leaves, delta_softplus=True, return_last_state=True, backend=backend
                )
                grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
                return {
                    "out": out,
                    "last_state": last,
                    **{"d" + n: g for n, g in zip(NAMES, grads, strict=True)},
                }

            exact = run("reference", torch.float64)
            tri = run("triton", None)
            ref = run("reference", None)
            for key, x64 in exact.items():
                norm = x64.norm().clamp_min(1e-300)
                err_t = ((tri[key].double() - x64).norm() / norm).item()
                err_r = ((ref[key].double() - x64).norm() / norm).item()
                ok = err_t <= max(TOLERANCE[dname], 4 * err_r)
                all_ok &= ok
                shape = f"({batch}, {dim}, {n_state}, {length}, {groups}{', 3-D B/C' if three_d else ''})"
                print(
                    f"| {shape} | {dname} | {key} | {err_t:.2e} | {err_r:.2e} | {'PASS' if ok else 'FAIL'} |"
                )
            del exact, tri, ref
    print()
    return all_ok


def run_throughput(torch, selective_scan, sst, device, args, measure, copy_bw):
    batch, dim, n_state, length = args.batch, args.dim, args.nstate, args.length
    chunk_len = sst.DEFAULT_CONFIG.chunk_len
    print(f"## Throughput (batch {batch}, dim {dim}, N {n_state}, L {length}, G 1)\n")
    print(f"Configuration: `{sst.DEFAULT_CONFIG}`\n")
    print(f"Device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s\n")
    print("| pass | input dtype | time (ms) | Gelem/s (batch*dim*L) | GB/s (compulsory) | % of copy BW |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(torch, batch, dim, length, n_state, 1, dtype, device, three_d=True)
        dout = torch.randn(batch, dim, length, device=device, dtype=dtype)
        elem = torch.finfo(dtype).bits // 8
        for case in CASES:
            fn = make_case(torch, selective_scan, case, inputs, dout)
            seconds = measure(fn, args.warmup, args.repeats)
            nbytes = traffic_bytes(case, batch, dim, length, n_state, 1, elem, chunk_len)
            gbs = nbytes / seconds
            print(
                f"| {case} | {str(dtype).removeprefix('torch.')} | {seconds * 1e3:.3f} | "
                f"{batch * dim * length / seconds / 1e9:.2f} | {gbs / 1e9:.0f} | {100 * gbs / copy_bw:.1f} |"
            )
            del fn
        del inputs, dout
        if device == "cuda":
            torch.cuda.empty_cache()
    print()


SWEEP = [
    dict(
        chunk_len=64,
        fwd_block_d=2,
        fwd_num_warps=4,
        bwd_block_d=2,
        bwd_channels_per_program=32,
        bwd_num_warps=4,
    ),
    dict(
        chunk_len=64,
        fwd_block_d=2,
        fwd_num_warps=4,
        bwd_block_d=2,
        bwd_channels_per_program=64,
        bwd_num_warps=4,
    ),
    dict(
        chunk_len=64,
        fwd_block_d=4,
        fwd_num_warps=8,
        bwd_block_d=4,
        bwd_channels_per_program=32,
        bwd_num_warps=8,
    ),
    dict(
        chunk_len=64,
        fwd_block_d=1,
        fwd_num_warps=4,
        bwd_block_d=1,
        bwd_channels_per_program=32,
        bwd_num_warps=4,
    ),
    dict(
        chunk_len=32,
        fwd_block_d=4,
        fwd_num_warps=4,
        bwd_block_d=4,
        bwd_channels_per_program=32,
        bwd_num_warps=4,
    ),
    dict(
        chunk_len=32,
        fwd_block_d=2,
        fwd_num_warps=2,
        bwd_block_d=2,
        bwd_channels_per_program=32,
        bwd_num_warps=2,
    ),
    dict(
        chunk_len=128,
        fwd_block_d=2,
        fwd_num_warps=8,
        bwd_block_d=2,
        bwd_channels_per_program=32,
        bwd_num_warps=8,
    ),
    dict(
        chunk_len=128,
        fwd_block_d=1,
        fwd_num_warps=4,
        bwd_block_d=1,
        bwd_channels_per_program=64,
        bwd_num_warps=4,
    ),
]


def run_sweep(torch, selective_scan, sst, device, args, measure, configs):
    batch, dim, n_state, length = args.batch, args.dim, args.nstate, args.length
    print(f"## Tile sweep (float32, batch {batch}, dim {dim}, N {n_state}, L {length}; times in ms)\n")
    print("| T | fwd BD/warps | bwd BD/ch-per-prog/warps | " + " | ".join(CASES) + " |")
    print("|---|---|---|" + "---|" * len(CASES))
    inputs = make_inputs(torch, batch, dim, length, n_state, 1, torch.float32, device, three_d=True)
    dout = torch.randn(batch, dim, length, device=device)
    default = sst.DEFAULT_CONFIG
    try:
        for params in configs:
            cfg = sst.TritonScanConfig(**params)
            sst.DEFAULT_CONFIG = cfg
            cells = []
            for case in CASES:
                try:
                    fn = make_case(torch, selective_scan, case, inputs, dout)
                    cells.append(f"{measure(fn, args.warmup, args.repeats) * 1e3:.3f}")
                    del fn
                except Exception as exc:  # a configuration that does not compile is reported, not fatal
                    cells.append(f"failed: {type(exc).__name__}")
            print(
                f"| {cfg.chunk_len} | {cfg.fwd_block_d}/{cfg.fwd_num_warps} | "
                f"{cfg.bwd_block_d}/{cfg.bwd_channels_per_program}/{cfg.bwd_num_warps} | "
                + " | ".join(cells)
                + " |"
            )
    finally:
        sst.DEFAULT_CONFIG = default
    print()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_selective_scan_triton: no CUDA device is available; this benchmark needs a GPU. "
            "(Run with --dry-run to check the script on CPU through the Triton interpreter.)",
            file=sys.stderr,
        )
        return 2
    try:
        import triton
    except ImportError:
        print("bench_selective_scan_triton: triton is not installed", file=sys.stderr)
        return 2

    from ssm_models.ops import selective_scan_triton as sst
    from ssm_models.ops.selective_scan import selective_scan

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.batch, args.dim, args.nstate, args.length = 2, 4, 4, 40
        args.repeats, args.warmup = 1, 0
        sst.DEFAULT_CONFIG = sst.TritonScanConfig(
            chunk_len=16,
            fwd_block_d=2,
            bwd_block_d=2,
            bwd_channels_per_program=4,
            fwd_num_warps=1,
            bwd_num_warps=1,
        )
        correctness_shapes = [(1, 4, 4, 37, 1, True), (1, 4, 4, 20, 2, False)]
        copy_nbytes = 1 << 24
        sweep = [dict(chunk_len=16, fwd_block_d=1, bwd_block_d=1, bwd_channels_per_program=2)]
    else:
        correctness_shapes = [(2, 256, 16, 1000, 1, True), (1, 128, 16, 300, 4, False)]
        copy_nbytes = 1 << 30
        sweep = SWEEP

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, dry run)"
    print("# Triton selective scan benchmark\n")
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}\n")
    measure = device_timer(device)
    ok = True
    if not args.skip_correctness:
        ok = run_correctness(torch, selective_scan, device, correctness_shapes, args.dry_run)
    copy_bw = copy_bandwidth(torch, device, measure, copy_nbytes, args.repeats)
    run_throughput(torch, selective_scan, sst, device, args, measure, copy_bw)
    if args.sweep:
        run_sweep(torch, selective_scan, sst, device, args, measure, sweep)
    if not ok:
        print("correctness: FAILED (see the table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
