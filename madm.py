"""MADM: Unsupervised Modality Adaptation with Text-to-Image Diffusion Models for Semantic Segmentation.

Xia et al., NeurIPS 2024, https://arxiv.org/abs/2410.21708 -- official code https://github.com/XiaRho/MADM.

Idea. Labels exist for RGB images (Cityscapes) but not for another modality (event, infrared, depth). MADM
takes the Stable Diffusion v1-4 UNet, fine-tunes *all* of it as a one-step feature extractor (one pass at
t = 0 on the VAE latent of the input; grey modalities are fed as if they were RGB) and trains it with
DAFormer-style self-training: source cross-entropy, an EMA teacher that labels the target crop, ClassMix,
quality-weighted pseudo labels. Two additions make it work across modalities:
  * DPLG (diffusion-based pseudo-label generation): early in training the teacher sees its target latent with
    a little forward-diffusion noise, t = int(t0 (1 - i / T_end)), which stabilises the pseudo labels.
  * LPLR (label palette and latent regression): the label is coloured with the class palette and encoded by
    the frozen VAE; the UNet's own 4-channel output is regressed onto that latent (masked L1). The frozen VAE
    decoder turns the UNet output into a full-resolution "colour label image" s0, one more input of the head.

Paper -> code map
  (the paper's Fig. 2 overview; the official code's module names in brackets)
  SD UNet as the backbone, learnable prompt / time offset ..... Conditioning, TimeOffsetHook, madm_forward
                                                                [ldm_diffusers.py, ldm_base.py]
  DPLG: diffusion-based pseudo labels (teacher branch) ........ dplg_timestep, teacher pass in train()
  LPLR: label palette + latent regression, decoder -> s0 ...... palette_image, palette_latent, loss_lplr
  Self-training: source CE, EMA teacher, ClassMix, quality q .. pseudo_labels, class_mix, loss_ce_*
                                                                [cmdise.py, mtmadise.py, dacs_transforms.py]
  Head: DAFormer context-aware fusion of s0, f8, f16, f32 .... Bottleneck, SegHead, DAFormerHead
  Optimisation: AdamW, clip 0.01, multi-step LR + warm-up .... param_groups, lr_factor

Deviations from the paper and the official code's active path (specs/madm.md gives every source)
  * Plain PyTorch + diffusers + transformers instead of detectron2 / mmcv / ODISE / kornia; the stock
    diffusers UNet forward with hooks; CLIPTextModel instead of the NeTI wrapper (it embeds "" once, then it
    is freed).
  * Colour jitter written by hand (kornia is not a dependency): the four ops in random order, brightness
    additive U(-0.2, 0.2), contrast / saturation factors U(0.8, 1.2), hue shift U(-0.2, 0.2) of a turn,
    clamped after each.
  * Backward after each student pass (source, then mixed) instead of one backward on the summed loss: the
    same gradient, half the activation memory.
  * Global batch 2 = 2 micro-steps of (1 source + 1 target) with gradient accumulation on one GPU; under
    `torchrun --nproc_per_node 2` it is the official 2-GPU setup. Each micro-step reseeds the torch generator
    from (seed, step, global micro index), so results do not depend on how the batch is split over GPUs and
    accumulation steps (each official GPU draws from its own stream).
  * Precision: `--precision auto` = bf16 autocast where supported, fp16 + GradScaler otherwise, fp32 on CPU
    (official: fp16 + GradScaler = `--precision fp16`). VAE fp16 on CUDA as official, fp32 on CPU.
  * Evaluation scores the full test list (the official 2-GPU evaluation scores only the first half: its
    cross-rank gather is commented out); `miou_first_half` in metrics.json reports that set for comparison.
  * `--resume` restores the step counter (the official code restarts the EMA ramp and DPLG on resume).
  * Data order: source (with rare-class sampling) and target images are drawn with replacement by
    `common.datasets.TrainStream`, a pure function of (seed, step, index), instead of a shuffled sampler with
    state; this makes resume and any GPU count reproduce the same batches.
  * Models and data by `--sd-model` / `--data-root` instead of hard-coded paths.
  * Options that are not official: `--fusion-stride 4` (fuse at 1/4 and upsample the logits; saves memory,
    changes results), `--eval-label-size native` (score at the native label size), `--grad-checkpointing`
    (same maths), targets other than the paper's three (LPLR on source + mixed [1, 1], DPLG t0 {50, 51} until
    0.8 iters), any source/target pair of the registry.
  * `--demo` (not a paper setting): tiny random SD, synthetic data at 1/8 size (crop 64, eval 64), 40 steps,
    lr 3e-3 and fusion stride 4, so that it learns something within a minute on a CPU.
  Kept on purpose (official quirks): the teacher shares the student's UNet (only conditioning, projections and
  head are EMA'd); the teacher head runs in train mode; one fixed seed-42 noise pattern, added even at t = 0;
  s0 decoded without gradient; conv_norm_out / conv_out frozen; CE averaged over all pixels; ClassMix may
  paste 255; q also weights the source-pasted pixels of the mixed LPLR mask; metric at 512x512 on resized
  labels.

Commands
  full run (paper setting; 2 GPUs, or 1 GPU with accumulation; > 40 GB):
      python madm.py --src cityscapes --tgt dsec_event          # or fmb_infrared, deliver_depth
      torchrun --nproc_per_node 2 madm.py --src cityscapes --tgt fmb_infrared
  low-memory run (24 GB; Colab T4 16 GB):
      python madm.py --src cityscapes --tgt dsec_event --grad-checkpointing --fusion-stride 4
  demo (CPU, < 2 min, tiny random SD + synthetic data):
      python madm.py --demo
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import metrics, runtime
from common.datasets import CLASS_SETS, PALETTES, RareClassSampling, TrainStream, build_dataset, check_pair
from common.runtime import UserError
from common.sd_backbone import FeatureCapture, add_noise, encode_prompts, load_sd, vae_decode, vae_encode
from common.synthetic import ensure_synthetic_sample


@dataclass
class Args:
    # ---- experiment / infrastructure
    src: str = "cityscapes"
    """source dataset (labelled RGB); official configs: Cityscapes"""
    tgt: str = "dsec_event"
    """target dataset (unlabelled modality): dsec_event, fmb_infrared, deliver_depth or any registry name"""
    data_root: str = "data"
    """folder holding the datasets in their official layouts (datasets.md)"""
    out: Optional[str] = None
    """run folder; default runs/madm-<src>-<tgt> (runs/madm-demo for --demo)"""
    seed: int = 42
    """seed of data order, ClassMix, augmentation, dropout; official config_files/common/train.py"""
    device: str = "auto"
    """auto | cpu | cuda"""
    precision: str = "auto"
    """auto (bf16 where supported, else fp16 + GradScaler; fp32 on CPU) | fp32 | bf16 | fp16 (official)"""
    grad_checkpointing: bool = False
    """recompute UNet activations in backward (same maths, less memory); our choice"""
    iters: int = 10000
    """optimizer steps; official train.max_iter"""
    log_every: int = 50
    """steps between log lines; our choice"""
    eval_every: int = 1000
    """steps between evaluations (and at the end); official hooks"""
    ckpt_every: int = 1000
    """steps between checkpoints (and at the end); official hooks"""
    keep_ckpts: int = 3
    """checkpoints kept in <out>/checkpoints; our choice"""
    resume: bool = False
    """continue from the latest checkpoint in --out"""
    eval_only: bool = False
    """only evaluate --ckpt"""
    ckpt: Optional[str] = None
    """checkpoint folder for --eval-only"""
    profile: int = 0
    """time N training iterations (FLOPs, s/iter, memory, utilization), print one JSON line, write nothing"""
    demo: bool = False
    """tiny random SD + synthetic data + short schedule: the whole loop on CPU in < 2 minutes"""
    # ---- data
    batch_size: int = 2
    """global batch (source + target pairs per optimizer step); official --bs 2 on 2 GPUs"""
    micro_batch_size: int = 1
    """pairs per forward pass; accumulation = batch / (micro * world); official 1 per GPU"""
    crop_size: int = 512
    """square training crop; official data configs"""
    rcs_temperature: float = 0.01
    """rare-class sampling temperature on the source; official dataset (DAFormer RCS)"""
    # ---- backbone
    sd_model: str = "CompVis/stable-diffusion-v1-4"
    """hub id or folder (tiny, random-sd15: random weights); official models/mtmadise_multi_lora.py"""
    vae_dtype: str = "fp16"
    """dtype of the frozen VAE on CUDA (fp16 official | bf16 | fp32); always fp32 on CPU"""
    noise_seed: int = 42
    """seed of the one fixed noise pattern eps_fix; official ldm_diffusers.py add_noise"""
    # ---- method
    ema_alpha: float = 0.999
    """teacher EMA momentum cap, alpha_i = min(1 - 1/(i+1), 0.999); official model config"""
    pseudo_threshold: float = 0.968
    """confidence threshold of the pseudo-label quality q; official pseudo_threshold"""
    dplg_t0: Optional[int] = None
    """DPLG start timestep lo (t0 drawn from {lo, lo+1}); default per task: 50, deliver_depth 60; official"""
    dplg_end_frac: Optional[float] = None
    """DPLG ends at this fraction of --iters; default per task: 0.8, deliver_depth 0.5; official"""
    lplr_weights: Optional[tuple[float, ...]] = None
    """LPLR weights: 1 value = source only, 2 = source + mixed; default dsec_event 20, else 1 1; official"""
    fusion_stride: int = 1
    """head fusion resolution: 1 = full input resolution (official), 4 = 1/4 (memory option, our choice)"""
    # ---- optimisation
    lr: float = 5e-6
    """AdamW learning rate of every trainable parameter; official config_files/common/optim.py"""
    weight_decay: float = 0.05
    """AdamW weight decay (0 on norm layers and biases); official optim config, utils/parameter_count.py"""
    grad_clip: float = 0.01
    """global L2 gradient clip after unscaling; official train.grad_clip, engine/train_loop.py"""
    # ---- evaluation
    eval_size: int = 512
    """test images resized to eval_size x eval_size; official test_resize_h_w"""
    eval_label_size: str = "input"
    """input = labels nearest-resized to the input (official) | native = logits upsampled to the label size"""


# Per-task settings of the official configs (config_files/SemSeg/MTMADISE/*); "other" is our choice.
#   tgt -> (DPLG t0 lo, DPLG end as a fraction of iters, LPLR weights: (source,) or (source, mixed))
TASKS = {"dsec_event": (50, 0.8, (20.0,)),
         "fmb_infrared": (50, 0.8, (1.0, 1.0)),
         "deliver_depth": (60, 0.5, (1.0, 1.0))}
TASK_OTHER = (50, 0.8, (1.0, 1.0))
LATENT_NOISE_SIZE = 64        # eps_fix is drawn at 64x64 latents (512 px) and resized otherwise; official
DEMO = dict(sd_model="tiny", data_root="data/synthetic", iters=40, crop_size=64, eval_size=64, lr=3e-3,
            log_every=5, eval_every=40, ckpt_every=40, fusion_stride=4)


# ------------------------------------------------------------------------------------------------------------
# SD backbone with learnable conditioning (Fig. 2; official ldm_base.py ClipFeatureProject)
# ------------------------------------------------------------------------------------------------------------
class Conditioning(nn.Module):
    """Learnable text context and time offset, shared by every student pass; the teacher uses its EMA copy.

    context c = tanh(a_u) * E("") + tanh(a_c) * P                       (1, 77, d)
    time emb  = time_embedding(time_proj(t)) + tanh(a_t) * T            (1, d_t)
    E("") is the frozen text-encoder output of the empty prompt (a buffer, not trained). a_t starts at zero,
    so the time offset is exactly 0 at initialisation; a_u, a_c ~ U(0, 1); P, T trunc-normal(0.02) (official).
    """

    def __init__(self, e_empty: torch.Tensor, time_dim: int):
        super().__init__()
        _, n_tok, d = e_empty.shape                                            # (1, 77, d) d = 768 in SD 1.x
        self.register_buffer("e_empty", e_empty.detach().clone())
        self.prompt = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, n_tok, d), std=0.02))
        self.alpha_u = nn.Parameter(torch.rand(1, n_tok, d))
        self.alpha_c = nn.Parameter(torch.rand(1, n_tok, d))
        self.time_offset = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, time_dim), std=0.02))
        self.alpha_t = nn.Parameter(torch.zeros(time_dim))                     # gate at 0: offset starts at 0

    def context(self, batch: int) -> torch.Tensor:
        c = torch.tanh(self.alpha_u) * self.e_empty + torch.tanh(self.alpha_c) * self.prompt   # (1, 77, d)
        return c.expand(batch, -1, -1)                                                          # (B, 77, d)

    def time_delta(self) -> torch.Tensor:
        return torch.tanh(self.alpha_t) * self.time_offset                                      # (1, d_t)


class TimeOffsetHook:
    """Forward hook on `unet.time_embedding` that adds the active conditioning's time offset to its output.

    The stock diffusers forward stays untouched; the caller sets `delta` right before every UNet call (student
    conditioning for student passes, the EMA conditioning for the teacher pass).
    """

    def __init__(self, unet: nn.Module):
        self.delta: Optional[torch.Tensor] = None
        self.handle = unet.time_embedding.register_forward_hook(self)

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        return out if self.delta is None else out + self.delta.to(out.dtype)    # (B, d_t)


# UNet features (official feature_extractor.py indices [5, 8, 11], "after"): the inputs of the upsamplers of
# up_blocks[1] (stride 32) and up_blocks[2] (stride 16), and the output of up_blocks[3] (stride 8).
F32, F16, F8 = "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.3"


def feature_channels(unet: nn.Module) -> tuple[int, int, int]:
    """(C_f8, C_f16, C_f32) = (320, 640, 1280) for SD 1.x; smaller for the tiny SD."""
    rev = list(reversed(unet.config.block_out_channels))                     # up-block output widths
    return rev[3], rev[2], rev[1]


@dataclass
class Frozen:
    """What every pass needs but nobody trains: VAE, DDPM schedule, hooks, the fixed noise pattern."""
    vae: nn.Module
    scheduler: object
    capture: FeatureCapture
    time_hook: TimeOffsetHook
    eps_fix: torch.Tensor                                                    # (1, 4, 64, 64)

    def noise(self, z: torch.Tensor) -> torch.Tensor:
        """eps_fix at the latent size of z (bicubic when not 64x64), broadcast over the batch (official)."""
        eps = self.eps_fix                                                   # fp32, on z's device
        if eps.shape[-2:] != z.shape[-2:]:
            eps = F.interpolate(eps, size=z.shape[-2:], mode="bicubic", align_corners=False)
        return eps.expand(z.shape[0], -1, -1, -1).to(z.dtype)                   # (B, 4, h, w)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave the trained parts' autocast for a frozen part (also works on the meta device)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


def encode_image(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image (B, 3, H, W) in [0, 1] -> clean latent z = posterior mean x 0.18215 (B, 4, H/8, W/8), fp32.

    Grey modalities arrive replicated to 3 channels and are fed as if they were RGB: x * 2 - 1 in [-1, 1].
    The frozen VAE runs in its storage dtype (fp16 on CUDA), outside the trained parts' autocast, no grad.
    """
    with _no_autocast(x.device):
        return vae_encode(vae, x * 2 - 1).float()


