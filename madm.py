"""MADM: Unsupervised Modality Adaptation with Text-to-Image Diffusion Models for Semantic Segmentation.

Xia et al., NeurIPS 2024, https://arxiv.org/abs/2410.21708 -- official code https://github.com/XiaRho/MADM.

Idea. Labels exist for RGB (Cityscapes), not for another modality (event, infrared, depth). MADM fine-tunes
the *whole* Stable Diffusion v1-4 UNet as a one-step feature extractor (t = 0; grey inputs fed as RGB) with
DAFormer self-training (source CE, EMA teacher, ClassMix, quality-weighted pseudo labels). Two additions:
  * DPLG (diffusion-based pseudo-label generation): early in training the teacher sees its target latent with
    a little forward-diffusion noise, t = int(t0 (1 - i / T_end)), which stabilises the pseudo labels.
  * LPLR (label palette, latent regression): the UNet's output o is regressed (masked L1) onto the VAE latent
    of the palette-coloured label; the frozen decoder turns o into a "colour label image" s0, a head input.

Paper (Fig. 2) -> code [official files]
  SD UNet, learnable prompt and time offset .. Conditioning, TimeOffsetHook, madm_forward [ldm_diffusers.py]
  Head: DAFormer fusion of s0, f8, f16, f32 .. Bottleneck, SegHead (+ common/daformer.py) [daformer_head.py]
  LPLR: palette, latent regression, s0 ....... palette_image, palette_latent, loss_lplr [mtmadise.py]
  DPLG: noised teacher pass, pseudo labels ... dplg_timestep, pseudo_labels [mtmadise.py]
  Self-training: EMA, ClassMix, augmentation . class_mix (+ common/daformer.py: ema_update, class_mix_masks,
                                               strong_augment, ce_all_pixels) [cmdise.py, dacs_transforms.py]
  Optimisation: AdamW, clip 0.01, LR steps ... make_optimizer, lr_factor [config_files/common/optim.py]
  One optimizer step, all of it assembled .... train_step

Deviations from the paper and the official code's active path
  * Plain PyTorch + diffusers + transformers (no detectron2 / mmcv / ODISE / kornia): hooks on the stock UNet;
    "" embedded once, the text encoder freed; kornia's colour jitter by hand (common/daformer.py).
  * Backward after each student pass (source, then mixed): the same summed gradient, half the activations.
  * Global batch 2 = 2 micro-steps of (1 source + 1 target) with accumulation (official: 2 GPUs, torchrun);
    each reseeds torch from (seed, step, global micro index): the GPU / accumulation split changes nothing.
  * `--precision auto`: bf16 autocast where supported, else fp16 + GradScaler (official), fp32 on CPU; the
    frozen VAE in the precision's half dtype, fp32 under fp32 (official fp16: `--vae-dtype fp16` under bf16).
  * Evaluation scores the full test list (official 2-GPU evaluation: only the first half, its gather commented
    out; `miou_first_half` in metrics.json). `--resume` restores the step (official: restarts).
  * Crops drawn with replacement as a pure function of (seed, step, index) (`TrainStream`, source with rare-class
    sampling): resume and any GPU count see the same batches.
  * Not official: `--source-only` (the paper's baseline row: source CE + source LPLR; no teacher, no mix),
    `--fusion-stride 4` (fuse at 1/4: less memory, changes results), `--eval-label-size native`,
    `--grad-checkpointing`, `--deterministic`, any source/target pair (other targets: `TASKS["other"]`).
  * `--demo`: the mini SD (common/mini_sd.py), 1/8-size synthetic data (crop, eval 64), 40 steps, lr 3e-3,
    fusion stride 4, the paper's threshold 0.968 (mini's teacher passes it: q > 0 in 29 of 40 steps).
  Kept on purpose (official quirks): the teacher shares the student's UNet (only conditioning, projections and
  head are EMA'd) and runs its head in train mode; one fixed seed-42 noise pattern, added even at t = 0; s0
  decoded without gradient; conv_norm_out / conv_out frozen; CE averaged over all pixels; ClassMix may paste
  255; q also weights the source-pasted pixels of the mixed LPLR mask; metric at 512x512 on resized labels.

Commands (more in README.md; memory: --estimate-memory's bf16 peak, official README: GPUs > 40 GB)
  python madm.py --src cityscapes --tgt dsec_event [--source-only]   # paper setting / baseline row: 23.4 GB
  python madm.py --src cityscapes --tgt dsec_event --grad-checkpointing --fusion-stride 4  # on 24 GB: 16.8 GB
  torchrun --nproc_per_node 2 madm.py --src cityscapes --tgt fmb_infrared    # the official 2-GPU layout
  python madm.py --demo                                                       # CPU, minutes: mini SD, synthetic data
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import metrics, runs
from common.cli import UserError, check_common_flags, log, replace_defaults, run_cli
from common.daformer import DAFormerHead, ce_all_pixels, class_mix_masks, ema_update, strong_augment
from common.datasets import (CLASS_SETS, PALETTES, RareClassSampling, TrainStream, build_dataset, check_pair,
                             eval_target, run_tag)
from common.sd_backbone import (FeatureCapture, add_noise, encode_prompts, load_sd, to_dtype, vae_decode,
                                 vae_encode)
from common.synthetic import ensure_synthetic_sample


@dataclass
class Args:
    # ---- experiment / infrastructure
    src: str = "cityscapes"  # source dataset (labelled RGB); official configs: Cityscapes
    tgt: str = "dsec_event"  # target (unlabelled modality): dsec_event, fmb_infrared, deliver_depth, any dataset or
                             # folder:PATH
    data_root: str = "data"  # folder holding the datasets in their official layouts (data/README.md)
    out: Optional[str] = None  # run folder; default runs/madm-<src>-<tgt> (runs/madm-demo for --demo)
    seed: int = 42  # seed of data order, ClassMix, augmentation, dropout; official config_files/common/train.py
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where supported, else fp16 + GradScaler; fp32 on CPU) | fp32 | bf16 | fp16
                             # (official)
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS, bit-identical same-seed runs on one GPU (slower);
                                 # CPU: always
    grad_checkpointing: bool = False  # recompute UNet activations in backward (same maths, less memory); our choice
    iters: int = 10000  # optimizer steps; official train.max_iter
    log_every: int = 50  # steps between log lines; our choice
    eval_every: int = 1000  # steps between evaluations (and at the end); official hooks
    ckpt_every: int = 1000  # steps between checkpoints (and at the end); official hooks
    keep_ckpts: int = 3  # checkpoints kept in <out>/checkpoints; our choice
    resume: bool = False  # continue from the latest checkpoint in --out
    eval_only: bool = False  # only evaluate --ckpt
    ckpt: Optional[str] = None  # checkpoint folder for --eval-only / --predict
    predict: Optional[str] = None  # folder of images: write <out>/predictions/<stem>_color.png and _trainId.png for
                                   # each (needs --ckpt)
    profile: int = 0  # time N training iterations (FLOPs, s/iter, memory, utilization), print one JSON line, write
                      # nothing
    estimate_memory: bool = False  # predict the peak GPU memory of this command's training step without GPU, data or
                                   # weights; one JSON line
    demo: bool = False  # mini SD (pretrained on the synthetic world) + synthetic data + short schedule: minutes on a
                        # CPU
    # ---- data
    batch_size: int = 2  # global batch (source + target pairs per optimizer step); official batch 2 on 2 GPUs (its bs
                         # flag)
    micro_batch_size: int = 1  # pairs per forward pass; accumulation = batch / (micro * world); official 1 per GPU
    crop_size: int = 512  # square training crop; official data configs
    rcs_temperature: float = 0.01  # rare-class sampling temperature on the source; official dataset (DAFormer RCS)
    # ---- backbone
    sd_model: str = "CompVis/stable-diffusion-v1-4"  # hub id or folder (mini: pretrained miniature; tiny, random-sd15:
                                                     # random); official mtmadise_multi_lora.py
    vae_dtype: str = "auto"  # frozen VAE dtype: auto = precision's (fp16 under fp16 = official; bf16; fp32) | fp16 |
                             # bf16 | fp32
    noise_seed: int = 42  # seed of the one fixed noise pattern eps_fix; official ldm_diffusers.py add_noise
    # ---- method
    source_only: bool = False  # baseline (the paper's source-only row): source CE + source LPLR; no teacher, ClassMix
                               # or mixed pass
    ema_alpha: float = 0.999  # teacher EMA momentum cap, alpha_i = min(1 - 1/(i+1), 0.999); official model config
    pseudo_threshold: float = 0.968  # confidence threshold of the pseudo-label quality q; official pseudo_threshold
    dplg_t0: Optional[int] = None  # DPLG start timestep lo (t0 drawn from {lo, lo+1}); default per task: 50,
                                   # deliver_depth 60; official
    dplg_end_frac: Optional[float] = None  # DPLG ends at this fraction of --iters; default per task: 0.8, deliver_depth
                                           # 0.5; official
    lplr_weights: Optional[tuple[float, ...]] = None  # LPLR weights: 1 value = source only, 2 = source + mixed; default
                                                      # dsec_event 20, else 1 1; official
    fusion_stride: int = 1  # head fusion resolution: 1 = full input resolution (official), 4 = 1/4 (memory option, our
                            # choice)
    # ---- optimisation
    lr: float = 5e-6  # AdamW learning rate of every trainable parameter; official config_files/common/optim.py
    weight_decay: float = 0.05  # AdamW weight decay (0 on norm layers and biases); official optim config,
                                # utils/parameter_count.py
    grad_clip: float = 0.01  # global L2 gradient clip after unscaling; official train.grad_clip, engine/train_loop.py
    # ---- evaluation
    eval_size: int = 512  # test images resized to eval_size^2 (Pillow bilinear, labels nearest); official
                          # test_resize_h_w
    eval_label_size: str = "input"  # input = labels nearest-resized to the input (official) | native = logits upsampled
                                    # to the label size


# tgt -> (DPLG t0 lo, DPLG end / iters, LPLR weights); official config_files/SemSeg/MTMADISE/*, "other" ours
TASKS = {"dsec_event": (50, 0.8, (20.0,)), "fmb_infrared": (50, 0.8, (1.0, 1.0)),
         "deliver_depth": (60, 0.5, (1.0, 1.0)), "other": (50, 0.8, (1.0, 1.0))}
VAE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEMO = dict(sd_model="mini", data_root="data/synthetic", iters=40, crop_size=64, eval_size=64, lr=3e-3,
            log_every=5, eval_every=40, ckpt_every=40, fusion_stride=4)


# ---- SD backbone with learnable conditioning (Fig. 2; official ldm_diffusers.py, ldm_base.py) ----
class Conditioning(nn.Module):
    """Learnable text context and time offset, shared by every student pass; the teacher uses its EMA copy.
    context c = tanh(a_u) * E("") + tanh(a_c) * P                       (1, 77, d)
    time emb  = time_embedding(time_proj(t)) + tanh(a_t) * T            (1, d_t)
    E("") is the frozen text-encoder output of the empty prompt (a buffer, not trained). a_t starts at zero,
    so the time offset is exactly 0 at initialisation; a_u, a_c ~ U(0, 1); P, T trunc-normal(0.02) (official)."""

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
    """Forward hook on `unet.time_embedding` adding the active conditioning's time offset to its output: the
    stock diffusers forward stays untouched; `delta` is set right before every UNet call (student or EMA)."""

    def __init__(self, unet: nn.Module):
        self.delta: Optional[torch.Tensor] = None
        self.handle = unet.time_embedding.register_forward_hook(self)

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        return out if self.delta is None else out + self.delta.to(out.dtype)    # (B, d_t)


# UNet features (official feature_extractor.py indices [5, 8, 11], "after"): the inputs of the upsamplers of
# up_blocks[1] (stride 32) and up_blocks[2] (stride 16), and the output of up_blocks[3] (stride 8).
F32, F16, F8 = "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.3"


def feature_channels(unet: nn.Module) -> tuple[int, int, int]:
    """(C_f8, C_f16, C_f32) = (320, 640, 1280) for SD 1.x: the widths out of up_blocks[3], [2], [1]."""
    return tuple(unet.config.block_out_channels[:3])


def _no_autocast(kind: str) -> contextlib.AbstractContextManager:
    """Leave the trained parts' autocast: the frozen VAE runs in its storage dtype (also on meta tensors)."""
    return torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


