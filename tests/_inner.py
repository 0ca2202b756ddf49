"""Helpers shared by the acceptance tests that drive an inner pytest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest


def read_pids(path: Path) -> dict[str, int]:
    pids = {}
    for line in path.read_text().splitlines():
        tag, pid = line.split()
        pids[tag] = int(pid)
    return pids


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: Iterable[int], timeout: float = 5.0) -> None:
    """Every pid has exited within ``timeout`` seconds (the run left nothing behind)."""
    deadline = time.monotonic() + timeout
    alive = {pid for pid in pids if pid != os.getpid()}
    while alive:
        alive = {pid for pid in alive if running(pid)}
        if alive and time.monotonic() > deadline:
            pytest.fail(f"processes outlived the inner run: {sorted(alive)}")
        time.sleep(0.05)
