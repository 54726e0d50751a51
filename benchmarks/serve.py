"""The attention service's round trip and throughput (not a test).

    python benchmarks/serve.py                                     # contexts 4k .. 128k, clients 1 .. 32; JSON + plot
    python benchmarks/serve.py --contexts 4096,16384 --calls 100 --clients 1,16 --seconds 3   # quicker
    python benchmarks/serve.py --contexts 4096 --throughput-contexts 4096 --clients 1,16       # the two targets

Shape: B = 1, H = 32 query heads, H_kv = 8, D = 128, float32, one layer, a one-token attend (T = 1; the new
token's K/V appended in the same request). W = 2 gloo ranks, one thread each.

1. **Latency vs context**: p50 / p99 of ``Client.attend`` against a service started with ``seqpar serve``
   (one session of S tokens, filled by ``append``), and of the same call in-process: ``seqpar.decode_attention``
   on two ranks of a :class:`seqpar_tools.runner.Pool` over a :class:`seqpar.KVCache` holding S tokens (each
   call's slowest rank). The difference is the service's overhead: transport, framing, the step broadcast.
   Both transports on one session, taking turns of ``BLOCK`` calls (each turn's first call a warm-up, not
   counted): the tensor door (ZeroMQ, the client's default) and HTTP (``Client(..., transport="http")``).
2. **Throughput vs concurrency** at a 4k and a 256-token context: N client threads, each its own session, attending for
   ``--seconds``; requests/s with batching (``serve.max_batch = 32``, window 1 ms: concurrent attends of one
   arena go through one ``decode_attention`` per layer) and without (``serve.max_batch = 1``: one request
   per step). Also the CPU milliseconds each process spent per request (rank 0, rank 1, the client threads;
   from /proc): on a 2-core machine the ranks and the clients share the cores, so requests/s is bounded by
   their sum, and what batching can save is the per-step part of it -- not the attention itself. From the two
   runs at 16 clients the summary fits CPU per request = a + b / (requests per step) and prints the bound
   (a + b) / a: the most any batch size could gain on this machine.

Writes ``--out`` (JSON, with the load average before and after) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # seqpar from this checkout

import torch  # noqa: E402

from seqpar.client import Client  # noqa: E402

H, HKV, D = 32, 8, 128
BLOCK = 25  # latency: calls per turn of each transport


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _inprocess_rank(rank, world_size, context, calls):
    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention
    from seqpar_tools.serve.engine import append

    torch.manual_seed(rank)
    cache = KVCache(num_layers=1, max_batch=1, max_seq_len=context + calls + 8, kv_heads=HKV, head_dim=D)
    (slot,) = cache.allocate(1)
    g = torch.Generator().manual_seed(0)  # the same K/V on every rank (as the service's broadcast)
    for a in range(0, context, 8192):
        t = min(8192, context - a)
        append(cache, 0, slot, torch.randn(HKV, t, D, generator=g), torch.randn(HKV, t, D, generator=g))
    times = []
    for i in range(calls + 3):
        q, k, v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, HKV, 1, D, generator=g), \
            torch.randn(1, HKV, 1, D, generator=g)
        t0 = time.perf_counter()
        decode_attention(cache, 0, q, k, v, slots=[slot])
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return times


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ranks_of(pid: int) -> list[int]:
    """The rank processes ``seqpar serve`` spawned (children running multiprocessing's spawn_main), by rank."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if ppid == pid and b"spawn_main" in cmd:
                out.append(int(d))
    return sorted(out)  # spawned in rank order


class Served:
    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "seqpar_tools", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        while True:
            line = lines.get(timeout=120)
            if "ready on " in line:
                self.address = line.split("ready on ")[1].split()[0]
                return

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _fill(c: Client, sid: str, context: int, g: torch.Generator) -> None:
    for a in range(0, context, 8192):
        t = min(8192, context - a)
        c.append(sid, 0, torch.randn(HKV, t, D, generator=g), torch.randn(HKV, t, D, generator=g))


def latency(contexts: list[int], calls: int) -> list[dict]:
    from seqpar_tools.runner import Pool

    rows = []
    with Pool(2, timeout_s=600) as pool:
        for s in contexts:
            per_rank = pool.run(_inprocess_rank, s, calls, timeout=600)
            times = [max(a, b) for a, b in zip(*per_rank)]
            rows.append({"context": s, "inprocess_p50_ms": _pct(times, 0.5) * 1e3,
                         "inprocess_p99_ms": _pct(times, 0.99) * 1e3})
            print(f"in-process S={s}: p50 {rows[-1]['inprocess_p50_ms']:.3f} ms", flush=True)
    top = max(contexts)
    srv = Served("--set", "serve.session_slots=1", "--set", f"serve.capacity_tokens={4 * top + 4096}",
                 "--set", "serve.max_request_bytes=134217728")
    try:
        clients = {"door": Client(srv.address, timeout=600), "http": Client(srv.address, timeout=600, transport="http")}
        g = torch.Generator().manual_seed(0)
        for row in rows:
            s = row["context"]
            sid = clients["http"].create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D,
                                                 capacity=s + 2 * calls + 2 * calls // BLOCK + 16)
            _fill(clients["http"], sid, s, g)
            times: dict = {name: [] for name in clients}
            over: dict = {name: [] for name in clients}
            wire: dict = {name: [] for name in clients}
            for i in range(0, calls, BLOCK):  # the transports take turns, BLOCK calls each: the same machine state
                for name, c in clients.items():  # for both, and only a block's first call follows the other's
                    for j in range(-1, min(BLOCK, calls - i)):  # -1: a warm-up call, not counted
                        q, k, v = torch.randn(H, 1, D, generator=g), torch.randn(HKV, 1, D, generator=g), \
                            torch.randn(HKV, 1, D, generator=g)
                        t0 = time.perf_counter()
                        c.attend(sid, 0, q, k, v)
                        if j >= 0:
                            times[name].append(time.perf_counter() - t0)
                            over[name].append(times[name][-1] * 1e3 - c.last_step_ms)  # round trip minus the step
                            wire[name].append(times[name][-1] * 1e3 - c.last_server_ms)  # minus arrival -> answer
            clients["http"].delete_session(sid)
            for name in clients:
                key = "service" if name == "door" else "http"
                row.update({f"{key}_p50_ms": _pct(times[name], 0.5) * 1e3,
                            f"{key}_p99_ms": _pct(times[name], 0.99) * 1e3,
                            f"{key}_overhead_p50_ms": _pct(over[name], 0.5),
                            f"{key}_overhead_p99_ms": _pct(over[name], 0.99),
                            f"{key}_transport_p50_ms": _pct(wire[name], 0.5),
                            f"{key}_transport_p99_ms": _pct(wire[name], 0.99)})
                print(f"{name:5s} S={s}: p50 {row[f'{key}_p50_ms']:.3f} ms p99 {row[f'{key}_p99_ms']:.3f} ms "
                      f"(overhead: round trip - step, per call, p50 {row[f'{key}_overhead_p50_ms']:.3f} ms, "
                      f"p99 {row[f'{key}_overhead_p99_ms']:.3f}; transport: round trip - time in the service, p50 "
                      f"{row[f'{key}_transport_p50_ms']:.3f} ms, p99 {row[f'{key}_transport_p99_ms']:.3f})", flush=True)
    finally:
        srv.stop()
    return rows


def throughput(context: int, clients: list[int], seconds: float, max_calls: int) -> list[dict]:
    """Each run: n fresh sessions of ``context`` tokens (one arena), n threads attending for ``seconds`` (at most
    ``max_calls`` each, so the context stays within ``context + max_calls``)."""
    rows = []
    top = max(clients)
    for batching in (True, False):
        budget = 2 * top * (context + max_calls) + 4096  # the arena: top slots of (context + max_calls) / 2 + a block
        srv = Served("--set", f"serve.session_slots={top}", "--set", f"serve.max_batch={32 if batching else 1}",
                     "--set", f"serve.max_sessions={top + 1}", "--set", f"serve.capacity_tokens={budget}",
                     "--set", "serve.max_request_bytes=134217728")
        try:
            c = Client(srv.address, timeout=600)
            g = torch.Generator().manual_seed(0)
            for n in clients:
                sids = [c.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, capacity=context + max_calls)
                        for _ in range(n)]
                for sid in sids:
                    _fill(c, sid, context, g)
                stop = threading.Event()
                counts = [0] * n

                def work(i):
                    gi = torch.Generator().manual_seed(i)
                    q, k, v = torch.randn(H, 1, D, generator=gi), torch.randn(HKV, 1, D, generator=gi), \
                        torch.randn(HKV, 1, D, generator=gi)
                    with Client(srv.address, timeout=600) as ci:
                        while not stop.is_set() and counts[i] < max_calls:
                            ci.attend(sids[i], 0, q, k, v)
                            counts[i] += 1

                threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
                before = c.stats()
                ranks = _ranks_of(srv.proc.pid)
                cpu0 = [_cpu_s(r) for r in ranks] + [_cpu_s(os.getpid())]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                stop.wait(seconds)  # the measurement interval
                stop.set()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                cpu = [(_cpu_s(r) - c0) * 1e3 / max(1, sum(counts))
                       for r, c0 in zip([*ranks, os.getpid()], cpu0)]
                after = c.stats()
                steps = after["steps"] - before["steps"]
                rows.append({"context": context, "batching": batching, "clients": n,
                             "requests_per_s": sum(counts) / wall,
                             "requests_per_step": sum(counts) / max(1, steps), "calls": sum(counts),
                             "cpu_ms_per_request": {**{f"rank{r}": round(x, 3) for r, x in enumerate(cpu[:-1])},
                                                    "clients": round(cpu[-1], 3)}})
                print(f"S={context} batching={batching} clients={n}: {rows[-1]['requests_per_s']:.0f} req/s, "
                      f"{rows[-1]['requests_per_step']:.2f} req/step; CPU ms per request "
                      + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["cpu_ms_per_request"].items()), flush=True)
                for sid in sids:
                    c.delete_session(sid)
        finally:
            srv.stop()
    return rows


