"""Shared pytest set-up for the test suite."""

import os

# Set before torch is imported anywhere: spinning OpenMP threads make in-process vLLM and TRL
# runs several times slower on 2 cores (see ../shared/notes/vllm-on-cpu.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


def pytest_configure(config):
    # `pytest -m "not slow"` skips the tests that take minutes (e.g. rebuilding the tiny model)
    config.addinivalue_line("markers", "slow: takes minutes; deselect with -m 'not slow'")
