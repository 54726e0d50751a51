"""Job configuration: a TOML file mapped onto typed dataclasses, validated key by key (every bad key reported).

    seqpar run                                  # the built-in default (the values of configs/default.toml)
    seqpar run configs/gpu.toml --seq-len 65536 --set measure.repeats=5

Sections and keys are the fields below; ``configs/default.toml`` spells out every one of them with
the same values as the dataclass defaults (a test keeps the two equal). Every problem is a
:class:`ConfigError` naming the key and where its value came from (the file, or the command line); all the
problems of one file are reported at once, one per line::

    configs/x.toml: attention.heads = 6: must be a multiple of attention.kv_heads = 4
    configs/x.toml: measure.repeats = 0: must be >= 1

``Config.origin(key)`` says where a value came from: the file, ``command line`` or the built-in default.

TOML is read with ``tomllib`` (Python 3.11+) or ``tomli`` (3.10).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqpar_tools.names import DTYPES, LAYOUTS, STRATEGIES

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
GROUPS = ("torch", "mpi")
DEFAULT_SOURCE = "built-in default (= configs/default.toml)"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and where the value came from."""


@dataclass
class RunSection:
    world_size: int = 0  # ranks; 0 = the launcher's (torchrun/mpirun), spawning locally: every GPU, or 2 on CPU
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    group: str = "torch"  # torch: a torch.distributed group; mpi: mpi4py's COMM_WORLD (CPU, under mpirun)
    threads_per_rank: int = 1  # torch.set_num_threads on each rank; 0 = leave it alone
    timeout_s: float = 300.0  # a rank silent (or a collective stuck) this long fails the job
    out: str | None = None  # report.json and report.png go here; absent: seqpar-out/<config file stem>
    seed: int = 0


@dataclass
class AttentionSection:
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64
    seq_len: int = 16384
    dtype: str = "float32"
    is_causal: bool = True
    layout: str = "zigzag"
    window_size: int | None = None  # absent = no window
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))


@dataclass
class MeasureSection:
    warmup: int = 1  # untimed calls before the timed ones (the first also counts the bytes)
    repeats: int = 2  # timed calls; the median (of the slowest rank's times) is reported
    backward: bool = True  # also time fwd+bwd


@dataclass
class CheckSection:
    seq_len: int = 1021  # float64 check against seqpar.ops.reference at this (small, odd) length
    long: bool = True  # at attention.seq_len, compare with single-process SDPA on rank 0
    grads: bool = True  # the long check includes dq, dk, dv
    rtol: float | None = None  # max |a - b| / max |ref| allowed; absent = the per-dtype default


