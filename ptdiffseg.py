"""PTDiffSeg: prompting a frozen diffusion backbone for cross-domain semantic segmentation.

R. Gong et al., "Prompting Diffusion Representations for Cross-Domain Semantic Segmentation", BMVC 2024,
https://arxiv.org/abs/2307.02138. No code is public: this is the first implementation. [paper] = the abstract; [TADP] =
Kondapaneni et al., arXiv 2310.00031 (PTDiffSeg: §2.3, §3, §4.1, Table 4); [VPD code] = wl-zhao/VPD, its base.

Idea. A frozen Stable Diffusion UNet, run once at t = 1 on the clean latent (VPD), is a domain-general feature extractor
[paper]. Its cross-attention context is a *prompt*: a token per class (text embeddings refined by a TextAdapter) and a
*scene token* ("an urban street scene at night"). Only the adapter and a semantic-FPN head are trained, on the source;
prompt randomization draws K_s = 2 scene prompts per image and a KL consistency loss asks for the same prediction under
each [paper, TADP]. At test time (TTDA) only the scene token is tuned, on confident pseudo labels.

Paper -> code
    frozen diffusion backbone, VPD-style (TADP §2.3; VPD code) .... FrozenSD (latent, UNet at t = 1, hooks)
    class prompt: an embedding for every class (TADP §2.3) ........ class_embeddings, TextAdapter
    scene prompt (abstract) ........................................ SCENE_PROMPTS, prompt_embeddings
    class-token cross-attention maps (VPD code) .................... FrozenSD.features (AttentionStore)
    segmentation head (VPD config: semantic FPN) ................... FPN, SemanticFPNHead
    prompt randomization + consistency loss (abstract; TADP §2.3) .. scene_prompt_indices, consistency_loss
    joint loss, one training step (abstract) ....................... segmentation_loss, train_step
    test-time domain adaptation of the scene prompt (abstract) ..... ttda_loss, ttda_step, ttda

Deviations ([our choice] unless marked; the paper gives no code, the VPD code is what we build on)
    - Class tokens from SD's own text encoder, tokens its cross-attention knows (VPD: CLIP ViT-L/14, projected): 80 CLIP
      templates averaged, pooled EOS; context = [scene, K class tokens]. Latent = VAE mode x 0.18215 (TADP §4.1; VPD
      omits it, fine-tuning its UNet: `--no-latent-scale`); [VPD code] t = 1, no noise (VPD issues #27, #28).
    - 12 scene sentences (token = pooled EOS); K_s = 2 distinct per image and step; prompt 0 at evaluation and as the
      TTDA start. Consistency = mean_k KL(p_k || sg(mean_k p_k)) at stride 8, weight 1.
    - Attention maps of every attn2 in down_blocks 1, 2 and up_blocks 1, 2, head- and layer-averaged per stride 16 / 32
      (VPD: maps with <= 32^2 queries at 512). FPN + semantic-FPN head written out (no mmseg).
    - DAFormer DG schedule on one GPU: AdamW, head lr 6e-4, adapter 6e-5, 1500 warm-up steps, poly 1.0, 40k steps,
      batch 2, crop 512 (VPD: lr 8e-5, 80k, batch 16 on 8 GPUs); GTA5 crops with cat_max_ratio 0.75.
    - wd 0.01 on weights, biases, gamma (DAFormer's AdamW: no bias multiplier); wd 0 on the head's BatchNorm, usual for
      norms (DAFormer's `norm=dict(decay_mult=0.0)` is for MiT only and, by mmcv name matching, misses ConvModule `bn`).
    - CE averaged over valid pixels (scale independent of the ignored share); mmseg / VPD: all pixels (`ce_all_pixels`).
    - Evaluation: mmseg-style sliding window (--crop-size, stride 341) over the eval-resized image.
    - TTDA: target train crops (labels never read); pseudo labels of the frozen prompt-0 model where p_max >= 0.9; CE
      on kept pixels; AdamW lr 1e-3, wd 0, 1000 steps; offline, no entropy term, not resumable.
    - Autograd runs through the frozen UNet (the adapter's gradient path); an image's K_s prompts share z.
    - `--baseline` = the paper's first table row as we read it: scene prompt 0 only; no randomization, L_cons or TTDA.

Commands (more in README.md: --baseline, --eval-only --ttda --ckpt, --grad-checkpointing, --estimate-memory)
    python ptdiffseg.py --src gta5 --tgt cityscapes,bdd100k,mapillary          # DG training, paper setting
    python ptdiffseg.py --demo  # CPU, mini SD, synthetic data; demo-only settings: lr x10, TTDA p_max >= 0.5
"""
from __future__ import annotations

import gc
import hashlib
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import datasets as cd, metrics, runs, synthetic
from common.cli import UserError, check_common_flags, log, replace_defaults, run_cli
from common.daformer import poly_warmup_factor
from common.sd_backbone import AttentionStore, FeatureCapture, encode_prompts, load_sd, to_dtype, vae_encode


