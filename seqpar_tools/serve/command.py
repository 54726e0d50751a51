"""``seqpar serve [CONFIG]``: spawn the local ranks (as ``seqpar run`` does) or join torchrun / mpirun, then serve.

Spawned ranks: this process owns them (:class:`seqpar_tools.runner.Pool`: they die with it) and forwards
SIGTERM / SIGINT to rank 0, which drains; exit 0 once every rank stopped, 1 when the service failed (a rank
died or stalled: rank 0 has answered every pending request 503 and said why on stderr).
Under a launcher this process is one rank; rank 0 serves, the launcher stops the others if it fails.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from typing import Any

from seqpar_tools.config import Config, ConfigError

TOKEN_ENV = "SEQPAR_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(cfg: Config, token: str | None) -> None:
    if not is_loopback(cfg.serve.host) and not token:
        raise ConfigError(f"{cfg.origin('serve.host')}: serve.host = {cfg.serve.host!r} is not a loopback address: "
                          f"serving it needs a token (--token or {TOKEN_ENV}), checked on every request")
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise ConfigError("--token / SEQPAR_SERVE_TOKEN: needs >= 8 printable characters without spaces")


def check_cpu(cfg: Config) -> None:
    """The service's ranks hold their caches in CPU memory and talk over gloo (not yet on GPUs): refuse a config
    that asks otherwise rather than ignore it."""
    for key, val, bad in (("run.device", cfg.run.device, "cuda"), ("run.backend", cfg.run.backend, "nccl")):
        if val == bad:
            raise ConfigError(f"{cfg.origin(key)}: {key} = {val!r}: seqpar serve holds its caches in CPU memory and "
                              "runs its ranks over gloo (a GPU service is not built yet); use 'cpu' / 'gloo' or "
                              "'auto'")


def run_rank(rank: int, world_size: int, cfg: Config, token: str | None, on_fatal=None) -> None:
    """The service on this rank (rank 0: HTTP + steps; others: steps), until drained."""
    import torch

    from seqpar_tools.serve.service import Service, follower

    torch.set_num_threads(max(1, cfg.run.threads_per_rank or torch.get_num_threads()))
    if rank != 0:
        return follower(cfg.serve, rank, world_size)

    def ready(svc: Service) -> None:
        sv = cfg.serve
        print(f"seqpar serve: ready on {svc.address} (tensor door tcp port {svc.door.port}, {world_size} ranks, "
              f"capacity {sv.capacity_tokens} tokens per rank, {'token required' if token else 'no token'}, "
              f"batch window {sv.batch_window_ms:g} ms)", flush=True)

    Service(cfg.serve, token=token, world_size=world_size, on_fatal=on_fatal, on_ready=ready).serve()


def _pool_task(rank: int, world_size: int, cfg: Config, token: str | None) -> None:
    from seqpar_tools import runner

    emit = runner._EMIT
    run_rank(rank, world_size, cfg, token, on_fatal=lambda msg: emit("fatal", msg))


def _join_task(ctx: Any, cfg: Config, token: str | None) -> None:
    run_rank(ctx.rank, ctx.world_size, cfg, token)


def serve_command(cfg: Config, token: str | None) -> int:
    from seqpar.distributed import launcher, launcher_world_size
    from seqpar_tools.config import resolve_world_size
    from seqpar_tools.runner import Pool, RankError, join

    check_token(cfg, token)
    check_cpu(cfg)
    kind = launcher()
    world = resolve_world_size(cfg, launcher_world_size(), kind, 2)
    pg_timeout = 2 * cfg.serve.timeout_s
    if kind is not None:
        join(_join_task, (cfg, token), backend="gloo", threads=cfg.run.threads_per_rank, timeout_s=pg_timeout)
        return 0
    pool = Pool(world, backend="gloo", device_type="cpu", threads=cfg.run.threads_per_rank, timeout_s=pg_timeout,
                grace_s=cfg.serve.timeout_s + 5)
    fatal: list[str] = []

    def forward(signum, frame) -> None:
        if pool.procs[0].is_alive():
            os.kill(pool.procs[0].pid, signal.SIGTERM)

    def on_event(rank: int, kind: str, payload: Any) -> None:
        if kind == "fatal":  # rank 0 answered every pending request and exits: stop the others now
            fatal.append(payload)
            for p in pool.procs[1:]:
                if p.is_alive():
                    p.kill()

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pool.run(_pool_task, cfg, token, timeout=10**9, on_event=on_event)
    except RankError as e:
        pool.close(force=True)
        first = fatal[0] if fatal else str(e)
        print(f"seqpar serve: {first}", file=sys.stderr, flush=True)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    pool.close()
    return 0
