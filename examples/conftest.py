"""Nothing to set up: the plugin registers itself when pytest_subproc is installed."""
