"""The building blocks of DAFormer's training recipe that the four methods borrow; none of them is a
contribution of the four papers, so they live here once instead of being copied into every method file.

DAFormer (Hoyer et al., CVPR 2022, https://arxiv.org/abs/2111.14887) trains with DACS self-training (Tranheden
et al., WACV 2021: an EMA teacher, ClassMix, a strong augmentation of the mixed image) on mmseg's pipeline and
decodes with its context-aware fusion head. MADM and ICCLD take the self-training parts; DIFF is a DAFormer
fork (head, photometric pipeline, schedule); PTDiffSeg and ICCLD use its schedule. Each method file says where
it calls what (its header's paper -> code map); the pieces:

    ema_update, class_mix_masks        mean teacher and ClassMix masks (DAFormer `dacs.py`, `get_class_masks`)
    strong_augment                     DACS colour jitter + Gaussian blur of the mixed image
    photometric_distortion             mmseg `PhotoMetricDistortion` (DIFF's source pipeline)
    ce_all_pixels                      mmseg 0.16's cross-entropy, averaged over all pixels incl. ignored
    poly_warmup_factor                 mmcv `poly` LR policy with linear warm-up (`poly10warm.py`)
    ConvBNReLU, DAFormerHead           the `sep_aspp` decode head (`daformer_head.py`)

Written in torch (kornia, mmcv and OpenCV are not dependencies); every random draw comes from a generator the
caller seeds, so resumed runs repeat.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- Self-training: mean teacher, ClassMix, loss convention, LR schedule ----
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
    """ClassMix masks (Olsson et al. 2021; DAFormer `get_class_masks`): for every source image, half (rounded
    up) of the classes present in the whole batch's source labels are drawn at random, and that image's pixels
    of those classes are pasted. 255 counts as a class, as in the official code. Uses the global (seeded,
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


def ce_all_pixels(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over ALL pixels, ignored ones counting as 0 (mmseg 0.16 / DAFormer / MADM).

    logits (B, K, H, W), y (B, H, W) int64 with 255 = ignore, weight (B, H, W) per-pixel weights or None.
    Dividing by every pixel (not only the valid ones) is what the official code does: images with many ignored
    pixels contribute a smaller loss.
    """
    ce = F.cross_entropy(logits.float(), y, ignore_index=255, reduction="none")  # (B, H, W), 0 where ignored
    if weight is not None:
        ce = ce * weight
    return ce.mean()


def poly_warmup_factor(step: int, total: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """LR multiplier of mmcv's `poly` policy with linear warm-up (DAFormer `poly10warm.py`), per step.

    poly: f = (1 - step / total) ** power (min_lr 0); warm-up for step < warmup_iters multiplies the poly
    value by 1 - (1 - step / warmup_iters) * (1 - warmup_ratio), i.e. it rises linearly from `warmup_ratio`.
    """
    factor = (1.0 - step / total) ** power
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


# ---- Augmentation: DACS strong transform, mmseg PhotoMetricDistortion ----
def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV.

    Args:
        x: float (B, 3, H, W) in [0, 1].
    Returns:
        float (B, 3, H, W): hue as a fraction of a full turn, saturation and value, all in [0, 1].
    """
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    s = torch.where(v > 0, c / v.clamp_min(1e-8), torch.zeros_like(v))
    cc = c.clamp_min(1e-8)
    h = torch.where(v == r, ((g - b) / cc) % 6, torch.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: float (B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (B, 3, H, W)
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with DAFormer's kernel size: k = ceil(0.1 * side), minus 1 if even (51 at 512).

    Args:
        x: float (B, C, H, W).
        sigma: float (B,), one standard deviation per image.
    Returns:
        float (B, C, H, W); reflect padding (kornia's default border).
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
def strong_augment(x: torch.Tensor, jitter_p: float = 0.2, strength: float = 0.2,
                   blur_p: float = 0.5) -> torch.Tensor:
    """DACS strong augmentation of the mixed image (DAFormer `strong_transform`: color_jitter, gaussian_blur).

    The two on/off decisions are drawn once per call ("p = 0.2" means *applied when u > 0.2*, i.e. with
    probability 0.8, exactly as DAFormer's code reads); jitter factors and the blur sigma are drawn per image.
    Colour jitter: kornia 0.5's `ColorJitter(s, s, s, s)` (pinned by DAFormer and DIFF), its formulas by hand
    (`kornia/enhance/adjust.py`, 0.5.x): brightness x + b, b ~ U(-s, s); contrast x * c (OpenCV-style, no
    blend with the mean), c ~ U(1 - s, 1 + s); saturation S * f in HSV, clamped to [0, 1], f ~ U(1 - s,
    1 + s); hue + h turns in HSV, h ~ U(-s, s); one random order for the batch, factors per image, clamped
    to [0, 1] after each. Our draws differ from kornia's (order: decision, permutation, then each op's factor
    when it runs). Blur sigma ~ U(0.15, 1.15).

    Args:
        x: float (B, 3, H, W) in [0, 1].
    Returns:
        float (B, 3, H, W) in [0, 1]. Draws from the global torch CPU generator (seeded and checkpointed by
        the caller).
    """
    B = x.shape[0]
    if torch.rand(()) > jitter_p:
        s = strength
        u = lambda: (torch.rand(B) * 2 * s - s).to(x.device, x.dtype).view(B, 1, 1, 1)  # noqa: E731
        for op in torch.randperm(4).tolist():
            if op == 0:  # brightness
                x = x + u()
            elif op == 1:  # contrast: x c (kornia adjust_contrast)
                x = x * (1 + u())
            elif op == 2:  # saturation: S f in HSV, S clamped to [0, 1] (kornia adjust_saturation)
                hsv = rgb_to_hsv(x)
                x = hsv_to_rgb(torch.cat([hsv[:, :1], (hsv[:, 1:2] * (1 + u())).clamp(0, 1), hsv[:, 2:]], 1))
            else:  # hue: H + h turns (kornia adjust_hue, in radians there)
                hsv = rgb_to_hsv(x)
                hsv = torch.cat([(hsv[:, :1] + u()) % 1.0, hsv[:, 1:]], 1)
                x = hsv_to_rgb(hsv)
            x = x.clamp(0, 1)
    if torch.rand(()) > blur_p:
        sigma = (0.15 + torch.rand(B)).to(x.device, x.dtype)
        x = gaussian_blur(x, sigma)
    return x


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg `PhotoMetricDistortion` on one image, same draws in the same order.

    brightness +-32/255 (p 0.5); contrast x U(0.5, 1.5) (p 0.5) first or last at random; saturation
    x U(0.5, 1.5) (p 0.5); hue + randint(-18, 18) on OpenCV's 0-180 scale (p 0.5); clipped after each op
    (mmseg works on uint8-range floats and truncates; we stay in float).

    Args:
        img: float (3, H, W) in [0, 1].
        rng: the only source of randomness.
    Returns:
        float (3, H, W) in [0, 1].
    """
    x = img[None]                                                            # (1, 3, H, W)
    if rng.integers(2):
        x = (x + rng.uniform(-32, 32) / 255).clamp(0, 1)
    for op in ("contrast", "saturation", "hue") if rng.integers(2) else ("saturation", "hue", "contrast"):
        if not rng.integers(2):
            continue
        if op == "contrast":
            x = (x * rng.uniform(0.5, 1.5)).clamp(0, 1)
            continue
        h, s, v = rgb_to_hsv(x).unbind(1)
        if op == "saturation":
            s = (s * rng.uniform(0.5, 1.5)).clamp(0, 1)
        else:  # numpy randint(-18, 18) as in mmseg: the upper bound is exclusive
            h = (h + rng.integers(-18, 18) / 180) % 1.0
        x = hsv_to_rgb(torch.stack([h, s, v], 1))
    return x[0].clamp(0, 1)


# ---- The DAFormer head (sep_aspp) ----
class ConvBNReLU(nn.Sequential):
    """mmcv ConvModule(conv, BN, ReLU): bias-free conv, Kaiming normal (fan_out), BN weight 1, bias 0."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, dilation: int = 1, groups: int = 1):
        conv = nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                         bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        bn = nn.BatchNorm2d(c_out)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn, nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """DAFormer context-aware fusion head (Hoyer et al. 2022, `daformer_head.py`, config `sep_aspp`).

    Per level a per-pixel Linear C_i -> 256 (no norm, no activation); every level bilinearly resized to the
    size of the first (finest) level; concat; separable ASPP with dilations (1, 6, 12, 18), no image pooling
    (d = 1: 1x1 conv; else depthwise 3x3 dilated + pointwise 1x1, each conv + BN + ReLU); concat -> 3x3
    bottleneck; Dropout2d(0.1); 1x1 classifier with bias (PyTorch default init, as DAFormer's `init_weights`
    is never called; callers may re-initialise `conv_seg`).

    forward(feats: list of (B, C_i, H_i, W_i), finest first) -> logits (B, K, H_0, W_0).
    """

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 256,
                 dilations: tuple[int, ...] = (1, 6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        c_cat = channels * len(in_channels)
        self.aspp = nn.ModuleList(
            ConvBNReLU(c_cat, channels, 1) if d == 1 else
            nn.Sequential(ConvBNReLU(c_cat, c_cat, 3, dilation=d, groups=c_cat),  # depthwise, dilated
                          ConvBNReLU(c_cat, channels, 1))                      # pointwise
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


__all__ = ["ema_update", "class_mix_masks", "ce_all_pixels", "poly_warmup_factor", "strong_augment",
           "photometric_distortion", "gaussian_blur", "rgb_to_hsv", "hsv_to_rgb", "ConvBNReLU",
           "DAFormerHead"]