def cpu_model(rows: list[dict]) -> dict | None:
    """From a batching and a one-request-per-step run at the same concurrency: CPU ms per request (ranks +
    clients) = ``a + b / B`` with ``B`` requests per step -- ``b`` the per-step part batching shares out, ``a``
    what each request costs whatever the batch (attention over its keys, HTTP, framing). ``(a + b) / a`` bounds
    what batching can gain where the cores are the bottleneck (here: both ranks and the clients on 2 cores)."""
    by = {r["batching"]: r for r in rows}
    if set(by) != {True, False} or by[True]["requests_per_step"] <= 1.05:
        return None
    cpu = {k: sum(r["cpu_ms_per_request"].values()) for k, r in by.items()}
    inv = 1 / by[True]["requests_per_step"]
    b = (cpu[False] - cpu[True]) / (1 - inv)
    a = cpu[False] - b
    return {"per_request_ms": round(a, 3), "per_step_ms": round(b, 3),
            "ratio_bound": round((a + b) / a, 2) if a > 0 else None}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lat = result["latency"]
    xs = [r["context"] for r in lat]
    for key, label in (("service", "service (tensor door)"), ("http", "service (HTTP)"),
                       ("inprocess", "in-process decode_attention")):
        a.errorbar(xs, [r[f"{key}_p50_ms"] for r in lat],
                   yerr=[[0] * len(lat), [r[f"{key}_p99_ms"] - r[f"{key}_p50_ms"] for r in lat]],
                   marker="o", capsize=3, label=f"{label}: p50 (bar to p99)")
    a.set(xscale="log", xlabel="context (tokens)", ylabel="ms per one-token attend", title="latency, W=2")
    a.legend(fontsize=8)
    for ctx in result["throughput_contexts"]:
        for batching in (True, False):
            rows = [r for r in result["throughput"] if r["batching"] == batching and r["context"] == ctx]
            b.plot([r["clients"] for r in rows], [r["requests_per_s"] for r in rows], marker="o" if batching else "x",
                   linestyle="-" if batching else "--",
                   label=f"S={ctx}: " + ("batching (max_batch 32)" if batching else "one request per step"))
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests / s", title="throughput, W=2")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096,16384,65536,131072")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--clients", default="1,2,4,8,16,32")
    p.add_argument("--throughput-contexts", default="4096,256")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-calls", type=int, default=3000, help="per client and run (bounds the context growth)")
    p.add_argument("--out", default="seqpar-out/bench-serve/serve.json")
    a = p.parse_args()
    load0 = os.getloadavg()
    result = {"shape": {"B": 1, "H": H, "H_kv": HKV, "D": D, "T": 1, "dtype": "float32", "world_size": 2},
              "throughput_contexts": [int(x) for x in a.throughput_contexts.split(",")]}
    result["latency"] = latency([int(x) for x in a.contexts.split(",")], a.calls)
    clients = [int(x) for x in a.clients.split(",")]
    result["throughput"] = [r for ctx in result["throughput_contexts"]
                            for r in throughput(ctx, clients, a.seconds, a.max_calls)]
    result["loadavg_before"], result["loadavg_after"] = load0, os.getloadavg()
    result["cpus"] = os.cpu_count()
    for ctx in result["throughput_contexts"]:
        rows = [r for r in result["throughput"] if r["context"] == ctx]
        one = {r["clients"]: r["requests_per_s"] for r in rows if not r["batching"]}
        bat = {r["clients"]: r["requests_per_s"] for r in rows if r["batching"]}
        if 16 in one and 16 in bat:
            print(f"S={ctx}: batching at 16 clients: {bat[16] / one[16]:.2f}x one request per step "
                  f"({bat[16]:.0f} vs {one[16]:.0f} req/s)")
            model = cpu_model([r for r in rows if r["clients"] == 16])
            if model and model["ratio_bound"]:
                result.setdefault("cpu_model", {})[str(ctx)] = model
                print(f"S={ctx}: CPU per request (all processes) = {model['per_request_ms']:.2f} ms + "
                      f"{model['per_step_ms']:.2f} ms / (requests per step): no batch size can give more than "
                      f"{model['ratio_bound']:.2f}x on CPU time alone")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(a.out)[0] + ".png")
    print(f"wrote {a.out}; load average before {load0}, after {result['loadavg_after']}")


if __name__ == "__main__":
    main()
