"""Run third-party test suites in-process and under ``--subprocess``, and compare each test.

    python tools/realsuites.py                       # the default suites, every scope
    python tools/realsuites.py pluggy==1.7.0 --scopes module
    python tools/realsuites.py --list                # the suites it knows how to run

For each suite it downloads the sdist from the package index, makes a virtual
environment with this project, pytest and the suite's test requirements, runs
the suite once in-process and once under ``--subprocess`` for each scope, with
a small plugin that records every test's final outcome, and prints the tests
whose outcome differs, grouped by exception type. The exit code is 1 if any
test differs. Nothing here runs in the project's test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCOPES = ("module", "session", "function")


@dataclass(frozen=True)
class Suite:
    """How to run one project's tests from its sdist."""

    name: str
    version: str
    tests: str  # the test folder in the sdist
    path: str = "."  # put on PYTHONPATH (the sdist's src folder, say)
    requires: tuple[str, ...] = ()
    args: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


# The suites and versions of the real-suite findings.
SUITES = {
    s.name: s
    for s in (
        Suite("pluggy", "1.7.0", "testing", "src"),
        Suite("click", "8.5.1", "tests", "src"),
        Suite("attrs", "26.1.0", "tests", "src", ("hypothesis", "pympler", "cloudpickle")),
        Suite("jinja2", "3.1.6", "tests", "src", ("markupsafe", "trio")),
        Suite("packaging", "26.4", "tests", "src"),
        Suite("iniconfig", "2.3.1", "testing", "src"),
        Suite("six", "1.17.0", "test_six.py"),
        Suite("toolz", "1.2.0", "toolz/tests"),
    )
}
DEFAULT = ("pluggy", "click", "attrs", "jinja2")
BASE_REQUIRES = ("pytest", "hypothesis", "pretend", "tomli_w", "freezegun", "sortedcontainers")

# Loaded into each run with -p: one JSON line per test, its final outcome.
RECORDER = """
import json, os

_OUT = open(os.environ["OUTCOMES_FILE"], "w", buffering=1)
_seen = {}


def _what(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:300] if crash.message else ""
    return str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""


def pytest_runtest_logreport(report):
    outcome = _seen.get(report.nodeid)
    if report.failed:
        now = ("failed" if report.when == "call" else "error", _what(report))
    elif report.skipped:
        now = ("xfailed" if hasattr(report, "wasxfail") else "skipped", _what(report))
    elif report.when == "call":
        now = ("xpassed" if hasattr(report, "wasxfail") else "passed", "")
    else:
        now = None
    if now is not None and (outcome is None or outcome[0] in ("passed", "xpassed")):
        _seen[report.nodeid] = now
    if report.when == "teardown":
        kind, what = _seen.pop(report.nodeid, ("passed", ""))
        _OUT.write(json.dumps({"id": report.nodeid, "outcome": kind, "what": what}) + "\\n")
"""


@dataclass
class Run:
    """The recorded outcomes of one run of a suite."""

    label: str
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)
    seconds: float = 0.0


def _venv(work: Path, suite: Suite) -> Path:
    """A virtual environment with this project, pytest and the suite's requirements."""
    env = work / f"venv-{suite.name}"
    python = env / "bin" / "python"
    if not python.exists():
        venv.create(env, with_pip=True)
        packages = [str(ROOT), *BASE_REQUIRES, *suite.requires]
        _pip(python, "install", "-qq", *packages)
        _pip(python, "install", "-qq", "--no-deps", suite.spec)
    return python


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", *args], check=True)


def _sources(work: Path, python: Path, suite: Suite) -> Path:
    """The suite's sdist, downloaded and unpacked once."""
    tree = work / f"{suite.name}-{suite.version}"
    if not tree.exists():
        with tempfile.TemporaryDirectory() as download:
            _pip(python, "download", "-qq", "--no-deps", "--no-binary", ":all:",
                 "-d", download, suite.spec)  # fmt: skip
            (archive,) = Path(download).iterdir()
            with tarfile.open(archive) as tar:
                _extract(tar, work)
            unpacked = next(p for p in work.iterdir() if p.name.lower() == tree.name.lower())
            unpacked.rename(tree)
    return tree


def _extract(tar: tarfile.TarFile, into: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # refuses links and paths out of the folder
        tar.extractall(into, filter="data")
    else:  # pragma: no cover - Pythons before the filters: sdists from the index only
        tar.extractall(into)


def _run(python: Path, tree: Path, suite: Suite, label: str, extra: list[str]) -> Run:
    """Run the suite once and read back each test's outcome."""
    record = tree / ".outcomes" / f"{label}.jsonl"
    record.parent.mkdir(exist_ok=True)
    (tree / ".outcomes" / "record_outcomes.py").write_text(RECORDER)
    paths = [str(tree / ".outcomes"), str(tree / suite.path)]
    env = {
        **os.environ,
        "OUTCOMES_FILE": str(record),
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    cmd += ["-p", "record_outcomes", *suite.args, *extra, suite.tests]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Run(label, seconds=time.perf_counter() - started)
    for line in record.read_text().splitlines():
        row = json.loads(line)
        run.outcomes[row["id"]] = (row["outcome"], row["what"])
    return run


def _differences(base: Run, other: Run) -> dict[str, list[str]]:
    """Tests whose outcome differs, grouped by what the other run said (its exception type)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for nodeid in sorted(base.outcomes.keys() | other.outcomes.keys()):
        was = base.outcomes.get(nodeid, ("missing", ""))
        now = other.outcomes.get(nodeid, ("missing", ""))
        if was[0] != now[0]:
            kind = now[1].partition(":")[0] or now[0]
            groups[kind].append(f"{nodeid}: {was[0]} -> {now[0]} {now[1][:160]}")
    return groups


def compare(work: Path, suite: Suite, scopes: list[str]) -> int:
    """Run one suite every way asked and print what differs; return how many tests differ."""
    python = _venv(work, suite)
    tree = _sources(work, python, suite)
    base = _run(python, tree, suite, "in-process", [])
    print(f"{suite.spec}: {len(base.outcomes)} tests in-process ({base.seconds:.1f} s)")
    differing = 0
    for scope in scopes:
        other = _run(python, tree, suite, scope, ["--subprocess", f"--subprocess-scope={scope}"])
        groups = _differences(base, other)
        count = sum(map(len, groups.values()))
        differing += count
        print(f"  {scope} scope: {count} differ ({other.seconds:.1f} s)")
        for kind, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            print(f"    {kind}: {len(rows)}")
            for row in rows[:20]:
                print(f"      {row}")
            if len(rows) > 20:
                print(f"      ... and {len(rows) - 20} more")
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help="suite names (default: %(default)s)")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated scopes")
    parser.add_argument("--work", type=Path, help="where venvs and sources go (kept)")
    parser.add_argument("--list", action="store_true", help="list the known suites and exit")
    args = parser.parse_args(argv)
    if args.list:
        for suite in SUITES.values():
            print(f"{suite.spec}  tests: {suite.tests}  path: {suite.path}")
        return 0
    names = [s.partition("==")[0] for s in args.suites] or list(DEFAULT)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; --list shows the known ones")
    scopes = [s for s in args.scopes.split(",") if s]
    work = args.work or Path(tempfile.mkdtemp(prefix="realsuites-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")
    differing = sum(compare(work, SUITES[name], scopes) for name in names)
    print(f"\n{differing} test outcomes differ in all")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
