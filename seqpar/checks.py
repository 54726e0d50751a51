"""Argument checks: local ones before any collective, and one cross-rank comparison.

The cross-rank check packs every rank's argument signature (shapes, dtypes, scale, mask kind, ...)
into one small int64 vector and all-gathers it: one collective of a few hundred bytes per call. When
anything that must agree differs, *every* rank raises the same ``ValueError`` naming the argument,
the ranks and their values -- instead of a hang or a silently wrong result. The same gather carries
the per-rank shard lengths the strategies need anyway.

Set ``SEQPAR_CHECK=0`` to skip the comparison (the shard lengths are still exchanged).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import torch

from seqpar.comm import Communicator

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bool, torch.int64, torch.int32]
_WIDTH = 6  # every field is padded to this many ints


def enabled() -> bool:
    return os.environ.get("SEQPAR_CHECK", "1") != "0"


def dtype_code(dtype: torch.dtype | None) -> int:
    return -1 if dtype is None else (_DTYPES.index(dtype) if dtype in _DTYPES else 99)


def float_code(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _decode(name: str, vals: tuple[int, ...]) -> str:
    if name.endswith("dtype"):
        return "None" if vals[0] == -1 else str(_DTYPES[vals[0]] if vals[0] < len(_DTYPES) else "other")
    if name == "scale":
        return "None" if vals[0] == -1 else repr(struct.unpack("<d", struct.pack("<q", vals[0]))[0])
    if len(vals) == 1:
        return str(vals[0])
    return str(tuple(vals))


def exchange(
    comm: Communicator,
    must_match: dict[str, Sequence[int] | int],
    info: dict[str, Sequence[int] | int] | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """All-gather the fields; raise on every rank if a ``must_match`` field differs.

    Returns ``{name: [value on rank 0, value on rank 1, ...]}`` for every field.
    """
    info = info or {}
    fields = {**must_match, **info} if enabled() else dict(info)
    names = list(fields)
    if not names or comm.world_size == 1:
        return {n: [tuple([v] if isinstance(v, int) else v)] for n, v in fields.items()}
    rows = []
    for n in names:
        v = fields[n]
        v = [v] if isinstance(v, int) else list(v)
        if len(v) > _WIDTH - 1:
            raise ValueError(f"internal: field {n} too long")
        rows.append([len(v), *v, *[0] * (_WIDTH - 1 - len(v))])
    local = torch.tensor(rows, dtype=torch.int64)
    table = comm.all_gather(local)  # (W, n_fields, _WIDTH)
    out: dict[str, list[tuple[int, ...]]] = {}
    problems = []
    for i, n in enumerate(names):
        per_rank = [tuple(table[r, i, 1 : 1 + int(table[r, i, 0])].tolist()) for r in range(comm.world_size)]
        out[n] = per_rank
        if n in must_match and len(set(per_rank)) > 1:
            vals = ", ".join(f"rank {r}: {_decode(n, v)}" for r, v in enumerate(per_rank))
            problems.append(f"'{n}' differs across ranks ({vals})")
    if problems:
        raise ValueError(f"seqpar (rank {comm.rank}): " + "; ".join(problems))
    return out


def require_4d(name: str, t: torch.Tensor, rank: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rank {rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"rank {rank}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    """Local shape/dtype rules shared by every entry point (raised before any collective)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_4d(name, t, rank)
    if not q.is_floating_point() or q.dtype not in _DTYPES[:4]:
        raise ValueError(f"rank {rank}: q.dtype={q.dtype}; allowed: float32, float64, bfloat16, float16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"rank {rank}: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"rank {rank}: batch/heads/length disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rank {rank}: head dim of q ({q.shape[-1]}) != head dim of k ({k.shape[-1]})")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"rank {rank}: query heads H={q.shape[1]} must be a multiple of kv heads H_kv={k.shape[1]}"
        )
