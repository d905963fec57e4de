"""PTDiffSeg: prompting a frozen diffusion backbone for cross-domain semantic segmentation.

R. Gong, M. Danelljan, H. Sun, J. Delgado Mangas, L. Van Gool, "Prompting Diffusion Representations for
Cross-Domain Semantic Segmentation", BMVC 2024. https://arxiv.org/abs/2307.02138

No official code is public: this file is the first implementation. What the sources state and what we chose is
marked everywhere: [paper] = the abstract; [TADP] = Kondapaneni et al., arXiv 2310.00031 (§2.3, §3, §4.1,
Table 4), which describes PTDiffSeg; [VPD code] = wl-zhao/VPD, the pipeline PTDiffSeg builds on; [our choice]
= a detail none of them pins down (the binding list is `specs/ptdiffseg.md`, "Decisions").

Idea. A Stable Diffusion UNet, kept frozen, is a feature extractor that generalises across domains [paper]. It
is run once per image at t = 1 on the clean latent (VPD). Its cross-attention context is a *prompt*: one token
per class (template-averaged text embeddings, refined by a small TextAdapter) plus a *scene token* describing
the domain ("an urban street scene at night"). Only the adapter and a semantic-FPN head are trained, on the
source domain alone. Prompt randomization draws K_s = 2 scene prompts per image and a KL consistency loss asks
for the same prediction under each, so the head learns what does not depend on the scene description [paper,
TADP]. At test time (TTDA) only the scene token is optimised on unlabeled target images with confident pseudo
labels [paper].

Paper -> code
    frozen diffusion backbone, VPD-style (TADP §2.3; VPD code) .... FrozenSD (latent, UNet at t = 1, hooks)
    class prompt: an embedding for every class (TADP §2.3) ........ class_embeddings, TextAdapter
    scene prompt (abstract) ........................................ SCENE_PROMPTS, scene_embeddings
    class-token cross-attention maps (VPD code) .................... FrozenSD.features (AttentionStore)
    segmentation head (VPD config: semantic FPN) ................... FPN, SemanticFPNHead
    prompt randomization + consistency loss (abstract; TADP §2.3) .. draw_scene_prompts, consistency_loss
    joint loss (abstract) .......................................... segmentation_loss + consistency_loss
    test-time domain adaptation of the scene prompt (abstract) ..... ttda, ttda_loss

Deviations (from the paper, which gives no code, and from the VPD code we build on)
    - [our choice] Class embeddings come from SD's own text encoder (pooled output = final-LN state at the
      first EOS, 80 CLIP ImageNet templates averaged, not normalised), not from VPD's standalone CLIP ViT-L/14
      projected embedding: they then live in the token space SD's cross-attention was trained on.
    - [our choice] Latent = VAE posterior mode x 0.18215. VPD omits the factor, but VPD fine-tunes its UNet
      and we keep it frozen, so we feed latents at the scale SD was trained on (TADP §4.1).
      `--no-latent-scale` = VPD.
    - [VPD code, kept] t = 1 and no noise (the VPD paper says t = 0; VPD issues #27, #28).
    - [our choice] Context = [scene token, K adapted class tokens] (B, 1 + K, d); no BOS/EOS/padding rows.
    - [our choice] Scene pool of 12 sentences (SCENE_PROMPTS); a scene token = pooled EOS of the sentence; K_s
      = 2 distinct prompts per image per step; prompt 0 at evaluation and as the TTDA start.
    - [our choice] Consistency = mean_k KL(p_k || sg(mean_k p_k)) at stride 8, weight 1.0 (JS-style, no
      teacher).
    - [our choice] Attention maps from every attn2 in down_blocks 1, 2 and up_blocks 1, 2 (strides 16 and 32),
      averaged over heads and layers per stride (VPD keeps maps with <= 32^2 queries at 512; we select by
      stride).
    - [our choice] FPN + semantic-FPN head written out (~60 lines) instead of mmseg; default PyTorch init for
      the FPN convs, Kaiming (fan_out) for the head's conv+BN blocks.
    - [our choice] DAFormer DG schedule on one GPU: AdamW, head lr 6e-4, adapter lr 6e-5, wd 0.01, 1500
      warm-up steps then poly 1.0, 40k steps, batch 2, crop 512 (VPD: lr 8e-5, 80k steps, batch 16 on 8 GPUs).
      GTA5 crops use cat_max_ratio 0.75; no photometric augmentation, no rare-class sampling [paper].
    - [our choice] Evaluation: sliding window (window = --crop-size, stride 341) over the eval-resized image,
      overlapping logits averaged, bilinear to the metric size; scene prompt 0 or the TTDA prompt.
    - [our choice] TTDA: the target's train split (labels never used), random crops + flip, batch =
      --batch-size, pseudo labels from the frozen prompt-0 model kept where p_max >= 0.9, CE on kept pixels,
      AdamW lr 1e-3, wd 0, constant LR, 1000 steps; offline (not streaming), no entropy term. TTDA itself is
      not resumable.
    - [our choice] The UNet runs with autograd on so the adapter's gradient reaches it through cross-attention
      (parameters stay requires_grad=False); the VAE encode runs under no_grad; the K_s prompts of an image
      share its latent and go through the UNet in one batch of B * K_s.
    - [our choice] `--profile` uses random class/scene embeddings and random images of the training shapes
      (the step's cost does not depend on their values), so it needs neither data nor a text-encoder pass.

Commands
    python ptdiffseg.py --src gta5 --tgt cityscapes,bdd100k,mapillary          # DG training, paper setting
    python ptdiffseg.py --src gta5 --tgt cityscapes --grad-checkpointing        # low memory (16 GB)
    python ptdiffseg.py --tgt cityscapes --eval-only --ttda --ckpt runs/.../checkpoints/step_0040000
    python ptdiffseg.py --demo                                                  # CPU, tiny SD, synthetic data
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import datasets as cd
from common import metrics, runtime
from common.runtime import UserError
from common.sd_backbone import AttentionStore, FeatureCapture, encode_prompts, load_sd, vae_encode
from common.synthetic import ensure_synthetic_sample


@dataclass
class Args:
    # ---- experiment / infrastructure (cli.md) ----
    out: Optional[str] = None
    """run folder; default runs/ptdiffseg-<src>-<tgt> (cli.md)"""
    seed: int = 0
    """seeds Python, NumPy, torch and the data streams (our choice)"""
    device: str = "auto"
    """auto | cpu | cuda (cli.md)"""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16 for the trained parts; frozen SD is half precision on CUDA (specs README)"""
    grad_checkpointing: bool = False
    """recompute the frozen UNet's activations in backward (saves memory; our choice, Decision 12)"""
    resume: bool = False
    """continue from the latest checkpoint in --out (cli.md)"""
    eval_only: bool = False
    """only evaluate --ckpt (optionally after --ttda) (cli.md)"""
    ckpt: Optional[str] = None
    """checkpoint folder for --eval-only (cli.md)"""
    ckpt_every: int = 4000
    """steps between checkpoints (our choice)"""
    keep_ckpts: int = 3
    """how many checkpoints to keep (our choice)"""
    log_every: int = 50
    """steps between log lines (our choice)"""
    eval_every: int = 4000
    """steps between evaluations (our choice, spec table)"""
    profile: int = 0
    """time N training iterations and print one JSON line, then exit (cli.md)"""
    demo: bool = False
    """tiny SD + synthetic sample + short schedule, < 2 min on CPU (cli.md)"""
    # ---- data ----
    src: str = "gta5"
    """source dataset, trained on alone (paper: synthetic-to-real DG)"""
    tgt: str = "cityscapes"
    """target(s), comma-separated, one class set; each scored separately (paper; Decision 17)"""
    data_root: str = "data"
    """where datasets live (cli.md)"""
    batch_size: int = 2
    """source crops per step, also the TTDA batch (VPD: 2 per GPU)"""
    crop_size: int = 512
    """training crop and sliding-window size, a multiple of 64 (VPD: 512)"""
    # ---- backbone ----
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or folder; tiny / random-sd15 build random weights (VPD default SD v1-5)"""
    timestep: int = 1
    """the one UNet pass, no noise (VPD code; VPD issue #27)"""
    latent_scale: bool = True
    """multiply the latent by 0.18215 (our choice; TADP §4.1; off = VPD)"""
    # ---- method ----
    scene_prompts_per_image: int = 2
    """K_s distinct scene prompts per image and step (our choice)"""
    consistency_weight: float = 1.0
    """lambda_cons of the KL consistency loss (our choice)"""
    adapter_gamma_init: float = 1e-4
    """initial gamma of the TextAdapter (VPD code vpd/models.py TextAdapter)"""
    # ---- optimisation ----
    iters: int = 40000
    """optimizer steps (our choice, DAFormer schedule)"""
    lr: float = 6e-4
    """FPN + head learning rate (our choice, DAFormer convention)"""
    adapter_lr: float = 6e-5
    """TextAdapter learning rate, 0.1 x head (our choice, DAFormer convention)"""
    weight_decay: float = 0.01
    """AdamW weight decay on all trained parameters (DAFormer adamw.py)"""
    warmup_iters: int = 1500
    """linear warm-up from ratio 1e-6, then poly power 1.0 (DAFormer poly10warm.py)"""
    # ---- evaluation ----
    eval_stride: int = 341
    """sliding-window stride; the window is --crop-size (our choice: 2/3 overlap at 512)"""
    # ---- test-time domain adaptation ----
    ttda: bool = False
    """learn the scene prompt on the unlabeled target, report mIoU before/after (paper)"""
    ttda_steps: int = 1000
    """TTDA optimizer steps (our choice)"""
    ttda_lr: float = 1e-3
    """TTDA AdamW learning rate, wd 0, constant (our choice)"""
    ttda_threshold: float = 0.9
    """keep pseudo-labelled pixels with p_max >= this (our choice)"""


# ------------------------------------------------------------------------------------------------------------
# Prompts: class prompt (one embedding per class) and scene prompts (TADP §2.3; abstract)
# ------------------------------------------------------------------------------------------------------------
# The 80 CLIP ImageNet templates (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, also VPD's
# depth/dump_nyu_text_embeddings.py), in their original order.
TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(TEMPLATES) == 80

# [our choice] The scene-prompt pool for prompt randomization. Prompt 0 is the neutral description used at
# evaluation and as the TTDA initialisation; the others name weather, light and rendering styles so that the
# head sees the same image under different "domain" descriptions. Prompt 11 is the empty sentence.
_STREET = "a photo of an urban street scene"
SCENE_PROMPTS = (
    _STREET, f"{_STREET} on a sunny day", f"{_STREET} at night", f"{_STREET} in heavy rain",
    f"{_STREET} in dense fog", f"{_STREET} in snow", f"{_STREET} at dusk",
    "a rendering of an urban street scene in a video game", "a photorealistic photo of an urban street scene",
    "a dashcam photo of an urban street scene", "a painting of an urban street scene", "",
)


def embedding_cache_path(cache_dir: Path, model_id: str, class_names: tuple[str, ...]) -> Path:
    """Where the prompt embeddings of (model id, class names, scene pool) are cached, in the run folder."""
    key = json.dumps([model_id, list(class_names), list(TEMPLATES), list(SCENE_PROMPTS)])
    return Path(cache_dir) / f"prompt_embeddings-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


@torch.no_grad()
def class_embeddings(tokenizer, text_encoder, class_names: tuple[str, ...]) -> torch.Tensor:
    """Class prompt [TADP, VPD code; encoder our choice]: c_k = mean_t pooled_EOS(template_t(name_k)).

    For every class, the 80 templates are formatted, tokenized (padded/truncated to 77) and run through SD's
    text encoder; the pooled output (final-LayerNorm state at the first EOS) is averaged over templates with
    no normalisation. All K classes are always present, in id order. Returns (K, d) float32.
    """
    rows = []
    for name in class_names:  # one batch of 80 sentences per class keeps memory flat
        sentences = [t.format(name) for t in TEMPLATES]
        emb = encode_prompts(tokenizer, text_encoder, sentences, pooled=True)             # (80, d)
        rows.append(emb.float().mean(0))
    return torch.stack(rows)                                                               # (K, d)


@torch.no_grad()
def scene_embeddings(tokenizer, text_encoder) -> torch.Tensor:
    """Scene tokens [our choice]: pooled EOS output of each pool sentence, no templates. Returns (P, d)."""
    return encode_prompts(tokenizer, text_encoder, list(SCENE_PROMPTS), pooled=True).float()


def prompt_embeddings(sd_model: str, class_names: tuple[str, ...], cache_dir: Optional[Path],
                      write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(class (K, d), scene (P, d)) embeddings, computed once, cached on disk keyed by (model id, classes).

    The text encoder is loaded only when the cache misses and is freed right after (training never uses it).
    """
    path = embedding_cache_path(cache_dir, sd_model, class_names) if cache_dir is not None else None
    if path is not None and path.is_file():
        t = load_file(str(path))
        print(f"prompt embeddings: read from cache {path}")
        return t["class"], t["scene"]
    text = load_sd(sd_model, parts=("text_encoder", "tokenizer"))
    c = class_embeddings(text.tokenizer, text.text_encoder, class_names)                   # (K, d)
    s = scene_embeddings(text.tokenizer, text.text_encoder)                                # (P, d)
    del text  # free the text encoder (~0.5 GB for SD 1.x): only its outputs are needed from here on
    gc.collect()
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"class": c.contiguous(), "scene": s.contiguous()}, str(tmp))
        tmp.replace(path)
        print(f"prompt embeddings: {len(class_names)} classes x 80 templates + {len(SCENE_PROMPTS)} scene "
              f"prompts encoded once, cached in {path}")
    return c, s


# ------------------------------------------------------------------------------------------------------------
# TextAdapter on the class tokens (VPD code vpd/models.py `TextAdapter`)
# ------------------------------------------------------------------------------------------------------------
class TextAdapter(nn.Module):
    """c' = c + gamma * MLP(c), MLP = Linear(d, d) -> GELU -> Linear(d, d), gamma in R^d initialised to 1e-4.

    The tiny gamma makes the adapter start as the identity, so training begins from the text embeddings the
    UNet understands and moves away only as far as the segmentation loss asks.
    """

    def __init__(self, d: int, gamma_init: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.gamma = nn.Parameter(torch.full((d,), gamma_init))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c + self.gamma * self.fc(c)                                                 # (K, d)


# ------------------------------------------------------------------------------------------------------------
# Frozen SD backbone, VPD-style: latent, one UNet pass at t = 1, hooked features + cross-attention maps
# ------------------------------------------------------------------------------------------------------------
# Decision 8 [VPD code; diffusers mapping ours]: the module whose output is taken at each image stride.
FEATURE_MODULES = {8: "up_blocks.3", 16: "up_blocks.2.attentions.1", 32: "up_blocks.1.attentions.1",
                   64: "up_blocks.0.resnets.1"}
# Decision 9 [VPD code]: the blocks whose cross-attention probabilities are kept, by image stride.
ATTENTION_BLOCKS = {"down_blocks.1.": 16, "down_blocks.2.": 32, "up_blocks.1.": 32, "up_blocks.2.": 16}


class FrozenSD:
    """The frozen SD parts PTDiffSeg reads features from (not an nn.Module: nothing here is trained or saved).

    Holds the VAE (encoder only is used; the decoder never runs) and the UNet, both `requires_grad_(False)`,
    in half precision on CUDA. The UNet's `attn2` layers of the blocks in ATTENTION_BLOCKS get an
    AttentionStore processor that also returns P = softmax(Q K^T / sqrt(d_head)); every other attention keeps
    SDPA.
    """

    def __init__(self, unet, vae, timestep: int, latent_scale: bool, grad_checkpointing: bool = False):
        self.unet, self.vae, self.timestep, self.latent_scale = unet, vae, timestep, latent_scale
        self.store = AttentionStore(unet, select=lambda name: name.startswith(tuple(ATTENTION_BLOCKS)))
        if grad_checkpointing:
            unet.enable_gradient_checkpointing()  # recompute activations in backward: memory for compute
        boc = unet.config.block_out_channels  # SD 1.x (320, 640, 1280, 1280); strides 8, 16, 32, 64
        self.channels = [boc[0], boc[1], boc[2], boc[3]]
        self.d = unet.config.cross_attention_dim  # 768 for SD 1.x

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z (B, 4, H/8, W/8) = mode(E(x)) * 0.18215 (the mode, never a sample).

        With `--no-latent-scale` the factor is divided out again (VPD feeds the unscaled mode).
        """
        z = vae_encode(self.vae, x)                                                        # (B, 4, H/8, W/8)
        return z if self.latent_scale else z / self.vae.config.scaling_factor

    def features(self, z: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """One UNet pass at t = timestep, no noise; returns [F8, F16 ++ A16, F32 ++ A32, F64] in float32.

        z (B, 4, h, w) latents (h = H/8); context (B, 1 + K, d) = [scene token, class tokens]. Runs with
        autograd on when the caller's does (the adapter's / scene token's gradient flows through
        cross-attention; the UNet parameters themselves never receive a gradient).
        """
        B, _, h, w = z.shape
        dtype = self.unet.dtype
        t = torch.full((B,), self.timestep, device=z.device, dtype=torch.long)
        self.store.clear()
        with FeatureCapture(self.unet, list(FEATURE_MODULES.values())) as cap:
            # The UNet's own output (noise prediction) is unused; its last layers (norm + 3x3 conv) are cheap.
            self.unet(z.to(dtype), t, encoder_hidden_states=context.to(dtype))
            feats = {s: cap.features[name].float() for s, name in FEATURE_MODULES.items()}
        # Cross-attention maps (Decision 9), head-averaged by the store: (B, h_s * w_s, 1 + K) per layer.
        out = [feats[8]]                                                                   # (B, C8, h, w)
        for stride in (16, 32):
            layers = [p for name, p in self.store.maps.items()
                      if ATTENTION_BLOCKS[next(b for b in ATTENTION_BLOCKS if name.startswith(b))] == stride]
            P = torch.stack(layers).mean(0).float()                                        # (B, hs*ws, 1 + K)
            hs, ws = h * 8 // stride, w * 8 // stride
            # keep the K class columns (drop the scene token, column 0); tokens -> channels
            A = P[:, :, 1:].transpose(1, 2).reshape(B, -1, hs, ws)                         # (B, K, hs, ws)
            out.append(torch.cat([feats[stride], A], 1))                                # (B, C_s + K, hs, ws)
        out.append(feats[64])                                                             # (B, C64, h/8, w/8)
        return out


# ------------------------------------------------------------------------------------------------------------
# Neck + head: FPN and semantic-FPN head (VPD config fpn_vpd_sd1-5_512x512_gpu8x2.py = mmseg FPN + FPNHead)
# ------------------------------------------------------------------------------------------------------------
def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU, Kaiming-normal fan_out like mmcv's ConvModule."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017): lateral 1x1 -> 256, top-down nearest x2 + add, 3x3 output convs.

    feats [(B, C_l, H/s_l, W/s_l)] at strides [8, 16, 32, 64] -> 4 maps (B, 256, H/s_l, W/s_l). No norm
    (mmseg FPN).
    """

    def __init__(self, in_channels: list[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]                           # (B, 256, h_l, w_l)
        for i in range(len(lat) - 1, 0, -1):  # coarse to fine: add the upsampled coarser level
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class SemanticFPNHead(nn.Module):
    """Semantic FPN head (Kirillov et al. 2019; mmseg FPNHead): level l gets max(1, log2(s_l / 8)) blocks of
    3x3 conv -> 128 + BN + ReLU, each followed by bilinear x2 while coarser than stride 8; the four are
    summed; Dropout2d(0.1); 1x1 conv -> K. Returns logits (B, K, H/8, W/8).
    """

    def __init__(self, num_classes: int, strides=(8, 16, 32, 64), in_ch: int = 256, channels: int = 128):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for s in strides:
            n = max(1, int(math.log2(s / strides[0])))
            blocks = []
            for k in range(n):
                blocks.append(conv_bn_relu(in_ch if k == 0 else channels, channels))
                if s != strides[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.scale_heads[0](feats[0])                                                 # (B, 128, H/8, W/8)
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            x = x + F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(x))                                              # (B, K, H/8, W/8)


class PTDiffSeg(nn.Module):
    """The trained parts (TextAdapter + FPN + head) and the fixed prompt embeddings; SD is passed in.

    Only this module's state dict is checkpointed (a few MB); the prompt embeddings are non-persistent buffers
    (recomputed or read from the run folder's cache), the UNet/VAE weights come from `--sd-model`.
    """

    def __init__(self, class_emb: torch.Tensor, scene_emb: torch.Tensor, feat_channels: list[int],
                 gamma_init: float):
        super().__init__()
        K, d = class_emb.shape
        self.register_buffer("class_emb", class_emb.float().clone(), persistent=False)    # (K, d)
        self.register_buffer("scene_pool", scene_emb.float().clone(), persistent=False)   # (P, d)
        self.adapter = TextAdapter(d, gamma_init)
        # Decision 10: [C8, C16 + K, C32 + K, C64]; the scene token adds no channel (its column is dropped)
        c8, c16, c32, c64 = feat_channels
        self.neck = FPN([c8, c16 + K, c32 + K, c64])
        self.head = SemanticFPNHead(K)

    def context(self, scene: torch.Tensor) -> torch.Tensor:
        """Decision 4: scene (B, d) -> context (B, 1 + K, d) = [scene token, adapter(class tokens)]."""
        c = self.adapter(self.class_emb)                                                   # (K, d)
        return torch.cat([scene[:, None], c[None].expand(scene.shape[0], -1, -1)], 1)      # (B, 1 + K, d)

    def forward(self, sd: FrozenSD, z: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w) latents, scene (B, d) scene tokens -> logits (B, K, h, w) at image stride 8."""
        feats = sd.features(z, self.context(scene))                                        # 4 levels
        return self.head(self.neck(feats))


# ------------------------------------------------------------------------------------------------------------
# Prompt randomization and the losses (abstract: joint segmentation + consistency loss; TADP §2.3)
# ------------------------------------------------------------------------------------------------------------
def draw_scene_prompts(seed: int, step: int, start: int, count: int, pool: int, k: int) -> torch.Tensor:
    """K_s distinct pool indices per image, uniform, as a pure function of (seed, step, global image index).

    Stateless, so `--resume` and DDP (each rank draws its own global indices) need no generator state.
    Returns int64 (count, k).
    """
    rows = [np.random.default_rng([seed, 7, step, start + i]).choice(pool, size=k, replace=False)
            for i in range(count)]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def segmentation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_seg = (1/K_s) sum_k CE_k, CE_k = CE(up(logits_k), y) averaged over valid pixels (255 = ignore).

    logits (B, K_s, K, h, w) at stride 8, upsampled bilinearly to the crop; y (B, H, W) int64. The K_s prompts
    of an image share its label, so the mean over all valid (prompt, pixel) pairs is the mean over k of CE_k.
    """
    B, Ks, K, h, w = logits.shape
    up = F.interpolate(logits.flatten(0, 1).float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
    y = y.repeat_interleave(Ks, 0)                                                         # (B * K_s, H, W)
    ce = F.cross_entropy(up, y, ignore_index=255, reduction="sum")
    return ce / (y != 255).sum().clamp_min(1)  # an all-ignore crop gives 0, not NaN


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_cons = (1/K_s) sum_k mean_pixels KL(p_k || sg(p_bar)), p_bar = (1/K_s) sum_k p_k [our choice].

    logits (B, K_s, K, h, w) at stride 8; p_k = softmax over classes; KL summed over classes, averaged over
    pixels and images. The stop-gradient sits on the mean only (JS-style): every prompt is pulled towards the
    consensus, no prompt is a fixed teacher. Zero iff all K_s predictions agree.
    """
    Ks = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=2)                                            # (B, K_s, K, h, w)
    logp_bar = (torch.logsumexp(logp, dim=1, keepdim=True) - math.log(Ks)).detach()    # log p_bar (B,1,K,h,w)
    return (logp.exp() * (logp - logp_bar)).sum(2).mean()


def ttda_loss(logits: torch.Tensor, logits_src: torch.Tensor, size: tuple[int, int],
              threshold: float) -> tuple[Optional[torch.Tensor], float]:
    """TTDA objective [paper: pseudo labels; form our choice]: CE(up(logits(s)), y_hat) over confident pixels.

    y_hat = argmax p_src, kept where max p_src >= threshold, with p_src = softmax(up(logits with prompt 0))
    from the frozen model (no gradient). logits, logits_src (B, K, h, w); size = the crop (H, W). Returns
    (loss or None when no pixel is kept, kept fraction).
    """
    with torch.no_grad():
        p = F.interpolate(logits_src.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
        conf, y_hat = p.max(1)                                                             # (B, H, W)
        y_hat[conf < threshold] = 255
        kept = int((y_hat != 255).sum())
    if kept == 0:
        return None, 0.0
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)    # (B, K, H, W)
    return F.cross_entropy(up, y_hat, ignore_index=255, reduction="sum") / kept, kept / y_hat.numel()


# ------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (DAFormer poly10warm.py)
# ------------------------------------------------------------------------------------------------------------
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
# Setup: datasets, frozen SD, prompt embeddings, model (plumbing)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything train / ttda / evaluate share."""
    args: Args
    device: torch.device
    precision: runtime.Precision
    dist: runtime.Dist
    sd: FrozenSD
    model: PTDiffSeg
    out: Optional[Path]
    scale: float
    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    src_train: Optional[cd.SegDataset]
    tgt_eval: dict
    tgt_train: dict


def setup(args: Args) -> Run:
    """Validate inputs (datasets, weights) before anything is written; then prepare --out, build the model."""
    runtime.require_ckpt(args)
    if args.crop_size % 64:
        raise UserError(f"error: --crop-size {args.crop_size}: the UNet downsamples the latent 3 times. "
                        "Expected a multiple of 64 (e.g. 512).")
    if args.scene_prompts_per_image > len(SCENE_PROMPTS) or args.scene_prompts_per_image < 1:
        raise UserError(f"error: --scene-prompts-per-image: expected 1..{len(SCENE_PROMPTS)} (pool size).")
    dist = runtime.init_distributed(args.device)
    device = dist.device
    precision = runtime.choose_precision(args.precision, device)
    targets = args.tgt.split(",")
    ks = {t: cd.check_pair(args.src, t) for t in targets}
    if len(set(ks.values())) != 1:
        raise UserError(f"error: --tgt {args.tgt}: targets with different class sets ({ks}). Expected one "
                        "class set per run; run each set separately.")
    K = ks[targets[0]]
    scale = 1 / 8 if args.demo else 1.0  # datasets.md §5: the demo shrinks every size by 8 (not the crop)
    src_train, tgt_eval, tgt_train = None, {}, {}
    if not args.profile:
        if not args.eval_only:
            src_train = cd.build_dataset(args.src, args.data_root, "train", crop_size=args.crop_size,
                                         scale=scale, num_classes=K, cat_max_ratio=0.75)
        for t in targets:
            tgt_eval[t] = cd.build_dataset(t, args.data_root, "val", train=False, scale=scale, num_classes=K)
            if args.ttda:  # TTDA reads target *train* images; their labels are never used
                tgt_train[t] = cd.build_dataset(t, args.data_root, "train", train=True,
                                                crop_size=args.crop_size, scale=scale, num_classes=K)
    if args.resume and not args.profile:  # fail before anything is written to --out
        runtime.resume_checkpoint(args.out)
    parts = load_sd(args.sd_model, parts=("unet", "vae"), device=device)  # text encoder: only on a cache miss
    if device.type == "cuda":  # frozen weights: half precision halves their memory and speeds the UNet up
        parts.unet.to(precision.frozen_dtype)
        parts.vae.to(precision.frozen_dtype)
    out = None
    if not args.profile:
        out = runtime.prepare_out_dir(args.out, resume=args.resume, eval_only=args.eval_only,
                                      is_main=dist.is_main, allow_existing=args.demo)
    class_names = cd.CLASS_SETS[K]
    if args.profile:  # the embeddings are constants of the step; random ones cost the same (see header)
        g = torch.Generator().manual_seed(0)
        d = parts.unet.config.cross_attention_dim
        c_emb, s_emb = torch.randn(K, d, generator=g), torch.randn(len(SCENE_PROMPTS), d, generator=g)
    else:
        c_emb, s_emb = prompt_embeddings(args.sd_model, class_names, out / "cache", write=dist.is_main)
    sd = FrozenSD(parts.unet, parts.vae, args.timestep, args.latent_scale, args.grad_checkpointing)
    model = PTDiffSeg(c_emb, s_emb, sd.channels, args.adapter_gamma_init).to(device)
    if dist.world > 1 and device.type == "cuda":  # mmseg/VPD configs use SyncBN; gloo on CPU has no SyncBN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return Run(args, device, precision, dist, sd, model, out, scale, K, class_names, cd.PALETTES[K],
               src_train, tgt_eval, tgt_train)


def to_model_input(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader batch -> x (B, 3, H, W) in [-1, 1] (SD's VAE input range), y (B, H, W) int64."""
    return batch["image"].to(device) * 2 - 1, batch["label"].to(device)


# ------------------------------------------------------------------------------------------------------------
# Training: domain generalisation on the source only (Decision 13)
# ------------------------------------------------------------------------------------------------------------
def make_optimizer(run: Run) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999), head lr 6e-4, adapter lr 6e-5, wd 0.01 on all trained parameters (Decision 14)."""
    a, m = run.args, run.model
    groups = [{"params": list(m.neck.parameters()) + list(m.head.parameters()), "lr": a.lr, "base_lr": a.lr},
              {"params": list(m.adapter.parameters()), "lr": a.adapter_lr, "base_lr": a.adapter_lr}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=a.weight_decay)


def train_step(run: Run, net: nn.Module, opt, scaler, x: torch.Tensor, y: torch.Tensor,
               scene_idx: torch.Tensor, step: int) -> dict:
    """One optimizer step of the joint loss L = L_seg + lambda_cons * L_cons. Returns detached loss values."""
    a = run.args
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * poly_warmup_factor(step, a.iters, a.warmup_iters, 1e-6, 1.0)
    # ---------- METHOD STEP BEGIN ----------
    B, Ks = x.shape[0], scene_idx.shape[1]
    # VAE encode once per image under no_grad; the K_s prompts of an image share its latent.
    z = run.sd.encode(x)                                                                   # (B, 4, H/8, W/8)
    z = z.repeat_interleave(Ks, 0)                                                        # (B * K_s, 4, h, w)
    # Prompt randomization: K_s distinct scene tokens per image, all B * K_s contexts in ONE UNet call.
    scene = run.model.scene_pool[scene_idx.flatten().to(run.device)]                       # (B * K_s, d)
    with run.precision.autocast():
        logits = net(run.sd, z, scene)                                                    # (B * K_s, K, h, w)
    logits = logits.float().view(B, Ks, *logits.shape[1:])                                 # (B, K_s, K, h, w)
    loss_ce = segmentation_loss(logits, y)
    loss_cons = consistency_loss(logits)
    loss = loss_ce + a.consistency_weight * loss_cons                                      # joint loss
    runtime.check_finite(loss, step, run.out)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # reaches the adapter through the frozen UNet's cross-attention
    scaler.step(opt)
    scaler.update()
    # ---------- METHOD STEP END ----------
    return {"loss_ce": loss_ce.item(), "loss_cons": loss_cons.item(), "lr": opt.param_groups[0]["lr"]}


def checkpoint_state(run: Run, opt, scaler, step: int) -> tuple[dict, dict]:
    """(weights: adapter + FPN + head incl. BN statistics, state: optimizer, scaler, RNG, step, args)."""
    weights = {k: v for k, v in run.model.state_dict().items()}
    state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "rng": runtime.get_rng_state(), "args": dataclasses.asdict(run.args)}
    return weights, state


def train(run: Run) -> tuple[dict, list]:
    """Source-only training with prompt randomization; evaluates every --eval-every steps and at the end.

    Returns (the last evaluation {target: result}, the logged (averaged) loss history).
    """
    a, model = run.args, run.model
    model.train()
    net = run.dist.wrap(model)
    opt, scaler = make_optimizer(run), run.precision.make_scaler()
    stream = cd.TrainStream(run.src_train, a.seed, stream_id=0)
    start = 0
    if a.resume:
        ck = runtime.resume_checkpoint(run.out)
        weights, state = runtime.load_checkpoint(ck, map_location=run.device)
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        start = state["step"]
        print(f"resumed from {ck} at step {start}")
    timer, result, window, history = runtime.RunTimer(), {}, {}, []
    n_pool, b0 = len(SCENE_PROMPTS), run.dist.rank * a.batch_size  # global batch = batch_size x world
    for step in range(start, a.iters):
        batch = stream.batch(step, b0, a.batch_size)
        x, y = to_model_input(batch, run.device)                                     # (B, 3, H, W), (B, H, W)
        idx = draw_scene_prompts(a.seed, step, b0, a.batch_size, n_pool, a.scene_prompts_per_image)
        logs = train_step(run, net, opt, scaler, x, y, idx, step)
        timer.tick()
        window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
        done = step + 1
        if done % a.log_every == 0 or done == a.iters:  # losses averaged over the steps since the last line
            n = timer.n
            avg = {k: (v / n if k != "lr" else logs["lr"]) for k, v in window.items()}
            history.append({"step": done, **avg})
            window = {}
            if run.dist.is_main:
                print(runtime.log_line(done, a.iters, avg, timer.lap(), runtime.peak_memory_gb(run.device)),
                      flush=True)
        if (done % a.ckpt_every == 0 or done == a.iters) and run.dist.is_main:
            weights, state = checkpoint_state(run, opt, scaler, done)
            runtime.save_checkpoint(run.out, done, weights, state, keep=a.keep_ckpts)
        if done % a.eval_every == 0 or done == a.iters:
            result = evaluate_targets(run, done, scene=None)
            model.train()
    if not result:  # resumed a run that had already finished: score its final weights
        result = evaluate_targets(run, a.iters, scene=None)
    return result, history


# ------------------------------------------------------------------------------------------------------------
# Test-time domain adaptation: learn only the scene prompt on the unlabeled target (abstract; Decision 16)
# ------------------------------------------------------------------------------------------------------------
def ttda(run: Run, target: str) -> torch.Tensor:
    """Optimise the scene token s (1, d), initialised to prompt 0, on target train crops; return it (1, d).

    Everything else is frozen and in eval mode (BN statistics, dropout off), so after TTDA every tensor of the
    model and of SD is bit-identical; only s changes.
    """
    a, model, sd = run.args, run.model, run.sd
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    s0 = model.scene_pool[:1].clone()                                                      # (1, d) prompt 0
    s = nn.Parameter(s0.clone())
    opt = torch.optim.AdamW([s], lr=a.ttda_lr, weight_decay=0.0)  # constant LR
    stream = cd.TrainStream(run.tgt_train[target], a.seed, stream_id=1)
    timer, kept_sum, used = runtime.RunTimer(), 0.0, 0
    for step in range(a.ttda_steps):
        x, _ = to_model_input(stream.batch(step, run.dist.rank * a.batch_size, a.batch_size), run.device)
        B = x.shape[0]
        # ---------- METHOD STEP BEGIN ----------
        z = sd.encode(x)                                                                   # (B, 4, h, w)
        with torch.no_grad(), run.precision.autocast():
            logits_src = model(sd, z, s0.expand(B, -1))  # pseudo labels: frozen model, prompt 0 (B, K, h, w)
        with run.precision.autocast():
            logits = model(sd, z, s.expand(B, -1))       # gradient reaches s through cross-attention
        loss, kept = ttda_loss(logits, logits_src, tuple(x.shape[-2:]), a.ttda_threshold)
        opt.zero_grad(set_to_none=False)
        if loss is not None:
            runtime.check_finite(loss, step)
            loss.backward()
        any_kept = torch.tensor([float(loss is not None)], device=run.device)
        if run.dist.world > 1:  # s is not inside a DDP module: average its gradient over processes by hand
            s.grad = s.grad if s.grad is not None else torch.zeros_like(s)
            run.dist.all_reduce_sum(any_kept)
            run.dist.all_reduce_sum(s.grad)
            s.grad /= run.dist.world
        if any_kept.item() > 0:  # no confident pixel anywhere: skip the step (it counts toward --ttda-steps)
            opt.step()
            kept_sum, used = kept_sum + kept, used + 1
        # ---------- METHOD STEP END ----------
        timer.tick()
        if run.dist.is_main and ((step + 1) % a.log_every == 0 or step + 1 == a.ttda_steps):
            vals = {"loss_ttda": loss.item() if loss is not None else 0.0, "kept": kept, "lr": a.ttda_lr}
            print("ttda " + runtime.log_line(step + 1, a.ttda_steps, vals, timer.lap(),
                                            runtime.peak_memory_gb(run.device)), flush=True)
    if run.dist.is_main:
        print(f"ttda {target}: {used}/{a.ttda_steps} steps had confident pixels (mean kept fraction "
              f"{kept_sum / max(used, 1):.3f}); |s - s0| = {float((s.detach() - s0).norm()):.3e}")
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.train(was_training)
    return s.detach()


# ------------------------------------------------------------------------------------------------------------
# Evaluation: sliding window over the eval-resized image (Decision 15), scored by common.metrics
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def slide_logits(run: Run, x: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """x (1, 3, H, W) in [0, 1] -> logits (1, K, H, W), windows of --crop-size at --eval-stride (mmseg slide).

    Windows whose logits overlap are averaged (each window's stride-8 logits upsampled to the window first);
    an image smaller than the window is zero-padded (in [-1, 1] space) and cropped back.
    """
    a = run.args
    win, stride = a.crop_size, a.eval_stride
    _, _, H, W = x.shape
    x = x * 2 - 1
    ph, pw = max(win - H, 0), max(win - W, 0)
    x = F.pad(x, (0, pw, 0, ph))
    Hp, Wp = x.shape[-2:]
    ys = list(range(0, max(Hp - win, 0) + 1, stride))
    xs = list(range(0, max(Wp - win, 0) + 1, stride))
    ys += [Hp - win] if ys[-1] != Hp - win else []  # the last window is aligned with the border
    xs += [Wp - win] if xs[-1] != Wp - win else []
    boxes = [(y0, x0) for y0 in ys for x0 in xs]
    acc = torch.zeros(1, run.num_classes, Hp, Wp, device=x.device)
    cnt = torch.zeros(1, 1, Hp, Wp, device=x.device)
    for i in range(0, len(boxes), 4):  # up to 4 windows per UNet call
        chunk = boxes[i:i + 4]
        xw = torch.cat([x[..., y0:y0 + win, x0:x0 + win] for y0, x0 in chunk])             # (n, 3, win, win)
        with run.precision.autocast():
            lg = run.model(run.sd, run.sd.encode(xw), scene.expand(len(chunk), -1))     # (n, K, win/8, win/8)
        lg = F.interpolate(lg.float(), size=(win, win), mode="bilinear", align_corners=False)
        for (y0, x0), l in zip(chunk, lg):
            acc[..., y0:y0 + win, x0:x0 + win] += l
            cnt[..., y0:y0 + win, x0:x0 + win] += 1
    return (acc / cnt)[..., :H, :W]                                                        # (1, K, H, W)


def evaluate(run: Run, target: str, step: int, scene: torch.Tensor, tag: str = "source prompt") -> dict:
    """Score one target's eval split with `scene` (1, d) through common.metrics.evaluate; print the table."""
    ds = run.tgt_eval[target]
    info = ds.info
    run.model.eval()
    # Exact-resize targets have one eval input size; keep-ratio ones (Mapillary, GTA) are resized per image.
    first_hw = tuple(ds.load_label(0).shape)
    fixed = info.eval_input[0] == "exact"
    input_size = cd.eval_input_size(target, first_hw, run.scale) if fixed else None

    def predict(x: torch.Tensor) -> torch.Tensor:
        if not fixed:
            W, H = cd.eval_input_size(target, tuple(x.shape[-2:]), run.scale)
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return slide_logits(run, x, scene)

    pics = None
    if run.out is not None and run.dist.is_main:
        pics = run.out / "predictions" / ("ttda" if tag != "source prompt" else "")
    res = metrics.evaluate(predict, ds, run.num_classes, run.class_names, run.palette, device=run.device,
                           dist=run.dist, input_size=input_size, metric_size=info.metric,
                           desc=f"{target} {ds.split} ({tag})", pictures_dir=pics,
                           synthia=(target == "synthia"))
    if run.dist.is_main:
        print(res["table"])
        W, H = input_size or cd.eval_input_size(target, first_hw, run.scale)
        mh, mw = {"native": first_hw, "half": (first_hw[0] // 2, first_hw[1] // 2)}.get(info.metric, (H, W))
        print(f"eval step {step} | {target} | {tag} | mIoU {100 * res['miou']:.2f} | input {W}x{H} | "
              f"metric {mw}x{mh}", flush=True)
        if run.out is not None:
            record = {"step": step, "target": target, "prompt": tag, "miou": res["miou"],
                      "per_class_iou": res["per_class_iou"], "resolution": res["resolution"]}
            runtime.write_metrics(run.out, record)
    return res


def evaluate_targets(run: Run, step: int, scene: Optional[dict] = None, tag: str = "source prompt") -> dict:
    """Every target scored separately (DG protocol) with prompt 0 or its TTDA prompt; the mean is printed."""
    res = {}
    for t in run.tgt_eval:
        s = scene[t] if scene is not None else run.model.scene_pool[:1]
        res[t] = evaluate(run, t, step, s, tag)
    if len(res) > 1 and run.dist.is_main:
        print(f"eval step {step} | mean over {len(res)} targets | {tag} | mIoU "
              f"{100 * float(np.mean([r['miou'] for r in res.values()])):.2f}")
    return res


# ------------------------------------------------------------------------------------------------------------
# --profile: one training step at the requested size, random inputs, nothing written
# ------------------------------------------------------------------------------------------------------------
def profile(run: Run) -> dict:
    a = run.args
    net, opt, scaler = run.dist.wrap(run.model.train()), make_optimizer(run), run.precision.make_scaler()
    g = torch.Generator().manual_seed(a.seed)
    x = (torch.rand(a.batch_size, 3, a.crop_size, a.crop_size, generator=g) * 2 - 1).to(run.device)
    y = torch.randint(0, run.num_classes, (a.batch_size, a.crop_size, a.crop_size), generator=g).to(x.device)
    idx = draw_scene_prompts(a.seed, 0, 0, a.batch_size, len(SCENE_PROMPTS), a.scene_prompts_per_image)
    step_fn = lambda: train_step(run, net, opt, scaler, x, y, idx, 0)  # noqa: E731
    extra = {"method": "ptdiffseg", "sd_model": a.sd_model, "crop_size": a.crop_size, "batch": a.batch_size,
             "unet_batch": a.batch_size * a.scene_prompts_per_image, "grad_ckpt": a.grad_checkpointing,
             "precision": run.precision.reason}
    result = runtime.profile_training(step_fn, a.profile, run.device, extra=extra)
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------
def resolve_args(args: Args) -> Args:
    """Apply the --demo values (only where the user kept a default) and the default --out."""
    if args.demo:  # tiny random SD + synthetic sample, ~1 minute on CPU; the user's own flags win
        args = runtime.replace_defaults(args, sd_model="tiny", data_root="data/synthetic", crop_size=64,
                                        out="runs/ptdiffseg-demo", iters=50, eval_every=50, log_every=10,
                                        ckpt_every=50,
                                        warmup_iters=5, lr=6e-3, adapter_lr=6e-4, eval_stride=43, ttda=True,
                                        ttda_steps=8, ttda_lr=1e-2, ttda_threshold=0.5)
        ensure_synthetic_sample(args.data_root)
    if args.out is None:
        args = dataclasses.replace(args, out=f"runs/ptdiffseg-{args.src}-{args.tgt.replace(',', '+')}")
    return args


def main(args: Args) -> dict:
    args = resolve_args(args)
    runtime.seed_everything(args.seed)  # the one seeding block (Python, NumPy, torch); streams seed per step
    run = setup(args)
    if run.dist.is_main:
        print("args: " + json.dumps(dataclasses.asdict(args)))
        print(f"device {run.device} | {run.precision.reason}")
    if args.profile:
        return profile(run)
    if run.dist.is_main:
        runtime.write_metrics(run.out, dataclasses.asdict(args), key="args")
    step, history = 0, []
    if args.eval_only:
        weights, state = runtime.load_checkpoint(args.ckpt, map_location=run.device)
        try:
            run.model.load_state_dict(weights)
        except RuntimeError:  # e.g. trained for another class set or SD version
            raise UserError(f"error: --ckpt: '{args.ckpt}' does not fit this model ({run.num_classes} "
                            f"classes, --sd-model {args.sd_model}). Expected a ptdiffseg.py checkpoint "
                            "trained with the same class set and SD model.") from None
        step = int(state.get("step", 0))
        result = evaluate_targets(run, step)
    else:
        result, history = train(run)
        step = args.iters
    out = {t: {"miou": r["miou"], "per_class_iou": r["per_class_iou"]} for t, r in result.items()}
    summary = {"step": step, "targets": out, "miou": float(np.mean([r["miou"] for r in result.values()])),
               "per_class_iou": next(iter(out.values()))["per_class_iou"], "train_log": history}
    if args.ttda:
        scenes = {t: ttda(run, t) for t in run.tgt_eval}
        after = evaluate_targets(run, step, scenes, tag="TTDA prompt")
        record = {}
        for t in run.tgt_eval:
            b, f = result[t]["miou"], after[t]["miou"]
            record[t] = {"miou_before": b, "miou_after": f, "delta": f - b, "steps": args.ttda_steps}
            if run.dist.is_main:
                print(f"ttda {t} | source prompt mIoU {100 * b:.2f} | TTDA prompt mIoU {100 * f:.2f} | "
                      f"delta {100 * (f - b):+.2f}")
                (run.out / "ttda").mkdir(exist_ok=True)
                save_file({"scene": scenes[t].cpu().contiguous()},
                          str(run.out / "ttda" / f"{t}_scene.safetensors"))
        if run.dist.is_main:
            runtime.write_metrics(run.out, record, key="ttda")
        summary.update(ttda=record, miou_before_ttda=summary["miou"],
                       miou=float(np.mean([r["miou"] for r in after.values()])))
    if run.dist.is_main:
        print(f"done | mIoU {100 * summary['miou']:.2f} | peak memory "
              f"{runtime.peak_memory_gb(run.device):.2f} GB | outputs in {run.out}")
    return summary


if __name__ == "__main__":
    runtime.run_cli(main, Args)
