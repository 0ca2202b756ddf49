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


def assert_interrupted_at_once(pytester: pytest.Pytester) -> None:
    """The run ends interrupted within seconds, though a body sleeps for minutes."""
    started = time.monotonic()
    result = run_inner(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert time.monotonic() - started < 30
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])


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
    assert_interrupted_at_once(pytester)


# The worker is sent a test's setup as pytest starts the test's protocol, when
# it already serves that test's file: the tests below run second in a module.

SKIPPED_HERE = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Only in pytest's process, before the test's own setup.
    in_worker = item.config.getoption("subprocess_in_worker", False)
    if item.name == "test_skipped_here" and not in_worker:
        pytest.skip("not here")
"""

TWO_AROUND_ONE = """
import pytest

pytestmark = pytest.mark.subprocess

@pytest.fixture
def named(request):
    print(f"setup of {request.node.name}")

def test_first(named):
    pass

def test_skipped_here(named):
    print("body of the skipped test")

def test_last(named):
    print("body of the last test")
"""


def test_a_test_skipped_before_its_setup_leaves_the_worker_in_step(
    pytester: pytest.Pytester,
) -> None:
    """A hook skips a test before its setup, the worker set up already: the next reads its own."""
    pytester.makeconftest(SKIPPED_HERE)
    pytester.makepyfile(test_around=TWO_AROUND_ONE)
    result = run_inner(pytester, "-rA")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_last _*",
            "*Captured stdout setup*",
            "setup of test_last",
            "*Captured stdout call*",
            "body of the last test",
        ],
        consecutive=True,
    )
    assert "skipped test" not in result.stdout.str()


def test_a_test_skipped_by_a_marker_added_in_pytest_s_process_never_runs(
    pytester: pytest.Pytester,
) -> None:
    """Markers pytest's process added after collection keep the worker from starting the test."""
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if item.name == "test_slow":
                    item.add_marker(pytest.mark.skip(reason="slow"))
        """
    )
    pytester.makepyfile(
        test_marked="""
        import pytest

        pytestmark = pytest.mark.subprocess

        def test_first():
            pass

        def test_slow():
            open("ran.txt", "w").close()

        def test_last():
            pass
        """
    )
    run_inner(pytester).assert_outcomes(passed=2, skipped=1)
    assert not (pytester.path / "ran.txt").exists()


def test_an_interrupt_before_the_setup_does_not_wait_for_the_body(
    pytester: pytest.Pytester,
) -> None:
    """Sent the setup early, the worker runs on; pytest, interrupted first, does not wait."""
    pytester.makeconftest(
        """
        def pytest_runtest_logstart(nodeid):
            # As a Ctrl-C while pytest starts the second test, its setup sent.
            if nodeid.endswith("test_sleeps"):
                raise KeyboardInterrupt
        """
    )
    pytester.makepyfile(
        test_sleeps="""
        import time
        import pytest

        pytestmark = pytest.mark.subprocess

        def test_first():
            pass

        def test_sleeps():
            time.sleep(300)
        """
    )
    assert_interrupted_at_once(pytester)


def test_output_to_the_terminal_follows_the_test_s_name(pytester: pytest.Pytester) -> None:
    """Under -s the worker's output goes straight out: it is not set up before pytest names it."""
    pytester.makeconftest(
        """
        import time

        def pytest_runtest_logstart(nodeid):
            if nodeid.endswith("test_second"):
                time.sleep(0.5)  # before pytest names the test: a worker set it up meanwhile
        """
    )
    pytester.makepyfile(
        test_order="""
        import pytest

        pytestmark = pytest.mark.subprocess

        @pytest.fixture
        def loud():
            print("SETUP-OUTPUT")

        def test_first():
            pass

        def test_second(loud):
            pass
        """
    )
    result = run_inner(pytester, "-s", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_second SETUP-OUTPUT"])


# Once a test is done, the worker enters the protocol of pytest's next test
# when that goes to it too, while pytest reports the test before.

WRAPPED = """
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    in_worker = item.config.getoption("subprocess_in_worker", False)
    if in_worker:
        with open("wrapped.txt", "a") as f:
            f.write(f"enter {item.name}\\n")
        print(f"entering {item.name}")
        if item.name == "test_refused":
            raise RuntimeError("the wrapper refuses")
    yield
    if in_worker:
        with open("wrapped.txt", "a") as f:
            f.write(f"leave {item.name}\\n")
"""

WRAPPED_TESTS = """
import pytest

pytestmark = pytest.mark.subprocess

def test_first():
    pass

def test_second():
    pass

@pytest.mark.skip
def test_skipped():
    pass

def test_third():
    pass

def test_refused():
    pass

@pytest.mark.subprocess(scope="session")
def test_elsewhere():
    pass

def test_last():
    pass
"""


def test_each_test_s_protocol_is_entered_and_left_once_in_order(
    pytester: pytest.Pytester,
) -> None:
    """Entered ahead or at the setup, a protocol's wrappers run as in pytest, output and all.

    The second test and the refused one are started ahead. The skipped test
    is not, nor the third (pytest's next test after the second is the
    skipped one), nor the last (the test before it goes to another worker).
    """
    pytester.makeconftest(WRAPPED)
    pytester.makepyfile(test_wrapped=WRAPPED_TESTS)
    result = run_inner(pytester, "-rA")
    result.assert_outcomes(passed=5, skipped=1, errors=1)
    tests = ["first", "second", "third", "refused", "elsewhere", "last"]
    expected = [f"{how} test_{name}" for name in tests for how in ("enter", "leave")]
    expected.remove("leave test_refused")
    assert (pytester.path / "wrapped.txt").read_text().splitlines() == expected
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_refused*",
            "*RuntimeError: the wrapper refuses*",
            "*Captured stdout setup*",
            "entering test_refused",
        ]
    )
    for name in tests:
        if name != "refused":
            result.stdout.fnmatch_lines(
                [f"*_ test_{name} _*", "*Captured stdout setup*", f"entering test_{name}"]
            )
