"""The plugin registers itself when pytest_subproc is installed; this only helps the examples."""

import os


def pytest_configure(config):
    # Marked tests run in workers, which configure pytest too, from this same
    # conftest. pytest's own process configures first and starts its workers
    # with its environment, so this keeps its pid for the tests to compare.
    os.environ.setdefault("EXAMPLES_PYTEST_PID", str(os.getpid()))
