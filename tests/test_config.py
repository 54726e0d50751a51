"""Configs: the shipped files load, the default file equals the built-in default, and every bad value is an
error naming the key and the file (or the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqpar_tools.config import Config, ConfigError, load_config, parse_override, resolve_world_size

ROOT = Path(__file__).resolve().parents[1]
# the job configs (configs/train*.toml belong to the training example and have their own schema)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.toml") if not p.name.startswith("train"))


def test_default_file_is_the_builtin_default_and_spells_every_key():
    from seqpar_tools.config import _toml

    raw = _toml().loads((ROOT / "configs" / "default.toml").read_text())
    builtin = Config().to_dict()
    # every key written out (optional keys, default None, may stay commented out)
    assert {s: {k for k, v in d.items() if v is not None} for s, d in builtin.items()} == {
        s: set(d) for s, d in raw.items()
    }
    assert load_config(ROOT / "configs" / "default.toml").to_dict() == builtin
    assert load_config(None).to_dict() == builtin


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.source == str(path)


def test_shipped_config_set():
    names = {p.name for p in CONFIGS}
    assert {"default.toml", "gpu.toml", "multinode.toml", "mpi.toml"} <= names


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("[attention]\nhead = 4\n", "attention.head", ["unknown key", "heads"]),
        ("[atention]\nheads = 4\n", "[atention]", ["unknown section"]),
        ('[attention]\nheads = "8"\n', "attention.heads", ["must be int", "str"]),
        ("[attention]\nis_causal = 1\n", "attention.is_causal", ["must be bool"]),
        ("[run]\nworld_size = true\n", "run.world_size", ["must be int"]),
        ('[attention]\nstrategies = "ring"\n', "attention.strategies", ["list"]),
        ("[attention]\nheads = 6\nkv_heads = 4\n", "attention.heads", ["multiple of attention.kv_heads = 4"]),
        ('[attention]\nstrategies = ["ring", "tree"]\n', "attention.strategies", ["'tree'", "'allgather'"]),
        ('[attention]\nlayout = "striped"\n', "attention.layout", ["'zigzag'"]),
        ('[attention]\ndtype = "fp8"\n', "attention.dtype", ["'bfloat16'"]),
        ('[run]\nbackend = "mpi"\n', "run.backend", ["'gloo'"]),
        ("[attention]\nseq_len = 0\n", "attention.seq_len", [">= 1"]),
        ("[measure]\nrepeats = 0\n", "measure.repeats", [">= 1"]),
        ('[run]\nbackend = "nccl"\ndevice = "cpu"\n', "run.backend", ["cuda"]),
        ('[run]\ngroup = "mpi"\ndevice = "cuda"\n', "run.group", ["CPU"]),
        ("[attention]\nwindow_size = -2\n", "attention.window_size", [">= 0"]),
        ("[attention\nheads = 4\n", "", ["not valid TOML"]),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, text, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    assert key in msg, msg
    for w in words:
        assert w in msg, msg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such config file"):
        load_config(tmp_path / "nope.toml")


def test_world_size_under_a_launcher_names_where_the_value_came_from(tmp_path):
    path = _write(tmp_path, "[run]\nworld_size = 4\n")
    with pytest.raises(ConfigError) as e:
        resolve_world_size(load_config(path), 2, "torchrun", 2)
    assert str(e.value).startswith(str(path)) and "run.world_size = 4" in str(e.value)
    assert "torchrun started 2 ranks" in str(e.value)
    with pytest.raises(ConfigError, match=r"^command line: run.world_size = 3.*started 2 ranks.*--world-size"):
        resolve_world_size(load_config(None, {"run.world_size": 3}), 2, "torchrun", 2)
    assert resolve_world_size(load_config(path), 4, "torchrun", 2) == 4  # equal: fine


@pytest.mark.parametrize("launched", [1, 3, 4, 7])
def test_the_launchers_world_size_wins_over_the_builtin_default(launched):
    """launch/torchrun.sh with NPROC != 2 used to fail: the built-in config fixed world_size = 2."""
    assert resolve_world_size(load_config(None), launched, "torchrun", 2) == launched
    assert resolve_world_size(load_config(ROOT / "configs" / "default.toml"), launched, "mpi", 2) == launched


def test_spawned_world_size_default_and_its_checks():
    assert resolve_world_size(load_config(None), None, None, 2) == 2
    assert resolve_world_size(load_config(None, {"run.world_size": 3}), None, None, 2) == 3
    with pytest.raises(ConfigError, match=r"^command line: check.seq_len = 7: must be >= 2 \* the world size 4"):
        resolve_world_size(load_config(None, {"check.seq_len": 7}), None, None, 4)


def test_every_bad_key_of_a_file_is_reported_at_once(tmp_path):
    path = _write(tmp_path, '[run]\ntimeout_s = -1.0\nbogus = 1\n[attention]\nheads = "8"\nlayout = "striped"\n'
                            "[measure]\nrepeats = 0\n[nope]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    for part in ("[nope]", "run.bogus", "attention.heads"):  # structural and type problems first
        assert any(part in ln and ln.startswith(str(path)) for ln in lines), (part, lines)
    path = _write(tmp_path, '[run]\ntimeout_s = -1.0\n[attention]\nlayout = "striped"\n[measure]\nrepeats = 0\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines
    for key in ("run.timeout_s = -1.0", "attention.layout = 'striped'", "measure.repeats = 0"):
        assert any(key in ln for ln in lines), (key, lines)


@pytest.mark.parametrize("key, value, words", [
    ("run.timeout_s", float("nan"), "finite"), ("run.timeout_s", float("inf"), "finite"),
    ("run.timeout_s", 0.0, "> 0"), ("check.rtol", float("nan"), "finite"), ("check.rtol", -1.0, "> 0"),
    ("attention.kv_heads", 0, ">= 1"), ("attention.head_dim", 0, ">= 1"), ("run.world_size", -1, ">= 0"),
    ("run.out", " ", "directory"),
])
def test_non_finite_and_out_of_range_values(key, value, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert str(e.value).startswith(f"command line: {key} = ") and words in str(e.value), str(e.value)


def test_default_output_directory_is_per_config(tmp_path):
    assert str(load_config(None).out_dir) == "seqpar-out/default"
    assert str(load_config(ROOT / "configs" / "mpi.toml").out_dir) == "seqpar-out/mpi"
    assert str(load_config(None, {"run.out": "x"}).out_dir) == "x"


def test_overrides_win_and_their_errors_say_command_line(tmp_path):
    path = _write(tmp_path, "[attention]\nheads = 8\nkv_heads = 2\n")
    cfg = load_config(path, {"attention.heads": 4, "measure.repeats": 5})
    assert (cfg.attention.heads, cfg.attention.kv_heads, cfg.measure.repeats) == (4, 2, 5)
    with pytest.raises(ConfigError, match=r"^command line: attention.heads = 3: must be a multiple"):
        load_config(path, {"attention.heads": 3})
    with pytest.raises(ConfigError, match=r"command line.*unknown key 'measure.repeat'"):
        load_config(path, {"measure.repeat": 5})


def test_parse_override():
    assert parse_override("attention.heads=8") == ("attention.heads", 8)
    assert parse_override("attention.dtype=bfloat16") == ("attention.dtype", "bfloat16")
    assert parse_override('attention.strategies=["ring"]') == ("attention.strategies", ["ring"])
    assert parse_override("attention.is_causal=false") == ("attention.is_causal", False)
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_override("heads")
