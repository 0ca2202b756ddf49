"""Mark a test and its body runs in a worker process, not in pytest."""

import ctypes
import decimal
import os

import pytest

import pytest_subproc


@pytest.fixture
def pytest_pid():
    # A marked test's fixtures run in its worker, with the test: this one
    # reads the pid the pytest process left in the environment (conftest.py).
    return int(os.environ["EXAMPLES_PYTEST_PID"])


@pytest.mark.subprocess
def test_runs_in_the_module_worker(pytest_pid, tmp_path):
    assert os.getpid() != pytest_pid
    (tmp_path / "note.txt").write_text("written by the worker")
    assert (tmp_path / "note.txt").read_text() == "written by the worker"


@pytest.mark.subprocess
def test_may_change_global_state():
    decimal.getcontext().prec = 3  # only the worker's context changes
    assert str(decimal.Decimal(1) / 3) == "0.333"


def test_the_pytest_process_never_saw_it():
    assert decimal.getcontext().prec == 28


@pytest.mark.subprocess(scope="function")
def test_gets_a_process_of_its_own(pytest_pid):
    assert os.getpid() != pytest_pid


@pytest.mark.subprocess(timeout=1)
@pytest.mark.xfail(raises=pytest_subproc.WorkerTimeout, strict=True)
def test_a_hang_is_cut_short():
    import time

    time.sleep(60)


@pytest.mark.xfail(raises=pytest_subproc.WorkerCrashed, strict=True)
@pytest.mark.subprocess
def test_a_segfault_fails_only_this_test():
    ctypes.string_at(0)  # reads address 0: SIGSEGV
