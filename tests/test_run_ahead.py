"""A marked test's worker runs its phases ahead: one request, each phase reported as pytest asks."""

from __future__ import annotations

import time

import pytest
from _inner import run_inner

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")

PHASES = """
import pytest

@pytest.fixture
def noisy():
    print("out of setup")
    yield
    print("out of teardown")

@pytest.mark.subprocess
def test_noisy(noisy):
    print("out of call")

@pytest.mark.subprocess
def test_fails_after_output(noisy):
    print("call before failing")
    assert 0
"""


@pytest.mark.parametrize("scope", ["module", "session", "function"])
def test_each_phase_keeps_its_own_output(pytester: pytest.Pytester, scope: str) -> None:
    pytester.makepyfile(test_phases=PHASES)
    result = run_inner(pytester, "-rP", f"--subprocess-scope={scope}")
    result.assert_outcomes(passed=1, failed=1)
    each_its_own = ["*Captured stdout setup*", "out of setup", "*Captured stdout call*"]
    teardown = ["*Captured stdout teardown*", "out of teardown"]
    result.stdout.fnmatch_lines(
        ["*_ test_fails_after_output _*", *each_its_own, "call before failing", *teardown]
    )
    result.stdout.fnmatch_lines(
        ["*_ test_noisy _*", *each_its_own, "out of call", *teardown, "*- subprocess workers -*"],
        consecutive=True,
    )


STOPPED = """
import pytest

@pytest.fixture(scope="module")
def resource():
    yield
    print("module resource finalized")
    with open("log.txt", "a") as f:
        f.write("finalized\\n")

@pytest.mark.xfail(strict=True)
@pytest.mark.subprocess
def test_passes_unexpectedly(resource):
    with open("log.txt", "a") as f:
        f.write("first\\n")

@pytest.mark.subprocess
def test_never_runs(resource):
    pass
"""


def test_a_run_stopped_by_a_passing_call_finalizes_as_in_process(
    pytester: pytest.Pytester,
) -> None:
    """A strict xpass fails in pytest's process only: -x then ends the module in its teardown."""
    pytester.makepyfile(test_stopped=STOPPED)
    outcomes = {}
    for args in ((), ("--subprocess",)):
        (pytester.path / "log.txt").unlink(missing_ok=True)
        result = run_inner(pytester, "-x", *args)
        outcomes[args] = result.parseoutcomes()
        assert (pytester.path / "log.txt").read_text() == "first\nfinalized\n"
        assert "test_never_runs" not in result.stdout.str()
        result.stdout.fnmatch_lines(["*Captured stdout teardown*", "module resource finalized"])
    assert outcomes[()] == outcomes[("--subprocess",)] == {"failed": 1}


HOOK_FAILS = """
import pytest

@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item):
    if item.name == "test_setup_refused":
        raise RuntimeError("refused after the fixtures")
"""

REFUSED = """
import pytest

@pytest.mark.subprocess
def test_setup_refused():
    print("ran ahead")

@pytest.mark.subprocess
def test_next():
    pass
"""


def test_a_call_pytest_never_asks_for_is_not_reported(pytester: pytest.Pytester) -> None:
    """A plugin fails the setup in pytest's process after the worker set the test up."""
    pytester.makeconftest(HOOK_FAILS)
    pytester.makepyfile(test_refused=REFUSED)
    result = run_inner(pytester, "-rA")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_setup_refused*", "*refused after*"])
    assert "ran ahead" not in result.stdout.str()


def test_the_worker_s_item_has_the_location_pytest_reports(pytester: pytest.Pytester) -> None:
    """The worker takes the item's location from pytest's process instead of working it out."""
    pytester.mkpydir("pkg")
    pytester.makepyfile(
        **{
            "pkg/test_where": """
            import pytest

            class TestPlace:
                @pytest.mark.subprocess
                @pytest.mark.parametrize("n", [1])
                def test_located(self, request, n):
                    assert request.node.location == (
                        "pkg/test_where.py", 3, "TestPlace.test_located[1]"
                    )
            """
        }
    )
    run_inner(pytester).assert_outcomes(passed=1)


INTERRUPTS_BEFORE_THE_CALL = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    # As a Ctrl-C that comes after the setup, before pytest asks for the call.
    if not item.config.getoption("subprocess_in_worker", False):
        raise KeyboardInterrupt
"""


def test_an_interrupt_before_the_call_does_not_wait_for_the_body(
    pytester: pytest.Pytester,
) -> None:
    """The worker runs the body ahead; pytest, interrupted, ends without waiting for it."""
    pytester.makeconftest(INTERRUPTS_BEFORE_THE_CALL)
    pytester.makepyfile(
        test_sleeps="""
        import time
        import pytest

        @pytest.mark.subprocess
        def test_sleeps():
            time.sleep(300)
        """
    )
    started = time.monotonic()
    result = run_inner(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert time.monotonic() - started < 30
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
