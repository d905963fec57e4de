"""Reference computations for tests/test_madm.py, written out from the MADM paper (Fig. 2) and the official code
(XiaRho/MADM `mtmadise.py`, `modeling/criterion.py`, `utils/dacs_transforms.py`) WITHOUT calling madm.py's loss
or mixing functions, so that a test comparing the two fails when madm.py assembles its step wrongly.

Only the networks themselves (the student/teacher forward, the frozen VAE) are shared with madm.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def micro_seed(seed: int, step: int, j: int) -> int:
    """The seed of micro-step j of step `step`, as the header of madm.py describes it: SeedSequence(seed, step, j)."""
    return int(np.random.SeedSequence([seed, step, j]).generate_state(1, np.uint64)[0] % (2**63 - 1))


def t0_draw(seed: int, step: int, j: int, lo: int) -> int:
    """The DPLG t0 of micro-step j: the first draw after reseeding, uniform in {lo, lo + 1}."""
    torch.manual_seed(micro_seed(seed, step, j))
    return lo + int(torch.randint(0, 2, ()))


def dplg_t(step: int, t0: int, t_end: int) -> int:
    """Paper / official mtmadise.py: t = int(t0 (1 - i / T_end)) while i <= T_end, else 0."""
    return int(t0 * (1 - step / t_end)) if step <= t_end else 0


def lr_factor(i: int, n: int) -> float:
    """detectron2 WarmupParamScheduler(MultiStepParamScheduler([1, 0.1, 0.01], milestones 0.88888 / 0.96296 of
    2N - 1), LinearParamScheduler warm-up from 0.067 over 500 / 184375 of the run), official optim.py."""
    u = 2 * n - 1
    e = int((i / n + 1e-6) * u)
    value = [1.0, 0.1, 0.01][(e >= int(0.88888 * u)) + (e >= int(0.96296 * u))]
    where = i / n
    if where < 500 / 184375:
        alpha = where / (500 / 184375)
        value *= 0.067 + (1 - 0.067) * alpha
    return value


def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Image in [0, 1] -> SD latent: posterior mean of the VAE on 2x - 1, times scaling_factor (0.18215)."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        z = vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist.mean
    return (z * vae.config.scaling_factor).float()


def palette_image(y: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """LPLR's colour label: class c -> palette[c] / 255, ignore (255) -> black. (B, H, W) -> (B, 3, H, W)."""
    table = np.zeros((256, 3), np.float32)
    table[: len(palette)] = np.asarray(palette, np.float32) / 255
    return torch.from_numpy(table)[y].permute(0, 3, 1, 2)


def palette_to_label(img: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """Inverse of the palette colouring: nearest palette colour, black -> 255. (B, 3, H, W) in [0, 1] -> (B, H, W).
    (Not part of the method: it reads a decoded s0 back as labels, for tests and inspection.)"""
    colours = torch.cat([torch.as_tensor(np.asarray(palette), dtype=torch.float32) / 255.0, torch.zeros(1, 3)])
    d = ((img.permute(0, 2, 3, 1)[..., None, :] - colours.to(img.device)) ** 2).sum(-1)  # (B, H, W, K+1)
    y = d.argmin(-1)
    return torch.where(y == len(palette), torch.full_like(y, 255), y)


def ce_all_pixels(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Official criterion: -log softmax at the label, 0 at ignore (255), times the pixel weight, summed and divided
    by ALL pixels (ignored ones included)."""
    logp = torch.log_softmax(logits.float(), 1)
    valid = y != 255
    nll = -logp.gather(1, torch.where(valid, y, torch.zeros_like(y))[:, None])[:, 0] * valid
    if weight is not None:
        nll = nll * weight
    return nll.sum() / y.numel()


def lplr_l1(o: torch.Tensor, z_pal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LPLR: masked L1 between the UNet output and the palette latent, divided by every element of o. The pixel
    mask is nearest-downsampled by 8 (pixel 8i of every 8) and shared by the 4 latent channels."""
    m = mask[:, None, ::8, ::8].float()
    return ((o.float() - z_pal).abs() * m).sum() / o.numel()


def pseudo_labels(logits_t: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher argmax and the one quality scalar q = share of pixels whose softmax maximum reaches the threshold."""
    p = torch.softmax(logits_t.float(), 1)
    return p.argmax(1), (p.max(1).values >= threshold).float().mean()


def check_class_mix_mask(M: torch.Tensor, y_s: torch.Tensor) -> None:
    """ClassMix (DACS `get_class_masks`): M pastes whole classes, ceil(n / 2) of the n values present (255 counts)."""
    values = torch.unique(y_s).tolist()
    for b in range(M.shape[0]):
        inside = set(y_s[b][M[b, 0] > 0].tolist())
        outside = set(y_s[b][M[b, 0] == 0].tolist())
        assert not inside & outside, "a class is split between pasted and kept pixels"
        if M.shape[0] == 1:  # one image: the picked classes are all present in it
            assert len(inside) == math.ceil(len(values) / 2), (inside, values)
        assert len(inside) <= math.ceil(len(values) / 2)


def adamw_first_step(p0: torch.Tensor, g: torch.Tensor, lr: float, wd: float, betas=(0.9, 0.999),
                     eps: float = 1e-8) -> torch.Tensor:
    """torch.optim.AdamW after its first step: decoupled decay, then m_hat / (sqrt(v_hat) + eps)."""
    m = (1 - betas[0]) * g / (1 - betas[0])
    v = (1 - betas[1]) * g * g / (1 - betas[1])
    return p0 * (1 - lr * wd) - lr * m / (v.sqrt() + eps)
