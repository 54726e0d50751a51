r"""Train a small Llama on long-context key-value recall, sequence-parallel over the launcher's ranks.

    NPROC=2 launch/torchrun.sh examples/train_recall.py --config configs/train_recall.toml  # 2 CPU ranks, gloo
    NP=2 launch/mpirun.sh examples/train_recall.py                                          # the same under MPI
    python examples/train_recall.py --seq-len 1024 --fact-span 512 --queries 128            # one process
    NPROC=1 launch/torchrun.sh examples/train_recall.py --device cuda --dtype bfloat16 --seq-len 16384 \
        --fact-span 8192

The task (``[data]``): each sequence draws random values for ``pairs`` keys. The first ``fact_span``
tokens hold those pairs (each repeated, in random order), then comes a haystack of filler tokens, and
the last ``queries`` positions each ask for one of the keys and must predict its value::

    [BOS] (k2,v2) (k0,v0) (k2,v2) ... (k1,v1)  f f f ... f  [QUERY] k1 k0 k1 k3 ...
          ^ positions 1 .. fact_span                                ^ targets: v1 v0 v1 v3 ...

The values never appear in the query part, so every answer needs tokens at least
``seq_len - fact_span - queries`` (1.5k by default) and up to ``seq_len`` (4k) positions back -- on
the other rank. The loss is on the query positions only. By default a fact is one token per (key,
value) pair (``fused = true``); ``fused = false`` writes "k v" token pairs, which needs an induction
circuit and thousands of steps instead of ~170. The model is ``transformers.LlamaConfig`` with random
init (nothing is downloaded) and ``attn_implementation="seqpar"`` (:mod:`seqpar.hf`); the training
step is the one of :mod:`seqpar.nn`: ``shard_batch`` -> model -> ``sequence_parallel_loss`` ->
``sync_gradients``.

Printed by rank 0: the loss on the answer tokens and the recall accuracy every ``log_every`` steps,
then tokens/s and peak memory per rank (peak RSS of the process on CPU; peak allocated on CUDA).
The loss starts at ln(vocabulary), drops to chance among the values, ln(values) = 2.08, within ~20
steps, and recall then drives it to ~0 (100% recall after ~170 steps with the default config).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

import seqpar
import seqpar.hf  # needs transformers: pip install -e ".[hf]" in a seqpar checkout
import seqpar.nn
from seqpar.comm import get_communicator

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "train_recall.toml"
BOS, QUERY, FILL0 = 0, 1, 2  # token ids: BOS, QUERY, then the fillers, the keys, the values
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: true, false")
    return text.lower() in ("true", "1")


def load_config(argv: list[str] | None = None) -> dict:
    """The TOML file, then ``--key value`` overrides of any ``[section] key`` (``--seq-len`` -> data.seq_len)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=str(DEFAULT_CONFIG))
    known, rest = pre.parse_known_args(argv)
    with open(known.config, "rb") as f:
        cfg = tomllib.load(f)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for section, values in cfg.items():
        for key, default in values.items():
            kind = _parse_bool if isinstance(default, bool) else type(default)
            parser.add_argument(f"--{key.replace('_', '-')}", dest=f"{section}.{key}", default=default,
                                type=kind, help=f"[{section}] {key} (default {default!r})")
    args = parser.parse_args(rest)
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".")
            cfg[section][key] = value
    if cfg["run"]["dtype"] not in DTYPES:
        parser.error(f"--dtype {cfg['run']['dtype']!r}; allowed: {', '.join(DTYPES)}")
    if cfg["run"]["device"] not in ("cpu", "cuda"):
        parser.error(f"--device {cfg['run']['device']!r}; allowed: cpu, cuda")
    d = cfg["data"]
    if d["pairs"] > d["keys"]:
        parser.error(f"need pairs ({d['pairs']}) <= keys ({d['keys']})")
    if d["fact_span"] < d["pairs"] or d["seq_len"] < d["fact_span"] + d["queries"] + 2:
        parser.error(f"need pairs ({d['pairs']}) <= fact_span ({d['fact_span']}) and fact_span + queries + 2 "
                     f"<= seq_len ({d['seq_len']})")
    return cfg


def vocab(d: dict) -> tuple[int, int, int, int]:
    """(first key id, first value id, first fact id, vocabulary size)."""
    key0 = FILL0 + d["filler"]
    value0 = key0 + d["keys"]
    fact0 = value0 + d["values"]
    return key0, value0, fact0, fact0 + d["keys"] * d["values"]


