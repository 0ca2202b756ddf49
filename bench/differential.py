"""Run a third-party project's test suite in-process and under ``--subprocess``; show what differs.

    python -m bench.differential pluggy==1.7.0 --tests testing --path src
    python -m bench.differential jinja2==3.1.6 --tests tests --path src --scopes module

It downloads the project's sdist, unpacks it, makes a virtual environment
(cached in ``bench/.venv-diff``) holding pytest, this package and the
requirements named with ``--requires``, then runs the suite once in-process
and once under ``--subprocess`` for each scope, with a small plugin that
records each test's outcome and exception type. The tests whose outcome
differs are printed, grouped by how they differ. The exit code is 1 if any
test differs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from bench import _venv
from bench._common import last_lines, progress

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv-diff"
BASE_ARGS = ("-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "_record_outcomes")
SCOPES = ("module", "session", "function")

# Loaded in each run with -p: one JSON line per test, written at its last report.
RECORDER = """\
import json, os

_SEEN = {}

def _kind(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.partition(":")[0].split("\\n")[0].strip()
    if report.skipped:
        return "skip"
    return type(report.longrepr).__name__ if report.longrepr else ""

def pytest_runtest_logreport(report):
    outcome = report.outcome
    if report.when != "call" and outcome == "passed":
        outcome = None
    if report.when in ("setup", "teardown") and report.failed:
        outcome = "error"
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    if outcome is None and report.nodeid in _SEEN:
        return
    old = _SEEN.get(report.nodeid)
    if old is not None and old[0] in ("failed", "error") and outcome == "passed":
        return
    _SEEN[report.nodeid] = (outcome or "passed", _kind(report) if outcome else "")

def pytest_sessionfinish(session):
    with open(os.environ["RECORD_OUTCOMES_TO"], "w") as f:
        for nodeid, (outcome, kind) in sorted(_SEEN.items()):
            f.write(json.dumps([nodeid, outcome, kind]) + "\\n")
"""


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(requires: list[str]) -> Path:
    """The harness's environment: pytest, this package (from the working tree), requirements."""
    python = _python()
    if not python.exists():
        progress(f"making {VENV.relative_to(ROOT)}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    progress("installing pytest, this package and the requirements")
    with tempfile.TemporaryDirectory(prefix="pytest_subproc-diff-src-") as tmp:
        source = _venv._copy_source(Path(tmp))  # a build leaves nothing in the repository
        pip = [str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", "pytest", *requires], check=True)
        subprocess.run([*pip, str(source)], check=True)
    return python


def fetch(requirement: str, into: Path) -> Path:
    """Download and unpack the project's sdist; return its top directory."""
    progress(f"downloading the sdist of {requirement}")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, "-d", str(into), requirement], check=True)
    archive = next(p for p in into.iterdir() if p.suffix in (".gz", ".zip"))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(into)
    else:
        with tarfile.open(archive) as tarred:
            tarred.extractall(into, filter="data")
    return next(p for p in into.iterdir() if p.is_dir())


def run_suite(
    python: Path, project: Path, tests: str, path: str, record: Path, extra: tuple[str, ...]
) -> tuple[dict[str, tuple[str, str]], float]:
    """Run the suite once; return {nodeid: (outcome, exception type)} and the wall time."""
    out = record / f"outcomes-{len(list(record.iterdir()))}.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(project / path), str(record)])
    env["RECORD_OUTCOMES_TO"] = str(out)
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [str(python), "-m", "pytest", *BASE_ARGS, *extra, tests]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not out.exists():
        what = " ".join(extra) or "in-process"
        raise RuntimeError(f"{what}: no outcomes\n{last_lines(done.stdout)}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {nodeid: (outcome, kind) for nodeid, outcome, kind in rows}, wall


def differences(
    base: dict[str, tuple[str, str]], other: dict[str, tuple[str, str]]
) -> dict[str, list[str]]:
    """The differing tests, grouped by 'in-process -> isolated (exception type)'."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for nodeid in sorted(base.keys() | other.keys()):
        a, b = base.get(nodeid, ("missing", "")), other.get(nodeid, ("missing", ""))
        if a[0] != b[0]:
            groups[f"{a[0]} -> {b[0]} ({b[1] or a[1]})"].append(nodeid)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("requirement", help="the project and version, e.g. pluggy==1.7.0")
    parser.add_argument("--tests", default="tests", help="the test path in the sdist")
    parser.add_argument("--path", default=".", help="what to put on sys.path (e.g. src)")
    parser.add_argument("--requires", nargs="*", default=[], help="test requirements")
    parser.add_argument("--scopes", nargs="*", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--pytest-args", default="", help="more pytest arguments, one string")
    parser.add_argument(
        "--install",
        action="store_true",
        help="install the project itself (its tests read its metadata)",
    )
    args = parser.parse_args(argv)
    python = ensure_venv(args.requires)
    extra = tuple(args.pytest_args.split())
    failed = False
    with tempfile.TemporaryDirectory(prefix="pytest_subproc-diff-") as tmp:
        project = fetch(args.requirement, Path(tmp) / "sdist")
        if args.install:
            pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall"]
            subprocess.run([*pip, str(project)], check=True)
        record = Path(tmp) / "record"
        record.mkdir()
        (record / "_record_outcomes.py").write_text(RECORDER)
        progress("running in-process")
        base, base_wall = run_suite(python, project, args.tests, args.path, record, extra)
        print(f"{args.requirement}: {len(base)} tests, {base_wall:.1f} s in-process")
        if not base:
            return 2  # nothing ran: nothing to compare
        for scope in args.scopes:
            progress(f"running under --subprocess --subprocess-scope={scope}")
            isolated, wall = run_suite(
                python, project, args.tests, args.path, record,
                (*extra, "--subprocess", f"--subprocess-scope={scope}"),
            )  # fmt: skip
            groups = differences(base, isolated)
            count = sum(len(v) for v in groups.values())
            failed = failed or count > 0
            over = (wall - base_wall) / len(base) * 1e3
            print(f"  {scope} scope: {count} differing tests, {wall:.1f} s ({over:+.2f} ms a test)")
            for group, nodeids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                print(f"    {len(nodeids):5d}  {group}")
                for nodeid in nodeids[:5]:
                    print(f"           {nodeid}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
