"""Ring: K/V travel around the ring; each step overlaps the next transfer with this block's compute.

::

    forward   for step in 0..W-1:            (holding K/V of src = rank - step)
                  start send K/V -> next, receive from prev
                  (out, lse) <- merge(attend(q, K_src, V_src))      empty blocks skipped
                  wait; swap
    backward  for each key chunk [a, b) of the shards (``chunks``: up to 8, none under 1024 rows), one ring:
                  the chunk's K/V travel as in the forward; its dK/dV accumulator (float32) travels one step
                  behind: block backward for src (its dK/dV held, up to one accumulator's worth, until src's
                  accumulator is in from prev; queries in pieces of the same size); add; start sending it
                  on. After W steps it is home: rows [a, b) of this rank's dk, dv.

Bytes per rank: ``(W-1) * |k + v|`` forward (padded to the longest shard), plus ``(W-1) * |k + v|`` and
``W * |dk + dv|`` (float32) backward -- the chunks add up to the same bytes, in more messages.

Memory per rank above the inputs (``U`` = ``|k|`` padded, float32; ``c = U / 8`` for large shards; measured with
torch's allocation events, ``tests/test_ring_memory.py``): forward ``out`` accumulator U + K/V arriving 2U + one
block; backward ``out`` U + dq U + dk, dv 2U + our K/V chunk 2c + K/V received 2c (+ 2c arriving when W > 2) +
the chunk's dK/dV accumulator in flight 2c + the one arriving 2c + block grads held 2c + one kernel call on a
chunk. At S=32768, H=2, D=64, W=2 (U = 8 MiB): 47 MiB against 81 for single-process SDPA on the whole sequence
(whole shards travelling: 89; before that, with float32 dK/dV scratch and per-block copies of dout/out: 113).
Receive buffers are reused once their send has completed.
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
        n, m = max(setup.sizes), setup.sizes[setup.rank]
        dq = torch.zeros(q.shape, dtype=stat_dtype(q.dtype), device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for a, b in chunks(n):  # one ring per key chunk: every buffer that travels is a chunk
            dkv = _backward_ring(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, setup, a, b, dq)
            dk[:, :, a:min(b, m)] = dkv[0, :, :, : max(0, min(b, m) - a)]
            dv[:, :, a:min(b, m)] = dkv[1, :, :, : max(0, min(b, m) - a)]
            del dkv
        return dq.to(q.dtype), dk, dv, None


CHUNKS = 8  # the backward's rings per call, and query pieces per kernel call, at most ...
MIN_CHUNK_ROWS = 1024  # ... and no chunk under this many rows: smaller kernel calls cost more than they save
# (W=2, S=4096, H=8, D=64 on CPU: 8 chunks of 256 rows made fwd+bwd 23 % slower than one)


def chunks(n: int) -> list[tuple[int, int]]:
    """``[a, b)`` bounds splitting ``n`` rows into near-equal chunks: ``CHUNKS`` of them, fewer when a chunk would
    have fewer than ``MIN_CHUNK_ROWS`` rows (one chunk below ``2 * MIN_CHUNK_ROWS``)."""
    parts = max(1, min(CHUNKS, n // max(1, MIN_CHUNK_ROWS)))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _backward_ring(dout, q, k, v, out, lse, setup: Setup, a: int, b: int, dq: torch.Tensor) -> torch.Tensor:
    """One ring over key rows ``[a, b)`` of every shard (``k, v``: this rank's, ``b - a`` rows or fewer): adds
    their dq contributions into ``dq``; returns this rank's dK/dV accumulator ``(2, B, H_kv, b - a, D)`` once
    it has come home."""
    w, rank = setup.world_size, setup.rank
    qt = setup.tokens[rank]
    kv_ring, d_ring = RingComm(setup.comm), RingComm(setup.comm)
    kb, vb = _pad(k, b - a), _pad(v, b - a)
    spare = (None, None)
    # dK/dV accumulator (2, B, H_kv, b - a, D) of the K/V in hand: ours first; then, from step 1 on, the one that
    # arrives from prev (sent at the end of its previous step) into the buffer whose send has completed.
    dkv = torch.zeros(2, *k.shape[:2], b - a, k.shape[3], dtype=dq.dtype, device=k.device)
    d_in = free = None
    for step in range(w):
        src = (rank - step) % w
        if step + 1 < w:
            nk, nv = kv_ring.send_recv(kb, spare[0]), kv_ring.send_recv(vb, spare[1])
            kv_ring.commit()
        m = max(0, min(b, setup.sizes[src]) - a)
        kt = setup.tokens[src].slice(a, a + m)
        pieces = [(dout[:, :, qa:qb], q[:, :, qa:qb], kb[:, :, :m], vb[:, :, :m], out[:, :, qa:qb], lse[:, :, qa:qb],
                   qt.slice(qa, qb), kt, setup.spec, setup.scale, dq[:, :, qa:qb]) for qa, qb in chunks(q.shape[2])]
        if step == 0:
            for *args, dq_part in pieces:
                tiled_backward(*args, acc=(dq_part, dkv[0, :, :, :m], dkv[1, :, :, :m]))
        else:  # src's accumulator arrives while this runs: the block grads wait for it (up to its size)
            held, size = [], 0
            for part in (part for args in pieces for part in backward_blocks(*args)):
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
    return dkv


def _add(dkv: torch.Tensor, parts: list) -> None:
    """Add block grads ``(key slice, dk, dv)`` into the accumulator ``dkv (2, B, H_kv, n, D)``; empties ``parts``."""
    for ks, gk, gv in parts:
        dkv[0, :, :, ks] += gk
        dkv[1, :, :, ks] += gv
    parts.clear()


def _spare(buf: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A K/V buffer whose send has completed, to receive the next one in: any but the caller's own tensor."""
    return None if buf is own else buf
