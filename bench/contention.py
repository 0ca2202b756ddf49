"""The suite benchmark under contention: quiet, beside busy loops, and under pytest-xdist.

Two suites of 50 tests to a module: the trivial tests of ``bench/suite.py``,
and tests that each use two fixtures of every scope (session, module,
function) and ``tmp_path``. Each runs in-process, under the marker's three
scopes and under pytest-forked, with the machine

* ``quiet``: left as it is;
* ``busy``: beside one busy-loop process per core, as on a shared CI runner;
* ``xdist``: under ``pytest -n <cores>``, which keeps every core busy itself.

Every configuration runs under the same load in the same round, and the order
of the configurations is reversed from one round to the next, so a drift of
the machine's load weighs on all of them alike. Each run's overhead is set
against the in-process run of its own load, suite and round; medians and
ranges are taken over the rounds. The targets are ratios to pytest-forked's
overhead in the same round: module and session scope at least 10x less,
function scope no more.

The busy loops end when told to, when this process goes (they watch a pipe
from it and their parent's pid), and after an hour in any case.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import suite
from bench._common import Row, fmt_ratio, median, progress, table
from bench.suite import CONFIGS, PER_MODULE, Config, Result

LOADS = ("quiet", "busy", "xdist")
SUITES = ("trivial", "fixtures")
# How many times less overhead than pytest-forked each scope must have.
TARGETS = {"module": 10.0, "session": 10.0, "function": 1.0}
SCOPES = tuple(TARGETS)
# The measure the targets are judged on (the session, from its start to the
# workers closed, to the microsecond), and one shown beside it (the test
# phase: collection left out, and under xdist the workers' start left in).
JUDGED, ALSO = "session", "tests"
BUSY_LIMIT = 3600.0  # seconds a busy loop runs at most, whatever happens


def cores() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# A busy loop that polls its stdin between bursts: end-of-file (the benchmark
# closed the pipe, or died) ends it, as does a new parent or the time limit.
_BUSY_LOOP = """\
import os, select, sys, time
parent, limit = os.getppid(), time.monotonic() + float(sys.argv[1])
poller = select.poll()
poller.register(0, select.POLLIN)
while not poller.poll(0) and os.getppid() == parent and time.monotonic() < limit:
    for _ in range(20000):
        pass
"""


@dataclass
class BusyShare:
    """The CPU time the busy loops of one load block had, as a share of its wall time."""

    cpu: float = 0.0
    wall: float = 0.0

    def share(self) -> float | None:
        return self.cpu / self.wall if self.wall > 0 else None


def _cpu_seconds(pid: int) -> float | None:
    """User and system time of a running process, from /proc (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def busy_loops(count: int, into: BusyShare) -> Iterator[None]:
    """Keep ``count`` busy-loop processes running for the duration of the block.

    Each is ended by closing its pipe, then killed by its pid if it has not
    gone within five seconds; none outlives the block, whatever ends it.
    """
    procs: list[subprocess.Popen[bytes]] = []
    start = time.perf_counter()
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _BUSY_LOOP, str(BUSY_LIMIT)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.2)  # under way before the first run starts
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a busy loop ended at once (exit code {proc.returncode})")
        yield
    finally:
        used = [_cpu_seconds(proc.pid) for proc in procs]
        wall = time.perf_counter() - start
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if procs and all(u is not None for u in used):
            into.cpu += sum(u for u in used if u is not None) / len(procs)
            into.wall += wall


# The fixture suite: two fixtures of each scope, yield fixtures among them,
# and tmp_path, which every test also writes to. Values are plain data, so
# they can cross to a worker by pickle where the design needs them to.
FIXTURES = """

@pytest.fixture(scope="session")
def settings():
    return {"name": "bench", "retries": 3, "levels": list(range(16))}


@pytest.fixture(scope="session")
def catalog(settings):
    items = {f"item{i}": i * settings["retries"] for i in range(64)}
    yield items
    items.clear()


@pytest.fixture(scope="module")
def table(catalog):
    return sorted(catalog.items())


@pytest.fixture(scope="module")
def index(table):
    mapping = {key: position for position, (key, _) in enumerate(table)}
    yield mapping
    mapping.clear()


@pytest.fixture
def record(table, index):
    key, value = table[len(table) // 2]
    return {"key": key, "value": value, "position": index[key]}


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("bench")
    yield path
    path.unlink()
"""