@dataclass
class Args:
    # ---- experiment / infrastructure ----
    out: Optional[str] = None  # run folder; default runs/ptdiffseg-<src>-<tgt>
    seed: int = 0  # seeds Python, NumPy, torch and the data streams (our choice)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast of the trained parts, storage of the frozen SD (fp32:
                             # all fp32)
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS, same-seed runs bit-identical on one GPU model
                                 # (slower)
    grad_checkpointing: bool = False  # recompute the frozen UNet's activations in backward: less memory, same gradients
                                      # (our choice)
    resume: bool = False  # continue from the latest checkpoint in --out
    eval_only: bool = False  # only evaluate --ckpt (optionally after --ttda)
    ckpt: Optional[str] = None  # checkpoint folder for --eval-only / --predict
    predict: Optional[str] = None  # folder of images -> <out>/predictions/<stem>_color.png, _trainId.png (needs --ckpt;
                                   # --ttda: also in ttda/)
    ckpt_every: int = 4000  # steps between checkpoints (our choice)
    keep_ckpts: int = 3  # how many checkpoints to keep (our choice)
    log_every: int = 50  # steps between log lines (our choice)
    eval_every: int = 4000  # steps between evaluations (our choice)
    profile: int = 0  # time N training iterations and print one JSON line, then exit
    estimate_memory: bool = False  # one JSON line: peak GPU memory of one step of this command, from shapes alone (no
                                   # GPU; benchmarks/measure.py)
    demo: bool = False  # mini SD (pretrained on the synthetic world) + synthetic sample + short schedule, minutes on a
                        # CPU
    # ---- data ----
    src: str = "gta5"  # source dataset, trained on alone (paper: synthetic-to-real DG)
    tgt: str = "cityscapes"  # target(s), comma-separated, one class set, scored one by one (paper: DG protocol);
                             # folder:PATH for own images
    data_root: str = "data"  # where datasets live
    batch_size: int = 2  # source crops per step, also the TTDA batch (VPD: 2 per GPU)
    crop_size: int = 512  # training crop and sliding-window size, a multiple of 64 (VPD: 512)
    # ---- backbone ----
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or folder; mini = pretrained miniature, tiny
                                                                   # / random-sd15 = random weights (VPD: SD v1-5)
    timestep: int = 1  # the one UNet pass, no noise (VPD code; VPD issue #27)
    latent_scale: bool = True  # multiply the latent by 0.18215 (our choice; TADP §4.1; off = VPD)
    # ---- method ----
    baseline: bool = False  # the paper's baseline row: scene prompt 0 only, no randomization, no consistency loss, no
                            # TTDA
    scene_prompts_per_image: int = 2  # K_s distinct scene prompts per image and step (our choice)
    consistency_weight: float = 1.0  # lambda_cons of the KL consistency loss (our choice)
    adapter_gamma_init: float = 1e-4  # initial gamma of the TextAdapter (VPD code vpd/models.py TextAdapter)
    # ---- optimisation ----
    iters: int = 40000  # optimizer steps (our choice, DAFormer schedule)
    lr: float = 6e-4  # FPN + head learning rate (our choice, DAFormer convention)
    adapter_lr: float = 6e-5  # TextAdapter learning rate, 0.1 x head (our choice, DAFormer convention)
    weight_decay: float = 0.01  # AdamW weight decay (DAFormer adamw.py), 0 on the head's norm layers (our choice)
    warmup_iters: int = 1500  # linear warm-up from ratio 1e-6, then poly power 1.0 (DAFormer poly10warm.py)
    # ---- evaluation, test-time domain adaptation ----
    eval_stride: int = 341  # sliding-window stride; the window is --crop-size (our choice: 2/3 overlap at 512)
    ttda: bool = False  # learn the scene prompt on the unlabeled target, report mIoU before/after (paper)
    ttda_steps: int = 1000  # TTDA optimizer steps (our choice)
    ttda_lr: float = 1e-3  # TTDA AdamW learning rate, wd 0, constant (our choice)
    ttda_threshold: float = 0.9  # keep pseudo-labelled pixels with p_max >= this (our choice)


# ---- Prompts: the class prompt (an embedding for every class) and scene prompts (TADP §2.3; abstract) ----
# The 80 CLIP ImageNet templates + "." (CLIP Prompt_Engineering_for_ImageNet.ipynb, VPD dump_nyu_text_embeddings.py)
TEMPLATES = tuple(f"{t}." for t in """a bad photo of a {}|a photo of many {}|a sculpture of a {}|
a photo of the hard to see {}|a low resolution photo of the {}|a rendering of a {}|graffiti of a {}|
a bad photo of the {}|a cropped photo of the {}|a tattoo of a {}|the embroidered {}|a photo of a hard to see {}|
a bright photo of a {}|a photo of a clean {}|a photo of a dirty {}|a dark photo of the {}|a drawing of a {}|
a photo of my {}|the plastic {}|a photo of the cool {}|a close-up photo of a {}|a black and white photo of the {}|
a painting of the {}|a painting of a {}|a pixelated photo of the {}|a sculpture of the {}|a bright photo of the {}|
a cropped photo of a {}|a plastic {}|a photo of the dirty {}|a jpeg corrupted photo of a {}|a blurry photo of the {}|
a photo of the {}|a good photo of the {}|a rendering of the {}|a {} in a video game|a photo of one {}|a doodle of a {}|
a close-up photo of the {}|a photo of a {}|the origami {}|the {} in a video game|a sketch of a {}|a doodle of the {}|
a origami {}|a low resolution photo of a {}|the toy {}|a rendition of the {}|a photo of the clean {}|
a photo of a large {}|a rendition of a {}|a photo of a nice {}|a photo of a weird {}|a blurry photo of a {}|
a cartoon {}|art of a {}|a sketch of the {}|a embroidered {}|a pixelated photo of a {}|itap of the {}|
a jpeg corrupted photo of the {}|a good photo of a {}|a plushie {}|a photo of the nice {}|a photo of the small {}|
a photo of the weird {}|the cartoon {}|art of the {}|a drawing of the {}|a photo of the large {}|
a black and white photo of a {}|the plushie {}|a dark photo of a {}|itap of a {}|graffiti of the {}|a toy {}|
itap of my {}|a photo of a cool {}|a photo of a small {}|a tattoo of the {}""".replace("\n", "").split("|"))

# [our choice] Prompt 0 neutral, 11 empty; the rest name weather, light or style: one image, several "domain" views.
_S = "an urban street scene"
SCENE_PROMPTS = (f"a photo of {_S}", *(f"a photo of {_S} {w}" for w in ("on a sunny day", "at night", "in heavy rain",
                 "in dense fog", "in snow", "at dusk")), f"a rendering of {_S} in a video game",
                 f"a photorealistic photo of {_S}", f"a dashcam photo of {_S}", f"a painting of {_S}", "")


@torch.no_grad()
def class_embeddings(tokenizer, text_encoder, class_names: tuple[str, ...]) -> torch.Tensor:
    """Class prompt [TADP, VPD code; encoder our choice]: c_k = mean_t pooled_EOS(template_t(name_k)) over the 80
    templates (77 tokens; pooled = final-LayerNorm state at the 1st EOS), not normalised -> (K, d) fp32, in id order."""
    return torch.stack([encode_prompts(tokenizer, text_encoder, [t.format(n) for t in TEMPLATES], pooled=True)
                        .float().mean(0) for n in class_names])  # (K, d); one batch of 80 per class


