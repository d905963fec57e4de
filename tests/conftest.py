"""Test session setup: no network, a private cache for the tiny SD, the `slow` marker."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Never reach the hub from a test: a missing model must fail fast with our one-line error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Keep the CPU tests from oversubscribing the 2 cores when several subprocesses run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end checks (still run by default)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
