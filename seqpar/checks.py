"""Argument checks: every rank's local verdict and signature travel in one all-gather.

Each public function that issues collectives validates its arguments *locally* first (ranks of
tensors, head dims, dtypes, mask shapes, options), but does not raise there: a rank that raised
alone would leave the others waiting in the next collective. Instead :func:`agree` always runs one
all-gather of a fixed-size int64 row per rank::

    [op code | ok? | check on? | message (512 bytes, utf-8) | 16 fields x 6 ints]   = 1304 bytes

and then, on *every* rank and within that one collective:

- if some rank's local checks failed, that rank raises its own error and every other rank raises a
  ``ValueError`` naming the failing rank(s) and their messages;
- if the ranks called different seqpar functions, every rank raises a ``ValueError`` naming them;
- if a field that must agree (shapes, dtypes, scale, options, a bit fingerprint of tensors that must
  be identical on every rank) differs, every rank raises the same ``ValueError`` naming the argument,
  the ranks and their values.

The same gather carries per-rank information the callers need anyway (shard lengths).
``SEQPAR_CHECK=0`` switches off the comparison and the fingerprints, not the exchange of verdicts:
a local error must still reach the other ranks before they enter the next collective.

Cost (measured, ``python benchmarks/core_error_and_check_cost.py --check``, see the README): one
all-gather of 1304 bytes per rank per call; the fingerprint of a replicated tensor is one read of it
(an integer sum of its bits, exact and independent of summation order, plus a strided sample).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch

from seqpar.comm import Communicator

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bool, torch.int64, torch.int32]
_WIDTH = 6  # every field: its length, then up to 5 ints
_MAX_FIELDS = 16
MSG_BYTES = 512  # a local error message is cut to this many utf-8 bytes on the wire
_HEADER = 3  # op code, ok (1) / failed (0), comparison enabled
_ROW = _HEADER + MSG_BYTES // 8 + _MAX_FIELDS * _WIDTH
ROW_BYTES = 8 * _ROW

Fields = Mapping[str, "Sequence[int] | int"]


def enabled() -> bool:
    """``SEQPAR_CHECK`` is not ``0``: compare signatures and fingerprints across ranks."""
    return os.environ.get("SEQPAR_CHECK", "1") != "0"


def dtype_code(dtype: torch.dtype | None) -> int:
    return -1 if dtype is None else (_DTYPES.index(dtype) if dtype in _DTYPES else 99)


def float_code(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SAMPLE = 4096


def fingerprint(t: torch.Tensor) -> tuple[int, int, int]:
    """Three ints from ``t``'s bits: equal on two ranks when the tensors are identical, and (almost surely)
    different when they are not.

    ``bits`` = the elements reinterpreted as integers of their width. ``(sum of all bits, two weighted
    sums of an evenly strided sample of <= 4096 elements)``: the first changes with any single element,
    the other two with permutations. Integer sums (wrapping, modulo 2**32 or 2**64) are exact and do not
    depend on the summation order or thread count, unlike float sums. Cost: one read of ``t`` (measured
    1.4 ns per element on one CPU thread, int32 sum; ``python benchmarks/never_hang_cost.py --fingerprint``).
    """
    x = t.detach()
    if x.numel() == 0:
        return (0, 0, 0)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    bits = x.view(_BITS[x.element_size()]) if x.is_floating_point() else x
    flat = bits.reshape(-1)
    if flat.is_contiguous() and flat.numel() * flat.element_size() % 4 == 0 and flat.element_size() in (2, 8):
        total = int(flat.view(torch.int32).sum(dtype=torch.int32))  # the same bytes as 32-bit words: fastest
    else:
        total = int(flat.sum(dtype=torch.int64 if flat.element_size() == 8 else torch.int32))
    sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to(torch.int64)
    i = torch.arange(1, sample.numel() + 1, device=sample.device)
    return (total, int((sample * i).sum()), int((sample * (i * i % 65521)).sum()))


def _decode(name: str, vals: tuple[int, ...]) -> str:
    if name.endswith("dtype"):
        return "None" if vals[0] == -1 else str(_DTYPES[vals[0]] if vals[0] < len(_DTYPES) else "other")
    if name == "scale":
        return "None" if vals[0] == -1 else repr(struct.unpack("<d", struct.pack("<q", vals[0]))[0])
    if "fingerprint" in name:
        return "/".join(f"{v & 0xFFFFFFFFFFFFFFFF:016x}" for v in vals)
    if len(vals) == 1:
        return str(vals[0])
    return str(tuple(vals))


def _op_code(op: str) -> int:
    return zlib.crc32(op.encode()) & 0x7FFFFFFF


def _encode(op: str, error: BaseException | None, fields: dict[str, list[int]]) -> torch.Tensor:
    row = [_op_code(op), int(error is None), int(enabled())]
    if error is not None:
        msg = f"{type(error).__name__}: {error}".encode()
        if len(msg) > MSG_BYTES:
            msg = msg[: MSG_BYTES - 3] + b"..."
        row += struct.unpack(f"<{MSG_BYTES // 8}q", msg.ljust(MSG_BYTES, b"\0"))
        return torch.tensor(row + [0] * (_ROW - len(row)), dtype=torch.int64)
    if len(fields) > _MAX_FIELDS:
        raise AssertionError(f"internal: {len(fields)} fields; at most {_MAX_FIELDS}")
    row += [0] * (MSG_BYTES // 8)
    for n, v in fields.items():
        if len(v) > _WIDTH - 1:
            raise AssertionError(f"internal: field {n} too long")
        row += [len(v), *v, *[0] * (_WIDTH - 1 - len(v))]
    return torch.tensor(row + [0] * (_ROW - len(row)), dtype=torch.int64)


def _message(row: list[int]) -> str:
    raw = struct.pack(f"<{MSG_BYTES // 8}q", *row[_HEADER : _HEADER + MSG_BYTES // 8])
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def _as_list(v: Sequence[int] | int) -> list[int]:
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def agree(
    comm: Communicator,
    op: str,
    validate: Callable[[], tuple[Fields, Fields] | None],
) -> dict[str, list[tuple[int, ...]]]:
    """Run ``validate()`` (local checks) and settle the outcome with every rank of ``comm``.

    ``validate`` raises ``ValueError``/``TypeError`` for a local error (any exception is carried the same
    way and re-raised unchanged on its rank), else returns
    ``(must_match, info)``: fields (name -> int or up to 5 ints) that must be equal on every rank,
    and fields that may differ (returned to the caller). Always one all-gather when W > 1, so a
    rank's local error cannot leave the others waiting. Returns ``{name: [value per rank]}`` for the
    ``info`` fields (and the ``must_match`` ones when the comparison is on).
    """
    error: BaseException | None = None
    must_match: Fields = {}
    info: Fields = {}
    try:
        got = validate()
        if got is not None:
            must_match, info = got
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks, then re-raise here
        error = e
    check = enabled()
    fields = {n: _as_list(v) for n, v in {**info, **(must_match if check else {})}.items()}  # info first: same slots
    if comm.world_size == 1:
        if error is not None:
            raise error
        return {n: [tuple(v)] for n, v in fields.items()}
    table = comm.all_gather(_encode(op, error, fields)).tolist()  # (W, _ROW) as Python ints
    w, me = comm.world_size, comm.rank
    ops = [row[0] for row in table]
    if len(set(ops)) > 1:
        mine = ops[me]
        other = [r for r in range(w) if ops[r] != mine]
        raise ValueError(
            f"seqpar (rank {me}): ranks called different functions: this rank called seqpar {op}, rank(s) "
            f"{other} called something else (every rank of the group must make the same seqpar calls in "
            "the same order)"
        )
    failed = [r for r in range(w) if table[r][1] == 0]
    if failed:
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {_message(table[r])}" for r in failed)
        raise ValueError(
            f"seqpar {op} (rank {me}): rank(s) {failed} failed their local argument checks, so no rank "
            f"runs this call: {detail}"
        )
    if len({row[2] for row in table}) > 1:  # then the rows' field slots differ too: nothing else is comparable
        raise ValueError(
            f"seqpar (rank {me}): SEQPAR_CHECK differs across ranks (on for rank(s) "
            f"{[r for r in range(w) if table[r][2]]}, off for the others); set it the same on every rank"
        )
    out: dict[str, list[tuple[int, ...]]] = {}
    off = _HEADER + MSG_BYTES // 8
    problems = []
    for i, n in enumerate(fields):
        base = off + i * _WIDTH
        per_rank = [tuple(table[r][base + 1 : base + 1 + table[r][base]]) for r in range(w)]
        out[n] = per_rank
        if check and n in must_match and len(set(per_rank)) > 1:
            vals = ", ".join(f"rank {r}: {_decode(n, v)}" for r, v in enumerate(per_rank))
            problems.append(f"'{n}' differs across ranks ({vals})")
    if problems:
        raise ValueError(f"seqpar (rank {me}): " + "; ".join(problems))
    return out


def require_4d(name: str, t: torch.Tensor, rank: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rank {rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"rank {rank}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    """Local shape/dtype rules shared by every entry point (run inside :func:`agree`'s ``validate``)."""
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
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"rank {rank}: devices differ: q {q.device}, k {k.device}, v {v.device}")
