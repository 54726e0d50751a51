"""Local attention kernels that return (and, backward, consume) the log-sum-exp, behind a registry.

Every strategy reduces to "attend these queries to these keys, give me ``(out, lse)``" plus the
matching backward given the *global* ``out`` and ``lse`` -- the flash-attention identity
``P = exp(S - lse)`` makes a block's gradient exact once the global statistics are known.

One file per backend (each with its limits and sources), one record each (:class:`common.Kernel`):

==================  ======  ===========================  =========================  ===========  =====
backend             device  dtypes                       masks                      GQA          torch
==================  ======  ===========================  =========================  ===========  =====
``cpu_flash``       cpu     fp16/bf16 (as fp32), fp32/64  none, causal, bool, bias   native       2.4
``cuda_cudnn``      cuda    fp16, bf16                   none, causal               2.9+ native  2.5
``cuda_flash``      cuda    fp16, bf16                   none, causal (Sq == Sk)    native       2.4
``cuda_efficient``  cuda    fp16, bf16, fp32             none, causal, bool, bias   K/V repeated 2.4
``blockwise``       any     any                          any                        native       2.4
==================  ======  ===========================  =========================  ===========  =====

:mod:`.registry` picks one per block (rules in its docstring), falls back on errors and normalises
results. Shapes::

    q      (B, H,    Sq, D)
    k, v   (B, H_kv, Sk, D)        H % H_kv == 0
    mask   broadcastable to (B, H, Sq, Sk); bool (True = attend) or additive float
    out    (B, H,    Sq, D)        float32 (float64 for float64 input); 0 on rows that see no key
    lse    (B, H,    Sq)           float32 (float64 for float64 input); -inf on rows that see no key

``is_causal`` is *top-left aligned* (query i sees keys j <= i); callers pass it only for diagonal
blocks where query and key positions coincide.
"""

from seqpar.ops.kernels.blockwise import TILE_ELEMENTS
from seqpar.ops.kernels.registry import (
    BACKENDS,
    attention_backward,
    attention_forward,
    candidates,
    configure,
    describe,
    exclude,
    kernel_name,
    reset,
    use,
)

__all__ = [
    "BACKENDS", "TILE_ELEMENTS", "attention_backward", "attention_forward", "candidates", "configure", "describe",
    "exclude", "kernel_name", "reset", "use",
]
