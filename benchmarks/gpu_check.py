"""One-run check of seqpar's local kernels and strategies on one GPU (issue 9), JSON out; runs on CPU too.

    python benchmarks/gpu_check.py --out gpu_check.json        # one GPU: about 2-4 minutes, budget 280 s
    python benchmarks/gpu_check.py --small --out check.json    # small sizes (automatic without CUDA): seconds

Four sections (``--sections 1,2,3,4``); each records errors as data and never stops the run:

1. ``backends``: every backend available here (``seqpar.ops.kernels.describe()``) and the registry's own
   choice ("auto") through seqpar's block loop (queries and keys split in two as on two ranks, partials
   merged, backward with the global out/LSE) against the float64 formula, forward and dq/dk/dv: bf16, fp16,
   fp32, GQA, causal, sliding window, documents, key padding with fully masked rows (0, never NaN), and
   ``is_causal`` with Sq != Sk (top-left); next to single-device SDPA's error
   on the same inputs. ``blocks`` shows which backend ran each block.
2. ``strategies``: ``seqpar.attention`` with every registered strategy at W = 2, 3, 4 ranks, all on
   this one device, over gloo (CUDA tensors on a GPU: NCCL refuses two ranks per GPU), bf16, forward and
   backward, against single-device SDPA (error ratio vs the float64 formula; target <= 1.5 at W = 4).
3. ``throughput``: seqpar's local path (``tiled_forward`` / ``tiled_backward`` on one shard, the registry's
   choice and each fused backend forced) against ``F.scaled_dot_product_attention`` on the same shard with
   each SDPA backend: B=1, H=16, D=128, bf16, S = 8k and 32k, causal and not, forward and fwd+bwd, in TFLOP/s
   (fwd 4·B·H·S²·D, halved when causal; fwd+bwd 3.5x that) and as a ratio to SDPA's best (target >= 0.95).
4. ``shards``: the keys in P = 8 shards, seqpar's shard loop (kernel + float32 LSE merge per shard) against
   one SDPA call over all keys: ratio, and the share of merges and bookkeeping (target <= 3 % at
   S_local >= 16k).

H100 anchors (torch 2.11 + cu130, H100 80GB HBM3, measured for the issue) are printed next to the figures.
``--small`` (or no CUDA): section sizes shrink to seconds on CPU; ``tests/test_gpu_check.py`` runs it so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpar.ops import kernels, masks, reference  # noqa: E402
from seqpar.ops.lse import NEG_INF, merge_into  # noqa: E402
from seqpar.ops.masks import MaskSpec, Tokens, dense_mask  # noqa: E402
from seqpar.ops.tiled import block_kernels, tiled_backward, tiled_forward  # noqa: E402
from seqpar.strategies.registry import STRATEGIES  # noqa: E402

# From /work/shared/anchors/h100-attention-{kernels,fwdbwd}.json (B=1, H=16, D=128, bf16; ms and TFLOP/s).
ANCHORS_H100 = {
    8192: {"sdpa_cudnn_fwd_tflops": 628.0, "sdpa_cudnn_causal_fwd_tflops": 543.1, "sdpa_flash_fwd_tflops": 349.3,
           "sdpa_flash_causal_fwd_tflops": 281.5, "sdpa_eff_fwd_tflops": 172.9, "sdpa_eff_causal_fwd_tflops": 153.8,
           "cudnn_fwdbwd_tflops": 558.3, "cudnn_causal_fwdbwd_tflops": 445.0, "flash_fwdbwd_tflops": 297.6,
           "flash_causal_fwdbwd_tflops": 250.7, "eff_fwdbwd_tflops": 141.3, "eff_causal_fwdbwd_tflops": 121.5,
           "flash_lse_fwd_tflops": 318.2, "cudnn_lse_fwd_tflops": 662.1,
           "flash_lse_P8_ms": 3.087, "merge_P8_ms": 1.389, "cudnn_lse_P8_ms": 2.276, "sdpa_cudnn_ms": 0.875},
    32768: {"sdpa_cudnn_fwd_tflops": 606.7, "sdpa_cudnn_causal_fwd_tflops": 632.6, "sdpa_flash_fwd_tflops": 357.7,
            "sdpa_flash_causal_fwd_tflops": 340.7, "sdpa_eff_fwd_tflops": 181.8, "sdpa_eff_causal_fwd_tflops": 171.4,
            "cudnn_fwdbwd_tflops": 562.9, "cudnn_causal_fwdbwd_tflops": 538.4, "flash_fwdbwd_tflops": 324.7,
            "flash_causal_fwdbwd_tflops": 307.4, "eff_fwdbwd_tflops": 146.5, "eff_causal_fwdbwd_tflops": 141.8,
            "flash_lse_fwd_tflops": 345.8, "cudnn_lse_fwd_tflops": 617.7,
            "flash_lse_P8_ms": 31.061, "merge_P8_ms": 5.31, "cudnn_lse_P8_ms": 19.283, "sdpa_cudnn_ms": 14.497},
}
TARGETS = {"local_vs_best_sdpa_min": 0.95, "merge_and_bookkeeping_share_max": 0.03, "bf16_err_ratio_w4_max": 1.5}
ERR_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # below this an error "passes"


def log(msg: str) -> None:
    print(msg, flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


TIMING = {"min_time": 0.25, "max_iter": 20, "min_iter": 3}


def timed(fn, dev) -> float:
    """Median seconds per call after one warm-up call (at least ``min_iter`` calls, ``min_time`` seconds)."""
    min_time, max_iter, min_iter = TIMING["min_time"], TIMING["max_iter"], TIMING["min_iter"]
    fn()
    sync(dev)
    ts: list[float] = []
    t_start = time.perf_counter()
    while len(ts) < min_iter or (len(ts) < max_iter and time.perf_counter() - t_start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def err_info(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def max_err(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """max |a - b| over the rows that see a key (``rows`` (B, H, S) bool), NaN reported as inf."""
    d = (a.detach().double() - b.detach().double()).abs()
    if rows is not None:
        d = d[rows.expand(d.shape[:3])]
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    return float(d.max()) if d.numel() else 0.0


# --- 1. backends vs the float64 formula -------------------------------------------------------------


def _backends_for(dev: torch.device) -> list[str]:
    """The backends available here that run tensors of ``dev``."""
    return [r["name"] for r in kernels.describe()
            if r["available"] and (dev.type in r["devices"] or "any" in r["devices"])]


def _cases(small: bool):
    s = 48 if small else 1024
    w = 12 if small else 160
    return [  # name, dtype, H_kv, causal, window, documents, padding
        ("bf16", torch.bfloat16, 4, False, None, False, False),
        ("bf16_gqa_causal", torch.bfloat16, 1, True, None, False, False),
        ("fp16_causal", torch.float16, 4, True, None, False, False),
        ("fp32", torch.float32, 4, False, None, False, False),
        ("bf16_window_causal", torch.bfloat16, 2, True, w, False, False),
        ("bf16_documents_causal", torch.bfloat16, 4, True, None, True, False),
        ("bf16_padding_fully_masked_rows", torch.bfloat16, 4, False, None, False, True),
    ], s


def _tokens_for(s: int, b: int, documents: bool, padding: bool, gen: torch.Generator):
    pos = torch.arange(s)
    doc = keep = None
    if documents:
        cuts = sorted(torch.randperm(s - 2, generator=gen)[:3].add(1).tolist())
        doc = torch.zeros(b, s, dtype=torch.long)
        for c in cuts:
            doc[:, c:] += 1
        doc[1:, : s // 3] = 7  # another split in the other batch rows
    if padding:
        keep = torch.rand(b, s, generator=gen) > 0.25
        keep[1] = False  # batch row 1 sees no key at all: out 0, lse -inf, grads 0
    return Tokens(pos, doc, keep)


def _halves(n: int) -> list[tuple[int, int]]:
    return [(0, n // 2), (n // 2, n)]


def _seqpar_split(q, k, v, dout, qt, kt, spec, scale):
    """seqpar's block loop as two ranks would run it: queries and keys in two halves each; per query half the
    key halves' partials merged into one accumulator, then the backward of every pair with the global out/lse
    (as the ring does). Causal: diagonal, full and skipped pairs; masks: pairs cut by them."""
    sq, sk = q.shape[2], k.shape[2]
    outs, lses = [], []
    for a, b in _halves(sq):
        acc = None
        for c, d in _halves(sk):
            acc = tiled_forward(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], qt.slice(a, b), kt.slice(c, d), spec, scale,
                                acc)
        outs.append(acc[0].float())
        lses.append(acc[1])
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    out_q = out.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for a, b in _halves(sq):
        for c, d in _halves(sk):
            gq, gk, gv = tiled_backward(dout[:, :, a:b], q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], out_q[:, :, a:b],
                                        lse[:, :, a:b], qt.slice(a, b), kt.slice(c, d), spec, scale)
            dq[:, :, a:b] += gq
            dk[:, :, c:d] += gk
            dv[:, :, c:d] += gv
    return out, lse, dq, dk, dv


def section_backends(dev, small, budget) -> list[dict]:
    rows = []
    cases, s = _cases(small)
    b, h, d = 2, 4, (16 if small else 64)
    names = ["auto"] + _backends_for(dev)
    for case, dtype, hkv, causal, window, documents, padding in cases:
        gen = torch.Generator().manual_seed(len(rows))
        q = torch.randn(b, h, s, d, generator=gen).to(dtype)
        k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
        v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
        dout = torch.randn(b, h, s, d, generator=gen).to(dtype)
        tok = _tokens_for(s, b, documents, padding, gen)
        spec = MaskSpec(is_causal=causal, window_size=window)
        mask = dense_mask(tok, tok, spec)  # (B|1, 1, S, S) bool
        scale = d ** -0.5
        q64, k64, v64 = (t.to(dev).double().requires_grad_() for t in (q, k, v))  # float64 formula, on the device
        r_out, r_lse, _ = reference.attention(q64, k64, v64, scale=scale, mask=None if mask is None else mask.to(dev))
        r_grads = torch.autograd.grad(r_out, (q64, k64, v64), dout.to(dev).double())
        r_out, r_lse, r_grads = r_out.detach().cpu(), r_lse.cpu(), [t.cpu() for t in r_grads]
        seen = ~torch.isneginf(r_lse)  # rows that see at least one key
        # single-device SDPA on the same rounded inputs (math on CPU; on GPU whichever SDPA picks)
        qs, ks, vs = (t.to(dev).detach().requires_grad_() for t in (q, k, v))
        sdpa_mask = None if mask is None else mask.to(dev)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s_out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=sdpa_mask, scale=scale,
                                                       enable_gqa=hkv != h)
                s_grads = torch.autograd.grad(s_out, (qs, ks, vs), dout.to(dev))
            sdpa = {"err_out": max_err(s_out.cpu(), r_out, seen),
                    "err_grads": max(max_err(g.cpu(), r) for g, r in zip(s_grads, r_grads))}
        except Exception as e:  # noqa: BLE001 - reported
            sdpa = {"error": err_info(e)}
        qd, kd, vd, dd = (t.to(dev) for t in (q, k, v, dout))
        tok_d = Tokens(tok.pos.to(dev), None if tok.doc is None else tok.doc.to(dev),
                       None if tok.keep is None else tok.keep.to(dev))
        for name in names:
            if budget.left() < 5:
                rows.append({"case": case, "backend": name, "skipped": "time budget"})
                continue
            row = {"case": case, "backend": name, "dtype": str(dtype).replace("torch.", ""), "H": h, "H_kv": hkv,
                   "S": s, "D": d, "sdpa": sdpa}
            ctx = contextlib.nullcontext() if name == "auto" else kernels.use(name)
            try:
                with ctx, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row["blocks"] = dict(Counter(
                        n for a, b_ in _halves(s) for c, d_ in _halves(s)
                        for _, n in block_kernels(qd[:, :, a:b_], kd[:, :, c:d_], vd[:, :, c:d_], tok_d.slice(a, b_),
                                                  tok_d.slice(c, d_), spec)))
                    out, lse, dq, dk, dv = _seqpar_split(qd, kd, vd, dd, tok_d, tok_d, spec, scale)
                    sync(dev)
                row["fallback_warnings"] = [str(w.message) for w in caught if "seqpar: kernel" in str(w.message)]
                out, lse, dq, dk, dv = (t.cpu() for t in (out, lse, dq, dk, dv))
                row["err_out"] = max_err(out, r_out, seen)
                row["err_lse"] = max_err(lse, r_lse, seen)
                row["err_dq"], row["err_dk"], row["err_dv"] = (max_err(g, r) for g, r in zip((dq, dk, dv), r_grads))
                row["nan"] = bool(any(torch.isnan(t).any() for t in (out, lse, dq, dk, dv)))
                dead = ~seen
                row["fully_masked_rows"] = int(dead.sum())
                row["fully_masked_rows_ok"] = bool((out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
                                                   and (dq[dead] == 0).all())
                floor = ERR_FLOOR[dtype]
                s_out_err, s_grad_err = (x if math.isfinite(x) else 0.0  # SDPA's NaN on empty rows: floor only
                                         for x in (sdpa.get("err_out", 0.0), sdpa.get("err_grads", 0.0)))
                lim_out = max(2 * s_out_err, floor)
                lim_grad = max(2 * s_grad_err, 4 * floor)
                row["ok"] = (not row["nan"] and row["fully_masked_rows_ok"] and row["err_out"] <= lim_out
                             and max(row["err_dq"], row["err_dk"], row["err_dv"]) <= lim_grad)
            except Exception as e:  # noqa: BLE001 - reported
                row.update(ok=False, error=err_info(e), where=traceback.format_exc().splitlines()[-3][:200])
            rows.append(row)
            log(f"  [1] {case:32s} {name:15s} ok={row.get('ok')} err_out={row.get('err_out', '-'):.3g} "
                f"sdpa={sdpa.get('err_out', float('nan')):.3g} blocks={row.get('blocks')} {row.get('error', '')}"
                if "err_out" in row else f"  [1] {case:32s} {name:15s} {row.get('error') or row.get('skipped')}")
    rows.extend(_causal_alignment(dev, names))
    return rows


def _causal_alignment(dev, names) -> list[dict]:
    """``is_causal`` with Sq != Sk must be top-left (query i sees keys j <= i) on every backend that accepts it."""
    rows = []
    gen = torch.Generator().manual_seed(99)
    dtype = torch.bfloat16
    q = torch.randn(1, 4, 24, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, 4, 40, 64, generator=gen).to(dtype) for _ in range(2))
    top_left = reference.sequence_mask(40, is_causal=True)[..., :24, :]
    r_out = reference.attention(q.double(), k.double(), v.double(), mask=top_left)[0]
    for name in names:
        if name == "auto":
            continue
        with kernels.use(name):
            ran = kernels.candidates(q.to(dev), k.to(dev), v.to(dev), "causal")[0].name
            row = {"case": "causal_top_left_sq24_sk40", "backend": name, "ran": ran}
            try:
                out, _ = kernels.attention_forward(q.to(dev), k.to(dev), v.to(dev), scale=0.125, is_causal=True)
                row["err_out"] = max_err(out.cpu(), r_out)
                row["ok"] = row["err_out"] <= ERR_FLOOR[dtype]
            except Exception as e:  # noqa: BLE001 - reported
                row.update(ok=False, error=err_info(e))
        rows.append(row)
        log(f"  [1] causal Sq=24 Sk=40 (top-left)  {name:15s} ran={ran} ok={row.get('ok')} "
            f"err={row.get('err_out', row.get('error'))}")
    return rows


# --- 2. strategies at W = 2, 3, 4 on one device over gloo -----------------------------------------------


def _strategy_rank(rank, world, port, dev_name, small, outdir):
    """One rank of the spawned job: every (W, strategy, causal) case on the subgroup of ranks 0..W-1."""
    import torch.distributed as dist

    import seqpar
    from seqpar.layout import positions

    torch.set_num_threads(1)
    dev = torch.device(dev_name)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    b, h, hkv, d = 1, 8, 2, (16 if small else 64)
    s = 48 if small else 2048
    results = []
    for w in (2, 3, 4):
        group = dist.new_group(list(range(w)))  # every rank takes part in creating it
        if rank >= w:
            continue
        for causal in (False, True):
            gen = torch.Generator().manual_seed(w * 10 + causal)
            q, k, v, g = (torch.randn(b, n, s, d, generator=gen).bfloat16() for n in (h, hkv, hkv, h))
            mask = reference.sequence_mask(s, is_causal=causal).to(dev)
            q64, k64, v64 = (t.to(dev).double().requires_grad_() for t in (q, k, v))
            r_out = reference.attention(q64, k64, v64, mask=mask)[0]
            r_grads = torch.autograd.grad(r_out, (q64, k64, v64), g.to(dev).double())
            r_out, r_grads = r_out.detach().cpu(), [t.cpu() for t in r_grads]
            qs, ks, vs = (t.to(dev).detach().requires_grad_() for t in (q, k, v))
            s_out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
            s_grads = torch.autograd.grad(s_out, (qs, ks, vs), g.to(dev))
            layout = "zigzag" if causal else "contiguous"
            idx = positions(s, w, rank, layout)
            sdpa_err = [max_err(s_out.cpu()[:, :, idx], r_out[:, :, idx])] + [
                max_err(x.cpu()[:, :, idx], r[:, :, idx]) for x, r in zip(s_grads, r_grads)]
            for strategy in STRATEGIES:
                row = {"W": w, "strategy": strategy, "causal": causal, "rank": rank, "S": s}
                try:
                    ql, kl, vl = (t[:, :, idx].to(dev).requires_grad_() for t in (q, k, v))
                    out = seqpar.attention(ql, kl, vl, group=group, is_causal=causal, layout=layout,
                                           strategy=strategy)
                    grads = torch.autograd.grad(out, (ql, kl, vl), g[:, :, idx].to(dev))
                    mine = [max_err(out.cpu(), r_out[:, :, idx])] + [
                        max_err(x.cpu(), r[:, :, idx]) for x, r in zip(grads, r_grads)]
                    row.update(err=mine, sdpa_err=sdpa_err)
                except Exception as e:  # noqa: BLE001 - reported
                    row["error"] = err_info(e)
                results.append(row)
                with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:  # kept if a later case hangs
                    json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def section_strategies(dev, small, budget) -> dict:
    import torch.multiprocessing as mp

    from seqpar.distributed import free_port

    world = 4
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_strategy_rank, args=(world, free_port(), str(dev), small, outdir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + max(10.0, min(budget.left() - 5, 150.0))
        problem = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    problem = "timed out (ranks killed); the cases finished before are below"
                    break
        except Exception as e:  # noqa: BLE001 - a rank died
            problem = err_info(e)
        per_rank = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    per_rank += json.load(f)
    cases = {}
    for row in per_rank:
        key = (row["W"], row["strategy"], row["causal"])
        c = cases.setdefault(key, {"W": row["W"], "strategy": row["strategy"], "causal": row["causal"],
                                   "S": row["S"], "errors": []})
        if "error" in row:
            c["errors"].append(f"rank {row['rank']}: {row['error']}")
            continue
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            c[f"err_{name}"] = max(c.get(f"err_{name}", 0.0), row["err"][i])
            c[f"sdpa_err_{name}"] = max(c.get(f"sdpa_err_{name}", 0.0), row["sdpa_err"][i])
    rows = []
    for c in cases.values():
        if not c["errors"]:
            c["ratio_out"] = c["err_out"] / max(c["sdpa_err_out"], 1e-30)
            c["ratio_grads"] = max(c[f"err_{n}"] / max(c[f"sdpa_err_{n}"], 1e-30) for n in ("dq", "dk", "dv"))
            c["ok"] = c["ratio_out"] <= TARGETS["bf16_err_ratio_w4_max"] and c["ratio_grads"] <= 2.0
        else:
            c["ok"] = False
        rows.append(c)
        log(f"  [2] W={c['W']} {c['strategy']:9s} causal={c['causal']!s:5s} ok={c['ok']} "
            f"err/sdpa out={c.get('ratio_out', float('nan')):.2f} grads={c.get('ratio_grads', float('nan')):.2f} "
            f"{'; '.join(c['errors'])[:200]}")
    res = {"rows": rows, "device": str(dev), "transport": "gloo"}
    if problem:
        res["error"] = problem
    return res


# --- 3. throughput of the local path vs SDPA ---------------------------------------------------------------


def _flops(b, h, s, d, causal, phase):
    f = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if phase == "fwd+bwd" else 1.0)


def _sdpa_backends(dev):
    from torch.nn.attention import SDPBackend

    if dev.type != "cuda":
        return {"default": None}
    return {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def section_throughput(dev, small, budget) -> dict:
    from torch.nn.attention import sdpa_kernel

    b, h, d = 1, (4 if small else 16), (32 if small else 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    sizes = (256, 512) if small else (8192, 32768)
    fused = [n for n in _backends_for(dev) if n != "blockwise"]
    rows = []
    for s in sizes:
        gen = torch.Generator().manual_seed(s)
        q, k, v, dout = (torch.randn(b, h, s, d, generator=gen).to(dtype).to(dev) for _ in range(4))
        pos = Tokens(torch.arange(s, device=dev))
        for causal in (False, True):
            spec = MaskSpec(is_causal=causal)
            scale = d ** -0.5
            for phase in ("fwd", "fwd+bwd"):
                if budget.left() < 20:
                    rows.append({"S": s, "causal": causal, "phase": phase, "skipped": "time budget"})
                    continue
                fl = _flops(b, h, s, d, causal, phase)
                row = {"S": s, "causal": causal, "phase": phase, "dtype": str(dtype).replace("torch.", ""),
                       "B": b, "H": h, "D": d, "sdpa": {}, "seqpar": {}}
                for name, backend in _sdpa_backends(dev).items():
                    qs, ks, vs = (t.detach().requires_grad_(phase == "fwd+bwd") for t in (q, k, v))

                    def run_sdpa(qs=qs, ks=ks, vs=vs):
                        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                        if phase == "fwd+bwd":
                            torch.autograd.grad(o, (qs, ks, vs), dout)

                    try:
                        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                            t = timed(run_sdpa, dev)
                        row["sdpa"][name] = {"ms": t * 1e3, "tflops": fl / t / 1e12}
                    except Exception as e:  # noqa: BLE001 - reported
                        row["sdpa"][name] = {"error": err_info(e)}

                def run_seqpar():
                    out, lse = tiled_forward(q, k, v, pos, pos, spec, scale)
                    if phase == "fwd+bwd":
                        grads = tiled_backward(dout, q, k, v, out.to(q.dtype), lse, pos, pos, spec, scale)
                        [g.to(q.dtype) for g in grads]

                for name in ["auto", *fused]:
                    ctx = contextlib.nullcontext() if name == "auto" else kernels.use(name)
                    try:
                        with ctx, warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            ran = kernels.kernel_name(q) if name == "auto" else name
                            t = timed(run_seqpar, dev)
                        row["seqpar"][name] = {"ms": t * 1e3, "tflops": fl / t / 1e12, "kernel": ran,
                                               "fallbacks": [str(w.message) for w in caught
                                                             if "seqpar: kernel" in str(w.message)]}
                    except Exception as e:  # noqa: BLE001 - reported
                        row["seqpar"][name] = {"error": err_info(e)}
                best = max((x["tflops"], n) for n, x in row["sdpa"].items() if "tflops" in x) if any(
                    "tflops" in x for x in row["sdpa"].values()) else (None, None)
                row["sdpa_best"] = best[1]
                auto = row["seqpar"].get("auto", {})
                if best[0] and "tflops" in auto:
                    row["ratio_vs_best_sdpa"] = auto["tflops"] / best[0]
                    row["meets_target"] = row["ratio_vs_best_sdpa"] >= TARGETS["local_vs_best_sdpa_min"]
                anchor = ANCHORS_H100.get(s)
                if anchor:
                    c = "_causal" if causal else ""
                    row["h100_anchor_tflops"] = (
                        {n: anchor[f"sdpa_{n}{c}_fwd_tflops"] for n in ("cudnn", "flash", "eff")} if phase == "fwd"
                        else {n: anchor[f"{n}{c}_fwdbwd_tflops"] for n in ("cudnn", "flash", "eff")})
                rows.append(row)
                log(f"  [3] S={s:6d} causal={causal!s:5s} {phase:7s} seqpar(auto={auto.get('kernel')}) "
                    f"{auto.get('tflops', float('nan')):.4g} TF/s, SDPA best ({best[1]}) "
                    f"{best[0] or float('nan'):.4g} TF/s, ratio {row.get('ratio_vs_best_sdpa', float('nan')):.3f}"
                    f"{'  H100 anchor ' + json.dumps(row['h100_anchor_tflops']) if anchor else ''}")
    return {"rows": rows}


# --- 4. P = 8 key shards merged vs one SDPA call --------------------------------------------------------


def _merge_fn(out, lse, out_b, lse_b):
    """The math of ``seqpar.ops.lse.merge_into`` as one out-of-place function (what torch.compile would fuse)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    wa, wb = torch.exp(lse - safe), torch.exp(lse_b - safe)
    z = wa + wb
    z = torch.where(z > 0, z, torch.ones_like(z))
    return out * (wa / z).unsqueeze(-1) + out_b.float() * (wb / z).unsqueeze(-1), new


