"""A KV cache split across ranks: preallocated per rank, several layers, a ragged batch of sequences.

Every rank holds the keys/values of the global positions it *owns* and nothing else; the metadata
(which slots are live, each sequence's length per layer) is replicated and changes identically on
every rank, so every rank can compute every other rank's share without talking to it.

Placement of the token at global position ``p`` of a sequence (``base`` = length of a sharded prefill
written with :meth:`KVCache.prefill`, else 0):

- ``p < base``: the prompt as ``seqpar.attention(layout="contiguous")`` sharded it (``torch.tensor_split``);
- ``placement="round_robin"``: block ``(p - base) // block_size`` goes to rank ``block % W`` (balanced
  appends, as vLLM's decode context parallelism and TensorRT-LLM's Helix place tokens);
- ``placement="contiguous"``: ``(p - base) // C`` with ``C = ceil((max_seq_len - base) / W)`` (rank 0
  fills first; appends all land on one rank at a time).

Storage, per rank (``cap = ceil(max_seq_len / W) + block_size + 1`` local tokens per sequence: the
worst case over both placements; memory ~ 1/W of the whole cache plus a block)::

    k, v   (num_layers, max_batch, kv_heads, cap, head_dim)   dtype
    pos    (max_batch, cap) int64                            global position of each local slot

Validation: the constructor and every structure change (:meth:`allocate`, :meth:`free`,
:meth:`prefill`) compare their arguments across ranks first (one all-gather of a few ints,
``seqpar.checks.agree``) and only then check them against the replicated state, so a mistake
raises the same ``ValueError`` on every rank and leaves the cache unchanged. Decode steps are
checked inside their one combining collective (:mod:`seqpar.decode`).
"""

from __future__ import annotations

from typing import Any

import torch

from seqpar import checks
from seqpar.comm import Communicator, get_communicator
from seqpar.layout import pieces

PLACEMENTS = ("round_robin", "contiguous")
COMBINES = ("auto", "allgather", "allreduce")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _hash(values: list[int]) -> int:
    """A small order-sensitive hash (< 2**23, exact in float32) of a list of ints."""
    h = 0
    for i, v in enumerate(values):
        h = (h * 1000003 + (i + 1) * 7919 + int(v)) % 8388593
    return h


