import pytest
import torch
from dist_pool import Pool, small_ring_chunks

_POOLS: dict[int, Pool] = {}


@pytest.fixture(scope="session")
def dist():
    """``dist(W, fn, *args, timeout=...)`` runs ``fn(rank, W, *args)`` on W gloo ranks (one shared
    :class:`seqpar_tools.runner.Pool` per W); returns per-rank results."""

    def run(world_size: int, fn, *args, **kwargs):
        pool = _POOLS.get(world_size)
        if pool is None or pool.broken:
            pool = _POOLS[world_size] = Pool(world_size)
            pool.run(small_ring_chunks)
        return pool.run(fn, *args, **kwargs)

    yield run
    for pool in _POOLS.values():
        pool.close(force=pool.broken)


@pytest.fixture(scope="module")
def one_thread():
    """The reference runs in the parent while the ranks wait: tiny tensors are fastest on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kernel_registry_reset(monkeypatch):
    """The kernel registry as a fresh process has it (no SEQPAR_KERNEL, no choices cached), before and after."""
    from seqpar.ops import kernels

    monkeypatch.delenv("SEQPAR_KERNEL", raising=False)
    kernels.reset()
    yield
    kernels.reset()
