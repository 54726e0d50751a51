"""Run under ``mpiexec -n 2`` by tests/test_mpi.py: rank 1 raises before a collective that rank 0 enters.

``python tests/mpi_abort_case.py init``   the ranks join through seqpar.init_distributed (gloo group)
``python tests/mpi_abort_case.py world``  seqpar's collectives go through mpi4py's COMM_WORLD
``python tests/mpi_abort_case.py skip``   rank 1 skips a seqpar call on COMM_WORLD: rank 0 must raise
                                          PeerTimeout after seqpar's timeout (3 s here), then both exit

seqpar's MPI excepthook must abort the job (exit code != 0) at once; without it rank 0 would wait in
its collective (forever with COMM_WORLD). SEQPAR_TIMEOUT_S is set high by the test, so only the abort
can end the job quickly.
"""

from __future__ import annotations

import sys
import time

import torch

import seqpar

mode = sys.argv[1]
if mode == "skip":
    import os

    from mpi4py import MPI

    from seqpar.comm import PeerTimeout, set_timeout

    world = MPI.COMM_WORLD
    set_timeout(3)
    if world.Get_rank() == 0:
        t0 = time.monotonic()
        try:
            seqpar.softmax(torch.zeros(2, 3), group=world)
            print("rank 0: softmax returned although rank 1 never joined", flush=True)
        except PeerTimeout as e:
            print(f"rank 0 raised after {time.monotonic() - t0:.1f} s: {e}", flush=True)
        world.send("done", dest=1, tag=99)
    else:
        world.recv(source=0, tag=99)  # rank 1 skipped the softmax; it waits for rank 0's verdict
    os._exit(0)  # not MPI_Finalize: rank 0's abandoned collective is still pending
if mode == "init":
    rank, _ = seqpar.init_distributed()
    group = None
else:
    from mpi4py import MPI

    group = MPI.COMM_WORLD
    rank = group.Get_rank()
    seqpar.softmax(torch.zeros(2, 3), group=group)  # a first call: every rank is inside seqpar's MPI setup
if rank == 1:
    raise RuntimeError("rank 1 fails before a collective")
t0 = time.monotonic()
seqpar.softmax(torch.zeros(2, 3), group=group)
print(f"rank {rank}: the collective returned after {time.monotonic() - t0:.1f} s (it should have been aborted)")