@dataclass
class Frozen:
    """What every pass needs but nobody trains: VAE (no grad, in its storage dtype), DDPM schedule, hooks, and
    one noise pattern eps_fix = randn(1, 4, 64, 64) (64 = 512 px / 8) from its own generator (official)."""
    vae: nn.Module
    scheduler: object
    capture: FeatureCapture
    time_hook: TimeOffsetHook
    eps_fix: torch.Tensor                                                    # (1, 4, 64, 64)

    def noise(self, z: torch.Tensor) -> torch.Tensor:
        """eps_fix at the latent size of z (bicubic when not 64x64), broadcast over the batch (official)."""
        eps = self.eps_fix                                                   # (1, 4, 64, 64) fp32
        if eps.shape[-2:] != z.shape[-2:]:
            eps = F.interpolate(eps, size=z.shape[-2:], mode="bicubic", align_corners=False)
        return eps.expand(z.shape[0], -1, -1, -1).to(z.dtype)                   # (B, 4, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (grey modalities replicated, fed as RGB) -> z = posterior mean x 0.18215, fp32."""
        with _no_autocast(x.device.type):
            return vae_encode(self.vae, x * 2 - 1).float()

    def decode(self, o: torch.Tensor) -> torch.Tensor:  # (B, 4, h, w) -> (B, 3, 8h, 8w), not clipped; no gradient
        with _no_autocast(o.device.type):
            return vae_decode(self.vae, o.detach()).float()


