"""bfloat16 accuracy of seqpar.attention compared with single-device SDPA, against float64.

Run: ``python -m pytest tests/test_accuracy.py -q``

Splitting the keys over ranks must not cost precision: at world size 4 the forward error of every
strategy (vs the float64 reference on the same bf16 inputs) stays within ``RATIO`` x the error of
``torch.nn.functional.scaled_dot_product_attention`` on the full bf16 inputs, in mean and in max
over a few seeds; and the error at W=4 stays within ``RATIO`` x the error at W=2.
Both local kernels are checked: ``cpu_flash`` (the default on CPU) and ``blockwise`` (the fallback
used on other devices; forced with ``seqpar.ops.kernels.use("blockwise")``).
"""

from __future__ import annotations

import pytest
import torch
from test_attention import expected_positions

from seqpar.strategies.registry import STRATEGIES  # every registered strategy

RATIO = 1.5
SEEDS = (0, 1, 2)
LENGTHS = (64, 250)
B, H, H_KV, D = 1, 8, 2, 64
KERNELS = ("cpu_flash", "blockwise")


def run_errors(rank, world_size):
    """Per (kernel, strategy, causal, S, seed): seqpar's |err| sum/count/max on this rank, and SDPA's."""
    import torch.nn.functional as F

    import seqpar
    from seqpar.ops import kernels, reference

    res = {}
    for seq_len in LENGTHS:
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(seed)
            q = torch.randn(B, H, seq_len, D, generator=gen).bfloat16()
            k = torch.randn(B, H_KV, seq_len, D, generator=gen).bfloat16()
            v = torch.randn(B, H_KV, seq_len, D, generator=gen).bfloat16()
            for is_causal in (False, True):
                ref = reference.attention(q, k, v, mask=reference.sequence_mask(seq_len, is_causal=is_causal))[0]
                sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
                es = (sdpa.double() - ref).abs()
                layout = "zigzag" if is_causal else "contiguous"
                idx = expected_positions(seq_len, world_size, rank, layout)
                for kernel in KERNELS:
                    for strategy in STRATEGIES:
                        with kernels.use(kernel):
                            out = seqpar.attention(q[:, :, idx], k[:, :, idx], v[:, :, idx],
                                                   is_causal=is_causal, layout=layout, strategy=strategy)
                        assert out.dtype == torch.bfloat16
                        e = (out.double() - ref[:, :, idx]).abs()
                        res[(kernel, strategy, is_causal, seq_len, seed)] = (
                            float(e.sum()), e.numel(), float(e.max()), float(es.mean()), float(es.max()),
                        )
    return res


def summarize(per_rank: list[dict]) -> dict:
    """(kernel, strategy, causal, S) -> (mean err, max err, SDPA mean err, SDPA max err) over seeds."""
    out = {}
    for kernel, strategy, is_causal, seq_len, _ in per_rank[0]:
        key = (kernel, strategy, is_causal, seq_len)
        if key in out:
            continue
        rows = [[r[(*key, s)] for r in per_rank] for s in SEEDS]
        mean = sum(sum(x[0] for x in row) / sum(x[1] for x in row) for row in rows) / len(SEEDS)
        mx = max(x[2] for row in rows for x in row)
        out[key] = (mean, mx, sum(row[0][3] for row in rows) / len(SEEDS), max(row[0][4] for row in rows))
    return out


_CACHE: dict[int, dict] = {}


def errors(dist, world_size):
    if world_size not in _CACHE:
        _CACHE[world_size] = summarize(dist(world_size, run_errors))
    return _CACHE[world_size]


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_error_within_sdpa(dist, kernel):
    errs = errors(dist, 4)
    bad = []
    for (kern, strategy, is_causal, seq_len), (mean, mx, s_mean, s_max) in errs.items():
        if kern != kernel:
            continue
        cid = f"W=4 {kernel} {strategy} causal={is_causal} S={seq_len}"
        if not mean <= RATIO * s_mean:
            bad.append(f"{cid}: mean err {mean:.3e} = {mean / s_mean:.2f} x SDPA's {s_mean:.3e}")
        if not mx <= RATIO * s_max:
            bad.append(f"{cid}: max err {mx:.3e} = {mx / s_max:.2f} x SDPA's {s_max:.3e}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_error_does_not_grow_with_world_size(dist, kernel):
    e2, e4 = errors(dist, 2), errors(dist, 4)
    bad = []
    for key, (mean4, mx4, _, _) in e4.items():
        if key[0] != kernel:
            continue
        mean2, mx2 = e2[key][:2]
        if not (mean4 <= RATIO * mean2 and mx4 <= RATIO * mx2):
            bad.append(f"{key}: W=4 mean/max {mean4:.3e}/{mx4:.3e} vs W=2 {mean2:.3e}/{mx2:.3e}")
    assert not bad, "\n".join(bad)
