"""All-reduce: gather the queries, attend them all to the local keys, combine by LSE statistics.

The seed's form of distributed softmax, applied to whole attention outputs::

    forward   Q = all-gather(q)                               (B, H, S, D)
              (o_r, lse_r) = attend(Q, k_r, v_r)              partial over this rank's keys
              m = all-reduce MAX lse_r;   w_r = exp(lse_r - m)
              [out*z | z] = reduce-scatter [o_r * w_r | w_r]  -> this rank's queries only
              out = (out*z) / z,  lse = m + log z
    backward  dO, O, LSE = all-gather(dout, out, lse)
              (dQ_r, dk, dv) = block backward(dO, Q, k_r, v_r, O, LSE)
              dq = reduce-scatter(dQ_r) (float32);   dk, dv stay local

Bytes per rank: ``(W-1) * |q|`` + ``(W-1)/W * |out|`` (float32, + one column) forward; the
backward moves ``(W-1) * (|dout| + |out|)`` and ``(W-1)/W * |dQ|`` (float32). It wins when the
queries are much smaller than the keys (decode-shaped, see :func:`seqpar.plan`).
"""

from __future__ import annotations

import torch

from seqpar.ops.lse import finite_or_zero, global_lse_from_max_sum
from seqpar.ops.tiled import tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


class AllReduceAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    ============  ========================  ===============================
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        comm, rank = setup.comm, setup.rank
        qs = comm.all_gather_v(q, setup.sizes, dim=2)
        kt = setup.tokens[rank]
        outs, lses = [], []
        for src, q_s in enumerate(qs):
            o, l = tiled_forward(q_s, k, v, setup.tokens[src], kt, setup.spec, setup.scale)
            outs.append(o)
            lses.append(l)
        o_all, lse_all = torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, H, S, D), (B, H, S)
        m = comm.all_reduce(lse_all.clone(), "max")
        wgt = torch.exp(lse_all - finite_or_zero(m)).unsqueeze(-1)
        buf = comm.reduce_scatter_v(torch.cat([o_all * wgt, wgt], dim=-1), setup.sizes, dim=2)
        acc, z = buf[..., :-1], buf[..., -1:]
        out = acc / z.masked_fill(z == 0, 1)  # z == 0: no key on any rank (acc == 0); a NaN z stays NaN
        m_local = torch.split(m, setup.sizes, dim=2)[rank]
        lse = global_lse_from_max_sum(m_local, z.squeeze(-1))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        setup: Setup = ctx.setup
        comm, rank = setup.comm, setup.rank
        kt = setup.tokens[rank]
        gathered = comm.all_gather_v(torch.stack([q, dout.to(q.dtype), out]), setup.sizes, dim=3)
        lses = comm.all_gather_v(lse.contiguous(), setup.sizes, dim=2)
        dqs, dk, dv = [], 0, 0
        for src, (g, l) in enumerate(zip(gathered, lses)):
            gq, gk, gv = tiled_backward(g[1], g[0], k, v, g[2], l, setup.tokens[src], kt, setup.spec, setup.scale)
            dqs.append(gq)
            dk, dv = dk + gk, dv + gv
        dq = comm.reduce_scatter_v(torch.cat(dqs, dim=2), setup.sizes, dim=2)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None
