"""The strategy registry: one record per strategy, read by :func:`seqpar.attention`, :func:`seqpar.plan`,
``strategy="auto"``, the benchmark, configs and the CLI.

Adding a strategy is its file (one autograd Function) plus its record here, and its name in ``STRATEGIES``
(a literal tuple: the tools read it from the source without importing torch).

Bytes are what one rank sends, counted as :class:`seqpar.comm.Communicator` counts them (all-gather
``(W-1) * n_local``, reduce-scatter ``(W-1)/W * n_total``, all-reduce ``2(W-1)/W * n``, all-to-all and
point-to-point the bytes addressed to other ranks), for the exact shard lengths of the call: padded to the
longest shard where the algorithm pads, uneven where it does not. The formulas cover the strategy's own
traffic; :func:`seqpar.plan.bytes_sent` adds the call's one argument check (:func:`seqpar.checks.agree`).
Document ids / key padding, when given, add an all-gather of ``B * S_r`` int64 / uint8 each (not counted here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from seqpar.strategies.allgather import AllGatherAttention
from seqpar.strategies.allreduce import AllReduceAttention
from seqpar.strategies.ring import RingAttention
from seqpar.strategies.ulysses import UlyssesAttention, has_copies, head_split
from seqpar.strategies.ulysses_ring import UlyssesRingAttention, travelling_kv_heads

STRATEGIES = ("allreduce", "ring", "allgather", "ulysses", "ulysses_ring")


@dataclass(frozen=True)
class Shape:
    """One call's sizes: ``q_sizes`` / ``kv_sizes`` tokens per rank, ``e`` bytes per input element; ``inner``: the
    inner size of ``ulysses_ring``'s grid (ranks ``o*inner .. o*inner + inner - 1`` form an inner group; default
    every rank)."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    q_sizes: tuple[int, ...]
    kv_sizes: tuple[int, ...]
    e: int
    inner: int | None = None

    @property
    def w(self) -> int:
        return len(self.kv_sizes)

    @property
    def s(self) -> int:
        """Bytes per element of the float32 (float64 for float64 inputs) accumulators and statistics."""
        return 8 if self.e == 8 else 4


def _ag(w: int, n_local: int) -> int:
    return (w - 1) * n_local


def _rs(w: int, n_total: int) -> int:
    return int((w - 1) / w * n_total)


def _ar(w: int, n: int) -> int:
    return int(2 * (w - 1) / w * n)


def _allreduce_bytes(x: Shape, rank: int) -> tuple[int, int]:
    b, h, d, w, nq, sq = x.batch, x.heads, x.head_dim, x.w, max(x.q_sizes), sum(x.q_sizes)
    fwd = _ag(w, b * h * nq * d * x.e) + _ar(w, b * h * sq * x.s) + _rs(w, w * b * h * nq * (d + 1) * x.s)
    bwd = _ag(w, 3 * b * h * nq * d * x.e) + _ag(w, b * h * nq * x.s) + _rs(w, w * b * h * nq * d * x.s)
    return fwd, bwd


def _allgather_bytes(x: Shape, rank: int) -> tuple[int, int]:
    kv = 2 * x.batch * x.kv_heads * max(x.kv_sizes) * x.head_dim
    return _ag(x.w, kv * x.e), _rs(x.w, x.w * kv * x.s)


def _ring_bytes(x: Shape, rank: int) -> tuple[int, int]:
    kv = 2 * x.batch * x.kv_heads * max(x.kv_sizes) * x.head_dim
    fwd = (x.w - 1) * kv * x.e
    return fwd, fwd + (x.w * kv * x.s if x.w > 1 else 0)


def _ulysses_bytes(x: Shape, rank: int) -> tuple[int, int]:
    split = head_split(x.heads, x.kv_heads, x.w)
    h = [qb - qa for qa, qb, _, _ in split]
    g = [kb - ka for _, _, ka, kb in split]
    bq = [x.batch * s * x.head_dim for s in x.q_sizes]
    bk = [x.batch * s * x.head_dim for s in x.kv_sizes]
    others = [j for j in range(x.w) if j != rank]
    e2 = x.s if has_copies(split) else x.e
    fwd = sum((bq[rank] * h[j] + 2 * bk[rank] * g[j] + bq[j] * h[rank]) * x.e for j in others)
    bwd = sum(bq[rank] * h[j] * x.e + (bq[j] * h[rank] + 2 * bk[j] * g[rank]) * e2 for j in others)
    return fwd, bwd


