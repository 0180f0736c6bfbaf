"""Benchmark of the ``"cpu"`` selective scan (numba) against the matmuls of the same Mamba layer.

One Mamba-130M-like layer: batch 1, d_model 768, dim = d_inner 1536, N 16, L 2048, float32.
Timed cases (all in one process, run round-robin so that their ratios share the machine state;
each is warmed up twice, then timed ``--repeats`` times; medians reported):

* ``matmul``: in_proj (Linear 768 -> 3072, no bias) and out_proj (Linear 1536 -> 768, no bias)
  forward + backward on a (batch, L, 768) input; input and weights require grad.
* ``scan_fwd``: the scan forward alone (under ``torch.no_grad``), with D, z, delta_bias and
  delta_softplus as Mamba calls it.
* ``scan_all``: scan forward + backward with every input requiring grad.
* ``scan_du``: scan forward + backward with only ``u`` requiring grad (the LRP case: delta, A, B, C,
  D, delta_bias and z detached).
* ``scan_du_dz``: as ``scan_du`` but z requires grad too.
* ``ref_all`` (optional, ``--ref-repeats``, at ``--ref-L``): the reference loop forward + backward,
  all inputs requiring grad; the cpu scan is timed at the same L for the ratio.

Memory: each case also runs once in a fresh subprocess (numba cache already warm). There the
kernels are loaded at a tiny size and the inputs built; freed heap memory is returned to the OS
(``malloc_trim``), the process's peak RSS is reset to its current RSS
(``echo 5 > /proc/self/clear_refs``, Linux) and the case runs once; reported is
``VmHWM - VmRSS_before``: the peak resident memory added by the call, which includes the output,
the gradients of the inputs and every temporary. For scale: a materialised (batch, dim, L, N)
float32 tensor would be ``batch * dim * L * N * 4`` bytes.

Usage::

    .venv/bin/python benchmarks/bench_selective_scan_cpu.py [--repeats 7] [--ref-repeats 5]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_models.ops.selective_scan import selective_scan  # noqa: E402

CASES = ("matmul", "scan_fwd", "scan_all", "scan_du", "scan_du_dz", "ref_all", "cpu_all_refL")


def make_scan_inputs(batch: int, dim: int, length: int, n_state: int, dtype: torch.dtype, seed: int = 0):
    """Mamba-like inputs: delta pre-activation ~ softplus^-1 of ~0.01, A = -(1..N), B, C 3-D."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=gen, dtype=dtype)
    delta = torch.randn(batch, dim, length, generator=gen, dtype=dtype) * 0.5 - 4.5
    A = -torch.arange(1, n_state + 1, dtype=dtype).repeat(dim, 1)
    B = torch.randn(batch, n_state, length, generator=gen, dtype=dtype)
    C = torch.randn(batch, n_state, length, generator=gen, dtype=dtype)
    D = torch.ones(dim, dtype=dtype)
    z = torch.randn(batch, dim, length, generator=gen, dtype=dtype)
    delta_bias = torch.randn(dim, generator=gen, dtype=dtype) * 0.1
    return [u, delta, A, B, C, D, z, delta_bias]


