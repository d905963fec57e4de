"""Plumbing every method script uses: errors, command line, seeding, device and precision, torchrun/DDP,
atomic checkpoints, the stop on SIGTERM / SIGINT, the log line, `metrics.json` and side-by-side pictures
(`--profile` and `--estimate-memory` are measuring tools: benchmarks/measure.py).

Nothing in this file is about a model (minGPT's `trainer.py` rule). Method logic (EMA, ClassMix, LR schedules,
heads) lives in the method files.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import textwrap
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.utils.checkpoint

from common.console import UserError, log, progress  # noqa: F401  (re-exported for the method files)
from common.datasets import DATASETS, dataset_info, is_folder


# ------------------------------------------------------------------------------------------------------------
# Command line generated from the `Args` dataclass (stdlib argparse; no tyro)
# ------------------------------------------------------------------------------------------------------------
def field_docs(args_cls: type) -> dict[str, str]:
    """Docstrings written on the line after each dataclass field (CleanRL style).

    Args:
        args_cls: a dataclass defined in a source file.
    Returns:
        {field name: one-line doc}; empty when the source is not available (e.g. defined in a notebook cell).
    """
    try:
        source = textwrap.dedent(inspect.getsource(args_cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `Optional[X]` / `X | None`."""
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def parse_args(args_cls: type, argv: Optional[list[str]] = None) -> Any:
    """Parse a command line into an `args_cls` instance; `--help` lists every field with its doc and default.

    Args:
        args_cls: the method's `Args` dataclass. `bool` fields become `--flag / --no-flag`; `Optional[...]`
            fields accept a value (default None); `tuple[...]` fields take several values. `--src` / `--tgt`
            are checked against the dataset registry (comma lists allowed for `--tgt`).
        argv: the arguments (default `sys.argv[1:]`).
    Returns:
        an `args_cls` instance.
    """
    hints = typing.get_type_hints(args_cls)
    ns = _parser(args_cls, hints, with_defaults=True).parse_args(argv)
    values = {}
    for f in dataclasses.fields(args_cls):
        v = getattr(ns, f.name)
        tp, _ = _base_type(hints[f.name])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    args = args_cls(**values)
    # the flags the user typed, even where the value equals the default (`--demo --log-every 50` keeps 50)
    given = _parser(args_cls, hints, with_defaults=False).parse_args(argv)
    object.__setattr__(args, "_given", frozenset(vars(given)))
    check_dataset_names(args)
    return args


def _parser(args_cls: type, hints: dict, with_defaults: bool) -> argparse.ArgumentParser:
    """One flag per `Args` field; without defaults, the parsed namespace holds only the flags given."""
    docs = field_docs(args_cls)
    parser = argparse.ArgumentParser(
        description=(args_cls.__module__ if args_cls.__doc__ is None else "") or None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        default = default if with_defaults else argparse.SUPPRESS
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text,
                                metavar=f.name.upper() if not optional else f"{f.name.upper()}|None")
    return parser


def check_dataset_names(args: Any) -> None:
    """UserError for an unknown `--src` / `--tgt`: one line listing the valid names."""
    for flag in ("src", "tgt"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        for name in str(value).split(","):
            if is_folder(name):
                dataset_info(name)  # the folder exists, its classes.txt names a known class set
            elif name not in DATASETS:
                raise UserError(f"error: --{flag}: unknown dataset '{name}'. Choose one of: "
                                f"{', '.join(DATASETS)}, or folder:PATH.")


def in_notebook_kernel() -> bool:
    """True when this process is a Jupyter / Colab kernel: its command line is the kernel's
    (`.../ipykernel_launcher.py -f .../kernel-1234.json`), not the user's."""
    return Path(sys.argv[0] if sys.argv else "").name.endswith("kernel_launcher.py")


def run_cli(main: Callable[[Any], dict], args_cls: type, argv: Optional[list[str]] = None) -> None:
    """Parse the command line, run `main(args)`; bad input ends with one line on stderr and exit code 2.

    Pasted into a notebook cell (the `__main__` guard is true there too) it parses nothing and only says how
    to run: argparse would see the kernel's `-f kernel.json` and raise SystemExit (the classic notebook
    failure).
    """
    if argv is None and in_notebook_kernel():
        print(f"{args_cls.__name__} and main are defined; run main({args_cls.__name__}(demo=True)) for the "
              f"demo, or main({args_cls.__name__}(src=..., tgt=..., ...)) (the kernel's command line is not "
              "parsed).")
        return
    try:
        args = parse_args(args_cls, argv)
        main(args)
    except UserError as e:
        print(str(e).splitlines()[0] if str(e) else "error", file=sys.stderr)
        sys.exit(2)
    except Stopped:  # SIGTERM / SIGINT inside a training loop: the checkpoint is written, the line printed
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def replace_defaults(args: Any, **demo_values: Any) -> Any:
    """Return `args` with the given fields replaced, but only those the user left at their default.

    Used by `--demo`: `--demo --iters 5` keeps the user's 5 and takes every other demo value. A flag typed on
    the command line counts as the user's choice even when it equals the default (see `parse_args`).
    """
    changes, given = {}, getattr(args, "_given", frozenset())
    for f in dataclasses.fields(args):
        if f.name in demo_values and f.name not in given:
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())  # type: ignore
            if getattr(args, f.name) == default:
                changes[f.name] = demo_values[f.name]
    return dataclasses.replace(args, **changes)


