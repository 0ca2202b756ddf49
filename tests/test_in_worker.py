"""Acceptance: a marked test runs in its worker as pytest would run it in-process."""

from __future__ import annotations

import re
import textwrap

import pytest
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


def test_unpicklable_fixtures_and_identity(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket, threading, pytest

        SENTINEL = object()

        @pytest.fixture(scope="module")
        def lock():
            return threading.Lock()

        @pytest.fixture
        def sock():
            with socket.socket() as s:
                yield s

        @pytest.fixture
        def holder(lock):
            return {"lock": lock}

        pytestmark = pytest.mark.subprocess

        def test_lock_and_socket(lock, sock, holder):
            assert lock.acquire(blocking=False)
            lock.release()
            assert sock.fileno() >= 0
            assert holder["lock"] is lock

        @pytest.mark.parametrize("value", [SENTINEL])
        def test_sentinel(value):
            assert value is SENTINEL
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_session_fixture_sets_what_the_body_reads(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        settings="MODE = 'unset'\n",
        conftest="""
        import pytest, settings

        @pytest.fixture(scope="session", params=["fast", "slow"])
        def mode(request):
            settings.MODE = request.param
            return request.param
        """,
        test_mode="""
        import pytest, settings

        @pytest.mark.subprocess
        def test_reads(mode):
            assert settings.MODE == mode
        """,
    )
    run(pytester).assert_outcomes(passed=2)


def test_request_finalizers_and_yield_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        SEEN = []

        @pytest.fixture
        def other():
            return "other"

        @pytest.fixture
        def checked():
            box = []
            yield box
            assert box == ["filled by the body"], "teardown sees what the body did"

        @pytest.fixture(autouse=True)
        def reset():
            SEEN.clear()

        pytestmark = pytest.mark.subprocess

        def test_request(request, checked):
            assert request.getfixturevalue("other") == "other"
            request.addfinalizer(lambda: print("finalized in", request.node.name))
            checked.append("filled by the body")
            SEEN.append(1)

        def test_reset_between_tests_sharing_a_worker():
            assert SEEN == []
        """
    )
    result = run(pytester, "-rP")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*Captured stdout teardown*", "finalized in test_request"])


def test_junitxml_records_reach_the_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        @pytest.mark.filterwarnings("ignore::pytest.PytestExperimentalApiWarning")
        def test_props(record_property, record_xml_attribute, record_testsuite_property, request):
            record_property("answer", 42)
            request.node.user_properties.append(("by_hand", "yes"))
            record_xml_attribute("flavour", "mint")
            record_testsuite_property("build", "7")
        """
    )
    # xunit2, the default family, has no room for attributes, in-process either.
    run(pytester, "--junitxml=out.xml", "-o", "junit_family=xunit1").assert_outcomes(passed=1)
    xml = (pytester.path / "out.xml").read_text()
    assert '<property name="answer" value="42"' in xml
    assert '<property name="by_hand" value="yes"' in xml
    assert 'flavour="mint"' in xml
    assert '<property name="build" value="7"' in xml


def test_cache_set_in_a_marked_test_is_read_by_a_later_unmarked_one(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_set(cache):
            cache.set("subproc/value", 7)

        def test_get(request):
            assert request.config.cache.get("subproc/value", None) == 7
        """
    )
    run(pytester, "-p", "cacheprovider", cache=True).assert_outcomes(passed=2)


def test_warning_filter_raises_inside_the_body(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import warnings, pytest

        @pytest.mark.subprocess
        def test_caught_as_exception():
            try:
                warnings.warn("careful", UserWarning)
            except UserWarning:
                return
            raise AssertionError("the warning did not raise")

        @pytest.mark.subprocess
        def test_other_category_is_recorded():
            warnings.warn("old", DeprecationWarning)
        """
    )
    result = run(pytester, "-W", "error::UserWarning")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*warnings summary*", "*test_*.py:*: DeprecationWarning: old"])


def test_hypothesis_profile_from_conftest(pytester: pytest.Pytester) -> None:
    pytest.importorskip("hypothesis")
    pytester.makeconftest(
        """
        from hypothesis import settings
        settings.register_profile("tiny", max_examples=3)
        settings.load_profile("tiny")
        """
    )
    pytester.makepyfile(
        """
        import pytest
        from hypothesis import given, settings, strategies as st

        @pytest.mark.subprocess
        @given(st.integers())
        def test_profile(x):
            assert settings().max_examples == 3
        """
    )
    run(pytester, "-p", "hypothesis").assert_outcomes(passed=1)


