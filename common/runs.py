"""What every training loop needs and no method is about, each called by name in the scripts' `train()`: the
run folder, atomic checkpoints, a NaN check and the stop on SIGTERM / SIGINT. `dist`: a script's Dist."""
from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from common.cli import Stopped, UserError, log


# ---- run folder and checkpoints: <out>/checkpoints/step_XXXXXXX/{weights.safetensors, state.pt} ----
def prepare_out_dir(out: Path, resume: bool, demo: bool, is_main: bool) -> Path:
    """Refuse an unwritable --out, and one with checkpoints (a user's earlier run) unless --resume; the demo's
    folder holds only generated output and starts over."""
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch(), (out / ".write-test").unlink()
        except OSError as e:
            raise UserError(f"error: --out: cannot write to '{out}' ({e.strerror}). Expected a writable folder.")
        if not resume and latest_checkpoint(out) and not demo:
            raise UserError(f"error: --out: '{out}' already holds checkpoints of an earlier run. Pass --resume to "
                            "continue it, or a new --out to start another run.")
        if not resume and latest_checkpoint(out):
            shutil.rmtree(out / "checkpoints"), (out / "metrics.json").unlink(missing_ok=True)
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
    ok = sorted(p for p in (out / "checkpoints").glob("step_*") if p.name[5:].isdigit() and (p / "state.pt").exists())
    return ok[-1] if ok else None


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
                        "finite loss; lower --lr or use --precision fp32." + (f" --resume continues from {last}."
                                                                              if last else ""))


class StopOnSignal:
    """Preemption. `for i in stop.steps(start, total):` turns SIGTERM / SIGINT into a flag (handlers restored
    after); the body saves a checkpoint when `stop.requested()` (a collective: every torchrun rank stops after
    the same step, whichever was signalled), then the loop prints `stopped by SIGTERM at step N: checkpoint
    written, continue with --resume` and raises Stopped. `offset` is added to N; `redo` names a loop without
    checkpoints of its own (TTDA), which starts over from the checkpoint at step `offset`."""

    def __init__(self, dist: Any):
        self.dist, self.signum, self.agreed = dist, 0, None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # only a flag: no I/O in a signal handler; a second signal is ignored

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
                if self.agreed if self.agreed is not None else self.requested():
                    self.dist.barrier()  # rank 0 has written the checkpoint
                    at = offset + (0 if redo else i + 1)
                    line = f"stopped by {signal.Signals(self.agreed).name} at step {at}: checkpoint written, " \
                           "continue with --resume" + (f" ({redo} starts over; it stopped after step {i + 1} of " \
                                                       f"{total})" if redo else "")
                    log(line) if self.dist.is_main else None
                    raise Stopped(line)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
