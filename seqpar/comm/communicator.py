"""All communication of seqpar, behind one small interface.

:class:`Communicator` is what the rest of the package talks to. Two implementations:

- :class:`TorchCommunicator` over a ``torch.distributed`` process group (gloo, NCCL);
- :class:`MPICommunicator` over an ``mpi4py`` communicator (CPU tensors; numpy at the API edge).

:func:`get_communicator` turns the user's ``group`` argument (None, a ``ProcessGroup``, an
``MPI.Comm``) into one. :class:`RingComm` queues ring sends/receives (``send_recv``, ``commit``,
``wait``) like ring-flash-attention's class of the same name.

Byte accounting (``bytes_sent``): what one rank puts on the wire under the bandwidth-optimal
algorithm of each collective -- all-reduce ``2(W-1)/W * n``, all-gather ``(W-1) * n_local``,
reduce-scatter ``(W-1)/W * n_total``, all-to-all the bytes addressed to the other ranks, point-to-point the
bytes sent.

Timeouts: every collective and point-to-point transfer seqpar issues is bounded by seqpar's own
timeout, :func:`timeout_s` (default 60 s; ``SEQPAR_TIMEOUT_S`` or :func:`set_timeout`), independent of
the process group's (300 s under ``seqpar.init_distributed``, 30 min under a plain
``init_process_group``, none for an MPI communicator). torch.distributed calls run with
``async_op=True`` and ``work.wait(timeout=...)``; mpi4py ones as non-blocking requests polled until the
deadline. A transfer a peer never joins (one rank skipped the call -- e.g. ran backward only on
some ranks -- took another code path, or died) raises :class:`PeerTimeout` naming the operation, its
shape and bytes, the rank and the likely cause. The group is unusable afterwards (the peer's side of
the transfer may still be pending): end the job. A peer that is only late by more than the limit (a
rank busy elsewhere, e.g. writing a checkpoint, while the others enter the next seqpar call) raises it
too: jobs with such phases need a larger ``SEQPAR_TIMEOUT_S``. Under MPI an uncaught exception aborts the job
(:func:`install_mpi_abort_hook`) instead of leaving the other ranks waiting.
Measured cost of the bounded wait against the plain blocking call: see the README ("Bad input never hangs").
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
_timeout_override: float | None = None


def timeout_s() -> float:
    """Seconds a seqpar collective waits for its peers: :func:`set_timeout`'s value, else the
    ``SEQPAR_TIMEOUT_S`` environment variable, else 60."""
    if _timeout_override is not None:
        return _timeout_override
    raw = os.environ.get("SEQPAR_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"SEQPAR_TIMEOUT_S={raw!r}; allowed: a finite number of seconds > 0")
    return value


def set_timeout(seconds: float | None) -> None:
    """Set seqpar's collective timeout for this process (None: back to ``SEQPAR_TIMEOUT_S`` / 60 s).
    Every rank should use the same value."""
    global _timeout_override
    if seconds is not None and (not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf")):
        raise ValueError(f"seconds={seconds!r}; allowed: None or a finite number > 0")
    _timeout_override = None if seconds is None else float(seconds)


class PeerTimeout(TimeoutError):
    """A seqpar collective did not complete within :func:`timeout_s`: a peer never joined it."""


def _describe(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return f" of a {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} tensor ({t.numel() * t.element_size()} bytes)"


def _timeout_error(rank: int, world: int, what: str, t: torch.Tensor | None, limit: float) -> PeerTimeout:
    return PeerTimeout(
        f"seqpar (rank {rank} of {world}): {what}{_describe(t)} did not complete within {limit:g} s: a peer did "
        "not join. Did one rank skip this call (e.g. run backward only on some ranks, or take another code "
        "path), or die? Every rank of the group must make the same seqpar calls in the same order. "
        "(SEQPAR_TIMEOUT_S or seqpar.comm.set_timeout change the limit; this group is unusable now.)"
    )


class Communicator:
    """Collectives on CPU/GPU tensors. Subclasses implement the ``_``-prefixed primitives."""

    rank: int
    world_size: int

    counts_to: Communicator | None = None  # a grid dimension's communicator also counts into the whole group's

    def __init__(self) -> None:
        self.bytes_sent = 0

    # -- primitives --------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        raise NotImplementedError

    def _all_gather(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """``out`` (W * t.numel(),) contiguous <- every rank's ``t`` in rank order."""
        raise NotImplementedError

    def _reduce_scatter(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """``out`` (t.numel() / W,) <- sum over ranks of this rank's chunk of ``t``."""
        raise NotImplementedError

    def _all_to_all(self, out: torch.Tensor, t: torch.Tensor, send: list[int], recv: list[int]) -> None:
        """``out`` (sum(recv),) <- from each rank ``i`` its ``recv[i]`` elements, in rank order; ``t`` holds
        ``send[j]`` elements for each rank ``j``, in rank order. Both flat and contiguous."""
        raise NotImplementedError

    def _p2p(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> Any:
        """Start sends/receives (peers are ranks of this communicator); return a ``wait()``-able."""
        raise NotImplementedError

    def _broadcast(self, t: torch.Tensor, src: int, deadline: float, limit: float) -> None:
        """``t`` (contiguous) <- rank ``src``'s ``t``, waiting until ``deadline`` (``limit`` s, for the error)."""
        raise NotImplementedError

    # -- the interface -----------------------------------------------------------------------
    def _count(self, nbytes: float) -> None:
        self.bytes_sent += int(nbytes)
        if self.counts_to is not None:
            self.counts_to._count(nbytes)

    def reset_stats(self) -> None:
        self.bytes_sent = 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; ``op`` in {'sum', 'max'}. Returns ``t`` (a non-contiguous ``t`` goes through a copy)."""
        if op not in ("sum", "max"):
            raise ValueError(f"op={op!r}; allowed: 'sum', 'max'")
        if self.world_size > 1:
            self._count(2 * (self.world_size - 1) / self.world_size * t.numel() * t.element_size())
            if t.is_contiguous():
                self._all_reduce(t, op)
            else:
                buf = t.contiguous()
                self._all_reduce(buf, op)
                t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(W, *t.shape)``: every rank's ``t`` (equal shapes on every rank)."""
        t = t.contiguous()
        if self.world_size == 1:
            return t.unsqueeze(0)
        out = torch.empty(self.world_size * t.numel(), dtype=t.dtype, device=t.device)
        self._count((self.world_size - 1) * t.numel() * t.element_size())
        self._all_gather(out, t.view(-1))
        return out.view(self.world_size, *t.shape)

    def all_gather_v(self, t: torch.Tensor, sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
        """Every rank's ``t``, whose length along ``dim`` is ``sizes[rank]`` (padded on the wire)."""
        n = max(sizes)
        if t.shape[dim] < n:
            pad_shape = list(t.shape)
            pad_shape[dim] = n - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
        stacked = self.all_gather(t)
        return [stacked[r].narrow(dim, 0, s) for r, s in enumerate(sizes)]

    def reduce_scatter_v(self, t: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        """Sum of ``t`` over ranks, split along ``dim`` by ``sizes``; this rank's piece."""
        if self.world_size == 1:
            return t
        n = max(sizes)
        shape = list(t.shape)
        shape[dim] = n
        buf = t.new_zeros(self.world_size, *shape)
        for r, piece in enumerate(torch.split(t, list(sizes), dim=dim)):
            buf[r].narrow(dim, 0, sizes[r]).copy_(piece)
        out = t.new_empty(shape)
        self._count((self.world_size - 1) / self.world_size * buf.numel() * buf.element_size())
        self._reduce_scatter(out.view(-1), buf.view(-1))
        return out.narrow(dim, 0, sizes[self.rank])

    def all_to_all_v(self, t: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> torch.Tensor:
        """All-to-all with per-rank counts: ``t`` (flat) holds ``send_counts[j]`` elements for rank ``j``, in rank
        order; returns a flat tensor of ``sum(recv_counts)`` elements, ``recv_counts[i]`` from rank ``i`` in rank
        order (each rank's ``recv_counts[i]`` must equal rank ``i``'s ``send_counts[rank]``). Counts the bytes
        addressed to the other ranks; bounded by :func:`timeout_s` like every collective."""
        send, recv = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        if len(send) != self.world_size or len(recv) != self.world_size or t.dim() != 1 or t.numel() != sum(send):
            raise ValueError(
                f"internal: all_to_all_v of a {tuple(t.shape)} tensor with send_counts={send}, recv_counts={recv} "
                f"over {self.world_size} ranks"
            )
        if self.world_size == 1:
            return t
        t = t.contiguous()
        out = t.new_empty(sum(recv))
        self._count((sum(send) - send[self.rank]) * t.element_size())
        self._all_to_all(out, t, send, recv)
        return out

    def send_recv(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> Any:
        """Start point-to-point transfers; returns a handle with ``wait()`` (bounded by :func:`timeout_s`).

        Sends of any strides go out from a contiguous copy; receive buffers must be contiguous."""
        sends = [(t.contiguous(), p) for t, p in sends]
        for t, _ in recvs:
            if not t.is_contiguous():
                raise ValueError(f"internal: a receive buffer of shape {tuple(t.shape)} is not contiguous")
        self._count(sum(t.numel() * t.element_size() for t, _ in sends))
        return self._p2p(sends, recvs)

    def broadcast(self, t: torch.Tensor, src: int = 0, *, timeout: float | None = None) -> torch.Tensor:
        """In place: ``t`` <- rank ``src``'s ``t`` (the same shape and dtype on every rank); returns ``t``.
        ``timeout``: seconds to wait for the peers (default :func:`timeout_s`) -- a rank that waits for the
        next message of a loop (a service's step) passes its own bound. Counts ``(W-1) * n`` bytes on ``src``
        (a copy to every other rank), nothing elsewhere. ``t`` must be contiguous (it is the receive buffer)."""
        if self.world_size == 1:
            return t
        if not t.is_contiguous():
            raise ValueError(f"internal: broadcast buffer of shape {tuple(t.shape)} is not contiguous")
        limit = timeout_s() if timeout is None else float(timeout)
        if self.rank == src:
            self._count((self.world_size - 1) * t.numel() * t.element_size())
        self._broadcast(t, src, time.monotonic() + limit, limit)
        return t

    def _timeout(self, what: str, t: torch.Tensor | None, limit: float) -> PeerTimeout:
        return _timeout_error(self.rank, self.world_size, what, t, limit)


# torch >= 2.12 renamed the single-tensor forms; the old names still work but warn.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchCommunicator(Communicator):
    """Over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

    _OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "seqpar needs a process group: call torch.distributed.init_process_group(...) or "
                "seqpar.init_distributed() first, or pass group=mpi4py.MPI.COMM_WORLD"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [r if group is None else dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._nccl = dist.get_backend(group) == "nccl"

    def _wait(
        self, works: Sequence[Any], what: str, t: torch.Tensor | None, deadline: float | None = None,
        threaded: bool = False, limit: float | None = None,
    ) -> None:
        """Wait for ``works`` until ``deadline`` (monotonic; default now + timeout_s()).

        ``work.wait(timeout=...)``, or (``threaded=True``) a plain ``wait()`` handed to a helper thread
        and awaited until the deadline: gloo's reduce-scatter work ignores the ``wait`` timeout and never
        reports ``is_completed()`` (measured, torch 2.13). On NCCL a plain
        ``wait()`` (it only orders the CUDA streams; a CPU-side bounded wait would stall the host):
        there the process group's timeout and NCCL's watchdog apply.
        """
        if self._nccl:
            for work in works:
                work.wait()
            return
        limit = timeout_s() if limit is None else limit
        deadline = time.monotonic() + limit if deadline is None else deadline
        for work in works:
            if threaded:
                self._wait_in_thread(work, what, t, deadline, limit)
                continue
            left = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(timeout=datetime.timedelta(seconds=left))
            except RuntimeError as e:
                text = str(e).lower()
                # our deadline, not the process group's own (shorter) timeout or a transport error
                if ("timed out" in text or "timeout" in text) and time.monotonic() >= deadline - 0.05:
                    raise self._timeout(what, t, limit) from e
                raise

    def _wait_in_thread(self, work: Any, what: str, t: torch.Tensor | None, deadline: float, limit: float) -> None:
        global _WAITER
        waiter = _WAITER = _WAITER or _Waiter()
        done, errors = threading.Event(), []
        waiter.jobs.put((work, done, errors))
        if not done.wait(max(deadline - time.monotonic(), 0.001)):
            _WAITER = None  # that thread stays blocked in the dead wait; the next call gets a fresh one
            raise self._timeout(what, t, limit)
        if errors:
            raise errors[0]

    def _all_reduce(self, t, op):
        self._wait([dist.all_reduce(t, op=self._OPS[op], group=self.group, async_op=True)], f"all_reduce {op}", t)

    def _all_gather(self, out, t):
        self._wait([_ALL_GATHER(out, t, group=self.group, async_op=True)], "all_gather", t)

    def _reduce_scatter(self, out, t):
        self._wait([_REDUCE_SCATTER(out, t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)],
                   "reduce_scatter", t, threaded=True)

    def _all_to_all(self, out, t, send, recv):
        work = dist.all_to_all_single(out, t, output_split_sizes=recv, input_split_sizes=send, group=self.group,
                                      async_op=True)
        self._wait([work], "all_to_all", t, threaded=True)

    def _broadcast(self, t, src, deadline, limit):
        work = dist.broadcast(t, self._global[src], group=self.group, async_op=True)
        self._wait([work], f"broadcast from rank {src}", t, deadline, limit=limit)

    def _p2p(self, sends, recvs):
        ops = [dist.P2POp(dist.isend, t, self._global[p], self.group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global[p], self.group) for t, p in recvs]
        peers = sorted({p for _, p in (*sends, *recvs)})
        t = sends[0][0] if sends else None
        return _Requests(self, dist.batch_isend_irecv(ops) if ops else [], f"send/recv with rank(s) {peers}", t)


class MPICommunicator(Communicator):
    """Over an ``mpi4py`` communicator; CPU tensors only (moved through numpy views, no copies)."""

    def __init__(self, comm: Any) -> None:
        super().__init__()
        from mpi4py import MPI  # imported lazily: the mpi extra is optional

        self._MPI = MPI
        self.comm = comm
        install_mpi_abort_hook()
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    @staticmethod
    def _np(t: torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"MPI communicator needs CPU tensors, got device={t.device}")
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy()  # moved as raw bits
        return t.numpy()

    def wait(self, reqs: list[Any], what: str, t: torch.Tensor | None, deadline: float | None = None,
             limit: float | None = None) -> None:
        """Poll ``reqs`` until done or ``deadline`` (monotonic; default now + timeout_s()); spins
        briefly, then sleeps up to 1 ms between polls."""
        limit = timeout_s() if limit is None else limit
        deadline = time.monotonic() + limit if deadline is None else deadline
        polls = 0
        while not self._MPI.Request.Testall(reqs):
            polls += 1
            if polls > 64:
                if time.monotonic() > deadline:
                    raise self._timeout(what, t, limit)
                time.sleep(min(1e-3, 1e-6 * polls))

    def _all_reduce(self, t, op):
        wide = t if t.dtype in (torch.float32, torch.float64, torch.int64, torch.int32) else t.float()
        mpi_op = self._MPI.SUM if op == "sum" else self._MPI.MAX
        self.wait([self.comm.Iallreduce(self._MPI.IN_PLACE, wide.numpy(), op=mpi_op)], f"all_reduce {op}", t)
        if wide is not t:
            t.copy_(wide)

    def _all_gather(self, out, t):
        self.wait([self.comm.Iallgather(self._np(t), self._np(out))], "all_gather", t)

    def _reduce_scatter(self, out, t):
        wide_in = t if t.dtype in (torch.float32, torch.float64) else t.float()
        wide_out = out if out.dtype == wide_in.dtype else out.float()
        self.wait([self.comm.Ireduce_scatter_block(wide_in.numpy(), wide_out.numpy(), op=self._MPI.SUM)],
                  "reduce_scatter", t)
        if wide_out is not out:
            out.copy_(wide_out)

    def _all_to_all(self, out, t, send, recv):
        sd = [0, *torch.tensor(send).cumsum(0).tolist()[:-1]]
        rd = [0, *torch.tensor(recv).cumsum(0).tolist()[:-1]]
        req = self.comm.Ialltoallv([self._np(t), (send, sd)], [self._np(out), (recv, rd)])
        self.wait([req], "all_to_all", t)

    def _broadcast(self, t, src, deadline, limit):
        self.wait([self.comm.Ibcast(self._np(t), root=src)], f"broadcast from rank {src}", t, deadline, limit=limit)

    def _p2p(self, sends, recvs):
        reqs = [self.comm.Isend(self._np(t), dest=p, tag=7) for t, p in sends]
        reqs += [self.comm.Irecv(self._np(t), source=p, tag=7) for t, p in recvs]
        peers = sorted({p for _, p in (*sends, *recvs)})
        return _MPIRequests(self, reqs, f"send/recv with rank(s) {peers}", sends[0][0] if sends else None)


class _Waiter:
    """One daemon thread that runs blocking ``work.wait()`` calls handed to it (saves starting a thread per
    call: ~0.2 ms under load)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True, name="seqpar-wait").start()

    def _run(self) -> None:
        while True:
            work, done, errors = self.jobs.get()
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                errors.append(e)
            finally:
                # drop the work (it holds the transfer's tensors) before waking the caller: kept until the
                # next job, it held the last all-to-all's send and receive buffers past the call
                work = None
                done.set()


_WAITER: _Waiter | None = None


class _Requests:
    """Started torch.distributed P2P works; ``wait()`` is bounded by :func:`timeout_s` from the start."""

    def __init__(self, comm: TorchCommunicator, reqs, what: str, t: torch.Tensor | None):
        self.comm, self.reqs, self.what, self.t = comm, reqs, what, t
        self.deadline = time.monotonic() + timeout_s()

    def wait(self) -> None:
        self.comm._wait(self.reqs, self.what, self.t, self.deadline)


class _MPIRequests:
    def __init__(self, comm: MPICommunicator, reqs, what: str, t: torch.Tensor | None):
        self.comm, self.reqs, self.what, self.t = comm, reqs, what, t
        self.deadline = time.monotonic() + timeout_s()

    def wait(self) -> None:
        self.comm.wait(self.reqs, self.what, self.t, self.deadline)


class RingComm:
    """Ring transfers: queue ``send_recv`` calls, ``commit()`` them together, ``wait()`` for them.

    ``send_recv(t)`` sends ``t`` to the next rank and returns the buffer the previous rank's tensor
    arrives in (valid after ``wait()``); ``reverse=True`` goes the other way round.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.next = (comm.rank + 1) % comm.world_size
        self.prev = (comm.rank - 1) % comm.world_size
        self._sends: list[tuple[torch.Tensor, int]] = []
        self._recvs: list[tuple[torch.Tensor, int]] = []
        self._handle: Any = None

    def send_recv(self, t: torch.Tensor, recv_buf: torch.Tensor | None = None) -> torch.Tensor:
        t = t.contiguous()
        buf = torch.empty_like(t) if recv_buf is None else recv_buf
        self._sends.append((t, self.next))
        self._recvs.append((buf, self.prev))
        return buf

    def commit(self) -> None:
        if self._handle is not None:
            raise RuntimeError("RingComm.commit() called twice without wait()")
        self._handle = self.comm.send_recv(self._sends, self._recvs)

    def wait(self) -> None:
        if self._handle is not None:
            self._handle.wait()
        self._handle = None
        self._sends, self._recvs = [], []


_CACHE: dict[int, tuple[Any, Communicator]] = {}


def job_store(prefix: str) -> Any:
    """The job's key-value store under ``prefix`` (the rendezvous store of the default torch.distributed group), for
    out-of-band signals that must not wait in a collective -- the service's heartbeats. torch has no public
    accessor for it (``_get_default_store``, stable since 1.x): this is the one place seqpar reaches for it."""
    if not dist.is_initialized():
        raise RuntimeError("seqpar: no default torch.distributed group, hence no job store")
    return dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())


def get_communicator(group: Any = None) -> Communicator:
    """The communicator for ``group``: None (default torch group), a ``ProcessGroup``, an
    ``mpi4py`` ``Comm``, or a :class:`Communicator`. Cached, so byte counters persist."""
    if isinstance(group, Communicator):
        return group
    hit = _CACHE.get(id(group))
    if hit is not None and hit[0] is group:
        comm = hit[1]
        stale = group is None and (  # the default group was destroyed and started again
            not dist.is_initialized() or (dist.get_rank(), dist.get_world_size()) != (comm.rank, comm.world_size)
        )
        if not stale:
            return comm
    if group is None or isinstance(group, dist.ProcessGroup):
        comm: Communicator = TorchCommunicator(group)
    elif type(group).__module__.startswith("mpi4py"):
        comm = MPICommunicator(group)
    else:
        raise TypeError(
            f"group={group!r}; allowed: None (default torch.distributed group), a torch.distributed "
            "ProcessGroup, an mpi4py MPI.Comm, or a seqpar Communicator"
        )
    if group is not None or dist.is_initialized():
        _CACHE[id(group)] = (group, comm)
    return comm


class LocalCommunicator(Communicator):
    """A group of one rank (a grid dimension of size 1): every collective is the identity, nothing is sent."""

    rank, world_size = 0, 1


def is_grid(group: Any) -> bool:
    """Whether ``group`` describes a 2-D grid: a 2-D ``DeviceMesh`` or a pair ``(inner, outer)`` of ProcessGroups."""
    if isinstance(group, (tuple, list)):
        return len(group) == 2 and all(isinstance(g, dist.ProcessGroup) for g in group)
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device_mesh
        return False
    return isinstance(group, DeviceMesh)


def grid_groups(group: Any, inner_size: int | None) -> tuple[Any, Any]:
    """``(inner, outer)`` ProcessGroups of a grid: a 2-D ``DeviceMesh`` (dims (outer, inner)), a pair
    ``(inner, outer)``, or (``group`` None) the standard grid of the default group, ``inner_size`` consecutive
    ranks per inner group (rank = outer * inner_size + inner), built once per default group and cached. Every
    rank must call this at the same point (``new_group`` is collective over the default group)."""
    if isinstance(group, (tuple, list)):
        return group[0], group[1]
    if type(group).__module__.startswith("mpi4py"):
        return _mpi_grid(group, inner_size)
    if group is not None:
        if group.ndim != 2:
            raise ValueError(f"group: a DeviceMesh of {group.ndim} dims; allowed: 2 (outer, inner)")
        return group.get_group(1), group.get_group(0)
    w, r, n = dist.get_world_size(), dist.get_rank(), inner_size
    key = (id(dist.group.WORLD), w, n)
    hit = _GRIDS.get(key)
    if hit is None or hit[0] is not dist.group.WORLD:
        inner = [dist.new_group(list(range(o * n, (o + 1) * n))) for o in range(w // n)]
        outer = [dist.new_group(list(range(i, w, n))) for i in range(n)]
        hit = _GRIDS[key] = (dist.group.WORLD, inner, outer)
    return hit[1][r // n], hit[2][r % n]


_GRIDS: dict[tuple[int, int, int], tuple[Any, list[Any], list[Any]]] = {}
_MPI_GRIDS: dict[tuple[int, int], tuple[Any, Any, Any]] = {}


def _mpi_grid(comm: Any, n: int) -> tuple[Any, Any]:
    """``(inner, outer)`` of an mpi4py communicator: ``Split`` into blocks of ``n`` consecutive ranks and into the
    ranks of equal ``rank % n`` (collective over ``comm``, like ``new_group``); built once per communicator."""
    key = (id(comm), n)
    hit = _MPI_GRIDS.get(key)
    if hit is None or hit[0] is not comm:
        r = comm.Get_rank()
        hit = _MPI_GRIDS[key] = (comm, comm.Split(r // n, r), comm.Split(r % n, r))
    return hit[1], hit[2]


def grid_coordinates(inner: Any, outer: Any) -> tuple[int, int, int, int]:
    """This rank's ``(inner group id, inner rank, outer group id, outer rank)``; a group's id is its rank 0's
    global rank."""
    return (dist.get_global_rank(inner, 0), dist.get_rank(inner), dist.get_global_rank(outer, 0),
            dist.get_rank(outer))


def grid_communicator(group: Any, whole: Communicator) -> Communicator:
    """The communicator of one grid dimension: its bytes count into ``whole``'s too."""
    comm = get_communicator(group)
    if comm.world_size == 1:
        comm = LocalCommunicator()
    if comm is not whole:
        comm.counts_to = whole
    return comm


_HOOKED = False


def install_mpi_abort_hook() -> None:
    """Make an uncaught exception on this rank abort the whole MPI job (``MPI.COMM_WORLD.Abort(1)``
    after the usual traceback), as ``python -m mpi4py`` does: otherwise the other ranks would wait in
    their next collective (forever under a plain MPI communicator). Idempotent; chained to the
    previous ``sys.excepthook``. Installed by ``seqpar.init_distributed`` under MPI and when an
    mpi4py communicator is first used."""
    global _HOOKED
    if _HOOKED:
        return
    from mpi4py import MPI

    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            previous(kind, value, tb)
            sys.stderr.write(f"seqpar: uncaught {kind.__name__} on MPI rank {MPI.COMM_WORLD.Get_rank()}: "
                             "aborting the MPI job\n")
            sys.stderr.flush()
            time.sleep(1.0)  # let the launcher forward the traceback before the abort tears the job down
        finally:
            MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
    _HOOKED = True
