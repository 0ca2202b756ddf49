"""Workers forked from a template process, and the choice between fork and spawn."""

from __future__ import annotations

import argparse
import marshal
import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import psutil
import pytest
from _inner import PLUGIN, assert_gone

import pytest_subproc
from pytest_subproc import _compat, _zygote
from pytest_subproc._process import PACKAGE_ROOT, Worker, child_env
from pytest_subproc._subworker import Subworker
from pytest_subproc._template import Template, fork_supported

needs_fork = pytest.mark.skipif(not fork_supported(), reason="forking needs POSIX")


@pytest.fixture
def template() -> Template:
    template = Template(child_env(), PACKAGE_ROOT)
    yield template
    template.close()


@pytest.fixture
def forked(template: Template) -> Subworker:
    worker = Worker(template=template)
    yield Subworker(worker)
    worker.close()


@needs_fork
def test_a_forked_worker_is_the_templates_child_not_ours(forked: Subworker) -> None:
    assert forked.call(os.getpid) == forked.pid
    parent = psutil.Process(forked.pid).ppid()
    assert parent != os.getpid()
    assert "pytest_subproc._zygote" in " ".join(psutil.Process(parent).cmdline())
    # Already imported by the template: the worker did not pay for it.
    forked.run("import sys; imported = 'pytest' in sys.modules")
    assert forked.load("imported")


@needs_fork
def test_a_forked_worker_leads_a_group_in_our_session(forked: Subworker) -> None:
    forked.run("import os; group, session = os.getpgrp(), os.getsid(0)")
    assert forked.load("group") == forked.pid
    assert forked.load("session") == os.getsid(0)
    template = psutil.Process(forked.pid).ppid()
    assert os.getpgid(template) == template  # killed as a group too


@needs_fork
def test_forked_workers_report_signal_and_exit_code(forked: Subworker) -> None:
    with pytest.raises(pytest_subproc.WorkerCrashed, match="signal SIGSEGV") as crash:
        forked.run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert crash.value.signal == "SIGSEGV"
    with pytest.raises(pytest_subproc.WorkerCrashed, match="exit code 3") as exit3:
        forked.run("import os; os._exit(3)")
    assert exit3.value.exitcode == 3
    forked.run("x = 1")
    assert forked.load("x") == 1


@needs_fork
def test_a_forked_worker_times_out_with_its_stack(forked: Subworker) -> None:
    source = "import time\ndef stuck_here():\n    time.sleep(60)\nstuck_here()"
    with pytest.raises(pytest_subproc.WorkerTimeout) as timeout:
        forked.run(source, timeout=0.5)
    assert "stuck_here" in timeout.value.stack
    pid = timeout.value.pid
    assert_gone([pid])


@needs_fork
def test_output_of_a_forked_worker_is_captured_per_request(forked: Subworker) -> None:
    worker = forked._worker
    reply = worker.request(pytest_subproc._wire.Kind.RUN, ("print('one')", "<t>"))
    assert reply.stdout == "one\n"
    reply = worker.request(
        pytest_subproc._wire.Kind.RUN, ("import sys; sys.stderr.write('two')", "<t>")
    )
    assert (reply.stdout, reply.stderr) == ("", "two")


@needs_fork
def test_a_dead_template_is_started_again(template: Template, forked: Subworker) -> None:
    first = forked.pid
    forked.run("pass")
    template.close()
    forked.restart()
    assert forked.pid != first
    forked.run("y = 2")
    assert forked.load("y") == 2