def test_mocker(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_mock")
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.subprocess
        def test_patch(mocker):
            mocker.patch("os.getcwd", return_value="mocked")
            spy = mocker.spy(os.path, "join")
            assert os.getcwd() == "mocked"
            os.path.join("a", "b")
            spy.assert_called_once_with("a", "b")
        """
    )
    run(pytester, "-p", "pytest_mock").assert_outcomes(passed=1)


def test_async_under_pytest_asyncio_auto_mode(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_asyncio")
    pytester.makepyfile(
        """
        import asyncio, os, pytest

        PARENT = os.environ["PARENT_PID"]

        @pytest.mark.subprocess
        async def test_async():
            await asyncio.sleep(0)
            assert str(os.getpid()) != PARENT
        """
    )
    pytester.makeconftest("import os\nos.environ.setdefault('PARENT_PID', str(os.getpid()))\n")
    result = run(
        pytester,
        "-p",
        "asyncio",
        "--asyncio-mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=1)


def test_unittest_method_that_segfaults_fails_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import ctypes, unittest, pytest

        @pytest.mark.subprocess
        class TestCase(unittest.TestCase):
            def test_segfault(self):
                ctypes.string_at(0)

            def test_fine(self):
                self.assertEqual(1, 1)

            def test_fails(self):
                self.assertEqual(1, 2)
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*worker crashed: signal SIGSEGV*"])
    result.stdout.fnmatch_lines(["*AssertionError: 1 != 2*"])


def test_doctests_run_in_the_worker_and_a_segfault_fails_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        calc='''
        def crash():
            """
            >>> import ctypes; ctypes.string_at(0)
            """

        def wrong():
            """
            >>> 1 + 1
            3
            """

        def right():
            """
            >>> 1 + 1
            2
            """
        '''
    )
    result = run(pytester, "--subprocess", "--doctest-modules")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*worker crashed: signal SIGSEGV*"])
    result.stdout.fnmatch_lines(["Expected:", "    3", "Got:", "    2"])


MIXED = {
    "conftest": """
        import pytest

        @pytest.fixture(scope="module")
        def counter():
            return {"n": 0}

        @pytest.fixture(autouse=True)
        def tick(counter):
            counter["n"] += 1
        """,
    "test_mixed": """
        import logging, unittest, warnings, pytest

        STATE = []

        class TestClass:
            def setup_method(self):
                self.ready = True

            def test_method(self):
                assert self.ready

        @pytest.mark.parametrize("x", [1, 2, 3])
        def test_param(x, counter):
            assert x < 3

        def test_skip():
            pytest.skip("skipped")

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert False

        @pytest.mark.xfail(strict=True)
        def test_xpass_strict():
            pass

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture error")

        def test_setup_error(broken):
            pass

        @pytest.fixture
        def bad_teardown():
            yield
            raise RuntimeError("teardown error")

        def test_teardown_error(bad_teardown):
            pass

        def test_warns():
            warnings.warn("noted", UserWarning)

        def test_logs(caplog):
            logging.getLogger("x").warning("hello")
            assert caplog.messages == ["hello"]

        class TestUnit(unittest.TestCase):
            @unittest.skip("unittest skip")
            def test_skipped(self):
                pass

            def test_ok(self):
                self.assertTrue(True)
        """,
}


def _outcomes(result: pytest.RunResult) -> list[str]:
    return sorted(
        line
        for line in result.stdout.lines
        if re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ", line)
    )


def test_a_mixed_suite_has_the_same_outcomes_under_subprocess(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in MIXED.items()})
    in_process = run(pytester, "-rA")
    for scope in ("module", "session", "function"):
        isolated = run(pytester, "-rA", "--subprocess", f"--subprocess-scope={scope}")
        assert isolated.parseoutcomes() == in_process.parseoutcomes(), scope
        assert _outcomes(isolated) == _outcomes(in_process), scope


@pytest.mark.parametrize("when", ["setup", "call", "teardown"])
def test_a_crash_in_any_phase_is_reported_in_that_phase(
    pytester: pytest.Pytester, when: str
) -> None:
    pytester.makepyfile(
        f"""
        import os, pytest

        @pytest.fixture
        def phases():
            if {when!r} == "setup":
                os._exit(3)
            yield
            if {when!r} == "teardown":
                os._exit(3)

        @pytest.mark.subprocess
        def test_crashes(phases):
            if {when!r} == "call":
                os._exit(3)

        @pytest.mark.subprocess
        def test_next():
            pass
        """
    )
    result = run(pytester)
    outcome = {"setup": {"errors": 1}, "call": {"failed": 1}, "teardown": {"errors": 1}}[when]
    # A teardown error comes on top of the passed call, as in-process.
    result.assert_outcomes(passed=2 if when == "teardown" else 1, **outcome)
    header = "*_ test_crashes _*" if when == "call" else f"*ERROR at {when} of test_crashes*"
    result.stdout.fnmatch_lines([header, "*WorkerCrashed: worker crashed: exit code 3*"])


def test_a_template_whose_configuration_starts_a_thread_falls_back_to_spawn(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        import threading

        def pytest_configure(config):
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        """
    )
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.subprocess

        def test_one():
            pass

        def test_two():
            pass
        """
    )
    result = run(pytester, "-W", "default::pytest.PytestWarning")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*spawns each worker*configuring pytest*started a thread*"])


def test_the_worker_shares_basetemp_and_strict_config(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        addopts = --strict-config --strict-markers
        faulthandler_timeout = 100
        filterwarnings = error
        """
    )
    pytester.makepyfile(
        """
        import pytest

        def test_parent(tmp_path_factory, request):
            request.config.rootpath.joinpath("base.txt").write_text(
                str(tmp_path_factory.getbasetemp())
            )

        @pytest.mark.subprocess
        def test_worker(tmp_path, tmp_path_factory, request):
            base = request.config.rootpath.joinpath("base.txt").read_text()
            assert str(tmp_path_factory.getbasetemp()) == base
            assert tmp_path.parent == tmp_path_factory.getbasetemp()
        """
    )
    run(pytester).assert_outcomes(passed=2)
    run(pytester, f"--basetemp={pytester.path / 'base'}").assert_outcomes(passed=2)