def prompt_embeddings(sd_model: str, class_names: tuple[str, ...], cache_dir: Path,
                      write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(class (K, d), scene (P, d)); cached in the run folder, keyed by (model, classes, templates, pool)."""
    if (path := prompt_cache(cache_dir, sd_model, class_names)).is_file():  # a hit: no text encoder at all
        log(f"prompt embeddings: read from cache {path}")
        return tuple(load_file(str(path))[k] for k in ("class", "scene"))
    text = load_sd(sd_model, parts=("text_encoder", "tokenizer"))  # a miss: SD's own text tower
    c = class_embeddings(text.tokenizer, text.text_encoder, class_names)                   # (K, d)
    s = encode_prompts(text.tokenizer, text.text_encoder, SCENE_PROMPTS, pooled=True).float()  # (P, d)
    del text  # free the text encoder (~0.5 GB for SD 1.x): only its outputs are needed from here on
    gc.collect()  # any reference cycles go now: nothing of it lingers through training
    save_prompt_cache(cache_dir, sd_model, class_names, c, s) if write else None  # train(): once --out is ours
    return c, s


def prompt_cache(cache_dir: Path, sd_model: str, class_names: tuple[str, ...]) -> Path:
    key = json.dumps([sd_model, list(class_names), list(TEMPLATES), list(SCENE_PROMPTS)])
    return Path(cache_dir) / f"prompt_embeddings-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def save_prompt_cache(cache_dir: Path, sd_model: str, class_names: tuple, c: torch.Tensor, s: torch.Tensor) -> None:
    if not (path := prompt_cache(cache_dir, sd_model, class_names)).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"class": c.cpu().contiguous(), "scene": s.cpu().contiguous()}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)  # atomic: a killed run never leaves half a cache file
        log(f"prompt embeddings: {len(c)} classes x 80 templates + scene prompts -> {path}")


class TextAdapter(nn.Module):
    """VPD's TextAdapter (vpd/models.py) on class tokens: c' = c + gamma * MLP(c), MLP = Linear -> GELU -> Linear."""

    def __init__(self, d: int, gamma_init: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # PyTorch default init (VPD)
        self.gamma = nn.Parameter(torch.full((d,), gamma_init))  # (d,), 1e-4: starts as the identity (tokens SD knows)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c + self.gamma * self.fc(c)                                                 # (K, d)


# ---- Frozen SD backbone, VPD-style: latent, one UNet pass at t = 1, hooked features + attention maps ----
# [VPD code; diffusers mapping ours] The module read at each image stride, at crop 512: F64 1280 @ 8^2 = LDM
# output_blocks[1], F32 1280 @ 16^2 = [4], F16 640 @ 32^2 = [7], F8 320 @ 64^2 = last block, before norm_out.
FEATURE_MODULES = {8: "up_blocks.3", 16: "up_blocks.2.attentions.1", 32: "up_blocks.1.attentions.1",
                   64: "up_blocks.0.resnets.1"}
# [VPD code: attn_selector 'up_cross+down_cross'] The blocks whose cross-attention probabilities are kept.
ATTENTION_BLOCKS = {"down_blocks.1.": 16, "down_blocks.2.": 32, "up_blocks.1.": 32, "up_blocks.2.": 16}


class FrozenSD:
    """Frozen VAE encoder + UNet, in `dtype`, never saved; ATTENTION_BLOCKS' attn2 keep P = softmax(Q K^T / sqrt(d))."""

    def __init__(self, unet, vae, timestep: int, latent_scale: bool, grad_checkpointing: bool = False, dtype=None):
        if dtype not in (None, unet.dtype):  # autocast never touches frozen weights: storage = compute dtype
            to_dtype(unet, dtype), to_dtype(vae, dtype)
        self.unet, self.vae, self.timestep, self.latent_scale = unet, vae, timestep, latent_scale
        self.store = AttentionStore(unet, select=lambda name: name.startswith(tuple(ATTENTION_BLOCKS)))
        unet.enable_gradient_checkpointing() if grad_checkpointing else None  # recompute in backward: memory for time
        self.channels = list(unet.config.block_out_channels)  # SD 1.x (320, 640, 1280, 1280) at strides 8..64
        self.d = unet.config.cross_attention_dim  # 768 for SD 1.x

    @classmethod
    def load(cls, args: "Args", device: torch.device, dtype: torch.dtype) -> "FrozenSD":
        sd = load_sd(args.sd_model, parts=("unet", "vae"), device=device)  # text encoder: on cache misses
        return cls(sd.unet, sd.vae, args.timestep, args.latent_scale, args.grad_checkpointing, dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z = mode(E(x)) * 0.18215, never a sample (/ 0.18215 again: VPD)."""
        z = vae_encode(self.vae, x)                                                        # (B, 4, H/8, W/8)
        return z if self.latent_scale else z / self.vae.config.scaling_factor  # VPD: unscaled

    def features(self, z: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """One UNet pass at t = timestep, no noise: z (B, 4, h, w), context (B, 1 + K, d) = [scene, class tokens] ->
        [F8, F16 ++ A16, F32 ++ A32, F64] fp32. Gradients (caller's autograd) reach the context, never UNet weights."""
        B, _, h, w = z.shape  # h, w = H/8, W/8
        t = torch.full((B,), self.timestep, device=z.device, dtype=torch.long)               # (B,) all t = 1
        self.store.clear()  # the maps of this pass only
        with FeatureCapture(self.unet, list(FEATURE_MODULES.values())) as cap:  # forward hooks
            # The UNet's own output (noise prediction) is unused; its last layers (norm + 3x3 conv) are cheap.
            self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=context.to(self.unet.dtype))
            feats = {s: cap.features[name].float() for s, name in FEATURE_MODULES.items()}  # s: (B, C_s, ...)
        # Cross-attention maps [VPD code], head-averaged: (B, hs*ws, 1 + K) per layer; class columns 1..K -> channels.
        out = [feats[8]]                                                                   # (B, C8, h, w)
        for stride in (16, 32):  # maps only at the two middle strides (VPD)
            layers = [p for name, p in self.store.maps.items()  # the layers of this stride
                      if ATTENTION_BLOCKS[next(b for b in ATTENTION_BLOCKS if name.startswith(b))] == stride]
            P = torch.stack(layers).mean(0).float()                                        # (B, hs*ws, 1 + K)
            A = P[:, :, 1:].transpose(1, 2).reshape(B, -1, h * 8 // stride, w * 8 // stride)  # (B, K, hs, ws)
            out.append(torch.cat([feats[stride], A], 1))                                # (B, C_s + K, hs, ws)
        return out + [feats[64]]                                                          # (B, C64, h/8, w/8)


# ---- Neck + head: FPN and semantic-FPN head (VPD config fpn_vpd_sd1-5_512x512_gpu8x2.py; mmseg) ---------
class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017; mmseg FPN, no norm): lateral 1x1 -> 256, top-down nearest x2 + add, 3x3 out."""

    def __init__(self, in_channels: list[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)  # default init (ours)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:  # (B, C_l, H/s_l, W/s_l), s_l = 8 .. 64
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]                           # (B, 256, h_l, w_l)
        for i in range(len(lat) - 1, 0, -1):  # coarse to fine: add the upsampled coarser level
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]                            # (B, 256, h_l, w_l)


class SemanticFPNHead(nn.Module):
    """Semantic FPN head (Kirillov et al. 2019; mmseg FPNHead): level l: max(1, log2(s_l / 8)) x [3x3 conv -> 128, BN,
    ReLU, bilinear x2 while coarser than stride 8]; levels summed, Dropout2d(0.1), 1x1 conv -> (B, K, H/8, W/8)."""

    def __init__(self, num_classes: int, strides=(8, 16, 32, 64), in_ch: int = 256, channels: int = 128):
        super().__init__()
        self.scale_heads = nn.ModuleList()  # one branch per FPN level
        for s in strides:
            blocks = []
            for k in range(max(1, int(math.log2(s / strides[0])))):  # stride 64: 3 blocks, 3 upsamplings
                conv = nn.Conv2d(in_ch if k == 0 else channels, channels, 3, padding=1, bias=False)  # + BN
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule
                blocks += [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]  # ConvModule order
                blocks += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)] if s != strides[0] else []
            self.scale_heads.append(nn.Sequential(*blocks))  # level l -> (B, 128, H/8, W/8)
        self.dropout, self.conv_seg = nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1)  # mmseg; 1x1 -> K logits

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.scale_heads[0](feats[0])                                                 # (B, 128, H/8, W/8)
        for head, f in zip(self.scale_heads[1:], feats[1:]):  # coarser levels, at stride 8, summed
            x = x + F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(x))                                              # (B, K, H/8, W/8)


class PTDiffSeg(nn.Module):
    """Trained: TextAdapter + FPN + head (the checkpoint, a few MB); prompt embeddings: non-persistent buffers."""

    def __init__(self, class_emb: torch.Tensor, scene_emb: torch.Tensor, feat_channels: list[int], gamma_init: float):
        super().__init__()
        K, d = class_emb.shape  # K classes; d = 768 for SD 1.x
        self.register_buffer("class_emb", class_emb.float().clone(), persistent=False)    # (K, d)
        self.register_buffer("scene_pool", scene_emb.float().clone(), persistent=False)   # (P, d)
        self.adapter = TextAdapter(d, gamma_init)  # trained at lr 6e-5
        c8, c16, c32, c64 = feat_channels  # the maps add K channels at 16 and 32; the scene column is dropped
        self.neck, self.head = FPN([c8, c16 + K, c32 + K, c64]), SemanticFPNHead(K)  # trained at lr 6e-4

    def context(self, scene: torch.Tensor) -> torch.Tensor:
        """scene (B, d) -> context (B, 1 + K, d) = [scene token, adapter(class tokens)], scene token first."""
        c = self.adapter(self.class_emb)                                                   # (K, d)
        return torch.cat([scene[:, None], c[None].expand(scene.shape[0], -1, -1)], 1)      # (B, 1 + K, d)

    def forward(self, sd: FrozenSD, z: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w) latents, scene (B, d) scene tokens -> logits (B, K, h, w) at image stride 8."""
        return self.head(self.neck(sd.features(z, self.context(scene))))  # (B, K, h, w)


# ---- Prompt randomization and the losses (abstract: joint segmentation + consistency loss; TADP §2.3) ---
def scene_prompt_indices(args: Args, step: int, start: int) -> torch.Tensor:
    """(B, K_s): K_s distinct prompts per image, a pure function of (seed, step, start + i); `--baseline`: prompt 0."""
    if args.baseline:
        return torch.zeros(args.batch_size, 1, dtype=torch.long)                          # (B, 1) prompt 0
    rows = [np.random.default_rng([args.seed, 7, step, start + i]).choice(  # stateless: resume, DDP ranks
        len(SCENE_PROMPTS), size=args.scene_prompts_per_image, replace=False) for i in range(args.batch_size)]
    return torch.as_tensor(np.stack(rows))                                                 # (B, K_s)


def segmentation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_seg = (1/K_s) sum_k CE(up(logits_k), y) on valid pixels: logits (B, K_s, K, h, w) at stride 8, y (B, H, W)."""
    B, Ks, K, h, w = logits.shape  # the K_s prompts of an image share its label: mean over (prompt, pixel)
    up = F.interpolate(logits.flatten(0, 1).float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
    y = y.repeat_interleave(Ks, 0)                                                         # (B * K_s, H, W)
    ce = F.cross_entropy(up, y, ignore_index=255, reduction="sum")                        # sum over pixels
    return ce / (y != 255).sum().clamp_min(1)  # an all-ignore crop gives 0, not NaN


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_cons = (1/K_s) sum_k mean_pixels KL(p_k || sg(p_bar)), p_bar = (1/K_s) sum_k p_k [our choice]; logits (B, K_s,
    K, h, w) at stride 8, p_k = softmax over classes; 0 iff all K_s predictions agree. sg changes no gradient (dL /
    dlog p_bar_c = -p_bar_c, sum_c dp_bar_c = 0), it spares the backward through the mean; no prompt is a teacher."""
    Ks = logits.shape[1]  # K_s >= 2 prompts per image
    logp = F.log_softmax(logits.float(), dim=2)                                            # (B, K_s, K, h, w)
    logp_bar = (torch.logsumexp(logp, dim=1, keepdim=True) - math.log(Ks)).detach()    # log p_bar (B,1,K,h,w)
    return (logp.exp() * (logp - logp_bar)).sum(2).mean()  # KL summed over classes, mean over k and pixels


def ttda_loss(logits: torch.Tensor, logits_src: torch.Tensor, size: tuple[int, int],
              threshold: float) -> tuple[Optional[torch.Tensor], float]:
    """TTDA loss [paper; form ours]: CE(up(logits), y_hat) where max p_src >= threshold, y_hat = argmax p_src, p_src =
    softmax(up(logits_src)) (prompt 0, frozen); logits* (B, K, h, w), up to size (H, W) -> (loss | None, kept share)."""
    with torch.no_grad():  # the pseudo labels are constants
        p = F.interpolate(logits_src.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
        conf, y_hat = p.max(1)                                                             # (B, H, W)
        y_hat[conf < threshold] = 255                                                  # unsure: ignored
        kept = int((y_hat != 255).sum())  # confident pixels of the whole batch
    if kept == 0:
        return None, 0.0
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)    # (B, K, H, W)
    return F.cross_entropy(up, y_hat, ignore_index=255, reduction="sum") / kept, kept / y_hat.numel()


# ---- Optimizer (DAFormer adamw.py, poly10warm.py); the METHOD STEPs: source training, TTDA of the scene token ----
def make_optimizer(model: PTDiffSeg, args: Args) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999): head weights + biases, head norms (wd 0: header), adapter; `base_lr`: the schedule's"""
    norms, decay, no_decay = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm), [], []  # any head norm
    for m in [*model.neck.modules(), *model.head.modules()]:  # by layer type
        (no_decay if isinstance(m, norms) else decay).extend(m.parameters(recurse=False))
    groups = [(decay, args.lr, args.weight_decay), (no_decay, args.lr, 0.0),  # (params, lr, wd)
              (list(model.adapter.parameters()), args.adapter_lr, args.weight_decay)]
    return torch.optim.AdamW([dict(params=p, lr=lr, base_lr=lr, weight_decay=wd) for p, lr, wd in groups])


