"""Shared pytest set-up for the test suite."""


def pytest_configure(config):
    # `pytest -m "not slow"` skips the tests that take minutes (e.g. rebuilding the tiny model)
    config.addinivalue_line("markers", "slow: takes minutes; deselect with -m 'not slow'")
