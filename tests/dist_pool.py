"""The tests' pool of gloo ranks: :class:`seqpar_tools.runner.Pool` (process-group start-up is paid once per
world size), with the per-call timeout of this test run.

``Pool(world_size).run(fn, *args, timeout=..., **kwargs)`` runs the module-level ``fn(rank, world_size, *args)``
on every rank and returns the per-rank results; an exception on any rank fails the call with the rank named
(:class:`RankError`), a rank that dies or does not answer within ``timeout`` seconds fails it too (the pool is
then ``broken``). ``SEQPAR_TEST_TIMEOUT`` (120 s) is the default per-call timeout and the process group's.
"""

from __future__ import annotations

import os

from seqpar.distributed import free_port
from seqpar_tools import runner
from seqpar_tools.runner import RankError

RANK_TIMEOUT_S = float(os.environ.get("SEQPAR_TEST_TIMEOUT", "120"))

__all__ = ["RANK_TIMEOUT_S", "Pool", "RankError", "free_port"]


class Pool(runner.Pool):
    def __init__(self, world_size: int):
        super().__init__(world_size, timeout_s=RANK_TIMEOUT_S)


def small_ring_chunks(rank: int, world_size: int) -> None:
    """Run on every new pool: ring's backward splits shards of any size into chunks (by default only shards of
    2 * MIN_CHUNK_ROWS = 2048 rows or more), so the grid's small shapes test the chunked schedule."""
    from seqpar.strategies import ring

    ring.MIN_CHUNK_ROWS = 2
