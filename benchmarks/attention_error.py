"""Measure seqpar.attention's error per dtype vs the float64 reference, W = 1..4, each strategy.

Forward (out) and backward (dq, dk, dv with a random upstream gradient), max abs error over every
element, against seqpar.ops.reference.attention in float64 on the very (rounded) inputs; and the
same for single-device torch SDPA (forward + autograd backward in the tested dtype).

Run (from the repo root, ~2 min on 2 cores):
    python benchmarks/attention_error.py            # B=1 H=8 S=512 D=64, causal zigzag + full contiguous
    SEQPAR_KERNEL=blockwise python benchmarks/attention_error.py   # the fallback kernel
    python benchmarks/attention_error.py --amp 5 --dtypes float32 --world-sizes 1,4   # logits ~ 25
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # test_attention
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRATEGIES = ("allreduce", "ring", "allgather")


def inputs(b, h, hkv, s, d, dtype, seed, amp=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(b, h, s, d, generator=gen)).to(dtype)
    k = (amp * torch.randn(b, hkv, s, d, generator=gen)).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    g = torch.randn(b, h, s, d, generator=gen).to(dtype)
    return q, k, v, g


def reference(q, k, v, g, is_causal):
    from seqpar.ops import reference as ref

    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = ref.attention(q, k, v, mask=ref.sequence_mask(q.shape[2], is_causal=is_causal))[0]
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), g.double()))


def worker(rank, world_size, args):
    from test_attention import expected_positions

    import seqpar

    res = {}
    for dname in args["dtypes"]:
        dtype = DTYPES[dname]
        q, k, v, g = inputs(args["b"], args["h"], args["hkv"], args["s"], args["d"], dtype, args["seed"], args["amp"])
        for is_causal in (True, False):
            ref = reference(q, k, v, g, is_causal)
            layout = "zigzag" if is_causal else "contiguous"
            idx = expected_positions(args["s"], world_size, rank, layout)
            for strategy in STRATEGIES:
                ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
                out = seqpar.attention(ql, kl, vl, is_causal=is_causal, layout=layout, strategy=strategy)
                out.backward(g[:, :, idx])
                got = (out, ql.grad, kl.grad, vl.grad)
                res[(dname, is_causal, strategy)] = [
                    float((x.detach().double() - r[:, :, idx]).abs().max()) for x, r in zip(got, ref)
                ]
            if rank == 0 and world_size == 1:  # single-device SDPA on the same inputs
                qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
                o = torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=is_causal, enable_gqa=args["h"] != args["hkv"]
                )
                o.backward(g)
                res[(dname, is_causal, "sdpa")] = [
                    float((x.detach().double() - r).abs().max()) for x, r in zip((o, qs.grad, ks.grad, vs.grad), ref)
                ]
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--s", type=int, default=512)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", type=float, default=1.0, help="scale q and k by this: logits ~ amp**2")
    p.add_argument("--world-sizes", default="1,2,3,4")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    a = p.parse_args()
    args = dict(b=a.b, h=a.h, hkv=a.hkv, s=a.s, d=a.d, seed=a.seed, amp=a.amp, dtypes=a.dtypes.split(","))
    from seqpar_tools.runner import Pool

    table = {}
    for w in map(int, a.world_sizes.split(",")):
        pool = Pool(w, timeout_s=1200)
        try:
            per_rank = pool.run(worker, args, timeout=1200)
        finally:
            pool.close()
        for key in per_rank[0]:
            table[(key[0], key[1], key[2], w)] = [max(r[key][i] for r in per_rank if key in r) for i in range(4)]
    kernel = os.environ.get("SEQPAR_KERNEL", "default (cpu_flash on CPU)")
    print(f"B={a.b} H={a.h} H_kv={a.hkv} S={a.s} D={a.d} seed={a.seed} amp={a.amp} kernel={kernel}; max |x - ref64|")
    print("| dtype | mask | W | strategy | out | dq | dk | dv |\n|---|---|---|---|---|---|---|---|")
    for (dname, is_causal, strategy, w), errs in sorted(
        table.items(), key=lambda kv: (a.dtypes.split(",").index(kv[0][0]), not kv[0][1], kv[0][2] != "sdpa", kv[0][3],
                                       kv[0][2])
    ):
        mask = "causal zigzag" if is_causal else "full contiguous"
        wcol = "1 (single device)" if strategy == "sdpa" else str(w)
        print(f"| {dname} | {mask} | {wcol} | {strategy} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
