"""ICCLD: Inter-Coder Connected Latent Diffusion for unsupervised domain-adaptive semantic segmentation.

Yu, Sun, Chi, Yang, Luo, "Adversarially Domain-adaptive Latent Diffusion for Unsupervised Semantic Segmentation", CVPR
2025 Workshops, https://arxiv.org/abs/2412.16859 (v1 names the model CICLD). No code is public: this is the first
implementation. The abstracts and figure captions fix the method; the rest is ours or a named public recipe.

Idea. The SD VAE encoder E maps the image to a latent z0; a denoising UNet eps_theta generates a *label* latent
conditioned on z0; a decoder D with the VAE decoder's architecture turns it into class logits, helped by "inter-coder
connections" (encoder -> decoder skips) that carry context and detail (Fig. 2). Synthetic source -> real target in two
stages (Fig. 1): stage 1 adapts E and D by ClassMix self-training with an EMA copy; stage 2 freezes them and trains
eps_theta with an adversarial term aligning the latents it predicts for source, mixed and target images (v1 abstract).
Reported: 74.4 mIoU GTA5 -> Cityscapes, 67.2 Synthia -> Cityscapes. Fig. 1's "teacher" and EMA "student" (DAFormer says
the reverse) are `net`, `net_ema` (`unet`, `unet_ema` in stage 2); the EMA makes the pseudo labels, is evaluated.

Paper -> code: Fig. 2 E, D, inter-coder connections: ImageEncoder, SegDecoder, ICCLDNet; the space eps_theta generates
in: LabelLatents; Fig. 1 stage 1: pseudo_labels, class_mix, stage1_losses, train_step_stage1; stage 2: widen_conv_in,
discriminator, eps_loss, lsgan_*, train_step_stage2; Fig. 2 inference: make_sampler, sample_to_last_step (also stage 2),
predict_diffusion. From DAFormer (common/daformer.py): EMA, ClassMix masks, strong augmentation, CE, poly LR.

Deviations and choices (ours unless a source is named)
 1. E = VAE encoder + quant_conv, z0 = posterior mean x 0.18215, skips = down_blocks[i].resnets[-1] outputs; D =
    post_quant_conv + VAE decoder, conv_out -> K; a zero-init 1x1 conv per skip at each up block's input.
 2. Label latents: the frozen pretrained VAE encoder on the palette-coloured label (MADM's idea).
 3. Stage 1 = DAFormer's DACS: EMA ramp to 0.999 (also eps_theta), pseudo labels on the clean target crop, one quality
    scalar at 0.968, Cityscapes rows 15 / 120 ignored, ClassMix classes from the whole batch, jitter when u > 0.2 and
    blur when u > 0.5, CE over all pixels; a backward per pass (same gradient).
 4. Stage 2: conv_in widened 4 -> 8 with zero weights (InstructPix2Pix); eps loss on source GT, mixed and target
    pseudo-label latents, pixel weights pooled 8x8; pseudo labels from the frozen D(E(x)).
 5. The discriminator (LSGAN, ADVENT: BCE; lambda 1e-3, ADVENT) judges source vs. mixed + target x0_hat of the sampler's
    last step, what inference decodes (Fig. 2): T - 1 no-grad DDIM steps from z_T ~ N(0, I) (sample_to_last_step), the
    last with gradient in the eps-loss UNet call (all T with gradient: T UNet graphs held). No label latent enters this
    chain: at the eps loss's small t, x0_hat ~ the label latent, whose black (source-only) ignore pixels reveal domains.
 6. Inference: DDIM, eta 0, "trailing" timesteps (T = 3: 999, 666, 332), z_T reseeded at each evaluation; unet_ema
    evaluated, plus D(E(x)) of net_ema (ablation row); mmseg resizing, native-size metric.
 7. AdamW wd 0.01, 0 on norm layers (DAFormer's paramwise_cfg); lr 6e-5, new layers 6e-4; warm-up 1500, poly 1
    (DAFormer); discriminator Adam 1e-4, (0.9, 0.99), poly 0.9 (ADVENT). 40000 + 20000 iterations.
 8. Frozen parts in the precision's half dtype; EMA copies fp32 (a 0.001 EMA step vanishes in half precision).
 9. --source-only (baseline): source losses only (no pseudo labels, mix, target latents, discriminator); EMAs evaluated.
10. Stage 1 adds a second CE on D(z_y, skips(x)), the label latent decoded with the image's skips (our choice, not in
    the paper): D must decode eps_theta's label latents from stage 2 on (Fig. 2), which E never made.
11. eps_theta's context: the empty prompt's CLIP embedding (ours: the paper names no text; "" is SD's unconditional).

Run: python iccld.py --src gta5 --tgt cityscapes (bf16: 18 / 27 GB; 24 GB: --grad-checkpointing) or --demo (CPU).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDIMScheduler

from common import metrics, runs
from common.cli import UserError, check_common_flags, log, replace_defaults, run_cli
from common.daformer import ce_all_pixels, class_mix_masks, ema_update, poly_warmup_factor, strong_augment
from common.datasets import (CLASS_SETS, PALETTES, RareClassSampling, TrainStream, build_dataset, check_pair,
                             eval_input_size, eval_target, run_tag)
from common.sd_backbone import encode_prompts, load_sd
from common.synthetic import ensure_synthetic_sample


@dataclass
class Args:
    # ---- experiment / infrastructure ----
    src: str = "gta5"  # source dataset (labelled); paper benchmarks: gta5, synthia
    tgt: str = "cityscapes"  # target dataset (labels unused in training); paper: cityscapes; or folder:PATH
    data_root: str = "data"  # folder holding the datasets in their official layouts (data/README.md)
    out: Optional[str] = None  # run folder; default runs/iccld-<src>-<tgt> (runs/iccld-demo for --demo)
    seed: int = 0  # seed of every random number generator; our choice
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 / fp16 + GradScaler on GPU, fp32 on CPU) | fp32 | bf16 | fp16; our choice
    deterministic: bool = False  # CUDA: deterministic kernels, same-seed runs bit-identical per GPU model (slower)
    grad_checkpointing: bool = False  # recompute activations in backward (E/D in stage 1, UNet in stage 2)
    resume: bool = False  # continue from the latest checkpoint in --out
    eval_only: bool = False  # only evaluate --ckpt
    ckpt: Optional[str] = None  # checkpoint folder for --eval-only / --predict
    predict: Optional[str] = None  # image folder -> <out>/predictions/<stem>_color.png, _trainId.png (needs --ckpt)
    profile: int = 0  # time N training iterations of --stage 1 or 2, print one JSON line, write nothing
    estimate_memory: bool = False  # one JSON line: peak GPU memory of a training step, predicted from shapes alone
    demo: bool = False  # mini SD (pretrained on the synthetic world), synthetic sample, short run of both stages
    log_every: int = 50  # log line cadence in steps (DAFormer: 50)
    eval_every: int = 4000  # evaluation cadence in steps of each stage (DAFormer: 4000)
    ckpt_every: int = 4000  # checkpoint cadence in steps of each stage (0 = only at the end); our choice
    keep_ckpts: int = 3  # how many periodic checkpoints to keep; our choice
    # ---- data ----
    batch_size: int = 2  # source images per step (+ as many target images); DAFormer
    crop_size: int = 512  # training crop side, a multiple of 8 (VAE stride); DAFormer
    rcs_temperature: float = 0.01  # rare-class sampling temperature on the source, <= 0 disables it; DAFormer
    # ---- backbone ----
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or folder; mini: pretrained; tiny: random
    # ---- method ----
    stage: str = "both"  # 1 (adapt E, D) | 2 (adversarial latent diffusion) | both; our choice
    stage1_ckpt: Optional[str] = None  # stage-1 checkpoint or run folder for --stage 2 (both: its own)
    source_only: bool = False  # baseline row: source losses only (no pseudo labels, mix, target, disc.); ours
    ema_alpha: float = 0.999  # cap of the EMA ramp min(1 - 1/(i+1), alpha); DAFormer config a999
    pseudo_threshold: float = 0.968  # confidence threshold of the pseudo-label quality weight; DAFormer uda/dacs.py
    pl_crop: tuple[int, ...] = (15, 120)  # top/bottom rows of 512 Cityscapes crops without pseudo weight; DAFormer
    lambda_adv: float = 1e-3  # weight of the LSGAN generator term; ADVENT LAMBDA_ADV_MAIN
    sample_steps: int = 3  # DDIM steps T at inference (1..50); our choice, the paper does not state T
    # ---- optimisation ----
    iters: int = 40000  # stage-1 iterations; DAFormer
    iters_stage2: int = 20000  # stage-2 iterations; our choice
    lr: float = 6e-5  # AdamW lr of pretrained weights (E, D, eps_theta); DAFormer
    new_layer_lr: float = 6e-4  # lr of new layers (skip convs, conv_out, widened conv_in); DAFormer's 10x head lr
    weight_decay: float = 0.01  # AdamW weight decay, 0 on normalisation layers; DAFormer adamw.py + paramwise_cfg
    warmup_iters: int = 1500  # linear LR warm-up steps (from ratio 1e-6) before poly 1.0; DAFormer poly10warm.py
    disc_lr: float = 1e-4  # discriminator Adam lr, betas (0.9, 0.99), poly 0.9; ADVENT


WARMUP_RATIO, POLY_POWER = 1e-6, 1.0     # DAFormer poly10warm.py
DISC_BETAS, DISC_POLY_POWER = (0.9, 0.99), 0.9  # ADVENT advent/domain_adaptation/config.py
# --demo: larger LRs (mini SD: nothing precious); pseudo threshold 0.3 (at 0.968 mini's mean q is 0.00: no target side)
DEMO = dict(sd_model="mini", data_root="data/synthetic", out="runs/iccld-demo", iters=100, iters_stage2=50,
            crop_size=64, warmup_iters=10, lr=2e-3, new_layer_lr=1e-2, disc_lr=1e-3, pseudo_threshold=0.3,
            log_every=10, eval_every=10**6, ckpt_every=10**6)


def checkpointed(enabled: bool, fn, *xs):  # fn(*xs); --grad-checkpointing: recomputed in backward, same values
    if enabled and torch.is_grad_enabled():  # under no_grad nothing is stored anyway
        return torch.utils.checkpoint.checkpoint(fn, *xs, use_reentrant=False)
    return fn(*xs)


# ---- E: the SD VAE encoder with skip outputs (Fig. 2, left) ------------------------------------------------
class ImageEncoder(nn.Module):
    """E(x) -> (z0, skips) (header, item 1), an explicit loop to take the skips; x (B, 3, H, W) in [-1, 1]."""
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.quant_conv = copy.deepcopy(vae.quant_conv) if vae.quant_conv is not None else nn.Identity()
        self.scaling_factor, self.grad_checkpointing = float(vae.config.scaling_factor), False  # 0.18215 for SD 1.x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc, skips, ck = self.encoder, [], self.grad_checkpointing
        h = enc.conv_in(x)                                        # (B, 128, H, W)
        for blk in enc.down_blocks:
            def run(h, blk=blk):
                for resnet in blk.resnets:
                    h = resnet(h, temb=None)
                return h
            h = checkpointed(ck, run, h)                          # (B, C_i, H/2^i, W/2^i) = skip f_{2^i}, C_i 128..512
            skips.append(h)
            for down in blk.downsamplers or []:
                h = down(h)                                       # stride doubles
        h = checkpointed(ck, enc.mid_block, h)                    # (B, 512, H/8, W/8)
        moments = self.quant_conv(enc.conv_out(enc.conv_act(enc.conv_norm_out(h))))  # (B, 8, H/8, W/8)
        return moments[:, :4] * self.scaling_factor, skips        # (B, 4, H/8, W/8) scaled posterior mean (no noise)


# ---- D: segmentation decoder with inter-coder connections (Fig. 2, right) ----------------------------------
class SegDecoder(nn.Module):
    """D(z, skips) -> logits (header, item 1): connection k, a zero-init 1x1 conv, adds the skip of up_blocks[k]'s
    stride (f8 -> 0, ..., f1 -> 3) to its *input*: D starts as the pretrained decoder (ControlNet's zero conv)."""
    def __init__(self, vae: nn.Module, num_classes: int, skip_channels: list[int]):
        super().__init__()
        self.post_quant_conv = copy.deepcopy(vae.post_quant_conv) if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = copy.deepcopy(vae.decoder)
        self.decoder.conv_out = nn.Conv2d(self.decoder.conv_out.in_channels, num_classes, 3, padding=1)  # new: 128 -> K
        self.skip_convs = nn.ModuleList(nn.Conv2d(skip_channels[-1 - k], blk.resnets[0].in_channels, 1)
                                        for k, blk in enumerate(self.decoder.up_blocks))
        for p in self.skip_convs.parameters():
            nn.init.zeros_(p)
        self.scaling_factor, self.grad_checkpointing = float(vae.config.scaling_factor), False

    def forward(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        dec, ck = self.decoder, self.grad_checkpointing
        h = dec.conv_in(self.post_quant_conv(z / self.scaling_factor))    # z (B, 4, h, w) scaled -> (B, 512, h, w)
        h = checkpointed(ck, dec.mid_block, h)                    # (B, 512, h, w)
        for k, blk in enumerate(dec.up_blocks):
            h = h + self.skip_convs[k](skips[-1 - k])             # inter-coder connection at stride 8 / 2^k
            h = checkpointed(ck, blk, h)                          # (B, C_k, 2h, 2w); last block: no upsample
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))   # (B, K, H, W) logits at full resolution


