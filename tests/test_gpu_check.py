"""``benchmarks/gpu_check.py`` runs end to end on CPU at small sizes (so the GPU script cannot rot).

Checks the JSON it writes: every section present, every correctness row passing (CPU backends vs the
float64 formula, strategies at W = 2, 3, 4 vs single-device SDPA), timings recorded. Speed is not asserted.

Run: ``python -m pytest tests/test_gpu_check.py -q`` (about 10-20 s: it spawns 4 gloo ranks)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from seqpar.strategies.registry import STRATEGIES

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "gpu_check.py")


def test_gpu_check_small_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, SCRIPT, "--small", "--device", "cpu", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["meta"]["small"] and res["meta"]["device"] == "cpu"
    assert {k["name"] for k in res["meta"]["kernels"]} >= {"cpu_flash", "blockwise", "cuda_flash"}
    sec = res["sections"]

    backends = sec["backends"]
    assert {r["backend"] for r in backends} == {"auto", "cpu_flash", "blockwise"}
    assert {r["case"] for r in backends} >= {"bf16_gqa_causal", "fp16_causal", "bf16_window_causal",
                                              "bf16_documents_causal", "bf16_padding_fully_masked_rows"}
    assert all(r["ok"] for r in backends), [r for r in backends if not r["ok"]]
    assert any(r.get("fully_masked_rows", 0) > 0 and r["fully_masked_rows_ok"] for r in backends)
    assert any(r["case"].startswith("causal_top_left") for r in backends)

    strat = sec["strategies"]["rows"]
    assert {(r["W"], r["strategy"]) for r in strat} == {(w, s) for w in (2, 3, 4) for s in STRATEGIES}
    assert all(r["ok"] for r in strat), [r for r in strat if not r["ok"]]

    tp = sec["throughput"]["rows"]
    assert len(tp) == 8 and all(r["seqpar"]["auto"]["tflops"] > 0 and r["sdpa"]["default"]["tflops"] > 0 for r in tp)
    assert {r["phase"] for r in tp} == {"fwd", "fwd+bwd"} and {r["causal"] for r in tp} == {False, True}

    sh = sec["shards"]
    assert sh["P"] == 8 and sh["loop_ms"] > 0 and 0 <= sh["merge_share"] < 1
    assert sh["max_abs_diff_vs_sdpa"] < 1e-4  # fp32 on CPU

    summary = res["summary"]
    assert summary["backends_all_ok"] and summary["strategies_all_ok"]
    assert summary["bf16_err_ratio_w4_max"] is not None


def test_gpu_check_backends_section_with_emulated_cuda_ops(monkeypatch):
    """Section 1 with the CUDA backends running emulated ops on CPU (tests/fake_cuda_ops.py): the registry's
    choice ("auto") sends unmasked / diagonal blocks to flash and mask-cut blocks to efficient, and every
    case matches the float64 formula -- the script's GPU path short of the GPU."""
    import importlib.util

    import fake_cuda_ops as fake

    from seqpar.ops import kernels
    from seqpar.ops.kernels import registry

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "_backends_for", lambda dev: [])  # "auto" only
    fake.install(monkeypatch)
    kernels.reset()
    try:
        with registry.pretend_available("cuda_flash", "cuda_efficient", "cuda_cudnn", device="cpu"):
            kernels.configure(exclude=("cpu_flash",))
            rows = gpu_check.section_backends(torch.device("cpu"), True, gpu_check.Budget(120))
    finally:
        kernels.reset()
    by_case = {r["case"]: r for r in rows}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert set(by_case["bf16"]["blocks"]) == {"cuda_flash"}
    assert set(by_case["bf16_gqa_causal"]["blocks"]) == {"cuda_flash"}
    assert set(by_case["fp32"]["blocks"]) == {"cuda_efficient"}
    for case in ("bf16_window_causal", "bf16_documents_causal", "bf16_padding_fully_masked_rows"):
        assert "cuda_efficient" in by_case[case]["blocks"], by_case[case]["blocks"]
    assert by_case["bf16_padding_fully_masked_rows"]["fully_masked_rows_ok"]
    assert not any(r.get("fallback_warnings") for r in rows)
