"""Ring: K/V travel around the ring; each step overlaps the next transfer with this block's compute.

::

    forward   for step in 0..W-1:            (holding K/V of src = rank - step)
                  start send K/V -> next, receive from prev
                  (out, lse) <- merge(attend(q, K_src, V_src))      empty blocks skipped
                  wait; swap
    backward  for each pass over the shards' key rows (``passes``: chunks of >= 1024 rows, up to 16, paired with
              their mirror so every ring holds keys from both ends of each shard), one ring: the pass's K/V
              travel as in the forward; its dK/dV accumulator (float32) travels one step behind: block backward
              for src (queries in up to 8 pieces; its dK/dV held, up to one accumulator's worth, until src's
              accumulator is in from prev); add; start sending it on. After W steps it is home: those rows of
              this rank's dk, dv.

Bytes per rank: ``(W-1) * |k + v|`` forward (padded to the longest shard), plus ``(W-1) * |k + v|`` and
``W * |dk + dv|`` (float32) backward -- the chunks add up to the same bytes, in more messages.

Memory per rank above the inputs (``U`` = ``|k|`` padded, float32; ``c = U / 8``, a pass, for large shards;
measured with torch's allocation events, ``tests/test_ring_memory.py``): forward ``out`` accumulator U + K/V
arriving 2U + one block; backward ``out`` U + dq U + dk, dv 2U + our K/V rows of the pass 2c + K/V received 2c
(+ 2c arriving when W > 2) + the pass's dK/dV accumulator in flight 2c + the one arriving 2c + block grads held 2c
+ one kernel call on a query piece. At S=32768, H=2, D=64, W=2 (U = 8 MiB): 46 MiB against 81 for single-process
SDPA on the whole sequence (whole shards travelling: 89; before that, with float32 dK/dV scratch and per-block
copies of dout/out: 113).
Receive buffers are reused once their send has completed.
"""

from __future__ import annotations

import torch

from seqpar.comm import RingComm
from seqpar.ops.lse import stat_dtype
from seqpar.ops.tiled import backward_blocks, tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


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
        kb, vb = (_rows(t, [(0, n)], setup.sizes[rank]) for t in (k, v))  # padded to the longest shard
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
        for ranges in passes(n):  # one ring per pass: every buffer that travels is a pass's rows
            dkv = _backward_ring(dout, q, k, v, out, lse, setup, ranges, dq)
            off = 0
            for a, b in ranges:  # this rank's rows of the pass, in the accumulator's order
                own = max(0, min(b, m) - a)
                dk[:, :, a:a + own], dv[:, :, a:a + own] = dkv[0, :, :, off:off + own], dkv[1, :, :, off:off + own]
                off += b - a
            del dkv
        return dq.to(q.dtype), dk, dv, None


CHUNKS = 16  # the backward's key chunks per call, at most (paired into CHUNKS / 2 rings) ...
MIN_CHUNK_ROWS = 1024  # ... and none under this many rows (W=2, S=4096, H=8 on CPU: 256-row chunks were 23 % slower)
Q_PIECES = 8  # query pieces per kernel call, at most (none under MIN_CHUNK_ROWS either): the kernel's dq is a piece


