"""Benchmark: each strategy at world size W over gloo on CPU, against single-process SDPA on the same
cores and against ring-attention-pytorch (a PyPI peer) where it is installed.

    python -m seqpar_tools.bench                                  # S = 4096 8192, causal and not, W = 2
    python -m seqpar_tools.bench --seq-lens 16384 --repeats 3 --out bench-out
    seqpar bench --seq-lens 2048 --no-peer                  # same, through the CLI

Every rank runs 1 thread; the single-process baseline runs W threads (the same cores). Causal runs use
the zigzag layout (balanced work), non-causal the contiguous one. Reported per configuration: the
median wall time of fwd and fwd+bwd (the slowest rank's time per repeat), the ratio to the baseline
measured in the same run, bytes sent per rank against the strategy's analytic volume, and the peak
resident memory per rank above its level before the measurement (:mod:`seqpar_tools.memory`). Results go to
``<out>/bench.json`` and ``bench.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from seqpar_tools.memory import PeakMemory
from seqpar.plan import STRATEGIES

# --- measurements -------------------------------------------------------------------------------


def _median_time(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        times.append(sync(time.perf_counter() - t0) if sync else time.perf_counter() - t0)
    return statistics.median(times)


def analytic_bytes(strategy: str, *, b: int, h: int, hkv: int, s: int, d: int, w: int, e: int) -> dict[str, int]:
    """Bytes each rank must send for one call (fwd) and one fwd+bwd, as each algorithm is written."""
    sr = -(-s // w)
    q, kv, kv32 = b * h * sr * d * e, 2 * b * hkv * sr * d * e, 2 * b * hkv * sr * d * 4
    f = (w - 1) / w
    if strategy in ("ring", "allgather"):
        fwd = (w - 1) * kv
        bwd = (w - 1) * kv + w * kv32 if strategy == "ring" else f * w * kv32
    elif strategy == "allreduce":
        fwd = (w - 1) * q + f * b * h * s * (d + 1) * 4 + 2 * f * b * h * s * 4
        bwd = (w - 1) * 3 * q + (w - 1) * b * h * sr * 4 + f * b * h * s * d * 4
    else:
        raise ValueError(f"strategy={strategy!r}; allowed: {STRATEGIES}")
    return {"fwd": int(fwd), "fwd_bwd": int(fwd + bwd)}


def _inputs(b, h, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g).to(dtype) for n in (h, hkv, hkv)]


def _grid(ctx, args: argparse.Namespace) -> list[dict]:
    """Runs on every rank (started by :func:`seqpar.distributed.spawn`); rank 0 returns the rows."""
    import seqpar
    from seqpar.comm import get_communicator

    comm = get_communicator(ctx.group)

    def sync(t: float | None = None):
        x = torch.tensor([t or 0.0], dtype=torch.float64)
        comm.all_reduce(x, "max")
        return float(x)

    dtype = getattr(torch, args.dtype)
    rows = []
    for s in args.seq_lens:
        for causal in args.causal:
            layout = "zigzag" if causal else "contiguous"
            q, k, v = _inputs(args.batch, args.heads, args.kv_heads, s, args.head_dim, dtype)
            ql, kl, vl = (seqpar.shard(t, layout=layout) for t in (q, k, v))
            go = seqpar.shard(torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype),
                              layout=layout)
            del q, k, v
            for name in args.strategies:
                kw = {"is_causal": causal, "layout": layout, "strategy": name}
                rows.append(_measure(name, (ql, kl, vl), go, kw, comm=comm, sync=sync, args=args, s=s))
                ctx.log(f"S={s} causal={causal} {name}: fwd {rows[-1]['fwd_s']:.3f} s, "
                        f"fwd+bwd {rows[-1]['fwd_bwd_s']:.3f} s")
            if args.peer:
                row = _measure_peer(ql, kl, vl, go, causal, layout, comm, sync, args, s)
                if row:
                    rows.append(row)
    return rows


def _measure(name, xs, go, layout_kw, *, comm, sync, args, s):
    import seqpar

    def fwd():
        with torch.no_grad():
            seqpar.attention(*xs, **layout_kw)

    leaves = [x.detach().requires_grad_() for x in xs]

    def fwd_bwd():
        out = seqpar.attention(*leaves, **layout_kw)
        out.backward(go)

    t_f = _median_time(fwd, args.repeats, sync)
    comm.reset_stats()
    fwd()
    fwd_bytes = comm.bytes_sent
    mem = PeakMemory(xs[0].device)
    mem.reset()
    t_fb = _median_time(fwd_bwd, args.repeats, sync)
    peak = mem.peak() - mem.base
    comm.reset_stats()
    fwd_bwd()
    fb_bytes = comm.bytes_sent
    peak_all = torch.tensor([float(peak)], dtype=torch.float64)
    comm.all_reduce(peak_all, "max")
    ana = analytic_bytes(name, b=args.batch, h=args.heads, hkv=args.kv_heads, s=s, d=args.head_dim,
                         w=comm.world_size, e=xs[0].element_size())
    return {
        "impl": f"seqpar:{name}", "strategy": name, "seq_len": s, "causal": layout_kw["is_causal"],
        "layout": layout_kw["layout"],
        "world_size": comm.world_size, "fwd_s": t_f, "fwd_bwd_s": t_fb,
        "bytes_per_rank_fwd": fwd_bytes, "bytes_per_rank_fwd_bwd": fb_bytes,
        "analytic_bytes_fwd": ana["fwd"], "analytic_bytes_fwd_bwd": ana["fwd_bwd"],
        "peak_mem_bytes": int(peak_all),
    }


def _measure_peer(ql, kl, vl, go, causal, layout, comm, sync, args, s):
    """ring-attention-pytorch's ring_flash_attn on the same shards ((B, S, H, D) layout, contiguous)."""
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError:
        return None
    import seqpar

    if layout != "contiguous":  # the peer takes contiguous shards; reshard the same global data
        full = [seqpar.unshard(x, layout=layout, seq_len=s) for x in (ql, kl, vl, go)]
        ql, kl, vl, go = (seqpar.shard(x, layout="contiguous") for x in full)
    if args.kv_heads != args.heads:
        g = args.heads // args.kv_heads
        kl, vl = kl.repeat_interleave(g, 1), vl.repeat_interleave(g, 1)
    q, k, v, g_ = (x.transpose(1, 2).contiguous() for x in (ql, kl, vl, go))  # (B, S_r, H, D)

    def fwd():
        with torch.no_grad():
            ring_flash_attn(q, k, v, causal=causal, bucket_size=1024)

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        ring_flash_attn(*leaves, causal=causal, bucket_size=1024).backward(g_)

    t_f = _median_time(fwd, args.repeats, sync)
    t_fb = _median_time(fwd_bwd, args.repeats, sync)
    return {"impl": "ring-attention-pytorch", "strategy": "peer", "seq_len": s, "causal": causal,
            "layout": "contiguous", "world_size": comm.world_size, "fwd_s": t_f, "fwd_bwd_s": t_fb}


