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
``W * |dk + dv|`` (float32) backward.  Memory: two K/V buffers.
"""

from __future__ import annotations

import torch

from seqpar.comm import RingComm
from seqpar.ops.lse import stat_dtype
from seqpar.ops.tiled import tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


def _pad(kv: torch.Tensor, n: int) -> torch.Tensor:
    """(2, B, H_kv, S_r, D) -> padded to length n along the sequence, contiguous."""
    if kv.shape[3] == n:
        return kv.contiguous()
    return torch.cat([kv, kv.new_zeros(*kv.shape[:3], n - kv.shape[3], kv.shape[4])], dim=3)


class RingAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    ============  ========================  ===============================
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        w, rank, n = setup.world_size, setup.rank, max(setup.sizes)
        qt = setup.tokens[rank]
        ring = RingComm(setup.comm)
        buf = _pad(torch.stack([k, v]), n)
        acc = None
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nxt = ring.send_recv(buf)
                ring.commit()
            kv = buf[:, :, :, : setup.sizes[src]]
            acc = tiled_forward(q, kv[0], kv[1], qt, setup.tokens[src], setup.spec, setup.scale, acc)
            if step + 1 < w:
                ring.wait()
                buf = nxt
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
        buf = _pad(torch.stack([k, v]), n)
        dq = torch.zeros(q.shape, dtype=sd, device=q.device)
        dkv = d_in = None  # accumulator for the K/V of `src` (2, B, H_kv, n, D) float32, and the next one
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nxt = kv_ring.send_recv(buf)
                kv_ring.commit()
            m = setup.sizes[src]
            kv = buf[:, :, :, :m]
            gq, gk, gv = tiled_backward(dout, q, kv[0], kv[1], out, lse, qt, setup.tokens[src], setup.spec, setup.scale)
            dq += gq
            if step == 0:
                dkv = torch.zeros(2, *k.shape[:2], n, k.shape[3], dtype=sd, device=k.device)
            else:
                d_ring.wait()  # src's accumulator, sent by prev at the end of its previous step
                dkv = d_in
            dkv[0, :, :, :m] += gk
            dkv[1, :, :, :m] += gv
            if step + 1 < w:
                kv_ring.wait()
                buf = nxt
            if w > 1:
                d_in = d_ring.send_recv(dkv)
                d_ring.commit()
        if w > 1:
            d_ring.wait()  # after W steps the accumulator of our own K/V has come home
            dkv = d_in
        m = setup.sizes[rank]
        return dq.to(q.dtype), dkv[0, :, :, :m].to(q.dtype), dkv[1, :, :, :m].to(q.dtype), None
