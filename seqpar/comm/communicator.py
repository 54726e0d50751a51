"""All communication of seqpar, behind one small interface.

:class:`Communicator` is what the rest of the package talks to. Two implementations:

- :class:`TorchCommunicator` over a ``torch.distributed`` process group (gloo, NCCL);
- :class:`MPICommunicator` over an ``mpi4py`` communicator (CPU tensors; numpy at the API edge).

:func:`get_communicator` turns the user's ``group`` argument (None, a ``ProcessGroup``, an
``MPI.Comm``) into one. :class:`RingComm` queues ring sends/receives (``send_recv``, ``commit``,
``wait``) like ring-flash-attention's class of the same name.

Byte accounting (``bytes_sent``): what one rank puts on the wire under the bandwidth-optimal
algorithm of each collective -- all-reduce ``2(W-1)/W * n``, all-gather ``(W-1) * n_local``,
reduce-scatter ``(W-1)/W * n_total``, point-to-point the bytes sent.

Timeouts: a dead peer surfaces as an error after the process group's ``timeout`` (set it with
``torch.distributed.init_process_group(..., timeout=datetime.timedelta(seconds=60))`` or
``seqpar.init_distributed(timeout_s=60)``). Under MPI, the launcher aborts the job when a rank dies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


class Communicator:
    """Collectives on CPU/GPU tensors. Subclasses implement the ``_``-prefixed primitives."""

    rank: int
    world_size: int

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

    def _p2p(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> Any:
        """Start sends/receives (peers are ranks of this communicator); return a ``wait()``-able."""
        raise NotImplementedError

    # -- the interface -----------------------------------------------------------------------
    def _count(self, nbytes: float) -> None:
        self.bytes_sent += int(nbytes)

    def reset_stats(self) -> None:
        self.bytes_sent = 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place (``t`` must be contiguous); ``op`` in {'sum', 'max'}. Returns ``t``."""
        if op not in ("sum", "max"):
            raise ValueError(f"op={op!r}; allowed: 'sum', 'max'")
        if self.world_size > 1:
            self._count(2 * (self.world_size - 1) / self.world_size * t.numel() * t.element_size())
            self._all_reduce(t, op)
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

    def send_recv(
        self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
    ) -> Any:
        """Start point-to-point transfers (contiguous tensors); returns a handle with ``wait()``."""
        self._count(sum(t.numel() * t.element_size() for t, _ in sends))
        return self._p2p(sends, recvs)


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

    def _all_reduce(self, t, op):
        dist.all_reduce(t, op=self._OPS[op], group=self.group)

    def _all_gather(self, out, t):
        _ALL_GATHER(out, t, group=self.group)

    def _reduce_scatter(self, out, t):
        _REDUCE_SCATTER(out, t, op=dist.ReduceOp.SUM, group=self.group)

    def _p2p(self, sends, recvs):
        ops = [dist.P2POp(dist.isend, t, self._global[p], self.group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global[p], self.group) for t, p in recvs]
        return _Requests(dist.batch_isend_irecv(ops) if ops else [])


class MPICommunicator(Communicator):
    """Over an ``mpi4py`` communicator; CPU tensors only (moved through numpy views, no copies)."""

    def __init__(self, comm: Any) -> None:
        super().__init__()
        from mpi4py import MPI  # imported lazily: the mpi extra is optional

        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    @staticmethod
    def _np(t: torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(f"MPI communicator needs CPU tensors, got device={t.device}")
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy()  # moved as raw bits
        return t.numpy()

    def _all_reduce(self, t, op):
        wide = t if t.dtype in (torch.float32, torch.float64, torch.int64, torch.int32) else t.float()
        mpi_op = self._MPI.SUM if op == "sum" else self._MPI.MAX
        self.comm.Allreduce(self._MPI.IN_PLACE, wide.numpy(), op=mpi_op)
        if wide is not t:
            t.copy_(wide)

    def _all_gather(self, out, t):
        self.comm.Allgather(self._np(t), self._np(out))

    def _reduce_scatter(self, out, t):
        wide_in = t if t.dtype in (torch.float32, torch.float64) else t.float()
        wide_out = out if out.dtype == wide_in.dtype else out.float()
        self.comm.Reduce_scatter_block(wide_in.numpy(), wide_out.numpy(), op=self._MPI.SUM)
        if wide_out is not out:
            out.copy_(wide_out)

    def _p2p(self, sends, recvs):
        reqs = [self.comm.Isend(self._np(t), dest=p, tag=7) for t, p in sends]
        reqs += [self.comm.Irecv(self._np(t), source=p, tag=7) for t, p in recvs]
        return _MPIRequests(reqs, self._MPI)


class _Requests:
    def __init__(self, reqs):
        self.reqs = reqs

    def wait(self) -> None:
        for r in self.reqs:
            r.wait()


class _MPIRequests:
    def __init__(self, reqs, mpi):
        self.reqs, self.mpi = reqs, mpi

    def wait(self) -> None:
        self.mpi.Request.Waitall(self.reqs)


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