class KVCache:
    """Sharded, preallocated KV cache (see the module docstring).

    Args:
        num_layers: layers (each with its own K/V and per-sequence lengths).
        max_batch: sequence slots (live sequences at once).
        max_seq_len: the longest sequence (global tokens) a slot may hold.
        kv_heads, head_dim: K/V shape ``(B, kv_heads, S, head_dim)``.
        dtype, device: storage.
        placement: ``"round_robin"`` (default) or ``"contiguous"``.
        block_size: tokens per round-robin block (default 16).
        combine: how decode steps merge the ranks' partials: ``"auto"`` (:func:`seqpar.plan.decode_combine`),
            ``"allgather"`` or ``"allreduce"`` (see :mod:`seqpar.decode`).
        group: None (default torch.distributed group), a ``ProcessGroup``, an mpi4py ``Comm``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        max_batch: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        placement: str = "round_robin",
        block_size: int = 16,
        combine: str = "auto",
        group: Any = None,
    ) -> None:
        self.comm: Communicator = get_communicator(group)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        sizes = {"num_layers": num_layers, "max_batch": max_batch, "max_seq_len": max_seq_len,
                 "kv_heads": kv_heads, "head_dim": head_dim, "block_size": block_size}

        def validate():  # local checks; their verdict travels through the one exchange (no rank left waiting)
            for name, n in sizes.items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError(f"rank {self.rank}: {name}={n!r}; allowed: an int >= 1")
            if placement not in PLACEMENTS:
                raise ValueError(
                    f"rank {self.rank}: placement={placement!r}; allowed: {', '.join(map(repr, PLACEMENTS))}")
            if combine not in COMBINES:
                raise ValueError(f"rank {self.rank}: combine={combine!r}; allowed: {', '.join(map(repr, COMBINES))}")
            if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                raise ValueError(f"rank {self.rank}: dtype={dtype}; allowed: float32, float64, bfloat16, float16")
            return {
                "KVCache (num_layers, max_batch, max_seq_len, kv_heads, head_dim)":
                    (num_layers, max_batch, max_seq_len, kv_heads, head_dim),
                "KVCache block_size": block_size,
                "KVCache placement": PLACEMENTS.index(placement),
                "KVCache dtype": checks.dtype_code(dtype),
                "KVCache combine": COMBINES.index(combine),
            }, {}

        checks.agree(self.comm, "KVCache", validate)
        self.num_layers, self.max_batch, self.max_seq_len = num_layers, max_batch, max_seq_len
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.placement, self.block_size, self.combine = placement, block_size, combine
        self.capacity = _ceil(max_seq_len, self.world_size) + block_size + 1  # local tokens per sequence
        shape = (num_layers, max_batch, kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((max_batch, self.capacity), -1, dtype=torch.int64, device=device)
        self.lengths = [[0] * max_batch for _ in range(num_layers)]  # global tokens per layer and slot
        self.base = [0] * max_batch  # sharded-prefill length per slot
        self.live: list[bool] = [False] * max_batch
        self.step_shape = (0, 0, 0)  # (B, H, T) of the last decode step all ranks agreed on (seqpar.decode)

    # -- placement (pure functions of the replicated state) -------------------------------------
    def _chunk(self, slot: int) -> int:
        """Tokens per rank-run after the prefill: the round-robin block, or the contiguous share."""
        if self.placement == "round_robin":
            return self.block_size
        return max(1, _ceil(self.max_seq_len - self.base[slot], self.world_size))

    def local_count(self, slot: int, length: int, rank: int | None = None) -> int:
        """How many of the first ``length`` tokens of ``slot`` live on ``rank`` (default: this rank)."""
        r = self.rank if rank is None else rank
        base, w = self.base[slot], self.world_size
        a, b = pieces(base, w, r, "contiguous")[0]
        n = max(0, min(length, b) - a)
        rest = max(0, length - base)
        c = self._chunk(slot)
        if self.placement == "round_robin":
            cycle = c * w
            return n + rest // cycle * c + min(c, max(0, rest % cycle - r * c))
        return n + (min(c, max(0, rest - r * c)) if r < w - 1 else max(0, rest - r * c))

    def owners(self, slot: int, positions: torch.Tensor) -> torch.Tensor:
        """Owning rank of each global position ``>= base`` of ``slot`` (int64 tensor)."""
        q = positions - self.base[slot]
        c = self._chunk(slot)
        if self.placement == "round_robin":
            return (q // c) % self.world_size
        return (q // c).clamp_max(self.world_size - 1)

    def _positions_table(self, slot: int) -> torch.Tensor:
        """Global position of every local index of ``slot`` on this rank, ``(capacity,)`` int64."""
        base, w, r = self.base[slot], self.world_size, self.rank
        a, b = pieces(base, w, r, "contiguous")[0]
        j = torch.arange(self.capacity - (b - a))
        c = self._chunk(slot)
        q = ((j // c) * w + r) * c + j % c if self.placement == "round_robin" else r * c + j
        return torch.cat([torch.arange(a, b), base + q]).to(self.pos.device)

    def positions(self, slot: int, layer: int = 0) -> torch.Tensor:
        """Global positions of the tokens of ``slot`` held on this rank, in local (storage) order."""
        return self.pos[slot, : self.local_count(slot, self.lengths[layer][slot])]

    def _store(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write the tokens of ``k, v (kv_heads, T, D)`` at global positions ``length .. length + T - 1`` of ``slot``
        that this rank owns into its storage, past the committed length (which the caller commits, on every rank
        alike: :mod:`seqpar.decode` after its collective, the service's engine in its replicated step). Returns
        this rank's count of the slot's tokens once they are committed. No collective, no check."""
        n, t = self.lengths[layer][slot], k.shape[1]
        n0 = self.local_count(slot, n)
        mine = (self.owners(slot, torch.arange(n, n + t)) == self.rank).nonzero().flatten()
        if mine.numel():
            self.k[layer, slot, :, n0:n0 + mine.numel()] = k[:, mine]
            self.v[layer, slot, :, n0:n0 + mine.numel()] = v[:, mine]
        return n0 + mine.numel()

    def nbytes(self) -> int:
        """Bytes of K/V storage on this rank."""
        return self.k.numel() * self.k.element_size() * 2

    # -- structure changes (validated across ranks) ---------------------------------------------
    def _agree(self, what: str, fields: dict[str, Any], local_error: str | None = None) -> None:
        """Compare ``fields`` across ranks, and each rank's local error; raise on every rank (the failing rank
        its own error, the others one naming it) before anything changes."""

        def validate():
            if local_error is not None:
                raise ValueError(f"seqpar KVCache (rank {self.rank}): {what}: {local_error}")
            return {f"{what} {k}": v for k, v in fields.items()}, {}

        checks.agree(self.comm, f"KVCache.{what}", validate)

    def _check_slots(self, slots: list[int]) -> None:
        for s in slots:
            if not (0 <= s < self.max_batch) or not self.live[s]:
                raise ValueError(
                    f"rank {self.rank}: unknown sequence slot {s}; live slots: {self.live_slots()}")

    def live_slots(self) -> list[int]:
        return [s for s in range(self.max_batch) if self.live[s]]

    def allocate(self, n: int = 1) -> list[int]:
        """Start ``n`` new (empty) sequences; returns their slot ids (the same on every rank)."""
        self._agree("allocate", {"n": n if isinstance(n, int) else -1})
        free = [s for s in range(self.max_batch) if not self.live[s]]
        if not isinstance(n, int) or n < 1 or n > len(free):
            raise ValueError(
                f"seqpar KVCache (rank {self.rank}): allocate(n={n!r}): cache full or bad n; "
                f"{len(free)} of max_batch={self.max_batch} slots free")
        slots = free[:n]
        for s in slots:
            self.live[s], self.base[s] = True, 0
            for lens in self.lengths:
                lens[s] = 0
            self.pos[s] = self._positions_table(s)
        return slots

    def free(self, slots: list[int]) -> None:
        """End sequences: their slots become free (other sequences continue)."""
        try:
            slots = [int(s) for s in slots]
        except (TypeError, ValueError):
            slots = [-1]  # compared first, rejected after: every rank raises
        self._agree("free", {"(n, slots hash)": (len(slots), _hash(slots))})
        self._check_slots(slots)
        for s in slots:
            self.live[s] = False

    def prefill(self, layer: int, slots: list[int], k_local: torch.Tensor, v_local: torch.Tensor,
                prompt_len: int) -> None:
        """Store this rank's shard of a sharded prompt's K/V (nothing moves between ranks).

        ``k_local, v_local (B, kv_heads, S_r, head_dim)`` are this rank's piece of the ``prompt_len``
        tokens under ``seqpar.attention(layout="contiguous")`` -- e.g. the K/V a model computed on its
        shard while running sequence-parallel attention over the prompt. The slots must be empty (all
        layers' prefill uses the same ``prompt_len``); later tokens are placed by ``placement``.
        """
        error, raw, slots = None, slots, [-1]
        try:
            slots = [int(s) for s in raw]
            self._check_slots(slots)
            if not (0 <= layer < self.num_layers):
                raise ValueError(f"rank {self.rank}: layer={layer}; allowed 0..{self.num_layers - 1}")
            a, b = pieces(prompt_len, self.world_size, self.rank, "contiguous")[0]
            want = (len(slots), self.kv_heads, b - a, self.head_dim)
            for name, t in (("k_local", k_local), ("v_local", v_local)):
                if tuple(t.shape) != want:
                    raise ValueError(f"rank {self.rank}: {name}.shape={tuple(t.shape)}; expected "
                                     f"(B, kv_heads, S_r, head_dim)={want} for prompt_len={prompt_len}")
            if prompt_len > self.max_seq_len:
                raise ValueError(f"rank {self.rank}: prompt_len={prompt_len} > max_seq_len={self.max_seq_len}")
            for s in slots:
                if self.lengths[layer][s] or (self.base[s] not in (0, prompt_len)) or (
                        self.base[s] == 0 and any(lens[s] for lens in self.lengths)):
                    raise ValueError(f"rank {self.rank}: slot {s} is not empty (prefill needs a new sequence)")
        except ValueError as e:
            error = str(e)
        self._agree("prefill", {"(layer, n, slots hash, prompt_len)": (layer, len(slots), _hash(slots), prompt_len)},
                    error)
        for i, s in enumerate(slots):
            if self.base[s] != prompt_len:
                self.base[s] = prompt_len
                self.pos[s] = self._positions_table(s)
            self.k[layer, s, :, : b - a] = k_local[i]
            self.v[layer, s, :, : b - a] = v_local[i]
            self.lengths[layer][s] = prompt_len
