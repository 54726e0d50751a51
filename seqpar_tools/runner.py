"""The one rank runner: ranks spawned here (a persistent :class:`Pool`, or :func:`spawn` for one job), or this
process joining a torchrun / mpirun job (:func:`join`).

    pool = Pool(2)                                    # 2 gloo ranks over 127.0.0.1 that stay up
    per_rank = pool.run(fn, x, timeout=60)            # fn(rank, world_size, x) on every rank -> [r0, r1]
    pool.close()

    result = spawn(job, (cfg,), world_size=2)         # job(ctx, cfg) on 2 new ranks; rank 0's result
    result = join(job, (cfg,))                        # under torchrun / mpirun: this process is one rank

Used by the ``seqpar`` command, the benchmark, the tests (``tests/dist_pool.py``) and ``benchmarks/*.py``.

Failures are never silent and never hang:

- a rank that raises: :class:`RankError` with its traceback, the rank named;
- a rank that dies: ``rank 1 was killed by signal 9 (SIGKILL)`` / ``rank 1 exited with code 3``;
- no message from any rank for ``timeout`` seconds: the ranks that did not answer are named, the pool is
  killed (``broken``);
- after one rank fails, the others get a few seconds (:data:`GRACE_S`) to report their own error, then are
  killed: a peer blocked in a collective with the failed rank never holds the caller up.

Ranks die with their parent: each spawned rank asks Linux for ``SIGKILL`` when its parent exits
(``prctl(PR_SET_PDEATHSIG)``, set before anything else), and a watchdog thread polls ``os.getppid()``
(elsewhere, or should the parent thread that started it exit first) and exits within
:data:`WATCHDOG_S` seconds. Killing ``seqpar run`` (SIGTERM, SIGKILL, a scheduler's timeout, the OOM
killer) leaves no rank behind.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GRACE_S = 5.0  # after a rank fails, how long the others get to report their own error
WATCHDOG_S = 0.5  # how often a rank checks that its parent is alive (where PR_SET_PDEATHSIG is missing)
_PR_SET_PDEATHSIG = 1


class RankError(RuntimeError):
    """One or more ranks failed; ``errors`` maps rank -> what happened (a traceback, or a sentence such as
    ``"was killed by signal 9 (SIGKILL)"``), first failure first; ``results`` maps rank -> the result of each
    rank that did finish."""

    def __init__(self, errors: dict[int, str], results: dict[int, Any] | None = None):
        # the cause first: a rank that died, then tracebacks, then ranks killed or timed out because of them
        def order(kv):
            text = kv[1]
            return 0 if text.startswith(("was killed", "exited with")) else 1 if "Traceback" in text else 2

        errors = dict(sorted(errors.items(), key=order))
        self.errors = errors
        self.results = dict(results or {})
        lines = []
        for i, (r, text) in enumerate(errors.items()):
            text = text.rstrip()
            if i == 0:
                lines.append(f"rank {r} failed:\n{text}" if "\n" in text else f"rank {r} {text}")
            else:
                last = text.strip().splitlines()[-1] if text.strip() else "?"
                lines.append(f"rank {r} also failed: {last}" if "\n" in text else f"rank {r} {text}")
        super().__init__("\n".join(lines))


def exit_reason(code: int | None) -> str:
    """What a dead rank's exit code means, in words."""
    if code is not None and code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-code}{name}"
    return f"exited with code {code} without reporting an error"


# --- the rank side ---------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` does: ``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_S)  # polling the parent's pid, not synchronisation
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="seqpar-parent-watchdog", daemon=True).start()


@dataclass
class RankContext:
    """What a job function gets on each rank: who it is, where to compute, how to talk to the terminal.

    ``emit(kind, payload)`` reaches the process that owns the terminal (the spawner, or rank 0 under
    a launcher): ``("log", text)``, ``("task", (title, total))``, ``("advance", text)``, or anything the
    caller's ``on_event`` understands (``seqpar run`` sends ``("partial", result)`` as it measures).
    """

    rank: int
    world_size: int
    local_world_size: int
    device: Any  # torch.device
    group: Any  # None (the default torch.distributed group) or an mpi4py communicator
    emit: Callable[[str, Any], None]
    log_all_ranks: bool = False

    def log(self, msg: str) -> None:
        if self.rank == 0 or self.log_all_ranks:
            self.emit("log", msg)

    def task(self, title: str, total: int) -> None:
        if self.rank == 0:
            self.emit("task", (title, total))

    def advance(self, text: str) -> None:
        if self.rank == 0:
            self.emit("advance", text)


