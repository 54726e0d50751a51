"""``seqpar bench``: each strategy at world size W over gloo on CPU, against single-process SDPA on the same
cores and against ring-attention-pytorch (a PyPI peer, the ``bench`` extra) where it is installed.

    seqpar bench                                   # S = 4096 8192, causal and not, W = 2
    seqpar bench --seq-lens 16384 --repeats 3 --out bench-out
    seqpar bench --seq-lens 2048 --no-peer

Every rank runs 1 thread; the single-process baseline runs W threads (the same cores). Causal runs use
the zigzag layout (balanced work), non-causal the contiguous one. Reported per configuration: the
median wall time of fwd and fwd+bwd (:func:`seqpar_tools.timing.timed`: the slowest rank's time per
repeat), the ratio to the baseline measured in the same run (:func:`seqpar_tools.references.sdpa_reference`),
bytes sent per rank against the strategy's analytic volume (:func:`seqpar.plan.bytes_sent`), and the peak
resident memory per rank above its level before the measurement (:mod:`seqpar_tools.memory`), and from it the
longest sequence that fits ``--memory-budget-mib`` per rank (``s_fit``: with one S, ``S * budget / peak``; with
two or more, from the line ``a + b S`` through this implementation's two largest -- single-process SDPA has a
fixed part that a proportional figure would spread over S). Results go to
``<out>/bench.json`` and ``bench.png``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from pathlib import Path

from seqpar_tools.config import ConfigError
from seqpar_tools.names import DTYPES, STRATEGIES


def _inputs(b, h, hkv, s, d, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=g).to(dtype) for n in (h, hkv, hkv))
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return q, k, v, go


def _grid(ctx, args: argparse.Namespace) -> list[dict]:
    """Runs on every rank (started by :func:`seqpar_tools.runner.spawn`); rank 0 returns the rows."""
    import torch

    import seqpar
    from seqpar.comm import get_communicator

    comm = get_communicator(ctx.group)
    dtype = getattr(torch, args.dtype)
    rows = []
    for s in args.seq_lens:
        for causal in args.causal:
            layout = "zigzag" if causal else "contiguous"
            ql, kl, vl, go = (seqpar.shard(t, layout=layout)
                              for t in _inputs(args.batch, args.heads, args.kv_heads, s, args.head_dim, dtype))
            for name in args.strategies:
                kw = {"is_causal": causal, "layout": layout, "strategy": name}
                rows.append(_measure(name, (ql, kl, vl), go, kw, comm=comm, args=args, s=s))
                ctx.log(f"S={s} causal={causal} {name}: fwd {rows[-1]['fwd_s']:.3f} s, "
                        f"fwd+bwd {rows[-1]['fwd_bwd_s']:.3f} s")
            if args.peer:
                row = _measure_peer(ql, kl, vl, go, causal, layout, comm, args, s)
                if row:
                    rows.append(row)
                    ctx.log(f"S={s} causal={causal} {row['impl']}: fwd {row['fwd_s']:.3f} s, "
                            f"fwd+bwd {row['fwd_bwd_s']:.3f} s")
    return rows


def _peak_over_ranks(comm, mem) -> int:
    import torch

    peak = torch.tensor([float(mem.peak() - mem.base)], dtype=torch.float64)
    comm.all_reduce(peak, "max")
    return int(peak)


def _measure(name, xs, go, kw, *, comm, args, s):
    import torch

    import seqpar
    from seqpar.plan import bytes_sent
    from seqpar.strategies.ulysses_ring import inner_size
    from seqpar_tools.memory import PeakMemory
    from seqpar_tools.timing import timed

    def fwd():
        with torch.no_grad():
            seqpar.attention(*xs, **kw)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in xs]
        seqpar.attention(*leaves, **kw).backward(go)

    dev = xs[0].device
    t_f, fwd_bytes, _ = timed(fwd, comm, dev, 1, args.repeats)
    mem = PeakMemory(dev)
    t_fb, fb_bytes, _ = timed(fwd_bwd, comm, dev, 1, args.repeats, mem=mem)
    ana = bytes_sent(name, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq_len=s,
                     head_dim=args.head_dim, world_size=comm.world_size, element_size=xs[0].element_size(),
                     layout=kw["layout"], inner=inner_size(comm.world_size) if name == "ulysses_ring" else None)
    return {
        "impl": f"seqpar:{name}", "strategy": name, "seq_len": s, "causal": kw["is_causal"], "layout": kw["layout"],
        "world_size": comm.world_size, "fwd_s": t_f, "fwd_bwd_s": t_fb,
        "bytes_per_rank_fwd": fwd_bytes, "bytes_per_rank_fwd_bwd": fb_bytes,
        "analytic_bytes_fwd": ana["fwd"], "analytic_bytes_fwd_bwd": ana["fwd_bwd"],
        "peak_mem_added_bytes": _peak_over_ranks(comm, mem),
    }


def _measure_peer(ql, kl, vl, go, causal, layout, comm, args, s):
    """ring-attention-pytorch's ring_flash_attn on the same shards ((B, S, H, D) layout, contiguous)."""
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError:
        return None
    import importlib.metadata as md

    import torch

    import seqpar
    from seqpar_tools.memory import PeakMemory
    from seqpar_tools.timing import timed

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

    def fwd_bwd():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        ring_flash_attn(*leaves, causal=causal, bucket_size=1024).backward(g_)

    t_f, _, _ = timed(fwd, comm, q.device, 1, args.repeats)
    mem = PeakMemory(q.device)
    t_fb, _, _ = timed(fwd_bwd, comm, q.device, 1, args.repeats, mem=mem)
    return {"impl": f"ring-attention-pytorch {md.version('ring-attention-pytorch')}", "strategy": "peer",
            "seq_len": s, "causal": causal, "layout": "contiguous", "world_size": comm.world_size, "fwd_s": t_f,
            "fwd_bwd_s": t_fb, "peak_mem_added_bytes": _peak_over_ranks(comm, mem)}


