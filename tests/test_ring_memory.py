"""Ring's fwd+bwd memory budget per rank, counted from torch's allocation events (not resident size, which adds
whatever the C heap keeps and varies from run to run).

The budget (``U`` = one rank's K, float32, padded to the longest shard; ``c = 2 U / CHUNKS``: the backward runs one
ring per pass of two key chunks, so everything that travels is a pass's rows; ``rise`` = the most one call of the
CPU flash backward op allocates: its dq/dk/dv pieces and its own copy of dout)::

    out (saved by the forward), dq accumulator        U, U
    dk, dv (the results, filled chunk by chunk)       2U
    our K/V rows of the pass, K/V received            2c, 2c   (+ 2c arriving when W > 2)
    dK/dV accumulator in flight, the one arriving     2c, 2c
    block grads held until the accumulator arrives    2c
    one kernel call                                   rise

The forward holds whole shards (its ``out`` accumulator U, K/V arriving 2U, and from W = 3 the K/V in hand 2U):
at W = 3 its peak is the call's.

History at S=32768, H=2, D=64, W=2 (U = 8 MiB; ``seqpar_tools.memory.allocated_peak``): 113 MiB with float32 dK/dV
scratch and contiguous copies of dout/out per block; 89 MiB with whole shards travelling (8U + rise: this test
fails on that code at W=2: 11.4U against a budget of 8.6U, rise included); 46 MiB now (4U + 10c + rise).
Single-process SDPA on the whole sequence: 81 MiB.
"""

import pytest
import torch

from seqpar.strategies.ring import CHUNKS
from seqpar_tools.memory import allocated_peak

OP = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
FWD_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"


def ring_fwd_bwd_peak(rank, world_size, seq_len, heads, head_dim):
    import seqpar

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, heads, seq_len, head_dim, generator=g) for _ in range(4)]
    ql, kl, vl, gl = (seqpar.shard(t, layout="zigzag") for t in full)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (ql, kl, vl)]
        seqpar.attention(*leaves, is_causal=True, layout="zigzag", strategy="ring").backward(gl)

    fwd_bwd()
    peak, rise = allocated_peak(fwd_bwd, inside=OP)
    _, rise_fwd = allocated_peak(fwd_bwd, inside=FWD_OP)
    return peak, rise, rise_fwd, kl.nbytes


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_fwd_bwd_within_budget(dist, world_size):
    seq_len = 12288  # U = 3 MiB (W=2), 2 MiB (W=3); the kernel's per-thread buffers are small against U
    res = dist(world_size, ring_fwd_bwd_peak, seq_len, 2, 64, timeout=300)
    for rank, (peak, rise, rise_fwd, u) in enumerate(res):
        backward = 4 * u + (10 + 2 * (world_size > 2)) * 2 * u // CHUNKS + rise
        forward = u + 2 * u + 2 * u * (world_size > 2) + rise_fwd  # out, K/V arriving (+ K/V in hand when W > 2)
        budget = max(forward, backward)  # the backward's at W = 2; the forward's (whole shards) from W = 3
        assert rise > 0 and rise_fwd > 0, f"rank {rank}: no call of {OP} / {FWD_OP} seen"
        assert peak >= budget - max(rise, rise_fwd), f"rank {rank}: peak {peak / u:.2f} U below the schedule's buffers"
        assert peak <= budget + u // 4, (f"rank {rank}: peak {peak / u:.2f} U, budget {budget / u:.2f} U "
                                         f"(forward {forward / u:.2f} U, backward {backward / u:.2f} U)")


def test_allocated_peak_counts_tensors_and_op_rise():
    keep = []

    def fn():
        a = torch.ones(1 << 20)  # 4 MiB, freed at return
        keep.append(torch.empty(1 << 18))  # 1 MiB, kept
        torch.mm(torch.ones(512, 256), torch.ones(256, 1024))  # 0.5 + 1 + 2 MiB: the op allocates its 2 MiB out
        del a

    peak, rise = allocated_peak(fn, inside="aten::mm")
    assert peak == (4 + 1 + 0.5 + 1 + 2) * 2**20
    assert rise == 2 * 2**20


def test_chunks_cover_the_rows_in_near_equal_pieces():
    from seqpar.strategies.ring import MIN_CHUNK_ROWS, chunks

    for n in (0, 1, MIN_CHUNK_ROWS - 1, 2 * MIN_CHUNK_ROWS - 1, 2 * MIN_CHUNK_ROWS, 5 * MIN_CHUNK_ROWS + 3, 10**6):
        got = chunks(n)
        assert got[0][0] == 0 and got[-1][1] == n and all(b == c for (_, b), (c, _) in zip(got, got[1:])), (n, got)
        sizes = [b - a for a, b in got]
        assert len(got) <= CHUNKS and max(sizes) - min(sizes) <= 1, (n, got)
        assert len(got) == 1 or min(sizes) >= MIN_CHUNK_ROWS, (n, got)
    assert len(chunks(10**6)) == CHUNKS and len(chunks(2 * MIN_CHUNK_ROWS - 1)) == 1


def test_passes_pair_each_chunk_with_its_mirror():
    from seqpar.strategies.ring import MIN_CHUNK_ROWS, chunks, passes

    for n in (1, 2 * MIN_CHUNK_ROWS, 3 * MIN_CHUNK_ROWS, 7 * MIN_CHUNK_ROWS + 5, 10**6):
        c, got = chunks(n), passes(n)
        assert sorted(r for p in got for r in p) == c, (n, got)  # every chunk in exactly one pass
        assert all(len(p) == 2 and p[1] == c[-1 - c.index(p[0])] for p in got[: len(c) // 2]), (n, got)
        assert len(got) == (len(c) + 1) // 2
