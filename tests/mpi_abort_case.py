"""Run under ``mpiexec -n 2`` by tests/test_mpi.py: rank 1 raises before a collective that rank 0 enters.

``python tests/mpi_abort_case.py init``   the ranks join through seqpar.init_distributed (gloo group)
``python tests/mpi_abort_case.py world``  seqpar's collectives go through mpi4py's COMM_WORLD
``python tests/mpi_abort_case.py skip``   rank 1 skips a seqpar call on COMM_WORLD: rank 0 must raise
                                          PeerTimeout after seqpar's timeout (3 s here), then both exit

seqpar's MPI excepthook must abort the job (exit code != 0) at once; without it rank 0 would wait in
its collective (forever with COMM_WORLD). SEQPAR_TIMEOUT_S is set high by the test, so only the abort
can end the job quickly.

The launcher does not reliably forward a rank's output when the job is aborted (mpich's hydra dropped all of
it in about half the runs here), so with SEQPAR_TEST_MARKS=DIR the script also leaves a file per stage
in DIR (``rank1.raising``, ``rank0.waiting``, ``rank0.returned``) for the test to read.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import seqpar

mode = sys.argv[1]


def mark(name: str) -> None:
    """Leave DIR/name (SEQPAR_TEST_MARKS=DIR): a record that does not depend on the launcher's output."""
    if os.environ.get("SEQPAR_TEST_MARKS"):
        Path(os.environ["SEQPAR_TEST_MARKS"], name).write_text(f"{time.time()}\n")


if mode == "skip":
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
    mark("rank1.raising")
    raise RuntimeError("rank 1 fails before a collective")
t0 = time.monotonic()
mark("rank0.waiting")
seqpar.softmax(torch.zeros(2, 3), group=group)
mark("rank0.returned")
print(f"rank {rank}: the collective returned after {time.monotonic() - t0:.1f} s (it should have been aborted)")
