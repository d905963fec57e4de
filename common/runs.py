"""What every training loop needs and no method is about: processes and precision, seeding, the run folder,
atomic checkpoints, the stop on SIGTERM / SIGINT and `metrics.json`. Each is called by name in the scripts'
`train()`; the loop itself (log line, evaluation, save and resume) is written out there.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common.cli import Stopped, UserError, log


# ---- processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), device, determinism ----
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    is_main = property(lambda self: self.rank == 0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:  # in place over the processes
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel (gradients averaged over processes) when launched by torchrun."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def init_distributed(device: str, deterministic: bool) -> tuple[Dist, str]:
    """-> (Dist, what same-seed runs guarantee). NCCL on GPUs, gloo on CPUs; one process without torchrun.
    CPU: oneDNN's deterministic mode (some backward kernels reduce in a thread-dependent order), so same seed +
    thread count = bit-identical. CUDA: deterministic kernels only with --deterministic (slower)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"error: --device {device}: not available here. Expected auto, cpu or cuda (with a GPU).")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    torch.backends.mkldnn.deterministic = True
    if not cuda:
        return Dist(rank, world, local, dev), "CPU: same seed and thread count -> bit-identical runs and resume"
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        return Dist(rank, world, local, dev), "CUDA --deterministic: bit-identical on the same GPU model"
    return Dist(rank, world, local, dev), "CUDA: equal up to float rounding (--deterministic: bit-identical)"


