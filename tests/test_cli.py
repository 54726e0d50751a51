"""The seqpar command: run on a tiny config (report files), verify (exit codes), info, bench wiring, flag
overrides, and how the spawner reports a failing, dying or hanging rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar_tools import cli
from seqpar_tools.names import STRATEGIES
from seqpar_tools.runner import RankError, spawn

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = """
[run]
world_size = 2
timeout_s = 120.0
[attention]
heads = 4
kv_heads = 2
head_dim = 8
seq_len = 97
[measure]
warmup = 0
repeats = 1
[check]
seq_len = 23
"""


def seqpar(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqpar_tools", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_run_tiny_config_writes_a_parseable_report(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    code = cli.main(["run", str(cfg), "--out", str(out), "--log-all-ranks", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "[rank 1]" in stdout  # --log-all-ranks
    for s in ("allreduce", "ring", "allgather"):
        assert s in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"title", "meta", "rows"}
    assert [row["strategy"] for row in report["rows"]] == list(STRATEGIES)  # every registered one
    for row in report["rows"]:
        for key in ("fwd_s", "fwd_bwd_s", "bytes_per_rank_fwd", "bytes_per_rank_fwd_bwd", "peak_mem_bytes",
                    "err_float64", "err_long", "ok"):
            assert key in row, key
        assert row["ok"] is True and row["err_float64"] < 1e-10 and row["err_long"] < 2e-5
        assert row["seq_len"] == 97 and row["world_size"] == 2 and len(row["peak_mem_bytes_per_rank"]) == 2
        assert row["bytes_per_rank_fwd"] > 0 and row["bytes_per_rank_fwd_bwd"] > row["bytes_per_rank_fwd"]
    meta = report["meta"]
    assert meta["launcher"] == "spawned by seqpar" and meta["config"]["attention"]["seq_len"] == 97
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_write_report_several_lengths(tmp_path):
    from seqpar_tools.report import write_report

    rows = [{"impl": f"seqpar:{s}", "strategy": s, "seq_len": n, "causal": c, "fwd_s": 0.1 * n / 1024,
             "fwd_bwd_s": 0.3 * n / 1024, "bytes_per_rank_fwd": 1000 * n, "bytes_per_rank_fwd_bwd": 3000 * n}
            for s in ("ring", "allgather") for n in (1024, 2048, 4096) for c in (False, True)]
    paths = write_report(rows, tmp_path / "r", title="t", meta={"x": 1}, stem="bench")
    assert paths["json"].name == "bench.json" and paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths["json"].read_text())["rows"] == rows


def test_verify_passes_and_fails_with_exit_codes(tmp_path, capsys):
    js = tmp_path / "v.json"
    code = cli.main(["verify", "--seq-lens", "11", "--dtypes", "float64", "--causal", "yes", "--window", "3",
                     "--documents", "2", "--json", str(js), "--no-progress"])
    assert code == 0, capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 * len(STRATEGIES) and all(r["ok"] and r["err"] < 1e-10 for r in rows)
    capsys.readouterr()
    # a tolerance nothing can meet: every case must be reported as a mismatch, from rank 0 only
    code = cli.main(["verify", "--seq-lens", "11", "--dtypes", "float32", "--layouts", "zigzag", "--causal", "no",
                     "--strategies", "ring", "--rtol", "1e-30", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    assert "MISMATCH" in stdout and "[rank" not in stdout and "do not match" in stdout


def test_world_size_must_match_the_launcher(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["run", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "run.world_size = 3" in err and "torchrun started 2 ranks" in err


def test_info_json():
    r = seqpar("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    import torch

    import seqpar as sp

    assert data["versions"]["seqpar"] == sp.__version__ and data["versions"]["torch"] == torch.__version__
    assert data["backends"]["gloo"] is True
    kernels = data["kernels"]  # every registered backend, with what it supports or why it is not available here
    assert {"cpu_flash", "blockwise", "cuda_flash", "cuda_efficient", "cuda_cudnn"} <= set(kernels)
    assert kernels["blockwise"]["available"] and kernels["cpu_flash"]["available"]
    for name in ("cuda_flash", "cuda_efficient", "cuda_cudnn"):
        assert kernels[name]["available"] == torch.cuda.is_available() or kernels[name]["why_not"]


def test_bench_is_wired_to_seqpar_bench_main(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("seqpar_tools.bench")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "seqpar_tools.bench", fake)
    assert cli.main(["bench", "--seq-lens", "64", "--help"]) == 7
    assert seen == [["--seq-lens", "64", "--help"]]


def test_flags_override_the_config(tmp_path, monkeypatch):
    import seqpar_tools.run

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text("[attention]\nheads = 8\nkv_heads = 2\n[measure]\nrepeats = 4\n")
    got = []
    monkeypatch.setattr(seqpar_tools.run, "run_job", lambda cfg, **kw: got.append((cfg, kw)) or 0)
    assert cli.main(["run", str(cfg_path), "--heads", "4", "--no-causal", "--strategies", "ring",
                     "--set", "measure.warmup=3", "--out", "o", "--log-all-ranks"]) == 0
    cfg, kw = got[0]
    assert (cfg.attention.heads, cfg.attention.kv_heads, cfg.attention.is_causal) == (4, 2, False)
    assert cfg.attention.strategies == ["ring"] and cfg.measure.repeats == 4 and cfg.measure.warmup == 3
    assert cfg.run.out == "o" and kw["log_all_ranks"] is True


def test_config_error_exit_code_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[attention]\nheads = 3\nkv_heads = 2\n")
    assert cli.main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "attention.heads = 3" in err
    assert cli.main(["run", "--set", "measure.repeats=0"]) == 2
    assert "command line: measure.repeats = 0" in capsys.readouterr().err


def test_init_distributed_single_process_is_idempotent():
    code = "import seqpar; print(seqpar.init_distributed(), seqpar.init_distributed())"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(0, 1) (0, 1)"


# --- the spawner: failures reach the caller with the rank named, and nothing hangs -------------------


def job_raises_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on purpose")
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits for the dead peer: the spawner must not


def job_dies_on_rank_1(ctx):
    if ctx.rank == 1:
        os._exit(3)
    import torch.distributed as dist

    dist.barrier()


def job_hangs_on_rank_1(ctx):
    if ctx.rank == 1:
        time.sleep(600)  # a stuck rank (simulated), not synchronisation
    return "unreachable"


def test_spawn_reports_the_failing_rank_with_its_traceback():
    with pytest.raises(RankError) as e:
        spawn(job_raises_on_rank_1, (), world_size=2, timeout_s=60)
    assert 1 in e.value.errors and str(e.value).startswith("rank 1 failed:")
    assert "ValueError: boom on purpose" in str(e.value) and "job_raises_on_rank_1" in str(e.value)


def test_spawn_reports_a_rank_that_died_silently():
    with pytest.raises(RankError) as e:
        spawn(job_dies_on_rank_1, (), world_size=2, timeout_s=60)
    assert "exited with code 3" in e.value.errors[1]


def test_spawn_times_out_on_a_stuck_rank():
    t0 = time.monotonic()
    with pytest.raises(RankError) as e:
        spawn(job_hangs_on_rank_1, (), world_size=2, timeout_s=4)
    assert time.monotonic() - t0 < 60
    assert 1 in e.value.errors and "4 s" in e.value.errors[1]


# --- every argument is checked before any rank starts (exit 2, "seqpar: error: ...") ----------------------


@pytest.fixture
def no_ranks(monkeypatch):
    """Fails the test if a command starts ranks: the validation must come first."""
    from seqpar_tools import runner

    def refuse(*a, **k):
        raise AssertionError("ranks were started before the arguments were checked")

    monkeypatch.setattr(runner.Pool, "__init__", refuse)


def _error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.startswith("seqpar: error: ") or err.startswith("seqpar bench: error: "), err
    return err


def test_run_out_that_cannot_be_written_is_found_first(tmp_path, capsys, no_ranks):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _error(capsys, ["run", "--out", str(blocker / "sub"), "--no-progress"])
    assert "run.out" in err and str(blocker / "sub") in err and "cannot write there" in err
    err = _error(capsys, ["verify", "--json", str(blocker / "sub" / "v.json"), "--no-progress"])
    assert "--json" in err and "cannot write there" in err


@pytest.mark.parametrize("flags, words", [
    (["--timeout", "nan"], ["run.timeout_s = nan", "finite"]),
    (["--timeout", "inf"], ["run.timeout_s = inf", "finite"]),
    (["--timeout", "0"], ["run.timeout_s = 0.0", "> 0"]),
    (["--rtol", "nan"], ["check.rtol = nan"]),
    (["--rtol=-1e-5"], ["check.rtol = -1e-05", "> 0"]),
    (["--heads", "0"], ["attention.heads = 0", ">= 1"]),
    (["--kv-heads", "0"], ["attention.kv_heads = 0", ">= 1"]),
    (["--head-dim", "0"], ["attention.head_dim = 0"]),
    (["--world-size", "-1"], ["run.world_size = -1"]),
    (["--seq-len", "-5"], ["attention.seq_len = -5"]),
    (["--world-size", "3", "--check-seq-len", "5"], ["check.seq_len = 5", ">= 2 * run.world_size = 6"]),
])
def test_run_flag_validation(tmp_path, capsys, no_ranks, flags, words):
    err = _error(capsys, ["run", *flags, "--out", str(tmp_path), "--no-progress"])
    assert "command line: " in err
    for w in words:
        assert w in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with CUDA accepts these")
@pytest.mark.parametrize("flags, key", [(["--backend", "nccl"], "run.backend = 'nccl'"),
                                        (["--device", "cuda"], "run.device = 'cuda'")])
def test_cuda_request_without_cuda_is_a_config_error(tmp_path, capsys, no_ranks, flags, key):
    err = _error(capsys, ["run", *flags, "--out", str(tmp_path)])
    assert key in err and "needs CUDA" in err and "command line" in err
    cfg = tmp_path / "gpu-like.toml"
    cfg.write_text('[run]\ndevice = "cuda"\nbackend = "nccl"\n')
    err = _error(capsys, ["run", str(cfg), "--out", str(tmp_path)])
    assert f"{cfg}: run.device = 'cuda'" in err


@pytest.mark.parametrize("flags, words", [
    (["--heads", "0"], ["--heads 0", ">= 1"]),
    (["--batch", "0"], ["--batch 0", ">= 1"]),
    (["--kv-heads", "0"], ["--kv-heads 0"]),
    (["--head-dim", "0"], ["--head-dim 0"]),
    (["--world-size", "-1"], ["--world-size -1"]),
    (["--seq-lens", "-3"], ["--seq-lens -3"]),
    (["--seq-lens", "3"], ["--seq-lens 3", "2 * world size = 4"]),
    (["--timeout", "inf"], ["--timeout inf", "finite"]),
    (["--rtol", "nan"], ["--rtol nan"]),
    (["--window", "-2"], ["--window -2"]),
    (["--heads", "3", "--kv-heads", "2"], ["--heads 3", "multiple of --kv-heads 2"]),
])
def test_verify_flag_validation(capsys, no_ranks, flags, words):
    err = _error(capsys, ["verify", *flags, "--no-progress"])
    for w in words:
        assert w in err, err


def test_verify_reports_every_bad_flag_at_once(capsys, no_ranks):
    err = _error(capsys, ["verify", "--heads", "0", "--batch", "0", "--head-dim", "-1"])
    assert len(err.strip().splitlines()) == 3 and all(f in err for f in ("--heads 0", "--batch 0", "--head-dim -1"))


def test_memory_is_estimated_before_any_work(tmp_path, capsys, no_ranks):
    err = _error(capsys, ["run", "--seq-len", str(1 << 22), "--heads", "64", "--kv-heads", "64", "--head-dim", "256",
                          "--out", str(tmp_path)])
    assert "needs about" in err and "GiB on this node" in err and "available" in err and "attention.seq_len" in err
    err = _error(capsys, ["verify", "--seq-lens", "300000"])
    assert "--seq-lens 300000 needs about" in err and "float64 reference" in err


def test_bench_flag_validation(capsys, no_ranks, tmp_path):
    err = _error(capsys, ["bench", "--heads", "0", "--timeout", "nan", "--out", str(tmp_path)])
    assert "--heads 0" in err and "--timeout nan" in err


def test_version():
    r = seqpar("--version")
    assert r.returncode == 0 and r.stdout.startswith("seqpar ") and r.stdout.split()[1][0].isdigit(), r