@pytest.mark.usefixtures("no_plugin_autoload")
@pytest.mark.parametrize("start", ["spawn", pytest.param("fork", marks=needs_fork)])
def test_either_start_method_runs_marked_tests(pytester: pytest.Pytester, start: str) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.subprocess(scope="function")
        def test_own(): assert os.getpid() != int(os.environ["PARENT_PID"])

        @pytest.mark.subprocess
        def test_crash(): os._exit(3)
        """
    )
    pytester.makeconftest("import os\nos.environ.setdefault('PARENT_PID', str(os.getpid()))\n")
    result = pytester.runpytest_subprocess(*PLUGIN, f"--subprocess-start={start}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*worker crashed: exit code 3*"])


@pytest.mark.usefixtures("no_plugin_autoload")
def test_a_bad_start_method_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsubprocess_start = vfork\n")
    result = pytester.runpytest_subprocess(*PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*Invalid subprocess start method 'vfork' from ini subprocess_start*"]
    )


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
def test_a_test_module_is_imported_once_for_all_its_forked_workers(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    pytester.makepyfile(
        test_three="""
        import os, pytest, pidlog

        pidlog.log("import")

        @pytest.mark.subprocess(scope="function")
        @pytest.mark.parametrize("n", range(3))
        def test_fresh(n):
            pidlog.log(f"body{n}")
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=3)
    lines = pidlog.read_text().split("\n")
    imports = [line for line in lines if line.startswith("import ")]
    bodies = {line.split()[1] for line in lines if line.startswith("body")}
    # Once in pytest, once in the template; never in the three workers.
    assert len(imports) == 2
    assert len(bodies) == 3
    assert not bodies & {line.split()[1] for line in imports}


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
def test_each_modules_worker_is_forked_with_its_module_imported(
    pytester: pytest.Pytester, pidlog: Path
) -> None:
    """Module scope: the template imports each module, and the next, before forking."""
    for name in ("a", "b", "c"):
        pytester.makepyfile(
            **{
                f"test_{name}": f"""
                import pytest, pidlog

                pidlog.log("import-{name}")

                @pytest.mark.subprocess
                @pytest.mark.parametrize("n", range(2))
                def test_body(n):
                    pidlog.log("body-{name}")
                """
            }
        )
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=6)
    pids = [line.split() for line in pidlog.read_text().split("\n") if line]
    for name in ("a", "b", "c"):
        imports = {pid for what, pid in pids if what == f"import-{name}"}
        bodies = {pid for what, pid in pids if what == f"body-{name}"}
        assert len(imports) == 2  # pytest and the template: never the worker
        assert len(bodies) == 1
        assert not bodies & imports


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
def test_a_module_too_large_for_one_message_still_runs(pytester: pytest.Pytester) -> None:
    """The template gets the module's path alone, and rewrites it itself."""
    many = "\n".join(f"def test_{i}():\n    assert {i} == {i}, 'x' * 64" for i in range(3000))
    source = "import pytest\npytestmark = pytest.mark.subprocess\n" + many
    assert len(marshal.dumps(compile(source, "test_big.py", "exec"))) > _zygote.MAX_MESSAGE
    pytester.makepyfile(test_big=source)
    result = pytester.runpytest_subprocess(*PLUGIN, "test_big.py::test_1", "test_big.py::test_2")
    result.assert_outcomes(passed=2)


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
@pytest.mark.parametrize(
    ("test_source", "started"),
    [
        ("import pytest\n\n@pytest.mark.subprocess\ndef test_marked():\n    pass\n", True),
        ("def test_plain():\n    pass\n", False),
    ],
    ids=["a marked test", "no marked test"],
)
def test_the_template_starts_while_pytest_collects(
    pytester: pytest.Pytester, test_source: str, started: bool
) -> None:
    """The first marked test collected launches it; a run without one starts none."""
    pytester.makeconftest(
        """
        import psutil

        def pytest_collection_finish(session):
            names = [" ".join(p.cmdline()) for p in psutil.Process().children()]
            print("TEMPLATE UP AT COLLECTION END:", any("_zygote" in n for n in names))
        """
    )
    pytester.makepyfile(test_source)
    result = pytester.runpytest_subprocess(*PLUGIN, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"TEMPLATE UP AT COLLECTION END: {started}"])