# ---- Projections and the DAFormer head (official detectron2 BottleneckBlock, daformer_head.py) ----
class Bottleneck(nn.Module):
    """detectron2 BottleneckBlock (stride 1, GN(32)): 1x1 C->128, 3x3 128->128, 1x1 128->C_out, GN after each,
    ReLU after the first two; shortcut 1x1 C->C_out + GN; add; ReLU. Bias-free convs (c2_msra_fill init)."""

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


class SegHead(nn.Module):
    """Everything the teacher EMA covers: conditioning + 4 projections + DAFormer head (official cmdise.py).
    Levels (official): s0 = decoded LPLR image 3 -> 128, s3 = f8 -> 512, s4 = f16 -> 512, s5 = f32 -> 512."""

    def __init__(self, cond: Conditioning, c_feats: tuple[int, int, int], num_classes: int,
                 fusion_stride: int):
        super().__init__()
        self.cond, self.fusion_stride = cond, fusion_stride
        c8, c16, c32 = c_feats
        # s0 is a 3-channel colour image, not a feature map: 128 channels are enough for it (official)
        self.proj = nn.ModuleDict({"s0": Bottleneck(3, 128), "s3": Bottleneck(c8, 512),
                                   "s4": Bottleneck(c16, 512), "s5": Bottleneck(c32, 512)})
        self.head = DAFormerHead([128, 512, 512, 512], num_classes)

    def forward(self, s0: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor):
        H, W = s0.shape[-2:]
        if self.fusion_stride > 1:  # memory option: fuse at 1/stride instead of the full input resolution
            s0 = F.interpolate(s0, scale_factor=1 / self.fusion_stride, mode="bilinear", align_corners=False)
        logits = self.head([self.proj[k](f) for k, f in zip(self.proj, (s0, f8, f16, f32))])  # s0, s3, s4, s5
        if logits.shape[-2:] != (H, W):                                          # (B, K, H/fs, W/fs)
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        return logits                                                            # (B, K, H, W)


def madm_forward(unet: nn.Module, seg: SegHead, frozen: Frozen, z0: torch.Tensor,
                 t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One MADM pass: noised latent -> UNet (one call) -> features, o -> s0 = decode(o) -> head -> logits.
    z0 (B, 4, h, w) clean latent, t (0: student / eval; DPLG t: teacher) -> logits (B, K, 8h, 8w), o (B, 4, h, w)."""
    z_t = add_noise(frozen.scheduler, z0, frozen.noise(z0), t)  # z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps_fix
    frozen.time_hook.delta = seg.cond.time_delta()               # (1, d_t) time offset of this conditioning
    o = unet(z_t, t, encoder_hidden_states=seg.cond.context(z0.shape[0])).sample   # (B, 4, h, w)
    feats = frozen.capture.features
    f8, f16, f32 = feats[F8], feats[F16], feats[F32]             # (B, 320, h, w) (B, 640, h/2) (B, 1280, h/4)
    # LPLR decode path: the frozen decoder turns o into a full-resolution "colour label image". No gradient
    # flows through it (official); the UNet learns o only from the L1 regression.
    s0 = frozen.decode(o)                                        # (B, 3, 8h, 8w), not clipped
    return seg(s0, f8, f16, f32), o                              # (B, K, 8h, 8w), (B, 4, h, w)


class Student(nn.Module):
    """The trained model (UNet + SegHead) as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, unet: nn.Module, seg: SegHead, frozen: Frozen):
        super().__init__()
        self.unet, self.seg = unet, seg
        object.__setattr__(self, "frozen", frozen)  # not a submodule: the VAE is neither trained nor synced

    def forward(self, z0: torch.Tensor, t: int = 0, seg: Optional[SegHead] = None):
        # seg = the EMA SegHead for the teacher pass; the UNet is the student's in every pass (official)
        return madm_forward(self.unet, seg if seg is not None else self.seg, self.frozen, z0, t)