# ---- precision: bf16 autocast where the GPU has it, else fp16 + GradScaler; fp32 on CPU ----
@dataclass
class Precision:
    amp_dtype: Optional[torch.dtype]  # autocast dtype of the trained parts; None = fp32
    use_scaler: bool                  # fp16 needs loss scaling
    frozen_dtype: torch.dtype         # storage dtype of the frozen SD parts (inference only)
    device_type: str
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype
                else contextlib.nullcontext())

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def choose_precision(name: str, device: torch.device) -> Precision:
    """--precision auto | fp32 | bf16 | fp16. bf16 / fp16 on a CPU take the GPU's code path (slow; a check)."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"error: --precision: unknown value '{name}'. Expected auto, fp32, bf16 or fp16.")
    cuda = device.type == "cuda"
    if name == "fp32" or (name == "auto" and not cuda):
        return Precision(None, False, torch.float32, device.type, f"fp32 ({'asked' if name == 'fp32' else 'CPU'})")
    if cuda and name != "fp16" and not torch.cuda.is_bf16_supported():
        if name == "bf16":
            raise UserError("error: --precision bf16: this GPU has no bf16. Expected --precision fp16 or auto.")
        name = "fp16"
    name = "bf16" if name == "auto" else name
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    why = f"{name} autocast{' + GradScaler' if name == 'fp16' else ''}, frozen parts in {name}"
    return Precision(dtype, name == "fp16", dtype, device.type, why + ("" if cuda else " (CPU: a check, slow)"))


# ---- seeding; the RNG states go into every checkpoint, so a resumed run continues bit for bit ----
def seed_everything(seed: int) -> None:
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)


def get_rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(), cuda=cuda)


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"]), np.random.set_state(s["numpy"]), torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- run folder and checkpoints: <out>/checkpoints/step_XXXXXXX/{weights.safetensors, state.pt} ----
def prepare_out_dir(out: Path, resume: bool, demo: bool, is_main: bool) -> Path:
    """Refuse an unwritable --out, and one with checkpoints (a user's earlier run) unless --resume; the demo's
    folder holds only generated output and starts over."""
    ckpts = out / "checkpoints"
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch(), (out / ".write-test").unlink()
        except OSError as e:
            raise UserError(f"error: --out: cannot write to '{out}' ({e.strerror}). Expected a writable folder.")
        if not resume and latest_checkpoint(out):
            if not demo:
                raise UserError(f"error: --out: '{out}' already holds checkpoints of an earlier run. Pass "
                                "--resume to continue it, or a new --out to start another run.")
            shutil.rmtree(ckpts), (out / "metrics.json").unlink(missing_ok=True)
    return out


def save_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Atomic: written to a temporary folder, fsynced, renamed; a kill leaves the new checkpoint or none, and
    the previous one stays loadable. Keeps the newest `keep` (<= 0: all)."""
    from safetensors.torch import save_file
    root, final = out / "checkpoints", out / "checkpoints" / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in (tmp / "weights.safetensors", tmp / "state.pt"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # the same step saved twice (e.g. a stop at a periodic save)
    os.rename(tmp, final)
    fd = os.open(root, os.O_RDONLY)  # the rename itself survives a power loss
    os.fsync(fd), os.close(fd)
    done = sorted(p for p in root.iterdir() if p.name[5:].isdigit())
    stale = [p for p in root.glob("step_*.tmp-*") if p != tmp]  # left by a process killed mid-write
    for old in (done[:-keep] if keep > 0 else []) + stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if p.name[5:].isdigit()
                  and (p / "state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, flag: str = "--ckpt") -> tuple[dict, dict]:
    """(weights, state) of a checkpoint folder (or its weights.safetensors); one-line error when it is none."""
    from safetensors.torch import load_file
    p = Path(path)
    wfile = p if p.is_file() else p / "weights.safetensors"
    if not wfile.is_file():
        raise UserError(f"error: {flag}: no checkpoint at '{p}'. Expected a folder <out>/checkpoints/step_XXXXXXX "
                        "written by this script.")
    try:
        st = wfile.parent / "state.pt"
        return load_file(str(wfile)), (torch.load(st, "cpu", weights_only=False) if st.exists() else {})
    except Exception as e:  # truncated or foreign file
        raise UserError(f"error: {flag}: cannot read '{p}' ({type(e).__name__}). Expected a complete checkpoint "
                        "written by this script.") from None


def check_finite(loss: torch.Tensor, step: int, out: Optional[Path] = None) -> None:
    """A NaN / inf loss ends the run with one line; the last complete checkpoint stays."""
    if not bool(torch.isfinite(loss.detach()).all()):
        last = latest_checkpoint(Path(out)) if out else None
        raise UserError(f"error: training: non-finite loss ({float(loss.detach())}) at step {step}. Expected a "
                        f"finite loss; lower --lr or use --precision fp32.{f' --resume continues from {last}.' if last else ''}")


# ---- preemption: SIGTERM / SIGINT only set a flag; the loop stops at a step boundary, after a checkpoint ----
class StopOnSignal:
    """`for i in stop.steps(start, total):` installs the handlers (and restores them after). The body calls
    `stop.requested()` (a collective: the signal number all-reduced with MAX, so every torchrun rank stops
    after the same step, whichever was signalled) and saves a checkpoint when it is true; after that step the
    loop prints `stopped by SIGTERM at step N: checkpoint written, continue with --resume` and raises Stopped.
    A second signal changes nothing. `offset`: added to the step in that line; `redo`: a loop without
    checkpoints of its own (TTDA) names the checkpoint at step `offset` and says it starts over."""

    def __init__(self, dist: Dist):
        self.dist, self.signum, self.agreed = dist, 0, None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # only a flag: no I/O in a signal handler

    def requested(self) -> bool:
        t = torch.tensor([self.signum], device=self.dist.device)
        if self.dist.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        self.agreed = int(t)
        return self.agreed > 0

    def steps(self, start: int, total: int, offset: int = 0, redo: str = ""):
        sigs = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
        previous = {s: signal.signal(s, self._handle) for s in sigs}
        try:
            for i in range(start, total):
                self.agreed = None
                yield i
                if (self.agreed if self.agreed is not None else self.requested()):
                    self.dist.barrier()  # rank 0 has written the checkpoint
                    name = signal.Signals(self.agreed).name
                    line = (f"stopped by {name} at step {offset + i + 1}: checkpoint written, continue with "
                            "--resume" if not redo else f"stopped by {name} at step {offset}: checkpoint written, "
                            f"continue with --resume ({redo} starts over; it stopped after step {i + 1} of {total})")
                    log(line) if self.dist.is_main else None
                    raise Stopped(line)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

