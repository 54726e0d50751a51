"""seqpar: exact sequence-parallel attention for PyTorch and MPI."""

from seqpar.attention import attention
from seqpar.cache import KVCache
from seqpar.comm import PeerTimeout
from seqpar.decode import decode_attention
from seqpar.distributed import init_distributed
from seqpar.kv_sharded import kv_sharded_attention
from seqpar.layout import shard, unshard
from seqpar.plan import Plan, plan
from seqpar.softmax import softmax

__all__ = [
    "KVCache", "PeerTimeout", "Plan", "attention", "decode_attention", "init_distributed", "kv_sharded_attention",
    "plan", "shard", "softmax", "unshard",
]
__version__ = "0.1.0"
