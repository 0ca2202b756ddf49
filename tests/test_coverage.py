"""Acceptance tests: coverage counts the lines that marked tests run in their workers.

With pytest-cov (``--cov``) and with ``coverage run -m pytest``, in both
start methods and in module and function scope, the report misses exactly
the lines no test ran, as it would with every test in-process, and no data
file is left that nothing will combine. A worker that crashes or times out
keeps what its earlier tests ran.

Inner runs start with plugin autoloading off, and name the plugins they use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _inner import PLUGIN
from _inner import run_inner as run

from pytest_subproc import _coverage

coverage = pytest.importorskip("coverage")
pytest.importorskip("pytest_cov")

pytestmark = pytest.mark.usefixtures("no_plugin_autoload", "unmeasured")

PYTEST_COV = ("-p", "pytest_cov.plugin")

# Line numbers matter: the reports below name them.
MYLIB = """\
def module_scoped(x):
    if x > 0:
        return "positive"
    return "not positive"


def function_scoped():
    return 42


def never_called():
    return None
"""
# Run only in workers: lines 2-3 in a module's worker, line 8 in a test's own.
# Lines 1, 7 and 11 run when the test file imports mylib.
TESTS = """
import pytest

import mylib


@pytest.mark.subprocess
def test_module_scoped():
    assert mylib.module_scoped(1) == "positive"


@pytest.mark.subprocess(scope="function")
def test_function_scoped():
    assert mylib.function_scoped() == 42
"""
# What a report says of mylib: 8 statements, 2 missed, lines 4 and 12.
MISSING = r"mylib\.py\s+8\s+2\s+75%\s+4, 12\s*$"


@pytest.fixture
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs measure only as they are told, whatever measures this suite."""
    for name in (*_coverage._STARTUP, "COVERAGE_FILE", "COVERAGE_RCFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(mylib=MYLIB, test_lib=TESTS)
    return pytester


def data_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob(".coverage*"))