def test_a_test_the_worker_cannot_find_is_an_error_that_says_why(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        # The id differs in every process that imports the module.
        @pytest.mark.subprocess
        @pytest.mark.parametrize("x", [object()], ids=lambda o: str(id(o)))
        def test_moving_id(x):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*could not find test_*moving_id*in its worker*leave it unmarked*"]
    )


@pytest.mark.parametrize(("scope", "setups"), [("session", 1), ("module", 2), ("function", 4)])
def test_a_session_fixture_lives_as_long_as_its_worker(
    pytester: pytest.Pytester, scope: str, setups: int
) -> None:
    log = pytester.path / "setups.txt"
    pytester.makeconftest(
        f"""
        import pytest

        @pytest.fixture(scope="session")
        def resource():
            with open({str(log)!r}, "a") as f:
                f.write("setup\\n")
            yield
            with open({str(log)!r}, "a") as f:
                f.write("teardown\\n")
        """
    )
    body = "def test_one(resource): pass\n\ndef test_two(resource): pass\n"
    pytester.makepyfile(test_a=body, test_b=body)
    run(pytester, "--subprocess", f"--subprocess-scope={scope}").assert_outcomes(passed=4)
    assert log.read_text() == "setup\nteardown\n" * setups


def test_a_rerun_keeps_the_module_fixture_as_in_process(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_rerunfailures")
    log = pytester.path / "log.txt"
    pytester.makepyfile(
        test_flaky=f"""
        import pytest

        @pytest.fixture(scope="module")
        def resource():
            with open({str(log)!r}, "a") as f:
                f.write("setup\\n")
            yield
            with open({str(log)!r}, "a") as f:
                f.write("teardown\\n")

        pytestmark = pytest.mark.subprocess
        ATTEMPTS = []

        def test_flaky(resource):
            ATTEMPTS.append(1)
            assert len(ATTEMPTS) > 1

        def test_after(resource):
            pass
        """
    )
    result = run(pytester, "-p", "rerunfailures", "--reruns", "1")
    assert result.parseoutcomes() == {"passed": 2, "rerun": 1}
    # The module fixture is kept set up across the rerun, as in-process.
    assert log.read_text() == "setup\nteardown\n"


def test_async_under_anyio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("anyio")
    pytester.makepyfile(
        """
        import os, anyio, pytest

        PARENT = os.environ["PARENT_PID"]

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        @pytest.mark.subprocess
        async def test_async():
            await anyio.sleep(0)
            assert str(os.getpid()) != PARENT
        """
    )
    pytester.makeconftest("import os\nos.environ.setdefault('PARENT_PID', str(os.getpid()))\n")
    run(pytester, "-p", "anyio").assert_outcomes(passed=1)


def test_a_file_named_on_the_command_line_runs_whatever_its_name(
    pytester: pytest.Pytester,
) -> None:
    """pytest collects a file it is given even if its name is not test_*.py; so does the worker."""
    pytester.makepyfile(
        checks="""
        import os
        import pytest

        @pytest.mark.subprocess
        def test_in_worker():
            pass

        @pytest.mark.subprocess
        def test_crashes():
            os.abort()
        """
    )
    result = run(pytester, "checks.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED checks.py::test_crashes - WorkerCrashed: signal SIGABRT*"])
    assert "LookupError" not in result.stdout.str()
