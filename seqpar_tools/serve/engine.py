"""The state every rank of the service holds, and the steps that change it -- identically on every rank.

Sessions (one sequence each) live in **arenas**: a :class:`seqpar.KVCache` of ``session_slots`` slots for
sessions of one shape ``(layers, kv_heads, head_dim, dtype, capacity)``. Sharing an arena is what lets the
attends of several sessions run as one :func:`seqpar.decode_attention` call per layer -- one combining
collective for the whole batch. An arena is preallocated whole (per rank: ``slots x (ceil(capacity / W) +
block + 1)`` tokens per layer), and that is what the per-rank token budget counts as reserved.

Rank 0 validates every request against this state *before* a step is broadcast, so a step never fails
half-way: every rank applies the same ops in the same order (ids, slots and arena numbers are decided by
rank 0 and travel in the step). Ops::

    create  {sid, aid, new_arena, layers, heads, kv_heads, head_dim, dtype, capacity}   KVCache + allocate
    delete  {sid}                                                                      KVCache.free
    append  {sid, layer, k, v}       store the owned tokens (the placement of seqpar.cache), no collective
    attend  {sids, layers, H, T, scale, weights, q, k, v}   decode_attention per layer over the batch's slots
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seqpar.cache import KVCache
from seqpar.decode import decode_attention

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@dataclass
class Arena:
    aid: int
    key: tuple  # (layers, kv_heads, head_dim, dtype, capacity)
    cache: KVCache
    sessions: set = field(default_factory=set)


@dataclass
class Session:
    sid: str
    arena: Arena
    slot: int
    heads: int
    spec: dict

    @property
    def cache(self) -> KVCache:
        return self.arena.cache

    def length(self, layer: int) -> int:
        return self.cache.lengths[layer][self.slot]


class Engine:
    """Sessions and arenas of one rank; :meth:`apply` runs a step's ops (the same on every rank)."""

    def __init__(self, *, session_slots: int, block_size: int, placement: str = "round_robin", group: Any = None):
        self.session_slots, self.block_size, self.placement, self.group = session_slots, block_size, placement, group
        self.sessions: dict[str, Session] = {}
        self.arenas: dict[int, Arena] = {}

    # -- what rank 0 asks before building a step (pure functions of the replicated state) --
    def arena_for(self, key: tuple) -> Arena | None:
        """An arena of this shape with a free slot, or None (a new one is needed)."""
        for a in self.arenas.values():
            if a.key == key and len(a.sessions) < a.cache.max_batch:
                return a
        return None

    def arena_tokens(self, capacity: int, world_size: int) -> int:
        """Tokens per rank per layer a new arena of sessions of ``capacity`` reserves."""
        return self.session_slots * (-(-capacity // world_size) + self.block_size + 1)

    def reserved(self) -> int:
        """Tokens reserved per rank (every rank reserves the same), summed over arenas and layers."""
        return sum(a.cache.max_batch * a.cache.capacity * a.cache.num_layers for a in self.arenas.values())

    def used(self, rank: int) -> int:
        """Tokens stored on ``rank``, summed over sessions and layers."""
        return sum(s.cache.local_count(s.slot, s.length(layer), rank)
                   for s in self.sessions.values() for layer in range(s.cache.num_layers))

    # -- the step, on every rank --
    def apply(self, ops: list[dict], tensors: dict[str, torch.Tensor], rank: int, world_size: int) -> list[Any]:
        """Run ``ops`` in order; the per-op results (meaningful on rank 0; weights are gathered there)."""
        results = []
        for i, op in enumerate(ops):
            kind = op["op"]
            if kind == "create":
                results.append(self._create(op))
            elif kind == "delete":
                s = self.sessions.pop(op["sid"])
                s.cache.free([s.slot])
                s.arena.sessions.discard(s.sid)
                if not s.arena.sessions:
                    del self.arenas[s.arena.aid]
                results.append({"deleted": s.sid})
            elif kind == "append":
                s = self.sessions[op["sid"]]
                results.append({"length": append(s.cache, op["layer"], s.slot, tensors[f"{i}.k"], tensors[f"{i}.v"])})
            elif kind == "attend":
                results.append(self._attend(op, tensors[f"{i}.q"], tensors[f"{i}.k"], tensors[f"{i}.v"], rank,
                                            world_size))
            else:  # pragma: no cover - rank 0 builds the ops
                raise ValueError(f"unknown op {kind!r}")
        return results

    def _create(self, op: dict) -> dict:
        key = (op["layers"], op["kv_heads"], op["head_dim"], op["dtype"], op["capacity"])
        if op["new_arena"]:
            cache = KVCache(num_layers=op["layers"], max_batch=self.session_slots, max_seq_len=op["capacity"],
                            kv_heads=op["kv_heads"], head_dim=op["head_dim"], dtype=TORCH_DTYPES[op["dtype"]],
                            placement=self.placement, block_size=self.block_size, group=self.group)
            self.arenas[op["aid"]] = Arena(op["aid"], key, cache)
        arena = self.arenas[op["aid"]]
        (slot,) = arena.cache.allocate(1)
        arena.sessions.add(op["sid"])
        self.sessions[op["sid"]] = Session(op["sid"], arena, slot, op["heads"], dict(op))
        return {"session": op["sid"]}

    def _attend(self, op: dict, q, k, v, rank: int, world_size: int) -> dict:
        """q (B, L, H, T, D), k/v (B, L, H_kv, T, D) for the batch's sessions ``op["sids"]`` (one arena): one
        ``decode_attention`` per layer over the batch's slots (read in place, whatever the slots), one
        combining collective per layer for the whole batch."""
        sessions = [self.sessions[sid] for sid in op["sids"]]
        slots = [s.slot for s in sessions]
        cache = sessions[0].cache
        outs, lses, weights = [], [], []
        for j, layer in enumerate(op["layers"]):
            res = decode_attention(cache, layer, q[:, j], k[:, j], v[:, j], slots=slots, scale=op["scale"],
                                   return_lse=True, return_weights=op["weights"])
            outs.append(res[0])
            lses.append(res[-1])
            if op["weights"]:
                weights.append(res[1])  # (B, H, T, n) this rank's keys, local order
        result = {"out": torch.stack(outs, 1), "lse": torch.stack(lses, 1)}
        if op["weights"]:
            result["weights"] = self._gather_weights(sessions, op["layers"], weights, rank, world_size)
        return result

    def _gather_weights(self, sessions, layers, w, rank, world_size):
        """Every rank's weight shard of each session, on rank 0: ``[[(pos (n_r,), w (L, H, T, n_r)) per rank]
        per session]`` (None elsewhere). ``w``: per layer, this rank's ``(B, H, T, n)`` weights.
        One all-gather of the padded shards plus one of their positions (seqpar's communicator)."""
        cache = sessions[0].cache
        counts = [[cache.local_count(s.slot, s.length(layers[0]), r) for r in range(world_size)] for s in sessions]
        b = len(sessions)
        n = max(max(c) for c in counts)
        pad = torch.zeros(b, len(layers), *w[0].shape[1:3], n, dtype=w[0].dtype)
        pos = torch.full((b, n), -1, dtype=torch.int64)
        for i, s in enumerate(sessions):
            c = counts[i][rank]
            for j in range(len(layers)):
                pad[i, j, ..., :c] = w[j][i, ..., :c]
            pos[i, :c] = cache.pos[s.slot, :c]
        allw, allp = cache.comm.all_gather(pad), cache.comm.all_gather(pos)  # (W, ...) every rank's shards
        if rank != 0:
            return None
        return [[(allp[r][i, :counts[i][r]], allw[r][i, ..., :counts[i][r]]) for r in range(world_size)]
                for i in range(b)]


def append(cache: KVCache, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """Store the tokens of ``k, v (H_kv, T, D)`` this rank owns (exactly where :func:`seqpar.decode_attention`
    stores them: ``KVCache._store``), then commit the length -- no collective: every rank applies the same step.
    Capacity was checked by rank 0. Returns the length."""
    cache._store(layer, slot, k, v)
    cache.lengths[layer][slot] += k.shape[1]
    return cache.lengths[layer][slot]
