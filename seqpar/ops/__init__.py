"""The math layer: pure tensor functions (no ``torch.distributed`` here).

- :mod:`seqpar.ops.lse`       -- numerically stable log-sum-exp merge of partial attention results
- :mod:`seqpar.ops.kernels`   -- local attention forward/backward that return/consume the LSE
- :mod:`seqpar.ops.masks`     -- masks defined on global token positions, split into blocks
- :mod:`seqpar.ops.reference` -- the float64 formula, written out naively (for checks and tests)
"""