def write_fixture_suite(directory: Path, marker: str, tests: int) -> None:
    """``tests`` tests using the fixtures above, ``PER_MODULE`` to a module, under ``marker``."""
    directory.mkdir(parents=True)
    (directory / "pytest.ini").write_text("[pytest]\n")
    (directory / "conftest.py").write_text(suite.CONFTEST + FIXTURES)
    for first in range(0, tests, PER_MODULE):
        lines = ["import pytest", ""]
        for i in range(first, min(first + PER_MODULE, tests)):
            lines += ["", *([marker] if marker else [])]
            lines += [
                f"def test_{i:04d}(settings, catalog, table, index, record, scratch, tmp_path):"
            ]
            lines += [
                f"    i = {i}",
                '    assert scratch.read_text() == "bench"',
                '    (tmp_path / "output.txt").write_text(str(i))',
                '    assert record["position"] == index[record["key"]] < len(catalog)',
                '    assert len(table) == len(settings["levels"]) * 4',
                "",
            ]
        name = f"test_mod_{first // PER_MODULE:02d}.py"
        (directory / name).write_text("\n".join(lines))


WRITERS = {"trivial": suite.write_suite, "fixtures": write_fixture_suite}


def load_args(load: str) -> tuple[str, ...]:
    return ("-n", str(cores())) if load == "xdist" else ()


Key = tuple[str, str, str]  # load, suite, configuration


def run(
    quick: bool,
    loads: Sequence[str] = LOADS,
    suites: Sequence[str] = SUITES,
    rounds: int | None = None,
    tests: int | None = None,
) -> str:
    """Run every suite under every load in every configuration, and return the report."""
    tests = tests or (200 if quick else 1000)
    rounds = rounds or (2 if quick else 3)
    python, env, about = suite._environment()
    results: dict[Key, Result] = {
        (load, name, c.key): Result() for load in loads for name in suites for c in CONFIGS
    }
    busy = BusyShare()
    before = _load_average()
    with tempfile.TemporaryDirectory(prefix="pytest_subproc-bench-contention-") as tmp:
        dirs: dict[tuple[str, str], Path] = {}
        for name in suites:
            for config in CONFIGS:
                directory = Path(tmp) / f"{name}-{config.key if config.marker else 'plain'}"
                if not directory.exists():
                    WRITERS[name](directory, config.marker, tests)
                    # Untimed: pytest writes the assertion-rewritten modules' cache here.
                    suite.run_pytest(python, directory, ("--collect-only",), env, 300)
                dirs[name, config.key] = directory
        basetemp = Path(tmp) / "basetemp"
        for rnd in range(rounds):
            order = CONFIGS if rnd % 2 == 0 else tuple(reversed(CONFIGS))
            for load in loads:
                held = busy_loops(cores(), busy) if load == "busy" else contextlib.nullcontext()
                with held:
                    for name in suites:
                        for config in order:
                            result = results[load, name, config.key]
                            if result.error:
                                continue
                            progress(
                                f"contention: {load}, {name} suite, {config.label}, "
                                f"round {rnd + 1} of {rounds}"
                            )
                            # Emptied untimed: pytest would empty it in the test phase.
                            shutil.rmtree(basetemp, ignore_errors=True)
                            extra = (*load_args(load), f"--basetemp={basetemp}")
                            suite.measure(
                                config, python, dirs[name, config.key], env, tests, result, extra
                            )
    share = busy.share()
    head = (
        f"Contention: {tests} tests a suite, {PER_MODULE} per module, {rounds} round(s), "
        f"the order of the configurations reversed each round; busy: {cores()} busy-loop "
        "process(es) beside the run"
        + ("" if share is None else f" (each had {share:.0%} of a core)")
        + f"; xdist: -n {cores()}; {_loadavg(before)}.\n"
        "Times are the session's, from its start to the workers closed. An overhead is a run "
        "less the in-process run of the same load, suite and round, per test: the median, and "
        "the range over the rounds. A ratio is pytest-forked's median overhead over the "
        "configuration's (the figure a target is met by), and the range of the rounds' own "
        "ratios; the ratio by test phase leaves collection out.\n"
        f"{about}"
    )
    parts = [head]
    for name in suites:
        parts.append(_suite_table(results, loads, name, tests, rounds))
    parts.append(_targets(results, loads, suites, tests))
    return "\n\n".join(parts)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _loadavg(before: float | None) -> str:
    """The machine's load before and after: how quiet "quiet" was."""
    after = _load_average()
    if before is None or after is None:
        return "load average unknown"
    return f"1-minute load average {before:.1f} before, {after:.1f} after"