class ICCLDNet(nn.Module):
    """(E, D) as one module (one parameter list for DDP and the EMA). forward(x in [0, 1], z_lab): E once, then one D
    batch of 2B: image latent and label latent, both with the image's skips (as the generated latent at inference)."""
    def __init__(self, vae: nn.Module, num_classes: int):
        super().__init__()
        self.E = ImageEncoder(vae)
        self.D = SegDecoder(vae, num_classes, [b.resnets[-1].out_channels for b in vae.encoder.down_blocks])

    def direct(self, x: torch.Tensor) -> torch.Tensor:  # D(E(x)): x (B, 3, H, W) in [0, 1] -> logits (B, K, H, W)
        return self.D(*self.E((x * 2 - 1).to(next(self.parameters()).dtype)))

    def forward(self, x: torch.Tensor, z_lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0, skips = self.E(x * 2 - 1)                             # (B, 4, H/8, W/8), skips at strides 1..8
        z = torch.cat([z0, z_lab.to(z0.dtype)])                   # (2B, 4, H/8, W/8), z_lab (B, 4, H/8, W/8)
        return self.D(z, [torch.cat([f, f]) for f in skips]).chunk(2)     # 2 x (B, K, H, W)


# ---- Label latents: the space eps_theta generates in (MADM's palette idea) ---------------------------------
class LabelLatents(nn.Module):
    """z_y = E_lab(pal(y)) (header, item 2), never fine-tuned: stage 2's UNet learns the space D learnt in stage 1."""
    def __init__(self, vae: nn.Module, palette: np.ndarray):
        super().__init__()
        self.E_lab = ImageEncoder(vae).requires_grad_(False).eval()
        self.register_buffer("lut", torch.zeros(256, 3, dtype=torch.uint8), persistent=False)  # uint8: never rounded
        self.lut[: len(palette)] = torch.as_tensor(np.asarray(palette), dtype=torch.uint8)  # ids >= K stay black

    @torch.no_grad()
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        pal = self.lut[y].permute(0, 3, 1, 2).float() / 255       # y (B, H, W), 255 = ignore -> (B, 3, H, W) in [0, 1]
        return self.E_lab((pal * 2 - 1).to(next(self.E_lab.parameters()).dtype))[0].float()  # (B, 4, H/8, W/8)


# ---- Stage 1: DACS self-training of E and D (Fig. 1, top; DAFormer recipe) ---------------------------------
@torch.no_grad()
def pseudo_labels(net_ema: ICCLDNet, x_t: torch.Tensor, threshold: float, rows: tuple[int, int]):
    """net_ema's D(E(x)) pseudo labels on the clean target crop (DAFormer `dacs.py`): x_t (B, 3, H, W) in [0, 1] ->
    y_hat (B, H, W), q = mean(p_max >= threshold) (one scalar), w_t (B, H, W) = q, 0 in the (top, bottom) `rows`."""
    p_max, y_hat = net_ema.direct(x_t).float().softmax(1).max(1)  # (B, H, W) each
    q = (p_max >= threshold).float().mean()
    w_t = torch.full_like(p_max, float(q))
    w_t[:, :rows[0]] = w_t[:, w_t.shape[1] - rows[1]:] = 0
    return y_hat, q, w_t


def pl_rows(args: Args) -> tuple[int, int]:  # Cityscapes rows without pseudo weight, scaled with the crop (DAFormer)
    return tuple(round(r * args.crop_size / 512) for r in args.pl_crop) if args.tgt == "cityscapes" else (0, 0)


@torch.no_grad()
def class_mix(x_s, y_s, x_t, y_hat, w_t):
    """ClassMix of source into target (Fig. 1: x^{s+t}, y^{s+t}; DAFormer `dacs.py`), one mask for image, label and
    pixel weight, then strong augmentation -> x_m (B, 3, H, W) in [0, 1], y_m, w_m (B, H, W) (source 1, target w_t)."""
    M = class_mix_masks(y_s)                                      # (B, 1, H, W), 1 = source pixel
    x_m = strong_augment(M * x_s + (1 - M) * x_t)                 # x^{s+t}, augmented
    return x_m, torch.where(M[:, 0].bool(), y_s, y_hat), torch.where(M[:, 0].bool(), 1.0, w_t)


def stage1_losses(net, x, y, z_lab, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_img, L_lab) = (CE(D(E(x)), y; w), CE(D(z_y(y), skips(x)), y; w)), CE over all pixels (header, items 3, 10)."""
    logits_img, logits_lab = net(x, z_lab)                        # (B, K, H, W) each
    return ce_all_pixels(logits_img, y, weight), ce_all_pixels(logits_lab, y, weight)


def param_groups(model: nn.Module, new: list[nn.Parameter], args: Args) -> list[dict]:
    """AdamW groups (header, item 7), "base" = lr before the schedule; group 0 (pretrained, decayed): the logged lr."""
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for p in m.parameters()}
    new_ids, groups, lrs = {id(p) for p in new}, {}, {True: args.new_layer_lr, False: args.lr}
    for p in model.parameters():                                  # (is new, is norm) -> parameters
        groups.setdefault((id(p) in new_ids, id(p) in norms), []).append(p)
    return [{"params": ps, "lr": lrs[is_new], "base": lrs[is_new], "weight_decay": 0.0 if is_norm else
             args.weight_decay} for (is_new, is_norm), ps in sorted(groups.items())]


# ---- Stage 2: eps_theta conditioned on the image latent + adversarial alignment (Fig. 1, bottom) -----------
def widen_conv_in(unet: nn.Module, extra: int = 4) -> nn.Module:
    """conv_in 4 -> 4 + extra channels, zero weights (InstructPix2Pix): the output is unchanged at first (tested)."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():                                         # weight[:, 4:] = 0 (padding), bias kept
        new.weight.copy_(F.pad(old.weight, (0, 0, 0, 0, 0, extra))), new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=old.in_channels + extra)
    return unet


