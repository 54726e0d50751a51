"""seqpar: exact sequence-parallel attention for PyTorch and MPI."""

from seqpar.attention import attention
from seqpar.comm import PeerTimeout
from seqpar.distributed import init_distributed
from seqpar.kv_sharded import kv_sharded_attention
from seqpar.layout import shard, unshard
from seqpar.plan import Plan, plan
from seqpar.softmax import softmax

__all__ = ["Plan", "PeerTimeout", "attention", "init_distributed", "kv_sharded_attention", "plan", "shard", "softmax", "unshard"]
__version__ = "0.1.0"

from seqpar.cache import KVCache  # noqa: E402  (issue 10: sharded KV cache and decode)
from seqpar.decode import decode_attention  # noqa: E402

__all__ += ["KVCache", "decode_attention"]
