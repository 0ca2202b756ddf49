"""Drive a worker process by hand with the ``subworker`` fixture.

The tests of this module share one worker (the default module scope), so a
name defined by one request is there for the next.
"""

import os

import pytest

import pytest_subproc


def test_run_then_load(subworker):
    subworker.run(
        """
        import json
        encoded = json.dumps({"answer": 42})
        """
    )
    assert subworker.load("encoded") == '{"answer": 42}'


def test_store_then_run(subworker):
    subworker.store("numbers", [3, 1, 2])
    subworker.run("numbers.sort()")
    assert subworker.load("numbers") == [1, 2, 3]


def test_call_runs_in_another_process(subworker):
    assert subworker.alive
    assert subworker.call(os.getpid) == subworker.pid
    assert subworker.pid != os.getpid()


def test_errors_come_back_as_themselves(subworker):
    with pytest.raises(ZeroDivisionError):
        subworker.run("1 / 0")


@pytest.mark.xfail(raises=pytest_subproc.WorkerCrashed, strict=True)
def test_a_crash_fails_only_this_test(subworker):
    subworker.run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")


def test_after_a_crash_the_next_request_gets_a_new_worker(subworker):
    with pytest.raises(pytest_subproc.WorkerCrashed) as info:
        subworker.run("import os; os._exit(3)")
    assert info.value.exitcode == 3
    subworker.run("x = 1")
    assert subworker.load("x") == 1
