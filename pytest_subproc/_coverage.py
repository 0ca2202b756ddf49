"""Coverage in the pytest process (runs there): have the workers measure as this process does.

Its peer in the worker is ``_worker_coverage``. When coverage.py measures
pytest's process (pytest-cov's ``--cov``, ``coverage run -m pytest``, or a
process started measuring by coverage.py's subprocess support), each
template is told that process's configuration in its environment, and every
worker forked from it writes a parallel data file beside this process's own,
under a name of this run's. pytest-cov combines those files with its own
before it reports; after a ``coverage run``, what is still there when pytest
ends is combined into this process's data, so its report counts the workers'
lines without a ``coverage combine``.

Nothing here imports coverage.py unless this process has imported it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import secrets
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

from pytest_subproc import _worker_coverage

if TYPE_CHECKING:
    import pytest

# What starts coverage.py (or pytest-cov before version 7) in a new Python
# process. The template measures as this process does instead, and only so.
_STARTUP = (
    "COVERAGE_PROCESS_START",
    "COVERAGE_PROCESS_CONFIG",
    "COV_CORE_SOURCE",
    "COV_CORE_CONFIG",
    "COV_CORE_DATAFILE",
    "COV_CORE_BRANCH",
    "COV_CORE_CONTEXT",
)
# Warnings that pytest's process gives once for the run: each worker would
# repeat them in its tests' output.
_QUIET = [
    "module-not-imported",
    "module-not-measured",
    "no-data-collected",
    "already-imported",
    "include-ignored",
]
# Names this process's workers' data files, so that only those are combined here.
_RUN = secrets.token_hex(4)
# What each template is told, by the Coverage measuring this process: made once,
# so every worker writes where the first was told to.
_SPECS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_BASES: set[str] = set()  # the start of the names of the workers' data files


def measuring() -> Optional[Any]:
    """The coverage.Coverage measuring this process, or None."""
    coverage = sys.modules.get("coverage")
    current = getattr(getattr(coverage, "Coverage", None), "current", None)
    return None if current is None else current()


def template_env(env: dict[str, str]) -> dict[str, str]:
    """The environment to start a template in: measured as this process is, by nothing else."""
    env = {name: value for name, value in env.items() if name not in _STARTUP}
    cov = measuring()
    if cov is not None:
        env[_worker_coverage.ENV] = _spec(cov)
    return env


def _spec(cov: Any) -> str:
    """What a template is told: how ``cov`` measures, and where it started."""
    spec = _SPECS.get(cov)
    if spec is None:
        # Made when the first template starts: the cwd is then the one
        # measuring started in, which relative paths in its configuration
        # are read against (unless a test left it moved, which pytest's
        # monkeypatch.chdir and tmp_path do not).
        base = f"{os.path.abspath(cov.config.data_file)}.pytest_subproc-{_RUN}"
        config = {name: value for name, value in vars(cov.config).items() if name[0] != "_"}
        config.update(
            data_file=base,
            parallel=True,
            # Its fork and _exit patches would take the measuring from the
            # worker; its subprocess patch is in the workers' environment already.
            patch=[],
            disable_warnings=[*cov.config.disable_warnings, *_QUIET],
        )
        spec = _SPECS[cov] = json.dumps({"config": config, "cwd": os.getcwd()})
        _BASES.add(base)
    return spec


def worker_args(config: pytest.Config) -> tuple[str, ...]:
    """Arguments for a worker's pytest, which must not measure on its own with pytest-cov."""
    # Its own measuring would erase the data files of the workers before it,
    # and leave its data where nothing combines it.
    return ("--no-cov",) if _pytest_cov(config) else ()


def starts_later(early_config: pytest.Config) -> bool:
    """Whether pytest-cov, asked to measure, has yet to start measuring this process.

    It starts as pytest loads its conftest modules: a template started
    before would not know how to measure.
    """
    known = early_config.known_args_namespace
    asked = bool(getattr(known, "cov_source", None)) and not getattr(known, "no_cov", False)
    return asked and measuring() is None


def _pytest_cov(config: pytest.Config) -> bool:
    """Whether pytest-cov was asked to measure (--cov)."""
    return bool(getattr(config.option, "cov_source", None)) and not getattr(
        config.option, "no_cov", False
    )


def combine_leftovers(config: pytest.Config) -> None:
    """Combine the workers' data into this process's, unless pytest-cov does.

    pytest-cov combines them with its own before it reports. Under
    ``coverage run`` (or coverage.py's subprocess measuring) nothing would:
    combined here, they are counted in the data file this process writes
    when it exits, parallel or not.
    """
    if _pytest_cov(config):
        return
    files = sorted(f for base in _BASES for f in glob.glob(glob.escape(base) + ".*"))
    cov = measuring()
    if not files or cov is None:
        return
    # Not the "Combined 2 files" that `coverage combine` prints: the user
    # combined nothing. A file that could not be read is named, not raised.
    quiet = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            cov.combine(files)
    for warning in caught:
        print(f"pytest_subproc: {warning.message}", file=sys.stderr)