def train_step(net: nn.Module, sd: FrozenSD, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
               y: torch.Tensor, scene_idx: torch.Tensor, step: int, args: Args, precision: Precision) -> dict:
    """One step of L = L_seg + lambda_cons * L_cons; x (B, 3, H, W) in [-1, 1], y (B, H, W), scene_idx (B, K_s)."""
    pool = getattr(net, "module", net).scene_pool  # (P, d) scene tokens of the PTDiffSeg (inside DDP or not)
    # ---------- METHOD STEP BEGIN ----------
    factor = poly_warmup_factor(step, args.iters, args.warmup_iters, 1e-6, 1.0)  # linear warm-up, then poly
    for g in opt.param_groups:  # every group keeps its own base LR (head 6e-4, adapter 6e-5)
        g["lr"] = g["base_lr"] * factor
    B, Ks = scene_idx.shape  # B images, K_s prompts each
    # VAE encode once per image under no_grad; the K_s prompts of an image share its latent.
    z = sd.encode(x)                                                                       # (B, 4, H/8, W/8)
    z = z.repeat_interleave(Ks, 0)                                                         # (B*K_s, 4, h, w)
    # Prompt randomization: row i*K_s + k is image i with its k-th prompt, all rows in ONE UNet call.
    scene = pool[scene_idx.flatten().to(x.device)]                                          # (B*K_s, d)
    with precision.autocast():  # trained parts autocast; the UNet runs in its storage dtype
        logits = net(sd, z, scene)                                                          # (B*K_s, K, h, w)
    logits = logits.float().view(B, Ks, *logits.shape[1:])                                 # (B, K_s, K, h, w)
    loss_ce = segmentation_loss(logits, y)  # (1/K_s) sum_k CE_k over the valid pixels
    # With one prompt (--baseline) there is nothing to be consistent with: the term is absent, not computed.
    loss_cons = consistency_loss(logits) if Ks > 1 else torch.zeros((), device=x.device)
    loss = loss_ce + args.consistency_weight * loss_cons                                   # joint loss
    runs.check_finite(loss, step, args.out)  # one-line error; the last checkpoint stays
    opt.zero_grad(set_to_none=True)  # this step's gradients only
    scaler.scale(loss).backward()  # reaches the adapter through the frozen UNet's cross-attention
    scaler.step(opt)  # unscales first; skips the update if fp16 gradients overflowed
    scaler.update()  # fp16: grow or shrink the loss scale
    # ---------- METHOD STEP END ----------
    return {"loss_ce": loss_ce.item(), "loss_cons": loss_cons.item(), "lr": opt.param_groups[0]["lr"]}


