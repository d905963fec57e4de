"""Test session setup: no network, a private cache for the tiny SD, the `slow` marker."""
import os
import socket
import subprocess
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
# The scripts' CPU numerics (their init_distributed sets it before any computation; MKL reads it once, at its first
# call, which in a test session may come from an earlier test): in-process runs compute as `python madm.py` does.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end checks (still run by default)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def run_two_gloo_processes(script: str, out: Path, env: dict, timeout: int = 600) -> list:
    """Run `python -c script out` as ranks 0 and 1 of a 2-process gloo group (the variables torchrun sets) and
    return what each rank saved to `out/rank{r}.pt`; a failing rank fails the test with its stderr."""
    import torch
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def sigterm_on_call(fn, call: int):
    """`fn`, wrapped to send SIGTERM to this process when it is called for the `call`-th time (1-based),
    before running it: a preemption arriving in the middle of a training step. Sent only while a
    `runs.StopOnSignal` handler is installed (otherwise it would end pytest); its absence fails the
    test."""
    import signal
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            handler = signal.getsignal(signal.SIGTERM)
            assert type(getattr(handler, "__self__", None)).__name__ == "StopOnSignal", "no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    return wrapped
