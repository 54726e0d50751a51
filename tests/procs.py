"""Watching processes from a test: the rank processes a command spawned, whether a pid is still alive, and
polling an outside condition with a bound (used by test_runner.py and test_serve.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s rank processes (multiprocessing spawn children, not its resource tracker)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(d.name))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; its new parent just has not reaped it


def wait_for(cond, timeout: float, what: str):
    """``cond()``'s first truthy value, polled every 50 ms; the test fails after ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(0.05)  # polling an outside condition (a process, a counter), not synchronising with our code
    pytest.fail(f"{what} not within {timeout} s")