def decode_latent(vae: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """Scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), not clipped, fp32, no grad, outside autocast."""
    with _no_autocast(o.device):
        return vae_decode(vae, o.detach()).float()


def make_eps_fix(seed: int) -> torch.Tensor:
    """The noise pattern of every UNet pass: randn(1, 4, 64, 64) from its own generator (not --seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, LATENT_NOISE_SIZE, LATENT_NOISE_SIZE, generator=g)


# ------------------------------------------------------------------------------------------------------------
# Projections and the DAFormer head (official detectron2 BottleneckBlock, sem_seg_head/daformer_head.py)
# ------------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """detectron2 BottleneckBlock (1 block, stride 1, GN(32)): 1x1 C->128, 3x3 128->128, 1x1 128->C_out, GN
    after each conv, ReLU after the first two; shortcut 1x1 C->C_out + GN; add; ReLU. Bias-free convs, Kaiming
    normal (fan_out, relu) as detectron2's c2_msra_fill."""

    def __init__(self, c_in: int, c_out: int, c_mid: int = 128):
        super().__init__()
        conv = lambda a, b, k: nn.Conv2d(a, b, k, padding=k // 2, bias=False)  # noqa: E731
        self.conv1, self.norm1 = conv(c_in, c_mid, 1), nn.GroupNorm(32, c_mid)
        self.conv2, self.norm2 = conv(c_mid, c_mid, 3), nn.GroupNorm(32, c_mid)
        self.conv3, self.norm3 = conv(c_mid, c_out, 1), nn.GroupNorm(32, c_out)
        self.shortcut, self.norm_sc = conv(c_in, c_out, 1), nn.GroupNorm(32, c_out)
        for m in (self.conv1, self.conv2, self.conv3, self.shortcut):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # detectron2 c2_msra_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))                                    # (B, 128, h, w)
        h = F.relu(self.norm2(self.conv2(h)))
        h = self.norm3(self.conv3(h))                                            # (B, C_out, h, w)
        return F.relu(h + self.norm_sc(self.shortcut(x)))


def ce_all_pixels(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over ALL pixels, ignored ones counting as 0 (mmseg 0.16 / DAFormer / MADM convention).

    logits (B, K, H, W), y (B, H, W) int64 with 255 = ignore, weight (B, H, W) per-pixel weights or None.
    Dividing by every pixel (not only the valid ones) is what the official code does: images with many ignored
    pixels contribute a smaller loss.
    """
    ce = F.cross_entropy(logits.float(), y, ignore_index=255, reduction="none")  # (B, H, W), 0 where ignored
    if weight is not None:
        ce = ce * weight
    return ce.mean()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, alpha_max: float) -> None:
    """Mean-teacher update: theta_ema <- a * theta_ema + (1 - a) * theta, a_i = min(1 - 1/(i + 1), alpha_max).

    The ramp lets the EMA copy follow the model closely in the first steps (DAFormer / MADM `_update_ema`).
    Parameters only: buffers (BatchNorm statistics) are left untouched, as in the official code.
    """
    alpha = min(1.0 - 1.0 / (step + 1), alpha_max)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(alpha).add_(p.detach(), alpha=1.0 - alpha)


@torch.no_grad()
def class_mix_masks(y_s: torch.Tensor) -> torch.Tensor:
    """ClassMix masks (Olsson et al. 2021; DAFormer `get_class_masks`): for every source image, half (rounded up)
    of the classes present in the whole batch's source labels are drawn at random, and that image's pixels of
    those classes are pasted. 255 counts as a class, as in the official code. Uses the global (seeded,
    checkpointed) torch CPU generator.

    y_s (B, H, W) int64 -> M (B, 1, H, W) float in {0, 1}; 1 = take the source pixel.
    """
    classes = torch.unique(y_s).cpu()
    n = classes.numel()
    masks = []
    for y in y_s:  # one independent draw per image
        picked = classes[torch.randperm(n)[: (n + 1) // 2]].to(y.device)
        masks.append(torch.isin(y, picked))
    return torch.stack(masks)[:, None].float()


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a full turn)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    s = torch.where(v > 0, c / v.clamp_min(1e-8), torch.zeros_like(v))
    cc = c.clamp_min(1e-8)
    h = torch.where(v == r, ((g - b) / cc) % 6, torch.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B, 3, H, W)
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with DAFormer's kernel size: k = ceil(0.1 * side), minus 1 if even (51 at 512).

    x (B, C, H, W), sigma (B,) -> (B, C, H, W); reflect padding (kornia's default border).
    """
    B, C, H, W = x.shape
    out = []
    for i in range(B):
        xi = x[i:i + 1]
        for dim, side in ((2, H), (3, W)):
            k = math.ceil(0.1 * side)
            k = k - 1 if k % 2 == 0 else k
            if k < 3:
                continue  # a 1-tap kernel is the identity
            t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
            g = torch.exp(-0.5 * (t / sigma[i]) ** 2)
            g = (g / g.sum()).view(1, 1, -1, 1) if dim == 2 else (g / g.sum()).view(1, 1, 1, -1)
            pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2, 0, 0)
            xi = F.conv2d(F.pad(xi, pad, mode="reflect"), g.expand(C, 1, *g.shape[2:]), groups=C)
        out.append(xi)
    return torch.cat(out)


@torch.no_grad()
def strong_augment(x: torch.Tensor, jitter_p: float = 0.2, strength: float = 0.2, blur_p: float = 0.5) -> torch.Tensor:
    """DACS strong augmentation of the mixed image (DAFormer `strong_transform`: color_jitter + gaussian_blur).

    x (B, 3, H, W) in [0, 1] -> same shape. The two on/off decisions are drawn once per call ("p = 0.2" means
    *applied when u > 0.2*, i.e. with probability 0.8, exactly as DAFormer's code reads); jitter factors and the
    blur sigma are drawn per image. Our colour jitter (kornia is not a dependency): brightness additive
    U(-s, s), contrast and saturation factors U(1 - s, 1 + s) (blends with the grey mean / the grey image, as
    torchvision), hue shift U(-s, s) of a full turn; the four in random order, clamped to [0, 1] after each.
    Blur sigma ~ U(0.15, 1.15). Uses the global (seeded, checkpointed) torch CPU generator.
    """
    B = x.shape[0]
    if torch.rand(()) > jitter_p:
        s = strength
        u = lambda: (torch.rand(B) * 2 * s - s).to(x.device, x.dtype).view(B, 1, 1, 1)  # noqa: E731
        for op in torch.randperm(4).tolist():
            if op == 0:  # brightness
                x = x + u()
            elif op == 1:  # contrast
                mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((1, 2)).view(B, 1, 1, 1)
                x = mean + (1 + u()) * (x - mean)
            elif op == 2:  # saturation
                grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
                x = grey + (1 + u()) * (x - grey)
            else:  # hue
                hsv = _rgb_to_hsv(x)
                hsv = torch.cat([(hsv[:, :1] + u()) % 1.0, hsv[:, 1:]], 1)
                x = _hsv_to_rgb(hsv)
            x = x.clamp(0, 1)
    if torch.rand(()) > blur_p:
        sigma = (0.15 + torch.rand(B)).to(x.device, x.dtype)
        x = _gaussian_blur(x, sigma)
    return x


class ConvBNReLU(nn.Sequential):
    """mmcv ConvModule(conv, BN, ReLU): bias-free conv, Kaiming-normal (fan_out, relu), BN weight 1 / bias 0."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, dilation: int = 1, groups: int = 1):
        conv = nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        bn = nn.BatchNorm2d(c_out)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn, nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """DAFormer context-aware fusion head (Hoyer et al. 2022, `daformer_head.py`, config `sep_aspp`).

    Per level a per-pixel Linear C_i -> 256 (no norm, no activation); every level bilinearly resized to the size of
    the first (finest) level; concat; separable ASPP with dilations (1, 6, 12, 18) and no image pooling (d = 1:
    1x1 conv; else depthwise 3x3 dilated + pointwise 1x1, each conv + BN + ReLU); concat -> 3x3 bottleneck;
    Dropout2d(0.1); 1x1 classifier with bias (PyTorch default init; callers may re-initialise `conv_seg`).

    forward(feats: list of (B, C_i, H_i, W_i), finest first) -> logits (B, K, H_0, W_0).
    """

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 256,
                 dilations: tuple[int, ...] = (1, 6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        c_cat = channels * len(in_channels)
        self.aspp = nn.ModuleList(
            ConvBNReLU(c_cat, channels, 1) if d == 1 else
            nn.Sequential(ConvBNReLU(c_cat, c_cat, 3, dilation=d, groups=c_cat), ConvBNReLU(c_cat, channels, 1))
            for d in dilations)
        self.bottleneck = ConvBNReLU(channels * len(dilations), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        H, W = feats[0].shape[-2:]
        x = []
        for f, embed in zip(feats, self.embed):
            e = embed(f.flatten(2).transpose(1, 2)).transpose(1, 2)           # (B, 256, h*w) per-pixel Linear
            e = e.reshape(f.shape[0], -1, *f.shape[-2:])                       # (B, 256, h, w)
            if e.shape[-2:] != (H, W):
                e = F.interpolate(e, size=(H, W), mode="bilinear", align_corners=False)
            x.append(e)
        x = torch.cat(x, 1)                                                    # (B, 256 * L, H, W)
        x = torch.cat([branch(x) for branch in self.aspp], 1)                  # (B, 256 * 4, H, W)
        x = self.bottleneck(x)                                                 # (B, 256, H, W)
        return self.conv_seg(self.dropout(x))                                  # (B, K, H, W)


class SegHead(nn.Module):
    """Everything the teacher EMA covers: conditioning + 4 projections + DAFormer head (official cmdise.py).

    Levels (official): s0 = decoded LPLR image 3 -> 128, s3 = f8 -> 512, s4 = f16 -> 512, s5 = f32 -> 512.
    """

    def __init__(self, cond: Conditioning, c_feats: tuple[int, int, int], num_classes: int,
                 fusion_stride: int):
        super().__init__()
        self.cond = cond
        c8, c16, c32 = c_feats
        self.proj = nn.ModuleDict({"s0": Bottleneck(3, 128), "s3": Bottleneck(c8, 512),
                                   "s4": Bottleneck(c16, 512), "s5": Bottleneck(c32, 512)})
        self.head = DAFormerHead([128, 512, 512, 512], num_classes)
        self.fusion_stride = fusion_stride

    def forward(self, s0: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor,
                f32: torch.Tensor) -> torch.Tensor:
        H, W = s0.shape[-2:]
        if self.fusion_stride > 1:  # memory option: fuse at 1/stride instead of the full input resolution
            s0 = F.interpolate(s0, scale_factor=1 / self.fusion_stride, mode="bilinear", align_corners=False)
        feats = [self.proj["s0"](s0), self.proj["s3"](f8), self.proj["s4"](f16), self.proj["s5"](f32)]
        logits = self.head(feats)                                                # (B, K, H/fs, W/fs)
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits                                                            # (B, K, H, W)


def madm_forward(unet: nn.Module, seg: SegHead, frozen: Frozen, z0: torch.Tensor,
                 t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One MADM pass: noised latent -> UNet (one call) -> features, o -> s0 = decode(o) -> head -> logits.

    z0 (B, 4, h, w) clean VAE latent, t the timestep (0 for student/eval, the DPLG t for the teacher).
    Returns logits (B, K, 8h, 8w) and the UNet output o (B, 4, h, w) that LPLR regresses.
    """
    B = z0.shape[0]
    z_t = add_noise(frozen.scheduler, z0, frozen.noise(z0), t)  # z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps_fix
    frozen.time_hook.delta = seg.cond.time_delta()               # (1, d_t) time offset of this conditioning
    o = unet(z_t, t, encoder_hidden_states=seg.cond.context(B)).sample       # (B, 4, h, w)
    feats = frozen.capture.features
    f8, f16, f32 = feats[F8], feats[F16], feats[F32]             # (B, 320, h, w) (B, 640, h/2) (B, 1280, h/4)
    # LPLR decode path: the frozen decoder turns o into a full-resolution "colour label image". No gradient
    # flows through it (official); the UNet learns o only from the L1 regression.
    s0 = decode_latent(frozen.vae, o)                            # (B, 3, 8h, 8w), not clipped
    return seg(s0, f8, f16, f32), o                              # (B, K, 8h, 8w), (B, 4, h, w)


class Student(nn.Module):
    """The trained model (UNet + SegHead) as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, unet: nn.Module, seg: SegHead, frozen: Frozen):
        super().__init__()
        self.unet, self.seg = unet, seg
        object.__setattr__(self, "frozen", frozen)  # not a submodule: the VAE is neither trained nor synced

    def forward(self, z0: torch.Tensor, t: int = 0, seg: Optional[SegHead] = None):
        return madm_forward(self.unet, seg if seg is not None else self.seg, self.frozen, z0, t)


# ------------------------------------------------------------------------------------------------------------
# LPLR: label palette and latent regression (paper, Fig. 2; official mtmadise.py)
# ------------------------------------------------------------------------------------------------------------
def palette_image(y: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """Colour a label map with the class palette: y (B, H, W) ids, 255 -> black -> (B, 3, H, W) in [0, 1]."""
    lut = torch.zeros(256, 3)
    lut[: len(palette)] = torch.as_tensor(palette, dtype=torch.float32) / 255.0
    return lut.to(y.device)[y.long()].permute(0, 3, 1, 2).contiguous()       # (B, 3, H, W)


def palette_to_label(img: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """Inverse of `palette_image`: nearest palette colour, black -> 255. (B, 3, H, W) [0, 1] -> (B, H, W)."""
    colours = torch.as_tensor(palette, dtype=torch.float32) / 255.0
    colours = torch.cat([colours, torch.zeros(1, 3)])                          # (K+1, 3), last = ignore
    d = ((img.permute(0, 2, 3, 1)[..., None, :] - colours.to(img.device)) ** 2).sum(-1)  # (B, H, W, K+1)
    y = d.argmin(-1)
    return torch.where(y == len(palette), torch.full_like(y, 255), y)


@torch.no_grad()
def palette_latent(vae: nn.Module, y: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """z_pal = VAE posterior mean of the palette image x 0.18215: (B, H, W) -> (B, 4, H/8, W/8)."""
    return encode_image(vae, palette_image(y, palette))


def loss_lplr(o: torch.Tensor, z_pal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latent regression: L_reg = sum(|o - z_pal| * m) / numel(o) (official: numel counts masked elements).

    o, z_pal (B, 4, h, w); mask (B, H, W) float pixel weights (valid 1, ignore 0; times q for the mixed
    image), nearest-downsampled to the latent size and repeated over the 4 channels.
    """
    m = F.interpolate(mask[:, None].float(), size=o.shape[-2:], mode="nearest").expand_as(o)  # (B, 4, h, w)
    return ((o.float() - z_pal).abs() * m).sum() / o.numel()


# ------------------------------------------------------------------------------------------------------------
# DPLG, pseudo labels and the self-training losses (paper, Fig. 2; official mtmadise.py, dacs_transforms.py)
# ------------------------------------------------------------------------------------------------------------
def dplg_timestep(step: int, t0: int, t_end: int) -> int:
    """DPLG teacher timestep t = int(t0 (1 - i / T_end)) for i <= T_end, else 0 (linear decay to t = 0)."""
    return int(t0 * (1 - step / t_end)) if t_end > 0 and step <= t_end else 0


@torch.no_grad()
def pseudo_labels(logits_t: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (B, K, H, W) -> y_hat = argmax (B, H, W) and the quality q = mean(p_max >= threshold),
    one scalar over all pixels of the micro-batch (official: no per-pixel mask, no crop of image borders)."""
    p_max, y_hat = torch.softmax(logits_t.float(), 1).max(1)                   # (B, H, W) each
    return y_hat, (p_max >= threshold).float().mean()


@torch.no_grad()
def class_mix(M: torch.Tensor, x_s: torch.Tensor, x_t: torch.Tensor, y_s: torch.Tensor, y_hat: torch.Tensor,
              q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix of a source and a target crop with mask M (B, 1, H, W), 1 = source pixel (dacs_transforms):
    x_m = M x_s + (1 - M) x_t   (B, 3, H, W)
    y_m = M y_s + (1 - M) y_hat (B, H, W)
    w_m = M + (1 - M) q         (B, H, W) per-pixel CE weight
    """
    x_m = M * x_s + (1 - M) * x_t
    y_m = torch.where(M[:, 0] > 0, y_s, y_hat)
    w_m = M[:, 0] + (1 - M[:, 0]) * q
    return x_m, y_m, w_m


def loss_ce_source(logits_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
    """L_src = mean over all pixels of CE(logits_s, y_s), ignore 255 counting as 0."""
    return ce_all_pixels(logits_s, y_s)


def loss_ce_mixed(logits_m: torch.Tensor, y_m: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
    """L_mix = mean over all pixels of w_m * CE(logits_m, y_m), w_m = M + (1 - M) q."""
    return ce_all_pixels(logits_m, y_m, w_m)


def lr_factor(i: int, total: int) -> float:
    """detectron2 WarmupParamScheduler(MultiStepParamScheduler) as configured in config_files/common/optim.py.

    U = 2N - 1, e(i) = int((i/N + 1e-6) U); factor 1 before int(0.88888 U), 0.1 before int(0.96296 U), then
    0.01; linear warm-up from 0.067 while i/N < 500/184375 (about 27 of 10000 steps).
    """
    U = 2 * total - 1
    e = int((i / total + 1e-6) * U)
    f = 1.0 if e < int(0.88888 * U) else 0.1 if e < int(0.96296 * U) else 0.01
    warm = 500 / 184375
    if i / total < warm:
        a = (i / total) / warm
        f *= 0.067 * (1 - a) + a
    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights (prompt and time-offset tensors included), none on norms and biases."""
    norms = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def micro_seed(seed: int, step: int, j: int) -> int:
    """Seed of global micro-step j of optimizer step `step` (ClassMix, augmentation, t0 draw, dropout)."""
    return int(np.random.SeedSequence([seed, step, j]).generate_state(1, np.uint64)[0] % (2**63 - 1))


# ------------------------------------------------------------------------------------------------------------
# Setup: SD, model, data
# ------------------------------------------------------------------------------------------------------------
def task_settings(args: Args) -> tuple[int, float, tuple[float, ...]]:
    """(DPLG t0 lo, DPLG end fraction, LPLR weights) for --tgt, overridden by explicit flags."""
    t0, frac, weights = TASKS.get(args.tgt, TASK_OTHER)
    if args.lplr_weights is not None and len(args.lplr_weights) not in (1, 2):
        n = len(args.lplr_weights)
        raise UserError(f"error: --lplr-weights: got {n} values. Expected 1 (source latent only) or 2 "
                        "(source and mixed latents).")
    return (args.dplg_t0 if args.dplg_t0 is not None else t0,
            args.dplg_end_frac if args.dplg_end_frac is not None else frac,
            tuple(args.lplr_weights) if args.lplr_weights else weights)


def build_model(args: Args, num_classes: int, device: torch.device, precision: runtime.Precision):
    """Load SD, embed "" once, free the text encoder, set what trains, hook the UNet -> (student, ema_seg)."""
    sd = load_sd(args.sd_model, device=device)
    e_empty = encode_prompts(sd.tokenizer, sd.text_encoder, [""]).float()    # (1, 77, d) E("")
    sd.text_encoder = sd.tokenizer = None                                     # used once: free its memory
    unet, vae = sd.unet, sd.vae
    # Whole UNet trained except conv_norm_out / conv_out (official: found unused by a dummy backward).
    unet.requires_grad_(True)
    unet.conv_norm_out.requires_grad_(False)
    unet.conv_out.requires_grad_(False)
    unet.train()
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    # Frozen VAE in half precision on CUDA (inference only; official fp16), fp32 on CPU.
    vae_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.vae_dtype)
    if vae_dtype is None:
        raise UserError(f"error: --vae-dtype: unknown value '{args.vae_dtype}'. Expected fp16, bf16 or fp32.")
    if device.type == "cuda":
        vae.to(dtype=vae_dtype)
    frozen = Frozen(vae, sd.scheduler, FeatureCapture(unet, [F32, F16, F8], pre=[F32, F16]),
                    TimeOffsetHook(unet), make_eps_fix(args.noise_seed).to(device))
    torch.manual_seed(args.seed)                                              # head / conditioning init
    time_dim = unet.time_embedding.linear_2.out_features                      # 1280 in SD 1.x
    seg = SegHead(Conditioning(e_empty, time_dim), feature_channels(unet), num_classes,
                  args.fusion_stride).to(device)
    ema_seg = copy.deepcopy(seg).requires_grad_(False)                        # teacher: EMA of SegHead only
    return Student(unet, seg, frozen), ema_seg


def build_data(args: Args, num_classes: int):
    """Source/target training streams (source with rare-class sampling) and the target evaluation set."""
    scale = 1 / 8 if args.demo else 1.0
    val = build_dataset(args.tgt, args.data_root, "val", num_classes=num_classes, scale=scale)
    if args.eval_only:
        return None, None, val
    kw = dict(crop_size=args.crop_size, scale=scale, num_classes=num_classes)
    src = build_dataset(args.src, args.data_root, "train", **kw)
    tgt = build_dataset(args.tgt, args.data_root, "train", **kw)
    # RCS (DAFormer): images with > 3000 px of the class, crops re-drawn until > 1500 px (official dataset);
    # the helper scales these pixel counts by scale^2 for the 1/8-size demo data.
    rcs = RareClassSampling(src, temperature=args.rcs_temperature, min_pixels=3000, min_crop_ratio=0.5)
    return TrainStream(src, args.seed, rcs, stream_id=0), TrainStream(tgt, args.seed, None, stream_id=1), val


def state_weights(student: Student, ema_seg: SegHead) -> dict[str, torch.Tensor]:
    """Flat tensors for the safetensors checkpoint: student UNet, student SegHead, teacher (EMA) SegHead."""
    w = {f"unet.{k}": v for k, v in student.unet.state_dict().items()}
    w.update({f"seg.{k}": v for k, v in student.seg.state_dict().items()})
    w.update({f"ema.{k}": v for k, v in ema_seg.state_dict().items()})
    return w


def load_weights(student: Student, ema_seg: SegHead, weights: dict[str, torch.Tensor], where: str) -> None:
    try:
        for prefix, module in (("unet.", student.unet), ("seg.", student.seg), ("ema.", ema_seg)):
            module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    except RuntimeError as e:
        why = str(e).splitlines()[0]
        raise UserError(f"error: --ckpt: '{where}' does not fit this model ({why}). Expected a checkpoint of "
                        "madm.py with the same --sd-model and --tgt class set.") from None


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    # ---- seeding, device, precision, processes (one visible block)
    dist = runtime.init_distributed(args.device)
    device = dist.device
    precision = runtime.choose_precision(args.precision, device)
    runtime.seed_everything(args.seed)
    num_classes = check_pair(args.src, args.tgt)
    palette, class_names = PALETTES[num_classes], CLASS_SETS[num_classes]
    t0_lo, end_frac, lplr_w = task_settings(args)
    t_end = int(round(end_frac * args.iters))
    m = args.micro_batch_size
    if args.batch_size % (m * dist.world):
        raise UserError(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch-size {m} "
                        f"x {dist.world} processes. Expected batch = micro x processes x accumulation steps.")
    accum = args.batch_size // (m * dist.world)
    out = Path(args.out or f"runs/madm-{args.src}-{args.tgt}")
    if dist.is_main:
        print("args:", json.dumps(dataclasses.asdict(args)))
        print(f"device {device} x{dist.world} | {precision.reason} | accumulation {accum} x micro-batch {m}")
        terms = "source + mixed" if len(lplr_w) > 1 else "source only"
        print(f"task {args.tgt}: {num_classes} classes | DPLG t0 {{{t0_lo}, {t0_lo + 1}}} until step {t_end} "
              f"| LPLR weights {lplr_w} ({terms})")

    # ---- validate inputs (data, SD) before anything is written
    profiling = args.profile > 0
    if not profiling:
        src_stream, tgt_stream, val_set = build_data(args, num_classes)
    student, ema_seg = build_model(args, num_classes, device, precision)
    frozen, raw = student.frozen, student
    ema_seg.train()  # the teacher head runs in train mode (dropout, BN batch statistics), as official
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  eps=1e-8)
    scaler = precision.make_scaler()
    trainable = [p for p in student.parameters() if p.requires_grad]
    start, history = 0, []
    if not profiling and not args.eval_only:
        ckpt = runtime.resume_checkpoint(out) if args.resume else None
        runtime.prepare_out_dir(str(out), resume=args.resume, is_main=dist.is_main, allow_existing=args.demo)
        if ckpt is not None:
            weights, state = runtime.load_checkpoint(ckpt)
            load_weights(student, ema_seg, weights, str(ckpt))
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            runtime.set_rng_state(state["rng"])
            start = state["step"]
            if (out / "metrics.json").exists():  # keep the log of the steps before the interruption
                history = [r for r in json.loads((out / "metrics.json").read_text()).get("train_log", [])
                           if r["step"] <= start]
            if dist.is_main:
                print(f"resumed from {ckpt} at step {start}")
        elif dist.is_main:
            runtime.write_metrics(out, args, key="args")
    if args.eval_only:
        weights, state = runtime.load_checkpoint(args.ckpt)
        load_weights(student, ema_seg, weights, args.ckpt)
        runtime.prepare_out_dir(str(out), eval_only=True, is_main=dist.is_main)
        return evaluate(args, student, val_set, precision, dist, out, step=state.get("step", 0),
                        class_names=class_names, palette=palette)
    student = dist.wrap(student)  # DDP when launched with torchrun (gradients averaged over processes)
    if profiling:  # random crops of the right shapes: the cost of a step does not depend on the pixels
        def fake_batch(step: int, start_idx: int, count: int) -> dict:
            g = torch.Generator().manual_seed(step * 1000 + start_idx)
            c = args.crop_size
            return {"image": torch.rand(count, 3, c, c, generator=g),
                    "label": torch.randint(0, num_classes, (count, c, c), generator=g)}
        get_src = get_tgt = fake_batch
    else:
        get_src, get_tgt = src_stream.batch, tgt_stream.batch

    encode = lambda x: encode_image(frozen.vae, x)  # noqa: E731  (B, 3, H, W) -> (B, 4, H/8, W/8)

    def training_step(i: int) -> dict:
        """Optimizer step i (0-based): EMA, LR, A micro-steps of (teacher, source, mix, mixed), clip, step."""
        # ---------- METHOD STEP BEGIN ----------
        if i >= 1:  # EMA of conditioning + projections + head; the UNet stays shared (official cmdise.py)
            ema_update(ema_seg, raw.seg, i, args.ema_alpha)
        # Multi-step LR with linear warm-up, one value for every parameter (no head multiplier; official).
        lr = args.lr * lr_factor(i, args.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logs = dict(loss_src=0.0, loss_mix=0.0, loss_reg_s=0.0, loss_reg_t=0.0, q=0.0, t_dplg=0.0)
        for k in range(accum):
            j = dist.rank * accum + k                              # global micro-step index
            torch.manual_seed(micro_seed(args.seed, i, j))         # same draws whatever the GPU/accum split
            src, tgt = get_src(i, j * m, m), get_tgt(i, j * m, m)
            x_s = src["image"].to(device)                          # (b, 3, H, W) in [0, 1]
            y_s = src["label"].to(device)                          # (b, H, W) target class ids, 255 ignore
            x_t = tgt["image"].to(device)                          # (b, 3, H, W) target, label unused
            # DDP: only the last backward of the step all-reduces; earlier ones accumulate locally.
            last = k == accum - 1

            # -- Teacher (DPLG): noised clean target latent, EMA conditioning/projections/head, one pass.
            t0 = t0_lo + int(torch.randint(0, 2, ()))              # t0 uniform in {lo, lo + 1}
            t_dplg = dplg_timestep(i, t0, t_end)
            with torch.no_grad(), precision.autocast():
                logits_t, _ = raw(encode(x_t), t_dplg, seg=ema_seg)    # (b, K, H, W)
            y_hat, q = pseudo_labels(logits_t, args.pseudo_threshold)  # (b, H, W), scalar

            # -- Source pass: CE + LPLR on the source latent; backward now to free its activations.
            sync = contextlib.nullcontext() if dist.world == 1 else student.no_sync()
            with sync:
                with precision.autocast():
                    logits_s, o_s = student(encode(x_s), 0)        # (b, K, H, W), (b, 4, H/8, W/8)
                    l_src = loss_ce_source(logits_s, y_s)
                    # LPLR target: palette image of y_s through the frozen VAE; ignore pixels masked out.
                    z_pal = palette_latent(frozen.vae, y_s, palette)   # (b, 4, H/8, W/8), no grad
                    l_reg_s = lplr_w[0] * loss_lplr(o_s, z_pal, (y_s != 255).float())
                    loss = (l_src + l_reg_s) / accum               # micro-losses add up: scale by 1/A
                runtime.check_finite(loss, i + 1, out)             # stop on NaN/inf, keep the last checkpoint
                scaler.scale(loss).backward()                      # frees this pass's activations

            # -- ClassMix (no grad): half of the source classes pasted onto the target crop.
            M = class_mix_masks(y_s)                               # (b, 1, H, W) 1 = source pixel
            x_m, y_m, w_m = class_mix(M, x_s, x_t, y_s, y_hat, q)
            x_m = strong_augment(x_m)                              # jitter + blur on the mixed image only

            # -- Mixed pass: quality-weighted CE (+ LPLR on the mixed latent when the task uses it).
            sync = contextlib.nullcontext() if dist.world == 1 or last else student.no_sync()
            with sync:
                with precision.autocast():
                    logits_m, o_m = student(encode(x_m), 0)        # same student, same conditioning
                    l_mix = loss_ce_mixed(logits_m, y_m, w_m)
                    l_reg_t = torch.zeros((), device=device)
                    if len(lplr_w) > 1:  # event regresses the source only; infrared / depth also the mix
                        # mask (y_m != 255) * q: q also weights the pasted source pixels (official quirk)
                        z_pal = palette_latent(frozen.vae, y_m, palette)
                        l_reg_t = lplr_w[1] * loss_lplr(o_m, z_pal, (y_m != 255).float() * q)
                    loss = (l_mix + l_reg_t) / accum
                runtime.check_finite(loss, i + 1, out)
                scaler.scale(loss).backward()                      # DDP all-reduces here on the last one
            for key, v in (("loss_src", l_src), ("loss_mix", l_mix), ("loss_reg_s", l_reg_s),
                           ("loss_reg_t", l_reg_t), ("q", q), ("t_dplg", t_dplg)):
                logs[key] += float(v.detach() if torch.is_tensor(v) else v) / accum
        # Clip the accumulated, unscaled gradient to global L2 norm 0.01 (official; rescales almost always).
        scaler.unscale_(optimizer)                                 # no-op without fp16
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)  # returns the pre-clip norm
        scaler.step(optimizer)                                     # skipped on inf/NaN gradients (fp16)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # ---------- METHOD STEP END ----------
        logs.update(lr=lr, grad_norm=float(grad_norm))
        return logs

    if profiling:
        step_counter = iter(range(10**9))
        result = runtime.profile_training(lambda: training_step(next(step_counter)), args.profile, device,
                                          extra={"method": "madm", "sd_model": args.sd_model,
                                                 "crop_size": args.crop_size, "batch_size": args.batch_size,
                                                 "micro_batch_size": m, "world": dist.world,
                                                 "grad_checkpointing": args.grad_checkpointing,
                                                 "precision": precision.reason.split(";")[0],
                                                 "fusion_stride": args.fusion_stride})
        if dist.is_main:
            print(json.dumps(result))
        return result

    # ---- the loop (plumbing outside the fence: logging, evaluation, checkpoints)
    timer, result = runtime.RunTimer(), {}
    for i in range(start, args.iters):
        logs = training_step(i)
        timer.tick()
        step = i + 1
        if step % args.log_every == 0 or step == args.iters:
            history.append(dict(step=step, **logs))
            if dist.is_main:
                print(runtime.log_line(step, args.iters, logs, timer.lap(), runtime.peak_memory_gb(device)),
                      flush=True)
                runtime.write_metrics(out, history, key="train_log")
        if step % args.eval_every == 0 or step == args.iters:
            result = evaluate(args, raw, val_set, precision, dist, out, step, class_names, palette)
        if step % args.ckpt_every == 0 or step == args.iters:
            if dist.is_main:
                state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "rng": runtime.get_rng_state(), "args": dataclasses.asdict(args)}
                runtime.save_checkpoint(out, step, state_weights(raw, ema_seg), state, keep=args.keep_ckpts)
            dist.barrier()
    if dist.is_main:
        print(f"done: {args.iters} steps | peak memory {runtime.peak_memory_gb(device):.1f} GB | out {out}")
    result = dict(result, train_log=history, out=str(out))
    return result


# ------------------------------------------------------------------------------------------------------------
# Evaluation: the student at t = 0 on the whole image resized to 512x512 (official test_resize_h_w)
# ------------------------------------------------------------------------------------------------------------
def evaluate(args: Args, student: Student, dataset, precision: runtime.Precision, dist: runtime.Dist,
             out: Path, step: int, class_names, palette) -> dict:
    """Score the student on the full target test list (one summed confusion matrix; first half kept apart)."""
    device = next(student.parameters()).device
    student.seg.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        """(1, 3, 512, 512) in [0, 1] -> (1, K, 512, 512) logits: student conditioning, t = 0, LPLR decode."""
        with precision.autocast():
            return student(encode_image(student.frozen.vae, x), 0)[0].float()

    # Two halves scored separately and summed: the full-list number, plus the first half that the official
    # 2-GPU evaluation actually scores (its cross-rank gather is commented out), at no extra cost.
    n = len(dataset)
    half = math.ceil(n / 2)
    kw = dict(device=device, dist=dist, input_size=(args.eval_size, args.eval_size), desc=f"{args.tgt} test",
              metric_size="native" if args.eval_label_size == "native" else "input")
    K = len(class_names)
    r1 = metrics.evaluate(predict, torch.utils.data.Subset(dataset, range(half)), K, class_names, palette,
                          pictures_dir=out / "predictions" if dist.is_main else None, **kw)
    conf = np.asarray(r1["confusion"], np.int64)
    if half < n:
        r2 = metrics.evaluate(predict, torch.utils.data.Subset(dataset, range(half, n)), K, class_names,
                              palette, progress=False, **kw)
        conf = conf + np.asarray(r2["confusion"], np.int64)
    student.seg.train()
    res = metrics.summarize(conf, class_names)
    header = f"per-class results — {args.tgt} test, {n} images, {r1['resolution']}"
    res.update(step=step, resolution=r1["resolution"], num_images=n, miou_first_half=r1["miou"],
               table=metrics.format_table(conf, class_names, header))
    in_res = r1["resolution"].split(",")[0].replace("input ", "")
    metric_res = in_res if args.eval_label_size != "native" else "native"
    if dist.is_main:
        print(res["table"])
        print(f"eval step {step} | mIoU {100 * res['miou']:.2f} | input {in_res} | metric {metric_res} | "
              f"first half mIoU {100 * res['miou_first_half']:.2f}", flush=True)
        if out.is_dir():
            runtime.write_metrics(out, {k: v for k, v in res.items() if k not in ("table", "confusion")})
    return res


def main(args: Args) -> dict:
    """Train (or --eval-only / --profile) MADM; returns the last evaluation {"miou", "per_class_iou", ...}."""
    if args.demo:
        args = runtime.replace_defaults(args, out="runs/madm-demo", **DEMO)
        ensure_synthetic_sample(args.data_root)
    runtime.require_ckpt(args)
    if args.eval_label_size not in ("input", "native"):
        raise UserError(f"error: --eval-label-size: unknown value '{args.eval_label_size}'. Expected input "
                        "or native.")
    return train(args)


if __name__ == "__main__":
    runtime.run_cli(main, Args)