def run_coverage(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run ``coverage`` (the command) with this interpreter; fail if it fails."""
    result = pytester.run(sys.executable, "-m", "coverage", *args, timeout=60)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    assert "ResourceWarning" not in result.stderr.str(), result.stderr.str()
    return result


# coverage.py's own subprocess measuring (7.10 on) must not measure the
# template on its own, which would leave a data file after pytest-cov's report.
PATCH_SUBPROCESS = "[run]\npatch = subprocess\n"


@pytest.mark.parametrize(
    ("start", "rc", "every"),
    [
        pytest.param("fork", "", (), id="fork"),
        pytest.param("spawn", "", (), id="spawn"),
        pytest.param("fork", PATCH_SUBPROCESS, (), id="fork-patch-subprocess"),
        # The template then starts as early as it can: not before pytest-cov measures.
        pytest.param("fork", "", ("--subprocess",), id="fork-every-test"),
    ],
)
def test_pytest_cov_counts_the_lines_run_in_workers(
    project: pytest.Pytester, start: str, rc: str, every: tuple[str, ...]
) -> None:
    if rc and coverage.version_info < (7, 10):
        pytest.skip("coverage.py has `patch = subprocess` from 7.10 on")
    project.path.joinpath(".coveragerc").write_text(rc)
    result = run(
        project,
        *PYTEST_COV,
        "--cov=mylib",
        "--cov-report=term-missing",
        f"--subprocess-start={start}",
        *every,
    )
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines([MISSING])
    # The workers' data files were combined into pytest-cov's.
    assert data_files(project.path) == [".coverage", ".coveragerc"]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_coverage_run_then_combine_counts_the_lines_run_in_workers(
    project: pytest.Pytester, start: str
) -> None:
    pytest_args = ("-m", "pytest", *PLUGIN, "-p", "no:cacheprovider", f"--subprocess-start={start}")
    result = run_coverage(project, "run", "--parallel-mode", "--source=mylib", *pytest_args)
    result.stdout.fnmatch_lines(["*2 passed*"])
    run_coverage(project, "combine")
    report = run_coverage(project, "report", "-m")
    report.stdout.re_match_lines([MISSING])
    assert data_files(project.path) == [".coverage"]


def test_coverage_run_alone_counts_the_lines_run_in_workers(project: pytest.Pytester) -> None:
    pytest_args = ("-m", "pytest", *PLUGIN, "-p", "no:cacheprovider")
    run_coverage(project, "run", "--source=mylib", *pytest_args)
    # Not in parallel mode: nothing to combine, as with every test in-process.
    assert data_files(project.path) == [".coverage"]
    report = run_coverage(project, "report", "-m")
    report.stdout.re_match_lines([MISSING])


@pytest.mark.parametrize(
    "death",
    [
        pytest.param("os.kill(os.getpid(), signal.SIGSEGV)", id="crash"),
        pytest.param("time.sleep(60)", id="timeout"),
    ],
)
def test_a_worker_that_dies_keeps_what_its_earlier_tests_ran(
    pytester: pytest.Pytester, death: str
) -> None:
    pytester.makepyfile(
        mylib=MYLIB,
        test_lib=f"""
        import os
        import signal
        import time

        import pytest

        import mylib

        pytestmark = pytest.mark.subprocess(timeout=2)


        def test_module_scoped():
            assert mylib.module_scoped(1) == "positive"


        def test_function_scoped():
            assert mylib.function_scoped() == 42


        def test_dies():
            {death}
        """,
    )
    result = run(pytester, *PYTEST_COV, "--cov=mylib", "--cov-report=term-missing")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.re_match_lines([MISSING])


def test_cov_context_test_names_the_test_and_phase_in_workers(project: pytest.Pytester) -> None:
    result = run(project, *PYTEST_COV, "--cov=mylib", "--cov-context=test", "--cov-report=")
    result.assert_outcomes(passed=2)
    run_coverage(project, "json", "--show-contexts", "-o", "cov.json")
    mylib = json.loads((project.path / "cov.json").read_text())["files"]["mylib.py"]
    assert mylib["missing_lines"] == [4, 12]
    assert mylib["contexts"]["3"] == ["test_lib.py::test_module_scoped|run"]
    assert mylib["contexts"]["8"] == ["test_lib.py::test_function_scoped|run"]


def test_no_cover_leaves_a_body_unmeasured_in_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        mylib=MYLIB,
        test_lib="""
        import pytest

        import mylib


        @pytest.mark.subprocess
        @pytest.mark.no_cover
        def test_unmeasured_by_marker():
            mylib.never_called()


        @pytest.mark.subprocess
        def test_unmeasured_by_fixture(no_cover):
            mylib.function_scoped()


        @pytest.mark.subprocess
        def test_measured():
            mylib.module_scoped(1)
        """,
    )
    result = run(pytester, *PYTEST_COV, "--cov=mylib", "--cov-report=term-missing")
    result.assert_outcomes(passed=3)
    result.stdout.re_match_lines([r"mylib\.py\s+8\s+3\s+62%\s+4, 8, 12\s*$"])


def test_a_worker_of_an_unmeasured_run_never_imports_coverage(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os
        import sys

        import pytest


        @pytest.mark.subprocess
        def test_body():
            assert "coverage" not in sys.modules
            assert "PYTEST_SUBPROC_COVERAGE" not in os.environ
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_a_template_is_started_by_nothing_that_measures_on_its_own() -> None:
    env = {"COVERAGE_PROCESS_START": ".coveragerc", "COV_CORE_SOURCE": "mylib", "HOME": "/home"}
    started = _coverage.template_env(env)
    assert not set(_coverage._STARTUP) & set(started)
    assert started["HOME"] == "/home"
    assert "COVERAGE_PROCESS_START" in env  # the caller's is left as it was
