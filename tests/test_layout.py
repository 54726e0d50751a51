"""seqpar.layout: which global positions each rank holds, and shard/unshard.

Run: ``python -m pytest tests/test_layout.py -q``

The expected positions come from the layout docstring (``torch.tensor_split`` of the sequence into W
pieces, or 2W pieces with rank r holding pieces r and 2W-1-r), written out independently in
``test_attention.expected_positions``.
"""

from __future__ import annotations

import pytest
import torch
from test_attention import expected_positions

from seqpar.layout import LAYOUTS, pieces, positions, shard_sizes


def test_positions_match_the_docstring_diagram():
    """S = 10, W = 2, exactly as drawn in seqpar/layout.py."""
    assert positions(10, 2, 0, "contiguous").tolist() == [0, 1, 2, 3, 4]
    assert positions(10, 2, 1, "contiguous").tolist() == [5, 6, 7, 8, 9]
    assert pieces(10, 2, 0, "zigzag") == [(0, 3), (8, 10)]  # pieces 0 1 2 | 3 4 5 | 6 7 | 8 9
    assert pieces(10, 2, 1, "zigzag") == [(3, 6), (6, 8)]
    assert positions(10, 2, 0, "zigzag").tolist() == [0, 1, 2, 8, 9]
    assert positions(10, 2, 1, "zigzag").tolist() == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_partition_any_length(layout):
    """For every S (no divisibility) and W: positions are tensor_split's, int64, and together
    every position exactly once; shard_sizes agrees."""
    for w in range(1, 6):
        for s in range(4 * w + 4):
            got = [positions(s, w, r, layout) for r in range(w)]
            for r, p in enumerate(got):
                assert p.dtype == torch.int64
                assert p.tolist() == expected_positions(s, w, r, layout).tolist(), (s, w, r)
            assert sorted(torch.cat(got).tolist()) == list(range(s))
            assert shard_sizes(s, w, layout) == [len(p) for p in got]


def test_short_sequences_leave_ranks_empty():
    """S < W (contiguous) or S < 2W (zigzag): some ranks hold 0 tokens (seqpar.attention handles
    that: see test_attention.test_tiny_lengths)."""
    assert shard_sizes(1, 2, "contiguous") == [1, 0]
    assert shard_sizes(3, 4, "contiguous") == [1, 1, 1, 0]
    assert shard_sizes(1, 2, "zigzag") == [1, 0]
    assert shard_sizes(3, 2, "zigzag") == [1, 2]  # pieces 0 | 1 | 2 | -: rank 0 holds pieces 0 and 3
    assert shard_sizes(5, 4, "zigzag") == [1, 1, 1, 2]


def test_invalid_layout_names_allowed_set():
    with pytest.raises(ValueError, match="'striped'.*'contiguous', 'zigzag'"):
        pieces(10, 2, 0, "striped")


def run_roundtrip(rank, world_size):
    """shard/unshard for every small S, both layouts, several dims and dtypes; returns failures."""
    import seqpar

    bad = []
    for layout in LAYOUTS:
        for s in range(1, 3 * world_size + 2):
            for dim, dtype in ((2, torch.float32), (1, torch.bfloat16), (-1, torch.int64), (0, torch.float64)):
                shape = [2, 3, 4, 5]
                shape[dim] = s
                x = torch.arange(torch.Size(shape).numel()).reshape(shape).to(dtype)
                idx = expected_positions(s, world_size, rank, layout)
                xl = seqpar.shard(x, dim=dim, layout=layout)
                if not torch.equal(xl, x.index_select(dim, idx)):
                    bad.append(f"shard {layout} S={s} dim={dim}")
                full = seqpar.unshard(xl, dim=dim, layout=layout, seq_len=s)
                if full.dtype != dtype or not torch.equal(full, x):
                    bad.append(f"unshard {layout} S={s} dim={dim} {dtype}")
            # shard is differentiable: the gradient lands on this rank's positions only
            x = torch.randn(1, 2, s, 3, dtype=torch.float64, requires_grad=True)
            seqpar.shard(x, layout=layout).sum().backward()
            want = torch.zeros(s, dtype=torch.float64)
            want[expected_positions(s, world_size, rank, layout)] = 1
            if not torch.equal(x.grad[0, 0, :, 0], want):
                bad.append(f"shard grad {layout} S={s}")
    try:  # a local slice of the wrong length: every rank raises before any collective
        seqpar.unshard(torch.zeros(1, 2, 99, 3), layout="zigzag", seq_len=7)
        bad.append("unshard accepted a wrong length")
    except ValueError as e:
        if not all(t in str(e) for t in (f"rank {rank}", "99", "seq_len=7")):
            bad.append(f"unshard message: {e}")
    return bad


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shard_unshard_roundtrip(dist, world_size):
    for rank, bad in enumerate(dist(world_size, run_roundtrip)):
        assert not bad, f"rank {rank}: {bad}"
