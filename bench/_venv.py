"""The suite benchmark's own environment, cached in ``bench/.venv-bench``.

It holds the package under test (installed from a copy of the working tree, so
the build leaves nothing in the repository), pytest-forked, pytest-xdist (for
the contention benchmark), and a pytest that pytest-forked supports. A new
environment is built in a temporary directory beside the cache and moved into
place only once complete, so an interrupted build never leaves a half-made
cache. Only ``python -m ...`` is used from it,
never its console scripts, whose first lines name the build directory.

The cache is rebuilt when the interpreter, the requirements or
``pyproject.toml`` change, and the package alone is reinstalled when its
sources change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import last_lines, progress

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = BENCH / ".venv-bench"
PACKAGE = "pytest_subproc"
# pytest-forked fails every test on pytest 9.2 ("EXITED with status 3").
REQUIREMENTS = ("pytest<9", "pytest-forked", "pytest-xdist")
STAMP = "bench-stamp.json"
PIP_TIMEOUT = 900


class EnvError(RuntimeError):
    """The benchmark environment could not be built."""


def python_in(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _source_files() -> list[Path]:
    """What a build of the package needs: the top-level files and the package itself."""
    files = [p for p in ROOT.iterdir() if p.is_file() and not p.name.startswith(".")]
    files += [
        p
        for p in (ROOT / PACKAGE).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    return sorted(files)


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _keys() -> dict[str, str]:
    env = hashlib.sha256(
        json.dumps([sys.version, sys.executable, REQUIREMENTS]).encode()
    ).hexdigest()
    pyproject = ROOT / "pyproject.toml"
    return {
        "environment": env + (_digest([pyproject]) if pyproject.exists() else ""),
        "package": _digest(_source_files()),
    }


def _read_stamp(venv: Path) -> dict[str, str]:
    try:
        data = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _copy_source(into: Path) -> Path:
    for path in _source_files():
        target = into / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return into


def _call(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=PIP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EnvError(f"{what} timed out after {PIP_TIMEOUT} s") from exc
    if done.returncode != 0:
        output = done.stdout.decode("utf-8", "replace")
        raise EnvError(f"{what} failed ({done.returncode}): {last_lines(output)}")


def _pip(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]


def ensure() -> Path:
    """Return the benchmark environment's python, building or refreshing it as needed."""
    keys = _keys()
    stamp = _read_stamp(CACHE)
    fresh = python_in(CACHE).exists() and stamp.get("environment") == keys["environment"]
    if fresh and stamp.get("package") == keys["package"]:
        return python_in(CACHE)
    with tempfile.TemporaryDirectory(prefix="pytest_subproc-bench-src-") as tmp:
        source = str(_copy_source(Path(tmp)))
        if fresh:
            progress("reinstalling the package under test in bench/.venv-bench")
            _call(_pip(python_in(CACHE), "--no-deps", "--force-reinstall", source), "pip install")
            (CACHE / STAMP).write_text(json.dumps(keys, indent=1))
        else:
            progress("building bench/.venv-bench (package under test, pytest-forked, pytest-xdist)")
            _build(source, keys)
    return python_in(CACHE)


def _build(source: str, keys: dict[str, str]) -> None:
    build = Path(tempfile.mkdtemp(prefix=f"{CACHE.name}-", dir=BENCH))
    try:
        _call([sys.executable, "-m", "venv", str(build)], "python -m venv")
        _call(_pip(python_in(build), source, *REQUIREMENTS), "pip install")
        (build / STAMP).write_text(json.dumps(keys, indent=1))
        if CACHE.exists():
            shutil.rmtree(CACHE)
        os.replace(build, CACHE)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def describe(python: Path) -> str:
    """The versions that matter in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, platform\n"
        "names = ('pytest', 'pytest-forked', 'pytest-xdist', 'pytest_subproc')\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'missing'\n"
        "print(f'Python {platform.python_version()}, ' + ', '.join(f'{n} {v(n)}' for n in names))\n"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout.strip() or last_lines(done.stderr)