def ttda_step(model: PTDiffSeg, sd: FrozenSD, s: nn.Parameter, s0: torch.Tensor, opt: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, x: torch.Tensor, step: int, threshold: float,
              precision: Precision, dist: Dist) -> dict:
    """Target crops x (B, 3, H, W): CE of logits(s) on prompt 0's (s0) confident pseudo labels -> loss, kept, stepped"""
    B = x.shape[0]  # `model` is in eval mode with requires_grad off; `opt` holds s only
    # ---------- METHOD STEP BEGIN ----------
    z = sd.encode(x)                                                                       # (B, 4, h, w)
    with torch.no_grad(), precision.autocast():  # pseudo labels: the frozen model with prompt 0
        logits_src = model(sd, z, s0.expand(B, -1))                                         # (B, K, h, w)
    with precision.autocast():  # the gradient reaches s through the frozen UNet's cross-attention
        logits = model(sd, z, s.expand(B, -1))                                              # (B, K, h, w)
    loss, kept = ttda_loss(logits, logits_src, tuple(x.shape[-2:]), threshold)  # None: nothing kept
    opt.zero_grad()  # this step's gradient only (None: the DDP branch below makes zeros)
    if loss is not None:
        runs.check_finite(loss, step)
        scaler.scale(loss).backward()  # fp16: scaled as in training (a half-precision backward via the UNet)
    any_kept = torch.tensor([float(loss is not None)], device=x.device)  # did this process keep any?
    if dist.world > 1:  # s lives outside any DDP module: average its gradient over processes by hand
        s.grad = s.grad if s.grad is not None else torch.zeros_like(s)
        dist.all_reduce_sum(any_kept)
        dist.all_reduce_sum(s.grad)
        s.grad /= dist.world  # sum -> mean
    stepped = any_kept.item() > 0  # no confident pixel on any process: skip (it counts toward --ttda-steps)
    if stepped:
        scaler.step(opt)
        scaler.update()  # only after a real step (its inf check)
    # ---------- METHOD STEP END ----------
    return {"loss_ttda": loss.item() if loss is not None else 0.0, "kept": kept, "stepped": float(stepped)}


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


