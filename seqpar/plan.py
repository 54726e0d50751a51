"""The cost model behind ``strategy="auto"``: bytes each rank sends, the memory it adds, and a two-link time model.

Per rank, forward, with ``e`` bytes per element, ``S_r = S / W`` local tokens (the exact per-rank formulas, for
uneven shards too, are the registry's: :mod:`seqpar.strategies.registry`)::

    allreduce   (W-1) * B*H*Sq_r*D*e            gather the queries
              + (W-1)/W * B*H*Sq*(D+1)*4        reduce-scatter the float32 partial outputs
              + 2(W-1)/W * B*H*Sq*4             all-reduce the row maxima
    allgather   (W-1) * 2*B*H_kv*Sk_r*D*e       gather K and V           memory: + 2*B*H_kv*Sk*D*e
    ring        (W-1) * 2*B*H_kv*Sk_r*D*e       pass K and V around      memory: + 4*B*H_kv*Sk_r*D*e
    ulysses     (W-1)/W * B*S_r*D*(2H + 2H_kv)*e  q, k, v in, out back   memory: + B*S*D*(2H + 2H_kv)/W*e
                (H_kv >= W; with H_kv < W each rank receives the K/V heads its query heads use)
    ulysses_ring  ulysses over the n ranks of a node + (m-1) * 2*B*(H_kv/n)*(n*S_r)*D*e around the m nodes
                (shown by plan(); never auto's pick: it needs group= a grid, which then selects it)

Backward adds, per rank (``kv32`` = the K/V shard's gradients in float32, ``2*B*H_kv*Sk_r*D*4``)::

    allreduce   3(W-1) * B*H*Sq_r*D*e + (W-1) * B*H*Sq_r*4     gather q, out, dout and the LSE
              + (W-1)/W * B*H*Sq*D*4                        reduce-scatter dq (float32)
    allgather   (W-1) * kv32                                reduce-scatter dK, dV (float32)
    ring        (W-1) * 2*B*H_kv*Sk_r*D*e + W * kv32        K/V around again; dK/dV travel home
    ulysses     (W-1)/W * B*S_r*D*(2H + 2H_kv)*e            dout in; dq, dk, dv back

:func:`bytes_sent` evaluates the registry's formula (``seqpar bench`` and ``seqpar run`` compare it with the
counted bytes; tests/test_strategies_registry.py asserts equality on uneven shapes).

The rule (:func:`plan`): the least communication left *exposed* (not hidden behind compute) under a model of
two links, inside a node and across nodes, with documented defaults (the module constants). Bytes alone no
longer decide: ``ulysses`` sends fewer bytes than ``ring`` whenever ``H_kv`` is large, but its all-to-alls
cannot overlap the attention, while the ring's steps can; at long sequences the ring's transfers hide entirely.
Measured on CPU at W = 2 (``seqpar bench``, S = 8k and 16k) ``ring`` was as fast as or faster than
``allgather`` in 3 of 4 configurations and within 3 % in the fourth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from seqpar.layout import LAYOUTS, shard_sizes
from seqpar.strategies.registry import REGISTRY, STRATEGIES, Shape, ulysses_ring_parts


def bytes_sent(
    strategy: str, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, world_size: int,
    element_size: int, q_len: int | None = None, layout: str = "contiguous", rank: int | None = None,
    inner: int | None = None,
) -> dict[str, int]:
    """Bytes one rank sends for one forward call (``"fwd"``) and one forward + backward (``"fwd_bwd"``): the
    strategy's registered formula (:mod:`seqpar.strategies.registry`) for the shard lengths ``layout`` gives.
    Each call also all-gathers its argument check (:func:`seqpar.checks.agree`, a small int64 row: not counted
    here). ``rank``: that rank's figure; default the largest over the ranks (they differ only for ``ulysses``
    with uneven shards or heads). ``inner``: ``ulysses_ring``'s inner size (default: every rank; must divide
    ``world_size``)."""
    if strategy not in REGISTRY:
        raise ValueError(f"strategy={strategy!r}; allowed: {', '.join(map(repr, STRATEGIES))}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(map(repr, LAYOUTS))}")
    w = world_size
    if inner is not None and (not isinstance(inner, int) or inner < 1 or w % inner):
        raise ValueError(f"inner={inner!r}; allowed: None or a divisor of world_size={w}")
    sq = seq_len if q_len is None else q_len
    x = Shape(batch, heads, kv_heads, head_dim, tuple(shard_sizes(sq, w, layout)),
              tuple(shard_sizes(seq_len, w, layout)), element_size, inner)
    fn = REGISTRY[strategy].bytes
    per_rank = [fn(x, r) for r in (range(w) if rank is None else [rank])]
    fwd = max(f for f, _ in per_rank)
    fwd_bwd = max(f + b for f, b in per_rank)
    return {"fwd": int(fwd), "fwd_bwd": int(fwd_bwd)}


#: The link model's defaults (:func:`plan`): an 8-GPU node of the H100 class -- NVLink inside the node, one
#: 200 Gb/s NIC per GPU across nodes -- and a dense bf16 attention kernel's sustained rate.
INTRA_NODE_BANDWIDTH = 150e9  # bytes/s one rank sends inside a node (NVLink 4: 450 GB/s peak, ~1/3 in collectives)
INTER_NODE_BANDWIDTH = 25e9  # bytes/s one rank sends to another node (200 Gb/s InfiniBand / RoCE per GPU)
LATENCY_S = 10e-6  # per collective or ring step
FLOPS = 300e12  # attention FLOP/s per rank (flash attention forward, bf16, H100: ~300-400 TFLOP/s)


@dataclass
class Plan:
    strategy: str
    reason: str
    bytes_per_rank: dict[str, int] = field(default_factory=dict)
    extra_memory: dict[str, int] = field(default_factory=dict)
    exposed_s: dict[str, float] = field(default_factory=dict)  # communication not hidden behind compute (fwd)
    compute_s: float = 0.0  # the forward's attention compute per rank

    def table(self) -> str:
        rows = [f"{'strategy':<12} {'bytes/rank (fwd)':>18} {'exposed comm':>13} {'extra memory':>14}"
                f"   (compute {self.compute_s * 1e3:.3g} ms/rank)"]
        for s in STRATEGIES:
            mark = "  <- " + self.reason if s == self.strategy else ""
            rows.append(f"{s:<12} {self.bytes_per_rank[s]:>18,} {self.exposed_s[s] * 1e3:>10.3g} ms "
                        f"{self.extra_memory[s]:>14,}{mark}")
        return "\n".join(rows)


def plan(
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    world_size: int,
    dtype: torch.dtype = torch.bfloat16,
    q_len: int | None = None,
    ranks_per_node: int | None = None,
    intra_node_bandwidth: float = INTRA_NODE_BANDWIDTH,
    inter_node_bandwidth: float = INTER_NODE_BANDWIDTH,
    latency_s: float = LATENCY_S,
    flops: float = FLOPS,
) -> Plan:
    """Which strategy ``auto`` picks for these shapes, and why: the least communication left exposed.

    ``seq_len`` is the global key length; ``q_len`` the global query length (default: the same, as
    in training; pass e.g. 1 for decode). ``ranks_per_node`` (default: every rank on one node) sets which
    transfers cross nodes; the module constants give the defaults of the link model.

    Model, per rank, forward (the backward repeats the pattern): compute ``c = 4*B*H*Sq*Sk*D / W / flops``
    (the same for every strategy). A strategy whose ranks span nodes moves its bytes at
    ``inter_node_bandwidth`` (the slowest link bounds a ring step or a collective), else at
    ``intra_node_bandwidth``; ``ulysses``' all-to-all sends ``(W - n)/(W - 1)`` of its bytes across nodes
    (``n`` ranks per node) and its time is the larger of the two links' shares. Exposed communication:
    ``allreduce``, ``allgather``, ``ulysses``: all of it (collectives before/after the compute), plus
    ``latency_s`` per collective; ``ring``: per step ``max(0, step transfer - c/W)``, W - 1 steps (each step's
    K/V transfer runs behind the previous block's compute); ``ulysses_ring`` (a candidate when ``ranks_per_node``
    cuts the ranks into several nodes of several ranks, inner size = ranks per node): its all-to-all at the node's
    link plus its ring steps across nodes, each hidden behind ``c / m`` of compute. The least exposed time wins;
    ties go to the fewest bytes, then to ``ring``, ``ulysses``, ``ulysses_ring``, ``allgather``, ``allreduce``.
    """
    sizes = {
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_len": seq_len, "head_dim": head_dim,
        "world_size": world_size, "q_len": 1 if q_len is None else q_len,
        "ranks_per_node": 1 if ranks_per_node is None else ranks_per_node,
    }
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name}={n!r}; allowed: an int >= 1")
    for name, v in {"intra_node_bandwidth": intra_node_bandwidth, "inter_node_bandwidth": inter_node_bandwidth,
                    "flops": flops}.items():
        if not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"{name}={v!r}; allowed: a finite number > 0")
    if not isinstance(latency_s, (int, float)) or not 0 <= latency_s < float("inf"):
        raise ValueError(f"latency_s={latency_s!r}; allowed: a finite number >= 0")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    w, e = world_size, torch.empty((), dtype=dtype).element_size()
    n = w if ranks_per_node is None else min(ranks_per_node, w)
    sq = seq_len if q_len is None else q_len
    inner = math.gcd(n, w)  # ulysses_ring's inner size: the ranks of a node (a divisor of W)
    x = Shape(batch, heads, kv_heads, head_dim, tuple(shard_sizes(sq, w, "contiguous")),
              tuple(shard_sizes(seq_len, w, "contiguous")), e, inner)
    cost = {s: bytes_sent(s, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim,
                          world_size=w, element_size=e, q_len=q_len, inner=inner)["fwd"] for s in STRATEGIES}
    memory = {s: REGISTRY[s].memory(x) for s in STRATEGIES}
    compute = 4 * batch * heads * sq * seq_len * head_dim / w / flops
    if w == 1:
        return Plan("allgather", "one rank: nothing to communicate", cost, memory, dict.fromkeys(STRATEGIES, 0.0),
                    compute)
    bw = inter_node_bandwidth if n < w else intra_node_bandwidth
    inter = (w - n) / (w - 1)
    step = cost["ring"] / (w - 1) / bw + latency_s
    exposed = {
        "allreduce": cost["allreduce"] / bw + 3 * latency_s,
        "ring": (w - 1) * max(0.0, step - compute / w),
        "allgather": cost["allgather"] / bw + latency_s,
        "ulysses": max(cost["ulysses"] * (1 - inter) / intra_node_bandwidth,
                       cost["ulysses"] * inter / inter_node_bandwidth) + 2 * latency_s,
        "ulysses_ring": _two_level_exposed(x, inner, compute, intra_node_bandwidth, inter_node_bandwidth, latency_s),
    }
    order = ("ring", "ulysses", "allgather", "allreduce")
    if 1 < n < w and w % n == 0:  # several nodes of several ranks: the two-level arrangement is a candidate too
        order = ("ring", "ulysses", "ulysses_ring", "allgather", "allreduce")
    best = min(order, key=lambda s: (round(exposed[s], 12), cost[s], order.index(s)))
    why = {
        "ring": "transfers hidden behind compute" if exposed["ring"] == 0 else "least exposed communication",
        "ulysses": "least exposed communication: fewest bytes (heads moved, not K/V around the ring)",
        "ulysses_ring": "least exposed communication: all-to-all inside a node, ring across nodes",
        "allgather": "least exposed communication: one collective",
        "allreduce": "least exposed communication: queries smaller than K/V",
    }[best]
    return Plan(best, why, cost, memory, exposed, compute)


def _two_level_exposed(x: Shape, inner: int, compute: float, intra: float, inter: float, latency_s: float) -> float:
    """``ulysses_ring``'s exposed forward communication on the busiest rank: its all-to-alls inside a node (all
    exposed) plus its ring steps across nodes, each hidden behind one step's compute ``compute / m``."""
    m = x.w // inner
    worst = 0.0
    for r in range(x.w):
        (a2a, _), (ring, _) = ulysses_ring_parts(x, r)
        step = ring / (m - 1) / (inter if inner < x.w else intra) + latency_s if m > 1 else 0.0
        worst = max(worst, a2a / intra + 2 * latency_s + (m - 1) * max(0.0, step - compute / m))
    return worst