@dataclass
class ServeSection:
    host: str = "127.0.0.1"  # loopback by default; any other address needs a token (--token / SEQPAR_SERVE_TOKEN)
    port: int = 8470  # HTTP; 0 = a free port (the ready line names it)
    tensor_port: int = 0  # the tensor door (ZeroMQ: appends and attends); 0 = a free port (the ready line, health)
    capacity_tokens: int = 4194304  # K/V tokens per rank, summed over layers and sessions (arenas count whole)
    block_size: int = 16  # round-robin placement block (seqpar.KVCache)
    session_slots: int = 8  # sequences per arena: sessions of one shape share one, and batch into one collective
    batch_window_ms: float = 1.0  # the longest a request waits for others to join its step
    max_batch: int = 32  # requests per step (1 = no batching)
    max_sessions: int = 64  # sessions open at once
    max_request_bytes: int = 67108864  # request body limit (413 above it)
    timeout_s: float = 30.0  # a rank silent or a step running this long: pending requests get 503, exit 1


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    measure: MeasureSection = field(default_factory=MeasureSection)
    check: CheckSection = field(default_factory=CheckSection)
    serve: ServeSection = field(default_factory=ServeSection)
    source: str = DEFAULT_SOURCE  # where the values came from (for messages)
    overrides: dict[str, Any] = field(default_factory=dict)  # command-line values applied on top
    origins: dict[str, str] = field(default_factory=dict)  # "section.key" -> the file or "command line"

    def origin(self, key: str) -> str:
        """Where ``key``'s value came from: the config file, ``command line``, or the built-in default."""
        return self.origins.get(key, self.source if self.source != DEFAULT_SOURCE else "built-in default")

    @property
    def stem(self) -> str:
        """The config's name: the file's stem, or ``default`` for the built-in config."""
        return "default" if self.source == DEFAULT_SOURCE else Path(self.source).stem

    @property
    def out_dir(self) -> Path:
        """``run.out``, or ``seqpar-out/<stem>`` when absent (each config its own directory)."""
        return Path(self.run.out) if self.run.out else Path("seqpar-out") / self.stem

    def describe(self) -> str:
        """``source``, plus the overridden keys (for titles and logs)."""
        if not self.overrides:
            return self.source
        return f"{self.source} + {' '.join(f'{k}={v}' for k, v in self.overrides.items())}"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "attention": AttentionSection,
    "measure": MeasureSection,
    "check": CheckSection,
    "serve": ServeSection,
}


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError("reading configs on Python 3.10 needs tomli: pip install tomli") from e
    return tomllib


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The config in ``path`` (None: the built-in default) with ``overrides`` ``{"section.key": value}``
    (from the command line) applied; validated. Raises :class:`ConfigError`."""
    if path is None:
        data: dict[str, Any] = {}
        source = DEFAULT_SOURCE
    else:
        p = Path(path)
        source = str(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            data = _toml().loads(p.read_text())
        except Exception as e:  # tomllib.TOMLDecodeError
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return from_dict(data, source, overrides)


def from_dict(data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML plus command-line overrides; every problem found
    is reported in one :class:`ConfigError` (one line each)."""
    origin: dict[str, str] = {}
    merged: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for sec, values in data.items():
        if sec not in SECTIONS:
            problems.append(f"{source}: unknown section [{sec}]; allowed: {', '.join(SECTIONS)}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{source}: {sec} must be a table [{sec}], got {values!r}")
            continue
        for key, val in values.items():
            merged.setdefault(sec, {})[key] = val
            origin[f"{sec}.{key}"] = source
    for dotted, val in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        if sec not in SECTIONS or not key:
            problems.append(f"command line ({dotted}={val!r}): unknown key {dotted!r}; sections: {', '.join(SECTIONS)}")
            continue
        merged.setdefault(sec, {})[key] = val
        origin[dotted] = "command line"

    def where(key: str) -> str:
        return origin.get(key, source)

    sections = {}
    for sec, cls in SECTIONS.items():
        kwargs = {}
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key, val in merged.get(sec, {}).items():
            dotted = f"{sec}.{key}"
            if key not in names:
                problems.append(f"{where(dotted)}: unknown key {dotted!r}; allowed in [{sec}]: {', '.join(names)}")
                continue
            try:
                kwargs[key] = _typed(val, hints[key], dotted, where(dotted))
            except ConfigError as e:
                problems.append(str(e))
        sections[sec] = cls(**kwargs)
    cfg = Config(**sections, source=source, overrides=dict(overrides or {}), origins=origin)
    if not problems:  # the cross-key checks need well-typed values
        problems += _validate(cfg, where)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _typed(val: Any, hint: Any, key: str, where: str) -> Any:
    """``val`` checked against the field type (int, float, bool, str, list[str], X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None: the key may be absent; present, it must be an X
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(val, list):
            raise ConfigError(f"{where}: {key} = {val!r}: must be a list of {item.__name__}")
        return [_typed(v, item, key, where) for v in val]
    ok = {
        bool: isinstance(val, bool),
        int: isinstance(val, int) and not isinstance(val, bool),
        float: isinstance(val, (int, float)) and not isinstance(val, bool),
        str: isinstance(val, str),
    }[hint]
    if not ok:
        raise ConfigError(f"{where}: {key} = {val!r}: must be {hint.__name__}, got {type(val).__name__}")
    return float(val) if hint is float else val


def _validate(cfg: Config, where) -> list[str]:
    """Every problem of a well-typed config, one line each (empty: fine)."""
    problems: list[str] = []

    def fail(key: str, msg: str) -> None:
        sec, _, name = key.partition(".")
        val = getattr(getattr(cfg, sec), name)
        problems.append(f"{where(key)}: {key} = {val!r}: {msg}")

    def one_of(key: str, allowed: tuple[str, ...]) -> None:
        sec, _, name = key.partition(".")
        if getattr(getattr(cfg, sec), name) not in allowed:
            fail(key, f"allowed: {', '.join(map(repr, allowed))}")

    r, a, m, c = cfg.run, cfg.attention, cfg.measure, cfg.check
    one_of("run.backend", BACKENDS)
    one_of("run.device", DEVICES)
    one_of("run.group", GROUPS)
    one_of("attention.dtype", DTYPES)
    one_of("attention.layout", LAYOUTS)
    for key, val, low in (
        ("run.world_size", r.world_size, 0), ("run.threads_per_rank", r.threads_per_rank, 0),
        ("attention.batch", a.batch, 1), ("attention.heads", a.heads, 1), ("attention.kv_heads", a.kv_heads, 1),
        ("attention.head_dim", a.head_dim, 1), ("attention.seq_len", a.seq_len, 1),
        ("measure.warmup", m.warmup, 0), ("measure.repeats", m.repeats, 1), ("check.seq_len", c.seq_len, 1),
    ):
        if val < low:
            fail(key, f"must be >= {low}")
    if not (math.isfinite(r.timeout_s) and r.timeout_s > 0):
        fail("run.timeout_s", "must be a finite number of seconds > 0")
    if a.kv_heads >= 1 and a.heads % a.kv_heads:
        fail("attention.heads", f"must be a multiple of attention.kv_heads = {a.kv_heads}")
    if a.window_size is not None and a.window_size < 0:
        fail("attention.window_size", "must be >= 0 (leave it out for no window)")
    if not a.strategies:
        fail("attention.strategies", f"must name at least one of {', '.join(map(repr, STRATEGIES))}")
    for name in a.strategies:
        if name not in STRATEGIES:
            fail("attention.strategies", f"unknown strategy {name!r}; allowed: {', '.join(map(repr, STRATEGIES))}")
    if len(set(a.strategies)) != len(a.strategies):
        fail("attention.strategies", "names a strategy twice")
    if c.rtol is not None and not (math.isfinite(c.rtol) and c.rtol > 0):
        fail("check.rtol", "must be a finite number > 0 (leave it out for the per-dtype default)")
    if r.backend == "nccl" and r.device == "cpu":
        fail("run.backend", "nccl needs run.device = 'cuda' (or 'auto' on a GPU machine)")
    if r.group == "mpi" and (r.device == "cuda" or r.backend == "nccl"):
        fail("run.group", "the mpi4py group moves CPU tensors only: use run.device = 'cpu', run.backend = 'gloo'")
    if r.world_size and a.seq_len < r.world_size:
        fail("attention.seq_len", f"must be >= run.world_size = {r.world_size} (every rank needs tokens)")
    if r.world_size and c.seq_len < 2 * r.world_size:
        fail("check.seq_len", f"must be >= 2 * run.world_size = {2 * r.world_size}")
    sv = cfg.serve
    for key, val, low in (
        ("serve.capacity_tokens", sv.capacity_tokens, 1), ("serve.block_size", sv.block_size, 1),
        ("serve.session_slots", sv.session_slots, 1), ("serve.max_batch", sv.max_batch, 1),
        ("serve.max_sessions", sv.max_sessions, 1), ("serve.max_request_bytes", sv.max_request_bytes, 1024),
    ):
        if val < low:
            fail(key, f"must be >= {low}")
    for key, val in (("serve.port", sv.port), ("serve.tensor_port", sv.tensor_port)):
        if not 0 <= val <= 65535:
            fail(key, "must be 0 (a free port) .. 65535")
    if not sv.host.strip():
        fail("serve.host", "must name an address, e.g. '127.0.0.1'")
    if not (math.isfinite(sv.batch_window_ms) and 0 <= sv.batch_window_ms <= 1000):
        fail("serve.batch_window_ms", "must be 0 .. 1000 milliseconds")
    if not (math.isfinite(sv.timeout_s) and sv.timeout_s >= 1):
        fail("serve.timeout_s", "must be a finite number of seconds >= 1")
    if r.out is not None and not r.out.strip():
        fail("run.out", "must name a directory (leave it out for seqpar-out/<config name>)")
    return problems


def resolve_world_size(cfg: Config, launched: int | None, launcher: str | None, spawn_default: int) -> int:
    """The job's world size: under a launcher the launcher's, unless the user set ``run.world_size`` (flag or
    file) to something else, which is a :class:`ConfigError` naming where that value came from; spawning
    locally ``run.world_size``, or ``spawn_default`` for 0."""
    w = cfg.run.world_size
    if launched is not None:
        if w not in (0, launched):
            where = cfg.origin("run.world_size")
            how = "--world-size" if where == "command line" else "run.world_size"
            raise ConfigError(
                f"{where}: run.world_size = {w}, but {launcher or 'the launcher'} started {launched} ranks "
                f"(drop {how} to take the launcher's, or start {w} ranks)"
            )
        w = launched
    elif w == 0:
        w = spawn_default
    where = cfg.origin("run.world_size") if cfg.run.world_size else "the ranks started"
    a, c = cfg.attention, cfg.check
    if a.seq_len < w:
        raise ConfigError(f"{cfg.origin('attention.seq_len')}: attention.seq_len = {a.seq_len}: must be >= the "
                          f"world size {w} ({where}): every rank needs tokens")
    if c.seq_len < 2 * w:
        raise ConfigError(f"{cfg.origin('check.seq_len')}: check.seq_len = {c.seq_len}: must be >= 2 * the world "
                          f"size {w} ({where})")
    return w


def parse_override(item: str) -> tuple[str, Any]:
    """``"attention.heads=8"`` -> ``("attention.heads", 8)``; values are TOML (bare words are strings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command line: --set {item!r}: expected SECTION.KEY=VALUE, e.g. attention.heads=8")
    try:
        val = _toml().loads(f"v = {raw}")["v"]
    except Exception:
        val = raw  # a bare word: attention.dtype=bfloat16
    return key.strip(), val
