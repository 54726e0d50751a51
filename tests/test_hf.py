"""seqpar.hf: ``attn_implementation="seqpar"`` against transformers' own eager attention on the full sequence.

Run: ``python -m pytest tests/test_hf.py -q``

Every case builds the same random-init model twice on each rank (same seed): ``"sdpa"`` on the
full sequence (transformers + torch's own attention; the reference -- not ``"eager"``, whose softmax
runs in float32 even for float64 models) and ``"seqpar"`` on this
rank's shard; the sharded logits, unsharded, must equal the reference logits. float64, tolerance
1e-10 max-norm relative (measured ~1e-15); one float32 case at 1e-5.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V, S = 61, 23  # S = 23: uneven shards for W = 2 (12, 11) and W = 3 (zigzag pieces of 4/3 tokens)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _config(kind: str, kv_heads: int):
    common = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, attention_dropout=0.0,
    )
    if kind == "mistral":  # sliding window: key j visible when 0 <= i - j < 5
        return transformers.MistralConfig(sliding_window=5, **common)
    return transformers.LlamaConfig(**common)


def _models(kind: str, kv_heads: int, dtype: torch.dtype):
    torch.manual_seed(0)  # separate config objects: from_config sets _attn_implementation on the one it gets
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind, kv_heads), attn_implementation="sdpa")
    sp = transformers.AutoModelForCausalLM.from_config(_config(kind, kv_heads), attn_implementation="seqpar")
    ref, sp = ref.to(dtype).eval(), sp.to(dtype).eval()
    sp.load_state_dict(ref.state_dict())
    return ref, sp


def _batch(seed: int, pad: bool, docs: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, S), generator=g)
    batch = {"input_ids": ids}
    if pad:
        keep = torch.ones(2, S, dtype=torch.long)
        keep[0, 20:] = 0  # right padding (with the window of 5 every query still sees a real key)
        keep[1, 5:9] = 0  # a hole
        batch["attention_mask"] = keep
    if docs:
        batch["document_ids"] = torch.tensor([[0] * 9 + [1] * 8 + [2] * 6, [0] * 4 + [1] * 19])
    return batch


def _reference_4d(batch: dict, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Bool (B, 1, S, S) mask (True = attend) from the float64 reference mask formula (packed documents)."""
    from seqpar.ops.reference import sequence_mask

    allowed = sequence_mask(S, is_causal=True, window_size=window, document_ids=batch["document_ids"])  # (B,1,S,S)
    return allowed


def _hf_forward_cases(rank: int, world_size: int) -> dict:
    import seqpar.hf
    import seqpar.nn
    from seqpar.layout import unshard

    errors = {}
    cases = [
        ("llama", 2, torch.float64, "contiguous", False, False),
        ("llama", 2, torch.float64, "zigzag", True, False),
        ("llama", 4, torch.float64, "zigzag", False, False),
        ("llama", 1, torch.float64, "contiguous", True, False),
        ("llama", 2, torch.float64, "zigzag", False, True),
        ("mistral", 2, torch.float64, "zigzag", True, False),
        ("llama", 2, torch.float32, "zigzag", True, False),
    ]
    for kind, kv, dtype, layout, pad, docs in cases:
        name = f"{kind} kv={kv} {str(dtype)[6:]} {layout} pad={pad} docs={docs}"
        seqpar.hf.register(layout=layout)
        ref, sp = _models(kind, kv, dtype)
        batch = _batch(7, pad, docs)
        with torch.no_grad():
            if docs:
                mask4 = _reference_4d(batch, dtype, None)
                want = ref(input_ids=batch["input_ids"], attention_mask=mask4, use_cache=False).logits
            else:
                want = ref(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           use_cache=False).logits
            b = seqpar.nn.shard_batch(batch, layout=layout)
            extra = {"seqpar_document_ids": b["document_ids"]} if docs else {}
            got_local = sp(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=b.get("attention_mask"), use_cache=False, **extra).logits
        got = unshard(got_local, dim=1, layout=layout, seq_len=S)
        errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1)).item(), TOL[dtype]
    seqpar.hf.register()
    return errors


def test_hf_logits_match_full_sequence(dist):
    for w in (2, 3):
        errors = dist(w, _hf_forward_cases)[0]
        bad = {k: v for k, v in errors.items() if not v[0] <= v[1]}
        assert not bad, f"W={w}: (error, tolerance) per failing case: {bad}"


def _hf_error_cases(rank: int, world_size: int) -> dict:
    import seqpar.hf
    import seqpar.nn

    seqpar.hf.register(layout="zigzag")
    _, sp = _models("llama", 2, torch.float64)
    batch = seqpar.nn.shard_batch(_batch(3, True, False), layout="zigzag")
    messages = {}

    def expect(name, **kw):
        try:
            sp(input_ids=batch["input_ids"], use_cache=False, **kw)
        except ValueError as e:
            messages[name] = str(e)
        else:
            messages[name] = None

    expect("local positions")  # the model numbers the shard from 0
    seqpar.hf.register(layout="contiguous")  # batch is zigzag: positions disagree with the layout
    expect("wrong layout", position_ids=batch["position_ids"])
    seqpar.hf.register(layout="zigzag")
    mask4 = torch.zeros(2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1], dtype=torch.float64)
    expect("4-D mask", position_ids=batch["position_ids"], attention_mask=mask4)
    sp.train()
    sp.config.attention_dropout = 0.1
    for layer in sp.model.layers:
        layer.self_attn.attention_dropout = 0.1
    expect("dropout", position_ids=batch["position_ids"])
    seqpar.hf.register()
    return messages


def test_hf_errors_are_raised_on_every_rank(dist):
    per_rank = dist(2, _hf_error_cases)
    for rank, messages in enumerate(per_rank):
        assert "position_ids on rank(s) [0, 1] are not" in messages["local positions"], (rank, messages)
        assert "layout 'contiguous'" in messages["wrong layout"], (rank, messages)
        assert "4-D" in messages["4-D mask"], (rank, messages)
        assert "dropout=0.1" in messages["dropout"], (rank, messages)


def test_missing_transformers_message():
    import importlib
    import sys

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "seqpar.hf"}
    sys.modules["transformers"] = None  # makes `import transformers` raise ImportError
    try:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
            importlib.import_module("seqpar.hf")
    finally:
        sys.modules["transformers"] = transformers
        sys.modules.update(saved)
