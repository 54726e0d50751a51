"""Masks defined on *global* token positions, cut into the blocks a kernel call needs.

A shard of tokens is described by :class:`Tokens` (its global positions, and optionally document ids
and key padding). :func:`blocks` pairs query tokens with key tokens and yields only the blocks the
mask leaves non-empty, each with the cheapest description a kernel accepts:

- ``mask=None, is_causal=False``  every query sees every key of the block;
- ``mask=None, is_causal=True``   a diagonal block (same positions), top-left causal;
- ``mask=<bool (B|1, 1, bq, bk)>`` anything else, built for this block only (never S x S).

The rules (i = query position, j = key position):

- ``is_causal``             j <= i
- ``window_size=w``         with causal 0 <= i - j <= w; without |i - j| <= w
- ``document_ids``          doc(i) == doc(j)
- ``key_padding_mask``      keep(j) (True = attend)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

MAX_MASK_ELEMENTS = 1 << 22  # largest block mask materialised at once (bools)


@dataclass(frozen=True)
class MaskSpec:
    is_causal: bool = False
    window_size: int | None = None


@dataclass
class Tokens:
    """Tokens of one shard: ``pos (S,)`` global positions, ``doc (B, S)``, ``keep (B, S)`` bool."""

    pos: torch.Tensor
    doc: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.pos.numel())

    def slice(self, a: int, b: int) -> Tokens:
        return Tokens(
            self.pos[a:b],
            None if self.doc is None else self.doc[:, a:b],
            None if self.keep is None else self.keep[:, a:b],
        )

    def runs(self) -> list[tuple[int, int]]:
        """Index ranges ``[a, b)`` over which positions increase by exactly 1."""
        n = len(self)
        if n == 0:
            return []
        breaks = (torch.nonzero(self.pos[1:] - self.pos[:-1] != 1).flatten() + 1).tolist()
        edges = [0, *breaks, n]
        return list(zip(edges[:-1], edges[1:]))


@dataclass
class Block:
    q: slice
    k: slice
    mask: torch.Tensor | None
    is_causal: bool


def _classify(qa: int, qb: int, ka: int, kb: int, spec: MaskSpec) -> str:
    """'empty' | 'full' | 'diag' | 'partial' for query positions [qa, qb], key positions [ka, kb]."""
    full, diag = True, False
    if spec.is_causal:
        if ka > qb:
            return "empty"
        if kb > qa:
            full = False
            diag = (qa, qb) == (ka, kb)
    w = spec.window_size
    if w is not None:
        if qa - kb > w or (not spec.is_causal and ka - qb > w):
            return "empty"
        if qb - ka > w or (not spec.is_causal and kb - qa > w):
            full, diag = False, False
    if full:
        return "full"
    return "diag" if diag else "partial"


def dense_mask(qt: Tokens, kt: Tokens, spec: MaskSpec) -> torch.Tensor | None:
    """Bool mask ``(B|1, 1, Sq, Sk)`` of the rules above, or None when nothing restricts."""
    qi, kj = qt.pos.unsqueeze(-1), kt.pos.unsqueeze(0)  # (Sq, 1), (1, Sk)
    m = None
    if spec.is_causal:
        m = kj <= qi
    if spec.window_size is not None:
        d = qi - kj
        mw = (d <= spec.window_size) if spec.is_causal else (d.abs() <= spec.window_size)
        m = mw if m is None else m & mw
    if m is not None:
        m = m.unsqueeze(0)  # (1, Sq, Sk)
    if qt.doc is not None and kt.doc is not None:
        md = qt.doc.unsqueeze(-1) == kt.doc.unsqueeze(-2)  # (B, Sq, Sk)
        m = md if m is None else m & md
    if kt.keep is not None:
        mk = kt.keep.unsqueeze(-2)  # (B, 1, Sk)
        m = mk if m is None else m & mk
    return None if m is None else m.unsqueeze(1)


def blocks(qt: Tokens, kt: Tokens, spec: MaskSpec) -> Iterator[Block]:
    """Yield the non-empty blocks of queries ``qt`` against keys ``kt`` (see module docstring).

    Runs of consecutive positions are paired; a pair the position rules cut only partly (a sliding
    window, a causal edge that is not a diagonal) is tiled into ``TILE`` x ``TILE`` blocks, so tiles
    outside the window are skipped and tiles inside it run without a mask.
    """
    data_masks = (qt.doc is not None and kt.doc is not None) or kt.keep is not None
    for ka, kb in kt.runs():
        for qa, qb in qt.runs():
            kind = _classify(int(qt.pos[qa]), int(qt.pos[qb - 1]), int(kt.pos[ka]), int(kt.pos[kb - 1]), spec)
            if kind == "empty":
                continue
            if kind in ("full", "diag"):
                yield from _resolve(qt, kt, spec, qa, qb, ka, kb, kind, data_masks)
                continue
            if spec.window_size is None:  # a causal edge only: at most three blocks, no mask, no tiles
                yield from _causal_split(qt, kt, spec, qa, qb, ka, kb, data_masks)
                continue
            for ta in range(ka, kb, TILE):
                tb = min(kb, ta + TILE)
                for sa in range(qa, qb, TILE):
                    sb = min(qb, sa + TILE)
                    tile = _classify(int(qt.pos[sa]), int(qt.pos[sb - 1]), int(kt.pos[ta]), int(kt.pos[tb - 1]), spec)
                    if tile != "empty":
                        yield from _resolve(qt, kt, spec, sa, sb, ta, tb, tile, data_masks)


def _causal_split(qt, kt, spec, qa, qb, ka, kb, data_masks) -> Iterator[Block]:
    """Queries [qa, qb) x keys [ka, kb), two runs of consecutive positions that the causal edge cuts off the
    diagonal (e.g. a key chunk inside a longer query run): the queries at the keys' positions see the keys before
    theirs (full) and their own diagonal (causal); the queries after the last key see every key (full)."""
    p0, k0, k1 = int(qt.pos[qa]), int(kt.pos[ka]), int(kt.pos[kb - 1])
    o0, o1 = max(p0, k0), min(int(qt.pos[qb - 1]), k1)  # positions both runs hold
    qo0, qo1 = qa + o0 - p0, qa + o1 - p0 + 1  # query rows at those positions
    ko0, ko1 = ka + o0 - k0, ka + o1 - k0 + 1
    if ko0 > ka:
        yield from _resolve(qt, kt, spec, qo0, qo1, ka, ko0, "full", data_masks)
    yield from _resolve(qt, kt, spec, qo0, qo1, ko0, ko1, "diag", data_masks)
    if qo1 < qb:  # queries after the last key (they exist only when the keys end first)
        yield from _resolve(qt, kt, spec, qo1, qb, ka, kb, "full", data_masks)


TILE = 512  # tile edge for pairs of runs that a window or causal edge cuts only partly


def _resolve(qt, kt, spec, qa, qb, ka, kb, kind, data_masks) -> Iterator[Block]:
    """Blocks for queries [qa, qb) x keys [ka, kb) that the position rules call ``kind`` (not empty)."""
    if not data_masks and kind in ("full", "diag"):
        yield Block(slice(qa, qb), slice(ka, kb), None, kind == "diag")
        return
    batch = max([1] + [t.shape[0] for t in (qt.doc, kt.keep) if t is not None])
    step = max(16, MAX_MASK_ELEMENTS // max(1, batch * (kb - ka)))
    for a in range(qa, qb, step):
        b = min(qb, a + step)
        m = dense_mask(qt.slice(a, b), kt.slice(ka, kb), spec)
        if m is not None:
            if not bool(m.any()):
                continue
            if bool(m.all()):
                m = None
        yield Block(slice(a, b), slice(ka, kb), m, False)