def discriminator(c_in: int = 4, ch: int = 64) -> nn.Sequential:
    """On x0_hat; ADVENT's five 4x4 stride-2 convs would leave 2x2 of a 64x64 latent: our last two are 3x3 stride 1."""
    return nn.Sequential(nn.Conv2d(c_in, ch, 4, 2, 1), nn.LeakyReLU(0.2, True),           # (B, 64, h/2, w/2)
                         nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2, True),         # (B, 128, h/4, w/4)
                         nn.Conv2d(ch * 2, ch * 4, 4, 2, 1), nn.LeakyReLU(0.2, True),     # (B, 256, h/8, w/8)
                         nn.Conv2d(ch * 4, ch * 8, 3, 1, 1), nn.LeakyReLU(0.2, True),     # (B, 512, h/8, w/8)
                         nn.Conv2d(ch * 8, 1, 3, 1, 1))                                   # (B, 1, h/8, w/8)


def predict_x0(z_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (z_t - sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_bar_t) (DDPM Eq. 15); alpha_bar (B,)."""
    a = alpha_bar.reshape(-1, 1, 1, 1)
    return (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()


def eps_loss(eps_hat: torch.Tensor, eps: torch.Tensor, w_lat: torch.Tensor) -> torch.Tensor:
    """L_eps = mean(w_lat * (eps_hat - eps)^2) over (B, 4, h, w); w_lat (B, 1, h, w) pooled pixel weights."""
    return (w_lat * (eps_hat.float() - eps) ** 2).mean()


def lsgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """L_dis = 1/2 [mean((Dis(x0_src) - 1)^2) + mean(Dis(x0_mix,tgt)^2)]  (LSGAN, Mao et al. 2017)."""
    return 0.5 * (((d_real.float() - 1) ** 2).mean() + (d_fake.float() ** 2).mean())


def lsgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """L_adv = mean((Dis(x0_mix,tgt) - 1)^2): eps_theta makes mixed/target latents look like source ones."""
    return ((d_fake.float() - 1) ** 2).mean()


# ---- Inference: noise -> T DDIM steps conditioned on E(x) -> D (Fig. 2) ------------------------------------
def make_sampler(scheduler) -> DDIMScheduler:
    """DDIM (eta 0, epsilon, no clipping), "trailing" timesteps: sampling from pure noise starts at t = T_train - 1
    for any T (SD's "leading" + steps_offset 1 runs T = 1 at t = 1, where x0_hat is the starting noise itself)."""
    return DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon", clip_sample=False,
                                     timestep_spacing="trailing")


@torch.no_grad()
def sample_to_last_step(unet, z0: torch.Tensor, ctx, ddim: DDIMScheduler, steps: int, z_T: torch.Tensor):
    """The first `steps` - 1 DDIM steps (eta 0) from z_T (B, 4, h, w) given z0, no gradient (header, item 5) -> the
    last step's input and timestep (z_T, 999 for T = 1; z_333, 332 for T = 3: diffusers steps to t - 1000 // T)."""
    ddim.set_timesteps(steps, device=z0.device)
    *first, s = ddim.timesteps                                    # trailing: 999, ..., s
    dtype, z = next(unet.parameters()).dtype, z_T.float()
    for t in first:                                               # eps_hat = eps_theta(cat(z_t, z0), t, ctx)
        inp = torch.cat([z, z0.float()], 1).to(dtype)            # (B, 8, h, w) noisy label latent first
        eps_hat = unet(inp, t, encoder_hidden_states=ctx.expand(len(z), -1, -1).to(dtype)).sample
        z = ddim.step(eps_hat.float(), t, z, eta=0.0).prev_sample  # sqrt(a') x0_hat + sqrt(1 - a') eps_hat
    return z, s


@torch.no_grad()
def predict_diffusion(net: ICCLDNet, unet, ctx, ddim: DDIMScheduler, steps: int, generator, x: torch.Tensor,
                      z_T: Optional[torch.Tensor] = None):
    """Fig. 2's inference: z0, skips = E(x); `steps` DDIM steps from z_T; the last x0_hat z0_bar -> D(z0_bar, skips)."""
    dtype, u_dtype = next(net.parameters()).dtype, next(unet.parameters()).dtype
    z0, skips = net.E((x * 2 - 1).to(dtype))                      # x (B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8), skips
    z_T = torch.randn(z0.shape, generator=generator) if z_T is None else z_T     # N(0, I), CPU: same on any device
    z, s = sample_to_last_step(unet, z0, ctx, ddim, steps, z_T.to(z0.device))   # z_s, s: the last step
    eps_hat = unet(torch.cat([z, z0.float()], 1).to(u_dtype), s,
                   encoder_hidden_states=ctx.expand(len(z), -1, -1).to(u_dtype)).sample.float()
    z0_bar = predict_x0(z, eps_hat, ddim.alphas_cumprod[int(s)].to(z.device))  # (B, 4, h, w), DDPM Eq. 15
    return net.D(z0_bar.to(dtype), skips)                         # (B, K, H, W)


# ---- The two training steps: one optimizer step each; batch = (x_s, y_s, x_t); random draws: torch's global -----
def train_step_stage1(net, net_ema: ICCLDNet, lab: LabelLatents, opt, scaler, batch, i: int, args: Args,
                      prec: Precision) -> dict[str, float]:
    """Stage-1 step i (Fig. 1 top; i = steps done), net (E, D) maybe DDP-wrapped; x_s, x_t (B, 3, c, c) in [0, 1]."""
    x_s, y_s, x_t = batch
    # ---------- METHOD STEP BEGIN ----------
    f = poly_warmup_factor(i, args.iters, args.warmup_iters, WARMUP_RATIO, POLY_POWER)
    for g in opt.param_groups:                                    # each group's base lr x the schedule
        g["lr"] = g["base"] * f
    if i > 0:                                                     # student <- EMA of teacher (Fig. 1)
        ema_update(net_ema, getattr(net, "module", net), i, args.ema_alpha)
    z_ys = lab(y_s)                                               # (B, 4, c/8, c/8) label latents of the GT
    with prec.autocast():                                         # source, supervised, on both paths
        l_src_img, l_src_lab = stage1_losses(net, x_s, y_s, z_ys)
    scaler.scale(l_src_img + l_src_lab).backward()                # frees the source graph before the mix
    logs = {"loss_src_img": l_src_img, "loss_src_lab": l_src_lab}
    if not args.source_only:
        with prec.autocast():                                     # (B, c, c) argmax, scalar q, (B, c, c) w_t
            y_hat, q, w_t = pseudo_labels(net_ema, x_t, args.pseudo_threshold, pl_rows(args))
        x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)      # augmented x^{s+t}, y^{s+t}, pixel weights
        z_ym = lab(y_m)                                           # (B, 4, c/8, c/8)
        with prec.autocast():                                     # mixed, q-weighted, on both paths
            l_mix_img, l_mix_lab = stage1_losses(net, x_m, y_m, z_ym, w_m)
        scaler.scale(l_mix_img + l_mix_lab).backward()
        logs.update(loss_mix_img=l_mix_img, loss_mix_lab=l_mix_lab, q=q)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    # ---------- METHOD STEP END ----------
    return {**{k: v.item() for k, v in logs.items()}, "lr": opt.param_groups[0]["lr"]}