def _baseline(args) -> list[dict]:
    """Single-process SDPA on the full sequence with W threads (the same cores)."""
    torch.set_num_threads(args.world_size)
    dtype = getattr(torch, args.dtype)
    rows = []
    for s in args.seq_lens:
        for causal in args.causal:
            q, k, v = _inputs(args.batch, args.heads, args.kv_heads, s, args.head_dim, dtype)
            go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            gqa = {"enable_gqa": True} if args.kv_heads != args.heads else {}

            def fwd():
                with torch.no_grad():
                    sdpa(q, k, v, is_causal=causal, **gqa)

            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def fwd_bwd():
                sdpa(*leaves, is_causal=causal, **gqa).backward(go)

            mem = PeakMemory(q.device)
            mem.reset()
            t_fb = _median_time(fwd_bwd, args.repeats)
            peak = mem.peak() - mem.base
            rows.append({"impl": "sdpa (1 process)", "strategy": "single", "seq_len": s, "causal": causal,
                         "layout": "-", "world_size": 1, "fwd_s": _median_time(fwd, args.repeats),
                         "fwd_bwd_s": t_fb, "peak_mem_bytes": peak})
    return rows


def run(args: argparse.Namespace) -> dict:
    from seqpar_tools.runner import spawn

    def show(rank: int, kind: str, payload) -> None:
        if kind == "log":
            print(payload, flush=True)

    rows = spawn(_grid, (args,), world_size=args.world_size, threads=1, timeout_s=args.timeout, on_event=show)
    base = {(r["seq_len"], r["causal"]): r for r in _baseline(args)}
    for r in rows:
        b = base[(r["seq_len"], r["causal"])]
        r["fwd_ratio"] = r["fwd_s"] / b["fwd_s"]
        r["fwd_bwd_ratio"] = r["fwd_bwd_s"] / b["fwd_bwd_s"]
    rows = list(base.values()) + rows
    return {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                 "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 **{k: v for k, v in vars(args).items() if k != "out"}, "out": str(args.out)},
        "rows": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="seqpar bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip ring-attention-pytorch")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a silent rank fails the run")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    args.causal = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    args.kv_heads = args.kv_heads or args.heads
    return args


def main(argv: list[str] | None = None) -> int:
    from seqpar_tools.report import write_report

    args = parse_args(argv)
    result = run(args)
    rows = sorted(result["rows"], key=lambda r: (r["seq_len"], r["causal"], r["world_size"] > 1, r["impl"]))
    paths = write_report(rows, args.out, title="seqpar bench", meta=result["meta"], stem="bench")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
