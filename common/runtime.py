"""Plumbing every method script uses: errors, command line, seeding, device and precision, torchrun/DDP,
atomic checkpoints, the log line, `metrics.json`, side-by-side pictures and the `--profile` measurement.

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
import sys
import textwrap
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from common.console import UserError, log, progress  # noqa: F401  (re-exported for the method files)
from common.datasets import DATASETS


# --------------------------------------------------------------------------------------------------------------
# Command line generated from the `Args` dataclass (stdlib argparse; no tyro)
# --------------------------------------------------------------------------------------------------------------
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
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
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
        args_cls: the method's `Args` dataclass. `bool` fields become `--flag / --no-flag`; `Optional[...]` fields
            accept a value (default None); `tuple[...]` fields take several values. `--src` / `--tgt` are checked
            against the dataset registry (comma lists allowed for `--tgt`).
        argv: the arguments (default `sys.argv[1:]`).
    Returns:
        an `args_cls` instance.
    """
    docs = field_docs(args_cls)
    hints = typing.get_type_hints(args_cls)
    parser = argparse.ArgumentParser(
        description=(args_cls.__module__ if args_cls.__doc__ is None else "") or None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text,
                                metavar=f.name.upper() if not optional else f"{f.name.upper()}|None")
    ns = parser.parse_args(argv)
    values = {}
    for f in dataclasses.fields(args_cls):
        v = getattr(ns, f.name)
        tp, _ = _base_type(hints[f.name])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    args = args_cls(**values)
    check_dataset_names(args)
    return args


