"""Hugging Face ``generate()`` over a seqpar KV cache against single-process ``sdpa`` generation.

Run: ``python -m pytest tests/test_generate.py -q``

A tiny random-init Llama (float32, GQA 4/2 heads, 2 layers) greedily generates ``NEW`` tokens after a
2k-token prompt, on every rank with ``attn_implementation="seqpar_decode"`` and a ``SeqparCache``,
and once in the parent with ``"sdpa"`` and transformers' own cache. Every rank must produce exactly
the reference tokens, and the logits of every step must agree within 1e-5 (max-norm relative). Also a
batch of two left-padded prompts of different lengths, and a sequence-parallel prefill
(``seqpar.hf_generate.prefill``: each rank runs its shard of the prompt) before ``generate()``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V, PROMPT, NEW = 97, 2048, 64


def _model(attn: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=PROMPT + NEW + 8, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().eval()


def _prompts(batched: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2 if batched else 1, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    if batched:
        mask[1, : PROMPT - 1500] = 0  # left padding: the second prompt has 1500 tokens
        ids[1, : PROMPT - 1500] = 0
    return ids, mask


def _generate(model, ids, mask, cache=None):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, cache=cache,
            output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)  # (B, NEW), (B, NEW, V)


def _seqpar_generate(rank, world_size, batched, placement):
    import seqpar.hf_generate as hg

    model = _model(hg.NAME)
    ids, mask = _prompts(batched)
    cache = hg.SeqparCache(model.config, batch_size=ids.shape[0], max_cache_len=PROMPT + NEW, placement=placement,
                           block_size=16)
    tokens, logits = _generate(model, ids, mask, cache)
    held = [cache.kv.local_count(s, cache.kv.lengths[0][s]) for s in cache.slots]
    return tokens, logits, held, cache.kv.nbytes()


@pytest.mark.parametrize("batched", [False, True], ids=["one prompt", "ragged batch"])
def test_generate_matches_sdpa(dist, batched):
    ids, mask = _prompts(batched)
    want_tokens, want_logits = _generate(_model("sdpa"), ids, mask)
    for w, placement in ((2, "round_robin"), (3, "contiguous" if batched else "round_robin")):
        for rank, (tokens, logits, held, _) in enumerate(dist(w, _seqpar_generate, batched, placement, timeout=300)):
            assert torch.equal(tokens, want_tokens), (w, rank, (tokens != want_tokens).nonzero()[:5])
            err = ((logits - want_logits).abs().amax(-1) / want_logits.abs().amax(-1)).max().item()
            assert err < 1e-5, (w, rank, err)
            assert all(0 < h < PROMPT for h in held), held  # the cache is split, not replicated


def _sp_prefill_generate(rank, world_size):
    import seqpar.hf_generate as hg

    model = _model(hg.NAME)
    ids, mask = _prompts(False)
    cache = hg.SeqparCache(model.config, batch_size=1, max_cache_len=PROMPT + NEW, block_size=16)
    n = hg.prefill(model, ids, cache)
    held = cache.kv.local_count(cache.slots[0], n)
    tokens, logits = _generate(model, ids, None, cache)
    return tokens, logits, held, cache.kv.lengths[0][cache.slots[0]]


def test_sequence_parallel_prefill_then_generate(dist):
    ids, mask = _prompts(False)
    want_tokens, want_logits = _generate(_model("sdpa"), ids, None)
    for w in (2, 3):
        for rank, (tokens, logits, held, length) in enumerate(dist(w, _sp_prefill_generate, timeout=300)):
            assert length == PROMPT + NEW - 1, length  # generate() went on from the prefix: nothing fed twice
            assert torch.equal(tokens, want_tokens), (w, rank, (tokens != want_tokens).nonzero()[:5])
            err = ((logits - want_logits).abs().amax(-1) / want_logits.abs().amax(-1)).max().item()
            assert err < 1e-5, (w, rank, err)
            assert abs(held - (PROMPT - 1) / w) <= 1, held  # this rank's contiguous shard of the prompt


def test_model_without_seqpar_cache_is_refused():
    import seqpar.hf_generate as hg

    model = _model(hg.NAME)
    with pytest.raises(ValueError, match="SeqparCache"), torch.no_grad():
        model(torch.randint(1, V, (1, 8)), use_cache=False)


def _cache_with_another_attention(rank, world_size):
    """The trap: a second model built from the same config object switches it to ``sdpa``; generating with a
    SeqparCache would attend the new tokens only (this cache skipped). It must raise, not return tokens."""
    import seqpar.hf_generate as hg

    model = _model(hg.NAME)
    transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa")  # rewrites model.config
    ids, _ = _prompts(False)
    cache = hg.SeqparCache(model.config, batch_size=1, max_cache_len=64, block_size=16)
    try:
        _generate(model, ids[:, :16], None, cache)
    except ValueError as e:
        return str(e)
    return "generated"


def test_a_model_whose_attention_is_not_seqpar_is_refused(dist):
    for msg in dist(2, _cache_with_another_attention, timeout=120):
        assert "implementation is 'sdpa', not 'seqpar_decode'" in msg, msg
