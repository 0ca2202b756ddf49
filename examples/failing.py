"""What a crash and a timeout look like in the report: both tests fail on purpose.

Not collected with the other examples (its name does not start with
``test_``); ``tox -e examples`` runs it on its own, second, and expects it to
fail.
"""

import ctypes
import time

import pytest


@pytest.mark.subprocess
def test_segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


@pytest.mark.subprocess(timeout=1)
def test_hang():
    time.sleep(60)
