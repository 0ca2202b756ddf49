"""The worker's Mirror and ``applied``: the parent's environment, cwd and sys.path, applied.

They change this process's own os.environ, cwd and sys.path, as they would a
worker's: each test here gets all three put back afterwards.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _inner import ProcessState

from pytest_subproc._child import Mirror, applied


@pytest.fixture(autouse=True)
def _put_back() -> Iterator[None]:
    """Put back this process's environment, cwd and sys.path, whatever the test did."""
    state = ProcessState()
    yield
    state.restore()


@pytest.fixture
def scratch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Two variables set, and those the tests set unset (``_put_back`` unsets them after)."""
    for name in ("SUBPROC_KEEP", "SUBPROC_GONE", "SUBPROC_NEW", "SUBPROC_BEHIND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBPROC_KEEP", "1")
    monkeypatch.setenv("SUBPROC_GONE", "1")
    return monkeypatch


def test_mirror_applies_changes_touching_only_what_differs(
    scratch_env: pytest.MonkeyPatch,
) -> None:
    mirror = Mirror()
    target = {k: v for k, v in os.environ.items() if k != "SUBPROC_GONE"}
    mirror.enter({"env": {**target, "SUBPROC_NEW": "2"}})
    assert "SUBPROC_GONE" not in os.environ
    assert os.environ["SUBPROC_NEW"] == "2"
    touched: list[str] = []
    putenv = os.putenv
    scratch_env.setattr(os, "putenv", lambda k, v: (touched.append(os.fsdecode(k)), putenv(k, v)))
    mirror.enter({"env_changes": {"SUBPROC_NEW": "3", "SUBPROC_KEEP": "1"}})
    assert os.environ["SUBPROC_NEW"] == "3"
    assert touched == ["SUBPROC_NEW"]


def test_mirror_undoes_what_changed_behind_its_back(scratch_env: pytest.MonkeyPatch) -> None:
    mirror = Mirror()
    mirror.enter({"env": dict(os.environ)})
    os.environ["SUBPROC_BEHIND"] = "set by a test body"
    os.environ["SUBPROC_KEEP"] = "changed by a test body"
    mirror.enter({"env_changes": {}})
    assert "SUBPROC_BEHIND" not in os.environ
    assert os.environ["SUBPROC_KEEP"] == "1"


def test_mirror_puts_back_the_cwd_and_path_the_parent_no_longer_sends(tmp_path: Path) -> None:
    # The parent sends them only when they change; a body may have moved ours.
    # The parent has sent no environment yet: this mirror empties os.environ.
    here = os.getcwd()
    mirror = Mirror()
    mirror.enter({"cwd": here, "path": ["a"]})
    os.chdir(tmp_path)
    sys.path.append("b")
    mirror.enter({"env_changes": {}})
    assert (os.getcwd(), sys.path) == (here, ["a"])


def test_applied_puts_back_environment_cwd_and_path(
    scratch_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cwd, path = os.getcwd(), list(sys.path)
    env = {k: v for k, v in os.environ.items() if k != "SUBPROC_GONE"}
    where = str(tmp_path.resolve())
    with applied({"env": {**env, "SUBPROC_NEW": "x"}, "cwd": where, "path": ["p"]}):
        assert (os.environ["SUBPROC_NEW"], "SUBPROC_GONE" in os.environ) == ("x", False)
        assert (os.getcwd(), sys.path) == (where, ["p"])
    assert ("SUBPROC_NEW" in os.environ, os.environ["SUBPROC_GONE"]) == (False, "1")
    assert (os.getcwd(), sys.path) == (cwd, path)