def _baseline(args) -> list[dict]:
    """Single-process SDPA on the full sequence with W threads (the same cores)."""
    import torch

    from seqpar_tools.references import sdpa_reference

    torch.set_num_threads(args.world_size)
    rows = []
    for s in args.seq_lens:
        for causal in args.causal:
            xs = _inputs(args.batch, args.heads, args.kv_heads, s, args.head_dim, getattr(torch, args.dtype))
            _, stats = sdpa_reference(*xs, is_causal=causal, warmup=1, repeats=args.repeats)
            rows.append({"impl": "sdpa (1 process)", "strategy": "single", "seq_len": s, "causal": causal,
                         "layout": "-", "world_size": 1, **stats})
    return rows


def run(args: argparse.Namespace) -> dict:
    from seqpar_tools.info import versions
    from seqpar_tools.runner import spawn

    def show(rank: int, kind: str, payload) -> None:
        if kind == "log":
            print(payload, flush=True)

    rows = spawn(_grid, (args,), world_size=args.world_size, threads=1, timeout_s=args.timeout, on_event=show)
    base = {(r["seq_len"], r["causal"]): r for r in _baseline(args)}
    peers = {(r["seq_len"], r["causal"]): r for r in rows if r["strategy"] == "peer"}
    for r in rows:
        key = (r["seq_len"], r["causal"])
        for t in ("fwd", "fwd_bwd"):
            r[f"{t}_ratio"] = r[f"{t}_s"] / base[key][f"{t}_s"]
            if key in peers and r["strategy"] != "peer":
                r[f"{t}_vs_peer"] = r[f"{t}_s"] / peers[key][f"{t}_s"]
    rows = list(base.values()) + rows
    budget = args.memory_budget_mib * 2**20
    for r in rows:
        if r.get("peak_mem_added_bytes"):
            r["s_fit"] = int(r["seq_len"] * budget / r["peak_mem_added_bytes"])
            # two sequence lengths of the same implementation: fit peak = a + b S (a fixed part, e.g. a kernel's
            # per-thread buffers, that the proportional figure would spread over S)
            same = [x for x in rows if x["impl"] == r["impl"] and x.get("causal") == r.get("causal")
                    and x.get("peak_mem_added_bytes") and x["seq_len"] != r["seq_len"]]
            if same:
                lo, hi = sorted([r, max(same, key=lambda x: x["seq_len"])], key=lambda x: x["seq_len"])
                b = (hi["peak_mem_added_bytes"] - lo["peak_mem_added_bytes"]) / (hi["seq_len"] - lo["seq_len"])
                if b > 0:
                    r["s_fit"] = int((budget - (hi["peak_mem_added_bytes"] - b * hi["seq_len"])) / b)
                    r["mem_bytes_per_token"] = b
    return {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), **versions(),
                 "machine": platform.machine(), "cpus": os.cpu_count(),
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
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-budget-mib", type=float, default=1024.0,
                   help="per-rank memory budget for the longest-S-that-fits column (s_fit)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip ring-attention-pytorch")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a silent rank fails the run")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    args.causal = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    args.kv_heads = args.kv_heads or args.heads
    return args