@dataclass
class Frozen:  # what stage 2 reads but never trains (`fz` in its step)
    net: ICCLDNet                     # stage 1's net_ema (E, D): image latents, skips, pseudo labels
    lab: LabelLatents                 # the label encoder
    ctx: torch.Tensor                 # (1, 77, d) CLIP embedding of "", on the device
    sched: Any                        # the training noise schedule (add_noise)
    alpha_bars: torch.Tensor          # (T_train,) alpha_bar_t = prod(1 - beta_s), on the device
    ddim: DDIMScheduler               # the inference sampler (make_sampler)


def train_step_stage2(unet, unet_ema, disc, fz: Frozen, opt, opt_d, scaler, batch, j: int, args: Args,
                      prec: Precision) -> dict[str, float]:
    """Stage-2 step j (Fig. 1 bottom): eps_theta on L_eps + lambda_adv L_adv, then the discriminator (maybe DDP too)."""
    (x_s, y_s, x_t), b, T, logs = batch, len(batch[0]), len(fz.alpha_bars), {}
    # ---------- METHOD STEP BEGIN ----------
    f = poly_warmup_factor(j, args.iters_stage2, args.warmup_iters, WARMUP_RATIO, POLY_POWER)
    for g in opt.param_groups:
        g["lr"] = g["base"] * f
    for g in opt_d.param_groups:                                  # ADVENT: poly 0.9, no warm-up
        g["lr"] = args.disc_lr * (1 - j / args.iters_stage2) ** DISC_POLY_POWER
    if j > 0:                                                     # the stage-2 "student"
        ema_update(unet_ema, getattr(unet, "module", unet), j, args.ema_alpha)
    with torch.no_grad():                                         # E, D, E_lab frozen: all before eps_theta
        x, y, w_pix = x_s, y_s, torch.ones_like(y_s, dtype=torch.float)   # source pixels weigh 1
        if not args.source_only:                                  # + mixed (w_m) and target (q, row crop)
            y_hat, q, w_t = pseudo_labels(fz.net, x_t, args.pseudo_threshold, pl_rows(args))
            x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)
            x, y = torch.cat([x_s, x_m, x_t]), torch.cat([y_s, y_m, y_hat])   # (3B, 3, c, c), (3B, c, c)
            w_pix, logs["q"] = torch.cat([w_pix, w_m, w_t]), q
        z0 = fz.net.E((x * 2 - 1).to(prec.frozen_dtype))[0].float()   # (n, 4, c/8, c/8) image latents
        z_y = fz.lab(y)                                           # (n, 4, c/8, c/8) label latents to generate
        w_lat = F.avg_pool2d(((y != 255) * w_pix)[:, None], 8)    # (n, 1, c/8, c/8) pooled pixel weights
    n = len(z_y)
    t = torch.randint(0, T, (n,), device=z_y.device)              # one timestep per sample, U{0..T-1}
    eps = torch.randn_like(z_y)                                   # (n, 4, h, w)
    z_t = fz.sched.add_noise(z_y, eps, t)                         # sqrt(a_t) z_y + sqrt(1 - a_t) eps
    inp, tt = torch.cat([z_t, z0], 1), t                          # (n, 8, h, w): noisy latent, then condition
    if not args.source_only:                                      # + the sampler's last step (Fig. 2)
        z_T = torch.randn_like(z_y)                               # (n, 4, h, w) pure noise, as inference
        with prec.autocast():                                     # sample_steps - 1 DDIM steps, no gradient
            z_s, s = sample_to_last_step(getattr(unet, "module", unet), z0, fz.ctx, fz.ddim, args.sample_steps,
                                         z_T)                     # (n, 4, h, w) z_s and its timestep s
        inp, tt = torch.cat([inp, torch.cat([z_s, z0], 1)]), torch.cat([t, torch.full_like(t, int(s))])
    with prec.autocast():                                         # one UNet batch -> (n or 2n, 4, h, w)
        eps_hat = unet(inp, tt, encoder_hidden_states=fz.ctx.expand(len(tt), -1, -1)).sample.float()
    loss = logs["loss_eps"] = eps_loss(eps_hat[:n], eps, w_lat)   # L_eps = mean(w_lat (eps_hat - eps)^2)
    if not args.source_only:
        x0_T = predict_x0(z_s, eps_hat[n:], fz.alpha_bars[s])      # (n, 4, h, w) the latent D decodes
        disc.requires_grad_(False)                                # generator step: the discriminator is fixed
        with prec.autocast():                                     # mixed + target should look like source
            logs["loss_adv"] = l_adv = lsgan_g_loss(getattr(disc, "module", disc)(x0_T[b:]))
        loss = loss + args.lambda_adv * l_adv                     # L = L_eps + lambda_adv * L_adv
    scaler.scale(loss).backward()
    scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    if not args.source_only:                                      # discriminator step on detached x0_hat
        disc.requires_grad_(True)
        with prec.autocast():
            d_src, d_tgt = disc(x0_T.detach()).float().split([b, n - b])   # (B | 2B, 1, h/8, w/8)
        logs["loss_dis"] = l_dis = lsgan_d_loss(d_src, d_tgt)     # source = 1, mixed and target = 0
        scaler.scale(l_dis).backward()
        scaler.step(opt_d)
        opt_d.zero_grad(set_to_none=True)
        logs.update(d_src=d_src.mean(), d_tgt=d_tgt.mean())
    scaler.update()
    # ---------- METHOD STEP END ----------
    return {**{k: v.item() for k, v in logs.items()}, "lr": opt.param_groups[0]["lr"]}


