"""Marker, command line and ini resolved into one frozen settings value per test."""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import pytest

from pytest_subproc._template import fork_supported
from pytest_subproc._zygote import thread_count

MARKER = "subprocess"
SCOPES = ("session", "module", "function")
DEFAULT_SCOPE = "module"

# The longest timeout kept as a limit, in seconds (about 23 days). Waits are
# bounded by poll()'s milliseconds in a C int (24.8 days), and by the clocks
# of faulthandler and time_t further on; a longer timeout can fire in no
# test run, so it is taken to mean none rather than fail in any of them.
MAX_TIMEOUT = 2_000_000.0

# Help texts shared by the command line options and the ini keys.
ALL_HELP = (
    "Run every test in a worker (module-scoped by default: tests of a module share one; "
    "see --subprocess-scope)."
)
ALL_INI_HELP = (
    "Bool (true/false): run every test in a worker (module-scoped by default: tests of "
    "a module share one; see subprocess_scope)."
)
SCOPE_HELP = (
    "Life of a subprocess worker: 'session', 'module' (default) or 'function' (one per test)."
)
START_HELP = (
    "How workers start: 'fork' them from a template process that has imported pytest "
    "(default where the platform allows) or 'spawn' a fresh interpreter for each."
)
TIMEOUT_HELP = (
    "Timeout in seconds for one test body run in a subprocess worker "
    f"(default: none; over {MAX_TIMEOUT:.0f}, about 23 days, counts as none)."
)
PRELOAD_HELP = (
    "Modules to import once in the template process the workers are forked from, "
    "so that every worker starts with them (ini: separated by whitespace)."
)
MARKER_HELP = (
    "subprocess(scope='module', timeout=None): run the test body in a warm subprocess "
    "worker whose life follows the given pytest scope; fail it after timeout seconds."
)


@dataclass(frozen=True)
class Settings:
    """How one test runs: whether it is isolated, in which worker scope, with which timeout."""

    isolated: bool
    scope: str = DEFAULT_SCOPE
    timeout: Optional[float] = None


def parse_scope(value: object, origin: str) -> str:
    """Return a valid scope name or raise a UsageError naming ``origin``."""
    if value in SCOPES:
        return str(value)
    raise pytest.UsageError(
        f"Invalid subprocess scope {value!r} from {origin}; expected one of {', '.join(SCOPES)}"
    )


def parse_timeout(value: object, origin: str) -> Optional[float]:
    """Return a timeout in seconds (None for none) or raise a UsageError naming ``origin``."""
    if value is None or value == "":
        return None
    seconds = _seconds(value)
    if math.isnan(seconds) or seconds <= 0:
        raise pytest.UsageError(
            f"Invalid subprocess timeout {value!r} from {origin}; "
            "expected a positive number of seconds"
        )
    return usable_timeout(seconds)


def _seconds(value: object) -> float:
    """value as a float, NaN where it is no number, infinite where it is too big for one."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    except OverflowError:  # an int beyond any float
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


def usable_timeout(seconds: float) -> Optional[float]:
    """Return a positive timeout (int or float) as it can be waited for: None beyond MAX_TIMEOUT."""
    return None if seconds > MAX_TIMEOUT else float(seconds)


def default_start() -> str:
    """Fork workers from a template where the platform can, else spawn each."""
    return "fork" if fork_supported() else "spawn"


def parse_start(value: object, origin: str) -> str:
    """Return a valid start method or raise a UsageError naming ``origin``."""
    if value == "spawn" or (value == "fork" and fork_supported()):
        return str(value)
    if value == "fork":
        raise pytest.UsageError(f"Subprocess start method 'fork' from {origin} needs POSIX")
    raise pytest.UsageError(
        f"Invalid subprocess start method {value!r} from {origin}; expected fork or spawn"
    )


def parse_bool(value: object, origin: str) -> bool:
    """Return an ini boolean, or raise a UsageError naming ``origin``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise pytest.UsageError(f"Invalid boolean {value!r} from {origin}")