# ---- LPLR: label palette and latent regression (paper, Fig. 2; official mtmadise.py) ----
def palette_image(y: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """Colour a label map with the class palette: y (B, H, W) ids, 255 -> black -> (B, 3, H, W) in [0, 1]."""
    lut = torch.zeros(256, 3)
    lut[: len(palette)] = torch.as_tensor(palette, dtype=torch.float32) / 255.0
    return lut.to(y.device)[y.long()].permute(0, 3, 1, 2).contiguous()       # (B, 3, H, W)


@torch.no_grad()
def palette_latent(frozen: Frozen, y: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """The regression target z_pal = VAE posterior mean of the palette image x 0.18215: (B, H, W) ->
    (B, 4, H/8, W/8). The decoder maps a latent near z_pal back to the colour label image."""
    return frozen.encode(palette_image(y, palette))


def loss_lplr(o: torch.Tensor, z_pal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LPLR latent regression L_reg = sum(|o - z_pal| * m) / numel(o) (official: numel counts masked ones).
    o, z_pal (B, 4, h, w); mask (B, H, W) pixel weights (valid 1, ignore 0; x q for the mixed image), nearest-
    downsampled to the latent size and repeated over the 4 channels."""
    m = F.interpolate(mask[:, None].float(), size=o.shape[-2:], mode="nearest").expand_as(o)  # (B, 4, h, w)
    return ((o.float() - z_pal).abs() * m).sum() / o.numel()


# ---- DPLG and pseudo labels (paper, Fig. 2; official mtmadise.py) ----
def dplg_timestep(step: int, t0: int, t_end: int) -> int:
    """DPLG teacher timestep t = int(t0 (1 - i / T_end)) for i <= T_end, else 0 (linear decay to t = 0).
    The noise hides modality-specific detail from the teacher early, while the student is still RGB-like."""
    return int(t0 * (1 - step / t_end)) if t_end > 0 and step <= t_end else 0


@torch.no_grad()
def pseudo_labels(logits_t: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (B, K, H, W) -> y_hat = argmax (B, H, W) and the quality q = mean(p_max >= threshold),
    one scalar over all pixels of the micro-batch (official: no per-pixel mask, no crop of image borders)."""
    p_max, y_hat = torch.softmax(logits_t.float(), 1).max(1)                   # (B, H, W) each
    return y_hat, (p_max >= threshold).float().mean()


# ---- Self-training: EMA teacher, ClassMix, augmentation, CE (official cmdise.py, dacs_transforms.py) ----
@torch.no_grad()
def class_mix(M: torch.Tensor, x_s: torch.Tensor, x_t: torch.Tensor, y_s: torch.Tensor, y_hat: torch.Tensor,
              q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix of a source and a target crop with mask M (B, 1, H, W), 1 = source pixel (dacs_transforms):
    x_m = M x_s + (1 - M) x_t   (B, 3, H, W)
    y_m = M y_s + (1 - M) y_hat (B, H, W)
    w_m = M + (1 - M) q         (B, H, W) per-pixel CE weight: pseudo-labelled pixels count by their quality
    """
    return M * x_s + (1 - M) * x_t, torch.where(M[:, 0] > 0, y_s, y_hat), M[:, 0] + (1 - M[:, 0]) * q


# ---- Optimisation and one optimizer step (official config_files/common/optim.py, engine/train_loop.py) ----
def lr_factor(i: int, total: int) -> float:
    """detectron2 WarmupParamScheduler(MultiStepParamScheduler) as configured in config_files/common/optim.py.
    U = 2N - 1, e(i) = int((i/N + 1e-6) U); factor 1 before int(0.88888 U), 0.1 before int(0.96296 U), then
    0.01; linear warm-up from 0.067 while i/N < 500/184375 (about 27 of 10000 steps)."""
    U = 2 * total - 1
    e = int((i / total + 1e-6) * U)
    f = 1.0 if e < int(0.88888 * U) else 0.1 if e < int(0.96296 * U) else 0.01
    a = min(i / total / (500 / 184375), 1.0)                     # warm-up progress, 1 after it
    return f * (0.067 * (1 - a) + a)


def make_optimizer(model: nn.Module, args: Args) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999), eps 1e-8; decay on weights (prompt and time-offset tensors included), none on norms
    and biases (official utils/parameter_count.py); the LR is set at every step from `lr_factor`."""
    norms = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def micro_seed(seed: int, step: int, j: int) -> int:
    """Seed of global micro-step j of optimizer step `step` (ClassMix, augmentation, t0 draw, dropout)."""
    return int(np.random.SeedSequence([seed, step, j]).generate_state(1, np.uint64)[0] % (2**63 - 1))


@dataclass
class Run:
    """What `train` derives once from Args, the task table and the hardware; `train_step` reads it."""
    dist: Dist
    precision: Precision
    palette: np.ndarray               # (K, 3) uint8 palette of the target class set: the LPLR colours
    class_names: tuple                # K names
    t0_lo: int                        # DPLG t0 is drawn from {t0_lo, t0_lo + 1}
    t_end: int                        # DPLG noise reaches t = 0 at this step
    lplr_w: tuple                     # LPLR weights: (source,) or (source, mixed)
    out: Optional[Path] = None        # run folder (named by the non-finite-loss error; evaluation output)


def _sync_unless(student: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP `no_sync` when `skip`: gradients accumulate locally; only the step's last backward all-reduces."""
    return student.no_sync() if skip and hasattr(student, "no_sync") else contextlib.nullcontext()


def train_step(student: nn.Module, ema_seg: SegHead, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, batch: list, i: int, args: Args, run: Run) -> dict[str, float]:
    """Optimizer step i (0-based): EMA, LR, A micro-steps of (teacher, source, mix, mixed), clip, step.
    student: the `Student` (or DistributedDataParallel around it); ema_seg: the teacher's EMA SegHead; batch:
    this process's A micro-batches (x_s (b, 3, H, W) in [0, 1], y_s (b, H, W) int64 255 = ignore, x_t as x_s).
    Every draw (t0, ClassMix, augmentation, dropout) comes from the torch generator reseeded per micro-step.
    Returns plain floats, the losses and q averaged over the micro-steps."""
    model = getattr(student, "module", student)                   # the Student itself under DDP
    A, fz, prec, w = len(batch), model.frozen, run.precision, run.lplr_w
    logs = dict.fromkeys(("loss_src", "loss_mix", "loss_reg_s", "loss_reg_t", "q", "t_dplg"), 0.0)
    # ---------- METHOD STEP BEGIN ----------
    if i >= 1 and not args.source_only:  # EMA of conditioning + projections + head; the UNet stays shared
        ema_update(ema_seg, model.seg, i, args.ema_alpha)
    lr = args.lr * lr_factor(i, args.iters)  # multi-step LR with warm-up, one value for every parameter
    for group in optimizer.param_groups:
        group["lr"] = lr
    for k, (x_s, y_s, x_t) in enumerate(batch):
        torch.manual_seed(micro_seed(args.seed, i, run.dist.rank * A + k))  # same draws whatever the split
        last = k == A - 1                                         # DDP all-reduces in the last backward
        l_mix = l_reg_t = q = torch.zeros(())
        t_dplg = 0
        if not args.source_only:
            # -- Teacher (DPLG): noised clean target latent, EMA conditioning/projections/head, shared UNet.
            t_dplg = dplg_timestep(i, run.t0_lo + int(torch.randint(0, 2, ())), run.t_end)  # t0 in {lo, lo+1}
            with torch.no_grad(), prec.autocast():
                logits_t, _ = model(fz.encode(x_t), t_dplg, seg=ema_seg)            # (b, K, H, W)
            y_hat, q = pseudo_labels(logits_t, args.pseudo_threshold)           # (b, H, W), scalar
        # -- Source pass: L_src = CE over all pixels + LPLR on the source latent; backward now frees it.
        with _sync_unless(student, skip=not (last and args.source_only)):
            with prec.autocast():
                logits_s, o_s = student(fz.encode(x_s), 0)                      # (b, K, H, W), (b, 4, h, w)
                l_src = ce_all_pixels(logits_s, y_s)
                z_pal = palette_latent(fz, y_s, run.palette)                    # (b, 4, h, w) LPLR target
                l_reg_s = w[0] * loss_lplr(o_s, z_pal, (y_s != 255).float())
                loss = (l_src + l_reg_s) / A                                    # micro-losses add: scale 1/A
            runs.check_finite(loss, i + 1, run.out)                          # stop on NaN/inf
            scaler.scale(loss).backward()
        if not args.source_only:
            # -- ClassMix (no grad): half of the source classes pasted onto the target crop; jitter + blur.
            M = class_mix_masks(y_s)                                            # (b, 1, H, W) 1 = source
            x_m, y_m, w_m = class_mix(M, x_s, x_t, y_s, y_hat, q)
            x_m = strong_augment(x_m)                                           # the mixed image only
            # -- Mixed pass: L_mix = w_m-weighted CE (+ LPLR on the mixed latent when the task uses it).
            with _sync_unless(student, skip=not last):
                with prec.autocast():
                    logits_m, o_m = student(fz.encode(x_m), 0)                  # same student, t = 0
                    l_mix = ce_all_pixels(logits_m, y_m, w_m)
                    if len(w) > 1:  # mask (y_m != 255) * q: q weights the pasted source pixels too (official)
                        z_pal = palette_latent(fz, y_m, run.palette)
                        l_reg_t = w[1] * loss_lplr(o_m, z_pal, (y_m != 255).float() * q)
                    loss = (l_mix + l_reg_t) / A
                runs.check_finite(loss, i + 1, run.out)
                scaler.scale(loss).backward()
        for key, v in zip(logs, (l_src, l_mix, l_reg_s, l_reg_t, q, t_dplg)):
            logs[key] += float(v.detach() if torch.is_tensor(v) else v) / A
    scaler.unscale_(optimizer)                                    # true gradients before clipping (fp16)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # global L2 0.01; the pre-clip norm
    scaler.step(optimizer)                                        # skipped on inf/NaN gradients (fp16)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # ---------- METHOD STEP END ----------
    return dict(logs, lr=lr, grad_norm=float(grad_norm))


# ---- Setup: checks, model, data ----
def check_args(args: Args, world: int) -> None:
    """Bad flag values as one-line UserErrors, before anything is built or written."""
    check_common_flags(args, crop_multiple=8)
    m = args.micro_batch_size
    if m < 1 or args.batch_size % (m * world):
        raise UserError(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch-size {m} "
                        f"x {world} processes. Expected batch = micro x processes x accumulation steps.")
    for flag, value, ok in (("eval-label-size", args.eval_label_size, ("input", "native")),
                            ("vae-dtype", args.vae_dtype, ("auto", *VAE_DTYPES))):
        if value not in ok:
            raise UserError(f"error: --{flag}: unknown value '{value}'. Expected one of {', '.join(ok)}.")
    if args.lplr_weights is not None and len(args.lplr_weights) not in (1, 2):
        raise UserError(f"error: --lplr-weights: got {len(args.lplr_weights)} values. Expected 1 (source "
                        "latent only) or 2 (source and mixed latents).")


def task_settings(args: Args) -> tuple[int, float, tuple[float, ...]]:
    """(DPLG t0 lo, DPLG end fraction, LPLR weights) for --tgt, overridden by explicit flags."""
    t0, frac, weights = TASKS.get(args.tgt, TASKS["other"])
    return (args.dplg_t0 if args.dplg_t0 is not None else t0,
            args.dplg_end_frac if args.dplg_end_frac is not None else frac,
            tuple(args.lplr_weights) if args.lplr_weights else weights)


def build_model(args: Args, num_classes: int, device: torch.device, precision: Precision):
    """Load SD, embed "" once, free the text encoder, set what trains, hook the UNet -> (student, ema_seg)."""
    sd = load_sd(args.sd_model, device=device)
    e_empty = encode_prompts(sd.tokenizer, sd.text_encoder, [""]).float()    # (1, 77, d) E("")
    sd.text_encoder = sd.tokenizer = None                                     # used once: free its memory
    unet, vae = sd.unet, sd.vae
    # Whole UNet trained except conv_norm_out / conv_out (official: found unused by a dummy backward).
    unet.requires_grad_(True).train()
    unet.conv_norm_out.requires_grad_(False)
    unet.conv_out.requires_grad_(False)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    # Frozen VAE in half precision when the trained parts autocast (inference only; official fp16).
    to_dtype(vae, precision.frozen_dtype if args.vae_dtype == "auto" else VAE_DTYPES[args.vae_dtype])
    g = torch.Generator().manual_seed(args.noise_seed)                        # eps_fix: not --seed (official)
    frozen = Frozen(vae, sd.scheduler, FeatureCapture(unet, [F32, F16, F8], pre=[F32, F16]),
                    TimeOffsetHook(unet), torch.randn(1, 4, 64, 64, generator=g).to(device))
    torch.manual_seed(args.seed)                                              # head / conditioning init
    cond = Conditioning(e_empty, unet.time_embedding.linear_2.out_features)   # d_t = 1280 in SD 1.x
    seg = SegHead(cond, feature_channels(unet), num_classes, args.fusion_stride).to(device)
    ema_seg = copy.deepcopy(seg).requires_grad_(False)                        # teacher: EMA of SegHead only
    ema_seg.train()  # the teacher head runs in train mode (dropout, BN batch statistics), as official
    return Student(unet, seg, frozen), ema_seg


def load_weights(parts: nn.ModuleDict, weights: dict, where: str) -> None:
    try:
        parts.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"error: --ckpt: '{where}' does not fit this model ({str(e).splitlines()[0]}). Expected a "
                        "checkpoint of madm.py with the same --sd-model and --tgt class set.") from None


def build_data(args: Args, num_classes: int):
    """Source/target training streams (source with rare-class sampling) and the target evaluation set."""
    if args.demo:
        ensure_synthetic_sample(args.data_root)
    kw = dict(scale=1 / 8 if args.demo else 1.0, num_classes=num_classes)
    name, split = eval_target(args.tgt, args.predict)  # --predict: every image of its folder, no labels
    val = build_dataset(name, args.data_root, split, **kw)
    if args.eval_only:
        return None, None, val
    src, tgt = (build_dataset(name, args.data_root, "train", crop_size=args.crop_size, **kw)
                for name in (args.src, args.tgt))
    # RCS (DAFormer, official dataset): > 3000 px of the class per image, > 1500 px per crop (x scale^2)
    rcs = RareClassSampling(src, temperature=args.rcs_temperature, min_pixels=3000, min_crop_ratio=0.5)
    return TrainStream(src, args.seed, rcs, stream_id=0), TrainStream(tgt, args.seed, None, stream_id=1), val


# ---- Processes, device, precision, seeds (nanoGPT's train.py; the same block in all four scripts) ----------
@dataclass
class Dist:
    """The processes init_distributed found: torchrun starts one per GPU; without it, one."""
    rank: int
    world: int
    device: torch.device

    is_main = property(lambda self: self.rank == 0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:  # in place, over the processes
        return torch.distributed.all_reduce(t) or t if self.world > 1 else t

    def barrier(self) -> None:
        torch.distributed.barrier() if self.world > 1 else None

    def wrap(self, module: nn.Module) -> nn.Module:  # DDP: gradients averaged over the processes
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids) if self.world > 1 else module


def init_distributed(device: str, deterministic: bool) -> tuple[Dist, str]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one process per GPU, NCCL; gloo between CPU processes); one
    process without it. -> (dist, what same-seed runs guarantee)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"error: --device {device}: not available here. Expected auto, cpu or cuda (with a GPU).")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    torch.backends.mkldnn.deterministic = True  # CPU: some oneDNN backward kernels reduce in thread order otherwise
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # CPU: MKL's GEMMs otherwise vary with memory alignment
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, deterministic
    if cuda and deterministic:  # deterministic cuBLAS / cuDNN kernels (slower)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Dist(rank, world, dev), (
        "CPU: same seed and thread count -> bit-identical runs and resume" if not cuda else
        "CUDA --deterministic: bit-identical on the same GPU model" if deterministic else
        "CUDA: equal up to float rounding (--deterministic: bit-identical)")


@dataclass
class Precision:
    """What choose_precision picked, as autocast and a GradScaler."""
    name: str                  # fp32 | bf16 | fp16: autocast dtype of the trained parts, storage of the frozen ones
    device_type: str           # cuda | cpu
    reason: str = ""           # the log line's words

    amp_dtype = property(lambda self: {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name))
    frozen_dtype = property(lambda self: self.amp_dtype or torch.float32)
    use_scaler = property(lambda self: self.name == "fp16")  # fp16 gradients underflow without loss scaling

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def choose_precision(name: str, device: torch.device) -> Precision:
    """--precision auto: bf16 autocast on a GPU that has it, else fp16 + GradScaler; fp32 on a CPU. The frozen SD
    parts are stored in the autocast dtype. bf16 / fp16 on a CPU take the GPU's code path (slow; a check)."""
    cuda = device.type == "cuda"
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"error: --precision: unknown value '{name}'. Expected auto, fp32, bf16 or fp16.")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("error: --precision bf16: this GPU has no bf16. Expected --precision fp16 or auto.")
    if name == "auto":
        name = "fp32" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    why = "fp32" if name == "fp32" else f"{name} autocast{' + GradScaler' * (name == 'fp16')}, frozen parts in {name}"
    return Precision(name, device.type, why + ("" if cuda or name == "fp32" else " (CPU: a check, slow)"))


