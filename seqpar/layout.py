"""Which tokens each rank holds, for any sequence length S (no divisibility requirement).

``"contiguous"``  ``torch.tensor_split(seq, W)``; rank r holds piece r::

    S = 10, W = 2:   rank 0: 0 1 2 3 4 | rank 1: 5 6 7 8 9

``"zigzag"``      ``torch.tensor_split(seq, 2W)``; rank r holds pieces r and 2W-1-r (with causal
                  masks every rank gets the same amount of work)::

    S = 10, W = 2:   pieces 0 1 2 | 3 4 5 | 6 7 | 8 9
                     rank 0: pieces 0, 3 -> 0 1 2 8 9     rank 1: pieces 1, 2 -> 3 4 5 6 7

``shard`` / ``unshard`` implement exactly these, so
``unshard(attention(shard(q), shard(k), shard(v)), seq_len=S)`` equals single-device attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seqpar import checks
from seqpar.comm import get_communicator

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: Any, name: str = "layout") -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else ``ValueError`` naming the value and the allowed set.

    The one home of this check (the public functions, :mod:`seqpar.nn`, :mod:`seqpar.hf` and the
    command line use it)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{name}={layout!r}; allowed: {', '.join(map(repr, LAYOUTS))}")
    return layout


def _split_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """The ``[a, b)`` ranges of ``torch.tensor_split`` of length n into ``parts``."""
    q, r = divmod(n, parts)
    bounds, a = [], 0
    for i in range(parts):
        b = a + q + (1 if i < r else 0)
        bounds.append((a, b))
        a = b
    return bounds


def pieces(seq_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Position ranges ``[a, b)`` that ``rank`` holds, in the order they are stored."""
    if layout == "contiguous":
        return [_split_bounds(seq_len, world_size)[rank]]
    check_layout(layout)
    b = _split_bounds(seq_len, 2 * world_size)
    return [b[rank], b[2 * world_size - 1 - rank]]


def positions(seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    """Global positions of the tokens ``rank`` holds, ``(S_local,)`` int64."""
    return torch.cat([torch.arange(a, b) for a, b in pieces(seq_len, world_size, rank, layout)])


def shard_sizes(seq_len: int, world_size: int, layout: str) -> list[int]:
    return [sum(b - a for a, b in pieces(seq_len, world_size, r, layout)) for r in range(world_size)]


def shard(x: torch.Tensor, *, dim: int = 2, layout: str = "contiguous", group: Any = None) -> torch.Tensor:
    """This rank's slice of the full tensor ``x`` along ``dim`` (differentiable: plain indexing).

    No collective: every rank slices its own copy (``x`` must be the same full tensor on every rank).
    Any strides (views, expanded, transposed); the result is a view for ``"contiguous"``."""
    check_layout(layout)
    comm = get_communicator(group)
    if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < max(x.dim(), 1):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"rank {comm.rank}: shard got x={got} with dim={dim}; dim must index one of its dimensions")
    parts = [x.narrow(dim, a, b - a) for a, b in pieces(x.shape[dim], comm.world_size, comm.rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(
    x_local: torch.Tensor, *, dim: int = 2, layout: str = "contiguous", seq_len: int, group: Any = None
) -> torch.Tensor:
    """The full tensor from every rank's slice (all-gather; every rank gets it; not differentiable).

    Every rank must pass the same layout, ``seq_len``, ``dim``, dtype and the same shape except along
    ``dim``: this is checked in the one exchange of :func:`seqpar.checks.agree` (a mismatch or a local
    error raises ``ValueError`` on every rank) before the data all-gather (padded to the longest shard).
    """
    comm = get_communicator(group)
    w, rank = comm.world_size, comm.rank

    def validate():
        check_layout(layout)
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"rank {rank}: x_local must be a torch.Tensor, got {type(x_local).__name__}")
        if not -x_local.dim() <= dim < x_local.dim():
            raise ValueError(f"rank {rank}: dim={dim} is out of range for x_local of shape {tuple(x_local.shape)}")
        if not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"rank {rank}: seq_len={seq_len!r}; allowed: an int >= 0")
        d = dim % x_local.dim()
        sizes = shard_sizes(seq_len, w, layout)
        if x_local.shape[d] != sizes[rank]:
            raise ValueError(
                f"rank {rank}: x_local has length {x_local.shape[d]} along dim {dim}; layout {layout!r} "
                f"with seq_len={seq_len} over {w} ranks gives this rank {sizes[rank]}"
            )
        other = [s for i, s in enumerate(x_local.shape) if i != d]
        if len(other) > 3:
            other = [*other[:2], math.prod(other[2:])]
        return {
            "layout": LAYOUTS.index(layout), "seq_len": seq_len, "dim": d, "x_local.dtype": checks.dtype_code(
                x_local.dtype), "x_local.shape (without dim)": [x_local.dim(), *other],
        }, {}

    checks.agree(comm, "unshard", validate)
    d = dim % x_local.dim()
    sizes = shard_sizes(seq_len, w, layout)
    gathered = comm.all_gather_v(x_local.detach(), sizes, d)
    shape = list(x_local.shape)
    shape[d] = seq_len
    full = x_local.new_empty(shape)
    for r, part in enumerate(gathered):
        off = 0
        for a, b in pieces(seq_len, w, r, layout):
            full.narrow(d, a, b - a).copy_(part.narrow(d, off, b - a))
            off += b - a
    return full
