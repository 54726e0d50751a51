import pytest
from dist_pool import Pool

_POOLS: dict[int, Pool] = {}


@pytest.fixture(scope="session")
def dist():
    """``dist(W, fn, *args)`` runs ``fn(rank, W, *args)`` on W gloo ranks; returns per-rank results."""

    def run(world_size: int, fn, *args, **kwargs):
        pool = _POOLS.get(world_size)
        if pool is None or pool.broken:
            pool = _POOLS[world_size] = Pool(world_size)
        return pool.run(fn, *args, **kwargs)

    yield run
    for pool in _POOLS.values():
        pool.close(force=pool.broken)