def _grid(x: Shape, rank: int) -> tuple[Shape, int, int, int]:
    """``ulysses_ring``: the inner group's Shape, this rank's inner rank, the outer size, the longest union."""
    n = x.w if x.inner is None else x.inner
    o, i = divmod(rank, n)
    sub = Shape(x.batch, x.heads, x.kv_heads, x.head_dim, x.q_sizes[o * n : (o + 1) * n],
                x.kv_sizes[o * n : (o + 1) * n], x.e)
    longest = max(sum(x.kv_sizes[a : a + n]) for a in range(0, x.w, n))
    return sub, i, x.w // n, longest


def ulysses_ring_parts(x: Shape, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((all-to-all fwd, bwd), (ring fwd, bwd))`` bytes of ``ulysses_ring`` for ``rank``."""
    sub, i, m, longest = _grid(x, rank)
    kv = 2 * x.batch * travelling_kv_heads(x.heads, x.kv_heads, sub.w, i) * longest * x.head_dim
    ring_fwd = (m - 1) * kv * x.e
    return _ulysses_bytes(sub, i), (ring_fwd, ring_fwd + (m * kv * x.s if m > 1 else 0))


def _ulysses_ring_bytes(x: Shape, rank: int) -> tuple[int, int]:
    (af, ab), (rf, rb) = ulysses_ring_parts(x, rank)
    return af + rf, ab + rb


def _ulysses_ring_memory(x: Shape) -> int:
    """Ulysses' head-sharded q, k, v, out of the longest union plus the ring's two K/V buffers, on the busiest rank."""
    n = x.w if x.inner is None else x.inner
    _, _, _, longest = _grid(x, 0)
    most = max((qb - qa) * 2 + (kb - ka) * 2 for qa, qb, ka, kb in head_split(x.heads, x.kv_heads, n))
    g = max(travelling_kv_heads(x.heads, x.kv_heads, n, i) for i in range(n))
    return (most + 4 * g) * x.batch * longest * x.head_dim * x.e


def _kv_local(x: Shape) -> int:
    return 2 * x.batch * x.kv_heads * max(x.kv_sizes) * x.head_dim * x.e


def _ulysses_memory(x: Shape) -> int:
    """The head-sharded q, k, v, out of the whole sequence on the busiest rank (they replace nothing: the
    local shards stay with the caller)."""
    split = head_split(x.heads, x.kv_heads, x.w)
    most = max((qb - qa) * 2 + (kb - ka) * 2 for qa, qb, ka, kb in split)
    return most * x.batch * sum(x.kv_sizes) * x.head_dim * x.e


@dataclass(frozen=True)
class Strategy:
    """One strategy: its autograd Function ``fn.apply(q, k, v, setup)``, the bytes each rank sends
    (``bytes(shape, rank) -> (forward, backward)``), the memory it adds on top of the local shards
    (``memory(shape)``), and what it needs of the call (``constraints``, words for the docs)."""

    name: str
    fn: type
    bytes: Callable[[Shape, int], tuple[int, int]]
    memory: Callable[[Shape], int]
    constraints: str
    summary: str


REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("allreduce", AllReduceAttention, _allreduce_bytes,
                 lambda x: x.w * x.batch * x.heads * max(x.q_sizes) * (x.head_dim * x.e + (x.head_dim + 2) * x.s),
                 "none", "gather the queries, attend to local keys, combine by LSE"),
        Strategy("ring", RingAttention, _ring_bytes, lambda x: 2 * _kv_local(x),
                 "none", "K/V around the ring, transfers overlap compute"),
        Strategy("allgather", AllGatherAttention, _allgather_bytes, lambda x: x.w * _kv_local(x),
                 "none", "gather K/V once, attend local queries to all keys"),
        Strategy("ulysses", UlyssesAttention, _ulysses_bytes, _ulysses_memory,
                 "none (heads split unevenly when W does not divide them; H < W leaves ranks idle)",
                 "all-to-all to head shards, attend the whole sequence, all-to-all back"),
        Strategy("ulysses_ring", UlyssesRingAttention, _ulysses_ring_bytes, _ulysses_ring_memory,
                 "the ranks form a grid (group= a 2-D DeviceMesh, a pair (inner, outer), or None / an mpi4py Comm: "
                 "the launcher's ranks per node per inner group); heads split over the inner size as in ulysses",
                 "all-to-all inside the inner group, ring across the outer one"),
    )
}
assert tuple(REGISTRY) == STRATEGIES


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise ValueError(f"strategy={name!r}; allowed: {', '.join(map(repr, STRATEGIES))}")
    return REGISTRY[name]