# ---- The two stages' parts: what each trains, its EMA copy, what it reads frozen, its optimizers ------------
@dataclass
class Run:  # what `train` derives once from Args and the hardware; the stage loop and `evaluate` read it
    dist: Dist
    precision: Precision
    num_classes: int                  # K of the target class set
    sd: Any                           # SD parts on the CPU: vae; for stage 2 and evaluation also unet, scheduler
    ctx: Optional[torch.Tensor]       # (1, 77, d) CLIP embedding of "": eps_theta's context (stage 2)
    out: Optional[Path] = None        # run folder (named by the non-finite-loss error; evaluation output)

    def freeze(self, module: nn.Module) -> nn.Module:  # no gradients, eval mode, half dtype (header, item 8)
        return module.requires_grad_(False).eval().to(self.dist.device, self.precision.frozen_dtype)


Stage1 = namedtuple("Stage1", "net net_ema lab optimizer scaler")  # Fig. 1 top; net = (E, D), trained in fp32
Stage2 = namedtuple("Stage2", "unet unet_ema disc frozen optimizer optimizer_d scaler")  # Fig. 1 bottom: eps_theta


def build_stage1(args: Args, run: Run) -> Stage1:
    net = ICCLDNet(run.sd.vae, run.num_classes).to(run.dist.device).requires_grad_(True).train()  # VAE frozen
    net.E.grad_checkpointing = net.D.grad_checkpointing = args.grad_checkpointing
    net_ema = copy.deepcopy(net).requires_grad_(False).eval()     # EMA copy in fp32 (header, item 8)
    lab = run.freeze(LabelLatents(run.sd.vae, PALETTES[run.num_classes]))
    new = [*net.D.skip_convs.parameters(), *net.D.decoder.conv_out.parameters()]  # not in the VAE: new_layer_lr
    optimizer = torch.optim.AdamW(param_groups(net, new, args), betas=(0.9, 0.999))
    return Stage1(net, net_ema, lab, optimizer, run.precision.make_scaler())


