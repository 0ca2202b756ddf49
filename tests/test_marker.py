"""Acceptance tests: what a body marked ``@pytest.mark.subprocess`` sees and does.

Each test writes a small suite, runs it in an inner pytest
(``pytester.runpytest_subprocess``, so a crash or a hang stays there) and
checks its outcomes and output. Bodies log ``tag pid`` lines to a file named
by the ``PIDLOG`` environment variable, which tells which process ran what,
and lets each test check that no worker outlived its run.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _inner import PARENT_CONFTEST, PLUGIN, Terminal, assert_gone, read_pids, running
from _inner import run_inner as run

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


def wait_for(path: Path, text: str = "\n", timeout: float = 30.0) -> str:
    """The text of ``path`` once it holds ``text`` (by default: once it has a full line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content and (text != "\n" or content.endswith("\n")):
            return content
        time.sleep(0.05)
    pytest.fail(f"{path.name} did not get {text!r} within {timeout} s")


# --------------------------------------------------------------------------
# Worker life
# --------------------------------------------------------------------------


def test_module_worker_is_shared_and_module_fixture_set_up_once(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    setups = pytester.path / "setups.txt"
    pytester.makeconftest(
        PARENT_CONFTEST
        + textwrap.dedent(
            f"""
            import os

            @pytest.fixture(scope="module")
            def resource():
                with open({str(setups)!r}, "a") as f:
                    f.write(f"setup {{os.getpid()}}\\n")
                return {{"answer": 42}}
            """
        )
    )
    pytester.makepyfile(
        test_five="""
        import pytest
        from pidlog import log

        pytestmark = pytest.mark.subprocess

        @pytest.mark.parametrize("n", range(5))
        def test_uses_resource(resource, n):
            assert resource == {"answer": 42}
            log(f"t{n}")
        """,
        test_other="""
        import pytest
        from pidlog import log

        @pytest.mark.subprocess
        def test_other_module():
            log("other")
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=6)
    pids = read_pids(pidlog)
    parent = pids["parent"]
    # Module scope (the default): one worker for the five, another for the other module.
    assert len({pids[f"t{n}"] for n in range(5)}) == 1
    assert pids["t0"] not in (parent, pids["other"])
    assert pids["other"] != parent
    # The module fixture ran once, in the module's worker.
    assert setups.read_text() == f"setup {pids['t0']}\n"
    assert_gone(pids.values())


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

FIXTURES_CONFTEST = f"""
import os
import sys
import threading
from dataclasses import dataclass

import pytest
import helper
{PARENT_CONFTEST}

@dataclass(frozen=True)
class Point:
    x: int
    y: int


@pytest.fixture
def point():
    return Point(1, 2)


@pytest.fixture
def lock():
    return threading.Lock()


@pytest.fixture
def func():
    return lambda: 1


@pytest.fixture
def made(tmp_path):
    yield tmp_path
    # Teardown runs in the worker too, after the body wrote the file.
    assert (tmp_path / "made.txt").read_text() == "made in the worker"


@pytest.fixture
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FROM_FIXTURE", "1")
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extramod.py").write_text("WHERE = 'extra'\\n")
    monkeypatch.syspath_prepend(str(extra))
    return str(tmp_path)


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(helper, "VALUE", "patched")
    monkeypatch.setitem(helper.TABLE, "key", "patched")
"""

FIXTURES_TESTS = """
import logging
import os
import sys
import warnings

import pytest

import helper
from pidlog import log

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("number, word", [(1, "one"), (2, "two")])
def test_parametrize(number, word):
    assert {1: "one", 2: "two"}[number] == word


def test_user_fixture_dataclass_from_conftest(point):
    assert (point.x, point.y) == (1, 2)
    assert type(point).__name__ == "Point"


def test_tmp_path(made, tmp_path):
    assert made == tmp_path
    assert tmp_path.is_dir()
    (tmp_path / "made.txt").write_text("made in the worker")


def test_tmpdir(tmpdir):
    tmpdir.join("x.txt").write("x")
    assert tmpdir.join("x.txt").read() == "x"


def test_unpicklable_lock(lock):
    assert lock.acquire(blocking=False)
    lock.release()


def test_unpicklable_lambda(func):
    assert func() == 1


def test_monkeypatch_in_body(monkeypatch):
    log("monkeypatch")
    monkeypatch.setattr(helper, "VALUE", "set in body")
    monkeypatch.setenv("SET_IN_BODY", "1")
    assert helper.VALUE == "set in body"


def test_monkeypatch_undone():
    log("undone")
    assert helper.VALUE == "original"
    assert "SET_IN_BODY" not in os.environ


def test_capsys(capsys):
    print("to stdout")
    print("to stderr", file=sys.stderr)
    out, err = capsys.readouterr()
    assert (out, err) == ("to stdout\\n", "to stderr\\n")


def test_capsysbinary(capsysbinary):
    sys.stdout.buffer.write(b"\\x00bytes")
    sys.stdout.flush()
    assert capsysbinary.readouterr().out == b"\\x00bytes"


def test_capfd(capfd):
    os.write(1, b"fd one\\n")
    os.write(2, b"fd two\\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("fd one\\n", "fd two\\n")


def test_capfdbinary(capfdbinary):
    os.write(1, b"\\xff\\xfe")
    assert capfdbinary.readouterr().out == b"\\xff\\xfe"


def test_caplog(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("body").info("logged %s", "here")
    assert [r.getMessage() for r in caplog.records] == ["logged here"]
    assert "logged here" in caplog.text


def test_recwarn(recwarn):
    warnings.warn("watch out", UserWarning)
    assert len(recwarn) == 1
    assert str(recwarn.pop(UserWarning).message) == "watch out"


@pytest.mark.subprocess(timeout=30)
@pytest.mark.parametrize("p", ["first"])
def test_request(request, p):
    assert request.node.name == "test_request[first]"
    assert request.node.nodeid == "test_fixtures.py::test_request[first]"
    assert request.config.getoption("verbose") == 1
    assert request.node.get_closest_marker("subprocess").kwargs == {"timeout": 30}
    assert request.node.get_closest_marker("nothing") is None
    assert request.node.callspec.params == {"p": "first"}
    assert "subprocess" in request.keywords


def test_fixture_environment_cwd_and_path(environment):
    log("environment")
    assert os.environ["FROM_FIXTURE"] == "1"
    assert os.getcwd() == environment
    import extramod
    assert extramod.WHERE == "extra"


def test_fixture_changes_undone_by_the_fixture():
    log("restored")
    assert "FROM_FIXTURE" not in os.environ
    assert "extramod" not in sys.modules or sys.path[0] != "extra"
    assert os.getcwd() == os.environ["INNER_CWD"]


def test_fixture_setattr_reaches_the_body(patched):
    assert helper.VALUE == "patched"
    assert helper.TABLE == {"key": "patched"}


def test_fixture_setattr_undone_after(request):
    assert helper.VALUE == "original"
    assert helper.TABLE == {}
"""


def test_fixtures_run_in_the_worker(
    pytester: pytest.Pytester, pidlog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fixture of a marked test runs in its worker: no value crosses, none must pickle."""
    monkeypatch.setenv("INNER_CWD", str(pytester.path))
    pytester.makepyfile(helper="VALUE = 'original'\nTABLE = {}\n")
    pytester.makeconftest(FIXTURES_CONFTEST)
    pytester.makepyfile(test_fixtures=FIXTURES_TESTS)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=20)
    result.stdout.no_fnmatch_line("*SubprocessWarning*")
    pids = read_pids(pidlog)
    assert pids["monkeypatch"] == pids["undone"] == pids["environment"] == pids["restored"]
    assert pids["monkeypatch"] != pids["parent"]
    assert_gone(pids.values())


def test_a_conftest_stub_and_configure_value_reach_the_worker(pytester: pytest.Pytester) -> None:
    """conftest modules are imported and pytest_configure runs in the worker too."""
    pytester.makeconftest(
        """
        import sys
        import types
        import pytest

        # A module that exists only in memory, as a plugin might make one.
        virtual = types.ModuleType("stubbed_module")
        exec("class Handle:\\n    pass\\n", virtual.__dict__)
        sys.modules["stubbed_module"] = virtual

        def pytest_configure(config):
            config.from_configure = "configured"

        @pytest.fixture
        def handle():
            return virtual.Handle()
        """
    )
    pytester.makepyfile(
        """
        import pytest
        import stubbed_module

        @pytest.mark.subprocess
        def test_it(handle, request):
            assert isinstance(handle, stubbed_module.Handle)
            assert request.config.from_configure == "configured"
        """
    )
    run(pytester).assert_outcomes(passed=1)


# --------------------------------------------------------------------------
# The body: imported as the parent imported it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prepend", "append", "importlib"])
def test_body_imported_as_in_the_parent(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makeconftest(
        """
        import sys
        from dataclasses import dataclass
        from pathlib import Path

        import pytest

        sys.path.insert(0, str(Path(__file__).parent / "libs"))


        @pytest.fixture
        def parent_module_name(request):
            return request.module.__name__


        @dataclass
        class Point:
            x: int


        @pytest.fixture
        def point():
            return Point(3)
        """
    )
    pytester.mkdir("libs")
    pytester.makepyfile(**{"libs/libmod": "WHERE = 'libs'\n"})
    pkg = pytester.mkpydir("pkg")
    (pkg / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (pkg / "test_in_pkg.py").write_text(
        "import pytest\n"
        "import libmod\n"
        "from .helpers import double\n"
        "from . import helpers\n"
        "\n"
        "@pytest.mark.subprocess\n"
        "def test_relative_import(parent_module_name):\n"
        "    assert __name__ == parent_module_name\n"
        "    assert double(2) == 4\n"
        "    assert helpers.double is double\n"
        "    assert libmod.WHERE == 'libs'\n"
        "\n"
        "@pytest.mark.subprocess\n"
        "class TestFresh:\n"
        "    def test_a(self):\n"
        "        assert not hasattr(self, 'seen')\n"
        "        self.seen = True\n"
        "\n"
        "    def test_b(self):\n"
        "        assert not hasattr(self, 'seen')\n"
        "        self.seen = True\n"
        "\n"
        "    def test_c(self, parent_module_name):\n"
        "        assert type(self).__module__ == parent_module_name\n"
    )
    pytester.mkdir("plain")
    pytester.makepyfile(
        **{
            "plain/test_plain": """
            import pytest
            import libmod

            @pytest.mark.subprocess
            def test_plain(parent_module_name, point):
                assert __name__ == parent_module_name
                assert libmod.WHERE == "libs"
                assert point.x == 3
            """
        }
    )
    result = run(pytester, f"--import-mode={mode}")
    result.assert_outcomes(passed=5)


def test_importlib_mode_same_basename_in_two_directories(pytester: pytest.Pytester) -> None:
    for where in ("one", "two"):
        pytester.mkdir(where)
        pytester.makepyfile(
            **{
                f"{where}/test_same": f"""
                import pytest

                WHERE = {where!r}

                @pytest.mark.subprocess(scope="session")
                def test_where():
                    assert WHERE == {where!r}
                """
            }
        )
    result = run(pytester, "--import-mode=importlib")
    result.assert_outcomes(passed=2)


# --------------------------------------------------------------------------
# What is isolated
# --------------------------------------------------------------------------


def test_subprocess_flag_isolates_every_kind_of_item(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makeconftest(
        PARENT_CONFTEST
        + textwrap.dedent(
            """
            class LoggingItem(pytest.Item):
                def runtest(self):
                    pidlog.log("item")

            class LoggingFile(pytest.File):
                def collect(self):
                    yield LoggingItem.from_parent(self, name="logging")

            def pytest_collect_file(file_path, parent):
                if file_path.suffix == ".logitem":
                    return LoggingFile.from_parent(parent, path=file_path)
            """
        )
    )
    pytester.path.joinpath("a.logitem").write_text("")
    pytester.makepyfile(
        test_mod='''
        import pidlog

        def doctested():
            """
            >>> pidlog.log("doctest")
            """

        def test_function():
            pidlog.log("function")

        class TestClass:
            def test_method(self):
                pidlog.log("method")
        '''
    )
    result = run(pytester, "--subprocess", "--doctest-modules")
    result.assert_outcomes(passed=4)
    pids = read_pids(pidlog)
    parent = pids.pop("parent")
    # Every kind of item runs in a worker: doctests and plugins' own items too.
    assert parent not in pids.values()
    assert pids["function"] == pids["method"]
    assert_gone(pids.values())


def test_marked_unittest_method_is_isolated(pytester: pytest.Pytester, pidlog: Path) -> None:
    pytester.makeconftest(PARENT_CONFTEST)
    pytester.makepyfile(
        test_unit="""
        import unittest
        import pytest
        from pidlog import log

        class TestUnit(unittest.TestCase):
            @pytest.mark.subprocess
            def test_marked(self):
                log("unittest")
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)
    pids = read_pids(pidlog)
    assert pids["unittest"] != pids["parent"]


def test_xdist_each_worker_isolates_and_survives_a_crash(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_many="""
        import os
        import pytest
        from pidlog import log

        pytestmark = pytest.mark.subprocess

        @pytest.mark.parametrize("n", range(8))
        def test_passes(n):
            log(f"t{n}")

        def test_crashes():
            os._exit(3)
        """
    )
    result = run(pytester, "-p", "xdist.plugin", "-n", "2", "-rf")
    result.assert_outcomes(passed=8, failed=1)
    result.stdout.fnmatch_lines(["*WorkerCrashed: worker crashed: exit code 3*"])
    pids = read_pids(pidlog)
    assert len(pids) == 8
    assert_gone(pids.values())


# --------------------------------------------------------------------------
# Nothing outlives the run
# --------------------------------------------------------------------------

SPAWNER = """
import os
import subprocess
import sys
import time

import psutil
import pytest
from pidlog import log

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]
# Held, so no Popen object is collected (and warns) while its child runs.
CHILDREN = []


def spawn(**kwargs):
    child = subprocess.Popen(SLEEP, **kwargs)
    CHILDREN.append(child)
    return child.pid


@pytest.mark.subprocess(scope="function")
def test_function_worker_spawns():
    log("function_worker")
    log("function_child", spawn())
    log("function_session_child", spawn(start_new_session=True))


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_gone_at_scope_end():
    with open(os.environ["PIDLOG"]) as f:
        pids = [int(line.split()[1]) for line in f]
    deadline = time.monotonic() + 5
    for pid in pids:
        while running(pid):
            assert time.monotonic() < deadline, f"pid {pid} outlived its worker's scope"
            time.sleep(0.02)


@pytest.mark.subprocess
def test_module_worker_spawns():
    log("module_worker")
    log("module_child", spawn())
    log("module_session_child", spawn(start_new_session=True))


@pytest.mark.subprocess(timeout=1)
def test_spawns_and_hangs():
    log("hung_worker")
    log("hung_session_child", spawn(start_new_session=True))
    time.sleep(300)
"""


def test_worker_descendants_die_with_it(pytester: pytest.Pytester, pidlog: Path) -> None:
    pytester.makepyfile(test_spawner=SPAWNER)
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    pids = read_pids(pidlog)
    assert len(pids) == 8
    assert_gone(pids.values())


SLEEPER = """
import os
import time
import pytest

@pytest.mark.subprocess
def test_sleeps():
    print("SLEEPER-STREAMED", flush=True)
    with open(os.environ["PIDLOG"], "a") as f:
        f.write(f"sleeper {os.getpid()}\\n")
    time.sleep(300)
"""


# pytest run by hand. SIGINT gets its default handler back first: a shell that
# runs this suite in the background without job control has it ignored, and
# the inner pytest would inherit that.
INNER_MAIN = (
    "import signal, sys, pytest; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.exit(pytest.console_main())"
)


def _start_inner(
    pytester: pytest.Pytester, *args: str, stdout: Any = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    pytester.makepyfile(test_sleeper=SLEEPER)
    cmd = [sys.executable, "-c", INNER_MAIN, *PLUGIN, "-p", "no:cacheprovider", *args]
    return pytester.popen(
        [*cmd, "test_sleeper.py"], stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@posix_only
def test_ctrl_c_interrupts_the_run_and_kills_the_worker(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    proc = _start_inner(pytester)
    try:
        worker = int(wait_for(pidlog).split()[1])
        assert running(worker)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    text = out.decode() + err.decode()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, text
    lines = pytest.LineMatcher(out.decode().splitlines())
    lines.fnmatch_lines(["*! KeyboardInterrupt !*", "*no tests ran in*"])
    assert_gone([worker])


@posix_only
def test_sigkill_of_pytest_takes_the_worker_down(pytester: pytest.Pytester, pidlog: Path) -> None:
    # With -s the body's output reaches the terminal (here a file) while it runs.
    terminal = pytester.path / "terminal.txt"
    with terminal.open("wb") as out:
        proc = _start_inner(pytester, "-s", stdout=out)
    try:
        worker = int(wait_for(pidlog).split()[1])
        assert running(worker)
        assert "SLEEPER-STREAMED" in wait_for(terminal, "SLEEPER-STREAMED")
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert_gone([worker], timeout=5.0)


needs_pty = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="a pseudo-terminal with job control"
)


@needs_pty
def test_a_worker_writes_to_a_terminal_that_stops_background_writers(
    pytester: pytest.Pytester,
) -> None:
    """With -s a worker writes to pytest's terminal from a process group of its own."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_talks():
            print("WORKER-SPEAKS", flush=True)
        """
    )
    terminal = Terminal(pytester, *PLUGIN, "-p", "no:cacheprovider", "-s")
    try:
        code, text = terminal.finish()
        assert code == 0, text
    finally:
        terminal.close()
    assert "WORKER-SPEAKS" in text
    assert "1 passed" in text
    assert "Traceback" not in text


@needs_pty
@pytest.mark.parametrize(("capture", "ignored"), [("-s", True), ("--capture=fd", False)])
def test_only_a_worker_writing_to_the_terminal_ignores_sigttou(
    pytester: pytest.Pytester, capture: str, ignored: bool
) -> None:
    """The template, at the terminal, ignores it; a worker whose output is captured does not."""
    pytester.makepyfile(
        f"""
        import signal, pytest

        @pytest.mark.subprocess
        def test_disposition():
            ignored = signal.getsignal(signal.SIGTTOU) == signal.SIG_IGN
            assert ignored is {ignored}
        """
    )
    terminal = Terminal(pytester, *PLUGIN, "-p", "no:cacheprovider", capture)
    try:
        code, text = terminal.finish()
        assert code == 0, text
    finally:
        terminal.close()
    assert "1 passed" in text


@needs_pty
def test_ctrl_c_at_the_terminal_interrupts_the_run(pytester: pytest.Pytester, pidlog: Path) -> None:
    """The terminal signals pytest's process group; the workers, in groups of their own, are
    killed by pytest."""
    pytester.makepyfile(test_sleeper=SLEEPER)
    terminal = Terminal(pytester, *PLUGIN, "-p", "no:cacheprovider", "-s", "test_sleeper.py")
    try:
        terminal.expect("SLEEPER-STREAMED")
        worker = int(wait_for(pidlog).split()[1])
        os.write(terminal.master, b"\x03")  # Ctrl-C
        code, text = terminal.finish()
        assert code == pytest.ExitCode.INTERRUPTED, text
    finally:
        terminal.close()
    assert "KeyboardInterrupt" in text
    assert "_zygote" not in text  # the template, in pytest's group, would say it was stopped
    assert_gone([worker])


def test_environment_changes_reach_the_worker_and_are_taken_back(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only what changed is sent per call; a variable the parent drops is dropped too."""
    pytester.makepyfile(
        """
        import os, pytest

        pytestmark = pytest.mark.subprocess

        @pytest.fixture
        def flagged(monkeypatch):
            monkeypatch.setenv("SUBPROC_FLAG", "on")
            monkeypatch.delenv("SUBPROC_GONE", raising=False)

        def test_with_the_flag(flagged):
            assert os.environ["SUBPROC_FLAG"] == "on"
            assert "SUBPROC_GONE" not in os.environ

        def test_without_it():
            assert "SUBPROC_FLAG" not in os.environ
            assert os.environ["SUBPROC_GONE"] == "here"
            assert os.environ["PYTEST_CURRENT_TEST"].endswith("test_without_it (call)")
        """
    )
    monkeypatch.setenv("SUBPROC_GONE", "here")
    run(pytester).assert_outcomes(passed=2)


def test_a_bodys_cwd_and_path_stay_in_its_worker(pytester: pytest.Pytester) -> None:
    """What a body changes of its process stays in its worker, never in pytest's."""
    pytester.makepyfile(
        """
        import os, sys, tempfile, pytest

        START = os.getcwd(), list(sys.path)

        @pytest.mark.subprocess
        def test_moves():
            where = tempfile.mkdtemp()
            os.chdir(where)
            os.rmdir(where)
            sys.path.insert(0, "nowhere")

        def test_parent_untouched():
            assert (os.getcwd(), sys.path) == START
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_a_method_runs_on_the_instance_its_setup_prepared(pytester: pytest.Pytester) -> None:
    """setup_method and class fixtures set attributes the body sees, as in-process."""
    pytester.makepyfile(
        """
        import threading, pytest

        @pytest.mark.subprocess
        class TestPrepared:
            def setup_method(self, method):
                self.value = 42

            @pytest.fixture(autouse=True)
            def more(self):
                self.extra = "from a fixture"

            def test_sees_it(self):
                assert (self.value, self.extra) == (42, "from a fixture")

        @pytest.mark.subprocess
        class TestUnpicklable:
            def setup_method(self, method):
                self.lock = threading.Lock()

            def test_sees_it_too(self):
                assert self.lock.acquire(blocking=False)
        """
    )
    run(pytester).assert_outcomes(passed=2)
