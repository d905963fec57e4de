"""common/daformer.py: the borrowed DAFormer building blocks, against references written out here."""
import colorsys
import math

import numpy as np
import pytest
import torch

from common import daformer as augment
from common.daformer import DAFormerHead


def test_hsv_matches_colorsys_and_round_trips():
    x = torch.rand(2, 3, 5, 7)
    hsv = augment.rgb_to_hsv(x)
    for b, i, j in ((0, 0, 0), (1, 4, 6), (0, 2, 3)):
        ref = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert hsv[b, :, i, j].tolist() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(augment.hsv_to_rgb(hsv), x, atol=1e-5)


def test_gaussian_blur_kernel_size_and_weights():
    """DAFormer's kernel: k = ceil(0.1 side), minus 1 if even; a normalised Gaussian of the given sigma."""
    side, sigma = 40, 1.0                                   # k = 4 -> 3
    x = torch.zeros(1, 1, side, side)
    x[0, 0, 20, 20] = 1.0
    out = augment.gaussian_blur(x, torch.tensor([sigma]))
    g = np.exp(-0.5 * (np.arange(3) - 1) ** 2 / sigma ** 2)
    g /= g.sum()
    assert torch.allclose(out[0, 0, 19:22, 19:22], torch.tensor(np.outer(g, g), dtype=torch.float32), atol=1e-6)
    assert out.sum().item() == pytest.approx(1.0) and (out[0, 0, :, :19] == 0).all()
    const = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(augment.gaussian_blur(const, torch.tensor([1.1])), const)   # reflect border: no fade
    small = torch.rand(1, 3, 20, 20)                        # k = 2 -> 1: identity
    assert torch.equal(augment.gaussian_blur(small, torch.tensor([1.0])), small)


def test_strong_augment_applies_each_part_when_u_exceeds_p_and_draws_in_order():
    """DAFormer's "p = 0.2" means the jitter is applied when u > 0.2; blur when u > 0.5; draws come from the global
    torch generator: the first two uniforms decide, so the decisions can be predicted from the seed."""
    x = torch.rand(2, 3, 48, 48)
    for seed in range(12):
        torch.manual_seed(seed)
        u_jitter = torch.rand(()).item()
        torch.manual_seed(seed)
        out = augment.strong_augment(x.clone())
        if u_jitter <= 0.2:                                  # no jitter: the next draw decides the blur alone
            torch.manual_seed(seed)
            torch.rand(())
            blurred = torch.rand(()).item() > 0.5
            assert torch.equal(out, x) != blurred
        else:
            assert not torch.equal(out, x) and out.min() >= 0 and out.max() <= 1
    torch.manual_seed(0)
    assert torch.equal(augment.strong_augment(x, jitter_p=1.0, blur_p=1.0), x)   # both off: the identity


def test_colour_jitter_follows_kornia_05_formulas():
    """kornia 0.5.x `ColorJitter(0.2, 0.2, 0.2, 0.2)` (DAFormer's and DIFF's pin; kornia/enhance/adjust.py), per
    pixel with colorsys: brightness x + b; contrast x * c (no blend with the mean); saturation S * f in HSV,
    clamped to [0, 1]; hue H + h turns; b, h ~ U(-0.2, 0.2), c, f ~ U(0.8, 1.2) per image, the four in one
    random order, values clamped to [0, 1] after each. The draws are replayed from the same seed: the jitter
    decision, the permutation, then one factor per image for each op as it runs (blur off)."""
    x = torch.rand(2, 3, 4, 5)
    orders = set()
    for seed in range(6):
        torch.manual_seed(seed)
        assert torch.rand(()).item() > 0.0                          # jitter on (p = 0)
        order = torch.randperm(4).tolist()
        factors = [torch.rand(2) * 0.4 - 0.2 for _ in order]         # U(-s, s) per image, in op order
        orders.add(tuple(order))
        ref = x.permute(0, 2, 3, 1).numpy().astype(np.float64).copy()
        for op, u in zip(order, factors):
            for b in range(2):
                f = float(u[b])
                if op == 0:
                    ref[b] = ref[b] + f
                elif op == 1:
                    ref[b] = ref[b] * (1 + f)
                else:
                    hsv = np.array([[colorsys.rgb_to_hsv(*p) for p in row] for row in ref[b]])
                    if op == 2:
                        hsv[..., 1] = np.clip(hsv[..., 1] * (1 + f), 0, 1)
                    else:
                        hsv[..., 0] = (hsv[..., 0] + f) % 1.0
                    ref[b] = np.array([[colorsys.hsv_to_rgb(*p) for p in row] for row in hsv])
            ref = np.clip(ref, 0, 1)
        torch.manual_seed(seed)
        ours = augment.strong_augment(x.clone(), jitter_p=0.0, blur_p=1.0)
        assert np.allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5), (seed, order)
    assert len(orders) > 3                                           # several orders were exercised


def test_photometric_distortion_draw_order_follows_mmseg():
    """mmseg PhotoMetricDistortion: brightness (p .5, +-32), mode, [contrast], saturation, hue, [contrast];
    the reference below replays the same numpy draws on a float image with colorsys and compares."""
    img = torch.rand(3, 4, 5)

    def reference(rng):
        x = img.permute(1, 2, 0).numpy().astype(np.float64).copy()
        if rng.integers(2):
            x = np.clip(x + rng.uniform(-32, 32) / 255, 0, 1)
        mode = rng.integers(2)

        def contrast(x):
            return np.clip(x * rng.uniform(0.5, 1.5), 0, 1) if rng.integers(2) else x
        if mode:
            x = contrast(x)
        for kind in ("saturation", "hue"):
            if rng.integers(2):
                f = rng.uniform(0.5, 1.5) if kind == "saturation" else rng.integers(-18, 18) / 180
                hsv = np.array([[colorsys.rgb_to_hsv(*p) for p in row] for row in x])
                if kind == "saturation":
                    hsv[..., 1] = np.clip(hsv[..., 1] * f, 0, 1)
                else:
                    hsv[..., 0] = (hsv[..., 0] + f) % 1.0
                x = np.array([[colorsys.hsv_to_rgb(*p) for p in row] for row in hsv])
        if not mode:
            x = contrast(x)
        return np.clip(x, 0, 1).transpose(2, 0, 1)

    for seed in range(16):
        ours = augment.photometric_distortion(img, np.random.default_rng(seed)).numpy()
        assert np.allclose(ours, reference(np.random.default_rng(seed)), atol=1e-5), seed


def test_daformer_head_fuses_at_the_finest_level_with_separable_aspp():
    head = DAFormerHead([8, 16, 32], num_classes=5, channels=16)
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    assert head(feats).shape == (2, 5, 16, 16)
    depthwise = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert sorted(m.dilation[0] for m in depthwise) == [6, 12, 18]       # d = 1 branch is a 1x1 conv
    assert all(m.groups == m.in_channels == 3 * 16 for m in depthwise)
    assert head.bottleneck[0].kernel_size == (3, 3) and head.dropout.p == pytest.approx(0.1)
    assert math.isclose(sum(p.numel() for p in head.embed[0].parameters()), 8 * 16 + 16)