# ------------------------------------------------------------------------------------------------------------
# Seeding and RNG state (everything that draws random numbers is seeded here and checkpointed)
# ------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned (CUDA states only when this machine has CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------------
# Device and precision
# ------------------------------------------------------------------------------------------------------------
def choose_device(name: str) -> torch.device:
    """`auto` = CUDA if available else CPU; asking for CUDA on a machine without one is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("error: --device cuda: no CUDA device is visible. Expected a GPU with a CUDA build "
                        "of PyTorch; use --device cpu or --device auto.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"error: --device: unknown device '{name}'. Expected auto, cpu or cuda.")
    return torch.device(name)


@dataclass
class Precision:
    """How the trained parts are autocast and in which dtype the frozen parts are stored.

    Attributes:
        amp_dtype: autocast dtype for the trained parts, None = plain fp32.
        use_scaler: fp16 needs a GradScaler (bf16 and fp32 do not).
        frozen_dtype: storage dtype of frozen SD parts (half on CUDA: inference only, full precision not
            needed).
        device_type: "cuda" or "cpu", for `torch.autocast`.
        reason: one line saying why, printed at start.
    """
    amp_dtype: Optional[torch.dtype]
    use_scaler: bool
    frozen_dtype: torch.dtype
    device_type: str
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the trained parts (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def choose_precision(name: str, device: torch.device) -> Precision:
    """Pick the training precision: bf16 where the GPU supports it, fp16 + GradScaler otherwise, fp32 on CPU.

    `--precision bf16` / `fp16` also run on the CPU (PyTorch's CPU autocast supports both, and the GradScaler
    has a CPU variant) and then take exactly the GPU's code path: frozen parts stored in half precision, the
    same autocast regions, the same scaler calls. That is slow and meant for checking the GPU path on a
    machine without one. `fp32` means fp32 everywhere, frozen parts included.

    Args:
        name: "auto" | "fp32" | "bf16" | "fp16".
        device: the training device.
    Returns:
        a `Precision`; its `reason` is meant to be printed.
    """
    dev = device.type
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"error: --precision: unknown value '{name}'. Expected auto, fp32, bf16 or fp16.")
    if name == "fp32" or (name == "auto" and dev != "cuda"):
        why = "fp32 as requested" if name == "fp32" else "fp32 on CPU (autocast buys nothing there)"
        return Precision(None, False, torch.float32, dev, why + "; frozen parts fp32")
    if dev == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if name == "auto":
            name = "bf16" if bf16_ok else "fp16"
            why = ("bf16 autocast: this GPU supports bf16 (no loss scaling needed)" if bf16_ok else
                   "fp16 autocast + GradScaler: this GPU has no bf16 support")
        else:
            why = f"{name} as requested"
        if name == "bf16" and not bf16_ok:
            raise UserError("error: --precision bf16: this GPU does not support bf16. Expected --precision "
                            "fp16 or auto.")
    else:
        why = f"{name} on CPU as requested: the GPU code path, slow, meant for checking"
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    scaler = " + GradScaler" if name == "fp16" and "GradScaler" not in why else ""
    return Precision(dtype, name == "fp16", dtype, dev, why + scaler + f"; frozen parts stored in {name}")


def checkpointed(enabled: bool, fn: Callable[..., Any], *xs: Any) -> Any:
    """`fn(*xs)`, its activations recomputed in backward instead of stored when `enabled` (a
    `--grad-checkpointing` memory knob: same values and gradients, less memory, one more forward of `fn` per
    backward).

    Args:
        enabled: checkpoint `fn`; ignored under `torch.no_grad()` (nothing is stored there anyway).
        fn: a module or function of tensors.
        xs: its inputs.
    Returns:
        `fn(*xs)`, through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` when enabled.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *xs, use_reentrant=False)
    return fn(*xs)


# ------------------------------------------------------------------------------------------------------------
# torchrun / DistributedDataParallel
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """Process-group facts; `world == 1` without torchrun.

    Attributes:
        rank, world, local_rank: from the environment torchrun sets.
        device: this process's device.
    """
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes in place (no-op for one process)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of a tensor over processes in place (no-op for one process)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wrap(self, module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """DistributedDataParallel around `module` when world > 1 (gradients averaged over processes)."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)


def init_distributed(device_name: str = "auto") -> Dist:
    """Initialise torch.distributed from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL on CUDA, gloo on CPU. Without those variables: one process, nothing initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def set_determinism(device: torch.device, deterministic: bool = False) -> str:
    """Make same-seed runs repeat bit for bit where that is cheap, and everywhere with `--deterministic`.

    CPU, always: oneDNN (PyTorch's CPU convolutions and matmuls) is put in its deterministic mode
    (`torch.backends.mkldnn.deterministic`): some oneDNN backward-weights kernels split their reduction across
    threads in a scheduling-dependent order on some CPUs, so two runs of the same seed could drift apart in
    the last bits from the first step on. Everything else our scripts run on the CPU is deterministic for a
    fixed thread count. CUDA, only with `--deterministic` (it costs speed): cuDNN deterministic algorithms
    without autotuning, `torch.use_deterministic_algorithms(True, warn_only=True)` and the cuBLAS workspace
    setting it needs; then two runs on the same GPU model, software versions and process count give the same
    weights. Without it CUDA runs agree only up to float rounding (atomic adds in some backward kernels).

    Returns:
        one line saying what is guaranteed, for the start-up printout.
    """
    if hasattr(torch.backends.mkldnn, "deterministic"):
        torch.backends.mkldnn.deterministic = True
    if device.type != "cuda":
        return "CPU: same seed and thread count -> bit-identical runs and resume"
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    if not deterministic:
        return "CUDA: same seed -> equal up to float rounding (--deterministic for bit-identical runs)"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return "CUDA --deterministic: same seed, GPU model, versions and process count -> bit-identical runs"


def setup_hardware(args: Any) -> tuple[Dist, Precision]:
    """Processes, device, precision and determinism of a run, from `--device` / `--precision` /
    `--deterministic` (and torchrun's variables); see `set_determinism`.
    """
    dist = init_distributed(args.device)
    prec = choose_precision(args.precision, dist.device)
    prec.reason += " | " + set_determinism(dist.device, getattr(args, "deterministic", False))
    return dist, prec


# ------------------------------------------------------------------------------------------------------------
# Run folder, atomic checkpoints
# ------------------------------------------------------------------------------------------------------------
_CKPT_RE = re.compile(r"^step_(\d{7,})$")


def prepare_out_dir(out: str, resume: bool = False, eval_only: bool = False, is_main: bool = True,
                    allow_existing: bool = False) -> Path:
    """Create and check the run folder before anything is written to it.

    Refuses (UserError) an unwritable folder, and a folder that already holds checkpoints unless `--resume` or
    `--eval-only` is given, so a new run never overwrites a user's earlier run. `allow_existing` (the
    `--demo`, whose folder holds only generated output) starts over in such a folder instead: its old
    checkpoints are removed.
    """
    path = Path(out)
    if is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"error: --out: cannot write to '{out}' ({e.strerror or e}). Expected a writable "
                            "folder; pass another --out.") from None
        ckpts = path / "checkpoints"
        if (not resume and not eval_only and ckpts.is_dir()
                and any(_CKPT_RE.match(p.name) for p in ckpts.iterdir())):
            if allow_existing:
                shutil.rmtree(ckpts)
                (path / "metrics.json").unlink(missing_ok=True)
                return path
            raise UserError(f"error: --out: '{out}' already holds checkpoints of an earlier run. Pass "
                            "--resume to continue it, or a new --out to start another run.")
    return path


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    keep: int = 3) -> Path:
    """Write `<out>/checkpoints/step_XXXXXXX/{weights.safetensors, state.pt}` atomically; keep the
    newest `keep`.

    The files go into a temporary folder that is fsynced and renamed: a kill at any moment leaves either the
    complete new checkpoint or none, and the previous one stays loadable.

    Args:
        out_dir: the run folder.
        step: number of optimizer steps done.
        weights: flat {name: tensor} of the model tensors to deploy (stored as safetensors).
        state: everything else needed to resume (optimizer, scaler, EMA, RNG, step, args); torch-pickled.
        keep: how many checkpoints to keep (<= 0 keeps all).
    Returns:
        the checkpoint folder.
    """
    from safetensors.torch import save_file
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in weights.items()},
              str(tmp / "weights.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step saved twice (e.g. final step after a periodic save): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep > 0:
        for old in sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint folder in `<out>/checkpoints`, or None."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / "state.pt").exists())
    return done[-1] if done else None


def resume_checkpoint(out_dir: str | Path) -> Path:
    """`latest_checkpoint` or a UserError saying there is nothing to resume."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise UserError(f"error: --resume: no checkpoint in '{Path(out_dir) / 'checkpoints'}'. Expected a "
                        "step_XXXXXXX folder written by --ckpt-every; run without --resume to start a new "
                        "run.")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint folder (or its `weights.safetensors`).

    Returns:
        (weights {name: tensor}, state dict; {} when there is no state.pt beside the weights).
    """
    from safetensors.torch import load_file
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    wfile = p if p.is_file() else p / "weights.safetensors"
    if not wfile.is_file():
        raise UserError(f"error: --ckpt: '{path}' is not a checkpoint. Expected a folder "
                        "<out>/checkpoints/step_XXXXXXX (or its weights.safetensors) written by this script.")
    try:
        weights = load_file(str(wfile), device=str(map_location))
        state = (torch.load(folder / "state.pt", map_location=map_location, weights_only=False)
                 if (folder / "state.pt").exists() else {})
    except Exception as e:  # truncated or foreign file
        raise UserError(f"error: --ckpt: cannot read '{path}' ({type(e).__name__}). Expected a complete "
                        "checkpoint written by this script.") from None
    return weights, state


def named_weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Several named modules as one flat weights dict, the form a checkpoint stores.

    Args:
        modules: {name: module}, e.g. {"net": net, "net_ema": net_ema}.
    Returns:
        {"<name>.<state_dict key>": tensor} over every module (the tensors themselves, not copies).
    """
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def weights_of(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The state dict of the module `name` inside a flat `named_weights` dict.

    Args:
        weights: {"<name>.<key>": tensor}, e.g. from `load_checkpoint`.
        name: a module name; "net" does not match "net_ema.*".
    Returns:
        {key: tensor} of every entry under "<name>.", the prefix removed; {} when there is none.
    """
    return {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}


def require_ckpt(args: Any) -> None:
    """`--eval-only` and `--predict` need `--ckpt`."""
    if getattr(args, "predict", None) and not getattr(args, "ckpt", None):
        raise UserError("error: --predict: no --ckpt given. Expected --ckpt <out>/checkpoints/step_XXXXXXX "
                        "(a checkpoint folder written by training).")
    if getattr(args, "eval_only", False) and not getattr(args, "ckpt", None):
        raise UserError("error: --eval-only: no --ckpt given. Expected --ckpt <out>/checkpoints/step_XXXXXXX "
                        "(a checkpoint folder written by training).")


class Checkpointer:
    """Finds, restores, writes and prunes the checkpoints of one run folder: `--resume`, `--ckpt-every`,
    `--keep-ckpts`, atomic writes (`save_checkpoint`). The RNG states and the step go into every checkpoint
    and come back on `resume`, so a resumed run continues bit-identically.

    Args:
        out: the run folder; checkpoints go to `<out>/checkpoints/step_XXXXXXX/`.
        every: steps between checkpoints (0 = only the last step).
        keep: how many to keep (<= 0 keeps all).
        is_main: only rank 0 writes.
    """

    def __init__(self, out: str | Path, every: int, keep: int = 3, is_main: bool = True):
        self.out, self.every, self.keep, self.is_main = Path(out), every, keep, is_main

    def due(self, step: int, last: int) -> bool:
        """A checkpoint is written every `every` steps and after the last one."""
        return step == last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, weights: dict[str, torch.Tensor], state: dict) -> Optional[Path]:
        """Write `weights` (safetensors) and `state` + step + RNG states (state.pt) atomically; rank 0
        only."""
        if not self.is_main:
            return None
        return save_checkpoint(self.out, step, weights, {**state, "step": step, "rng": get_rng_state()},
                               keep=self.keep)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.out)

    def resume(self, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
        """Read the newest complete checkpoint (UserError when there is none) and restore the RNG states.

        Call it last before the loop: whatever draws random numbers after it shifts the resumed run.
        Returns:
            (weights, state); `state["step"]` is the number of optimizer steps done.
        """
        path = resume_checkpoint(self.out)
        weights, state = load_checkpoint(path, map_location)
        if "rng" in state:
            set_rng_state(state["rng"])
        if self.is_main:
            log(f"resumed from {path} at step {state.get('step', 0)}")
        return weights, state

    def save_parts(self, step: int, modules: dict[str, torch.nn.Module], stateful: dict[str, Any],
                   state: Optional[dict] = None) -> Optional[Path]:
        """`save` of several named modules and stateful objects in one call; `resume_parts` reads it back.

        Args:
            step: number of optimizer steps done.
            modules: {name: module}; stored as weights "<name>.<key>" (`named_weights`).
            stateful: {name: object with state_dict()} (optimizers, GradScalers); stored in state.pt under
                name.
            state: anything else for state.pt (e.g. the args).
        Returns:
            the checkpoint folder (None on ranks > 0).
        """
        objs = {k: o.state_dict() for k, o in stateful.items()}
        return self.save(step, named_weights(modules), {**(state or {}), **objs})

    def resume_parts(self, modules: dict[str, torch.nn.Module], stateful: dict[str, Any],
                     map_location: str | torch.device = "cpu") -> dict:
        """`resume`, then load what `save_parts` stored into each module (strict) and each stateful object.

        Returns:
            the state dict; `state["step"]` is the number of optimizer steps done.
        """
        weights, state = self.resume(map_location)
        for name, m in modules.items():
            m.load_state_dict(weights_of(weights, name))
        for name, o in stateful.items():
            o.load_state_dict(state[name])
        return state


# ------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT stop the loop at the next step boundary, after a checkpoint
# ------------------------------------------------------------------------------------------------------------
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL, "temporary failure, try again": stopped by a signal, resumable


from common.cli import Stopped  # noqa: E402  (one class while runtime.py is retired)


class StopOnSignal:
    """SIGTERM and SIGINT (Ctrl-C) only set a flag; the loop ends at the next step boundary, after the
    checkpoint of that step, so a resumed run continues as if nothing happened. Every training loop:

        stop = runtime.StopOnSignal(dist)
        for i in stop.steps(start, total):      # handlers installed here, the previous ones restored after
            ...                                 # the optimizer step, the log line, an evaluation when due
            if ckpt.due(i + 1, total) or stop.requested():
                ckpt.save(i + 1, ...)           # the --ckpt-every checkpoint, and the one a stop needs

    After the body, `steps` raises `Stopped` (and rank 0 prints `stopped by SIGTERM at step N: checkpoint
    written, continue with --resume`) when `requested()` was true; when the body did not ask (`ckpt.due`
    was true: the checkpoint is written anyway) `steps` asks itself. `requested()` all-reduces the signal
    number (MAX) across processes, so under torchrun every rank stops after the same step, whichever rank
    was signalled. A second signal changes nothing: the checkpoint being written is finished (and the
    previous one stays valid in any case: `save_checkpoint` writes a temporary folder and renames it).

    Args:
        dist: the process group (`Dist`); one process needs no communication.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dist: Dist):
        self.dist, self.signum, self.agreed = dist, 0, None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # only a flag: no I/O in a signal handler

    def requested(self) -> bool:
        """True when any process got SIGTERM / SIGINT; a collective under torchrun (every rank calls it)."""
        if self.dist.world == 1:
            self.agreed = self.signum
        else:
            self.agreed = int(self.dist.all_reduce_max(torch.tensor([self.signum], device=self.dist.device)))
        return self.agreed > 0

    def steps(self, start: int, total: int, offset: int = 0, redo: str = ""):
        """`range(start, total)` with the handlers installed and the stop at each step boundary.

        Args:
            offset: added to the step in the message (a checkpoint name that continues another loop's).
            redo: for a loop that writes no checkpoint of its own (PTDiffSeg's TTDA): the message names the
                checkpoint at step `offset` and says that this loop (`redo`) starts over on --resume.
        """
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            for i in range(start, total):
                self.agreed = None
                yield i
                if self.agreed is None:  # the body did not ask: its checkpoint was due anyway (or has none)
                    self.requested()
                if self.agreed:
                    self.dist.barrier()  # rank 0 has written the checkpoint: every rank exits after it
                    name = signal.Signals(self.agreed).name
                    line = (f"stopped by {name} at step {offset + i + 1}: checkpoint written, continue with "
                            "--resume" if not redo else
                            f"stopped by {name} at step {offset}: checkpoint written, continue with --resume "
                            f"({redo} starts over; it stopped after step {i + 1} of {total})")
                    if self.dist.is_main:
                        log(line)
                    raise Stopped(line)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def validate_args(args: Any, crop_multiple: int = 8) -> None:
    """The checks every script shares, before anything is built or written (one-line UserError each)."""
    def need(ok: bool, flag: str, what: str) -> None:
        if not ok:
            raise UserError(f"error: --{flag}: {what}")
    require_ckpt(args)
    need(not (args.eval_only and args.resume), "resume", "cannot be combined with --eval-only. Expected one "
         "of them: --resume continues training, --eval-only --ckpt scores a checkpoint.")
    need(not (args.profile and getattr(args, "estimate_memory", False)), "estimate-memory",
         "cannot be combined with --profile. Expected one of them.")
    need(args.profile >= 0, "profile", f"got {args.profile}. Expected a number of iterations >= 1 (0 = off).")
    for flag in ("iters", "log_every", "eval_every", "batch_size"):
        v = getattr(args, flag)
        need(v >= 1, flag.replace("_", "-"), f"got {v}. Expected an integer >= 1.")
    need(args.ckpt_every >= 0, "ckpt-every", f"got {args.ckpt_every}. Expected >= 0 (0 = only at the end).")
    need(args.crop_size >= crop_multiple and args.crop_size % crop_multiple == 0, "crop-size",
         f"got {args.crop_size}. Expected a positive multiple of {crop_multiple} (e.g. 512).")


# ------------------------------------------------------------------------------------------------------------
# Logging and metrics.json
# ------------------------------------------------------------------------------------------------------------
def _fmt(key: str, v: float) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if key.startswith("lr") or (v != 0 and abs(v) < 1e-3):
        return f"{v:.1e}"
    return f"{v:.3f}"


def log_line(step: int, total: int, values: dict[str, float], ms_per_step: float, mem_gb: float) -> str:
    """One train log line, e.g. `step 1200/10000 | loss_src 0.412 | lr 5.0e-06 | 410 ms/step | mem 17.3 GB`
    (the format README.md documents under "Logged values")."""
    parts = [f"step {step}/{total}"] + [f"{k} {_fmt(k, float(v) if not isinstance(v, int) else v)}"
                                         for k, v in values.items()]
    parts += [f"{ms_per_step:.0f} ms/step", f"mem {mem_gb:.1f} GB"]
    return " | ".join(parts)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or the process's peak resident set on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _to_jsonable(obj.tolist())
    return obj


def write_metrics(out_dir: str | Path, record: Any, key: str = "evals") -> Path:
    """Append `record` to the list `key` of `<out>/metrics.json`, or set it when `key != "evals"`; atomic
    rewrite.

    NaN becomes null so the file stays valid JSON.
    """
    path = Path(out_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if key == "evals":
        data.setdefault("evals", []).append(_to_jsonable(record))
    else:
        data[key] = _to_jsonable(record)
    tmp = path.with_suffix(f".json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def check_finite(loss: torch.Tensor, step: int, out_dir: Optional[str | Path] = None) -> None:
    """Stop with a one-line error when the loss is NaN or infinite; the last complete checkpoint is kept."""
    if not bool(torch.isfinite(loss.detach()).all()):
        last = latest_checkpoint(out_dir) if out_dir is not None else None
        keep = f" The last good checkpoint is '{last}'; --resume continues from it." if last else ""
        raise UserError(f"error: training: non-finite loss ({loss.item()}) at step {step}. Expected a finite "
                        f"loss; lower --lr or use --precision fp32.{keep}")


def log_args(out: str | Path, args: Any, dist: Dist, precision: Precision) -> None:
    """Start of a run (rank 0): print `args: {...}` (one JSON line) and `device cpu: <why this precision>`,
    and store the args in `<out>/metrics.json` under "args".

    Args:
        out: the run folder (already checked by `prepare_out_dir`).
        args: the method's `Args` dataclass instance.
        dist: `setup_hardware`'s Dist; only rank 0 prints and writes.
        precision: `setup_hardware`'s Precision; its `reason` is printed.
    """
    if dist.is_main:
        log("args: " + json.dumps(_to_jsonable(args)) + f"\ndevice {dist.device}: {precision.reason}")
        write_metrics(out, args, key="args")


def log_eval(out: Optional[str | Path], res: dict, step: int, tags: dict[str, str],
             is_main: bool = True) -> dict:
    """Report one evaluation: print its per-class table and one line
    `eval step 2000 | mIoU 41.70 | input 512x512 | metric 512x512 | <tag values>` (mIoU16 / mIoU13 after the
    mIoU when present), and append the record to `<out>/metrics.json` under "evals".

    Args:
        out: the run folder (None = print only).
        res: what `metrics.evaluate` returned: "table", "miou", "resolution" ("input HxW, metric at HxW"),
            maybe "miou16" / "miou13".
        step: number of optimizer steps done.
        tags: what was evaluated, e.g. {"path": "stage1 direct"}: in the record, and its values end the line.
        is_main: only rank 0 prints and writes.
    Returns:
        the record: {"step", **tags, every entry of `res` but "table" and "confusion"}.
    """
    record = {"step": step, **tags, **{k: v for k, v in res.items() if k not in ("table", "confusion")}}
    if is_main and res.get("no_labels"):  # no metric: the one line of what was written
        log(res["table"])
    elif is_main:
        parts = [f"eval step {step}", f"mIoU {100 * res['miou']:.2f}"]
        parts += [f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou16", "miou13") if k in res]
        parts += [res["resolution"].replace(", metric at ", " | metric "), *map(str, tags.values())]
        log(res["table"] + "\n" + " | ".join(parts))
    if is_main and out is not None:
        write_metrics(out, record)
    return record


def finish_run(out: str | Path, result: dict, dist: Dist, timer: "RunTimer") -> None:
    """End of a run (rank 0): print `done in 93.2 s | peak memory 2.41 GB | mIoU 41.70` (+ `| mIoU16 .. |
    mIoU13 ..` when the result holds them: SYNTHIA sources), store `result` in `<out>/metrics.json` under
    "final" and draw `<out>/curves.png` (`write_curves`).

    Args:
        out: the run folder.
        result: the run's final metrics.
        dist: `setup_hardware`'s Dist (device for the memory peak; only rank 0 prints and writes).
        timer: a `RunTimer` made when the timed part began (its `t0`).
    """
    if dist.is_main:
        mem = peak_memory_gb(dist.device)
        scores = [f"mIoU{k[4:]} {100 * result[k]:.2f}" for k in ("miou", "miou16", "miou13") if k in result]
        took = time.perf_counter() - timer.t0
        log(" | ".join([f"done in {took:.1f} s", f"peak memory {mem:.2f} GB", *scores]))
        write_metrics(out, result, key="final")
        write_curves(out)


class RunTimer:
    """Milliseconds per step over the steps since the last `lap()`."""

    def __init__(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def tick(self) -> None:
        self.n += 1

    def lap(self) -> float:
        t = time.perf_counter()
        ms = 1000 * (t - self.t0) / max(self.n, 1)
        self.t0, self.n = t, 0
        return ms


class TrainLog:
    """The progress of one training loop, the same in every script.

    On a terminal a tqdm bar (steps, ETA, latest losses); every `every` steps (and at the last) one
    fixed-format line with the values averaged over the steps since the previous line (`lr` is the latest),
    written with `console.log` so the bar is not broken; the same records in `<out>/metrics.json` under `key`.
    On `--resume` the records up to the resumed step are kept from metrics.json.

    Args:
        out: run folder (None = write nothing), total: last step, every: `--log-every`, device: for the memory
        column, is_main: only rank 0 prints and writes, start: steps already done, prefix: e.g. "[stage 2] ",
        key: the metrics.json key.
    """

    def __init__(self, out: Optional[str | Path], total: int, every: int, device: torch.device,
                 is_main: bool = True, start: int = 0, prefix: str = "", key: str = "train_log"):
        self.out, self.total, self.every, self.device = (Path(out) if out else None), total, every, device
        self.is_main, self.prefix, self.key = is_main, prefix, key
        self.history: list[dict] = []
        path = self.out / "metrics.json" if self.out else None
        if start > 0 and path is not None and path.exists():
            self.history = [r for r in json.loads(path.read_text()).get(key, []) if r["step"] <= start]
        self.window: dict[str, float] = {}
        self.timer = RunTimer()
        self.bar = progress(total=total, initial=start, desc=prefix.strip() or "train",
                            leave=False) if is_main else None

    def step(self, step: int, logs: dict[str, float]) -> Optional[dict]:
        """Record the logs of optimizer step `step` (1-based, = steps done); print and write when due.

        Returns the averaged record when a line was due, else None.
        """
        self.timer.tick()
        for k, v in logs.items():
            self.window[k] = self.window.get(k, 0.0) + float(v)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{float(v):.3g}" for k, v in list(logs.items())[:3]}, refresh=False)
        if step % self.every and step != self.total:
            return None
        n = self.timer.n
        rec = {k: (float(logs[k]) if k == "lr" else v / n) for k, v in self.window.items()}
        self.window = {}
        ms = self.timer.lap()
        if self.is_main:
            log(self.prefix + log_line(step, self.total, rec, ms, peak_memory_gb(self.device)))
            self.history.append({"step": step, **rec})
            if self.out is not None:
                write_metrics(self.out, self.history, key=self.key)
        return rec

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------------------
def colorize(label: np.ndarray, palette: np.ndarray) -> "Image.Image":
    """Label map (H, W) of class ids (255 = ignore) -> RGB PIL image with the class-set palette, ignore
    black."""
    from PIL import Image
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return Image.fromarray(lut[np.asarray(label, dtype=np.uint8)])


def _legend(classes: list[tuple[str, tuple[int, int, int]]], width: int) -> "Image.Image":
    """A white strip naming the colour of each class: swatch + name, wrapped over as many rows as needed."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, y, row_h = [], 8, 6, 22
    for name, colour in classes:
        w = 18 + 6 + int(probe.textlength(name, font=font)) + 16
        if x + w > width and x > 8:
            x, y = 8, y + row_h
        items.append((x, y, name, colour))
        x += w
    strip = Image.new("RGB", (width, y + row_h + 4), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in items:
        draw.rectangle([x, y + 2, x + 18, y + 18], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 24, y + 2), name, fill="black", font=font)
    return strip


def save_side_by_side(path: str | Path, image: torch.Tensor, gt: np.ndarray, pred: np.ndarray,
                      palette: np.ndarray, class_names: Optional[Sequence[str]] = None,
                      min_height: int = 256) -> None:
    """Write `input | ground truth | prediction` as one PNG, with a legend strip under it.

    Panels smaller than `min_height` pixels are upscaled (nearest, so labels stay crisp) until they are at
    least that high; the legend names the colours of the classes that appear in the ground truth or the
    prediction (ignore = black).

    Args:
        image: float (3, H, W) in [0, 1] (resized to the label size if it differs).
        gt, pred: int (H, W) class ids, 255 = ignore (black).
        palette: (K, 3) uint8.
        class_names: K names for the legend (None = no legend).
        min_height: smallest panel height in pixels.
    """
    from PIL import Image
    h, w = gt.shape
    img = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    panels = [Image.fromarray(img).resize((w, h), Image.BILINEAR), colorize(gt, palette),
              colorize(pred, palette)]
    f = max(1, -(-min_height // h))  # integer upscale factor: a 64-pixel demo panel becomes 256 pixels high
    panels = [p.resize((w * f, h * f), Image.NEAREST) for p in panels]
    canvas = Image.new("RGB", (3 * w * f, h * f), "white")
    for k, p in enumerate(panels):
        canvas.paste(p, (k * w * f, 0))
    if class_names is not None:
        present = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()))
        classes = [(class_names[c], tuple(palette[c])) for c in present if c < len(class_names)]
        if 255 in present:
            classes.append(("ignore", (0, 0, 0)))
        legend = _legend(classes, canvas.width)
        full = Image.new("RGB", (canvas.width, canvas.height + legend.height), "white")
        full.paste(canvas, (0, 0))
        full.paste(legend, (0, canvas.height))
        canvas = full
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_curves(out_dir: str | Path) -> Optional[Path]:
    """`<out>/curves.png`: every logged loss and the evaluation mIoU over steps, from `<out>/metrics.json`.

    Needs matplotlib (installed in Colab; not a dependency): without it one line says the plot was skipped.
    Returns the file, or None when nothing was written.
    """
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        return None
    try:  # a bare Figure, not pyplot: no global backend switch in the user's notebook
        from matplotlib.figure import Figure
    except ImportError:
        log("curves.png skipped: matplotlib is not installed (pip install matplotlib to get the training "
            "curves)")
        return None
    data = json.loads(path.read_text())
    logs = {k: v for k, v in data.items() if k.startswith("train_log") and isinstance(v, list) and v}
    evals = [e for e in data.get("evals", []) if isinstance(e, dict) and e.get("miou") is not None]
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, recs in logs.items():
        for name in recs[0]:
            if name.startswith("loss") and all(r.get(name) is not None for r in recs):
                label = name if len(logs) == 1 else f"{key.replace('train_log', '').strip('_')} {name}"
                ax1.plot([r["step"] for r in recs], [r[name] for r in recs], label=label)
    ax1.set(xlabel="step", ylabel="loss", title="training losses")
    if ax1.get_lines():  # an --eval-only run has no losses
        ax1.legend(fontsize=8)
    groups: dict[str, list] = {}
    for e in evals:  # one line per evaluated target / path
        tag = " ".join(str(e[k]) for k in ("target", "path", "prompt") if k in e) or "mIoU"
        groups.setdefault(tag, []).append(e)
    for tag, es in groups.items():
        ax2.plot([e.get("step", 0) for e in es], [100 * e["miou"] for e in es], "o-", label=tag)
    ax2.set(xlabel="step", ylabel="mIoU (%)", title="evaluation")
    if groups:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    png = Path(out_dir) / "curves.png"
    fig.savefig(png, dpi=100)
    return png
