"""`mini`: a Stable Diffusion pretrained here, on the synthetic world, in about an hour on one CPU thread.

Why it exists. Every mechanism of the four methods rests on what SD learned in pretraining: UNet features that
separate objects (MADM, DIFF), a VAE whose latents are images (MADM's label-palette regression, ICCLD's label
latents), a text encoder aligned with images (PTDiffSeg's scene prompts, DIFF's class prompts). A randomly
initialised miniature (`--sd-model tiny`) has none of it, so on it no method can show what its paper shows.
`mini` gives the synthetic world (common/synthetic.py) what SD's web-scale pretraining gave the real one.

What it is: SD 1.x's structure at a small width -- AutoencoderKL (f = 8, 4 latent channels),
UNet2DConditionModel with cross-attention in SD's block layout (so every hook name of the methods works), a
CLIP text model with the byte-level tokenizer of `tiny`, SD's scaled-linear DDPM schedule and epsilon-
prediction.

How it is pretrained (the recipe of Rombach et al. 2022, https://arxiv.org/abs/2112.10752, made small):
  1. Corpus. A synthetic sample with its own generator seed (never the demo's or the benchmark's) is written
     in the real on-disk layouts and read back through the project's own loaders
     (`build_dataset(...).sample`), so the pretraining images are exactly what the scripts see: 64 x 64 train
     crops of every domain -- RGB in the Cityscapes / GTA5 / SYNTHIA / ACDC fog, night, rain, snow / Dark
     Zurich / BDD / Mapillary styles, DSEC event frames, FMB infrared, DELIVER depth. Each crop gets a caption
     built from what generated it (its domain and the classes drawn in it), e.g. "an event camera frame of an
     urban street scene with road, car".
     Labels are never a training target: they only name the classes in the caption, like alt text.
  2. VAE: reconstruction (L1 on pixels + L1 on pixel differences, meant for the thin edges of event frames)
     + a small KL (SD: 1e-6). It also sees "flat colour drawings" of scenes with random colours per region, as
     SD's VAE saw drawings among web images (our choice): the methods encode colour label images with it.
     SD's scaling factor (0.18215 for SD 1.x) is recomputed as 1 / std of our latents, the way it was derived.
  3. UNet + text encoder together on the epsilon-prediction loss, t ~ U{0..999}, the caption dropped to "" for
     10 % of samples (as SD 1.x did for classifier-free guidance), so "" means "no description".
  4. Held-out report (a fourth generator seed): VAE reconstruction PSNR per domain, and the epsilon-MSE per
     timestep range with the right caption, with "" and with another domain's caption (same noise, same t).

    python -m common.mini_sd --out runs/mini-sd          # the full pretraining (75 min on 1 shared thread)
    python -m common.mini_sd --out /tmp/m --smoke        # a few steps of everything: checks that it runs
    python -m common.mini_sd --report common/mini-sd     # the held-out report of the shipped folder

The result is shipped in `common/mini-sd/` (fp32 safetensors, a diffusers folder) and loaded by
`load_sd("mini")` through the same `from_pretrained` code as a hub id; `pretraining.json` there holds the
settings and the report. Deterministic for a seed and a thread count (PyTorch's CPU kernels may sum in another
order with more threads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

SHIPPED = Path(__file__).resolve().parent / "mini-sd"   # the pretrained folder in the repository

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def mini_config() -> dict:
    """Configs of the mini UNet, VAE, text encoder and scheduler (kwargs of the diffusers / transformers
    classes).

    Widths: twice `tiny`'s first VAE / UNet stage and a 64-wide text model -- what pretrains in about an hour
    on one CPU thread. Measured (the report): its 8 x 8 latents of a 64 x 64 crop keep the layout and the
    class colours, not the class textures nor the edges of event frames.
    """
    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
                layers_per_block=2, down_block_types=_DOWN, up_block_types=_UP, cross_attention_dim=64,
                attention_head_dim=4, norm_num_groups=8)
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(32, 64, 64, 64),
               layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
               scaling_factor=0.18215)
    text = dict(vocab_size=514, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=77, projection_dim=64, bos_token_id=512,
                eos_token_id=513, pad_token_id=513)
    # SD's training schedule (CompVis v1-inference.yaml): 1000 steps, scaled-linear betas 0.00085 -> 0.012
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}


# ------------------------------------------------------------------------------------------------------------
# 1. Corpus: train crops of every domain, read through the project's loaders, with captions
# ------------------------------------------------------------------------------------------------------------
_STREET = "an urban street scene"
# domain -> the words that describe it (the same words PTDiffSeg's scene prompts use: night, fog, rain, snow,
# video game, dashcam) and how many 64 x 64 crops of it the corpus holds (grey modalities: more, they are
# furthest from RGB and the adapted targets)
DOMAINS = {
    "cityscapes": (f"a photo of {_STREET}", 1),
    "gta5": (f"a rendering of {_STREET} in a video game", 1),
    "synthia": (f"a flat rendering of {_STREET}", 1),
    "acdc_fog": (f"a photo of {_STREET} in dense fog", 1),
    "acdc_night": (f"a photo of {_STREET} at night", 1),
    "acdc_rain": (f"a photo of {_STREET} in heavy rain", 1),
    "acdc_snow": (f"a photo of {_STREET} in snow", 1),
    "dark_zurich": (f"a photo of {_STREET} at night", 1),
    "bdd100k": (f"a dashcam photo of {_STREET}", 1),
    "mapillary": (f"a high contrast photo of {_STREET}", 1),
    "dsec_event": (f"an event camera frame of {_STREET}", 3),
    "fmb_infrared": (f"an infrared photo of {_STREET}", 2),
    "deliver_depth": (f"a depth map of {_STREET}", 2),
}
CROP = 64          # the demos' crop: an 8 x 8 latent
MIN_SHARE = 0.03   # a class is named in the caption when it covers >= 3 % of the crop


def caption(domain: str, label: np.ndarray, class_names: list[str], rng: np.random.Generator) -> str:
    """"<domain words> with <classes in the crop>", classes in random order (the 77-token limit cuts the end
    of long captions -- the byte-level tokenizer spends a token per letter -- so no class is always cut)."""
    counts = np.bincount(label[label < 255].ravel(), minlength=len(class_names))
    present = [class_names[k] for k in np.flatnonzero(counts >= MIN_SHARE * label.size)]
    rng.shuffle(present)
    words = DOMAINS[domain][0]
    return f"{words} with {', '.join(present)}" if present else words


def build_corpus(seed: int, crops_per_unit: int, n_images: int, work: Path, log=print) -> dict:
    """Write a synthetic sample (generator seed `seed`) under `work` and cut captioned train crops from it.

    Returns:
        {"images": uint8 (N, 3, 64, 64), "captions": [str], "domains": [str], "drawings": uint8 (M, 3, 64, 64)
         flat colour drawings (random colour per labelled region; for the VAE only)}.
    """
    from common.datasets import DATASETS, build_dataset
    from common.synthetic import write_synthetic_sample
    root = write_synthetic_sample(work / f"sample-{seed}", n_train=n_images, n_eval=1, seed=seed)
    rng = np.random.default_rng(seed)
    images, captions, domains, drawings = [], [], [], []
    for domain, (_, weight) in DOMAINS.items():
        ds = build_dataset(domain, root, split=DATASETS[domain].train_split, train=True, crop_size=CROP,
                           scale=1 / 8)
        for _ in range(crops_per_unit * weight):
            s = ds.sample(int(rng.integers(len(ds))), rng)
            images.append((s["image"].numpy() * 255).round().astype(np.uint8))        # (3, 64, 64)
            label = s["label"].numpy()
            captions.append(caption(domain, label, list(ds.class_names), rng))
            domains.append(domain)
            if domain == "cityscapes":
                colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)     # a random colour per class
                drawings.append(colours[label].transpose(2, 0, 1))
        log(f"corpus | {domain}: {crops_per_unit * weight} crops, e.g. \"{captions[-1]}\"")
    return {"images": torch.from_numpy(np.stack(images)), "captions": captions, "domains": domains,
            "drawings": torch.from_numpy(np.stack(drawings))}


def _to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1  # uint8 [0, 255] -> [-1, 1], the VAE's input range


# ------------------------------------------------------------------------------------------------------------
# 2. VAE: reconstruction + gradient L1 + small KL
# ------------------------------------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, gen: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """L = |x - x_hat|_1 + |dx - dx_hat|_1 + |dy - dy_hat|_1 + kl_weight * KL(q(z|x) || N(0, I));
    x (B, 3, H, W) in [-1, 1]."""
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)                                       # (B, 4, H/8, W/8)
    x_hat = vae.decode(z).sample                                         # (B, 3, H, W)
    rec = (x_hat - x).abs().mean()
    grad = ((x_hat.diff(dim=-1) - x.diff(dim=-1)).abs().mean()          # horizontal differences
            + (x_hat.diff(dim=-2) - x.diff(dim=-2)).abs().mean())       # vertical differences
    kl = post.kl().mean() / x[0].numel()                                 # per pixel, like the L1 terms
    return rec + grad + kl_weight * kl, {"rec": rec.item(), "grad": grad.item(), "kl": kl.item()}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % (our choice)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, corpus: dict, iters: int, batch: int, lr: float, seed: int, log=print) -> None:
    data = torch.cat([corpus["images"], corpus["drawings"]])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, iters, max(1, iters // 20)))
    vae.train().requires_grad_(True)
    t0 = time.time()
    for step in range(iters):
        idx = torch.randint(len(data), (batch,), generator=gen)
        x = _to_model(data[idx])
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        loss, parts = vae_loss(vae, x, gen, kl_weight=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == iters - 1:
            log(f"vae step {step + 1}/{iters} | loss {loss.item():.4f} | rec {parts['rec']:.4f} | "
                f"grad {parts['grad']:.4f} | kl {parts['kl']:.2f} | {time.time() - t0:.0f} s")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """-> posterior mean and std, each (N, 4, 8, 8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_to_model(images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------------------------
# 3. UNet + text encoder: epsilon-prediction with captions (10 % dropped)
# ------------------------------------------------------------------------------------------------------------
def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """(N, 77) ids, padded / truncated exactly as `common.sd_backbone.encode_prompts` does at run time."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def eps_loss(unet, text_encoder, scheduler, z0: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """L = || eps - eps_theta(z_t, t, tau(y)) ||^2, z_t = sqrt(a_bar_t) z0 + sqrt(1 - a_bar_t) eps
    (LDM Eq. 2)."""
    z_t = scheduler.add_noise(z0, eps, t)                                # (B, 4, 8, 8)
    ctx = text_encoder(ids).last_hidden_state                            # (B, 77, d)
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=ctx).sample, eps)


def train_unet(unet, text_encoder, scheduler, z_mean: torch.Tensor, z_std: torch.Tensor, ids: torch.Tensor,
               empty_ids: torch.Tensor, scale: float, iters: int, batch: int, lr: float, seed: int,
               drop: float = 0.1, log=print) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, iters, max(1, iters // 20)))
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    t0, avg = time.time(), None
    for step in range(iters):
        idx = torch.randint(len(z_mean), (batch,), generator=gen)
        # z0 ~ q(z | x): a posterior sample, scaled to unit variance (SD trains on samples, not the mean)
        z0 = (z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)) * scale
        b_ids = torch.where((torch.rand(batch, generator=gen) < drop)[:, None], empty_ids, ids[idx])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        loss = eps_loss(unet, text_encoder, scheduler, z0, b_ids, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 200 == 0 or step == iters - 1:
            log(f"unet step {step + 1}/{iters} | eps-mse {avg:.4f} | lr {sched.get_last_lr()[0]:.1e} | "
                f"{time.time() - t0:.0f} s")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------
# 4. Held-out report
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def report(parts: dict, held: dict, seed: int) -> dict:
    """PSNR of the VAE per domain; epsilon-MSE per timestep range with the right caption, "" and another
    domain's caption (the other domain's words, the same class list), the same z0, t and noise for all."""
    vae, unet, te, tok, sch = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    x = _to_model(held["images"])
    mean, _ = encode(vae, held["images"])
    rec = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(mean), 256)]).clamp(-1, 1)
    doms = np.array(held["domains"])

    def psnr(y: torch.Tensor) -> dict:                                  # per domain, images in [0, 1] units
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1)
        return {d: float((10 * torch.log10(1 / mse[torch.from_numpy(doms == d)])).mean()) for d in DOMAINS}
    # two references that need no training: each image's mean colour, and its 8 x 8 block means upsampled
    # (what an 8 x 8 grid of averages keeps: the layout, no texture, no edges)
    flat = x.mean((1, 2, 3), keepdim=True).expand_as(x)
    blocks = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    z0 = mean * vae.config.scaling_factor
    t = torch.randint(0, 1000, (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    names = list(DOMAINS)
    other = [names[(names.index(d) + 1 + int(torch.randint(len(names) - 1, (), generator=gen))) % len(names)]
             for d in held["domains"]]
    variants = {"right": held["captions"], "empty": [""] * len(z0),
                "other domain": [c.replace(DOMAINS[d][0], DOMAINS[o][0], 1)
                                 for c, d, o in zip(held["captions"], held["domains"], other)]}
    out = {"psnr_db": psnr(rec), "psnr_db_mean_image": psnr(flat), "psnr_db_8x8_block_means": psnr(blocks),
           "eps_mse": {}}
    for name, texts in variants.items():
        errs = []
        for i in range(0, len(z0), 256):
            ctx = te(tokenize(tok, texts[i:i + 256])).last_hidden_state
            z_t = sch.add_noise(z0[i:i + 256], eps[i:i + 256], t[i:i + 256])
            pred = unet(z_t, t[i:i + 256], encoder_hidden_states=ctx).sample
            errs.append((pred - eps[i:i + 256]).pow(2).flatten(1).mean(1))
        err = torch.cat(errs)
        out["eps_mse"][name] = {f"t {lo}-{lo + 249}": float(err[(t >= lo) & (t < lo + 250)].mean())
                                for lo in (0, 250, 500, 750)} | {"all": float(err.mean())}
    return out


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------
def build_parts() -> dict:
    """Random-initialised mini parts from `mini_config()` (the tokenizer is `tiny`'s byte-level one)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from common.sd_backbone import write_tiny_tokenizer
    cfg = mini_config()
    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(d)
        tok = CLIPTokenizer.from_pretrained(d)
    return {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), "tokenizer": tok,
            "scheduler": DDPMScheduler(**cfg["scheduler"])}


def pretrain(a: argparse.Namespace, log=print) -> dict:
    """Corpus -> VAE -> scaling factor -> UNet + text encoder -> held-out report; returns parts and report."""
    torch.manual_seed(a.seed)
    parts = build_parts()
    with tempfile.TemporaryDirectory() as work:
        corpus = build_corpus(a.seed, a.crops, a.images, Path(work), log)
        held = build_corpus(a.seed + 1, max(4, a.crops // 8), max(4, a.images // 8), Path(work),
                            lambda s: None)
    log(f"corpus | {len(corpus['images'])} crops + {len(corpus['drawings'])} drawings; held out "
        f"{len(held['images'])} crops (generator seeds {a.seed}, {a.seed + 1})")
    train_vae(parts["vae"], corpus, a.vae_iters, a.vae_batch, a.vae_lr, a.seed, log)
    z_mean, z_std = encode(parts["vae"], corpus["images"])
    scale = float(1 / z_mean.std())                               # SD: 0.18215 = 1 / std of its latents
    parts["vae"].register_to_config(scaling_factor=scale)
    log(f"vae | scaling factor 1 / std(z) = {scale:.4f}")
    tok = parts["tokenizer"]
    train_unet(parts["unet"], parts["text_encoder"], parts["scheduler"], z_mean, z_std,
               tokenize(tok, corpus["captions"]), tokenize(tok, [""]), scale, a.unet_iters, a.unet_batch,
               a.unet_lr, a.seed, log=log)
    rep = report(parts, held, a.seed + 2)
    for key in ("psnr_db", "psnr_db_mean_image", "psnr_db_8x8_block_means"):
        log(f"report | {key}: " + ", ".join(f"{d} {v:.1f}" for d, v in rep[key].items()))
    for name, r in rep["eps_mse"].items():
        log(f"report | eps-MSE {name:>12}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
    return {"parts": parts, "report": rep, "corpus_size": len(corpus["images"])}


def save(parts: dict, out: Path, meta: dict) -> None:
    """Write the diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/, model_index.json,
    pretraining.json) atomically: into a temporary sibling, renamed into place at the end."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        parts[part].save_pretrained(tmp / part)
    (tmp / "pretraining.json").write_text(json.dumps(meta, indent=1) + "\n")
    index = {"_class_name": "StableDiffusionPipeline", "mini": True}
    (tmp / "model_index.json").write_text(json.dumps(index))
    os.rename(tmp, out)


def print_report(folder: str, seed: int, crops: int, images: int) -> int:
    """The held-out report of a pretrained folder, as `pretrain` computes it (same held-out seed, sizes)."""
    from common.sd_backbone import load_sd
    sd = load_sd(folder)
    parts = {"vae": sd.vae, "unet": sd.unet, "text_encoder": sd.text_encoder, "tokenizer": sd.tokenizer,
             "scheduler": sd.scheduler}
    with tempfile.TemporaryDirectory() as work:
        held = build_corpus(seed + 1, max(4, crops // 8), max(4, images // 8), Path(work), lambda s: None)
    print(json.dumps(report(parts, held, seed + 2), indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain the mini SD on the synthetic world.")
    p.add_argument("--out", help="new folder to write (refused if it exists)")
    p.add_argument("--seed", type=int, default=1000, help="corpus generator seed (held-out: seed + 1)")
    p.add_argument("--images", type=int, default=200, help="generated images per dataset split")
    p.add_argument("--crops", type=int, default=600, help="crops per domain (x its weight in DOMAINS)")
    p.add_argument("--vae-iters", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=12)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-iters", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (a check that it runs)")
    p.add_argument("--report", metavar="FOLDER", help="only print the held-out report of a pretrained folder")
    a = p.parse_args(argv)
    if a.report:
        return print_report(a.report, a.seed, a.crops, a.images)
    if not a.out:
        print("error: --out is required: the new folder to write (or --report FOLDER).", file=sys.stderr)
        return 2
    if a.smoke:
        a.images, a.crops, a.vae_iters, a.unet_iters, a.vae_batch, a.unet_batch = 8, 8, 2, 2, 4, 4
    out = Path(a.out)
    if out.exists():
        print(f"error: --out {out} exists. Expected a new folder (nothing is overwritten).", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = pretrain(a, log=lambda s: print(s, flush=True))
    meta = {"command": "python -m common.mini_sd " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": vars(a), "config": mini_config(), "corpus_crops": res["corpus_size"],
            "threads": torch.get_num_threads(), "seconds": round(time.time() - t0),
            "torch": torch.__version__, "report": res["report"]}
    save(res["parts"], out, meta)
    print(f"wrote {out} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
