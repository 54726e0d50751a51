"""seqpar.comm's broadcast (the service's step bus): values, byte counts, the bounded wait.

Run: ``python -m pytest tests/test_comm.py -q``   (MPI: tests/mpi_cases.py, case "broadcast")
"""

from __future__ import annotations

import pytest
import torch
from test_hangs import _run_on_own_pool, _timed_out


def _broadcast(rank, world_size):
    from seqpar.comm import get_communicator

    comm = get_communicator(None)
    got = []
    for src in range(world_size):
        for dtype in (torch.uint8, torch.float32, torch.bfloat16):
            t = (torch.arange(10) * (rank + 1) + src).to(dtype)
            b0 = comm.bytes_sent
            comm.broadcast(t, src)
            got.append((src, str(dtype), t.tolist(), comm.bytes_sent - b0))
    return got


def test_broadcast_delivers_the_source_rank_tensor(dist):
    for w in (2, 3):
        per_rank = dist(w, _broadcast)
        for rank, got in enumerate(per_rank):
            for src, dtype, values, nbytes in got:
                want = (torch.arange(10) * (src + 1) + src).tolist()  # what rank src held
                assert values == want, (w, rank, src, dtype, values)
                size = 1 if dtype == "torch.uint8" else 2 if dtype == "torch.bfloat16" else 4
                assert nbytes == ((w - 1) * 10 * size if rank == src else 0), (w, rank, src, dtype, nbytes)


def _broadcast_nobody_sends(rank, world_size):
    from seqpar.comm import get_communicator

    if rank == 0:
        return ("rank 0 sent nothing", 0.0)
    return _timed_out(lambda: get_communicator(None).broadcast(torch.zeros(4), 0, timeout=1.5), "broadcast returned")


@pytest.mark.timeout(120)
def test_broadcast_waits_at_most_its_timeout():
    msg, secs = _run_on_own_pool(2, _broadcast_nobody_sends)[1]
    assert "broadcast from rank 0" in msg and "did not complete within 1.5 s" in msg, msg
    assert 1.5 * 0.9 <= secs < 1.5 + 10, secs


def test_broadcast_refuses_a_non_contiguous_buffer():
    from seqpar.comm.communicator import Communicator

    class Two(Communicator):
        rank, world_size = 0, 2

    with pytest.raises(ValueError, match="not contiguous"):
        Two().broadcast(torch.zeros(4, 4).t())