def build_stage2(args: Args, run: Run, net_weights: Optional[dict]) -> Stage2:
    """net_weights: stage 1's net_ema (None: random, for --profile / --estimate-memory, or loaded on resume)."""
    sched, dev, net = run.sd.scheduler, run.dist.device, ICCLDNet(run.sd.vae, run.num_classes)
    net.load_state_dict(net_weights) if net_weights is not None else None
    fz = Frozen(run.freeze(net), run.freeze(LabelLatents(run.sd.vae, PALETTES[run.num_classes])), run.ctx.to(dev),
                sched, sched.alphas_cumprod.to(dev), make_sampler(sched))
    unet = widen_conv_in(run.sd.unet).to(dev).requires_grad_(True).train()
    unet.enable_gradient_checkpointing() if args.grad_checkpointing else None
    unet_ema, disc = copy.deepcopy(unet).requires_grad_(False).eval(), discriminator().to(dev)
    optimizer = torch.optim.AdamW(param_groups(unet, list(unet.conv_in.parameters()), args), betas=(0.9, 0.999))
    optimizer_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=DISC_BETAS)
    return Stage2(unet, unet_ema, disc, fz, optimizer, optimizer_d, run.precision.make_scaler())


# ---- Setup: checks, data, SD, stage-1 weights, --profile / --estimate-memory --------------------------------
def check_args(args: Args) -> None:  # ICCLD's own checks after the shared ones, before anything is built or written
    check_common_flags(args, crop_multiple=8)
    measuring = args.profile or args.estimate_memory
    for bad, msg in (
        (args.stage not in ("1", "2", "both"), f"--stage: unknown value '{args.stage}'. Expected 1, 2, both."),
        (args.iters_stage2 < 1, f"--iters-stage2: got {args.iters_stage2}. Expected an integer >= 1."),
        (not 1 <= args.sample_steps <= 50, f"--sample-steps {args.sample_steps}: expected 1..50."),
        (args.stage != "1" and not (args.source_only or args.eval_only) and args.crop_size < 64, f"--crop-size "
         f"{args.crop_size}: stage 2's discriminator needs >= 64 (three stride-2 convs on the latent). "
         "Expected >= 64."),
        (measuring and args.stage == "both", "--profile / --estimate-memory: one stage at a time. Add "
         "--stage 1 or --stage 2."),
        (args.stage == "2" and not (args.resume or args.eval_only or args.stage1_ckpt or measuring),
         "--stage 2: no stage-1 checkpoint. Expected --stage1-ckpt <out>/stage1/checkpoints/step_XXXXXXX "
         "(written by --stage 1 or --stage both), or run --stage both.")):
        if bad:
            raise UserError("error: " + msg)


def build_data(args: Args, num_classes: int):  # training streams (source: rare-class sampling, DAFormer), eval set
    ensure_synthetic_sample(args.data_root) if args.demo else None
    kw = dict(scale=1 / 8 if args.demo else 1.0, num_classes=num_classes)
    name, split = eval_target(args.tgt, args.predict)  # --predict: every image of its folder, no labels
    if args.eval_only:
        return None, None, build_dataset(name, args.data_root, split, **kw)
    src = build_dataset(args.src, args.data_root, "train", crop_size=args.crop_size, cat_max_ratio=0.75, **kw)
    tgt = build_dataset(args.tgt, args.data_root, "train", crop_size=args.crop_size, **kw)
    rcs = RareClassSampling(src, temperature=args.rcs_temperature) if args.rcs_temperature > 0 else None
    return (TrainStream(src, args.seed, rcs, stream_id=0), TrainStream(tgt, args.seed, None, stream_id=1),
            build_dataset(name, args.data_root, split, **kw))


def load_backbone(args: Args) -> tuple[Any, Optional[torch.Tensor]]:  # SD on the CPU: VAE (+ UNet, "" context)
    stage2 = args.stage != "1" or args.eval_only
    sd = load_sd(args.sd_model, ("vae", "unet", "text_encoder", "tokenizer") if stage2 else ("vae",))
    ctx = encode_prompts(sd.tokenizer, sd.text_encoder, [""]).float() if stage2 else None
    sd.text_encoder = None                                        # "" embedded once, then freed
    return sd, ctx


def load_weights(module: nn.Module, weights: dict, prefix: str, where: str) -> nn.Module:
    """The checkpoint tensors named `prefix` + key into `module`; one-line error when they do not fit."""
    try:
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise UserError(f"error: --ckpt: '{where}' does not fit this model ({str(e).splitlines()[0]}). Expected "
                        "a checkpoint of iccld.py with the same --sd-model and --tgt class set.") from None
    return module


def load_stage1_weights(path: str) -> tuple[dict, int]:
    """(net_ema weights, stage-1 step) of a stage-1 checkpoint folder, its weights file or a run folder."""
    p, fix = Path(path), ("Expected a checkpoint written by iccld.py --stage 1 or --stage both "
                          "(<out>/stage1/checkpoints/step_XXXXXXX).")
    if not p.exists():
        raise UserError(f"error: --stage1-ckpt: '{path}' not found. {fix}")
    if p.is_dir() and not (p / "weights.safetensors").exists():
        p = runs.latest_checkpoint(p / "stage1") or runs.latest_checkpoint(p) or p
    weights, state = runs.load_checkpoint(p, "--stage1-ckpt")
    if not (net_weights := {k[8:]: v for k, v in weights.items() if k.startswith("net_ema.")}):
        raise UserError(f"error: --stage1-ckpt: '{path}' holds no net_ema weights. {fix}")
    return net_weights, state["step"] if state.get("stage") == 1 else state.get("offset", 0)


