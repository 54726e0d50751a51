"""All-gather: gather K/V once, attend the local queries to every key.

::

    forward   K, V = all-gather(k, v)                          (B, H_kv, S, D) on every rank
              for src in 0..W-1:  (out, lse) <- merge(attend(q, K_src, V_src))   empty blocks skipped
    backward  dK, dV (float32, B, H_kv, S, D) <- local block backward per src
              dk, dv = reduce-scatter(dK, dV);   dq stays local

Bytes per rank: ``(W-1) * |k + v|`` forward, ``(W-1)/W * |dK + dV|`` (float32) backward.
Memory: the gathered K/V (``2 * S * H_kv * D`` elements).
"""

from __future__ import annotations

import torch

from seqpar.ops.lse import stat_dtype
from seqpar.ops.tiled import tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


class AllGatherAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    ============  ========================  ===============================
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        kv = torch.stack([k, v])  # (2, B, H_kv, S_r, D)
        gathered = setup.comm.all_gather_v(kv, setup.sizes, dim=3)
        qt = setup.tokens[setup.rank]
        acc = None
        for src, kv_s in enumerate(gathered):
            acc = tiled_forward(q, kv_s[0], kv_s[1], qt, setup.tokens[src], setup.spec, setup.scale, acc)
        out, lse = acc
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse, *(t for kv_s in gathered for t in kv_s))
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *kvs = ctx.saved_tensors
        setup: Setup = ctx.setup
        qt = setup.tokens[setup.rank]
        sd = stat_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=sd, device=q.device)
        dkv = []
        for src in range(setup.world_size):
            k_s, v_s = kvs[2 * src], kvs[2 * src + 1]
            gq, gk, gv = tiled_backward(dout, q, k_s, v_s, out, lse, qt, setup.tokens[src], setup.spec, setup.scale)
            dq += gq
            dkv.append(torch.stack([gk, gv]))
        dk_dv = setup.comm.reduce_scatter_v(torch.cat(dkv, dim=3), setup.sizes, dim=3)
        return dq.to(q.dtype), dk_dv[0].to(q.dtype), dk_dv[1].to(q.dtype), None
