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