def check_dataset_names(args: Any) -> None:
    """UserError for an unknown `--src` / `--tgt` (datasets.md §12 "Unknown name")."""
    for flag in ("src", "tgt"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        for name in str(value).split(","):
            if name not in DATASETS:
                raise UserError(f"error: --{flag}: unknown dataset '{name}'. Choose one of: "
                                f"{', '.join(DATASETS)}.")


def run_cli(main: Callable[[Any], dict], args_cls: type, argv: Optional[list[str]] = None) -> None:
    """Parse the command line, run `main(args)`; bad input ends with one line on stderr and exit code 2."""
    try:
        args = parse_args(args_cls, argv)
        main(args)
    except UserError as e:
        print(str(e).splitlines()[0] if str(e) else "error", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def replace_defaults(args: Any, **demo_values: Any) -> Any:
    """Return `args` with the given fields replaced, but only those the user left at their default.

    Used by `--demo`: `--demo --iters 5` keeps the user's 5 and takes every other demo value.
    """
    changes = {}
    for f in dataclasses.fields(args):
        if f.name in demo_values:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            if getattr(args, f.name) == default:
                changes[f.name] = demo_values[f.name]
    return dataclasses.replace(args, **changes)


# --------------------------------------------------------------------------------------------------------------
# Seeding and RNG state (everything that draws random numbers is seeded here and checkpointed)
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------------------------
def choose_device(name: str) -> torch.device:
    """`auto` = CUDA if available else CPU; asking for CUDA on a machine without one is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("error: --device cuda: no CUDA device is visible. Expected a GPU with a CUDA build of "
                        "PyTorch; use --device cpu or --device auto.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"error: --device: unknown device '{name}'. Expected auto, cpu or cuda.")
    return torch.device(name)


@dataclass
class Precision:
    """How the trained parts are autocast and in which dtype the frozen parts are stored.

    Attributes:
        amp_dtype: autocast dtype for the trained parts, None = plain fp32.
        use_scaler: fp16 needs a GradScaler (bf16 and fp32 do not).
        frozen_dtype: storage dtype of frozen SD parts (half on CUDA: inference only, full precision not needed).
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

    Args:
        name: "auto" | "fp32" | "bf16" | "fp16".
        device: the training device.
    Returns:
        a `Precision`; its `reason` is meant to be printed.
    """
    dev = device.type
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"error: --precision: unknown value '{name}'. Expected auto, fp32, bf16 or fp16.")
    if dev != "cuda":
        if name not in ("auto", "fp32"):
            raise UserError(f"error: --precision {name}: mixed precision needs a CUDA device; "
                            "use --precision auto or fp32 on CPU.")
        return Precision(None, False, torch.float32, dev, "fp32 on CPU (autocast buys nothing there)")
    bf16_ok = torch.cuda.is_bf16_supported()
    if name == "auto":
        name = "bf16" if bf16_ok else "fp16"
        why = ("bf16 autocast: this GPU supports bf16 (no loss scaling needed)" if bf16_ok else
               "fp16 autocast + GradScaler: this GPU has no bf16 support")
    else:
        why = f"{name} as requested"
    if name == "bf16" and not bf16_ok:
        raise UserError("error: --precision bf16: this GPU does not support bf16. Use --precision fp16 or auto.")
    if name == "fp32":
        return Precision(None, False, torch.float16, dev, "fp32 trained parts as requested; frozen parts fp16")
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(dtype, name == "fp16", dtype, dev, why + f"; frozen parts stored in {name}")


# --------------------------------------------------------------------------------------------------------------
# torchrun / DistributedDataParallel
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Run folder, atomic checkpoints
# --------------------------------------------------------------------------------------------------------------
_CKPT_RE = re.compile(r"^step_(\d{7,})$")


def prepare_out_dir(out: str, resume: bool = False, eval_only: bool = False, is_main: bool = True,
                    allow_existing: bool = False) -> Path:
    """Create and check the run folder before anything is written to it.

    Refuses (UserError) an unwritable folder, and a folder that already holds checkpoints unless `--resume` or
    `--eval-only` is given, so a new run never overwrites a user's earlier run. `allow_existing` (the `--demo`, whose
    folder holds only generated output) starts over in such a folder instead: its old checkpoints are removed.
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
        if not resume and not eval_only and ckpts.is_dir() and any(_CKPT_RE.match(p.name) for p in ckpts.iterdir()):
            if allow_existing:
                shutil.rmtree(ckpts)
                (path / "metrics.json").unlink(missing_ok=True)
                return path
            raise UserError(f"error: --out: '{out}' already holds checkpoints of an earlier run. Pass --resume to "
                            "continue it, or a new --out to start another run.")
    return path


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    keep: int = 3) -> Path:
    """Write `<out>/checkpoints/step_XXXXXXX/{weights.safetensors, state.pt}` atomically; keep the newest `keep`.

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
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
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
                        "step_XXXXXXX folder written by --ckpt-every; run without --resume to start a new run.")
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


def require_ckpt(args: Any) -> None:
    """`--eval-only` needs `--ckpt`."""
    if getattr(args, "eval_only", False) and not getattr(args, "ckpt", None):
        raise UserError("error: --eval-only: no --ckpt given. Expected --ckpt <out>/checkpoints/step_XXXXXXX "
                        "(a checkpoint folder written by training).")


# --------------------------------------------------------------------------------------------------------------
# Logging and metrics.json
# --------------------------------------------------------------------------------------------------------------
def _fmt(key: str, v: float) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if key.startswith("lr") or (v != 0 and abs(v) < 1e-3):
        return f"{v:.1e}"
    return f"{v:.3f}"


def log_line(step: int, total: int, values: dict[str, float], ms_per_step: float, mem_gb: float) -> str:
    """`step 1200/10000 | loss_src 0.412 | lr 5.0e-06 | 410 ms/step | mem 17.3 GB` (style.md §6)."""
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
    """Append `record` to the list `key` of `<out>/metrics.json`, or set it when `key != "evals"`; atomic rewrite.

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
        raise UserError(f"error: training: non-finite loss ({loss.item()}) at step {step}. Expected a finite loss; "
                        f"lower --lr or use --precision fp32.{keep}")


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