# ---- Processes, device, precision, seeds (Same as madm.py: the same block in all four scripts) ----------------------
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


# ---- Training: setup, stage 1 then stage 2 through one loop (log line, evaluation, checkpoint), end ----------
def train(args: Args) -> dict:
    if args.profile or args.estimate_memory:  # measuring tools, not training: benchmarks/measure.py
        from benchmarks.measure import measure
        return measure("iccld", args, globals())
    dist, repeatable = init_distributed(args.device, args.deterministic)  # torchrun: one process per GPU, DDP
    precision = choose_precision(args.precision, dist.device)
    check_args(args), seed_everything(args.seed)
    K, out = check_pair(args.src, args.tgt), Path(args.out or f"runs/iccld-{run_tag(args.src)}-{run_tag(args.tgt)}")
    if dist.is_main:
        log(f"args: {json.dumps(asdict(args))}\ndevice {dist.device} x{dist.world} | {precision.reason} | {repeatable}")
    data = build_data(args, K)                                    # checked before anything is written
    run = Run(dist, precision, K, *load_backbone(args), out)
    if args.eval_only:  # --eval-only / --predict: a stage-2 checkpoint scores both paths, a stage-1 one D(E(x))
        weights, state = runs.load_checkpoint(args.ckpt)
        net, unet = load_weights(ICCLDNet(run.sd.vae, K), weights, "net_ema.", args.ckpt), None
        if any(k.startswith("unet_ema.") for k in weights):  # a fresh copy, as training's unet_ema: on CPU
            unet = copy.deepcopy(widen_conv_in(run.sd.unet))   # from_pretrained's memory-mapped tensors are not
            load_weights(unet, weights, "unet_ema.", args.ckpt)  # 64-byte aligned: other SIMD paths, 1e-6 apart
        out.mkdir(parents=True, exist_ok=True)
        result = evaluate(args, run.freeze(net), unet and run.freeze(unet), data[2], run, state.get("step", 0))
        return finish(result, run, "done: --eval-only")
    # --resume continues in the stage its checkpoint records; --stage 2 reads stage 1's net_ema, counts on from its step
    resume = args.resume and runs.load_checkpoint(runs.latest_checkpoint(out) or out / "checkpoints", "--resume")
    resume_stage = resume[1]["stage"] if resume else None
    if args.stage == "2" and resume_stage == 1:
        raise UserError(f"error: --resume: the latest checkpoint in '{out}' is from stage 1. Resume with "
                        "--stage both (or --stage 1).")
    stage1_weights, offset = (load_stage1_weights(args.stage1_ckpt) if args.stage == "2" and not args.resume
                              else (None, args.iters))
    runs.prepare_out_dir(out, args.resume, args.demo, dist.is_main)
    metrics.write_metrics(out, args, key="args") if dist.is_main and not args.resume else None
    result = {}
    if args.stage in ("1", "both") and resume_stage != 2:
        stage1 = build_stage1(args, run)
        result = train_stage(args, run, stage1, data, resume if resume_stage == 1 else None, 0)
        stage1_weights = {k: v.detach().float().cpu() for k, v in stage1.net_ema.state_dict().items()}
        del stage1                                                # frees its models and optimizer states
    if args.stage in ("2", "both"):  # its own seeded stream: --stage 2 --stage1-ckpt X = the second half of both
        seed_everything(args.seed + 1) if resume_stage != 2 else None
        result = train_stage(args, run, build_stage2(args, run, stage1_weights), data,
                             resume if resume_stage == 2 else None, offset, result.get("miou_direct"))
    steps = {"1": f"{args.iters}", "2": f"{args.iters_stage2}"}.get(args.stage, f"{args.iters} + {args.iters_stage2}")
    mem = metrics.peak_memory_gb(dist.device)
    return dict(finish(result, run, f"done: {steps} steps | peak memory {mem:.1f} GB | out {out}"), out=str(out))