@dataclass(frozen=True)
class Defaults:
    """The run-wide settings from the command line and ini, already validated."""

    isolate_all: bool
    scope: str
    timeout: Optional[float]
    start: str = "fork"
    preload: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: pytest.Config) -> Defaults:
        """Read and validate the command line, falling back to the ini file."""
        return cls(
            isolate_all=bool(config.getoption("subprocess_all"))
            or parse_bool(config.getini("subprocess_all"), "ini subprocess_all"),
            scope=_option(config, "scope", parse_scope, DEFAULT_SCOPE),
            timeout=_option(config, "timeout", parse_timeout, None),
            start=_option(config, "start", parse_start, default_start()),
            preload=parse_preload(
                [
                    *config.getini("subprocess_preload"),
                    *(config.getoption("subprocess_preload") or ()),
                ]
            ),
        )


def forks_every_test(early_config: pytest.Config) -> bool:
    """Whether, by the options parsed so far, every test will run in a forked worker.

    Read before pytest configures itself; a bad value is not an error here:
    the configuration says so.
    """
    known = early_config.known_args_namespace
    try:
        isolate_all = bool(getattr(known, "subprocess_all", False)) or parse_bool(
            early_config.getini("subprocess_all"), "ini subprocess_all"
        )
        start = getattr(known, "subprocess_start", None) or early_config.getini("subprocess_start")
        start = parse_start(start, "") if start else default_start()
    except (pytest.UsageError, ValueError):
        return False
    return isolate_all and start == "fork" and not runs_no_test(known)


# pytest's options that show something instead of running the tests.
_SHOW_ONLY = (
    "help",
    "version",
    "collectonly",
    "showfixtures",
    "show_fixtures_per_test",
    "markers",
    "cacheshow",
)


def runs_no_test(options: Any) -> bool:
    """Whether pytest, by these options, shows something (help, fixtures...) and runs no test."""
    return any(getattr(options, name, None) for name in _SHOW_ONLY)


def _option(config: pytest.Config, name: str, parse: Any, default: Any) -> Any:
    value = config.getoption(f"subprocess_{name}")
    if value is not None:
        return parse(value, f"--subprocess-{name}")
    raw = config.getini(f"subprocess_{name}")
    return parse(raw, f"ini subprocess_{name}") if raw else default


def parse_preload(names: list[str]) -> tuple[str, ...]:
    """Return the module names to preload, each once, or raise a UsageError naming a bad one."""
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise pytest.UsageError(f"subprocess_preload: {name!r} is not a module name")
    return tuple(dict.fromkeys(names))


def check_preload(names: tuple[str, ...]) -> None:
    """Import each module here first: one that fails, or starts a thread, is a UsageError.

    Workers are forked from a process that has imported them, and a process
    with threads cannot be forked safely. A module imported here already
    cannot be seen to start a thread; the template refuses to fork then.
    """
    for name in names:
        fresh, threads = name not in sys.modules, thread_count()
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise pytest.UsageError(
                f"subprocess_preload: cannot import {name!r}: {type(exc).__name__}: {exc}"
            ) from None
        if fresh and thread_count() > threads:
            raise pytest.UsageError(
                f"subprocess_preload: importing {name!r} starts a thread, and workers are "
                "forked from the process that imports it: a process with threads cannot be "
                "forked safely. Import it in the tests instead, or keep it from starting a "
                "thread at import (for a BLAS, set OPENBLAS_NUM_THREADS=1 or the like)."
            )


def for_item(item: pytest.Item, defaults: Defaults) -> Settings:
    """Resolve the settings of one test: the closest marker wins over the run's defaults."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return Settings(
            isolated=defaults.isolate_all, scope=defaults.scope, timeout=defaults.timeout
        )
    origin = f"the subprocess marker of {item.nodeid}"
    if marker.args:
        raise pytest.UsageError(f"{origin} takes keyword arguments only, got {marker.args!r}")
    unknown = set(marker.kwargs) - {"scope", "timeout"}
    if unknown:
        raise pytest.UsageError(f"Unknown argument(s) {sorted(unknown)} in {origin}")
    scope = marker.kwargs.get("scope", defaults.scope)
    timeout = marker.kwargs.get("timeout", defaults.timeout)
    return Settings(
        isolated=True,
        scope=parse_scope(scope, origin),
        timeout=parse_timeout(timeout, origin),
    )