_EMIT: Callable[[str, Any], None] | None = None  # the current task's event channel, on a pool rank
_DEVICE: Any = None


def _rank_main(rank, world_size, port, backend, device_type, threads, timeout_s, parent_pid, tasks, results, path):
    die_with_parent(parent_pid)
    sys.path[:0] = [p for p in path if p not in sys.path]
    global _EMIT, _DEVICE
    import torch
    import torch.distributed as dist

    try:
        if threads:
            torch.set_num_threads(threads)
        _DEVICE = torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            _DEVICE = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:  # noqa: BLE001 - goes to the parent, which names the rank
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        _EMIT = lambda kind, payload: results.put((rank, kind, payload))  # noqa: E731
        try:
            value = fn(rank, world_size, *args, **kwargs)
            pickle.dumps(value)  # an unpicklable result would be lost silently in the queue's thread
            results.put((rank, "done", value))
        except BaseException:  # noqa: BLE001 - reported to the parent, which names the rank
            results.put((rank, "error", traceback.format_exc()))
        _EMIT = None
    dist.destroy_process_group()


# --- the parent side ---------------------------------------------------------------------------------


class Pool:
    """``world_size`` ranks in one gloo (or NCCL) group over 127.0.0.1 that stay up and run many tasks.

    ``run(fn, *args, timeout=..., on_event=None, **kwargs)`` calls the module-level ``fn(rank, world_size,
    *args, **kwargs)`` on every rank and returns the per-rank results; any failure raises :class:`RankError`
    (a failed task leaves the pool usable when every rank reported; a dead, silent or stuck rank breaks it:
    ``broken`` is True and the ranks are killed). ``timeout`` is the longest the parent waits without a
    message from any rank (a task's own events count as messages).
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", device_type: str = "cpu", threads: int = 1,
                 timeout_s: float = 300.0, grace_s: float = GRACE_S):
        if world_size < 1:
            raise ValueError(f"world_size={world_size}; allowed: an int >= 1")
        from seqpar.distributed import free_port

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_rank_main, name=f"seqpar-rank-{r}", daemon=True,
                        args=(r, world_size, port, backend, device_type, threads, timeout_s, os.getpid(),
                              self.tasks[r], self.results, list(sys.path)))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, fn: Callable[..., Any], *args, timeout: float | None = None,
            on_event: Callable[[int, str, Any], None] | None = None, **kwargs) -> list:
        if self.broken:
            raise RuntimeError("pool is broken by an earlier failure (a rank died, hung or timed out)")
        timeout = self.timeout_s if timeout is None else timeout
        for q in self.tasks:
            q.put((fn, args, kwargs))
        done: dict[int, Any] = {}
        errors: dict[int, str] = {}
        last = time.monotonic()
        grace_until = None
        name = getattr(args[0] if fn is _job_on_rank else fn, "__name__", "the task")

        def handle(msg) -> None:
            rank, kind, payload = msg
            if kind == "done":
                done[rank] = payload
            elif kind == "error":
                errors.setdefault(rank, payload)
            elif on_event is not None:
                on_event(rank, kind, payload)

        while len(done) + len(errors) < self.world_size:
            now = time.monotonic()
            if grace_until is not None and now > grace_until:
                for r in range(self.world_size):
                    if r not in done and r not in errors:
                        errors[r] = f"did not finish {name} within {self.grace_s:g} s of that failure (killed)"
                self._kill()
                break
            try:
                handle(self.results.get(timeout=0.2))
                last = time.monotonic()
            except queue_mod.Empty:
                dead = False
                for r, p in enumerate(self.procs):
                    if p.exitcode is not None and r not in done and r not in errors:
                        try:  # its last message may still be in the pipe
                            handle(self.results.get(timeout=1.0))
                            break
                        except queue_mod.Empty:
                            errors[r] = exit_reason(p.exitcode)
                            dead = True
                if dead:
                    self.broken = True
                if not errors and time.monotonic() - last > timeout:
                    for r in range(self.world_size):
                        if r not in done:
                            errors[r] = (f"sent nothing for {timeout:g} s during {name} (hung, or waiting for a "
                                         f"peer?); raise the timeout (run.timeout_s / --timeout) if it is slow")
                    self._kill()
                    break
            if errors and grace_until is None:
                grace_until = time.monotonic() + self.grace_s
        if errors:
            if len(errors) + len(done) < self.world_size or any(p.exitcode is not None for p in self.procs):
                self._kill()
            raise RankError(errors, done)
        return [done[r] for r in range(self.world_size)]

    def _kill(self) -> None:
        self.broken = True
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)

    def close(self, force: bool = False) -> None:
        """Stop the ranks (``force``: kill them without asking)."""
        if not force and not self.broken:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        self._kill()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)


def _job_on_rank(rank, world_size, fn, args, log_all_ranks):
    """A pool task that calls a job function ``fn(ctx, *args)``; rank 0's result is kept."""
    ctx = RankContext(rank, world_size, world_size, _DEVICE, None, _EMIT, log_all_ranks)
    result = fn(ctx, *args)
    return result if rank == 0 else None


