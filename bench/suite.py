"""Two suites, run in-process, under the marker's scopes and under pytest-forked.

One of trivial tests; one whose tests each use a session, a module and a
function fixture and ``tmp_path``.

Each configuration runs as ``python -m pytest -q -p no:cacheprovider`` in the
benchmark's own environment (see ``bench/_venv.py``), timed three ways: the
time pytest reports, the time its test phase takes (collection left out, as a
conftest in the suite measures it), and the wall clock. A configuration that
fails is reported with the last lines of its output instead of stopping the
benchmark.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import _venv
from bench._common import Row, fmt_ratio, fmt_seconds, last_lines, median, progress, table

PER_MODULE = 50
OVERHEAD_TARGET_MS = 0.5
FORKED_TARGET = 10.0


@dataclass(frozen=True)
class Config:
    """One way of running the suite."""

    key: str
    label: str
    marker: str  # the decorator line above each test, or ""
    args: tuple[str, ...] = ()
    once: bool = False  # too slow to repeat


CONFIGS = (
    Config("inproc", "in-process (no marker)", ""),
    Config("module", "@pytest.mark.subprocess (module scope)", "@pytest.mark.subprocess"),
    Config(
        "session",
        '@pytest.mark.subprocess(scope="session")',
        '@pytest.mark.subprocess(scope="session")',
    ),
    Config(
        "function",
        '@pytest.mark.subprocess(scope="function")',
        '@pytest.mark.subprocess(scope="function")',
        once=True,
    ),
    Config("forked", "pytest-forked (--forked)", "", ("--forked",)),
)


# How a run is timed: what pytest reports, its test phase alone, the wall clock.
MEASURES = ("pytest", "tests", "wall")
# Also kept: the session, from its start to the end of pytest_unconfigure (so
# closing the workers is in), to the microsecond where pytest reports 10 ms.
ALL_MEASURES = (*MEASURES, "session")


@dataclass
class Result:
    """The runs of one configuration: times in seconds by measure, or why it failed."""

    times: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in ALL_MEASURES})
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times["pytest"])

    def median(self, measure: str) -> float:
        return median(self.times[measure])


# Timing the test phase from inside pytest leaves collection out: it costs the
# same in every configuration, and its noise would swamp a per-test figure.
CONFTEST = """\
import time

import pytest

_session_start = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _session_start.append(time.perf_counter())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    start = time.perf_counter()
    yield
    print(f"\\nbench-test-phase: {time.perf_counter() - start:.6f}")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session_start:
        print(f"\\nbench-session: {time.perf_counter() - _session_start[0]:.6f}")
"""


# The fixture suite's tests each use a fixture of each scope, and tmp_path.
FIXTURES = """

@pytest.fixture(scope="session")
def session_resource():
    yield {"connections": 0}


@pytest.fixture(scope="module")
def module_resource(session_resource):
    session_resource["connections"] += 1
    yield [session_resource]


@pytest.fixture
def function_resource(module_resource):
    return len(module_resource)