def validate(args: argparse.Namespace) -> None:
    problems = []
    for flag, val in (("--world-size", args.world_size), ("--batch", args.batch), ("--heads", args.heads),
                      ("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim), ("--repeats", args.repeats),
                      *(("--seq-lens", s) for s in args.seq_lens)):
        if val < 1:
            problems.append(f"{flag} {val}: must be >= 1")
    if args.heads >= 1 and args.kv_heads >= 1 and args.heads % args.kv_heads:
        problems.append(f"--heads {args.heads}: must be a multiple of --kv-heads {args.kv_heads}")
    if not (math.isfinite(args.memory_budget_mib) and args.memory_budget_mib > 0):
        problems.append(f"--memory-budget-mib {args.memory_budget_mib}: must be a finite number > 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        problems.append(f"--timeout {args.timeout}: must be a finite number of seconds > 0")
    if not problems and min(args.seq_lens) < args.world_size:
        problems.append(f"--seq-lens {min(args.seq_lens)}: must be >= --world-size {args.world_size}")
    if problems:
        raise ConfigError("command line: " + "\ncommand line: ".join(problems))
    from seqpar_tools.run import check_writable

    check_writable(args.out, "--out")


def main(argv: list[str] | None = None) -> int:
    from seqpar_tools.runner import RankError

    args = parse_args(argv)
    try:
        validate(args)
        result = run(args)
    except ConfigError as e:
        print("\n".join(f"seqpar bench: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    except RankError as e:
        print(f"seqpar bench: {e}", file=sys.stderr)
        return 1
    from seqpar_tools.report import write_report

    rows = sorted(result["rows"], key=lambda r: (r["seq_len"], r["causal"], r["world_size"] > 1, r["impl"]))
    paths = write_report(rows, args.out, title="seqpar bench", meta=result["meta"], stem="bench")
    for r in rows:
        if "s_fit" in r:
            mib = r["peak_mem_added_bytes"] / 2**20
            print(f"S={r['seq_len']} causal={r['causal']} {r['impl']}: peak +{mib:.0f} MiB/rank -> longest S in "
                  f"{args.memory_budget_mib:g} MiB/rank: {r['s_fit']:,}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    _print_plans(args)
    return 0


def _print_plans(args: argparse.Namespace) -> None:
    """What ``auto`` would pick for these heads at 128k tokens on 8 GPUs x 1 node and 8 x 4 nodes (seqpar.plan's
    link model with its default link speeds, bfloat16)."""
    import seqpar

    for nodes in (1, 4):
        p = seqpar.plan(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq_len=131072,
                        head_dim=args.head_dim, world_size=8 * nodes, ranks_per_node=8)
        print(f"\nseqpar.plan: H={args.heads} H_kv={args.kv_heads} D={args.head_dim} S=131072, 8 GPUs x {nodes} "
              f"node(s), bfloat16\n{p.table()}")


if __name__ == "__main__":
    raise SystemExit(main())