def make_batch(d: dict, batch: int, gen: torch.Generator) -> dict:
    """Full sequences and their targets (every rank builds the same ones from the same generator).

    A fact token stands for one (key, value) pair: id ``fact0 + key * values + value``. The targets
    are given already shifted (``shift_labels[t]`` = what position t must predict): the answer to the
    query key at t is its value, which never appears in the input (no shortcut through earlier answers).
    """
    key0, value0, fact0, _ = vocab(d)
    s, p, q, span = d["seq_len"], d["pairs"], d["queries"], d["fact_span"]
    ids = torch.randint(FILL0, FILL0 + d["filler"], (batch, s), generator=gen)  # the haystack
    ids[:, 0] = BOS
    ids[:, s - q - 1] = QUERY
    targets = torch.full((batch, s), -100, dtype=torch.long)
    for b in range(batch):
        keys = torch.randperm(d["keys"], generator=gen)[:p]
        values = torch.randint(0, d["values"], (p,), generator=gen)
        if d["fused"]:  # one token per pair
            facts = fact0 + keys * d["values"] + values  # (P,)
            ids[b, 1 : 1 + span] = facts[torch.arange(span) % p][torch.randperm(span, generator=gen)]
        else:  # the pairs as "k v" token pairs
            order = (torch.arange(span // 2) % p)[torch.randperm(span // 2, generator=gen)]
            ids[b, 1 : 1 + 2 * order.numel() : 2] = key0 + keys[order]
            ids[b, 2 : 2 + 2 * order.numel() : 2] = value0 + values[order]
        asked = torch.randint(0, p, (q,), generator=gen)
        ids[b, s - q :] = key0 + keys[asked]
        targets[b, s - q :] = value0 + values[asked]
    return {"input_ids": ids, "shift_labels": targets}


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype):
    import transformers
    m, d = cfg["model"], cfg["data"]
    config = transformers.LlamaConfig(
        vocab_size=vocab(d)[3], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
        max_position_embeddings=d["seq_len"], attention_dropout=0.0, use_cache=False,
    )
    torch.manual_seed(cfg["train"]["seed"])  # the same initial weights on every rank
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="seqpar")
    return model.to(device=device, dtype=dtype)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(argv)
    t, d, par, run = cfg["train"], cfg["data"], cfg["parallel"], cfg["run"]
    rank, world = seqpar.init_distributed()
    comm = get_communicator(None)
    device = torch.device("cuda", torch.cuda.current_device()) if run["device"] == "cuda" else torch.device("cpu")
    dtype = DTYPES[run["dtype"]]
    seqpar.hf.register(layout=par["layout"], strategy=par["strategy"])
    model = build_model(cfg, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, t["warmup"])))
    gen = torch.Generator().manual_seed(t["seed"] + 1)  # the same data on every rank; each keeps its slice
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"seqpar train_recall: {world} rank(s), layout={par['layout']}, strategy={par['strategy']}, "
              f"device={run['device']}, dtype={run['dtype']}, threads/rank={torch.get_num_threads()}")
        print(f"model: Llama {cfg['model']['layers']} layers, hidden {cfg['model']['hidden']}, "
              f"{cfg['model']['heads']} heads / {cfg['model']['kv_heads']} kv heads, {n_params:,} parameters")
        gap = d["seq_len"] - d["fact_span"] - d["queries"]
        print(f"data: seq_len {d['seq_len']} (~{d['seq_len'] // world} tokens per rank), batch {t['batch']}, "
              f"{d['pairs']} pairs in positions 1..{d['fact_span']}, {d['queries']} queries at the end "
              f"(>= {gap} tokens after the facts); chance loss ln({d['values']}) = {math.log(d['values']):.2f}")
        print(f"{'step':>6} {'loss':>8} {'recall':>7} {'tokens/s':>10} {'s/step':>7}")
    tokens = 0
    start = last = time.perf_counter()
    for step in range(1, t["steps"] + 1):
        full = make_batch(d, t["batch"], gen)
        b = seqpar.nn.shard_batch(full, layout=par["layout"])
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits  # (B, S_local, V)
        loss = seqpar.nn.sequence_parallel_loss(logits, shift_labels=b["shift_labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        seqpar.nn.sync_gradients(model)
        opt.step()
        sched.step()
        tokens += b["input_ids"].numel()
        if step % t["log_every"] == 0 or step == t["steps"]:
            valid = b["shift_labels"] != -100
            hits = torch.tensor([float((logits.argmax(-1)[valid] == b["shift_labels"][valid]).sum()),
                                 float(valid.sum())], dtype=torch.float64)
            comm.all_reduce(hits, "sum")
            now = time.perf_counter()
            if rank == 0:
                rate = tokens * world / (now - start)  # all ranks' tokens (rank 0's count x W)
                print(f"{step:>6} {loss.item():>8.4f} {hits[0] / hits[1]:>7.1%} {rate:>10,.0f} "
                      f"{(now - last) / t['log_every']:>7.3f}", flush=True)
            last = now
    elapsed = time.perf_counter() - start
    mine = torch.tensor([tokens / elapsed, peak_memory_mib(device)], dtype=torch.float64)
    table = comm.all_gather(mine)  # (W, 2)
    if rank == 0:
        what = "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS"
        for r in range(world):
            print(f"rank {r}: {table[r, 0]:,.0f} tokens/s (its own slice), {what} {table[r, 1]:,.0f} MiB")
        print(f"total: {float(table[:, 0].sum()):,.0f} tokens/s over {elapsed:.1f} s, {t['steps']} steps")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