def seed_everything(seed: int) -> None:
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)


def get_rng_state() -> dict:  # in every checkpoint: a resumed run draws the same numbers as an unbroken one
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(), cuda=cuda)


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"]), np.random.set_state(s["numpy"]), torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- Training loop: setup, data, model, resume, the loop (log, evaluate, checkpoint), end ----
def train(args: Args) -> dict:
    if args.profile or args.estimate_memory:  # measuring tools, not training: benchmarks/measure.py
        from benchmarks.measure import measure
        return measure("madm", args, globals())
    # Processes (torchrun: one per GPU, DDP), device, precision, seed.
    dist, repeatable = init_distributed(args.device, args.deterministic)
    precision = choose_precision(args.precision, dist.device)  # bf16 / fp16 + GradScaler / fp32 on CPU
    check_args(args, dist.world)
    seed_everything(args.seed)
    K = check_pair(args.src, args.tgt)
    t0_lo, end_frac, lplr_w = task_settings(args)
    out, t_end = Path(args.out or f"runs/madm-{run_tag(args.src)}-{run_tag(args.tgt)}"), round(end_frac * args.iters)
    run = Run(dist, precision, PALETTES[K], CLASS_SETS[K], t0_lo, t_end, lplr_w, out)
    m, accum = args.micro_batch_size, args.batch_size // (args.micro_batch_size * dist.world)
    if dist.is_main:
        log("args: " + json.dumps(asdict(args)))
        log(f"device {dist.device} x{dist.world} | {precision.reason} | {repeatable} | accumulation {accum} x "
            f"micro-batch {m}")
        log(f"task {args.tgt}: {K} classes | DPLG t0 {{{t0_lo}, {t0_lo + 1}}} until step {t_end} | "
            f"LPLR weights {lplr_w} ({'source + mixed' if len(lplr_w) > 1 else 'source only'})")
    # Data and model (the data are checked before anything is written).
    src_stream, tgt_stream, val_set = build_data(args, K)
    student, ema_seg = build_model(args, K, dist.device, precision)
    parts = nn.ModuleDict({"unet": student.unet, "seg": student.seg, "ema": ema_seg})  # checkpoint weights
    if args.eval_only:  # --eval-only / --predict: score (or draw) the --ckpt weights
        weights, state = runs.load_checkpoint(args.ckpt)
        load_weights(parts, weights, args.ckpt)
        out.mkdir(parents=True, exist_ok=True)
        result = evaluate(args, student, val_set, run, step=state.get("step", 0))
        return finish(result, run, "done: --eval-only")
    optimizer, scaler = make_optimizer(student, args), precision.make_scaler()
    start, history = 0, []
    if args.resume:  # restores the RNG states too: nothing may draw random numbers after this
        ckpt = runs.latest_checkpoint(out) or out / "checkpoints"
        weights, state = runs.load_checkpoint(ckpt, "--resume")
        load_weights(parts, weights, str(ckpt))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, history = state["step"], state["train_log"]
        set_rng_state(state["rng"])
        log(f"resumed from {ckpt} at step {start}") if dist.is_main else None
    runs.prepare_out_dir(out, args.resume, args.demo, dist.is_main)
    if dist.is_main and not args.resume:
        metrics.write_metrics(out, args, key="args")
    ddp = dist.wrap(student)  # DDP under torchrun: gradients averaged over processes
    if dist.is_main:
        log("adapting: nothing, --source-only baseline (source CE + source LPLR)" if args.source_only
            else "adapting: EMA-teacher pseudo labels on the target via ClassMix, weighted by q = share of "
            f"pixels with confidence >= {args.pseudo_threshold}; DPLG until step {t_end}")
    result, adapted, window, t_log, logged = {}, 0, {}, time.perf_counter(), start
    stop = runs.StopOnSignal(dist)  # SIGTERM / SIGINT: stop after the step's checkpoint, exit 75
    for i in stop.steps(start, args.iters):
        batch = [tuple(t.to(dist.device) for t in (s["image"], s["label"], tg["image"]))   # A x (x_s, y_s, x_t)
                 for s, tg in ((src_stream.batch(i, j * m, m), tgt_stream.batch(i, j * m, m))
                               for j in range(dist.rank * accum, (dist.rank + 1) * accum))]
        logs = train_step(ddp, ema_seg, optimizer, scaler, batch, i, args, run)
        adapted += logs["q"] > 0
        window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
        if (i + 1) % args.log_every == 0 or i + 1 == args.iters:  # means since the last line; lr the latest
            n, now = i + 1 - logged, time.perf_counter()
            history.append({"step": i + 1, **{k: v / n for k, v in window.items()}, "lr": logs["lr"]})
            if dist.is_main:
                log(log_line(history[-1], args.iters, 1000 * (now - t_log) / n, dist.device))
                metrics.write_metrics(out, history, key="train_log")
            window, t_log, logged = {}, now, i + 1
        if (i + 1) % args.eval_every == 0 or i + 1 == args.iters:
            result = evaluate(args, student, val_set, run, i + 1)
        if i + 1 == args.iters or (args.ckpt_every and (i + 1) % args.ckpt_every == 0) or stop.requested():
            if dist.is_main:
                runs.save_checkpoint(out, i + 1, parts.state_dict(), dict(
                    step=i + 1, rng=get_rng_state(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), train_log=history, args=asdict(args)), args.keep_ckpts)
            dist.barrier()
    if dist.is_main:
        log("adapted: nothing (--source-only baseline)" if args.source_only else "adapted: the target pseudo "
            f"labels carried weight (q > 0) in {adapted} of {args.iters - start} steps")
    result = result or evaluate(args, student, val_set, run, args.iters)  # resumed a finished run: score it
    mem = metrics.peak_memory_gb(dist.device)
    return dict(finish(result, run, f"done: {args.iters} steps | peak memory {mem:.1f} GB | out {out}"),
                train_log=history, out=str(out))


