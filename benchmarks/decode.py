"""Decode-step latency and bytes per rank per step over a sharded KV cache (not a test).

    python benchmarks/decode.py                                   # contexts 4k .. 256k, JSON + plot
    python benchmarks/decode.py --contexts 4096,65536 --steps 10  # a quick run
    python benchmarks/decode.py --memory                          # longest context in 1 GiB/rank at W = 1, 2, 4

Shape: B = 1, H = 32 query heads, H_kv = 8, D = 128, float32, T = 1, one layer. Side by side in one
run, per context S:

- ``sdpa``: single process, ``torch.nn.functional.scaled_dot_product_attention(q, K, V,
  enable_gqa=True)`` over the whole cache, with as many threads as there are ranks (the same cores);
- ``sdpa_packed``: the same, with the ``G = H / H_kv`` query heads of each kv head passed as G query
  rows of that head (what seqpar's local step does; K/V read once per kv head instead of G times);
- ``seqpar``: W gloo ranks, one thread each, :func:`seqpar.decode_attention` over a
  :class:`seqpar.KVCache` (round-robin blocks of 16) that holds S tokens, appending one token per
  step; bytes from the communicator's counter (``bytes_sent``);
- ``tree_attn_decode``: ``ring_attention_pytorch.tree_attn_decode`` (PyPI ``ring-attention-pytorch``,
  the ``bench`` extra) on the same ranks with each rank's K/V shard *repeated* to H heads (it has no
  GQA: 4x the K/V memory), ``shard_kv_seq=False``, ``use_triton=False``; three all-reduces per call,
  bytes by their formula ``2(W-1)/W * B*H*(D+2)*4``. Skipped above ``--peer-max`` tokens (memory).

The caches are filled directly with random K/V (prefill is not what is measured). Latency: median
over ``--steps`` steps after 2 warm-up steps, taken in ``--rounds`` interleaved rounds (each
implementation runs a few steps in turn, so load changes on a shared machine hit all of them); for the
ranks, each step's slowest rank. Writes JSON
(``--out``) and a plot of latency vs context next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # dist_pool
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # seqpar from this checkout

import torch  # noqa: E402
from dist_pool import Pool  # noqa: E402

B, H, HKV, D = 1, 32, 8, 128


_STATE: dict = {}  # per process: the cache / K/V of the context being measured, kept across rounds


def _drop(rank=0, world_size=1):
    _STATE.clear()


def _seqpar_rank(rank, world_size, seq_len, steps, total_steps):
    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention

    if "seqpar" not in _STATE:
        cache = KVCache(num_layers=1, max_batch=1, max_seq_len=seq_len + total_steps + 8, kv_heads=HKV, head_dim=D,
                        dtype=torch.float32, block_size=16)
        (slot,) = cache.allocate(1)
        n = cache.local_count(slot, seq_len)
        gen = torch.Generator().manual_seed(100 + rank)
        cache.k[0, slot, :, :n].normal_(generator=gen)
        cache.v[0, slot, :, :n].normal_(generator=gen)
        cache.lengths[0][slot] = seq_len  # filled directly: the benchmark measures decode, not prefill
        _STATE["seqpar"] = (cache, slot, torch.Generator().manual_seed(0), 2)  # 2 warm-up steps
    cache, slot, g, warm = _STATE["seqpar"]
    times, nbytes = [], []
    for i in range(steps + warm):
        q = torch.randn(B, H, 1, D, generator=g)  # the same stream on every rank: replicated
        k1, v1 = torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g)
        b0 = cache.comm.bytes_sent
        t0 = time.perf_counter()
        decode_attention(cache, 0, q, k1, v1, slots=[slot])
        dt = time.perf_counter() - t0
        if i >= warm:
            times.append(dt)
            nbytes.append(cache.comm.bytes_sent - b0)
    _STATE["seqpar"] = (cache, slot, g, 0)
    return {"times": times, "bytes": max(nbytes), "local_tokens": cache.local_count(slot, seq_len),
            "cache_bytes": cache.nbytes(), "combine": cache.combine}


def _tree_rank(rank, world_size, seq_len, steps, total_steps):
    from ring_attention_pytorch import tree_attn_decode

    if "tree" not in _STATE:
        n = len(range(seq_len)[rank::world_size])  # any equal-ish split: the cost depends on the count only
        gen = torch.Generator().manual_seed(100 + rank)
        k = torch.randn(B, HKV, n, D, generator=gen).repeat_interleave(H // HKV, dim=1)  # no GQA: repeated
        v = torch.randn(B, HKV, n, D, generator=gen).repeat_interleave(H // HKV, dim=1)
        _STATE["tree"] = (k, v, torch.Generator().manual_seed(0), 2)
    k, v, g, warm = _STATE["tree"]
    times = []
    for i in range(steps + warm):
        q = torch.randn(B, H, 1, D, generator=g)
        t0 = time.perf_counter()
        tree_attn_decode(q, k, v, shard_kv_seq=False, use_triton=False)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    _STATE["tree"] = (k, v, g, 0)
    bytes_per_step = int(2 * (world_size - 1) / world_size * B * H * (D + 2) * 4)
    return {"times": times, "bytes": bytes_per_step}


def _sdpa(seq_len, steps, total_steps, threads, packed=False):
    torch.set_num_threads(threads)
    key = "sdpa_packed" if packed else "sdpa"
    if key not in _STATE:
        gen = torch.Generator().manual_seed(1)
        n = seq_len + total_steps + 4
        _STATE[key] = [torch.randn(B, HKV, n, D, generator=gen), torch.randn(B, HKV, n, D, generator=gen),
                       torch.Generator().manual_seed(0), 2, seq_len]
    k, v, g, warm, n0 = _STATE[key]
    times = []
    for i in range(steps + warm):
        q = torch.randn(B, H, 1, D, generator=g)
        n = n0 + i + 1
        k[:, :, n - 1] = torch.randn(B, HKV, D, generator=g)  # append the new token, then attend
        t0 = time.perf_counter()
        if packed:  # the G query heads of a kv head as G query rows: K/V read once per kv head
            torch.nn.functional.scaled_dot_product_attention(q.reshape(B, HKV, H // HKV, D), k[:, :, :n], v[:, :, :n])
        else:
            torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    _STATE[key][3:] = [0, n0 + steps + warm]
    return {"times": times, "bytes": 0}


def _merge(per_rank: list[dict]) -> dict:
    """Steps are in lock-step across ranks (a collective each): a step takes as long as its slowest rank."""
    return {**per_rank[0], "times": [max(ts) for ts in zip(*(r["times"] for r in per_rank))]}


def _fits(rank, world_size, budget):
    """Longest ``max_seq_len`` whose per-rank K/V storage fits ``budget`` bytes (meta tensors: nothing allocated)."""
    from seqpar.cache import KVCache

    def nbytes(n):
        return KVCache(num_layers=1, max_batch=1, max_seq_len=n, kv_heads=HKV, head_dim=D, device="meta").nbytes()

    lo, hi = 1, 1 << 26
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if nbytes(mid) <= budget else (lo, mid - 1)
    return lo, nbytes(lo)


def memory_table(budget: int = 1 << 30) -> list[dict]:
    rows = []
    for w in (1, 2, 4):
        pool = Pool(w)
        try:
            n, nb = pool.run(_fits, budget)[0]
        finally:
            pool.close()
        rows.append({"world_size": w, "context": n, "bytes_per_rank": nb})
        print(f"W={w}: longest context with <= {budget} bytes of K/V per rank: {n} tokens ({nb} bytes)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384,65536,131072,262144")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6, help="interleave the implementations in this many rounds")
    ap.add_argument("--peer-max", type=int, default=131072, help="largest context for tree_attn_decode (4x memory)")
    ap.add_argument("--out", default="bench-out/decode.json")
    ap.add_argument("--memory", action="store_true", help="only the per-rank memory table (W = 1, 2, 4; 1 GiB)")
    args = ap.parse_args()
    if args.memory:
        memory_table()
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    try:
        import ring_attention_pytorch  # noqa: F401

        peer = True
    except ImportError:
        print("ring-attention-pytorch not installed (pip install ring-attention-pytorch): peer skipped")
        peer = False
    w = args.world_size
    pool = Pool(w)
    rows = []
    try:
        for s in contexts:
            row: dict = {"context": s, "world_size": w}
            per_round = args.steps // args.rounds
            total = per_round * args.rounds + 2
            for _ in range(args.rounds):  # interleaved rounds: load changes on a shared machine hit every column
                for key, packed in (("sdpa", False), ("sdpa_packed", True)):
                    r = _sdpa(s, per_round, total, w, packed)
                    row.setdefault(key, {"times": [], "bytes": 0})["times"] += r["times"]
                r = _merge(pool.run(_seqpar_rank, s, per_round, total, timeout=1200))
                row.setdefault("seqpar", {**r, "times": []})["times"] += r["times"]
                if peer and s <= args.peer_max:
                    r = _merge(pool.run(_tree_rank, s, per_round, total, timeout=1200))
                    row.setdefault("tree_attn_decode", {**r, "times": []})["times"] += r["times"]
            pool.run(_drop)
            _drop()
            for key in ("sdpa", "sdpa_packed", "seqpar", "tree_attn_decode"):
                if key in row:
                    row[key]["median_s"] = statistics.median(row[key]["times"])
            rows.append(row)
            sp, sd = row["seqpar"], row["sdpa"]
            tree = row.get("tree_attn_decode")
            print(f"S={s:>7}  sdpa {sd['median_s'] * 1e3:8.3f} ms  sdpa packed "
                  f"{row['sdpa_packed']['median_s'] * 1e3:8.3f} ms   seqpar W={w} {sp['median_s'] * 1e3:8.3f} ms "
                  f"({sp['median_s'] / sd['median_s']:.2f}x, {sp['bytes']} B/rank/step, "
                  f"{sp['cache_bytes'] / 2**20:.0f} MiB cache/rank)   tree_attn_decode "
                  + (f"{tree['median_s'] * 1e3:8.3f} ms ({tree['bytes']} B)" if tree else "-"), flush=True)
    finally:
        pool.close()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": {"B": B, "H": H, "H_kv": HKV, "D": D, "dtype": "float32", "T": 1},
                   "threads_sdpa": w, "rows": rows}, f, indent=1)
    _plot(rows, os.path.splitext(args.out)[0] + ".png", w)
    print(f"wrote {args.out}")


def _plot(rows, path, w) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("sdpa", f"single-process SDPA ({w} threads)"),
                       ("sdpa_packed", f"single-process SDPA, GQA rows packed ({w} threads)"),
                       ("seqpar", f"seqpar W={w}"),
                       ("tree_attn_decode", f"tree_attn_decode W={w}")):
        pts = [(r["context"], r[key]["median_s"] * 1e3) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("B=1, H=32, H_kv=8, D=128, fp32, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