def spawn(
    fn: Callable[..., Any],
    args: tuple,
    *,
    world_size: int,
    backend: str = "gloo",
    device_type: str = "cpu",
    threads: int = 1,
    timeout_s: float = 300,
    on_event: Callable[[int, str, Any], None] | None = None,
    log_all_ranks: bool = False,
    on_start: Callable[[Pool], None] | None = None,
) -> Any:
    """Run ``fn(ctx, *args)`` (``ctx``: a :class:`RankContext`) on ``world_size`` new local ranks; return rank
    0's result. ``fn`` must be importable by name (module level). A rank that raises, dies, or leaves the job
    silent for ``timeout_s`` seconds makes this raise :class:`RankError` naming the rank; the remaining ranks
    are killed, so nothing hangs."""
    pool = Pool(world_size, backend=backend, device_type=device_type, threads=threads, timeout_s=timeout_s)
    try:
        if on_start is not None:
            on_start(pool)
        results = pool.run(_job_on_rank, fn, args, log_all_ranks, timeout=timeout_s, on_event=on_event)
    except BaseException:
        pool.close(force=True)
        raise
    pool.close()
    return results[0]


def launched_rank() -> int:
    """This process's rank as the launcher's environment gives it (0 outside a launcher)."""
    for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        if v in os.environ:
            return int(os.environ[v])
    return 0


def local_world_size(default: int) -> int:
    for v in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if v in os.environ:
            return int(os.environ[v])
    return default


def join(
    fn: Callable[..., Any],
    args: tuple,
    *,
    backend: str | None = None,
    group: str = "torch",
    threads: int = 1,
    timeout_s: float = 300,
    on_event: Callable[[int, str, Any], None] | None = None,
    log_all_ranks: bool = False,
) -> Any:
    """Run ``fn(ctx, *args)`` in this process as one rank of the launcher's job (torchrun / mpirun);
    rank 0's result on rank 0, None elsewhere. A failure raises :class:`RankError` naming this rank.

    ``group="mpi"`` hands ``fn`` mpi4py's COMM_WORLD (CPU) instead of the torch group.
    """
    import torch
    import torch.distributed as dist

    from seqpar.distributed import init_distributed, mpi_world

    if threads:
        torch.set_num_threads(threads)
    rank, world = init_distributed(backend=backend, timeout_s=timeout_s)
    comm_group = mpi_world() if group == "mpi" else None
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())

    def emit(kind: str, payload: Any) -> None:
        if on_event is not None:
            on_event(rank, kind, payload)

    ctx = RankContext(rank, world, local_world_size(world), device, comm_group, emit, log_all_ranks)
    try:
        result = fn(ctx, *args)
    except BaseException as e:  # noqa: BLE001
        raise RankError({rank: traceback.format_exc()}) from e
    dist.destroy_process_group()
    return result if rank == 0 else None
