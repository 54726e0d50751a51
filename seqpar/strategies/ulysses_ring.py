"""Ulysses x ring (two levels, yunchang's USP / TransformerEngine's a2a+p2p): the ranks form an ``m x n`` grid;
all-to-all along the inner dimension (``n`` ranks, e.g. one node), ring along the outer one (``m``, across nodes).

::

    forward   [q | k | v] (B, H, S_r, D)  --all-to-all over the inner group-->  (B, H_i, U, D)
              U: the union of the inner group's tokens (sorted by global position); H_i: inner rank i's heads
              ring over the outer group (ring.py's schedule): K/V blocks of the same heads and the other
              inner groups' unions travel around; (out, lse) merged by LSE, masks on global positions
              out (B, H_i, U, D)  --all-to-all back-->  (B, H, S_r, D)
    backward  dout --all-to-all--> head-sharded; the ring backward (dK/dV travel home, float32);
              dq, dk, dv --all-to-all back (K/V head copies, H_kv < n: summed at home, sent in float32)

The head split is Ulysses' for ``n`` ranks (:func:`seqpar.strategies.ulysses.head_split`): the ring's peers
share the inner rank, so they hold the same heads. When a rank's query heads cut a GQA group
(:func:`~seqpar.strategies.ulysses._local_kv`) its K/V heads are expanded to one per query head *before* the
ring (those blocks travel expanded; their gradients are summed back before the all-to-all).
Any ``S``: uneven shards go through the uneven all-to-all; the ring pads the unions to the longest one.
With ``m = 1`` this is ``ulysses``; with ``n = 1`` it is ``ring``.

Bytes per rank (inner rank ``i`` among ``n``, ``m`` outer ranks; ``U_max`` the longest union; ``g'_i`` the K/V
heads that travel, ``g_i`` or ``h_i`` when expanded)::

    all-to-all  ulysses' formula over the inner group (its shard lengths, its head split)
    ring        forward (m-1) * 2*B*g'_i*U_max*D*e;  backward the same + m * 2*B*g'_i*U_max*D*4 (m > 1)

Memory: the head-sharded q, k, v, out of the union (as large as the local shards with an even head split),
plus the ring's two K/V buffers (backward: and the float32 dK/dV in flight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from seqpar.ops.lse import stat_dtype
from seqpar.ops.masks import Tokens
from seqpar.strategies.ring import RingAttention
from seqpar.strategies.setup import Setup
from seqpar.strategies.ulysses import _local_kv, _to_heads, _to_sequence, has_copies, head_split, take_saved


@dataclass
class MeshSetup:
    """One call on the grid: ``whole`` (every rank), ``inner`` (the inner group: its members' shard lengths,
    ``tokens[j].pos`` = where member ``j``'s tokens go in the union), ``outer`` (the outer group: each member's
    union as :class:`Tokens` with global positions)."""

    whole: Setup
    inner: Setup
    outer: Setup


def _union(setup: Setup, members: list[int]) -> tuple[Tokens, list[torch.Tensor]]:
    """The tokens of ``members`` (whole ranks) sorted by global position, and where each member's tokens go."""
    parts = [setup.tokens[r] for r in members]
    pos = torch.cat([t.pos for t in parts])
    order = torch.argsort(pos)
    upos = pos[order]

    def place(attr):
        if getattr(parts[0], attr) is None:
            return None
        return torch.cat([getattr(t, attr) for t in parts], dim=1)[:, order]

    return Tokens(upos, place("doc"), place("keep")), [torch.searchsorted(upos, t.pos) for t in parts]


def mesh_setup(setup: Setup, inner_comm, outer_comm, inner_members: list[int], rows: list[list[int]]) -> MeshSetup:
    """``inner_members``: this rank's inner group (whole ranks, by inner rank); ``rows[o]``: the inner group of
    outer rank ``o`` (``rows[outer rank]`` is ``inner_members``)."""
    unions = [_union(setup, row)[0] for row in rows]
    _, where = _union(setup, inner_members)
    inner = Setup(inner_comm, setup.scale, setup.spec, [setup.sizes[r] for r in inner_members],
                  [Tokens(p) for p in where])
    outer = Setup(outer_comm, setup.scale, setup.spec, [len(u) for u in unions], unions)
    return MeshSetup(setup, inner, outer)


LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")  # torchrun, Open MPI, MPICH


def inner_size(world_size: int) -> int:
    """The inner size without a grid (``group=None`` or an mpi4py communicator): the ranks per node as the launcher
    says -- ``LOCAL_WORLD_SIZE`` (torchrun), else Open MPI's / MPICH's local size -- else every rank. ValueError
    unless it divides ``world_size``. Tools pass it as ``seqpar.plan.bytes_sent(inner=...)``."""
    var = next((v for v in LOCAL_SIZE_VARS if v in os.environ), None)
    raw = os.environ[var] if var else str(world_size)
    n = int(raw) if raw.strip().isdigit() else 0
    if not 1 <= n <= world_size or world_size % n:
        raise ValueError(f"strategy='ulysses_ring' with {var or 'LOCAL_WORLD_SIZE'}={raw!r} (the inner size); "
                         f"allowed: a divisor of the world size {world_size}")
    return n


class _Ctx:
    """Stands in for autograd's ctx when the ring's Function runs as a step of this one."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def travelling_kv_heads(heads: int, kv_heads: int, inner: int, i: int) -> int:
    """K/V heads inner rank ``i`` sends around the ring (expanded to one per query head when they cut a group)."""
    qa, qb, ka, kb = head_split(heads, kv_heads, inner)[i]
    return qb - qa if _local_kv(qa, qb, ka, kb, heads // kv_heads) is not None else kb - ka


class UlyssesRingAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    setup         MeshSetup                 :func:`mesh_setup`
    ============  ========================  ===============================
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: MeshSetup):
        h, h_kv, inner = q.shape[1], k.shape[1], setup.inner
        split = head_split(h, h_kv, inner.world_size)
        qr, kr = [(a, b) for a, b, _, _ in split], [(a, b) for _, _, a, b in split]
        (qf,), (kf,), (vf,) = (_to_heads(inner, [(t, rng)], q.dtype) for t, rng in ((q, qr), (k, kr), (v, kr)))
        idx = _local_kv(*split[inner.rank], h // h_kv)
        if idx is not None:  # one K/V head per query head (query heads cut a group; see _local_kv)
            idx = idx.to(q.device)
            kf, vf = kf.index_select(1, idx), vf.index_select(1, idx)
        ring = None
        if qf.shape[1]:  # the outer peers share this inner rank, hence this head count: all skip together
            ring = _Ctx()
            out_f = RingAttention.forward(ring, qf, kf, vf, setup.outer)
        else:
            out_f = qf.new_zeros(qf.shape)
        (out,) = _to_sequence(inner, [(out_f, qr)], [h], q.dtype)
        ctx.setup, ctx.split, ctx.idx, ctx.shape = setup, split, idx, (h, h_kv)
        ctx.head_sharded = [ring, qf, kf, vf]  # intermediates: on ctx, so the backward can let them go (take_saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        ring, qf, kf, vf = take_saved(ctx, "ulysses_ring")
        setup, split, (h, h_kv), dtype = ctx.setup, ctx.split, ctx.shape, dout.dtype
        inner = setup.inner
        qr, kr = [(a, b) for a, b, _, _ in split], [(a, b) for _, _, a, b in split]
        (dof,) = _to_heads(inner, [(dout, qr)], dtype)
        if ring is not None:
            gq, gk, gv, _ = RingAttention.backward(ring, dof)
        else:
            gq, gk, gv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        del dof, qf, kf, vf, ring
        sd = stat_dtype(dtype)
        if ctx.idx is not None:  # sum the per-query-head K/V gradients back onto this rank's K/V heads
            _, _, ka, kb = split[inner.rank]
            gk, gv = (t.new_zeros(t.shape[0], kb - ka, *t.shape[2:], dtype=sd).index_add_(1, ctx.idx, t.to(sd))
                      for t in (gk, gv))
        gd = sd if has_copies(split) else dtype  # copies' gradients are summed: accumulate wide
        (dq,) = _to_sequence(inner, [(gq, qr)], [h], gd)
        del gq
        (dk,) = _to_sequence(inner, [(gk, kr)], [h_kv], gd)
        del gk
        (dv,) = _to_sequence(inner, [(gv, kr)], [h_kv], gd)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None
