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

from typing import Any

import torch

from seqpar.comm import get_communicator

LAYOUTS = ("contiguous", "zigzag")


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
    if layout == "zigzag":
        b = _split_bounds(seq_len, 2 * world_size)
        return [b[rank], b[2 * world_size - 1 - rank]]
    raise ValueError(f"layout={layout!r}; allowed: {', '.join(map(repr, LAYOUTS))}")


def positions(seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    """Global positions of the tokens ``rank`` holds, ``(S_local,)`` int64."""
    return torch.cat([torch.arange(a, b) for a, b in pieces(seq_len, world_size, rank, layout)])


def shard_sizes(seq_len: int, world_size: int, layout: str) -> list[int]:
    return [sum(b - a for a, b in pieces(seq_len, world_size, r, layout)) for r in range(world_size)]


def shard(x: torch.Tensor, *, dim: int = 2, layout: str = "contiguous", group: Any = None) -> torch.Tensor:
    """This rank's slice of the full tensor ``x`` along ``dim`` (differentiable: plain indexing)."""
    comm = get_communicator(group)
    parts = [x.narrow(dim, a, b - a) for a, b in pieces(x.shape[dim], comm.world_size, comm.rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(
    x_local: torch.Tensor, *, dim: int = 2, layout: str = "contiguous", seq_len: int, group: Any = None
) -> torch.Tensor:
    """The full tensor from every rank's slice (all-gather; every rank gets it; not differentiable)."""
    comm = get_communicator(group)
    w = comm.world_size
    sizes = shard_sizes(seq_len, w, layout)
    if x_local.shape[dim] != sizes[comm.rank]:
        raise ValueError(
            f"rank {comm.rank}: x_local has length {x_local.shape[dim]} along dim {dim}; layout {layout!r} "
            f"with seq_len={seq_len} over {w} ranks gives this rank {sizes[comm.rank]}"
        )
    gathered = comm.all_gather_v(x_local.detach(), sizes, dim)
    shape = list(x_local.shape)
    shape[dim] = seq_len
    full = x_local.new_empty(shape)
    for r, part in enumerate(gathered):
        off = 0
        for a, b in pieces(seq_len, w, r, layout):
            full.narrow(dim, a, b - a).copy_(part.narrow(dim, off, b - a))
            off += b - a
    return full
