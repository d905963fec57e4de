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


# ---- The longest subprocess checks run beside the in-process tests ---------------------------------------------
# Tests run one at a time and most use one core of this project's two. The longest subprocess checks (three demos,
# MADM's adaptation pair, the GPU check's dry run) start as soon as collection ends, one at a time and one thread
# each on the other core; their tests run last and check the results. Same commands and assertions: only the start
# time moves. {out} is a fresh folder per job.
BACKGROUND_JOBS = {
    "madm-demo": ("test_madm.py::test_demo_end_to_end", ["madm.py", "--demo", "--out", "{out}"]),
    "iccld-demo": ("test_iccld.py::test_demo_end_to_end_and_learns", ["iccld.py", "--demo", "--out", "{out}"]),
    "diff-demo": ("test_diff.py::test_demo_end_to_end", ["diff.py", "--demo", "--out", "{out}"]),
    **{f"madm-adapt-{v}": ("test_madm.py::test_adapts_on_mini",
                           ["madm.py", "--demo", "--iters", "30", "--seed", "0", "--eval-every", "30", "--ckpt-every",
                            "30", "--log-every", "5", "--out", "{out}", *(["--source-only"] if v == "base" else [])])
       for v in ("base", "full")},
    "gpu-check": ("test_benchmarks.py::test_gpu_check_dry_run_runs_the_whole_sequence_on_the_cpu",
                  ["benchmarks/gpu_check.sh", "--dry-run", "--out", "{out}/out", "--work", "{out}/work"]),
}
_jobs: dict = {}


def _run_job(name: str, out: Path):
    """The job's command (a .sh through bash, with this interpreter first on PATH; else this interpreter)."""
    args = [a.replace("{out}", str(out)) for a in BACKGROUND_JOBS[name][1]]
    cmd = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)


def pytest_collection_modifyitems(session, config, items):
    """The tests that check a background job run last: the jobs have had the whole session to run."""
    waits = [i for i in items if any(test in i.nodeid for test, _ in BACKGROUND_JOBS.values())]
    items[:] = [i for i in items if i not in waits] + waits


def pytest_collection_finish(session):
    import tempfile
    import threading
    names = [n for n, (test, _) in BACKGROUND_JOBS.items() if any(test in item.nodeid for item in session.items)]
    if not names:
        return
    root = Path(tempfile.mkdtemp(prefix="bg-jobs-"))
    for n in names:
        _jobs[n] = {"done": threading.Event(), "out": root / n}

    def work():
        for n in names:
            try:
                _jobs[n]["proc"] = _run_job(n, _jobs[n]["out"])
            except Exception as e:  # reported by the test that waits for it
                _jobs[n]["error"] = e
            _jobs[n]["done"].set()
    threading.Thread(target=work, daemon=True).start()


def background(name: str):
    """(CompletedProcess, out folder) of a job started at collection (run here if its test was not collected
    with the others, e.g. called by name)."""
    if name not in _jobs:  # started on demand
        import tempfile
        out = Path(tempfile.mkdtemp(prefix="bg-jobs-")) / name
        return _run_job(name, out), out
    job = _jobs[name]
    job["done"].wait()
    if "error" in job:
        raise job["error"]
    return job["proc"], job["out"]
