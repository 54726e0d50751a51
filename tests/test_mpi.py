"""Runs tests/mpi_cases.py under ``mpiexec -n 3`` (mpi4py communicator, numpy and torch inputs), and
tests/mpi_abort_case.py under ``mpiexec -n 2`` (an uncaught exception on one rank ends the job).

Run: ``python -m pytest tests/test_mpi.py -q``   (needs ``pip install -e '.[mpi]'``: mpi4py + mpich)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_RANKS = 3
MPI_TIMEOUT_S = 120
N_CASES = 15  # the cases mpi_cases.py runs; a script that silently skipped some must fail here
SCRIPT = Path(__file__).with_name("mpi_cases.py")


def _mpiexec() -> str | None:
    """mpiexec of the mpich wheel next to this Python, else the first on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def _need_mpi() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed: pip install -e '.[mpi]' (mpi4py + mpich)")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the Python executable nor on PATH: pip install -e '.[mpi]'")
    return mpiexec


ABORT_BOUND_S = 45  # start-up of 2 ranks (~5-10 s on a loaded 2-core box) + the abort


@pytest.mark.timeout(ABORT_BOUND_S + 30)
@pytest.mark.parametrize("mode", ["init", "world"])
def test_an_uncaught_exception_on_one_rank_ends_the_mpi_job(mode, tmp_path):
    """rank 1 raises before a collective that rank 0 waits in: the job must end, non-zero, in bounded time
    (seqpar's collective timeout is set to 600 s, so only the abort can end it). What each rank reached is
    read from marker files: hydra drops the ranks' forwarded output in about half of aborted runs."""
    mpiexec = _need_mpi()
    script = SCRIPT.with_name("mpi_abort_case.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQPAR_TIMEOUT_S": "600", "SEQPAR_TEST_MARKS": str(tmp_path)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), mode], capture_output=True, text=True,
                              timeout=ABORT_BOUND_S, env=env, cwd=SCRIPT.parent.parent, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the MPI job was still running after {ABORT_BOUND_S} s: rank 0 hangs\n{e.stdout}\n{e.stderr}")
    report = proc.stdout + proc.stderr
    marks = sorted(p.name for p in tmp_path.iterdir())
    assert proc.returncode != 0, report
    # rank 1 raised, rank 0 was inside the collective, and it never returned: only the abort ended the job
    assert marks == ["rank0.waiting", "rank1.raising"], (marks, report)
    print(f"mode={mode}: job ended with code {proc.returncode} after {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(ABORT_BOUND_S + 30)
def test_a_collective_one_rank_skips_raises_peer_timeout_under_mpi():
    mpiexec = _need_mpi()
    script = SCRIPT.with_name("mpi_abort_case.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), "skip"], capture_output=True,
                              text=True, timeout=ABORT_BOUND_S, env=env, cwd=SCRIPT.parent.parent, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still running after {ABORT_BOUND_S} s: rank 0 hangs in the skipped collective\n{e.stdout}")
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    m = re.search(r"rank 0 raised after ([0-9.]+) s: (.*)", proc.stdout)
    assert m and 2.7 <= float(m.group(1)) < 13, report
    assert "all_gather" in m.group(2) and "did not complete within 3 s" in m.group(2) and "rank 0 of 2" in m.group(2)


@pytest.mark.timeout(MPI_TIMEOUT_S + 30)
def test_mpi_cases_under_mpiexec():
    mpiexec = _need_mpi()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [mpiexec, "-n", str(N_RANKS), sys.executable, str(SCRIPT)],
            capture_output=True, text=True, timeout=MPI_TIMEOUT_S, env=env, cwd=SCRIPT.parent.parent, check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {N_RANKS} {SCRIPT.name} did not finish within {MPI_TIMEOUT_S} s:\n"
                    f"{e.stdout}\n{e.stderr}")
    report = proc.stdout + proc.stderr
    print(report)  # per-case max errors, shown with -s or on failure
    assert proc.returncode == 0, report
    lines = re.findall(r"^(PASS|FAIL) .*$", proc.stdout, flags=re.M)
    assert len(lines) == N_CASES and set(lines) == {"PASS"}, report
    assert f"{N_CASES}/{N_CASES} cases passed on {N_RANKS} MPI ranks" in proc.stdout, report
