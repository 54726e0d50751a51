"""Docker cannot run here: check that the Dockerfile agrees with pyproject.toml (base image, extras, Python,
command) and that .dockerignore keeps what the build copies."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from seqpar_tools.config import _toml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = _toml().loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_image_is_an_official_pytorch_cuda_runtime_satisfying_the_torch_requirement():
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", froms[0])
    assert m, froms[0]
    torch_req = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert Version(m.group(1)) in SpecifierSet(torch_req[len("torch"):]), (m.group(1), torch_req)


def test_python_check_matches_requires_python():
    m = re.search(r"sys\.version_info >= \((\d+), (\d+)\)", DOCKERFILE)
    assert m, "the Dockerfile asserts the image's Python version"
    assert PYPROJECT["project"]["requires-python"] == f">={m.group(1)}.{m.group(2)}"


def test_installs_seqpar_with_extras_that_exist():
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    m = re.search(r'pip install [^"]*"\.\[([a-z,]+)\]"', runs)
    assert m, runs
    extras = m.group(1).split(",")
    assert "mpi" in extras
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])


def test_default_command_is_seqpar_info_and_seqpar_is_a_console_script():
    cmds = [rest for op, rest in instructions() if op == "CMD"]
    assert cmds == ['["seqpar", "info"]']
    assert PYPROJECT["project"]["scripts"]["seqpar"] == "seqpar_tools.cli:main"


def test_copied_paths_exist_and_are_not_docker_ignored():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    sources = []
    for op, rest in instructions():
        if op == "COPY":
            sources += rest.split()[:-1]
    assert "pyproject.toml" in sources and PYPROJECT["project"]["readme"] in sources
    assert "seqpar" in sources and "seqpar_tools" in sources  # the library and the tool layer (the console script)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not any(fnmatch.fnmatch(src, pat) or src == pat.rstrip("/") for pat in ignored), src
