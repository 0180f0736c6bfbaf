"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_timer(device: str) -> Callable[[Callable[[], object], int, int], float]:
    """``measure(function, warmup, repeats) -> median seconds`` on ``device``: CUDA events around
    each call on ``"cuda"`` (synchronised), :func:`median_seconds`' wall clock elsewhere. torch is
    imported here, not at module import, so a script can set ``TRITON_INTERPRET`` first."""
    import torch

    def measure(function: Callable[[], object], warmup: int, repeats: int) -> float:
        if device != "cuda":
            return median_seconds(function, repeats, warmup)
        for _ in range(warmup):
            function()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return measure
