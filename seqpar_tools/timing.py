"""The one timing rule of the tools: median over repeats of the slowest rank's wall time.

    seconds, nbytes, last = timed(fn, comm, device, warmup=1, repeats=3)

Each repeat starts together (a max-reduction of 0.0 lines the ranks up), times ``fn()`` on every rank
(CUDA synchronised), and keeps the slowest rank's time; the reported figure is the median of those. With
``comm=None`` (one process: the single-process baseline) the same rule applies to the one process.
``nbytes`` is what this rank sent in the first call (``Communicator.bytes_sent``). The previous call's result
is dropped before each call, so a peak-memory reading around ``timed`` is that of one call whatever ``fn``
returns (before 2026-11-29 the single-process SDPA baseline, which returns its outputs and gradients, was
measured holding one extra set of them: its peak read 64 MiB high at S=32k, H=2, D=64).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def max_over_ranks(comm, device, *values: float) -> list[float]:
    """The element-wise max of ``values`` over the ranks (float64)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if comm is not None:
        comm.all_reduce(t, "max")
    return t.tolist()


def timed(fn: Callable[[], Any], comm, device, warmup: int, repeats: int, mem=None) -> tuple[float, int, Any]:
    """``(median seconds of the slowest rank, bytes this rank sent in the first call, last result)``.

    ``mem``: a :class:`seqpar_tools.memory.PeakMemory`, reset after the warm-up calls: the peak of warm calls.
    (A first fwd+bwd in a process keeps ~35 MiB that later ones reuse -- at S=32k, H=2, D=64 the first
    strategy of a ``seqpar bench`` run read 109-125 MiB against 75-92 for the same code measured second.)"""
    import torch

    times, nbytes, result = [], None, None
    for i in range(warmup + repeats):
        if mem is not None and i == warmup:
            result = None
            mem.reset()
        max_over_ranks(comm, device, 0.0)  # start together
        if comm is not None:
            comm.reset_stats()
        result = None  # see the module docstring
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if nbytes is None:
            nbytes = comm.bytes_sent if comm is not None else 0
        if i >= warmup:
            times.append(max_over_ranks(comm, device, dt)[0])
    return statistics.median(times), int(nbytes or 0), result
