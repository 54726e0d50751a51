r"""Hugging Face generation with the KV cache held by the attention service: ``attn_implementation="seqpar_remote"``.

One process runs the model; every attention layer sends its queries and new K/V to ``seqpar serve`` (one
request per layer per step, :meth:`seqpar.client.Client.attend`, or ``attend_many`` for a batch: one session per
row) and gets the exact output back: the cache never lives here ("move the query, not the cache")::

    import seqpar.hf_remote as hr
    from seqpar.client import Client
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=hr.NAME)
    with Client("http://127.0.0.1:8470") as client:
        cache = hr.RemoteCache(model.config, client, max_cache_len=ids.shape[1] + 32)   # a session on the service
        out = model.generate(ids, cache=cache, max_new_tokens=32, do_sample=False)
        cache.close()                                                                   # deletes the session

The cache layers are :class:`seqpar.hf_generate.SeqparLayer`\ s (same refusals: beam search, cropping,
expanding the batch) whose storage is the service's session; the mask hook is ``seqpar.hf_generate``'s.
Batches of equal-length prompts (no padding; one session per row); no sliding window, dropout,
``output_attentions``.
"""

from __future__ import annotations

from typing import Any

import torch

import seqpar.hf_generate as hg
from seqpar.client import Client

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('seqpar.hf_remote needs transformers >= 5: pip install -e ".[hf]" in a seqpar checkout') from e

NAME = "seqpar_remote"


class RemoteLayer(hg.SeqparLayer):
    """Layer ``layer_idx`` of a :class:`RemoteCache`: the length is counted here, the K/V live on the service."""

    attention = NAME

    def __init__(self, cache: RemoteCache, layer_idx: int):
        CacheLayerMixin.__init__(self)
        self.remote, self.layer_idx, self.config, self.handed = cache, layer_idx, cache.text_config, None
        self.is_initialized, self.batch_size, self.prompt_len = True, len(cache.sessions), None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._hand(key_states)  # read by attention_forward, which sends them with the queries
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.remote.max_cache_len

    def reset(self) -> None:
        raise ValueError("seqpar_remote: the service's session cannot be reset; make a new RemoteCache")


class RemoteCache(Cache):
    """A ``transformers`` ``Cache`` whose K/V are a session of the attention service (``client``).

    Args:
        config: the model's config (layers, heads, kv heads, head dim, dtype are read from it).
        client: a :class:`seqpar.client.Client`.
        max_cache_len: prompt + new tokens (the session's capacity).
        dtype: cache dtype (default: the config's ``dtype``, else float32).
        batch_size: rows of the batch ``generate`` is called with (one session each).
    """

    def __init__(self, config: Any, client: Client, *, max_cache_len: int, dtype: torch.dtype | None = None,
                 batch_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; allowed: an int >= 1")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dtype = dtype or getattr(text, "dtype", None) or torch.float32
        dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        self.client, self.max_cache_len, self.text_config = client, max_cache_len, text
        self.sessions: list[str] = []
        try:
            for _ in range(batch_size):
                self.sessions.append(client.create_session(layers=text.num_hidden_layers,
                                                           heads=text.num_attention_heads, kv_heads=kv_heads,
                                                           head_dim=head_dim, dtype=dtype, capacity=max_cache_len))
        except BaseException:
            self.close()
            raise
        super().__init__(layers=[RemoteLayer(self, i) for i in range(text.num_hidden_layers)])

    def close(self) -> None:
        """Delete the sessions on the service."""
        while self.sessions:
            self.client.delete_session(self.sessions.pop())


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: ``query (B, H, T, D)``, the new ``key, value (B, H_kv, T, D)`` go to
    the service (row ``b`` to session ``b``); returns ``(attn_output (B, T, H, D), None)``."""
    layer = getattr(key, "_seqpar_layer", None)
    if not isinstance(layer, RemoteLayer):
        raise ValueError("seqpar_remote: the model was not given a seqpar.hf_remote.RemoteCache "
                         "(pass cache=RemoteCache(model.config, client, max_cache_len=...))")
    key._seqpar_layer = None
    if dropout:
        raise ValueError(f"seqpar_remote: attention dropout={dropout} is not supported")
    bad = [k for k in (*hg._UNSUPPORTED, "sliding_window") if kwargs.get(k) is not None]
    if bad or kwargs.get("output_attentions"):
        raise ValueError(f"seqpar_remote: unsupported attention arguments {bad or ['output_attentions']}")
    sessions = layer.remote.sessions
    if query.shape[0] != len(sessions):
        raise ValueError(f"seqpar_remote: batch {query.shape[0]}, but the RemoteCache holds {len(sessions)} sessions "
                         "(RemoteCache(..., batch_size=B))")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("seqpar_remote: padding masks are not supported (prompts of equal length, no padding)")
    client = layer.remote.client
    if len(sessions) == 1:
        out = client.attend(sessions[0], layer.layer_idx, query[0], key[0], value[0], scale=scaling).unsqueeze(0)
    else:
        out = client.attend_many(sessions, layer.layer_idx, query, key, value, scale=scaling)
    layer.length += query.shape[2]
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention function and (``seqpar.hf_generate``'s) mask hook under ``name`` (done on import)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, hg.mask_forward)
    return name


register()