def _per_round(results: dict[Key, Result], key: Key, tests: int, measure: str) -> list[float]:
    """The configuration's overhead in each round, in ms per test; [] if either run failed."""
    base, this = results[key[0], key[1], "inproc"], results[key]
    if not (base.ok and this.ok):
        return []
    return [(a - b) / tests * 1e3 for a, b in zip(this.times[measure], base.times[measure])]


def _ratios(results: dict[Key, Result], key: Key, tests: int, measure: str) -> list[float]:
    """pytest-forked's overhead over the configuration's, in each round."""
    ours = _per_round(results, key, tests, measure)
    forked = _per_round(results, (key[0], key[1], "forked"), tests, measure)
    return [_ratio(f, o) for o, f in zip(ours, forked)]


def _ratio(forked: float, ours: float) -> float:
    return math.inf if ours <= 0 else forked / ours


def _headline(results: dict[Key, Result], key: Key, tests: int, measure: str) -> float | None:
    """pytest-forked's median overhead over the configuration's: the figure a target is met by.

    A ratio of medians, not a median of ratios: a round in which the
    configuration's overhead drowned in noise (an infinite or negative ratio)
    cannot carry it.
    """
    ours = _per_round(results, key, tests, measure)
    forked = _per_round(results, (key[0], key[1], "forked"), tests, measure)
    if not (ours and forked):
        return None
    return _ratio(median(forked), median(ours))


def _span(values: Sequence[float]) -> str:
    """Overheads in ms: the median, with the range in brackets."""
    return f"{median(values):+.3f} ms ({min(values):+.3f} to {max(values):+.3f})"


def _ratio_span(headline: float, values: Sequence[float]) -> str:
    """Ratios: the headline, with the range of the rounds' in brackets."""
    low, high = fmt_ratio(min(values)), fmt_ratio(max(values))
    return f"{fmt_ratio(headline)} ({low} to {high})"


def _row(results: dict[Key, Result], load: str, name: str, config: Config, tests: int) -> Row:
    result = results[load, name, config.key]
    if not result.ok:
        return Row((load, f"{config.label}: failed: {result.error}"))
    per_test = f"{result.median(JUDGED) / tests * 1e3:.3f} ms"
    if config.key == "inproc":
        return Row((load, config.label, per_test, "-", "-", "-", ""))
    over = _per_round(results, (load, name, config.key), tests, JUDGED)
    if config.key == "forked":
        return Row((load, config.label, per_test, _span(over), "-", "-", ""))
    key = (load, name, config.key)
    ratios, headline = _ratios(results, key, tests, JUDGED), _headline(results, key, tests, JUDGED)
    also = _headline(results, key, tests, ALSO)
    target = TARGETS[config.key]
    return Row(
        (
            load,
            config.label,
            per_test,
            _span(over) if over else "n/a",
            "n/a" if headline is None else _ratio_span(headline, ratios),
            fmt_ratio(also),
            f">= {target:.0f}x",
        ),
        None if headline is None else headline >= target,
    )


def _suite_table(
    results: dict[Key, Result], loads: Sequence[str], name: str, tests: int, rounds: int
) -> str:
    rows = [_row(results, load, name, config, tests) for load in loads for config in CONFIGS]
    headers = (
        "load",
        "configuration",
        "per test",
        "overhead per test",
        "forked's overhead / this",
        "by test phase",
        "target",
    )
    return f"The {name} suite:\n{table(headers, rows)}"


def _targets(
    results: dict[Key, Result], loads: Sequence[str], suites: Sequence[str], tests: int
) -> str:
    """Each scope's ratio under each load, and whether it meets its target."""
    rows = []
    for scope in SCOPES:
        for name in suites:
            cells = [f"{scope} scope, >= {TARGETS[scope]:.0f}x", name]
            for load in loads:
                headline = _headline(results, (load, name, scope), tests, JUDGED)
                if headline is None:
                    cells.append("n/a")
                    continue
                met = headline >= TARGETS[scope]
                cells.append(f"{fmt_ratio(headline)} {'met' if met else 'MISSED'}")
            rows.append(Row(tuple(cells)))
    headers = ("target (forked's overhead / this)", "suite", *loads)
    return f"Targets:\n{table(headers, rows)}"
