"""Photometric image augmentations the methods borrow; none is a contribution of the four papers.

`strong_augment` is DACS's strong transform of the ClassMix image (colour jitter + Gaussian blur, as DAFormer's
`strong_transform` configures it), used by MADM and ICCLD; `photometric_distortion` is mmseg's
`PhotoMetricDistortion` of the training pipeline, used by DIFF. Both are written in torch (kornia and OpenCV are not
dependencies), on float images in [0, 1], and draw from the generator the caller seeds, so resumed runs repeat.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
    """DACS strong augmentation of the mixed image (DAFormer `strong_transform`: color_jitter + gaussian_blur).

    The two on/off decisions are drawn once per call ("p = 0.2" means *applied when u > 0.2*, i.e. with
    probability 0.8, exactly as DAFormer's code reads); jitter factors and the blur sigma are drawn per image.
    Colour jitter (kornia's in DAFormer; ours by hand): brightness additive U(-s, s), contrast and saturation
    factors U(1 - s, 1 + s) (blends with the grey mean / the grey image, as torchvision), hue shift U(-s, s) of a
    full turn; the four in random order, clamped to [0, 1] after each. Blur sigma ~ U(0.15, 1.15).

    Args:
        x: float (B, 3, H, W) in [0, 1].
    Returns:
        float (B, 3, H, W) in [0, 1]. Draws from the global torch CPU generator (seeded and checkpointed by the
        caller).
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


__all__ = ["strong_augment", "photometric_distortion", "gaussian_blur", "rgb_to_hsv", "hsv_to_rgb"]
