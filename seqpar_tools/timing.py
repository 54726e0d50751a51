"""The one timing rule of the tools: median over repeats of the slowest rank's wall time.

    seconds, nbytes, last = timed(fn, comm, device, warmup=1, repeats=3)

Each repeat starts together (a max-reduction of 0.0 lines the ranks up), times ``fn()`` on every rank
(CUDA synchronised), and keeps the slowest rank's time; the reported figure is the median of those. With
``comm=None`` (one process: the single-process baseline) the same rule applies to the one process.
``nbytes`` is what this rank sent in the first call (``Communicator.bytes_sent``).
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


def timed(fn: Callable[[], Any], comm, device, warmup: int, repeats: int) -> tuple[float, int, Any]:
    """``(median seconds of the slowest rank, bytes this rank sent in the first call, last result)``."""
    import torch

    times, nbytes, result = [], None, None
    for i in range(warmup + repeats):
        max_over_ranks(comm, device, 0.0)  # start together
        if comm is not None:
            comm.reset_stats()
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