def build_case(case: str, args: argparse.Namespace, length: int | None = None):
    """A zero-argument callable running one measurement of ``case``."""
    length = length or args.L
    dim = args.expand * args.d_model
    dtype = getattr(torch, args.dtype)
    if case == "matmul":
        in_proj = torch.nn.Linear(args.d_model, 2 * dim, bias=False, dtype=dtype)
        out_proj = torch.nn.Linear(dim, args.d_model, bias=False, dtype=dtype)
        x = torch.randn(args.batch, length, args.d_model, dtype=dtype, requires_grad=True)
        g_xz = torch.randn(args.batch, length, 2 * dim, dtype=dtype)
        g_out = torch.randn(args.batch, length, args.d_model, dtype=dtype)

        def run_matmul():
            xz = in_proj(x)
            out = out_proj(xz[..., :dim])
            torch.autograd.backward([xz, out], [g_xz, g_out])
            for p in (x, in_proj.weight, out_proj.weight):
                p.grad = None

        return run_matmul

    inputs = make_scan_inputs(args.batch, dim, length, args.N, dtype)
    backend = "reference" if case == "ref_all" else "cpu"
    grad_names = {
        "scan_fwd": (),
        "scan_all": tuple(range(8)),
        "cpu_all_refL": tuple(range(8)),
        "ref_all": tuple(range(8)),
        "scan_du": (0,),
        "scan_du_dz": (0, 6),
    }[case]
    leaves = [x.clone().requires_grad_(i in grad_names) for i, x in enumerate(inputs)]
    dout = torch.randn(inputs[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(1))

    def run_scan():
        if not grad_names:
            with torch.no_grad():
                selective_scan(*leaves, delta_softplus=True, backend=backend)
            return
        out = selective_scan(*leaves, delta_softplus=True, backend=backend)
        out.backward(dout)
        for leaf in leaves:
            leaf.grad = None

    return run_scan


def time_cases(cases: list[str], args: argparse.Namespace, repeats: int, length: int | None = None):
    fns = {case: build_case(case, args, length) for case in cases}
    for fn in fns.values():  # warm-up (numba load/compile, allocator, thread pools)
        fn()
        fn()
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[case].append(time.perf_counter() - t0)
    return times


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def measure_memory_child(case: str, args: argparse.Namespace) -> None:
    """Runs in a subprocess: print the peak RSS added by one call of ``case`` (KiB) as JSON."""
    length = args.ref_L if case in ("ref_all", "cpu_all_refL") else args.L
    build_case(case, args, length=8)()  # load the kernels at a tiny size
    fn = build_case(case, args, length)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so they are not reused
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"case": case, "rss_before_kib": before, "peak_added_kib": peak - before}))


def measure_memory(case: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--mem-child", case]
    for key in ("batch", "d_model", "expand", "N", "L", "ref_L", "dtype"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--N", type=int, default=16)
    parser.add_argument("--L", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-L", type=int, default=2048, help="L for the reference comparison")
    parser.add_argument("--ref-repeats", type=int, default=5, help="0 skips the reference")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--mem-child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mem_child:
        measure_memory_child(args.mem_child, args)
        return

    import numba

    dim = args.expand * args.d_model
    print(f"python {platform.python_version()}, torch {torch.__version__}, numba {numba.__version__}")
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}")
    print(f"batch={args.batch} d_model={args.d_model} dim={dim} N={args.N} L={args.L} dtype={args.dtype}")
    times = time_cases(["matmul", "scan_fwd", "scan_all", "scan_du", "scan_du_dz"], args, args.repeats)
    med = {case: statistics.median(ts) for case, ts in times.items()}
    print(f"\nmedians of {args.repeats} runs (round-robin), seconds; ratio = case / matmul")
    print("| case | median s | min s | ratio to matmul |")
    print("|---|---|---|---|")
    for case, ts in times.items():
        print(f"| {case} | {med[case]:.4f} | {min(ts):.4f} | {med[case] / med['matmul']:.2f} |")
    if args.ref_repeats > 0:
        ref_times = time_cases(["ref_all", "cpu_all_refL"], args, args.ref_repeats, length=args.ref_L)
        ref_med = {case: statistics.median(ts) for case, ts in ref_times.items()}
        print(f"\nreference vs cpu, fwd+bwd all grads, L={args.ref_L}, medians of {args.ref_repeats}")
        print(f"| reference | {ref_med['ref_all']:.4f} s | cpu | {ref_med['cpu_all_refL']:.4f} s | "
              f"speed-up {ref_med['ref_all'] / ref_med['cpu_all_refL']:.1f}x |")  # fmt: skip
    if not args.no_memory:
        full = args.batch * dim * args.L * args.N * (4 if args.dtype == "float32" else 8)
        print("\npeak RSS added by one call (fresh subprocess each); "
              f"(batch, dim, L, N) = {full / 2**20:.0f} MiB")  # fmt: skip
        print("| case | L | peak added MiB |")
        print("|---|---|---|")
        cases = ["matmul", "scan_fwd", "scan_all", "scan_du", "scan_du_dz"]
        if args.ref_repeats > 0:
            cases += ["cpu_all_refL", "ref_all"]
        for case in cases:
            mem = measure_memory(case, args)
            length = args.ref_L if case in ("ref_all", "cpu_all_refL") else args.L
            print(f"| {case} | {length} | {mem['peak_added_kib'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