# ---- Setup (plumbing): arguments, datasets, what `train` builds once (Run: evaluation and TTDA read it) ---
def check_args(args: Args) -> int:
    """The shared checks plus PTDiffSeg's own, before anything is built or written; returns K."""
    check_common_flags(args, crop_multiple=64)  # the UNet halves the latent (crop / 8) three times
    if not 1 <= args.scene_prompts_per_image <= len(SCENE_PROMPTS):
        raise UserError(f"error: --scene-prompts-per-image: got {args.scene_prompts_per_image}. Expected 1.."
                        f"{len(SCENE_PROMPTS)} (the pool size).")
    if args.baseline and args.ttda:
        raise UserError("error: --baseline: cannot be combined with --ttda. Expected one of them: the "
                        "baseline row has no test-time adaptation.")
    ks = {t: cd.check_pair(args.src, t) for t in args.tgt.split(",")}
    if len(set(ks.values())) != 1:
        raise UserError(f"error: --tgt {args.tgt}: targets with different class sets ({ks}). Expected one "
                        "class set per run; run each set separately.")
    return next(iter(ks.values()))


def build_data(args: Args, num_classes: int) -> dict:
    """{"src": the source TrainStream, "eval" / "ttda": {target: its eval split / its train crops (no labels)}}."""
    synthetic.ensure_synthetic_sample(args.data_root) if args.demo else None
    kw = dict(crop_size=args.crop_size, scale=1 / 8 if args.demo else 1.0, num_classes=num_classes)  # demo: / 8
    evals = [cd.eval_target(t, args.predict) for t in args.tgt.split(",")[: 1 if args.predict else None]]
    src = None if args.eval_only else cd.build_dataset(args.src, args.data_root, **kw, cat_max_ratio=0.75)
    return {"src": None if src is None else cd.TrainStream(src, args.seed, stream_id=0),
            "eval": {t: cd.build_dataset(t, args.data_root, split, train=False, **kw) for t, split in evals},
            "ttda": {t: cd.build_dataset(t, args.data_root, train=True, **kw) for t, _ in evals if args.ttda}}


