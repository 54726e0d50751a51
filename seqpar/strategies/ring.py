"""Ring: K/V travel around the ring; each step overlaps the next transfer with this block's compute.

::

    forward   for step in 0..W-1:            (holding K/V of src = rank - step)
                  start send K/V -> next, receive from prev
                  (out, lse) <- merge(attend(q, K_src, V_src))      empty blocks skipped
                  wait; swap
    backward  same ring; dK/dV accumulators (float32) travel one step behind their K/V:
                  start K/V transfer; block backward for src; wait for src's dK/dV from prev;
                  add; start sending them on.  After W steps they are home.

Bytes per rank: ``(W-1) * |k + v|`` forward (padded to the longest shard), plus
``W * |dk + dv|`` (float32) backward.  Memory: two K/V buffers; backward also two float32 dK/dV buffers
and one in flight.
"""

from __future__ import annotations

import torch

from seqpar.comm import RingComm
from seqpar.ops.lse import stat_dtype
from seqpar.ops.tiled import tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H_kv, S_r, D) -> padded to length n along the sequence, contiguous (``t`` itself when it already is)."""
    if t.shape[2] == n:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(*t.shape[:2], n - t.shape[2], t.shape[3])], dim=2)


class RingAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    ============  ========================  ===============================

    Memory: K and V travel as they are (no stacked copy; padded only when shards are uneven); the backward
    adds each block's dK/dV into one reused float32 scratch and dq in place (no per-step gradient buffers).
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        w, rank, n = setup.world_size, setup.rank, max(setup.sizes)
        qt = setup.tokens[rank]
        ring = RingComm(setup.comm)
        kb, vb = _pad(k, n), _pad(v, n)
        acc = None
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nk, nv = ring.send_recv(kb), ring.send_recv(vb)
                ring.commit()
            m = setup.sizes[src]
            acc = tiled_forward(q, kb[:, :, :m], vb[:, :, :m], qt, setup.tokens[src], setup.spec, setup.scale, acc)
            if step + 1 < w:
                ring.wait()
                kb, vb = nk, nv
        del kb, vb
        out, lse = acc
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        setup: Setup = ctx.setup
        w, rank, n = setup.world_size, setup.rank, max(setup.sizes)
        qt = setup.tokens[rank]
        sd = stat_dtype(q.dtype)
        kv_ring, d_ring = RingComm(setup.comm), RingComm(setup.comm)
        kb, vb = _pad(k, n), _pad(v, n)
        dq = torch.zeros(q.shape, dtype=sd, device=q.device)
        scratch = torch.zeros(2, *k.shape[:2], n, k.shape[3], dtype=sd, device=k.device)  # this step's dK/dV
        dkv = d_in = None  # accumulator for the K/V of `src` (2, B, H_kv, n, D) float32, and the next one
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nk, nv = kv_ring.send_recv(kb), kv_ring.send_recv(vb)
                kv_ring.commit()
            m = setup.sizes[src]
            g = scratch[:, :, :, :m]
            g.zero_()
            tiled_backward(dout, q, kb[:, :, :m], vb[:, :, :m], out, lse, qt, setup.tokens[src], setup.spec,
                           setup.scale, acc=(dq, g[0], g[1]))
            if step == 0:
                dkv, scratch = scratch, torch.zeros_like(scratch)  # our own block's: the first accumulator
            else:
                d_ring.wait()  # src's accumulator, sent by prev at the end of its previous step
                dkv = d_in
                dkv[:, :, :, :m] += g
            if step + 1 < w:
                kv_ring.wait()
                kb, vb = nk, nv
            if w > 1:
                d_in = d_ring.send_recv(dkv)
                d_ring.commit()
        del kb, vb, scratch
        if w > 1:
            d_ring.wait()  # after W steps the accumulator of our own K/V has come home
            dkv = d_in
        m = setup.sizes[rank]
        return dq.to(q.dtype), dkv[0, :, :, :m].to(q.dtype), dkv[1, :, :, :m].to(q.dtype), None
