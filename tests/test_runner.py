"""The one rank runner (seqpar_tools.runner) seen from outside: killing ``seqpar run``'s parent leaves no rank
behind, a rank killed mid-run is named plainly and the report keeps what was measured, and the library never
imports the tool layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from procs import alive, children, wait_for

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 30  # ranks must be gone this long after their parent died (the watchdog polls every 0.5 s)
JOB = ["run", "--seq-len", "8192", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--check-seq-len", "61",
       "--warmup", "0", "--repeats", "1", "--no-progress", "--strategies", "allreduce", "ring"]


def _start(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "seqpar_tools", *args, "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_seqpar_run_leaves_no_rank(tmp_path, sig):
    proc = _start(JOB, tmp_path)
    try:
        ranks = wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 90, "2 rank processes")
        proc.send_signal(sig)
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in ranks), BOUND_S, f"rank processes {ranks} gone after {sig!r}")
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        for p in children(proc.pid):
            os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(240)
def test_a_rank_killed_mid_run_is_named_and_the_report_keeps_what_was_measured(tmp_path):
    proc = _start(JOB, tmp_path)
    lines = []
    try:
        ranks = wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 90, "2 rank processes")
        for line in proc.stdout:  # until the first strategy has been timed
            lines.append(line)
            if "allreduce: fwd+bwd" in line:
                break
        else:
            pytest.fail("the job ended before allreduce was timed:\n" + "".join(lines) + proc.stderr.read())
        os.kill(ranks[1], signal.SIGKILL)  # ranks start in order: the second pid is rank 1
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "rank 1 was killed by signal 9 (SIGKILL)" in err, err
    assert "out of memory" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["error"]["ranks"][0] == 1 and "SIGKILL" in report["meta"]["error"]["message"]
    (allreduce,) = [r for r in report["rows"] if r["strategy"] == "allreduce"]
    assert allreduce["fwd_s"] > 0 and allreduce["fwd_bwd_s"] > 0 and allreduce["err_float64"] < 1e-10
    assert (tmp_path / "out" / "report.png").is_file()


def test_the_library_imports_no_tool_module():
    """``import seqpar`` and every module under seqpar/ load nothing from seqpar_tools (in a fresh process)."""
    code = """
import importlib, pkgutil, sys
import seqpar
failed = []
for m in pkgutil.walk_packages(seqpar.__path__, "seqpar."):
    try:
        importlib.import_module(m.name)
    except ImportError as e:  # an optional dependency (mpi4py, transformers) missing here
        failed.append(f"{m.name}: {e}")
print(sorted(n for n in sys.modules if n.split(".")[0] == "seqpar_tools"))
print(len([n for n in sys.modules if n.startswith("seqpar.")]), failed, file=sys.stderr)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    assert int(r.stderr.split()[0]) >= 15  # the walk really imported the library's modules


def test_help_and_version_do_not_import_torch():
    code = """
import sys
from seqpar_tools.cli import main
for argv in (["--help"], ["--version"], ["run", "--help"], ["verify", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print("torch" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout[-500:]
    assert "seqpar 0." in r.stdout and "--layout {contiguous,zigzag}" in r.stdout
