"""ICCLD: Inter-Coder Connected Latent Diffusion for unsupervised domain-adaptive semantic segmentation.

Paper: Yu, Sun, Chi, Yang, Luo, "Adversarially Domain-adaptive Latent Diffusion for Unsupervised Semantic
Segmentation", CVPR 2025 Workshops (PVUW), https://arxiv.org/abs/2412.16859 (v2; v1 names the model CICLD).
No code is public for this paper: this file is the first implementation. Only the abstract and the figure
captions fix the method, so every choice below is tagged [paper] or [our choice].

The idea. A latent diffusion model segments: the SD VAE encoder E maps the image to a latent z0, a denoising
UNet eps_theta generates a *label* latent conditioned on z0, and a decoder D with the VAE decoder's
architecture turns that latent into class logits. E and D are joined by "inter-coder connections"
(encoder-to-decoder skips) that carry context and fine detail. Adaptation from a labelled synthetic source
(GTA5, Synthia) to an unlabelled real target (Cityscapes) has two stages: stage 1 adapts E and D by ClassMix
self-training with an EMA copy; stage 2 freezes them and trains eps_theta with an adversarial term aligning
the latents it predicts for source, mixed and target images.

What the paper states [paper] (abstract, v1 abstract, captions of Figs. 1, 2, 4):
  - E and D joined by inter-coder connections; D predicts the mask from a latent (Fig. 2).
  - Stage 1: adaptation of E and D with ClassMix (x^{s+t}, y^{s+t}) and an EMA-updated model (Fig. 1).
  - Stage 2: adversarial learning on the denoising UNet eps_theta, aligning the source, mixed and target
    latent distributions during the latent diffusion process (abstract; v1 abstract).
  - Inference: z_T ~ N(0, 1) and z0^t = E(x^t) concatenated into eps_theta, T denoising steps give z0-bar, D
    predicts the mask (Fig. 2). Reported mIoU: 74.4 GTA5 -> Cityscapes, 67.2 Synthia -> Cityscapes.

Teacher / student. Fig. 1: "the loss functions are primarily computed using the teacher model, while the
student model is updated via an EMA of the teacher model parameters" - the reverse of DAFormer, where the EMA
copy is the teacher. The code avoids both words: `net` is trained by gradients (the paper's teacher),
`net_ema` is its EMA copy (the paper's student; DAFormer's teacher), makes the pseudo labels and is
evaluated. Same for `unet_ema`.

Paper -> code
  Fig. 2 encoder E with skip outputs              ImageEncoder
  Fig. 2 decoder D + inter-coder connections      SegDecoder, ICCLDNet
  the latent space eps_theta generates in         LabelLatents
  Fig. 1 stage 1 (ClassMix, EMA, pseudo labels)   pseudo_labels, class_mix, stage1_losses, train_stage1
  Fig. 1 stage 2 (eps_theta + adversarial)        widen_conv_in, Discriminator, lsgan_*, train_stage2
  Fig. 2 inference (T denoising steps, then D)    ddim_sample, predict_diffusion

Deviations / design choices, all [our choice] (spec iccld.md, Decisions) unless a source is named:
  1. SD v1-5 parts via from_pretrained: VAE (E, D, label encoder), UNet (eps_theta), text encoder ("").
  2. E = VAE encoder + quant_conv, trained in stage 1; z0 = posterior mean x 0.18215; skips f1, f2, f4, f8 =
     outputs of encoder.down_blocks[i].resnets[-1] (strides 1, 2, 4, 8).
  3. D = post_quant_conv + VAE decoder (pretrained), conv_out -> K classes. Inter-coder connection = a
     zero-init 1x1 conv per skip added to the input of decoder up_blocks[k] (f8 -> 0, f4 -> 1, f2 -> 2,
     f1 -> 3).
  4. Label latents = frozen pretrained VAE encoder on the palette-coloured label (MADM's palette idea); stage
     1 teaches D to decode image latents and label latents, both with the image's skips.
  5. EMA alpha_i = min(1 - 1/(i+1), 0.999) for E, D and eps_theta (DAFormer).
  6. Stage 1 = DAFormer's DACS: pseudo labels on the clean target crop, one quality scalar at 0.968,
     Cityscapes rows 15 / 120 ignored (scaled with crop / 512); ClassMix classes drawn from the whole batch
     (DAFormer quirk, kept); jitter applied when u > 0.2, blur when u > 0.5 (DAFormer's "p"); CE over all
     pixels (mmseg 0.16).
  7. Stage 2: conv_in widened 4 -> 8, zero weights for the condition (InstructPix2Pix); eps loss on source
     GT, mixed and target pseudo-label latents, pixel weights pooled 8x8; LSGAN on predicted x0 with an
     ADVENT-style discriminator (last two convs stride 1; ADVENT: BCE), binary source vs. mixed+target,
     lambda 1e-3 (ADVENT). Stage-2 pseudo labels come from the frozen direct path D(E(x)) (no sampling inside
     training).
  8. Inference: DDIM, eta 0, T = 3 (--sample-steps); z_T from a generator reseeded with --seed at each
     evaluation. The paper states neither sampler, T nor the evaluated copy: we report unet_ema (stage 2) and
     also the direct path of net_ema (ablation row); Synthia -> Cityscapes adds mIoU16 / mIoU13.
  9. AdamW wd 0.01: pretrained weights 6e-5, new layers (skips, conv_out, widened conv_in) 6e-4, warm-up
     1500, poly 1.0 (DAFormer); discriminator Adam 1e-4, betas (0.9, 0.99), poly 0.9 (ADVENT). Batch 2 + 2,
     512 crops, rare-class sampling on the source (DAFormer). Stage 1 40000 iterations (DAFormer), stage 2
     20000.
 10. --stage 1|2|both; stage 2 starts from a stage-1 checkpoint. Frozen parts in half precision on CUDA.

Commands
  full run (one 24 GB GPU):  python iccld.py --src gta5 --tgt cityscapes
  low memory (16 GB GPU):    python iccld.py --src gta5 --tgt cityscapes --grad-checkpointing
  CPU demo (< 2 min):        python iccld.py --demo
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDIMScheduler

from common import datasets, metrics, runtime, sd_backbone, synthetic
from common.runtime import UserError


@dataclass
class Args:
    # ---- experiment / infrastructure ----
    src: str = "gta5"
    """source dataset (labelled); paper benchmarks: gta5, synthia"""
    tgt: str = "cityscapes"
    """target dataset (labels unused in training); paper: cityscapes"""
    data_root: str = "data"
    """folder holding the datasets in their official layouts (data/README.md)"""
    out: Optional[str] = None
    """run folder; default runs/iccld-<src>-<tgt> (runs/iccld-demo for --demo)"""
    seed: int = 0
    """seed of every random number generator; our choice"""
    device: str = "auto"
    """auto | cpu | cuda"""
    precision: str = "auto"
    """auto (bf16 / fp16 + GradScaler on GPU, fp32 on CPU) | fp32 | bf16 | fp16; our choice"""
    grad_checkpointing: bool = False
    """recompute activations in backward: E/D in stage 1, the UNet in stage 2 (memory knob)"""
    resume: bool = False
    """continue from the latest checkpoint in --out"""
    eval_only: bool = False
    """only evaluate --ckpt"""
    ckpt: Optional[str] = None
    """checkpoint folder for --eval-only"""
    profile: int = 0
    """time N training iterations of --stage 1 or 2, print one JSON line, write nothing"""
    demo: bool = False
    """tiny random SD + synthetic sample + short schedule of both stages (CPU, < 2 min)"""
    log_every: int = 50
    """log line cadence in steps (DAFormer: 50)"""
    eval_every: int = 4000
    """evaluation cadence in steps of each stage (DAFormer: 4000)"""
    ckpt_every: int = 4000
    """checkpoint cadence in steps of each stage; our choice"""
    keep_ckpts: int = 3
    """how many periodic checkpoints to keep; our choice"""
    # ---- data ----
    batch_size: int = 2
    """source images per step (+ as many target images); DAFormer"""
    crop_size: int = 512
    """training crop side, a multiple of 8 (VAE stride); DAFormer"""
    rcs_temperature: float = 0.01
    """rare-class sampling temperature on the source, <= 0 disables it; DAFormer"""
    # ---- backbone ----
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of SD v1-5 (VAE, UNet, text encoder); tiny / random-sd15 build random weights"""
    # ---- method ----
    stage: str = "both"
    """1 (adapt E, D) | 2 (adversarial latent diffusion) | both; our choice"""
    stage1_ckpt: Optional[str] = None
    """stage-1 checkpoint (or run folder) that --stage 2 starts from; --stage both uses its own"""
    ema_alpha: float = 0.999
    """cap of the EMA ramp min(1 - 1/(i+1), alpha); DAFormer config a999"""
    pseudo_threshold: float = 0.968
    """confidence threshold of the pseudo-label quality weight; DAFormer configs/_base_/uda/dacs.py"""
    pl_crop: tuple[int, ...] = (15, 120)
    """top / bottom rows of a 512 Cityscapes crop with pseudo weight 0 (ego car, rectification); DAFormer"""
    lambda_adv: float = 1e-3
    """weight of the LSGAN generator term; ADVENT LAMBDA_ADV_MAIN"""
    sample_steps: int = 3
    """DDIM steps T at inference (1..50); our choice, the paper does not state T"""
    # ---- optimisation ----
    iters: int = 40000
    """stage-1 iterations; DAFormer"""
    iters_stage2: int = 20000
    """stage-2 iterations; our choice"""
    lr: float = 6e-5
    """AdamW lr of pretrained weights (E, D, eps_theta); DAFormer"""
    new_layer_lr: float = 6e-4
    """lr of new layers (skip convs, conv_out, widened conv_in); DAFormer's 10x head convention"""
    weight_decay: float = 0.01
    """AdamW weight decay; DAFormer adamw.py"""
    warmup_iters: int = 1500
    """linear LR warm-up steps (from ratio 1e-6) before poly decay 1.0; DAFormer poly10warm.py"""
    disc_lr: float = 1e-4
    """discriminator Adam lr, betas (0.9, 0.99), poly 0.9; ADVENT"""


