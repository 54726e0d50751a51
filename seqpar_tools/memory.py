"""Peak memory of this process between two points, for the job and the benchmark.

CPU: Linux ``VmHWM`` (the resident high-water mark), reset through ``/proc/self/clear_refs`` after
handing freed heap pages back (``malloc_trim``); elsewhere ``getrusage``'s ``ru_maxrss`` (not
resettable). CUDA: ``torch.cuda.max_memory_allocated``.

    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    work()
    added = mem.peak() - mem.base
"""

from __future__ import annotations

import resource
import sys

import torch


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim() -> None:
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class PeakMemory:
    """Peak memory of this process since :meth:`reset` (see the module docstring for the sources)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.max_memory_allocated"
        if not self.cuda:
            self.method = "VmHWM (reset via /proc/self/clear_refs)" if self._clear() else "getrusage ru_maxrss"

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
            return _status_bytes("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        """Start a new measurement; :attr:`base` is what the process holds now."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = int(torch.cuda.memory_allocated())
        else:
            _trim()  # hand freed heap pages back, so the base is what this process really holds
            self._clear()
            self.base = _status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        hwm = _status_bytes("VmHWM")
        if hwm is not None:
            return hwm
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def allocated_peak(fn, inside: str | None = None) -> tuple[int, int]:
    """``(peak, rise)``: the most bytes of torch tensors alive at once during ``fn()`` above those alive when it
    started, and the largest rise of that count within one call of the op named ``inside`` (its own buffers and
    outputs; 0 without ``inside``). From ``torch.profiler``'s memory events (``profile_memory=True``): what torch
    asks the allocator for, without what the C allocator keeps -- the schedule's own budget, which
    :class:`PeakMemory` (resident size) adds the heap's retention to. Slow (profiled); used on CPU tensors."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    mems = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == inside)
    live = peak = rise = 0
    i, start = 0, None  # the call of ``inside`` in progress: the live count when it began
    for t, n in mems:
        while i < len(spans) and spans[i][1] < t:
            i, start = i + 1, None
        if start is None and i < len(spans) and spans[i][0] <= t:
            start = live
        live += n
        peak = max(peak, live)
        if start is not None:
            rise = max(rise, live - start)
    return peak, rise


# --- before the job: will it fit? ---------------------------------------------------------------------

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def available_bytes(device_type: str, world_size_here: int) -> tuple[int | None, str]:
    """Memory the job may use and where the figure comes from: CPU ``MemAvailable`` (Linux) for all the ranks of
    this node together; CUDA the smallest free memory of the first ``world_size_here`` devices (one rank
    each). ``(None, why)`` when unknown."""
    if device_type == "cuda":
        import torch

        n = min(world_size_here, torch.cuda.device_count())
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(max(n, 1)))
        return free, "free CUDA memory of one device (torch.cuda.mem_get_info)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, f"MemAvailable, for the {world_size_here} ranks of this node"
    except OSError:
        pass
    return None, "unknown (no /proc/meminfo)"


def estimate_run(cfg, world_size: int) -> dict[str, int]:
    """Bytes the busiest rank (rank 0) of ``seqpar run`` needs, by part (an upper estimate from the shapes).

    - ``shards``: this rank's q, k, v, dout, the output and dq, dk, dv, plus float32 working copies;
    - ``strategy``: the largest extra memory of the strategies (``seqpar.plan``), twice for the backward;
    - ``float64 check``: the naive float64 reference at ``check.seq_len`` (score matrix and its gradients);
    - ``long check``: rank 0 holds the whole sequence in float32 (inputs, GQA-expanded K/V, output,
      gradients, the gathered result) and SDPA's explicit S x S mask when there is a window.
    """
    a, c = cfg.attention, cfg.check
    e = _BYTES[a.dtype]
    wide = 8 if a.dtype == "float64" else 4
    b, h, hkv, d, s = a.batch, a.heads, a.kv_heads, a.head_dim, a.seq_len
    s_r = -(-s // world_size)
    per_token = b * d * (2 * h + 2 * hkv)  # q, dout (H heads), k, v (H_kv heads)
    parts = {"shards": 2 * per_token * s_r * e + per_token * s_r * 4}
    kv_local = 2 * b * hkv * s_r * d * e
    q_all = world_size * b * h * s_r * (d * e + (d + 2) * 4)
    parts["strategy"] = 2 * max(q_all if "allreduce" in a.strategies else 0, world_size * kv_local)
    sc = c.seq_len
    parts["float64 check"] = 6 * b * h * sc * sc * 8 + 4 * per_token * sc * 8
    if c.long:
        full = b * s * d * (2 * h + 2 * hkv + 2 * h + 4 * h) * wide  # inputs, expanded K/V, out + 3 grads
        gathered = 4 * b * s * d * h * e
        mask = s * s if a.window_size is not None else 0
        parts["long check"] = full + gathered + mask
    return parts


def estimate_verify(*, seq_len: int, batch: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    """Bytes one rank of ``seqpar verify`` needs at ``seq_len``: every rank builds the full inputs and the
    naive float64 reference (the score matrix, weights and their gradients)."""
    per_token = batch * head_dim * (2 * heads + 2 * kv_heads)
    return {"float64 reference": 6 * batch * heads * seq_len * seq_len * 8 + 4 * per_token * seq_len * 8}


RANK0_ONLY = ("long check",)  # parts only rank 0 holds


def check_fits(parts: dict[str, int], device_type: str, world_size_here: int, what: str) -> str | None:
    """None when ``parts`` (rank 0's need, by part) fit, else the sentence that says why not. On CPU the
    node's ranks share ``MemAvailable``: every rank needs the parts but :data:`RANK0_ONLY`, rank 0 all of them;
    on CUDA each rank has its own device."""
    have, source = available_bytes(device_type, world_size_here)
    per_rank = sum(v for k, v in parts.items() if k not in RANK0_ONLY)
    need = sum(parts.values())
    where = "on one device"
    if device_type != "cuda":
        need += (world_size_here - 1) * per_rank
        where = f"on this node ({world_size_here} ranks)"
    if have is None or need <= have:
        return None
    gib = 2**30
    detail = ", ".join(f"{k} {v / gib:.2f}" + (" (rank 0 only)" if k in RANK0_ONLY else "")
                       for k, v in parts.items() if v)
    return (f"{what} needs about {need / gib:.2f} GiB {where} (per rank: {detail} GiB) but "
            f"{have / gib:.2f} GiB is available ({source}); use a shorter sequence, fewer heads or more ranks")
