"""Run a function on every rank: ranks spawned here, or this process joining a torchrun / mpirun job."""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from seqpar.distributed import free_port, init_distributed, mpi_world

# --- running a function on every rank: spawned here, or joined under a launcher --------------------


@dataclass
class RankContext:
    """What a job function gets on each rank: who it is, where to compute, how to talk to the terminal.

    ``emit(kind, payload)`` reaches the process that owns the terminal (the spawner, or rank 0 under
    a launcher): ``("log", text)``, ``("task", (title, total))``, ``("advance", text)``.
    """

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
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


class RankError(RuntimeError):
    """One or more ranks failed; ``errors`` maps rank -> traceback text, first failure first."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first, *rest = errors.items()
        lines = [f"rank {first[0]} failed:\n{first[1].rstrip()}"]
        for r, tb in rest:
            last = tb.strip().splitlines()[-1] if tb.strip() else "?"
            lines.append(f"rank {r} also failed: {last}")
        super().__init__("\n".join(lines))


def _spawned_rank(fn, args, rank, world, port, backend, device_type, threads, timeout_s, log_all, q) -> None:
    def emit(kind: str, payload: Any) -> None:
        q.put((rank, kind, payload))

    try:
        if threads:
            torch.set_num_threads(threads)
        device = torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        ctx = RankContext(rank, world, world, device, None, emit, log_all)
        result = fn(ctx, *args)
        q.put((rank, "done", result if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - goes to the spawner, which names the rank
        q.put((rank, "error", traceback.format_exc()))
        q.close()
        q.join_thread()
        os._exit(1)  # a collective may still hold threads: do not wait for them
    q.close()
    q.join_thread()
    dist.destroy_process_group()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        hint = " (out of memory?)" if code == -9 else ""
        return f"died from signal {-code}{hint} without reporting an error"
    return f"exited with code {code} without reporting an error"


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
) -> Any:
    """Run ``fn(ctx, *args)`` on ``world_size`` new local processes (a gloo/NCCL group over
    127.0.0.1 on a free port); return rank 0's result.

    ``fn`` must be importable by name (module level). A rank that raises, dies, or leaves the job
    silent for ``timeout_s`` seconds makes this raise :class:`RankError` naming the rank (with its
    traceback); the remaining ranks are killed, so nothing hangs.
    """
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_spawned_rank,
            args=(fn, args, r, world_size, port, backend, device_type, threads, timeout_s, log_all_ranks, q),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    last = time.monotonic()
    grace_until = None  # after a failure, wait briefly for the other ranks' own errors

    def handle(msg) -> None:
        rank, kind, payload = msg
        if kind == "done":
            done[rank] = payload
        elif kind == "error":
            errors.setdefault(rank, payload)
        elif on_event is not None:
            on_event(rank, kind, payload)

    try:
        while len(done) + len(errors) < world_size:
            if grace_until is not None and time.monotonic() > grace_until:
                break
            try:
                handle(q.get(timeout=0.2))
                last = time.monotonic()
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in done and r not in errors:
                        try:  # its last message may still be in the pipe
                            handle(q.get(timeout=1.0))
                            break
                        except queue_mod.Empty:
                            errors[r] = _exit_reason(p.exitcode)
                if not errors and time.monotonic() - last > timeout_s:
                    waiting = [r for r in range(world_size) if r not in done]
                    for r in waiting:
                        errors[r] = f"no message from any rank for {timeout_s:.0f} s (hung?); run.timeout_s / --timeout"
                    break
            if errors and grace_until is None:
                grace_until = time.monotonic() + 3.0
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RankError(errors)
    return done[0]


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