def section_shards(dev, small, budget) -> dict:
    b, h, d, p = 1, (4 if small else 16), (32 if small else 128), 8
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    s = 512 if small else 32768
    if budget.left() < 15:
        return {"skipped": "time budget"}
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype).to(dev) for _ in range(3))
    scale = d ** -0.5
    qt = Tokens(torch.arange(s, device=dev))
    n = s // p
    shards = [(k[:, :, i * n:(i + 1) * n], v[:, :, i * n:(i + 1) * n], Tokens(torch.arange(i * n, (i + 1) * n,
                                                                                            device=dev)))
              for i in range(p)]
    spec = MaskSpec()

    def loop():
        acc = None
        for ks, vs, kt in shards:
            acc = tiled_forward(q, ks, vs, qt, kt, spec, scale, acc)
        return acc

    def kernels_only():
        return [kernels.attention_forward(q, ks, vs, scale=scale) for ks, vs, _ in shards]

    parts = kernels_only()
    acc0 = (torch.zeros(*q.shape[:-1], d, dtype=torch.float32, device=dev),
            torch.full(q.shape[:-1], NEG_INF, dtype=torch.float32, device=dev))

    def merges_only():
        out, lse = acc0[0].clone(), acc0[1].clone()
        for o, l in parts[1:]:
            merge_into(out, lse, o, l)

    def merges_compiled(fn):
        def run():
            out, lse = acc0
            for o, l in parts[1:]:
                out, lse = fn(out, lse, o, l)
        return run

    res = {"S_q": s, "S_k": s, "P": p, "S_local_keys": n, "dtype": str(dtype).replace("torch.", ""), "B": b, "H": h,
           "D": d, "kernel": kernels.kernel_name(q)}
    try:
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v), dev)
        t_loop = timed(loop, dev)
        t_kern = timed(kernels_only, dev)
        t_merge = timed(merges_only, dev)
        out, lse = loop()
        ref = F.scaled_dot_product_attention(q, k, v).float()
        res.update(sdpa_ms=t_sdpa * 1e3, loop_ms=t_loop * 1e3, kernels_ms=t_kern * 1e3, merges_ms=t_merge * 1e3,
                   ratio_loop_vs_sdpa=t_loop / t_sdpa, merge_share=t_merge / t_loop,
                   merge_and_bookkeeping_share=max(0.0, (t_loop - t_kern) / t_loop),
                   max_abs_diff_vs_sdpa=max_err(out, ref))
        res["meets_target"] = res["merge_and_bookkeeping_share"] <= TARGETS["merge_and_bookkeeping_share_max"]
        if dev.type == "cuda" and budget.left() > 60:  # measure before choosing a fused merge
            try:
                fn = torch.compile(_merge_fn, dynamic=False)
                res["merges_compiled_ms"] = timed(merges_compiled(fn), dev) * 1e3
                res["merges_eager_functional_ms"] = timed(merges_compiled(_merge_fn), dev) * 1e3
            except Exception as e:  # noqa: BLE001 - reported
                res["merges_compiled_error"] = err_info(e)
        if s in ANCHORS_H100:
            a = ANCHORS_H100[s]
            res["h100_anchor"] = {k_: a[k_] for k_ in ("flash_lse_P8_ms", "cudnn_lse_P8_ms", "merge_P8_ms",
                                                       "sdpa_cudnn_ms")}
    except Exception as e:  # noqa: BLE001 - reported
        res["error"] = err_info(e)
    nan = float("nan")
    compiled = f", compiled merges {res['merges_compiled_ms']:.3g} ms" if "merges_compiled_ms" in res else ""
    log(f"  [4] P={p} S={s}: loop {res.get('loop_ms', nan):.4g} ms vs SDPA {res.get('sdpa_ms', nan):.4g} ms"
        f" (ratio {res.get('ratio_loop_vs_sdpa', nan):.3f}), merges {res.get('merge_share', nan):.1%}"
        f", merges+bookkeeping {res.get('merge_and_bookkeeping_share', nan):.1%}{compiled} {res.get('error', '')}")
    return res