# --------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------
def colorize(label: np.ndarray, palette: np.ndarray) -> "Image.Image":
    """Label map (H, W) of class ids (255 = ignore) -> RGB PIL image with the class-set palette, ignore black."""
    from PIL import Image
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return Image.fromarray(lut[np.asarray(label, dtype=np.uint8)])


def save_side_by_side(path: str | Path, image: torch.Tensor, gt: np.ndarray, pred: np.ndarray,
                      palette: np.ndarray) -> None:
    """Write `input | ground truth | prediction` as one PNG.

    Args:
        image: float (3, H, W) in [0, 1] (resized to the label size if it differs).
        gt, pred: int (H, W) class ids, 255 = ignore (black).
        palette: (K, 3) uint8.
    """
    from PIL import Image
    h, w = gt.shape
    img = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(img).resize((w, h), Image.BILINEAR)
    canvas = Image.new("RGB", (3 * w, h))
    canvas.paste(img, (0, 0))
    canvas.paste(colorize(gt, palette), (w, 0))
    canvas.paste(colorize(pred, palette), (2 * w, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# --------------------------------------------------------------------------------------------------------------
# --profile: FLOPs, time, memory, utilisation against the measured matmul peak
# --------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype: Optional[torch.dtype] = None, n: Optional[int] = None,
                       reps: int = 5) -> float:
    """Measured dense matmul throughput of this device (GFLOP/s): the denominator of `utilization`.

    bf16 on CUDA (the tensor-core peak that training aims at), fp32 on CPU.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):  # best of 3 trials: one short trial on a busy CPU reads 15-25 % low
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def _flop_formulas() -> dict:
    """Corrections to `torch.utils.flop_counter`'s formulas, passed to `FlopCounterMode(custom_mapping=...)`.

    1. PyTorch's CPU flash-attention kernels have no formula and would count as 0 FLOPs (every attention layer
       left out of `utilization` on CPU). Same formulas as the CUDA kernels: 4·B·H·Lq·Lk·D forward, the flash
       backward (with its recomputation of the scores) as for CUDA.
    2. `convolution_backward`'s grad-weight term ignores `groups`, so a depthwise conv's backward is counted as a
       dense one (x channels). Both gradients of a conv cost what its forward costs; for groups = 1 this is
       exactly PyTorch's count.
    """
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    out = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        out[fwd] = lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None:
        out[bwd] = lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)

    def conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                      _output_padding, _groups, output_mask, out_shape=None, **kw) -> int:
        forward = fc.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
        return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))
    out[aten.convolution_backward] = conv_backward
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward and backward) counted by `torch.utils.flop_counter.FlopCounterMode`
    with the corrections of `_flop_formulas`."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with counter:
        fn()
    return int(counter.get_total_flops())


def profile_training(step_fn: Callable[[], Any], n_iters: int, device: torch.device, warmup: int = 2,
                     extra: Optional[dict] = None) -> dict:
    """Measure one method's training iteration (`--profile N`).

    Warm-up calls first (allocator, cuDNN autotune), then FLOPs of one call, then `n_iters` timed calls, then the
    matmul peak of the same device in the same process.

    Args:
        step_fn: runs one complete training iteration (forward, backward, optimizer step).
        n_iters: timed iterations.
        device: where it runs.
        extra: more keys for the JSON line (e.g. the setting profiled).
    Returns:
        {"flops_per_iter", "sec_per_iter", "peak_mem_gb", "matmul_peak_gflops", "utilization", ...}.
    """
    for _ in range(warmup):
        step_fn()
    flops = count_flops(step_fn)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    for _ in range(n_iters):
        step_fn()
    _sync(device)
    sec = (time.perf_counter() - t) / max(n_iters, 1)
    mem = peak_memory_gb(device)
    peak = matmul_peak_gflops(device)
    result = {"flops_per_iter": flops, "sec_per_iter": sec, "peak_mem_gb": round(mem, 3),
              "matmul_peak_gflops": round(peak, 1), "utilization": round(flops / sec / 1e9 / peak, 4),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result.update(extra or {})
    return result