def log_line(rec: dict, total: int, ms_per_step: float, device: torch.device) -> str:
    """`step 1200/10000 | loss_src 0.412 | q 0.710 | lr 5.0e-06 | 410 ms/step | mem 17.3 GB` (README)."""
    values = [f"{k} {v:.1e}" if k == "lr" or 0 < abs(v) < 1e-3 else f"{k} {v:.3f}" for k, v in rec.items()
              if k != "step"]
    mem = metrics.peak_memory_gb(device)
    return " | ".join([f"step {rec['step']}/{total}", *values, f"{ms_per_step:.0f} ms/step", f"mem {mem:.1f} GB"])


def finish(res: dict, run: Run, head: str) -> dict:
    """End of a run: `head | mIoU ..` (+ mIoU16 / mIoU13 for SYNTHIA sources), metrics.json's "final", curves."""
    if run.dist.is_main:
        log(" | ".join([head, *(f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou", "miou16", "miou13") if k in res)]))
        metrics.write_metrics(run.out, {k: v for k, v in res.items() if k not in ("table", "confusion")}, "final")
        metrics.write_curves(run.out)
    return res


# ---- Evaluation: the student at t = 0, whole image resized to 512x512 (official test_resize_h_w) ----
def evaluate(args: Args, student: Student, dataset, run: Run, step: int) -> dict:
    """Score the student on the full target test list (one summed confusion matrix; first half kept apart)."""
    dist, names, n = run.dist, run.class_names, len(dataset)
    student.seg.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:  # (1, 3, S, S) in [0, 1] -> (1, K, S, S) logits, t = 0
        with run.precision.autocast():
            return student(student.frozen.encode(x), 0)[0].float()
    # Official resizing: Pillow BILINEAR image, NEAREST label; two halves scored apart and summed (header).
    kw = dict(device=dist.device, dist=dist, input_size=(args.eval_size,) * 2, desc=f"{args.tgt} test",
              metric_size=args.eval_label_size, **metrics.RESIZE_PROTOCOLS["madm"])
    halves = [range((n + 1) // 2), range((n + 1) // 2, n)] if dataset.has_labels else [range(n)]
    parts = [metrics.evaluate(predict, torch.utils.data.Subset(dataset, r), len(names), names, run.palette,
                              pictures_dir=run.out / "predictions" if dist.is_main and k == 0 else None,
                              progress=k == 0, **kw) for k, r in enumerate(halves) if len(r)]
    student.seg.train()
    if parts[0].get("no_labels"):  # no metric: pictures (target without labels) or --predict outputs
        if dist.is_main:
            log(parts[0]["table"])
        return dict(parts[0], step=step)
    conf, where = sum(np.asarray(p["confusion"], np.int64) for p in parts), parts[0]["resolution"]
    synthia = args.src == "synthia" and len(names) == 19  # + mIoU16 / mIoU13: the SYNTHIA-source columns
    res = dict(metrics.summarize(conf, names, synthia), step=step, resolution=where, num_images=n,
               miou_first_half=parts[0]["miou"], table=metrics.format_table(
                   conf, names, f"per-class results — {args.tgt} test, {n} images, {where}", synthia))
    in_res = where.split(",")[0].replace("input ", "")
    if dist.is_main:
        log(res["table"])
        log(" | ".join([f"eval step {step}", *(f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou", "miou16", "miou13")
                                              if k in res), f"input {in_res}", "metric " + ("native" if
            args.eval_label_size == "native" else in_res), f"first half mIoU {100 * res['miou_first_half']:.2f}"]))
        if run.out.is_dir():
            metrics.write_metrics(run.out, {k: v for k, v in res.items() if k not in ("table", "confusion")})
    return res


def main(args: Args) -> dict:
    """Train (or --eval-only, --profile, --estimate-memory); returns the last evaluation ("miou", ...)."""
    if args.demo:
        args = replace_defaults(args, out="runs/madm-demo", **DEMO)
    return train(replace(args, eval_only=args.eval_only or bool(args.predict)))  # --predict: load --ckpt


if __name__ == "__main__":
    run_cli(main, Args)