# --- driver ---------------------------------------------------------------------------------------------------


def summarize(result: dict) -> dict:
    sec = result["sections"]
    out = {"targets": TARGETS}
    if isinstance(sec.get("backends"), list):
        rows = [r for r in sec["backends"] if "skipped" not in r]
        out["backends_all_ok"] = all(r.get("ok") for r in rows)
        out["backends_failed"] = [f"{r['case']}/{r['backend']}" for r in rows if not r.get("ok")]
        out["fallback_warnings"] = sorted({w for r in rows for w in r.get("fallback_warnings", [])})
    st = sec.get("strategies")
    if isinstance(st, dict) and "rows" in st:
        out["strategies_all_ok"] = (all(r["ok"] for r in st["rows"]) and "error" not in st
                                    and len(st["rows"]) == 2 * 3 * len(STRATEGIES))  # causal x W x strategy
        w4 = [r for r in st["rows"] if r["W"] == 4 and "ratio_out" in r]
        out["bf16_err_ratio_w4_max"] = max((r["ratio_out"] for r in w4), default=None)
    elif isinstance(st, dict):
        out["strategies_error"] = st.get("error")
    tp = sec.get("throughput")
    if isinstance(tp, dict):
        ratios = [r["ratio_vs_best_sdpa"] for r in tp["rows"] if "ratio_vs_best_sdpa" in r]
        out["local_vs_best_sdpa_min"] = min(ratios, default=None)
        out["local_vs_best_sdpa"] = {f"S={r['S']} causal={r['causal']} {r['phase']}": round(r["ratio_vs_best_sdpa"], 3)
                                     for r in tp["rows"] if "ratio_vs_best_sdpa" in r}
    sh = sec.get("shards")
    if isinstance(sh, dict) and "merge_and_bookkeeping_share" in sh:
        out["shards_merge_and_bookkeeping_share"] = sh["merge_and_bookkeeping_share"]
        out["shards_ratio_vs_sdpa"] = sh["ratio_loop_vs_sdpa"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--small", action="store_true", help="small sizes (automatic without CUDA)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--sections", default="1,2,3,4")
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget; later sections are skipped")
    a = ap.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = a.small or dev.type != "cuda"
    if dev.type == "cpu":  # small CPU smoke run: one thread (tiny ops stall waiting for busy cores otherwise)
        torch.set_num_threads(1)
    global TIMING
    if small:
        TIMING = {"min_time": 0.05, "max_iter": 5, "min_iter": 2}
    budget = Budget(a.budget_s)
    t0 = time.monotonic()
    result = {
        "meta": {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
                 "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "capability": list(torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else None,
                 "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "small": small,
                 "kernels": kernels.describe(), "tile": masks.TILE},
        "sections": {},
    }
    log(f"gpu_check: torch {torch.__version__}, {result['meta']['device_name']}, small={small}")
    steps = {"1": ("backends", section_backends), "2": ("strategies", section_strategies),
             "3": ("throughput", section_throughput), "4": ("shards", section_shards)}
    for key in a.sections.split(","):
        name, fn = steps[key.strip()]
        log(f"[{key}] {name} ({budget.left():.0f} s left)")
        t = time.monotonic()
        try:
            result["sections"][name] = fn(dev, small, budget)
        except Exception as e:  # noqa: BLE001 - reported, the other sections still run
            result["sections"][name] = {"error": err_info(e), "where": traceback.format_exc()[-800:]}
            log(f"  {name} failed: {err_info(e)}")
        result.setdefault("section_seconds", {})[name] = round(time.monotonic() - t, 2)
    result["summary"] = summarize(result)
    result["seconds"] = round(time.monotonic() - t0, 2)
    log("summary: " + json.dumps(result["summary"], default=str))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
