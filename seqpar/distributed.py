"""Join the job's process group, whoever started the processes.

    rank, world = seqpar.init_distributed()          # in a script started by any of:

    torchrun --nproc-per-node 2 train.py             # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    mpiexec -n 2 python train.py                     # PMI_RANK/PMI_SIZE (MPICH), OMPI_COMM_WORLD_* (Open MPI)
    python train.py                                  # one process: a group of 1

Under MPI, torch has no MPI backend here: rank 0 picks an address and a free port and broadcasts them
through ``mpi4py`` (the ``mpi`` extra), then every rank joins a gloo/NCCL group over TCP.
``MASTER_ADDR`` / ``MASTER_PORT`` set in the environment win over the picked ones (multi-node: the
address must be reachable from every node; gloo picks its interface from ``GLOO_SOCKET_IFNAME``).

Dead peers: a rank whose peer died or hangs fails in its next collective after ``timeout_s`` (gloo
usually sooner, with "connection closed by peer"); torchrun and mpiexec then stop the other ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK")


def launcher() -> str | None:
    """``"torchrun"`` (RANK and WORLD_SIZE set), ``"mpi"`` (an MPI launcher's rank variable set) or None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if any(v in os.environ for v in _MPI_RANK_VARS):
        return "mpi"
    return None


def launcher_world_size() -> int | None:
    """Ranks the launcher started (from its environment variables), or None outside a launcher."""
    kind = launcher()
    if kind == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if kind == "mpi":
        for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"):
            if v in os.environ:
                return int(os.environ[v])
    return None


def local_rank() -> int:
    """This process's index on its node (selects the CUDA device)."""
    for v in ("LOCAL_RANK", *_MPI_LOCAL_RANK_VARS):
        if v in os.environ:
            return int(os.environ[v])
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mpi_world():
    """mpi4py's COMM_WORLD, with an error saying how to install it when missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "started by an MPI launcher, but mpi4py is missing: "
            "pip install -e '.[mpi]' from a seqpar checkout (mpi4py + mpich)"
        ) from e
    return MPI.COMM_WORLD


def _mpi_rendezvous() -> tuple[int, int, str]:
    """``(rank, world_size, tcp://addr:port)`` agreed through mpi4py (rank 0 decides, broadcasts)."""
    comm = mpi_world()
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
        port = int(os.environ.get("MASTER_PORT") or free_port("127.0.0.1" if addr == "127.0.0.1" else ""))
    addr, port = comm.bcast((addr, port), root=0)
    return rank, world, f"tcp://{addr}:{port}"


def init_distributed(*, backend: str | None = None, timeout_s: float = 300) -> tuple[int, int]:
    """Join the job's default process group; returns ``(rank, world_size)``.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        timeout_s: how long a collective waits for a peer: a dead or stuck peer surfaces as an
            error on the other ranks after this long.

    Launchers: torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
    MPI (``OMPI_COMM_WORLD_RANK/SIZE``, ``PMI_RANK/PMI_SIZE``; bootstrapped through mpi4py), else
    one process. With NCCL the CUDA device is set from the local rank. Idempotent: when a group
    exists already, returns its rank and size. Under MPI it also installs a ``sys.excepthook`` that
    aborts ``MPI.COMM_WORLD`` on an uncaught exception (``seqpar.comm.install_mpi_abort_hook``), so one
    failing rank ends the job instead of leaving the others waiting. seqpar's own collectives are
    bounded by a shorter timeout of their own (``SEQPAR_TIMEOUT_S``, default 60 s; see seqpar.comm).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}; allowed: 'gloo', 'nccl' (or None for the default)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, and torch.cuda.is_available() is False; use backend='gloo'")
    kind = launcher()
    if kind == "torchrun":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} not: start with torchrun")
        rank, world, init_method = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://"
    elif kind == "mpi":
        rank, world, init_method = _mpi_rendezvous()
        from seqpar.comm import install_mpi_abort_hook

        install_mpi_abort_hook()  # an uncaught exception on one rank ends the job, not just this rank
    else:
        rank, world, init_method = 0, 1, f"tcp://127.0.0.1:{free_port()}"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world


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
