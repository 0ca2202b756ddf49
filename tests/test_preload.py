"""Acceptance tests: ``subprocess_preload`` and ``--subprocess-preload``.

The modules named are imported once, in the template process the workers
are forked from, so every worker starts with them; a module that cannot be
imported, or that starts a thread, is a usage error before any test runs.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import pytest
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")

# Records which process imported it: the template, if it was preloaded.
HEAVY = """
import os

IMPORTED_BY = os.getpid()
"""

FUNCTION_SCOPED = """
import os
import sys

import pytest


@pytest.mark.subprocess(scope="function")
@pytest.mark.parametrize("n", range(3))
def test_starts_with_them(n):
    assert {"json", "decimal", "heavy"} <= set(sys.modules)
    heavy = sys.modules["heavy"]
    # Imported by the template this worker was forked from, not by the worker.
    assert heavy.IMPORTED_BY == os.getppid() != os.getpid()
"""


def test_preloaded_modules_are_in_every_function_scoped_worker(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\npythonpath = .\nsubprocess_preload = json decimal\n")
    pytester.makepyfile(heavy=HEAVY, test_preload=FUNCTION_SCOPED)
    result = run(pytester, "--subprocess-preload", "heavy")
    result.assert_outcomes(passed=3)


def test_decimal_is_there_before_the_test_imports_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsubprocess_preload = json decimal\n")
    pytester.makepyfile(
        test_preload="""
        import sys
        import pytest

        @pytest.mark.subprocess(scope="function")
        def test_decimal_present():
            assert "decimal" in sys.modules and "json" in sys.modules
            import decimal
            assert decimal.Decimal("1.5") * 2 == 3
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)


def test_a_spawned_worker_starts_with_them_too(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\npythonpath = .\nsubprocess_preload = heavy\n")
    pytester.makepyfile(
        heavy=HEAVY,
        test_spawned="""
        import os
        import sys
        import pytest

        @pytest.mark.subprocess(scope="function")
        def test_starts_with_it():
            assert sys.modules["heavy"].IMPORTED_BY == os.getppid()
        """,
    )
    result = run(pytester, "--subprocess-start", "spawn")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("module", "source", "said"),
    [
        ("no_such_module", None, "cannot import 'no_such_module': ModuleNotFoundError: *"),
        ("broken", "raise RuntimeError('half written')", "*RuntimeError: half written"),
        (
            "threader",
            "import threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
            "*importing 'threader' starts a thread*",
        ),
        ("not-a-module", None, "*'not-a-module' is not a module name"),
    ],
)
def test_a_module_that_cannot_be_preloaded_is_a_usage_error(
    pytester: pytest.Pytester, module: str, source: str | None, said: str
) -> None:
    pytester.makeini(f"[pytest]\npythonpath = .\nsubprocess_preload = {module}\n")
    if source is not None:
        pytester.makepyfile(**{module: source})
    pytester.makepyfile(
        test_never_runs="""
        import pytest

        @pytest.mark.subprocess
        def test_marked():
            pass
        """
    )
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: subprocess_preload: {said}"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.no_fnmatch_line("*test_marked*")


def test_a_thread_the_pytest_process_could_not_see_refuses_every_fork(
    pytester: pytest.Pytester,
) -> None:
    # The conftest imports it first, so only the template sees the thread start.
    pytester.makeini("[pytest]\npythonpath = .\nsubprocess_preload = threader\n")
    pytester.makepyfile(
        threader="import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
        test_refused="""
        import pytest

        @pytest.mark.subprocess
        def test_marked():
            pass
        """,
    )
    pytester.makeconftest("import threader")
    result = run(pytester, "-rE")
    result.assert_outcomes(errors=1)  # at setup, where the worker is started
    result.stdout.fnmatch_lines(
        ["ERROR test_refused.py::test_marked - WorkerStartError: the worker could not*"]
    )
    result.stdout.fnmatch_lines(
        [
            "*WorkerStartError: the worker could not be started: importing 'threader' "
            "(subprocess_preload) started a thread*"
        ]
    )