"""
FIXTURE_TEST_ARGS = "session_resource, module_resource, function_resource, tmp_path"


def write_suite(directory: Path, marker: str, tests: int, fixtures: bool = False) -> None:
    """``tests`` tests, ``PER_MODULE`` to a module, each under ``marker``.

    The tests are trivial, or with ``fixtures`` use a fixture of each scope and tmp_path.
    """
    directory.mkdir(parents=True)
    (directory / "pytest.ini").write_text("[pytest]\n")
    (directory / "conftest.py").write_text(CONFTEST + (FIXTURES if fixtures else ""))
    args = FIXTURE_TEST_ARGS if fixtures else ""
    for first in range(0, tests, PER_MODULE):
        lines = ["import pytest", ""]
        for i in range(first, min(first + PER_MODULE, tests)):
            lines += ["", *([marker] if marker else []), f"def test_{i:04d}({args}):"]
            lines += [f"    i = {i}", "    assert i + 1 == i + 1", ""]
        name = f"test_mod_{first // PER_MODULE:02d}.py"
        (directory / name).write_text("\n".join(lines))


_SUMMARY = re.compile(r"(\d+) passed.* in (\d+(?:\.\d+)?)s")
_TEST_PHASE = re.compile(r"^bench-test-phase: (\d+\.\d+)$", re.MULTILINE)
_SESSION = re.compile(r"^bench-session: (\d+\.\d+)$", re.MULTILINE)


def run_pytest(
    python: Path, directory: Path, args: tuple[str, ...], env: dict[str, str], timeout: float
) -> tuple[float, str, int]:
    """Run pytest in ``directory``; return (wall seconds, output, exit code or -1 on timeout).

    Interrupted (Ctrl-C, or SIGTERM, which ``run.py`` turns into an
    exception), pytest and everything in its session are killed before the
    exception goes on; killed outright, this process takes pytest with it on
    Linux, and pytest's own children see their parent go.
    """
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    # Output to a file, not a pipe: a straggling grandchild cannot block the read.
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_DIE_WITH_PARENT,
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = -1
        except BaseException:
            _kill_group(proc)
            raise
        wall = time.perf_counter() - start
        out.seek(0)
        return wall, out.read().decode("utf-8", "replace"), code


def _death_signal() -> Callable[[], None] | None:
    """A function for a child to call before exec, so it is killed when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the call above
            os._exit(1)

    return die_with_parent


_PR_SET_PDEATHSIG = 1
_DIE_WITH_PARENT = _death_signal()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill pytest and whatever it started in its session (workers also watch their parent)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, OSError):  # no process groups, or already gone
        proc.kill()
    proc.wait()


def measure(
    config: Config,
    python: Path,
    directory: Path,
    env: dict[str, str],
    tests: int,
    into: Result,
    extra: tuple[str, ...] = (),
) -> None:
    """Run ``config`` once (with ``extra`` arguments) and add its times to ``into``."""
    timeout = 120.0 + tests * 1.0
    wall, output, code = run_pytest(python, directory, config.args + extra, env, timeout)
    if code == -1:
        into.error = f"timed out after {timeout:.0f} s: {last_lines(output)}"
        return
    # pytest's summary line, then the session's time printed at unconfigure.
    summary = _SUMMARY.search("\n".join(output.strip().splitlines()[-3:]))
    # The last ones: pytest's own (the controller's, under xdist) come at the end.
    phases, sessions = _TEST_PHASE.findall(output), _SESSION.findall(output)
    if code != 0 or summary is None or not (phases and sessions) or int(summary.group(1)) != tests:
        into.error = f"exit code {code}: {last_lines(output)}"
        return
    into.times["pytest"].append(float(summary.group(2)))
    into.times["tests"].append(float(phases[-1]))
    into.times["wall"].append(wall)
    into.times["session"].append(float(sessions[-1]))


