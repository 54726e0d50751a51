"""The launchers: torchrun.sh and mpirun.sh really run a tiny job on 2 local CPU ranks; the command lines for
multi-node, Open MPI and Slurm are checked through DRY_RUN=1 (with stub srun/scontrol/mpirun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TINY_VERIFY = ["verify", "--seq-lens", "13", "--dtypes", "float64", "--layouts", "zigzag", "--causal", "yes",
               "--no-progress"]


def sh(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    base.update({"PYTHON": sys.executable, "NPROC": "2", "NP": "2"})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=timeout)


def test_torchrun_sh_runs_a_tiny_job():
    r = sh("torchrun.sh", *TINY_VERIFY, "--strategies", "ring", "allgather")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 2 cases match (2 ranks, torchrun)" in r.stdout


def test_a_script_that_ends_without_destroying_its_group_exits_0(tmp_path):
    """A user script that calls seqpar.init_distributed() and just ends: torch 2.13 aborted about half such gloo
    runs at interpreter exit (SIGABRT, "terminate called without an active exception"), failing a finished job;
    init_distributed now destroys the group at exit. Four runs (each would fail with probability ~1/2 before)."""
    script = tmp_path / "ends.py"
    script.write_text("import torch, seqpar\nseqpar.init_distributed()\n"
                      "print('out', seqpar.kv_sharded_attention(*(torch.ones(1, 2, 3, 8) for _ in range(3))).sum())\n")
    for i in range(4):
        r = sh("torchrun.sh", str(script))
        assert r.returncode == 0 and "terminate called" not in r.stderr, f"run {i}:\n{r.stdout}{r.stderr}"


def test_torchrun_sh_with_three_ranks_runs_the_builtin_config(tmp_path):
    """NPROC other than 2 used to fail: the built-in config fixed world_size = 2. The launcher's size wins."""
    r = sh("torchrun.sh", "run", "--seq-len", "40", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
           "--check-seq-len", "12", "--warmup", "0", "--repeats", "1", "--strategies", "ring", "--out", str(tmp_path),
           "--no-progress", env={"NPROC": "3"}, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "report.json").read_text())["meta"]
    assert meta["launcher"] == "torchrun" and meta["world_size"] == 3


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec (pip install -e '.[mpi]')")
def test_mpirun_sh_runs_the_job_over_gloo_bootstrapped_by_mpi(tmp_path):
    pytest.importorskip("mpi4py")
    r = sh("mpirun.sh", "run", "--seq-len", "40", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
           "--check-seq-len", "12", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path),
           "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "report.json").read_text())["meta"]
    assert meta["launcher"] == "mpi" and meta["world_size"] == 2


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec (pip install -e '.[mpi]')")
def test_mpirun_sh_verify_through_the_mpi4py_communicator():
    pytest.importorskip("mpi4py")
    r = sh("mpirun.sh", *TINY_VERIFY, "--group", "mpi", "--strategies", "allreduce")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 1 cases match (2 ranks, mpi)" in r.stdout


def dry(script: str, *args: str, env: dict | None = None) -> str:
    r = sh(script, *args, env={"DRY_RUN": "1", **(env or {})})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_torchrun_sh_convention_and_multinode_rendezvous():
    assert "--standalone" in dry("torchrun.sh") and "-m seqpar_tools run" in dry("torchrun.sh")
    gpu = dry("torchrun.sh", "configs/gpu.toml", "--repeats", "5")
    assert "-m seqpar_tools run configs/gpu.toml --repeats 5" in gpu
    out = dry("torchrun.sh", "examples/train.py", "--steps", "5",
              env={"NNODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "RDZV_ID": "job7", "NPROC": "8"})
    for part in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:1234", "--rdzv-id=job7",
                 "--nproc-per-node=8", "examples/train.py --steps 5"):
        assert part in out, out
    static = dry("torchrun.sh", env={"NNODES": "2", "NODE_RANK": "1", "RDZV_BACKEND": "static"})
    assert "--node-rank=1" in static and "--master-addr=127.0.0.1" in static
    bad = sh("torchrun.sh", "--repeats", "5")
    assert bad.returncode == 2 and "first argument" in bad.stderr


def _stub(dirpath: Path, name: str, body: str) -> None:
    p = dirpath / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(0o755)


def test_mpirun_sh_flavours(tmp_path):
    _stub(tmp_path, "ompi", 'echo "mpirun (Open MPI) 5.0.3"\n')
    out = dry("mpirun.sh", "verify", env={"MPIEXEC": str(tmp_path / "ompi"), "OMP_NUM_THREADS": "3"})
    assert "# openmpi" in out and "-x OMP_NUM_THREADS=3" in out and "-np 2" in out
    assert ("--allow-run-as-root" in out) == (os.geteuid() == 0)
    _stub(tmp_path, "hydra", 'echo "HYDRA build details:"\n')
    out = dry("mpirun.sh", env={"MPIEXEC": str(tmp_path / "hydra"), "HOSTS": "a,b"})
    assert "# mpich" in out and "-genv OMP_NUM_THREADS 1" in out and "-hosts a,b" in out
    assert "-m seqpar_tools run configs/mpi.toml" in out


def test_slurm_sbatch_starts_torchrun_on_every_node_with_the_rendezvous(tmp_path):
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
    _stub(tmp_path, "scontrol", 'printf "nodeA\\nnodeB\\n"\n')
    # srun stub: drop srun's own options, run the command here (one "node")
    _stub(tmp_path, "srun", 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "nodeA,nodeB",
           "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_GPUS_ON_NODE": "4", "NPROC": ""}
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, **env, "DRY_RUN": "1", "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for part in ("torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=nodeA:29500",
                 "--rdzv-id=42", "--nproc-per-node=4", "-m seqpar_tools run configs/multinode.toml"):
        assert part in r.stdout, r.stdout
