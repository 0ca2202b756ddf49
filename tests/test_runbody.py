"""The worker side of a marked test: importing the module, and reusing the parent's rewrite."""

from __future__ import annotations

import marshal
import sys
from pathlib import Path

import pytest

from pytest_subproc import _compat, _runbody


def test_a_module_is_imported_with_assertion_rewriting(tmp_path: Path) -> None:
    path = tmp_path / "mod_rewritten.py"
    path.write_text("def check():\n    x = 1\n    assert x == 2\n")
    try:
        module = _runbody.import_test_module("mod_rewritten", str(path))
        with pytest.raises(AssertionError, match="assert 1 == 2"):
            module.check()
        assert _runbody.import_test_module("mod_rewritten", str(path)) is module
    finally:
        sys.modules.pop("mod_rewritten", None)


def test_the_parents_code_is_used_instead_of_rewriting(tmp_path: Path) -> None:
    path = tmp_path / "mod_shipped.py"
    path.write_text("ORIGIN = 'rewritten here'\n")
    code = marshal.dumps(compile("ORIGIN = 'sent by the parent'\n", str(path), "exec"))
    try:
        module = _runbody.import_test_module("mod_shipped", str(path), code)
        assert module.ORIGIN == "sent by the parent"
    finally:
        sys.modules.pop("mod_shipped", None)


def test_the_code_pytest_rewrites_is_kept(pytester: pytest.Pytester) -> None:
    path = pytester.makepyfile(test_kept="def test_it():\n    x = 1\n    assert x == 1\n")
    with _compat.rewritten_modules_kept():
        pytester.inline_run("-p", "no:cacheprovider", "-p", "no:subproc").assertoutcome(passed=1)
    code = _compat.rewritten_code(str(path))
    assert code is not None
    test_it = next(
        c for c in marshal.loads(code).co_consts if getattr(c, "co_name", "") == "test_it"
    )
    assert any(name.startswith("@py_assert") for name in test_it.co_varnames)


BODIES = """
import logging, warnings

def test_quiet():
    assert True

def test_warns():
    warnings.warn("careful", UserWarning)

def test_logs():
    logging.getLogger("body").warning("noted %s", 1)

def test_fails():
    assert 1 == 2

def test_returns():
    return 5
"""


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("test_quiet", None),
        ("test_warns", "warnings"),
        ("test_logs", "records"),
        ("test_fails", "error"),
        ("test_returns", "returned"),
    ],
)
def test_a_body_with_nothing_to_report_returns_none(
    tmp_path: Path, name: str, expect: str | None
) -> None:
    path = tmp_path / "mod_bodies.py"
    path.write_text(BODIES)
    try:
        spec = _runbody.BodySpec("mod_bodies", str(path), name)
        result = _runbody.run_body(spec)
    finally:
        sys.modules.pop("mod_bodies", None)
    if expect is None:
        assert result is None
    else:
        assert result is not None
        assert getattr(result, expect)