# --- decode over a sharded KV cache (seqpar.decode) ------------------------------------------------------------

DECODE_COMBINES = ("allgather", "allreduce")
DECODE_HEADER = 12  # ints in seqpar.decode's header (the step's arguments, checked inside the collective)


@dataclass
class DecodePlan:
    combine: str
    reason: str
    bytes_per_rank: dict[str, int] = field(default_factory=dict)
    collectives: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def decode_combine(
    *,
    batch: int,
    heads: int,
    q_len: int,
    head_dim: int,
    world_size: int,
    latency_s: float = 50e-6,
    bandwidth: float = 2e9,
) -> DecodePlan:
    """Which combine ``seqpar.decode`` uses for one layer's decode step, by an alpha-beta model.

    With ``n = B * H * T * (D + 1) * 4`` bytes (each rank's float32 partial output and LSE; the
    context length does not appear)::

        allgather   1 collective     (W-1) * n                   gather every partial, merge locally
        allreduce   2 collectives    2(W-1)/W * (n + B*H*T*4)    MAX of the LSEs, SUM of rescaled partials
        all-to-all  2 collectives    ~2(W-1)/W * n               (heads split; not offered: same bytes as
                                                                  allreduce, needs a primitive comm lacks)

    time = collectives * ``latency_s`` + bytes / ``bandwidth``; the smaller wins. Defaults are of the
    order measured for gloo over loopback (tens of microseconds per collective, GB/s): small decode
    steps are latency-bound and take ``allgather``; large batches at many ranks take ``allreduce``.
    """
    for name, v in {"batch": batch, "heads": heads, "q_len": q_len, "head_dim": head_dim,
                    "world_size": world_size}.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}; allowed: an int >= 1")
    w, rows = world_size, batch * heads * q_len
    n = (rows * (head_dim + 1) + DECODE_HEADER) * 4
    cost = {
        "allgather": int((w - 1) * n),
        "allreduce": int(2 * (w - 1) / w * (n + (rows + DECODE_HEADER) * 4)),
    }
    calls = {"allgather": 1, "allreduce": 2}
    secs = {c: calls[c] * latency_s + cost[c] / bandwidth for c in DECODE_COMBINES}
    if w == 1:
        return DecodePlan("allgather", "one rank: nothing to communicate", cost, calls, secs)
    best = min(DECODE_COMBINES, key=lambda c: secs[c])
    why = "one collective: latency-bound step" if best == "allgather" else "fewer bytes outweigh a second collective"
    return DecodePlan(best, why, cost, calls, secs)
