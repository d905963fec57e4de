"""The official DIFF structure, rebuilt as the reference of diff.py's equality tests (tests/test_diff.py)
and of the FLOP comparison in benchmarks/diff.sh. Not method code: it keeps on purpose the three wastes
diff.py removes.

The structure of the official code (Yux1angJi/DIFF: `mmseg/models/backbones/diff/src/archs/stable_diffusion/
diffusion.py` generalized_steps, `.../archs/diffusion_extractor.py`, `.../models/diff.py` DIFFEncoder):
  - each branch runs its own UNet call per step, on [B negative "" rows ; B "" rows ; class-prompt rows], and
    every positive row is guided: eps_k = eps_neg + g (eps_k - eps_neg);
  - the CA feature of a sample is the transformer-block output summed over ALL its rows, the negative "" pass
    included; the ResNet feature is the output of the first B rows (the negative "" pass);
  - all 37 loop steps run, up to t = 160;
  - the stride-64 decoder block (`up_blocks[0]`) is hooked too, and its bottleneck is built and run, its
    output discarded.
The inversion update and the mask fusion are written out here again (official `get_xt_next` and mask
branch), independently of diff.py. The random draws follow diff.py's order (each branch's VAE sample, then at
every step one tensor for the positive rows of both branches), so both see the same numbers; the official
draws are unseeded, so no order is "the" official one.

As a script, the FLOP comparison of one training iteration, ours against this structure, on the meta device
(no weights, nothing computed), for a label without and one with all five prompt classes:
    python tests/diff_reference.py --arch sd21 --crop-size 512 --num-steps 37
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import diff  # noqa: E402
from benchmarks.measure import count_flops  # noqa: E402
from common.sd_backbone import FeatureCapture, build_random_sd  # noqa: E402


def official_layers(unet: torch.nn.Module, vae_stride: int = 8) -> dict[int, list[tuple[str, int]]]:
    """{stride: [(module name, channels)]} of every decoder block, stride 64 included; per block the
    ResNets' `conv2`, then the transformer blocks (official `resnet.py` hooks,
    `collect_stride_feats_with_timesteplist`)."""
    n, layers = len(unet.up_blocks), {}
    for i, block in enumerate(unet.up_blocks):
        names = [(f"up_blocks.{i}.resnets.{j}.conv2", r.conv2.out_channels)
                 for j, r in enumerate(block.resnets)]
        names += [(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0",
                   a.transformer_blocks[0].norm1.normalized_shape[0])
                  for j, a in enumerate(getattr(block, "attentions", None) or [])]
        layers[vae_stride * 2 ** (n - 1 - i)] = names
    return layers


def prompt_rows(ext: diff.DiffusionExtractor, y: Optional[torch.Tensor], B: int, h: int, w: int,
                device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """[(sample, prompt index, mask (1, h, w))]: the B "" rows (mask 1), then per sample the prompt classes in
    `torch.unique` order of its labels (ascending, as the official loop), masks nearest-resized."""
    rows = [(b, 0, torch.ones(1, h, w, device=device)) for b in range(B)]
    for b in range(B if y is not None else 0):
        for c in torch.unique(y[b]).tolist():
            if c in ext.prompt_ids:
                mask = F.interpolate((y[b] == c)[None, None].float(), size=(h, w), mode="nearest")[0]
                rows.append((b, ext.prompt_ids.index(c) + 1, mask.to(device)))
    return rows


@torch.no_grad()
def official_features(ext: diff.DiffusionExtractor, x: torch.Tensor, y: torch.Tensor,
                      generator: Optional[torch.Generator] = None, all_steps: bool = True,
                      stride64: bool = True) -> dict[str, dict[int, torch.Tensor]]:
    """Both branches' features with the official structure (see the module docstring): {branch: {stride:
    (B, C_in, H/s, W/s)}}, strides 64 (if `stride64`), 32, 16, 8. `y` on the CPU (or the device)."""
    B, _, H, W = x.shape
    h, w = H // ext.vae_stride, W // ext.vae_stride
    layers = {s: ls for s, ls in official_layers(ext.unet, ext.vae_stride).items()
              if stride64 or s != 8 * ext.vae_stride}
    post = ext.vae.encode(x.to(ext.vae.dtype)).latent_dist
    z = [(post.sample(generator=generator) * ext.sf).float() for _ in range(2)]     # uncond, cond
    plans = [prompt_rows(ext, None, B, h, w, x.device), prompt_rows(ext, y, B, h, w, x.device)]
    saved = {}
    with FeatureCapture(ext.unet, [name for ls in layers.values() for name, _ in ls]) as cap:
        for i in range(len(ext.seq) if all_steps else max(ext.save) + 1):
            t, n = ext.seq_next[i], ext.seq[i]
            a_t, a_n = ext.alpha_bar[t], ext.alpha_bar[n]
            eta = ext.eta if ext.eta_t_range[0] < t < ext.eta_t_range[1] else 0.0
            # diff.py's draw: one noise tensor per step for the positive rows of both branches, in order
            noise = torch.randn((sum(map(len, plans)), *z[0].shape[1:]), generator=generator, device=x.device)
            noise = noise.split([len(p) for p in plans])
            for j, plan in enumerate(plans):
                owner = list(range(B)) + [b for b, _, _ in plan]                  # sample of each UNet row
                prompt = [0] * B + [k for _, k, _ in plan]
                t_in = torch.full((len(owner),), t, dtype=torch.long, device=x.device)
                eps = ext.unet(z[j][owner].to(ext.unet.dtype), t_in,
                               encoder_hidden_states=ext.emb[prompt]).sample.float()
                if i in ext.save:
                    for s, ls in layers.items():
                        for name, _ in ls:
                            f = cap.features[name]
                            if f.dim() == 3:                                     # tokens -> (R, C, h', w')
                                f = f.unflatten(1, (H // s, W // s)).permute(0, 3, 1, 2)
                                f = torch.stack([f[[r for r, o in enumerate(owner) if o == b]].sum(0)
                                                 for b in range(B)])
                            saved[(j, name, i)] = f[:B].clone()
                rows_b = [b for b, _, _ in plan]
                eps_neg = eps[:B][rows_b]
                eps_k = eps_neg + ext.g * (eps[B:] - eps_neg)
                # official get_xt_next: x0, then x_n = sqrt(a_n) x0 + c1 z + c2 eps
                x_t = z[j][rows_b]
                x0 = (x_t - eps_k * math.sqrt(1 - a_t)) / math.sqrt(a_t)
                c1 = eta * math.sqrt((1 - a_n / a_t) * (1 - a_n) / (1 - a_t))
                c2 = math.sqrt(max((1 - a_n) - c1 ** 2, 1e-10))
                cand = math.sqrt(a_n) * x0 + c1 * noise[j] + c2 * eps_k
                masks = torch.stack([m for _, _, m in plan])
                # official mask branch: value = sum_k M_k x_k, count = sum_k M_k, x_n = value / count
                per_b = [[r for r, o in enumerate(rows_b) if o == b] for b in range(B)]
                z[j] = torch.stack([(masks[r] * cand[r]).sum(0) / masks[r].sum(0) for r in per_b])
    return {br: {s: torch.cat([saved[(j, name, i)] for name, _ in ls for i in ext.save], 1).float()
                 for s, ls in layers.items()} for j, br in enumerate(("uncond", "cond"))}


class OfficialSegmentor(diff.DIFFSegmentor):
    """diff.DIFFSegmentor plus the official stride-64 bottleneck (projection width of stride 32,
    `diff_config.yaml` projection_dim), computed on every forward and discarded (official DIFFEncoder)."""

    def __init__(self, in_channels: dict[int, int], num_classes: int, dims: tuple[int, ...], c64: int):
        super().__init__(in_channels, num_classes, dims)
        self.bottlenecks["s64"] = diff.Bottleneck(c64, dims[2])

    def forward_branch(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        self.bottlenecks["s64"](feats[64])                                        # output discarded
        return super().forward_branch(feats)


def structure_flops(ext: diff.DiffusionExtractor, num_classes: int, dims: tuple, x_shape: tuple,
                    y: torch.Tensor, official: bool) -> int:
    """FLOPs of one training iteration (both branches' extraction, trained part forward + backward) of
    diff.py's structure or of the official one, on the device of `ext` (the meta device: nothing computed)."""
    device = ext.unet.device
    with torch.device(device):
        if official:
            block64 = official_layers(ext.unet, ext.vae_stride)[8 * ext.vae_stride]
            c64 = len(ext.save) * sum(c for _, c in block64)
            model = OfficialSegmentor(ext.in_channels, num_classes, dims, c64)
        else:
            model = diff.DIFFSegmentor(ext.in_channels, num_classes, dims)
    x, y_dev = torch.zeros(x_shape, device=device), y.to(device)

    def step() -> None:
        feats = official_features(ext, x, y.cpu()) if official else ext(x, y.cpu())
        logits_u, logits_c = model([feats["uncond"], feats["cond"]])
        loss = (diff.segmentation_loss(logits_c, y_dev) + diff.segmentation_loss(logits_u, y_dev)
                + diff.consistency_loss(logits_c, logits_u))
        loss.backward()
    return count_flops(step)


def meta_extractor(arch: str, num_steps: int) -> diff.DiffusionExtractor:
    """An extractor over the `tiny` / `sd21` architecture on the meta device (prompt embeddings zeros)."""
    parts = build_random_sd(arch, ("unet", "vae"), device="meta")
    d = parts["unet"].config.cross_attention_dim
    ids = diff.class_prompts(diff.Args.prompt_classes, 19)[1]
    emb = torch.zeros(1 + len(ids), 77, d, device="meta")
    return diff.DiffusionExtractor(parts["unet"], parts["vae"], parts["scheduler"], emb, ids, num_steps)


def compare(arch: str = "sd21", crop: int = 512, num_steps: int = 37,
            dims: tuple = diff.Args.proj_dims) -> dict:
    """FLOPs per training iteration, ours vs the official structure, for a label without any prompt class
    and one with all of them (one horizontal band each): {flops_<case>, flops_official_<case>,
    ratio_<case>}."""
    ext = meta_extractor(arch, num_steps)
    y_none = torch.zeros(1, crop, crop, dtype=torch.long)                         # road: no prompt
    y_all = y_none.clone()
    for k, c in enumerate(ext.prompt_ids):
        y_all[:, k * crop // (len(ext.prompt_ids) + 1): (k + 1) * crop // (len(ext.prompt_ids) + 1)] = c
    out = {"setting": f"{arch}, crop {crop}, batch 1, --num-steps {num_steps}, proj_dims {list(dims)}"}
    for name, y in (("no_prompt_class", y_none), ("prompt_classes", y_all)):
        ours = structure_flops(ext, 19, dims, (1, 3, crop, crop), y, official=False)
        official = structure_flops(ext, 19, dims, (1, 3, crop, crop), y, official=True)
        out.update({f"flops_{name}": ours, f"flops_official_{name}": official,
                    f"ratio_{name}": round(ours / official, 4)})
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd21", choices=["tiny", "sd21"])
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--num-steps", type=int, default=37, choices=[1, 5, 37])
    p.add_argument("--proj-dims", type=int, nargs=4, default=list(diff.Args.proj_dims))
    a = p.parse_args()
    print(json.dumps(compare(a.arch, a.crop_size, a.num_steps, tuple(a.proj_dims))), flush=True)