def load_weights(model: PTDiffSeg, weights: dict, where: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # e.g. trained for another class set or SD version
        raise UserError(f"error: --ckpt: '{where}' does not fit this model ({len(model.class_emb)} classes). Expected "
                        "a ptdiffseg.py checkpoint trained with the same class set and --sd-model.") from None


Run = NamedTuple("Run", [("args", Args), ("dist", Dist), ("precision", Precision), ("sd", FrozenSD),
                         ("model", PTDiffSeg), ("out", Path), ("num_classes", int), ("data", dict)])


# ---- Training loop: setup, data, model, resume, the loop (log, evaluate, checkpoint), end; the TTDA loop -----
def train(args: Args) -> dict:
    if args.profile or args.estimate_memory:  # measuring tools, not training: benchmarks/measure.py
        from benchmarks.measure import measure
        return measure("ptdiffseg", args, globals())
    dist, repeatable = init_distributed(args.device, args.deterministic)
    precision = choose_precision(args.precision, dist.device)  # bf16 / fp16 + GradScaler / fp32 on CPU
    K, out = check_args(args), Path(args.out)
    seed_everything(args.seed)  # Python, NumPy, torch; the data streams and scene draws seed per step
    if dist.is_main:
        log("args: " + json.dumps(asdict(args)))
        log(f"device {dist.device} x{dist.world} | {precision.reason} | {repeatable}")
        log("adapting: nothing (--baseline: prompt 0, no consistency loss, no TTDA)" if args.baseline
            else f"adapting: prompt randomization (K_s = {args.scene_prompts_per_image})"
            + "; then the scene token s on the unlabeled target (TTDA)" * args.ttda)
    data = build_data(args, K)  # data and model are checked before anything is written (the prompt cache: below)
    sd = FrozenSD.load(args, dist.device, precision.frozen_dtype)  # frozen UNet + VAE, in the half dtype on GPUs
    class_emb, scene_emb = prompt_embeddings(args.sd_model, cd.CLASS_SETS[K], out / "cache", write=False)
    model = PTDiffSeg(class_emb, scene_emb, sd.channels, args.adapter_gamma_init).to(dist.device)
    if dist.world > 1 and dist.device.type == "cuda":  # mmseg/VPD configs use SyncBN; gloo on CPU has none
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run = Run(args, dist, precision, sd, model, out, K, data)
    if args.eval_only:  # --eval-only / --predict: score (or draw) the --ckpt weights, then TTDA if asked
        weights, state = runs.load_checkpoint(args.ckpt)
        load_weights(model, weights, args.ckpt)
        out.mkdir(parents=True, exist_ok=True)
        metrics.write_metrics(out, args, key="args") if dist.is_main else None
        result = evaluate(run, step := state.get("step", 0))
        return finish(result, ttda(run, step, result)[0] if args.ttda else None, run, step, [])
    optimizer, scaler, start, history = make_optimizer(model, args), precision.make_scaler(), 0, []
    if args.resume:  # restores the RNG states too: nothing may draw random numbers after this
        ckpt = runs.latest_checkpoint(out) or out / "checkpoints"
        weights, state = runs.load_checkpoint(ckpt, "--resume")
        load_weights(model, weights, str(ckpt))
        optimizer.load_state_dict(state["optimizer"]), scaler.load_state_dict(state["scaler"])
        start, history = state["step"], state["train_log"]
        set_rng_state(state["rng"])
        log(f"resumed from {ckpt} at step {start}") if dist.is_main else None
    runs.prepare_out_dir(out, args.resume, args.demo, dist.is_main)
    if dist.is_main:  # --out is ours now: the args, and the prompt cache (a later run needs no text encoder)
        metrics.write_metrics(out, args, key="args")
        save_prompt_cache(out / "cache", args.sd_model, cd.CLASS_SETS[K], class_emb, scene_emb)
    net = dist.wrap(model.train())  # DDP under torchrun: gradients averaged over processes
    b0 = dist.rank * args.batch_size  # this process's first image of the global batch (batch x processes)
    result, randomized, window, t_log, logged = {}, 0, {}, time.perf_counter(), start
    stop = runs.StopOnSignal(dist)  # SIGTERM / SIGINT: stop after the step's checkpoint, exit 75
    for i in stop.steps(start, args.iters):
        batch = data["src"].batch(i, b0, args.batch_size)
        x, y = batch["image"].to(dist.device) * 2 - 1, batch["label"].to(dist.device)  # [0, 1] -> SD's [-1, 1]
        idx = scene_prompt_indices(args, i, b0)                                              # (B, K_s)
        logs = train_step(net, sd, optimizer, scaler, x, y, idx, i, args, precision)
        randomized += int(idx.shape[1] > 1 and logs["loss_cons"] > 0)
        window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
        if (i + 1) % args.log_every == 0 or i + 1 == args.iters:  # Same as madm.py: means since the last line
            n, now = i + 1 - logged, time.perf_counter()
            history.append({"step": i + 1, **{k: v / n for k, v in window.items()}, "lr": logs["lr"]})
            if dist.is_main:
                log(log_line(history[-1], args.iters, 1000 * (now - t_log) / n, dist.device))
                metrics.write_metrics(out, history, key="train_log")
            window, t_log, logged = {}, now, i + 1
        if (i + 1) % args.eval_every == 0 or i + 1 == args.iters:
            result = evaluate(run, i + 1)
            model.train()
        if i + 1 == args.iters or (args.ckpt_every and (i + 1) % args.ckpt_every == 0) or stop.requested():
            if dist.is_main:
                runs.save_checkpoint(out, i + 1, model.state_dict(), dict(
                    step=i + 1, rng=get_rng_state(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), train_log=history, args=asdict(args)), args.keep_ckpts)
            dist.barrier()
    if dist.is_main and args.iters > start:
        log(f"adapted: {'nothing (--baseline)' if args.baseline else 'prompt randomization'}: distinct scene "
            f"prompts with loss_cons > 0 in {randomized} of {args.iters - start} steps")
    result = result or evaluate(run, args.iters)  # resumed a finished run: score its final weights
    return finish(result, ttda(run, args.iters, result)[0] if args.ttda else None, run, args.iters, history)


def log_line(rec: dict, total: int, ms_per_step: float, device: torch.device) -> str:
    """`step 1200/40000 | loss_ce 0.412 | loss_cons 0.010 | lr 5.0e-04 | 410 ms/step | mem 17.3 GB` (README)."""
    values = [f"{k} {v:.1e}" if k == "lr" or 0 < abs(v) < 1e-3 else f"{k} {v:.3f}" for k, v in rec.items()
              if k != "step"]
    mem = metrics.peak_memory_gb(device)
    return " | ".join([f"step {rec['step']}/{total}", *values, f"{ms_per_step:.0f} ms/step", f"mem {mem:.1f} GB"])


def finish(result: dict, adapted: Optional[dict], run: Run, step: int, history: list) -> dict:
    """End of a run: mean scores (TTDA's if it ran; source prompt's then *_before_ttda), `done`, "final", curves."""
    targets = {t: {k: r[k] for k in ("miou", "per_class_iou", "miou16", "miou13") if k in r} for t, r in result.items()}
    scores = mean_scores(result)
    summary = {"step": step, "targets": targets, **scores,
               "per_class_iou": next(iter(targets.values()))["per_class_iou"], "train_log": history}
    summary.update({f"{k}_before_ttda": v for k, v in scores.items()}, **adapted) if adapted is not None else None
    if run.dist.is_main:
        log(" | ".join(["done", *(f"mIoU{k[4:]} {100 * summary[k]:.2f}" for k in scores),
                        f"peak memory {metrics.peak_memory_gb(run.dist.device):.2f} GB", f"outputs in {run.out}"]))
        metrics.write_metrics(run.out, {k: v for k, v in summary.items() if k != "train_log"}, key="final")
        metrics.write_curves(run.out)
    return summary


def ttda(run: Run, step: int, before: dict) -> tuple[dict, dict]:
    """Per target, tune the scene token s (1, d) from prompt 0 on its train crops (rest frozen, eval mode), score it ->
    ({"ttda": record, "miou"}, {target: s}). No checkpoint: a stop names training's, at `step`; --resume redoes it."""
    args, dist, model, was_training = run.args, run.dist, run.model, run.model.training
    model.eval().requires_grad_(False)
    learned, record = {}, {}
    for t in run.data["eval"]:
        s0, s = model.scene_pool[:1].clone(), nn.Parameter(model.scene_pool[:1].clone())  # (1, d) both prompt 0
        optimizer, scaler = torch.optim.AdamW([s], lr=args.ttda_lr, weight_decay=0.0), run.precision.make_scaler()
        stream = cd.TrainStream(run.data["ttda"][t], args.seed, stream_id=1)
        history, window, t_log, logged, stepped, kept = [], {}, time.perf_counter(), 0, 0, 0.0
        stop = runs.StopOnSignal(dist)  # --eval-only wrote no checkpoint: no stop (a signal ends it)
        for i in range(args.ttda_steps) if args.eval_only else stop.steps(0, args.ttda_steps, step, f"TTDA on {t}"):
            x = stream.batch(i, dist.rank * args.batch_size, args.batch_size)["image"].to(dist.device) * 2 - 1
            logs = ttda_step(model, run.sd, s, s0, optimizer, scaler, x, i, args.ttda_threshold, run.precision, dist)
            stepped, kept = stepped + int(logs["stepped"]), kept + logs["kept"]
            window = {k: window.get(k, 0.0) + logs[k] for k in ("loss_ttda", "kept")}
            if (i + 1) % args.log_every == 0 or i + 1 == args.ttda_steps:  # means since the last line
                n, now = i + 1 - logged, time.perf_counter()
                history.append({"step": i + 1, **{k: v / n for k, v in window.items()}, "lr": args.ttda_lr})
                if dist.is_main:
                    log("ttda " + log_line(history[-1], args.ttda_steps, 1000 * (now - t_log) / n, dist.device))
                    metrics.write_metrics(run.out, history, key=f"train_log_ttda_{t}")
                window, t_log, logged = {}, now, i + 1
        learned[t] = s.detach()
        record[t] = {"steps": args.ttda_steps, "stepped": stepped, "mean_kept": kept / args.ttda_steps,
                     "s_change": float((s.detach() - s0).norm())}
    after = evaluate(run, step, learned, tag="TTDA prompt")
    model.train(was_training).requires_grad_(True)  # every PTDiffSeg parameter is a trained one
    for t, r in record.items():
        b, f = before[t]["miou"], after[t]["miou"]
        r.update(miou_before=b, miou_after=f, delta=f - b)
        if dist.is_main:
            scores = "" if after[t].get("no_labels") else (f"\nttda {t} | source prompt mIoU {100 * b:.2f} | "
                f"TTDA prompt mIoU {100 * f:.2f} | delta {100 * (f - b):+.2f}")  # without labels: no mIoU to compare
            log(f"adapted: the scene token s on {t} in {r['stepped']} of {args.ttda_steps} TTDA steps (pixels "
                f"with p_max >= {args.ttda_threshold} kept: mean fraction {r['mean_kept']:.3f})" + scores)
            (run.out / "ttda").mkdir(exist_ok=True)  # folder:PATH -> folder-<name>_scene.safetensors
            save_file({"scene": learned[t].cpu()}, f"{run.out}/ttda/{cd.run_tag(t)}_scene.safetensors")
            metrics.write_metrics(run.out, record, key="ttda")
    return {"ttda": record, **mean_scores(after)}, learned


# ---- Evaluation: sliding window over the eval-resized image, scored by common.metrics -------------------
@torch.no_grad()
def slide_logits(run: Run, x: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """x (1, 3, H, W) in [0, 1] -> (1, K, H, W): --crop-size windows at --eval-stride (mmseg slide), logits averaged."""
    (win, stride), (H, W) = (run.args.crop_size, run.args.eval_stride), x.shape[-2:]
    x = F.pad(x * 2 - 1, (0, max(win - W, 0), 0, max(win - H, 0)))  # smaller than a window: zero-padded, cropped back
    Hp, Wp = x.shape[-2:]
    ny, nx = -(-(Hp - win) // stride) + 1, -(-(Wp - win) // stride) + 1  # ceil: the last window may overlap
    boxes = [(min(i * stride, Hp - win), min(j * stride, Wp - win)) for i in range(ny) for j in range(nx)]
    acc, cnt = x.new_zeros(1, run.num_classes, Hp, Wp), x.new_zeros(1, 1, Hp, Wp)  # logit sums, window counts
    for chunk in (boxes[i:i + 4] for i in range(0, len(boxes), 4)):  # up to 4 windows per UNet call
        xw = torch.cat([x[..., y0:y0 + win, x0:x0 + win] for y0, x0 in chunk])             # (n, 3, win, win)
        with run.precision.autocast():
            lg = run.model(run.sd, run.sd.encode(xw), scene.expand(len(chunk), -1))     # (n, K, win/8, win/8)
        lg = F.interpolate(lg.float(), size=(win, win), mode="bilinear", align_corners=False)
        for (y0, x0), logit in zip(chunk, lg):
            acc[..., y0:y0 + win, x0:x0 + win] += logit
            cnt[..., y0:y0 + win, x0:x0 + win] += 1
    return (acc / cnt)[..., :H, :W]                                                        # (1, K, H, W)


def evaluate(run: Run, step: int, scenes: Optional[dict] = None, tag: str = "source prompt"):
    """Score each target's eval split (DG protocol) with prompt 0 or its TTDA prompt (scenes {target: (1, d)})."""
    scale, res, K = (1 / 8 if run.args.demo else 1.0), {}, run.num_classes
    run.model.eval()
    for target, ds in run.data["eval"].items():
        scene = scenes[target] if scenes is not None else run.model.scene_pool[:1]
        pics = run.out / "predictions" / ("ttda" if scenes is not None else "") if run.dist.is_main else None
        # mmseg: bilinear eval resize without antialias; metric at native size (Mapillary: half, PIL nearest)
        res[target] = r = metrics.evaluate(lambda x, scene=scene: slide_logits(run, x, scene), ds, K, cd.CLASS_SETS[K],
            cd.PALETTES[K], device=run.dist.device, dist=run.dist, metric_size=ds.info.metric, pictures_dir=pics,
            input_size=lambda hw, t=target: cd.eval_input_size(t, hw, scale), **metrics.RESIZE_PROTOCOLS["mmseg"],
            desc=f"{target} {ds.split} ({tag})", synthia=run.args.src == "synthia" and K == 19)  # SYNTHIA: mIoU16/13
        if run.dist.is_main:
            log(r["table"])  # without labels: the one line of what was written
            if not r.get("no_labels"):
                log(f"eval step {step} | {target} | {tag} | mIoU {100 * r['miou']:.2f} | "
                    + r["resolution"].replace(", ", " | "))
            metrics.write_metrics(run.out, {"step": step, "target": target, "prompt": tag, **{
                k: r[k] for k in ("miou", "per_class_iou", "resolution", "miou16", "miou13") if k in r}})
    if len(res) > 1 and run.dist.is_main:
        log(f"eval step {step} | mean over {len(res)} targets | {tag} | mIoU {100 * mean_scores(res)['miou']:.2f}")
    return res


def mean_scores(res: dict) -> dict:
    """The means over the targets of `evaluate`'s {target: result}: "miou" (+ "miou16", "miou13" for SYNTHIA)."""
    return {k: float(np.mean([r[k] for r in res.values()])) for k in ("miou", "miou16", "miou13")
            if all(k in r for r in res.values())}


def resolve_args(args: Args) -> Args:
    """Apply the --demo values (only where the user kept a default) and the default --out."""
    if args.demo:  # mini SD + synthetic sample, minutes on CPU; the user's own flags win
        args = replace_defaults(args, sd_model="mini", data_root="data/synthetic", crop_size=64, iters=50,
            out="runs/ptdiffseg-demo", eval_every=50, log_every=10, ckpt_every=50, warmup_iters=5, lr=6e-3,
            adapter_lr=6e-4, eval_stride=43, ttda=not args.baseline, ttda_steps=20, ttda_lr=1e-2, ttda_threshold=0.5)
    return replace(args, out=args.out or f"runs/ptdiffseg-{cd.run_tag(args.src)}-{cd.run_tag(args.tgt)}",
                   eval_only=args.eval_only or bool(args.predict))  # --predict: load --ckpt, no training


def main(args: Args) -> dict:
    """Train, then TTDA when asked (or --eval-only / --predict, --profile, --estimate-memory) -> finish's summary."""
    return train(resolve_args(args))


if __name__ == "__main__":
    run_cli(main, Args)