WARMUP_RATIO, POLY_POWER = 1e-6, 1.0     # DAFormer poly10warm.py
DISC_BETAS, DISC_POLY_POWER = (0.9, 0.99), 0.9  # ADVENT advent/domain_adaptation/config.py
# --demo: tiny random SD, so no pretrained weights to protect: larger LRs make learning visible in 100 steps
DEMO = dict(sd_model="tiny", iters=100, iters_stage2=50, crop_size=64, warmup_iters=10, lr=2e-3,
            new_layer_lr=1e-2, disc_lr=1e-3, log_every=10, eval_every=10**6, ckpt_every=10**6)


# ------------------------------------------------------------------------------------------------------------
# E: the SD VAE encoder with skip outputs (Fig. 2, left)
# ------------------------------------------------------------------------------------------------------------
def checkpointed(enabled: bool, fn, *xs):
    """fn(*xs), recomputed in backward instead of storing its activations when `enabled`
    (--grad-checkpointing; same values and gradients, tested)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *xs, use_reentrant=False)
    return fn(*xs)


class ImageEncoder(nn.Module):
    """E(x) -> (z0, skips): the pretrained SD VAE encoder + quant_conv, written as an explicit loop so the
    inter-coder skips can be taken from inside it.

    x (B, 3, H, W) in [-1, 1] -> z0 (B, 4, H/8, W/8) = posterior mean x scaling_factor (SD's latent space),
    skips = [f1, f2, f4, f8]: outputs of `down_blocks[i].resnets[-1]` before the downsampler, at strides
    1, 2, 4, 8 (128, 256, 512, 512 channels for SD). The posterior variance is never used: segmentation
    wants the mode.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.quant_conv = copy.deepcopy(vae.quant_conv) if vae.quant_conv is not None else nn.Identity()
        self.scaling_factor = float(vae.config.scaling_factor)  # 0.18215 for SD 1.x
        self.grad_checkpointing = False

    @property
    def skip_channels(self) -> list[int]:
        return [blk.resnets[-1].out_channels for blk in self.encoder.down_blocks]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc = self.encoder
        h = enc.conv_in(x)                                        # (B, 128, H, W)
        skips = []
        for blk in enc.down_blocks:
            def run(h, blk=blk):
                for resnet in blk.resnets:
                    h = resnet(h, temb=None)
                return h
            h = checkpointed(self.grad_checkpointing, run, h)     # (B, C_i, H/2^i, W/2^i) = skip f_{2^i}
            skips.append(h)
            for down in blk.downsamplers or []:
                h = down(h)                                       # stride doubles
        h = checkpointed(self.grad_checkpointing, enc.mid_block, h)       # (B, 512, H/8, W/8)
        moments = self.quant_conv(enc.conv_out(enc.conv_act(enc.conv_norm_out(h))))  # (B, 8, H/8, W/8)
        z0 = moments[:, :4] * self.scaling_factor                 # (B, 4, H/8, W/8) posterior mean, scaled
        return z0, skips


# ------------------------------------------------------------------------------------------------------------
# D: segmentation decoder with inter-coder connections (Fig. 2, right)
# ------------------------------------------------------------------------------------------------------------
class SegDecoder(nn.Module):
    """D(z, skips) -> logits: post_quant_conv + the pretrained SD VAE decoder, conv_out replaced by K classes.

    Inter-coder connection k: a 1x1 conv, weight and bias zero-initialised, added to the *input* of decoder
    up_blocks[k]; the encoder skip of the same stride feeds it (f8 -> up 0, f4 -> up 1, f2 -> up 2, f1 -> up
    3). Zero init means D starts as exactly the pretrained decoder (tested) and the skips open up as they
    learn (ControlNet's "zero convolution" argument: no random signal disturbs the pretrained path at first).

    z (B, 4, h, w) in SD's *scaled* latent space (D divides by the scaling factor itself, like vae.decode
    after the pipeline's division) -> logits (B, K, 8h, 8w).
    """

    def __init__(self, vae: nn.Module, num_classes: int, skip_channels: list[int]):
        super().__init__()
        self.post_quant_conv = (copy.deepcopy(vae.post_quant_conv) if vae.post_quant_conv is not None
                                else nn.Identity())
        self.decoder = copy.deepcopy(vae.decoder)
        c_last = self.decoder.conv_out.in_channels                # 128 for SD
        self.decoder.conv_out = nn.Conv2d(c_last, num_classes, 3, padding=1)  # new, PyTorch default init
        self.scaling_factor = float(vae.config.scaling_factor)
        # up_blocks[k] runs at stride 8 / 2^k and takes the encoder skip of that stride: skips[-1 - k]
        self.skip_convs = nn.ModuleList()
        for k, blk in enumerate(self.decoder.up_blocks):
            conv = nn.Conv2d(skip_channels[-1 - k], blk.resnets[0].in_channels, 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.skip_convs.append(conv)
        self.grad_checkpointing = False

    def forward(self, z: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        dec = self.decoder
        h = self.post_quant_conv(z / self.scaling_factor)         # (B, 4, h, w) unscaled latent
        h = dec.conv_in(h)                                        # (B, 512, h, w)
        h = checkpointed(self.grad_checkpointing, dec.mid_block, h)       # (B, 512, h, w)
        for k, blk in enumerate(dec.up_blocks):
            h = h + self.skip_convs[k](skips[-1 - k])             # inter-coder connection at stride 8 / 2^k
            h = checkpointed(self.grad_checkpointing, blk, h)     # (B, C_k, 2h, 2w); last block: no upsample
        h = dec.conv_act(dec.conv_norm_out(h))                    # (B, 128, H, W)
        return dec.conv_out(h)                                    # (B, K, H, W) logits at full resolution


class ICCLDNet(nn.Module):
    """(E, D) as one module, so DDP and the EMA see one parameter list.

    forward(x, z_lab) runs E once and D on the image latent and on the label latent with the *same* skips (how
    D is used at inference: generated latent + skips of the image), batched into one D call of 2B samples.
    x (B, 3, H, W) in [0, 1], z_lab (B, 4, H/8, W/8) -> (logits_img, logits_lab), each (B, K, H, W).
    """

    def __init__(self, vae: nn.Module, num_classes: int):
        super().__init__()
        self.E = ImageEncoder(vae)
        self.D = SegDecoder(vae, num_classes, self.E.skip_channels)

    def new_parameters(self) -> list[nn.Parameter]:
        """Layers that do not exist in the pretrained VAE (trained at new_layer_lr)."""
        return list(self.D.skip_convs.parameters()) + list(self.D.decoder.conv_out.parameters())

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        """The direct path D(E(x)): x (B, 3, H, W) in [0, 1] -> logits (B, K, H, W)."""
        z0, skips = self.E(x * 2 - 1)
        return self.D(z0, skips)

    def forward(self, x: torch.Tensor, z_lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0, skips = self.E(x * 2 - 1)                             # (B, 4, H/8, W/8), skips at strides 1..8
        z = torch.cat([z0, z_lab.to(z0.dtype)])                   # (2B, 4, H/8, W/8)
        logits = self.D(z, [torch.cat([f, f]) for f in skips])    # (2B, K, H, W)
        return logits.chunk(2)


# ------------------------------------------------------------------------------------------------------------
# Label latents: the space eps_theta generates in (our choice, MADM's palette idea)
# ------------------------------------------------------------------------------------------------------------
class LabelLatents(nn.Module):
    """z_y = E_lab(pal(y)): the label painted with the target class set's palette (ignore -> black), /255 ->
    [-1, 1], encoded by a frozen copy of the *pretrained* VAE encoder (never fine-tuned, so the space the UNet
    learns in stage 2 is the one D was taught to decode in stage 1).

    y (B, H, W) int64, 255 = ignore -> z_y (B, 4, H/8, W/8) float32 in SD's scaled latent space.
    """

    def __init__(self, vae: nn.Module, palette: np.ndarray):
        super().__init__()
        self.E_lab = ImageEncoder(vae).requires_grad_(False).eval()
        lut = torch.zeros(256, 3)
        lut[: len(palette)] = torch.as_tensor(palette, dtype=torch.float32) / 255  # ids >= K (255) stay black
        self.register_buffer("lut", lut, persistent=False)

    @torch.no_grad()
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        pal = self.lut[y].permute(0, 3, 1, 2)                     # (B, 3, H, W) in [0, 1]
        dtype = next(self.E_lab.parameters()).dtype
        return self.E_lab((pal * 2 - 1).to(dtype))[0].float()    # (B, 4, H/8, W/8)


# ------------------------------------------------------------------------------------------------------------
# Stage 1: DACS self-training of E and D (Fig. 1, top; DAFormer recipe)
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def pseudo_labels(net_ema: ICCLDNet, x_t: torch.Tensor, threshold: float, rows: tuple[int, int]):
    """Pseudo labels from net_ema's direct path on the clean target crop (DAFormer `dacs.py`).

    x_t (B, 3, H, W) in [0, 1] -> y_hat (B, H, W) argmax, q scalar = mean(p_max >= threshold) over the batch,
    w_t (B, H, W) = q everywhere except `rows` = (top, bottom) rows set to 0 (Cityscapes ego car / borders).
    One scalar per batch, not a per-pixel mask: DAFormer's choice, kept.
    """
    p = net_ema.direct(x_t).float().softmax(1)                    # (B, K, H, W)
    p_max, y_hat = p.max(1)                                       # (B, H, W) each
    q = (p_max >= threshold).float().mean()
    w_t = torch.full_like(p_max, float(q))
    top, bottom = rows
    if top:
        w_t[:, :top] = 0
    if bottom:
        w_t[:, -bottom:] = 0
    return y_hat, q, w_t


# Same as madm.py:ce_all_pixels
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


# Same as madm.py:ema_update
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, alpha_max: float) -> None:
    """Mean-teacher update: theta_ema <- a * theta_ema + (1 - a) * theta, a_i = min(1 - 1/(i + 1), alpha_max).

    The ramp lets the EMA copy follow the model closely in the first steps (DAFormer / MADM `_update_ema`).
    Parameters only: buffers (BatchNorm statistics) are left untouched, as in the official code.
    """
    alpha = min(1.0 - 1.0 / (step + 1), alpha_max)
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(alpha).add_(p.detach(), alpha=1.0 - alpha)


# Same as madm.py:class_mix_masks
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


# Same as madm.py:_rgb_to_hsv
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


# Same as madm.py:_hsv_to_rgb
def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B, 3, H, W)
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


# Same as madm.py:_gaussian_blur
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


# Same as madm.py:strong_augment
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


@torch.no_grad()
def class_mix(x_s, y_s, x_t, y_hat, w_t):
    """ClassMix of source into target (madm.md Decision 15): image, label and pixel weight mixed alike, then
    the strong augmentation on the mixed image only.
    -> x_m (B, 3, H, W) in [0, 1], y_m (B, H, W), w_m (B, H, W)."""
    M = class_mix_masks(y_s)                                      # (B, 1, H, W), 1 = source pixel
    x_m = M * x_s + (1 - M) * x_t                                 # x^{s+t} of Fig. 1
    m = M[:, 0].bool()
    y_m = torch.where(m, y_s, y_hat)                              # y^{s+t}
    w_m = torch.where(m, torch.ones_like(w_t), w_t)               # source pixels weight 1, target pixels q
    return strong_augment(x_m), y_m, w_m


def stage1_losses(net, x, y, z_lab, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """L = CE(D(E(x)), y; w) + CE(D(z_y(y), skips(x)), y; w), both CE over all pixels (DAFormer convention).

    The first term trains the direct path, the second teaches D to decode *label* latents with the image's own
    skips, exactly how D is used after stage 2's UNet generates a label latent. Returns (L_img, L_lab).
    """
    logits_img, logits_lab = net(x, z_lab)                        # (B, K, H, W) each
    return ce_all_pixels(logits_img, y, weight), ce_all_pixels(logits_lab, y, weight)


# Same as diff.py:poly_warmup_factor
def poly_warmup_factor(step: int, total: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """LR multiplier of mmcv's `poly` policy with linear warm-up (DAFormer `poly10warm.py`), per optimizer step.

    poly: f = (1 - step / total) ** power (min_lr 0); warm-up for step < warmup_iters multiplies the poly value by
    1 - (1 - step / warmup_iters) * (1 - warmup_ratio), i.e. it rises linearly from `warmup_ratio`.
    """
    factor = (1.0 - step / total) ** power
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


# ------------------------------------------------------------------------------------------------------------
# Stage 2: eps_theta conditioned on the image latent + adversarial alignment (Fig. 1, bottom)
# ------------------------------------------------------------------------------------------------------------
def widen_conv_in(unet: nn.Module, extra: int = 4) -> nn.Module:
    """conv_in 4 -> 4 + extra input channels; new weight[:, :4] = pretrained, weight[:, 4:] = 0, bias kept
    (InstructPix2Pix). The UNet's output is unchanged at initialisation whatever the condition holds (tested),
    so stage 2 starts from the pretrained denoiser and learns to use the image latent."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=old.in_channels + extra)
    return unet


class Discriminator(nn.Module):
    """ADVENT-style fully convolutional discriminator on predicted clean latents x0_hat (4 channels).

    x (B, 4, h, w) -> patch logits (B, 1, h/8, w/8). Three 4x4 stride-2 convs then two 3x3 stride-1 convs:
    ADVENT uses five stride-2 convs on 19-channel softmax maps at full resolution; on a 64x64 latent that
    would leave a 2x2 map, so the last two keep the resolution [our choice].
    """

    def __init__(self, c_in: int = 4, ch: int = 64):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(c_in, ch, 4, 2, 1), act(),                  # (B, 64, h/2, w/2)
            nn.Conv2d(ch, ch * 2, 4, 2, 1), act(),                # (B, 128, h/4, w/4)
            nn.Conv2d(ch * 2, ch * 4, 4, 2, 1), act(),            # (B, 256, h/8, w/8)
            nn.Conv2d(ch * 4, ch * 8, 3, 1, 1), act(),            # (B, 512, h/8, w/8)
            nn.Conv2d(ch * 8, 1, 3, 1, 1))                        # (B, 1, h/8, w/8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def predict_x0(z_t: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (z_t - sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_bar_t)  (DDPM Eq. 15); alpha_bar (B,)."""
    a = alpha_bar.view(-1, 1, 1, 1)
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


# ------------------------------------------------------------------------------------------------------------
# Inference: noise -> T DDIM steps conditioned on E(x) -> D (Fig. 2)
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(unet, z0: torch.Tensor, ctx: torch.Tensor, ddim: DDIMScheduler, steps: int,
                generator: torch.Generator) -> torch.Tensor:
    """z_T ~ N(0, I) -> `steps` DDIM steps (eta 0), eps_hat = eps_theta(cat(z_t, z0), t, ctx) -> z0_bar.

    z0 (B, 4, h, w) image latent (the condition, never noised) -> z0_bar (B, 4, h, w) float32: the last step's
    predicted x0. Noise is drawn on the CPU generator so a seed gives the same z_T on any device.
    """
    B = z0.shape[0]
    z = torch.randn(z0.shape, generator=generator).to(z0.device)  # (B, 4, h, w) z_T
    ddim.set_timesteps(steps, device=z0.device)
    x0_bar = z
    for t in ddim.timesteps:
        inp = torch.cat([z, z0.float()], 1).to(unet.dtype)      # (B, 8, h, w) noisy label latent first
        eps_hat = unet(inp, t, encoder_hidden_states=ctx.expand(B, -1, -1).to(unet.dtype)).sample.float()
        out = ddim.step(eps_hat, t, z, eta=0.0)
        z, x0_bar = out.prev_sample, out.pred_original_sample
    return x0_bar


@torch.no_grad()
def predict_diffusion(net: ICCLDNet, unet, ctx, ddim, steps, generator, x: torch.Tensor) -> torch.Tensor:
    """The ICCLD prediction: x (1, 3, H, W) in [0, 1] -> logits (1, K, H, W) = D(z0_bar, skips of E(x))."""
    dtype = next(net.parameters()).dtype
    z0, skips = net.E((x * 2 - 1).to(dtype))                      # (1, 4, H/8, W/8), skips
    z0_bar = ddim_sample(unet, z0, ctx, ddim, steps, generator)   # (1, 4, H/8, W/8)
    return net.D(z0_bar.to(dtype), skips)


# ------------------------------------------------------------------------------------------------------------
# Plumbing: data, checkpoints, evaluation
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What both stages share, built once by `main` before anything is written."""
    args: Args
    device: torch.device
    prec: runtime.Precision
    dist: runtime.Dist
    K: int
    palette: np.ndarray
    class_names: tuple
    src_stream: Optional[datasets.TrainStream]
    tgt_stream: Optional[datasets.TrainStream]
    eval_set: Optional[datasets.SegDataset]
    scale: float
    sd: sd_backbone.SD
    out: Optional[Path] = None


def get_batch(s: Setup, step: int):
    """Global step -> (x_s, y_s, x_t) on the device; each rank takes its slice of the global batch (DDP)."""
    b, c = s.args.batch_size, s.args.crop_size
    if s.src_stream is None:  # --profile without data: random tensors of the real shapes
        g = torch.Generator().manual_seed(step)
        y = torch.randint(0, s.K, (b, c, c), generator=g)
        return (torch.rand(b, 3, c, c, generator=g).to(s.device), y.to(s.device),
                torch.rand(b, 3, c, c, generator=g).to(s.device))
    start = s.dist.rank * b
    src, tgt = s.src_stream.batch(step, start, b), s.tgt_stream.batch(step, start, b)
    return src["image"].to(s.device), src["label"].to(s.device), tgt["image"].to(s.device)


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def prefixed(prefix: str, module_or_sd) -> dict:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def strip(prefix: str, weights: dict) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def load_stage1_weights(path: str) -> tuple[dict, int]:
    """(net_ema weights, stage-1 step) of a stage-1 checkpoint folder, its weights file or a run folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"error: --stage1-ckpt: '{path}' not found. Expected a checkpoint folder written by "
                        "iccld.py --stage 1 or --stage both (<out>/stage1/checkpoints/step_XXXXXXX).")
    if p.is_dir() and not (p / "weights.safetensors").exists():
        p = runtime.latest_checkpoint(p / "stage1") or runtime.latest_checkpoint(p) or p
    weights, state = runtime.load_checkpoint(p)
    net_w = strip("net_ema", weights)
    if not net_w:
        raise UserError(f"error: --stage1-ckpt: '{path}' holds no net_ema weights. Expected a checkpoint "
                        "written by iccld.py --stage 1 or --stage both "
                        "(<out>/stage1/checkpoints/step_XXXXXXX).")
    return net_w, int(state.get("step", 0)) if state.get("stage") == 1 else int(state.get("offset", 0))


def eval_input(s: Setup) -> tuple[Optional[tuple[int, int]], str, str]:
    """(W, H) eval input of the target (datasets.md section 5; None = per image, keep-ratio targets), the
    metric mode and the metric size "WxH" of the first image, for the eval line."""
    info = s.eval_set.info
    h, w = s.eval_set[0]["label"].shape
    size = datasets.eval_input_size(info.name, (h, w), s.scale)
    mh, mw = {"native": (h, w), "half": (h // 2, w // 2), "input": size[::-1]}[info.metric]
    return (size if info.eval_input[0] == "exact" else None), info.metric, f"{mw}x{mh}"


def evaluate(s: Setup, predict_fn, step: int, tag: str, pictures: bool) -> dict:
    """Score predict_fn on the target eval split with common.metrics.evaluate; print the table and the eval
    line; append to metrics.json (rank 0)."""
    size, metric_mode, metric_wh = eval_input(s)
    info = s.eval_set.info

    def fn(x):
        if size is None:  # keep-ratio targets: resize per image
            w, h = datasets.eval_input_size(info.name, tuple(x.shape[-2:]), s.scale)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return predict_fn(x)

    res = metrics.evaluate(fn, s.eval_set, s.K, s.class_names, s.palette, device=s.device, dist=s.dist,
                           input_size=size, metric_size=metric_mode,
                           desc=f"{info.name} {s.eval_set.split} [{tag}]",
                           pictures_dir=(s.out / "predictions") if (pictures and s.out) else None,
                           synthia=s.args.src == "synthia" and s.K == 19, pad_to=8, progress=False)
    if s.dist.is_main:
        print(res["table"])
        extra = "".join(f" | {k} {100 * res[k]:.2f}" for k in ("miou16", "miou13") if k in res)
        in_wh = res["resolution"].split(",")[0].split()[-1]
        print(f"eval step {step} | mIoU {100 * res['miou']:.2f}{extra} | input {in_wh} | "
              f"metric {metric_wh} | {tag}")
        if s.out is not None:
            runtime.write_metrics(s.out, {"step": step, "path": tag, **{k: v for k, v in res.items()
                                                                        if k not in ("table", "confusion")}})
    return res


def frozen(module: nn.Module, s: Setup) -> nn.Module:
    """Frozen parts: no gradients, eval mode, half precision on CUDA (inference only: fp32 not needed)."""
    return module.requires_grad_(False).eval().to(s.device, s.prec.frozen_dtype)


# ------------------------------------------------------------------------------------------------------------
# Stage 1 training loop
# ------------------------------------------------------------------------------------------------------------
def train_stage1(s: Setup, state: Optional[tuple[dict, dict]] = None) -> tuple[ICCLDNet, dict]:
    """Adapt E and D (Fig. 1 top). Returns (net_ema in fp32, last eval result)."""
    a, device = s.args, s.device
    net = ICCLDNet(s.sd.vae, s.K).to(device).requires_grad_(True).train()  # load_sd froze the VAE
    net.E.grad_checkpointing = net.D.grad_checkpointing = a.grad_checkpointing
    net_ema = copy.deepcopy(net).requires_grad_(False).eval()   # the paper's "student"
    lab = LabelLatents(s.sd.vae, s.palette)
    lab.E_lab = frozen(lab.E_lab, s)
    lab.to(device)
    new = {id(p) for p in net.new_parameters()}
    groups = [{"params": [p for p in net.parameters() if id(p) not in new], "lr": a.lr, "base": a.lr},
              {"params": net.new_parameters(), "lr": a.new_layer_lr, "base": a.new_layer_lr}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=a.weight_decay)
    scaler = s.prec.make_scaler()
    start = 0
    if state is not None:  # --resume inside stage 1
        weights, st = state
        net.load_state_dict(strip("net", weights))
        net_ema.load_state_dict(strip("net_ema", weights))
        opt.load_state_dict(st["opt"])
        scaler.load_state_dict(st["scaler"])
        runtime.set_rng_state(st["rng"])
        start = st["step"]
    net_ddp = s.dist.wrap(net)
    # Cityscapes rows without pseudo weight, scaled with the crop (DAFormer's 15 / 120 are for 512 crops)
    rows = tuple(round(r * a.crop_size / 512) for r in a.pl_crop) if a.tgt == "cityscapes" else (0, 0)

    def step_fn(i: int) -> dict:
        # ---------- METHOD STEP BEGIN ----------
        f = poly_warmup_factor(i, a.iters, a.warmup_iters, WARMUP_RATIO, POLY_POWER)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        if i > 0:
            ema_update(net_ema, unwrap(net_ddp), i, a.ema_alpha)   # student <- EMA of teacher (Fig. 1)
        x_s, y_s, x_t = get_batch(s, i)                       # (B, 3, c, c) [0, 1], (B, c, c), (B, 3, c, c)
        with s.prec.autocast():
            # (B, c, c) argmax, scalar quality, (B, c, c) pixel weights
            y_hat, q, w_t = pseudo_labels(net_ema, x_t, a.pseudo_threshold, rows)
        z_ys = lab(y_s)                                           # (B, 4, c/8, c/8) label latents of the GT
        # source: supervised on both paths
        with s.prec.autocast():
            l_src_img, l_src_lab = stage1_losses(net_ddp, x_s, y_s, z_ys)
        runtime.check_finite(l_src_img + l_src_lab, i, s.out)
        scaler.scale(l_src_img + l_src_lab).backward()
        # mixed: ClassMix x^{s+t}, y^{s+t} with pseudo-label weights, strong augmentation
        x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)      # (B, 3, c, c), (B, c, c), (B, c, c)
        z_ym = lab(y_m)                                           # (B, 4, c/8, c/8)
        with s.prec.autocast():
            l_mix_img, l_mix_lab = stage1_losses(net_ddp, x_m, y_m, z_ym, w_m)
        runtime.check_finite(l_mix_img + l_mix_lab, i, s.out)
        scaler.scale(l_mix_img + l_mix_lab).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # ---------- METHOD STEP END ----------
        return {"loss_src_img": l_src_img.item(), "loss_src_lab": l_src_lab.item(),
                "loss_mix_img": l_mix_img.item(), "loss_mix_lab": l_mix_lab.item(), "q": float(q),
                "lr": opt.param_groups[0]["lr"]}

    if a.profile:
        return net_ema, {"step_fn": step_fn}
    timer, last = runtime.RunTimer(), {}
    for i in range(start, a.iters):
        logs = step_fn(i)
        timer.tick()
        step = i + 1
        if (step % a.log_every == 0 or step == 1) and s.dist.is_main:
            print("[stage 1] " + runtime.log_line(step, a.iters, logs, timer.lap(),
                                                  runtime.peak_memory_gb(device)))
        if step % a.eval_every == 0 or step == a.iters:
            with s.prec.autocast():
                last = evaluate(s, net_ema.direct, step, "stage1 direct", pictures=True)
        if (step % a.ckpt_every == 0 or step == a.iters) and s.dist.is_main and s.out is not None:
            weights = {**prefixed("net", net), **prefixed("net_ema", net_ema)}
            st = {"stage": 1, "step": step, "offset": 0, "opt": opt.state_dict(),
                  "scaler": scaler.state_dict(), "rng": runtime.get_rng_state(),
                  "args": dataclasses.asdict(a)}
            runtime.save_checkpoint(s.out, step, weights, st, keep=a.keep_ckpts)
            if step == a.iters:  # kept outside the rotation: what --stage 2 starts from
                runtime.save_checkpoint(s.out / "stage1", step, prefixed("net_ema", net_ema),
                                        {"stage": 1, "step": step}, keep=1)
    return net_ema, last


# ------------------------------------------------------------------------------------------------------------
# Stage 2 training loop
# ------------------------------------------------------------------------------------------------------------
def train_stage2(s: Setup, net_w: dict, offset: int, state: Optional[tuple[dict, dict]] = None,
                 direct: Optional[dict] = None) -> dict:
    """Train eps_theta (+ discriminator) with E, D frozen at the stage-1 net_ema (Fig. 1 bottom).

    net_w: net_ema weights from stage 1 (fp32, kept for checkpoints); offset: stage-1 steps, so that
    checkpoint names keep increasing across stages. Returns the last evaluation (diffusion path) with the
    direct path's mIoU added (`direct`: stage 1's evaluation of the same model, when this process ran it).
    """
    a, device = s.args, s.device
    net = ICCLDNet(s.sd.vae, s.K)
    net.load_state_dict(net_w)
    net = frozen(net, s)                                          # E, D frozen, half on CUDA
    lab = LabelLatents(s.sd.vae, s.palette)
    lab.E_lab = frozen(lab.E_lab, s)
    lab.to(device)
    unet = widen_conv_in(s.sd.unet).to(device).requires_grad_(True).train()
    if a.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_ema = copy.deepcopy(unet).requires_grad_(False).eval()  # stage-2 "student", evaluated
    disc = Discriminator().to(device)
    ctx = s.sd.ctx.to(device)                                     # (1, 77, d) embedding of "" (computed once)
    sched = s.sd.scheduler
    alpha_bars = sched.alphas_cumprod.to(device)                  # (1000,) alpha_bar_t = prod(1 - beta_s)
    conv_in = list(unet.conv_in.parameters())
    ids = {id(p) for p in conv_in}
    opt = torch.optim.AdamW(
        [{"params": [p for p in unet.parameters() if id(p) not in ids], "lr": a.lr, "base": a.lr},
         {"params": conv_in, "lr": a.new_layer_lr, "base": a.new_layer_lr}],
        betas=(0.9, 0.999), weight_decay=a.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=a.disc_lr, betas=DISC_BETAS)
    scaler = s.prec.make_scaler()
    start = 0
    if state is not None:  # --resume inside stage 2
        weights, st = state
        unet.load_state_dict(strip("unet", weights))
        unet_ema.load_state_dict(strip("unet_ema", weights))
        disc.load_state_dict(strip("disc", weights))
        opt.load_state_dict(st["opt"])
        opt_d.load_state_dict(st["opt_d"])
        scaler.load_state_dict(st["scaler"])
        runtime.set_rng_state(st["rng"])
        start = st["step"]
    unet_ddp, disc_ddp = s.dist.wrap(unet), s.dist.wrap(disc)
    rows = tuple(round(r * a.crop_size / 512) for r in a.pl_crop) if a.tgt == "cityscapes" else (0, 0)
    T = sched.config.num_train_timesteps
    b = a.batch_size

    def step_fn(j: int) -> dict:
        # ---------- METHOD STEP BEGIN ----------
        f = poly_warmup_factor(j, a.iters_stage2, a.warmup_iters, WARMUP_RATIO, POLY_POWER)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        for g in opt_d.param_groups:
            g["lr"] = a.disc_lr * poly_warmup_factor(j, a.iters_stage2, 0, 1.0, DISC_POLY_POWER)
        if j > 0:
            ema_update(unet_ema, unwrap(unet_ddp), j, a.ema_alpha)
        x_s, y_s, x_t = get_batch(s, offset + j)                  # fresh batches after stage 1's
        with torch.no_grad():                                     # everything before eps_theta is frozen
            y_hat, q, w_t = pseudo_labels(net, x_t.to(s.prec.frozen_dtype), a.pseudo_threshold, rows)
            x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)
            x = torch.cat([x_s, x_m, x_t])                        # (6, 3, c, c) source, mixed, target
            z0 = net.E((x * 2 - 1).to(s.prec.frozen_dtype))[0].float()   # (6, 4, c/8, c/8) image latents
            y = torch.cat([y_s, y_m, y_hat])                      # (6, c, c)
            z_y = lab(y)                                          # (6, 4, c/8, c/8) label latents to generate
            w_pix = (y != 255).float() * torch.cat([torch.ones_like(w_m), w_m, w_t])   # (6, c, c)
            w_lat = F.avg_pool2d(w_pix[:, None], 8)               # (6, 1, c/8, c/8)
        t = torch.randint(0, T, (3 * b,), device=device)          # one timestep per sample
        eps = torch.randn_like(z_y)                               # (6, 4, h, w)
        z_t = sched.add_noise(z_y, eps, t)                        # sqrt(a_t) z_y + sqrt(1 - a_t) eps
        # generator step: all six latents in one UNet batch; the discriminator is frozen here
        disc.requires_grad_(False)
        with s.prec.autocast():
            eps_hat = unet_ddp(torch.cat([z_t, z0], 1), t,       # (6, 8, h, w) -> (6, 4, h, w)
                               encoder_hidden_states=ctx.expand(3 * b, -1, -1)).sample
            x0_hat = predict_x0(z_t, eps_hat.float(), alpha_bars[t])     # (6, 4, h, w)
            d_fake = disc(x0_hat[b:])                             # mixed + target (B2, 1, h/8, w/8)
            l_eps = eps_loss(eps_hat, eps, w_lat)
            l_adv = lsgan_g_loss(d_fake)
        l_gen = l_eps + a.lambda_adv * l_adv                      # L = L_eps + lambda_adv * L_adv
        runtime.check_finite(l_gen, offset + j, s.out)
        scaler.scale(l_gen).backward()
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        # discriminator step on detached x0_hat: source = 1, mixed and target = 0
        disc.requires_grad_(True)
        x0_det = x0_hat.detach()
        with s.prec.autocast():
            d_real, d_fake = disc_ddp(x0_det).split([b, 2 * b])
            l_dis = lsgan_d_loss(d_real, d_fake)
        scaler.scale(l_dis).backward()
        scaler.step(opt_d)
        scaler.update()
        opt_d.zero_grad(set_to_none=True)
        # ---------- METHOD STEP END ----------
        return {"loss_eps": l_eps.item(), "loss_adv": l_adv.item(), "loss_dis": l_dis.item(),
                "d_src": d_real.float().mean().item(), "d_tgt": d_fake.float().mean().item(), "q": float(q),
                "lr": opt.param_groups[0]["lr"]}

    if a.profile:
        return {"step_fn": step_fn}
    ddim = DDIMScheduler.from_config(sched.config, prediction_type="epsilon", clip_sample=False)

    def run_eval(step):
        nonlocal direct  # E, D are frozen: the direct path cannot change in stage 2, so it is scored once
        gen = torch.Generator().manual_seed(a.seed)              # same z_T at every evaluation
        with s.prec.autocast():
            res = evaluate(s, lambda x: predict_diffusion(net, unet_ema, ctx, ddim, a.sample_steps, gen, x),
                           step, f"stage2 diffusion T={a.sample_steps} (unet_ema)", pictures=True)
            direct = direct or evaluate(s, net.direct, step, "stage1 direct", pictures=False)
        return {**res, "miou_direct": direct["miou"]}

    timer, last = runtime.RunTimer(), {}
    for j in range(start, a.iters_stage2):
        logs = step_fn(j)
        timer.tick()
        step = j + 1
        if (step % a.log_every == 0 or step == 1) and s.dist.is_main:
            print("[stage 2] " + runtime.log_line(step, a.iters_stage2, logs, timer.lap(),
                                                  runtime.peak_memory_gb(device)))
        if step % a.eval_every == 0 or step == a.iters_stage2:
            last = run_eval(step)
        if (step % a.ckpt_every == 0 or step == a.iters_stage2) and s.dist.is_main and s.out is not None:
            weights = {**prefixed("unet", unet), **prefixed("unet_ema", unet_ema), **prefixed("disc", disc),
                       **prefixed("net_ema", net_w)}
            st = {"stage": 2, "step": step, "offset": offset, "opt": opt.state_dict(),
                  "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(), "rng": runtime.get_rng_state(),
                  "args": dataclasses.asdict(a)}
            runtime.save_checkpoint(s.out, offset + step, weights, st, keep=a.keep_ckpts)
    if not last:  # resumed at the very end
        last = run_eval(a.iters_stage2)
    return last


# ------------------------------------------------------------------------------------------------------------
# main: validate inputs, build data and SD, then train / evaluate / profile
# ------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    if args.demo:
        root = synthetic.ensure_synthetic_sample(str(Path(args.data_root) / "synthetic")
                                                 if args.data_root == "data" else args.data_root)
        args = runtime.replace_defaults(args, data_root=str(root), out="runs/iccld-demo", **DEMO)
    if args.out is None:
        args = dataclasses.replace(args, out=f"runs/iccld-{args.src}-{args.tgt}")
    runtime.require_ckpt(args)
    if args.stage not in ("1", "2", "both"):
        raise UserError(f"error: --stage: unknown value '{args.stage}'. Expected 1, 2 or both.")
    if args.crop_size % 8:
        raise UserError(f"error: --crop-size {args.crop_size}: not a multiple of 8 (the VAE stride). "
                        "Pass e.g. 512.")
    if not 1 <= args.sample_steps <= 50:
        raise UserError(f"error: --sample-steps {args.sample_steps}: expected 1..50.")
    if args.profile and args.stage == "both":
        raise UserError("error: --profile: profile one stage at a time. Add --stage 1 or --stage 2.")
    stage2_only = args.stage == "2" and not args.resume and not args.eval_only
    if stage2_only and not args.stage1_ckpt and not args.profile:
        raise UserError("error: --stage 2: no stage-1 checkpoint. Expected --stage1-ckpt "
                        "<out>/stage1/checkpoints/step_XXXXXXX (written by --stage 1 or --stage both), "
                        "or run --stage both.")
    dist = runtime.init_distributed(args.device)
    device = dist.device
    prec = runtime.choose_precision(args.precision, device)
    runtime.seed_everything(args.seed)                            # all seeding here, in one place
    if dist.is_main:
        print(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"device {device} | precision: {prec.reason}")
    K = datasets.check_pair(args.src, args.tgt)
    scale = 1 / 8 if args.demo else 1.0
    # data (validated before anything is written); --profile may run without any dataset
    src_stream = tgt_stream = eval_set = None
    try:
        if not args.eval_only:
            src_ds = datasets.build_dataset(args.src, args.data_root, "train", crop_size=args.crop_size,
                                            scale=scale, num_classes=K, cat_max_ratio=0.75)
            tgt_ds = datasets.build_dataset(args.tgt, args.data_root, "train", crop_size=args.crop_size,
                                            scale=scale, num_classes=K)
            # (RCS scales its pixel thresholds with the dataset scale itself)
            rcs = (datasets.RareClassSampling(src_ds, temperature=args.rcs_temperature)
                   if args.rcs_temperature > 0 else None)
            src_stream = datasets.TrainStream(src_ds, args.seed, rcs, stream_id=0)
            tgt_stream = datasets.TrainStream(tgt_ds, args.seed, None, stream_id=1)
        eval_set = datasets.build_dataset(args.tgt, args.data_root, "val", scale=scale, num_classes=K)
    except UserError:
        if not args.profile:
            raise
        print("note: --profile without the datasets: random tensors of the training shapes")
    train_stage2_needed = args.stage != "1" or args.eval_only
    parts = ("vae", "unet", "text_encoder", "tokenizer") if train_stage2_needed else ("vae",)
    sd = sd_backbone.load_sd(args.sd_model, parts=parts, device="cpu")
    sd.ctx = None
    if sd.text_encoder is not None:  # "" embedded once, then the text encoder is freed
        sd.ctx = sd_backbone.encode_prompts(sd.tokenizer, sd.text_encoder, [""]).float()  # (1, 77, d)
        sd.text_encoder = None
    palette = np.asarray(datasets.PALETTES[K])
    class_names = datasets.CLASS_SETS[K]
    # sd.vae stays on the CPU: E, D and E_lab are copies moved to the device where they are built
    s = Setup(args, device, prec, dist, K, palette, class_names, src_stream, tgt_stream, eval_set, scale, sd)

    if args.profile:  # one stage's training step, nothing written
        if args.stage == "1":
            fn = train_stage1(s)[1]["step_fn"]
        else:
            net_w = (load_stage1_weights(args.stage1_ckpt)[0] if args.stage1_ckpt
                     else ICCLDNet(sd.vae, K).state_dict())
            fn = train_stage2(s, net_w, 0)["step_fn"]
        counter = iter(range(10**9))
        res = runtime.profile_training(lambda: fn(next(counter)), args.profile, device,
                                       extra={"method": "iccld", "stage": args.stage, "crop": args.crop_size,
                                              "batch": args.batch_size, "sd_model": args.sd_model,
                                              "grad_checkpointing": args.grad_checkpointing})
        print(json.dumps(res))
        return res

    # checkpoints to start from, read before the run folder is touched
    resume_state = stage1_w = None
    stage1_step = args.iters
    if args.eval_only:
        weights, _ = runtime.load_checkpoint(args.ckpt)
    elif args.resume:
        resume_state = runtime.load_checkpoint(runtime.resume_checkpoint(args.out))
        if args.stage == "2" and resume_state[1].get("stage") != 2:
            raise UserError(f"error: --resume: the latest checkpoint in '{args.out}' is from stage 1. "
                            "Resume with --stage both (or --stage 1).")
    elif args.stage == "2":
        stage1_w, stage1_step = load_stage1_weights(args.stage1_ckpt)
    s.out = runtime.prepare_out_dir(args.out, resume=args.resume, eval_only=args.eval_only,
                                    is_main=dist.is_main, allow_existing=args.demo)
    if dist.is_main:
        runtime.write_metrics(s.out, dataclasses.asdict(args), key="args")

    if args.eval_only:  # a stage-2 checkpoint evaluates both paths, a stage-1 one the direct path
        net = ICCLDNet(sd.vae, K)
        net.load_state_dict(strip("net_ema", weights))
        net = frozen(net, s)
        has_unet = bool(strip("unet_ema", weights))
        with prec.autocast():
            res = direct = evaluate(s, net.direct, 0, "stage1 direct", pictures=not has_unet)
            if has_unet:
                unet = widen_conv_in(sd.unet)
                unet.load_state_dict(strip("unet_ema", weights))
                unet = frozen(unet, s)
                ddim = DDIMScheduler.from_config(sd.scheduler.config, prediction_type="epsilon",
                                                 clip_sample=False)
                gen, ctx = torch.Generator().manual_seed(args.seed), sd.ctx.to(device)
                sample = lambda x: predict_diffusion(net, unet, ctx, ddim, args.sample_steps, gen, x)  # noqa
                res = evaluate(s, sample, 0, f"stage2 diffusion T={args.sample_steps} (unet_ema)", True)
        return {"miou": res["miou"], "per_class_iou": res["per_class_iou"], "step": 0,
                "miou_direct": direct["miou"], **{k: res[k] for k in ("miou16", "miou13") if k in res}}

    timer = runtime.RunTimer()
    result: dict = {}
    res1 = None
    st_stage = resume_state[1]["stage"] if resume_state else None
    if args.stage in ("1", "both") and st_stage != 2:
        net_ema, res1 = train_stage1(s, resume_state if st_stage == 1 else None)
        result = {"miou": res1.get("miou"), "per_class_iou": res1.get("per_class_iou"), "step": args.iters,
                  "stage": 1, "miou_direct": res1.get("miou")}
        stage1_w = {k: v.detach().float().cpu() for k, v in net_ema.state_dict().items()}
        del net_ema
    if args.stage in ("2", "both"):
        state2 = resume_state if st_stage == 2 else None
        if state2 is not None:
            stage1_w, offset = strip("net_ema", state2[0]), state2[1]["offset"]
        else:
            # stage 2 draws from its own seeded stream and continues the data stream after stage 1's steps, so
            # --stage 2 --stage1-ckpt X reproduces the second half of --stage both bit for bit (tested)
            runtime.seed_everything(args.seed + 1)
            offset = stage1_step
        res2 = train_stage2(s, stage1_w, offset, state2, direct=res1 if st_stage != 2 else None)
        result = {"miou": res2["miou"], "per_class_iou": res2["per_class_iou"], "step": args.iters_stage2,
                  "stage": 2, "miou_direct": res2["miou_direct"], **{k: res2[k] for k in ("miou16", "miou13")
                                                                      if k in res2}}
    timer.tick()
    if dist.is_main:
        print(f"done in {timer.lap() / 1000:.1f} s | peak memory {runtime.peak_memory_gb(device):.2f} GB")
        runtime.write_metrics(s.out, result, key="final")
    return result


if __name__ == "__main__":
    runtime.run_cli(main, Args)