def train_stage(args: Args, run: Run, stage: Stage1 | Stage2, data: tuple, resume: Optional[tuple], offset: int,
                miou_direct: Optional[float] = None) -> dict:
    """One stage's loop -> its last evaluation; resume: (weights, state) or None; offset: steps before (stage 1's)."""
    dist, out, b, number = run.dist, run.out, args.batch_size, 1 if isinstance(stage, Stage1) else 2
    (src_stream, tgt_stream, val_set), total = data, args.iters if number == 1 else args.iters_stage2
    parts = nn.ModuleDict(dict(net=stage.net, net_ema=stage.net_ema) if number == 1 else dict(  # checkpointed; +
        unet=stage.unet, unet_ema=stage.unet_ema, disc=stage.disc, net_ema=stage.frozen.net))  # D(E) for --eval-only
    optimizers = {k: v for k, v in stage._asdict().items() if k.startswith(("optimizer", "scaler"))}  # AdamW (+ Adam)
    evaluated, start, history = (stage.net_ema, None) if number == 1 else (stage.frozen.net, stage.unet_ema), 0, []
    if resume:  # restores the RNG states too: nothing may draw random numbers after this
        weights, state = resume
        load_weights(parts, weights, "", str(out))
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(state[key])
        offset, start, history = state["offset"], state["step"] - state["offset"], state["train_log"]
        set_rng_state(state["rng"])
        log(f"[stage {number}] resumed at step {start}") if dist.is_main else None
    trained, disc = (dist.wrap(stage.net), None) if number == 1 else (dist.wrap(stage.unet), dist.wrap(stage.disc))
    log(f"[stage {number}] adapting: " + (
        "nothing (--source-only: source losses only)" if args.source_only else
        "E and D, trained on ClassMix images with net_ema's pseudo labels" if number == 1 else
        "eps_theta, on mixed / target pseudo-label latents and against the discriminator (source vs. mixed + target "
        f"x0_hat of the last of {args.sample_steps} DDIM steps from pure noise)")) if dist.is_main else None
    result, qs, window, t_log, logged = {}, [], {}, time.perf_counter(), start
    stop = runs.StopOnSignal(dist)  # SIGTERM / SIGINT: stop after the step's checkpoint, exit 75
    for i in stop.steps(start, total, offset=offset):
        src, tgt = (stream.batch(offset + i, dist.rank * b, b) for stream in (src_stream, tgt_stream))
        batch = (src["image"].to(dist.device), src["label"].to(dist.device), tgt["image"].to(dist.device))
        logs = (train_step_stage1(trained, stage.net_ema, stage.lab, stage.optimizer, stage.scaler, batch, i, args,
                                  run.precision) if number == 1 else
                train_step_stage2(trained, stage.unet_ema, disc, stage.frozen, stage.optimizer, stage.optimizer_d,
                                  stage.scaler, batch, i, args, run.precision))
        runs.check_finite(torch.tensor(sum(v for k, v in logs.items() if "loss" in k)), offset + i + 1, out)
        qs.append(logs.get("q", 0.0))
        window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
        if (i + 1) % args.log_every == 0 or i + 1 == total:  # means since the last line; lr the latest
            n, now = i + 1 - logged, time.perf_counter()
            history.append({"step": i + 1, **{k: v / n for k, v in window.items()}, "lr": logs["lr"]})
            if dist.is_main:
                log(f"[stage {number}] " + log_line(history[-1], total, 1000 * (now - t_log) / n, dist.device))
                metrics.write_metrics(out, history, key=f"train_log_stage{number}")
            window, t_log, logged = {}, now, i + 1
        if (i + 1) % args.eval_every == 0 or i + 1 == total:
            result = evaluate(args, *evaluated, val_set, run, i + 1, miou_direct)
            miou_direct = result["miou_direct"]  # stage 2: E and D are frozen, their direct path is scored once
        if i + 1 == total or (args.ckpt_every and (i + 1) % args.ckpt_every == 0) or stop.requested():
            if dist.is_main:
                runs.save_checkpoint(out, offset + i + 1, parts.state_dict(), dict(
                    stage=number, offset=offset, step=offset + i + 1, rng=get_rng_state(), train_log=history,
                    args=asdict(args), **{key: o.state_dict() for key, o in optimizers.items()}), args.keep_ckpts)
            if dist.is_main and number == 1 and i + 1 == total:  # outside the rotation: what --stage1-ckpt reads
                runs.save_checkpoint(out / "stage1", i + 1, nn.ModuleDict({"net_ema": stage.net_ema}).state_dict(),
                                     dict(stage=1, step=i + 1), keep=1)
            dist.barrier()
    if dist.is_main and qs and not args.source_only:  # how often the target pseudo labels carried weight
        log(f"[stage {number}] target side: q > 0 in {sum(q > 0 for q in qs)} of {len(qs)} steps (mean q "
            f"{sum(qs) / len(qs):.2f})")
    return result or evaluate(args, *evaluated, val_set, run, total, miou_direct)  # a finished stage resumed


def log_line(rec: dict, total: int, ms_per_step: float, device: torch.device) -> str:  # Same as madm.py
    """`step 1200/10000 | loss_src 0.412 | q 0.710 | lr 5.0e-06 | 410 ms/step | mem 17.3 GB` (README)."""
    values = [f"{k} {v:.1e}" if k == "lr" or 0 < abs(v) < 1e-3 else f"{k} {v:.3f}" for k, v in rec.items()
              if k != "step"]
    mem = metrics.peak_memory_gb(device)
    return " | ".join([f"step {rec['step']}/{total}", *values, f"{ms_per_step:.0f} ms/step", f"mem {mem:.1f} GB"])


def finish(res: dict, run: Run, head: str) -> dict:  # end of a run: `head | mIoU ..`, metrics.json's "final", curves
    if run.dist.is_main:
        log(" | ".join([head, *(f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou", "miou16", "miou13") if k in res)]))
        metrics.write_metrics(run.out, {k: v for k, v in res.items() if k not in ("table", "confusion")}, "final")
        metrics.write_curves(run.out)
    return res


# ---- Evaluation: one path for training-time evaluation and --eval-only ------------------------------------
def evaluate(args: Args, net: ICCLDNet, unet, dataset, run: Run, step: int, miou_direct: Optional[float] = None):
    """Stage 1 (unet None): D(E(x)); stage 2: unet_ema's diffusion path and, once (E, D frozen), D(E(x)) -> metrics."""
    info, dist, K = dataset.info, run.dist, run.num_classes
    def score(predict_fn, tag: str, pictures: bool = True) -> dict:  # + the table and the `eval step` line
        res = metrics.evaluate(predict_fn, dataset, K, CLASS_SETS[K], PALETTES[K], device=dist.device, dist=dist,
                               metric_size=info.metric, desc=f"{info.name} {dataset.split} [{tag}]", pad_to=8,
                               input_size=lambda hw: eval_input_size(info.name, hw, 1 / 8 if args.demo else 1.0),
                               pictures_dir=run.out / "predictions" if pictures else None,
                               synthia=args.src == "synthia" and K == 19, **metrics.RESIZE_PROTOCOLS["mmseg"])
        scores = [f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou", "miou16", "miou13") if k in res]
        if dist.is_main:  # without labels the table is one line saying what was written
            log(res["table"] if res.get("no_labels") else "\n".join([res["table"], " | ".join([
                f"eval step {step}", *scores, res["resolution"].replace(", metric at ", " | metric "), tag])]))
            metrics.write_metrics(run.out, {"step": step, "path": tag, **{k: v for k, v in res.items()
                                                                         if k not in ("table", "confusion")}})
        return res
    with run.precision.autocast():
        if unet is None:
            miou_direct = (res := score(net.direct, "stage1 direct"))["miou"]
        else:
            gen, ddim = torch.Generator().manual_seed(args.seed), make_sampler(run.sd.scheduler)
            ctx = run.ctx.to(dist.device)
            res = score(lambda x: predict_diffusion(net, unet, ctx, ddim, args.sample_steps, gen, x),
                        f"stage2 diffusion T={args.sample_steps} (unet_ema)")
            if miou_direct is None and dataset.has_labels:
                miou_direct = score(net.direct, "stage1 direct", pictures=False)["miou"]
    final = {k: res[k] for k in ("miou", "per_class_iou", "miou16", "miou13") if k in res}
    return {**final, "miou_direct": miou_direct, "step": step, "stage": 1 if unet is None else 2}


def main(args: Args) -> dict:  # train (--stage 1, 2, both) or --eval-only, --predict, --profile, --estimate-memory
    args = replace_defaults(args, **DEMO) if args.demo else args
    return train(replace(args, eval_only=args.eval_only or bool(args.predict)))  # --predict: load --ckpt


if __name__ == "__main__":
    run_cli(main, Args)