def _environment() -> tuple[Path, dict[str, str], str]:
    """The python to run pytest with, its environment, and a line describing it."""
    # Bytecode is written, so that the untimed first run leaves pytest's cache
    # of rewritten test modules behind, as a developer's machine has it.
    dropped = {"PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONDEVMODE", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    try:
        python = _venv.ensure()
    except _venv.EnvError as exc:
        python = Path(sys.executable)
        note = f"bench/.venv-bench unavailable ({exc}); using the running interpreter"
    else:
        env.pop("PYTHONPATH", None)  # the environment is self-contained
        note = "bench/.venv-bench"
    return python, env, f"{note}: {_venv.describe(python)}"


def run(quick: bool) -> str:
    """Run the trivial suite and the fixture suite in every configuration; return the reports."""
    return "\n\n".join(run_kind(quick, fixtures) for fixtures in (False, True))


def run_kind(quick: bool, fixtures: bool) -> str:
    """Run one suite in every configuration and return its report."""
    tests = 200 if quick else 1000
    repeats = 1 if quick else 5
    python, env, about = _environment()
    results = {c.key: Result() for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="pytest_subproc-bench-suite-") as tmp:
        dirs: dict[str, Path] = {}
        for config in CONFIGS:
            directory = Path(tmp) / (config.key if config.marker else "plain")
            if not directory.exists():
                write_suite(directory, config.marker, tests, fixtures)
                # Untimed: pytest writes the assertion-rewritten modules' cache here.
                run_pytest(python, directory, ("--collect-only",), env, 300)
            dirs[config.key] = directory
        for rep in range(repeats):
            for config in CONFIGS:
                result = results[config.key]
                if result.error or (config.once and rep):
                    continue
                progress(f"suite: {config.label}, {tests} tests, run {rep + 1} of {repeats}")
                measure(config, python, dirs[config.key], env, tests, result)
    kind = (
        "tests using a session, a module and a function fixture and tmp_path"
        if fixtures
        else "trivial tests"
    )
    head = (
        f"Suite: {tests} {kind}, {PER_MODULE} per module, {repeats} round(s); overheads "
        f"are medians of each run less the in-process run of its round "
        f"(function scope: 1)\n{about}"
    )
    return f"{head}\n{_times(results, tests)}\n\n{_ratios(results, tests)}"


def _per_test_ms(seconds: float, tests: int) -> str:
    return f"{seconds / tests * 1e3:.3f} ms"


def _overhead(results: dict[str, Result], key: str, tests: int, measure: str) -> float | None:
    """Milliseconds per test over the in-process run, or None if either failed.

    Each run is set against the in-process run of the same round, and the
    median of those differences taken: the machine's load drifts between
    rounds, and pairing cancels the drift.
    """
    base, this = results["inproc"], results[key]
    if not (base.ok and this.ok):
        return None
    pairs = zip(this.times[measure], base.times[measure])
    return median([a - b for a, b in pairs]) / tests * 1e3


def _times(results: dict[str, Result], tests: int) -> str:
    rows = []
    for config in CONFIGS:
        result = results[config.key]
        if not result.ok:
            rows.append(Row((config.label, f"failed: {result.error}")))
            continue
        over = [_overhead(results, config.key, tests, m) for m in MEASURES]
        rows.append(
            Row(
                (
                    config.label,
                    *(fmt_seconds(result.median(m)) for m in MEASURES),
                    _per_test_ms(result.median("pytest"), tests),
                    *("-" if config.key == "inproc" or o is None else f"{o:+.3f} ms" for o in over),
                )
            )
        )
    headers = (
        "configuration",
        "pytest time",
        "test phase",
        "wall clock",
        "per test",
        "over in-process (pytest)",
        "(test phase)",
        "(wall)",
    )
    return table(headers, rows)


def _speedup(results: dict[str, Result], key: str, tests: int, measure: str) -> float | None:
    """How many times less per-test overhead ``key`` has than --forked."""
    ours = _overhead(results, key, tests, measure)
    forked = _overhead(results, "forked", tests, measure)
    if ours is None or forked is None:
        return None
    return math.inf if ours <= 0 else forked / ours


def _ratios(results: dict[str, Result], tests: int) -> str:
    rows = []
    for key in ("module", "session", "function"):
        ratios = [_speedup(results, key, tests, m) for m in MEASURES]
        target = f">= {FORKED_TARGET:.0f}x" if key != "function" else ""
        met = None if key == "function" or ratios[0] is None else ratios[0] >= FORKED_TARGET
        rows.append(
            Row(
                (
                    f"--forked overhead / {key} scope overhead",
                    *(fmt_ratio(r) for r in ratios),
                    target,
                ),
                met,
            )
        )
    for key in ("module", "session"):
        over = [_overhead(results, key, tests, m) for m in MEASURES]
        rows.append(
            Row(
                (
                    f"{key} scope overhead per test",
                    *("n/a" if o is None else f"{o:.3f} ms" for o in over),
                    f"< {OVERHEAD_TARGET_MS} ms",
                ),
                None if over[0] is None else over[0] < OVERHEAD_TARGET_MS,
            )
        )
    headers = (
        "comparison (per-test overhead over in-process)",
        "pytest time",
        "test phase",
        "wall",
        "target",
    )
    return table(headers, rows)
