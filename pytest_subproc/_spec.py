"""What crosses to the worker for one marked test: its BodySpec, built at setup.

Fixture values are pickled one by one so a failure names the fixture; the
test's class instance travels as the parent set it up; ``request`` becomes
a record of its read-only facts.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from typing import Any, NoReturn, Optional

import pytest

from pytest_subproc import _compat, _runbody
from pytest_subproc._codec import PROTOCOL as PICKLE_PROTOCOL

SPEC = pytest.StashKey[_runbody.BodySpec]()


class SubprocessWarning(pytest.PytestWarning):
    """Something done in the parent for a marked test cannot reach its worker."""


def _pickled(item: pytest.Function, name: str) -> bytes:
    try:
        return pickle.dumps(item.funcargs[name], protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        why = f"cannot be sent to the subprocess worker: {type(exc).__name__}: {exc}"
        unsendable(item, name, why)


def unsendable(item: pytest.Function, name: str, why: str) -> NoReturn:
    # An error at setup whose message says it all: the plugin's frames would hide it.
    pytest.fail(f"fixture {name!r} of {item.nodeid} {why}", pytrace=False)


def _picklable_options(config: pytest.Config) -> dict[str, Any]:
    options = {}
    for name, value in vars(config.option).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        options[name] = value
    return options


def _request_facts(item: pytest.Function) -> _runbody.RequestFacts:
    callspec = getattr(item, "callspec", None)
    markers = []
    for mark in item.iter_markers():
        try:
            pickle.dumps((mark.args, mark.kwargs))
            markers.append((mark.name, mark.args, dict(mark.kwargs)))
        except Exception:
            markers.append((mark.name, (), {}))
    node = _runbody.NodeFacts(
        name=item.name,
        nodeid=item.nodeid,
        keywords=tuple(item.keywords),
        params=dict(callspec.params) if callspec is not None else {},
        markers=tuple(markers),
    )
    return _runbody.RequestFacts(node, _runbody.ConfigFacts(_picklable_options(item.config)))


def build_spec(item: pytest.Function, verbosity: int) -> _runbody.BodySpec:
    """Collect what the worker needs for this test; fail naming any fixture that cannot cross."""
    argnames = _compat.function_argnames(item)
    builtins = {n: n for n in argnames if n in _compat.COUNTERPARTS}
    values = {n: _pickled(item, n) for n in argnames if n not in builtins}
    cls = item.cls
    qualname = getattr(item, "originalname", item.name)
    if cls is not None:
        qualname = f"{cls.__qualname__}.{qualname}"
    module = item.module
    return _runbody.BodySpec(
        module_name=module.__name__,
        module_path=str(getattr(module, "__file__", None) or item.path),
        qualname=qualname,
        values=values,
        builtins=builtins,
        request=_request_facts(item) if "request" in builtins else None,
        verbosity=verbosity,
        instance=_instance(item),
        log_level=logging.getLogger().getEffectiveLevel(),
    )


def _instance(item: pytest.Function) -> Optional[bytes]:
    """The test's class instance, pickled, or None (the worker makes a fresh one)."""
    instance = getattr(item, "instance", None)
    if instance is None:
        return None
    try:
        return pickle.dumps(instance, protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        if vars(instance):  # a fresh instance would miss what setup put there
            warnings.warn(
                SubprocessWarning(
                    f"the {type(instance).__name__} instance of {item.nodeid} cannot be sent to "
                    f"its subprocess worker ({type(exc).__name__}: {exc}); the body runs on a "
                    f"fresh instance, without the attributes {sorted(vars(instance))}"
                ),
                stacklevel=2,
            )
        return None


def warn_parent_patches(item: pytest.Function) -> None:
    """Warn about parent-side monkeypatches the worker cannot see."""
    mp: Optional[pytest.MonkeyPatch] = item.funcargs.get("monkeypatch")  # type: ignore[assignment]
    targets = _compat.monkeypatch_targets(mp) if mp is not None else []
    if targets:
        warnings.warn(
            SubprocessWarning(
                f"{item.nodeid} runs in a subprocess worker, but monkeypatch changed "
                f"{', '.join(targets)} in the parent only; the test body will not see it. "
                "Patch inside the test body instead."
            ),
            stacklevel=2,
        )