@pytest.mark.parametrize("disabled", [False, True], ids=["autoloaded", "no autoload"])
def test_under_subprocess_the_template_starts_before_conftests_load(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, disabled: bool
) -> None:
    """Every test needs it: it imports pytest and the plugins while pytest configures."""
    if disabled:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    # A plugin module the template imported before pytest marked it for
    # assertion rewriting would warn, and so fail the worker's configuration.
    pytester.makeini(
        """
        [pytest]
        filterwarnings =
            error
            ignore:The configuration option "asyncio_default_fixture_loop_scope" is unset
        """
    )
    pytester.makeconftest(
        """
        import psutil

        names = [" ".join(p.cmdline()) for p in psutil.Process().children()]
        print("TEMPLATE UP AT CONFTEST IMPORT:", any("_zygote" in n for n in names))
        """
    )
    pytester.makepyfile(
        """
        def test_in_worker(pytestconfig):
            assert pytestconfig.getoption("subprocess_in_worker")
        """
    )
    # Autoloaded, the plugin is an entry point: naming it too would load it twice.
    args = (*PLUGIN, "-p", "no:cacheprovider") if disabled else ("-p", "no:cacheprovider")
    result = pytester.runpytest_subprocess(*args, "-s", "--subprocess")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["TEMPLATE UP AT CONFTEST IMPORT: True"])
    assert "ResourceWarning" not in result.stderr.str()


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
@pytest.mark.parametrize("processes", ["2", "auto"])
def test_xdist_s_controller_starts_no_template(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, processes: str
) -> None:
    """Only xdist's workers run tests: each has a template, the controller none."""
    pytest.importorskip("xdist")
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # this suite's own, under xdist
    pytester.makeconftest(
        """
        import os

        with open("imports.txt", "a") as f:
            f.write(os.environ.get("PYTEST_XDIST_WORKER", "controller") + "\\n")
        """
    )
    pytester.makepyfile("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    args = ("-p", "xdist.plugin", "-n", processes, "--dist", "each", "--subprocess")
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", *args)
    # The controller imports the conftest once; each xdist worker and its template once each.
    imports = (pytester.path / "imports.txt").read_text().split()
    workers = set(imports) - {"controller"}
    assert imports.count("controller") == 1, imports
    assert all(imports.count(name) == 2 for name in workers), imports
    assert len(workers) == 2 if processes == "2" else len(workers) >= 1
    result.assert_outcomes(passed=2 * len(workers))  # --dist each: every worker runs both


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
@pytest.mark.parametrize(
    "option",
    [
        "--help",
        "--collect-only",
        "--fixtures",
        "--fixtures-per-test",
        "--markers",
        "--cache-show",
    ],
)
def test_a_run_that_runs_no_test_starts_no_template(pytester: pytest.Pytester, option: str) -> None:
    """pytest shows something instead: no template, nothing imports the conftest a second time."""
    pytester.makeconftest(
        """
        import os, psutil

        def templates():
            return sum("_zygote" in " ".join(p.cmdline()) for p in psutil.Process().children())

        with open("seen.txt", "a") as f:
            f.write(f"import {os.getpid()} {templates()}\\n")

        def pytest_unconfigure(config):
            with open("seen.txt", "a") as f:
                f.write(f"unconfigure {os.getpid()} {templates()}\\n")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN, "--subprocess", option)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    seen = [line.split() for line in (pytester.path / "seen.txt").read_text().splitlines()]
    assert len({pid for _, pid, _ in seen}) == 1, seen  # only pytest's process imported it
    assert all(templates == "0" for _, _, templates in seen), seen


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
@pytest.mark.parametrize("selection", [("-k", "plain"), ("-m", "not subprocess")])
def test_a_template_for_deselected_tests_ends_before_the_run(
    pytester: pytest.Pytester, selection: tuple[str, str]
) -> None:
    """Collecting the marked test started it; once no selected test needs it, it goes."""
    pytester.makeconftest(
        """
        import psutil

        def pytest_runtest_setup(item):
            names = [" ".join(p.cmdline()) for p in psutil.Process().children()]
            print("TEMPLATES AT SETUP:", sum("_zygote" in n for n in names))
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_marked():
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", "-s", *selection)
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*TEMPLATES AT SETUP: 0"])


@needs_fork
@pytest.mark.usefixtures("no_plugin_autoload")
def test_a_template_a_selected_test_drives_by_hand_stays(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.subprocess
        def test_marked():
            pass

        def test_driven(subworker):
            assert subworker.call(os.getpid) != os.getpid()
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", "-k", "test_driven")
    result.assert_outcomes(passed=1, deselected=1)


@pytest.mark.parametrize(
    ("options", "controller"),
    [
        ({}, False),
        ({"numprocesses": None, "dist": "no", "tx": []}, False),
        ({"numprocesses": 0, "dist": "no", "tx": []}, False),
        ({"numprocesses": 2, "dist": "no", "tx": []}, True),
        ({"numprocesses": "auto", "dist": "no", "tx": []}, True),
        ({"numprocesses": "logical", "usepdb": True}, False),
        ({"numprocesses": None, "dist": "load", "tx": ["popen"]}, True),
        ({"numprocesses": None, "dist": "load", "tx": []}, False),
    ],
)
def test_xdist_controller_is_told_from_the_options(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, object], controller: bool
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    config = cast(pytest.Config, SimpleNamespace())  # configured: no xdist worker's input
    namespace = argparse.Namespace(**options)
    assert _compat.xdist_controller(config, namespace) is controller
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # set before an xdist worker parses them
    assert _compat.xdist_controller(config, namespace) is False
    worker = cast(pytest.Config, SimpleNamespace(workerinput={}))
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert _compat.xdist_controller(worker, namespace) is False


def test_a_usage_error_after_the_template_started_early_leaves_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nsubprocess_preload = no_such_module\n")
    pytester.makepyfile("def test_never_runs():\n    pass\n")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(*PLUGIN, "--subprocess")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: subprocess_preload: cannot import 'no_such_module'*"])
    assert "ResourceWarning" not in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


@pytest.mark.usefixtures("no_plugin_autoload")
def test_exit_handlers_registered_as_pytest_configures_run_once(pytester: pytest.Pytester) -> None:
    """The template configures pytest too, and exits without running what that registered."""
    pytester.makeconftest(
        """
        import atexit, os

        def pytest_configure(config):
            atexit.register(lambda: open("exits.txt", "a").write(f"{os.getpid()}\\n"))
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.subprocess
        def test_in_worker():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert len((pytester.path / "exits.txt").read_text().split()) == 1