def chunks(n: int, most: int | None = None) -> list[tuple[int, int]]:
    """``[a, b)`` bounds splitting ``n`` rows into near-equal chunks: ``most`` of them, fewer when a chunk would
    have fewer than ``MIN_CHUNK_ROWS`` rows (one chunk below ``2 * MIN_CHUNK_ROWS``)."""
    parts = max(1, min(CHUNKS if most is None else most, n // max(1, MIN_CHUNK_ROWS)))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def passes(n: int) -> list[list[tuple[int, int]]]:
    """The backward's rings over ``n`` key rows (the padded shard): chunk ``i`` with its mirror ``-1 - i`` (the
    middle one alone when their number is odd). Paired, every ring holds keys from both ends of each shard, so a
    zigzag layout's ranks do the same work at every step of every ring: contiguous chunks gave one rank twice the
    other's work at alternate rings (W=2, causal, S=16384, H=8: fwd+bwd 15 % slower than whole shards)."""
    c = chunks(n)
    return [[c[i], c[-1 - i]] if i != len(c) - 1 - i else [c[i]] for i in range((len(c) + 1) // 2)]


def _backward_ring(dout, q, k, v, out, lse, setup: Setup, ranges: list[tuple[int, int]], dq) -> torch.Tensor:
    """One ring over key rows ``ranges`` of every shard (``k, v``: this rank's whole shard): adds their dq
    contributions into ``dq``; returns this rank's dK/dV accumulator ``(2, B, H_kv, L, D)`` (``L`` = the ranges'
    rows, in order) once it has come home."""
    w, rank = setup.world_size, setup.rank
    qt = setup.tokens[rank]
    kv_ring, d_ring = RingComm(setup.comm), RingComm(setup.comm)
    rows = [(a, b - a) for a, b in ranges]
    own = setup.sizes[rank]
    kb, vb = (_rows(t, rows, own) for t in (k, v))
    spare = (None, None)
    # dK/dV accumulator (2, B, H_kv, L, D) of the K/V in hand: ours first; then, from step 1 on, the one that
    # arrives from prev (sent at the end of its previous step) into the buffer whose send has completed.
    dkv = torch.zeros(2, *k.shape[:2], kb.shape[2], k.shape[3], dtype=dq.dtype, device=k.device)
    d_in = free = None
    q_pieces = chunks(q.shape[2], Q_PIECES)
    for step in range(w):
        src = (rank - step) % w
        if step + 1 < w:
            nk, nv = kv_ring.send_recv(kb, spare[0]), kv_ring.send_recv(vb, spare[1])
            kv_ring.commit()
        parts, off = [], 0  # (offset in the buffer, src's valid rows there, their tokens) per range
        for a, n in rows:
            m = max(0, min(a + n, setup.sizes[src]) - a)
            parts.append((off, m, setup.tokens[src].slice(a, a + m)))
            off += n
        calls = [(off, m, (dout[:, :, qa:qb], q[:, :, qa:qb], kb[:, :, off:off + m], vb[:, :, off:off + m],
                           out[:, :, qa:qb], lse[:, :, qa:qb], qt.slice(qa, qb), kt, setup.spec, setup.scale),
                  dq[:, :, qa:qb]) for off, m, kt in parts for qa, qb in q_pieces if m]
        if step == 0:
            for off, m, args, dq_part in calls:
                tiled_backward(*args, acc=(dq_part, dkv[0, :, :, off:off + m], dkv[1, :, :, off:off + m]))
        else:  # src's accumulator arrives while this runs: the block grads wait for it (up to its size)
            held, size = [], 0
            for off, _, args, dq_part in calls:
                for ks, gk, gv in backward_blocks(*args, dq_part):
                    held.append((slice(ks.start + off, ks.stop + off), gk, gv))
                    size += 2 * gk.nbytes
                    del gk, gv
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


def _rows(t: torch.Tensor, rows: list[tuple[int, int]], own: int) -> torch.Tensor:
    """Rows ``[a, a + n)`` for each ``(a, n)`` of ``t (B, H_kv, own, D)``, one after the other in one contiguous
    buffer, zeros past ``own`` (the padding of a shorter shard); ``t`` itself (or its view) when that is one range
    of rows it holds and already contiguous."""
    if len(rows) == 1 and rows[0][0] + rows[0][1] <= own:
        (a, n), = rows
        return t[:, :, a:a + n].contiguous()
    out = t.new_zeros(*t.shape[:2], sum(n for _, n in rows), t.shape[3])
    off = 0
    for a, n in rows:
        m = max(0, min(a + n, own) - a)
        out[:, :, off:off + m] = t[:, :, a:a + m]
        off += n
    return out


def _add(dkv: torch.Tensor, parts: list) -> None:
    """Add block grads ``(key slice, dk, dv)`` into the accumulator ``dkv (2, B, H_kv, n, D)``; empties ``parts``."""
    for ks, gk, gv in parts:
        dkv[0, :, :, ks] += gk
        dkv[1, :, :, ks] += gv
    parts.clear()


def _spare(buf: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A K/V buffer whose send has completed, to receive the next one in: any but (a view of) the caller's own
    tensor."""
    return None if buf.untyped_storage().data_ptr() == own.untyped_storage().data_ptr() else buf
