"""Ring: K/V travel around the ring; each step overlaps the next transfer with this block's compute.

::

    forward   for step in 0..W-1:            (holding K/V of src = rank - step)
                  start send K/V -> next, receive from prev
                  (out, lse) <- merge(attend(q, K_src, V_src))      empty blocks skipped
                  wait; swap
    backward  same ring; dK/dV accumulators (float32) travel one step behind their K/V:
                  start K/V transfer; block backward for src (its dK/dV held, up to one accumulator's
                  worth, until src's accumulator is in from prev); add; start sending it on.  After W
                  steps they are home.

Bytes per rank: ``(W-1) * |k + v|`` forward (padded to the longest shard), plus
``W * |dk + dv|`` (float32) backward.

Memory per rank above the inputs (``U`` = ``|k|`` padded, float32; measured with torch's allocation events,
``tests/test_ring_memory.py``): forward ``out`` accumulator U + K/V arriving 2U + one block; backward, at its
peak, ``out`` U + dq U + K/V in hand 2U (+ K/V arriving 2U when W > 2) + the dK/dV accumulator in flight 2U
+ the one arriving 2U + one kernel call (its dq, dk, dv and its own copy of dout). At S=32768, H=2, D=64,
W=2 (U = 8 MiB): 89 MiB (was 113: a float32 dK/dV scratch, re-allocated once, and contiguous copies of
dout/out per block). Receive buffers are reused once their send has completed.
"""

from __future__ import annotations

import torch

from seqpar.comm import RingComm
from seqpar.ops.lse import stat_dtype
from seqpar.ops.tiled import backward_blocks, tiled_backward, tiled_forward
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
    adds dq in place and each block's dK/dV, as the kernel returns them, into the accumulator of their K/V
    (no scratch, no per-step gradient buffers).
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        w, rank, n = setup.world_size, setup.rank, max(setup.sizes)
        qt = setup.tokens[rank]
        ring = RingComm(setup.comm)
        kb, vb = _pad(k, n), _pad(v, n)
        spare = (None, None)
        acc = None
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nk, nv = ring.send_recv(kb, spare[0]), ring.send_recv(vb, spare[1])
                ring.commit()
            m = setup.sizes[src]
            acc = tiled_forward(q, kb[:, :, :m], vb[:, :, :m], qt, setup.tokens[src], setup.spec, setup.scale, acc)
            if step + 1 < w:
                ring.wait()
                spare = _spare(kb, k), _spare(vb, v)
                kb, vb = nk, nv
        del kb, vb, spare
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
        spare = (None, None)
        dq = torch.zeros(q.shape, dtype=sd, device=q.device)
        # dK/dV accumulator (2, B, H_kv, n, D) of the K/V in hand: ours first; then, from step 1 on, the one that
        # arrives from prev (sent at the end of its previous step) into the buffer whose send has completed.
        dkv = torch.zeros(2, *k.shape[:2], n, k.shape[3], dtype=sd, device=k.device)
        d_in = free = None
        for step in range(w):
            src = (rank - step) % w
            if step + 1 < w:
                nk, nv = kv_ring.send_recv(kb, spare[0]), kv_ring.send_recv(vb, spare[1])
                kv_ring.commit()
            m = setup.sizes[src]
            args = (dout, q, kb[:, :, :m], vb[:, :, :m], out, lse, qt, setup.tokens[src], setup.spec, setup.scale)
            if step == 0:
                tiled_backward(*args, acc=(dq, dkv[0, :, :, :m], dkv[1, :, :, :m]))
            else:  # src's accumulator arrives while this runs: the block grads wait for it (up to its size)
                held, size = [], 0
                for part in backward_blocks(*args, dq):
                    held.append(part)
                    size += 2 * part[1].nbytes
                    del part
                    if d_in is not None and size > dkv.nbytes:  # holding more would cost more than it saves
                        d_ring.wait()
                        free, dkv, d_in = dkv, d_in, None
                    if d_in is None:
                        _add(dkv, held)
                if d_in is not None:
                    d_ring.wait()
                    free, dkv, d_in = dkv, d_in, None
                _add(dkv, held)
            if step + 1 < w:
                kv_ring.wait()
                spare = _spare(kb, k), _spare(vb, v)
                kb, vb = nk, nv
            else:
                kb = vb = spare = None
            if w > 1:
                d_in = d_ring.send_recv(dkv, free)  # free: the accumulator sent at the end of the previous step
                d_ring.commit()
                free = None
        if w > 1:
            d_ring.wait()  # after W steps the accumulator of our own K/V has come home
            dkv = d_in
        m = setup.sizes[rank]
        return dq.to(q.dtype), dkv[0, :, :, :m].to(q.dtype), dkv[1, :, :, :m].to(q.dtype), None


def _add(dkv: torch.Tensor, parts: list) -> None:
    """Add block grads ``(key slice, dk, dv)`` into the accumulator ``dkv (2, B, H_kv, n, D)``; empties ``parts``."""
    for ks, gk, gv in parts:
        dkv[0, :, :, ks] += gk
        dkv[1, :, :, ks] += gv
    parts.clear()


def _spare(buf: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A K/V buffer whose send has completed, to receive the next one in: any but the caller's own tensor."""
    return None if buf is own else buf
