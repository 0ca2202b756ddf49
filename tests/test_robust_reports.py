"""Acceptance tests: what the plugin does to a test harms that test alone, and says so.

Rebuilding a fixture value in the worker runs the user's code, so it has the
test's deadline; a crash or a timeout there is that test's error at setup.
The plugin's own warnings never abort the run; an exception comes back as its
own type even when part of it cannot travel; a broken channel to the worker
reads as a sentence, not as the plugin's internals.

Inner runs start with plugin autoloading off and ``-p pytest_subproc.plugin``:
the other installed plugins only slow the runs down.
"""

from __future__ import annotations

import pytest
from _inner import run_inner as run

pytestmark = pytest.mark.usefixtures("no_plugin_autoload")


# --------------------------------------------------------------------------
# Exceptions that do not pickle whole
# --------------------------------------------------------------------------

PARTLY_PICKLABLE = """
import threading

import pytest

pytestmark = pytest.mark.subprocess


class FrozenError(AttributeError):
    def __init__(self):
        super().__init__("can't set attribute")


@pytest.mark.xfail(raises=ValueError, strict=True)
def test_attribute_that_does_not_pickle():
    exc = ValueError("x")
    exc.lock = threading.Lock()
    raise exc


@pytest.mark.xfail(raises=FrozenError, strict=True)
def test_init_that_does_not_take_its_args():
    raise FrozenError()


def test_frozen_error_reads_as_itself():
    raise FrozenError()
"""


def test_exceptions_that_do_not_pickle_whole_keep_their_type(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_partly=PARTLY_PICKLABLE)
    result = run(pytester, "--tb=short")
    result.assert_outcomes(xfailed=2, failed=1)
    result.stdout.fnmatch_lines(["*E   test_partly.FrozenError: can't set attribute"])
    assert "UnserializableException" not in result.stdout.str()
