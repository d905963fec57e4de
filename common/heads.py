"""The DAFormer decode head (Hoyer et al., CVPR 2022, https://arxiv.org/abs/2111.14887), which MADM and DIFF
borrow as their segmentation head: DAFormer's `mmseg/models/decode_heads/daformer_head.py` with the `sep_aspp`
config. It is not a contribution of either paper; each method file says how it feeds the head (MADM: at the
full input resolution from s0, f8, f16, f32; DIFF: at stride 4 from the finecoder's pyramid).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    """mmcv ConvModule(conv, BN, ReLU): bias-free conv, Kaiming-normal (fan_out, relu), BN weight 1 / bias 0."""

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

    Per level a per-pixel Linear C_i -> 256 (no norm, no activation); every level bilinearly resized to the size
    of the first (finest) level; concat; separable ASPP with dilations (1, 6, 12, 18) and no image pooling
    (d = 1: 1x1 conv; else depthwise 3x3 dilated + pointwise 1x1, each conv + BN + ReLU); concat -> 3x3
    bottleneck; Dropout2d(0.1); 1x1 classifier with bias (PyTorch default init, as DAFormer's `init_weights` is
    never called; callers may re-initialise `conv_seg`).

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


__all__ = ["ConvBNReLU", "DAFormerHead"]
