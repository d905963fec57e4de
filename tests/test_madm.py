"""Tests of madm.py: components against hand-computed values, one real `train_step` against the paper's loss written
out independently (tests/madm_reference.py), the baseline, mixed precision on the CPU, --estimate-memory, a learning
test on the synthetic sample, same-seed and kill-and-resume bit equality, 2-process gloo DDP equivalence and the
demo end to end.

Everything runs on CPU with the tiny random SD (loaded through from_pretrained) at crop 32-64.
"""
import contextlib
import copy
import gc
import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import madm
from conftest import background
import madm_reference as ref
from common.datasets import CLASS_SETS, PALETTES, check_pair
from common.cli import UserError
from madm import Dist, choose_precision
from common.sd_backbone import vae_encode
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic"
CPU = torch.device("cpu")
# A small but complete configuration: tiny SD, synthetic data at 1/8 size, crop 32, fusion at 1/4.
SMALL = ["--demo", "--sd-model", "tiny", "--data-root", str(DATA), "--crop-size", "32", "--eval-size", "32",
         "--fusion-stride", "4", "--lr", "1e-3", "--log-every", "1"]


def small_args(**kw) -> madm.Args:
    base = dict(sd_model="tiny", data_root=str(DATA), demo=True, crop_size=32, eval_size=32, fusion_stride=4,
                lr=1e-3, log_every=1)
    base.update(kw)
    return madm.Args(**base)


@pytest.fixture(scope="module")
def data():
    return ensure_synthetic_sample(DATA)


@pytest.fixture(scope="module")
def model():
    """One tiny-SD MADM model (student + EMA SegHead) for the component tests of this module."""
    torch.manual_seed(0)
    args = madm.Args(sd_model="tiny", fusion_stride=1)
    student, ema_seg = madm.build_model(args, 11, CPU, choose_precision("fp32", CPU))
    return student, ema_seg


# One thread per process: the tests share 2 cores with other jobs, and OpenMP worker threads that wait on each
# other on an oversubscribed CPU make a step tens of times slower than a single thread.
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(cmd, timeout=300, env=ENV1):
    return subprocess.run([sys.executable, "madm.py", *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _weights(out: Path, step: int) -> dict:
    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / "weights.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [9, 11, 19])
def test_palette_colouring_and_inverse(k):
    palette = PALETTES[k]
    y = torch.randint(0, k, (2, 8, 8))
    y[0, :2] = 255
    img = madm.palette_image(y, palette)
    assert img.shape == (2, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    # every pixel carries its class colour / 255; ignore is black
    for c in range(k):
        sel = (y == c)
        if sel.any():
            got = img.permute(0, 2, 3, 1)[sel]
            assert torch.allclose(got, torch.tensor(palette[c], dtype=torch.float32).expand_as(got) / 255)
    assert (img[0, :, :2] == 0).all()
    assert torch.equal(ref.palette_to_label(img, palette), y)
    # the inverse is robust to the small errors a decoded image has
    assert torch.equal(ref.palette_to_label((img + 0.01 * torch.randn_like(img)).clamp(0, 1), palette), y)


def test_palette_11_classes_follow_madm_colours():
    # data/README.md (MADM's 11-class palette): 0 sky 70,130,180; 5 road 128,64,128; 10 traffic sign 250,170,30
    img = madm.palette_image(torch.tensor([[[0, 5, 10, 255]]]), PALETTES[11])
    assert (img[0, :, 0] * 255).round().tolist() == [[70, 128, 250, 0], [130, 64, 170, 0], [180, 128, 30, 0]]


def test_dplg_schedule_per_task():
    # (t0 lo, end fraction, LPLR weights) of the official task configs, "other" our choice
    assert madm.task_settings(madm.Args(tgt="dsec_event")) == (50, 0.8, (20.0,))
    assert madm.task_settings(madm.Args(tgt="fmb_infrared")) == (50, 0.8, (1.0, 1.0))
    assert madm.task_settings(madm.Args(tgt="deliver_depth")) == (60, 0.5, (1.0, 1.0))
    assert madm.task_settings(madm.Args(tgt="acdc")) == (50, 0.8, (1.0, 1.0))
    assert madm.task_settings(madm.Args(tgt="acdc", dplg_t0=7, lplr_weights=(3.0,))) == (7, 0.8, (3.0,))
    # t = int(t0 (1 - i / T_end)), 0 after T_end. event: T_end 8000 of 10000; depth: 5000, t0 60 / 61
    assert madm.dplg_timestep(0, 51, 8000) == 51
    assert madm.dplg_timestep(4000, 51, 8000) == 25          # int(25.5)
    assert madm.dplg_timestep(7999, 50, 8000) == 0           # int(0.00625)
    assert madm.dplg_timestep(7840, 50, 8000) == 1           # int(1.0)
    assert madm.dplg_timestep(8001, 50, 8000) == 0
    assert madm.dplg_timestep(2500, 60, 5000) == 30
    assert madm.dplg_timestep(2500, 61, 5000) == 30          # int(30.5)
    assert madm.dplg_timestep(5000, 61, 5000) == 0
    assert madm.dplg_timestep(6000, 60, 5000) == 0
    ts = [madm.dplg_timestep(i, 50, 8000) for i in range(0, 8001, 100)]
    assert all(a >= b for a, b in zip(ts, ts[1:]))           # never increases


def test_lr_schedule_multistep_with_warmup():
    # official optim.py at N = 10000: 0.067 at step 0, ~1 by step 27, x0.1 from 8889, x0.01 from 9630.
    f = lambda i: madm.lr_factor(i, 10000)  # noqa: E731
    assert f(0) == pytest.approx(0.067)
    assert 0.9 < f(26) < 1.0 and f(27) == pytest.approx(1.0, abs=0.01)
    assert f(28) == 1.0 and f(8888) == 1.0
    assert f(8889) == pytest.approx(0.1) and f(9629) == pytest.approx(0.1)
    assert f(9630) == pytest.approx(0.01) and f(9999) == pytest.approx(0.01)
    for n in (40, 10000):  # the detectron2 schedulers written out differently in madm_reference.py
        assert all(madm.lr_factor(i, n) == pytest.approx(ref.lr_factor(i, n)) for i in range(0, n, max(1, n // 997)))


def test_lplr_loss_zero_for_perfect_latent_and_masks_ignore():
    o = torch.randn(2, 4, 4, 4)
    full = torch.ones(2, 32, 32)
    assert madm.loss_lplr(o, o.clone(), full).item() == 0.0
    # error 1 everywhere; left half of the pixels ignored -> half the elements count, divided by ALL of them
    mask = full.clone()
    mask[..., :16] = 0
    assert madm.loss_lplr(o + 1, o, mask).item() == pytest.approx(0.5)
    assert madm.loss_lplr(o + 1, o, torch.zeros(2, 32, 32)).item() == 0.0
    # the mask also carries the quality weight q of the mixed image
    assert madm.loss_lplr(o + 2, o, full * 0.25).item() == pytest.approx(0.5)


def test_lplr_target_is_the_vae_latent_of_the_palette_image(model):
    student, _ = model
    vae = student.frozen.vae
    y = torch.randint(0, 11, (1, 32, 32))
    z = madm.palette_latent(student.frozen, y, PALETTES[11])
    assert z.shape == (1, 4, 4, 4) and not z.requires_grad
    img = torch.tensor(PALETTES[11], dtype=torch.float32)[y].permute(0, 3, 1, 2) / 255
    assert torch.allclose(z, vae_encode(vae, img * 2 - 1).float(), atol=1e-6)


def test_pseudo_labels_quality_is_one_scalar():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 10.0   # confident pixel -> class 1, p ~ 0.9999
    logits[0, 2, 1, 1] = 1.0    # unconfident pixel -> class 2, p ~ 0.58
    y_hat, q = madm.pseudo_labels(logits, 0.968)
    assert y_hat[0, 0, 0] == 1 and y_hat[0, 1, 1] == 2
    assert q.numel() == 1 and q.item() == pytest.approx(0.25)


def test_class_mix_masks_and_mixing():
    torch.manual_seed(0)
    y_s = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 255], [3, 3, 1, 0], [2, 0, 1, 3]])[None]  # 5 values incl. 255
    for _ in range(20):
        M = madm.class_mix_masks(y_s)
        assert M.shape == (1, 1, 4, 4)
        inside = set(y_s[M[:, 0] > 0].tolist())
        outside = set(y_s[M[:, 0] == 0].tolist())
        assert len(inside) == 3 and not inside & outside      # ceil(5 / 2) whole classes pasted
    x_s, x_t = torch.full((1, 3, 4, 4), 0.9), torch.full((1, 3, 4, 4), 0.1)
    y_hat = torch.full((1, 4, 4), 7)
    x_m, y_m, w_m = madm.class_mix(M, x_s, x_t, y_s, y_hat, torch.tensor(0.3))
    src = M[0, 0] > 0
    assert torch.equal(y_m[0][src], y_s[0][src]) and (y_m[0][~src] == 7).all()
    assert (x_m[0][:, src] == 0.9).all() and (x_m[0][:, ~src] == 0.1).all()
    assert (w_m[0][src] == 1).all() and torch.allclose(w_m[0][~src], torch.tensor(0.3))


def test_ce_all_pixels_divides_by_every_pixel():
    logits = torch.zeros(1, 2, 1, 4)
    y = torch.tensor([[[0, 1, 255, 255]]])
    assert madm.ce_all_pixels(logits, y).item() == pytest.approx(2 * math.log(2) / 4)
    logits, y, w = torch.randn(2, 5, 6, 6), torch.randint(0, 5, (2, 6, 6)), torch.rand(2, 6, 6)
    y[0, 0] = 255
    assert madm.ce_all_pixels(logits, y, w).item() == pytest.approx(ref.ce_all_pixels(logits, y, w).item())


def test_trainable_parts_and_weight_decay_groups(model):
    student, ema_seg = model
    unet = student.unet
    assert not any(p.requires_grad for p in unet.conv_out.parameters())
    assert not any(p.requires_grad for p in unet.conv_norm_out.parameters())
    frozen = ("conv_out", "conv_norm_out")
    assert all(p.requires_grad for n, p in unet.named_parameters() if not n.startswith(frozen))
    assert not any(p.requires_grad for p in student.frozen.vae.parameters())
    assert not any(p.requires_grad for p in ema_seg.parameters())
    decay, no_decay = madm.make_optimizer(student, madm.Args()).param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    seg = student.seg
    dec, nodec = ids(decay["params"]), ids(no_decay["params"])
    assert ids([seg.cond.prompt, seg.cond.time_offset, seg.cond.alpha_u, seg.cond.alpha_t]) <= dec
    assert ids([seg.proj["s0"].norm1.weight, seg.head.conv_seg.bias, unet.conv_in.bias]) <= nodec
    assert id(unet.conv_in.weight) in dec and id(seg.head.embed[0].weight) in dec
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(dec | nodec) == sum(p.requires_grad for p in student.parameters())


def test_conditioning_starts_with_zero_time_offset_and_shapes(model):
    student, _ = model
    cond = student.seg.cond
    assert torch.equal(cond.time_delta(), torch.zeros_like(cond.time_delta()))
    assert cond.context(3).shape == (3, 77, student.unet.config.cross_attention_dim)
    assert "e_empty" in dict(cond.named_buffers()) and "e_empty" not in dict(cond.named_parameters())


def test_fixed_noise_pattern_and_t0_noising(model):
    """One seed-42 pattern (independent of --seed), broadcast over the batch, bicubic-resized (official
    ldm_diffusers.py); at t = 0 the SD schedule gives z_t = 0.99957 z + 0.02915 eps (beta_0 = 0.00085)."""
    student, _ = model
    frozen = student.frozen
    g = torch.Generator().manual_seed(42)
    assert torch.equal(frozen.eps_fix, torch.randn(1, 4, 64, 64, generator=g))
    z = torch.randn(3, 4, 8, 8)
    eps = frozen.noise(z)
    assert eps.shape == (3, 4, 8, 8) and torch.equal(eps[0], eps[2])
    ref_eps = torch.nn.functional.interpolate(frozen.eps_fix, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(eps[:1], ref_eps)
    z_t = madm.add_noise(frozen.scheduler, z, eps, 0)
    assert torch.allclose(z_t, math.sqrt(1 - 0.00085) * z + math.sqrt(0.00085) * eps, atol=1e-6)


def test_forward_shapes_and_features(model):
    student, _ = model
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        logits, o = student(z, 0)
    assert logits.shape == (2, 11, 64, 64) and o.shape == (2, 4, 8, 8)
    f = student.frozen.capture.features
    c8, c16, c32 = madm.feature_channels(student.unet)
    assert f[madm.F8].shape == (2, c8, 8, 8)
    assert f[madm.F16].shape == (2, c16, 4, 4)
    assert f[madm.F32].shape == (2, c32, 2, 2)


def test_real_sd15_shapes_on_the_meta_device():
    """The paper's model without allocating weights: SD 1.x features 320 / 640 / 1280 channels at strides
    8 / 16 / 32, the 77 x 768 context, the 1280-d time offset, logits at the full 512 x 512 input."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from common.sd_backbone import FeatureCapture, sd_config
    cfg = sd_config("sd15")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"])
        assert madm.feature_channels(unet) == (320, 640, 1280)
        assert unet.time_embedding.linear_2.out_features == 1280
        capture = FeatureCapture(unet, [madm.F32, madm.F16, madm.F8], pre=[madm.F32, madm.F16])
        frozen = madm.Frozen(vae, DDPMScheduler(**cfg["scheduler"]), capture, madm.TimeOffsetHook(unet),
                             torch.zeros(1, 4, 64, 64))
        seg = madm.SegHead(madm.Conditioning(torch.zeros(1, 77, 768), 1280), (320, 640, 1280), 11, 1)
        with torch.no_grad():
            logits, o = madm.Student(unet, seg, frozen)(torch.zeros(1, 4, 64, 64), 0)
    assert logits.shape == (1, 11, 512, 512) and o.shape == (1, 4, 64, 64)
    shapes = {k: tuple(v.shape) for k, v in capture.features.items()}
    assert shapes == {madm.F32: (1, 1280, 16, 16), madm.F16: (1, 640, 32, 32), madm.F8: (1, 320, 64, 64)}


def test_ema_updates_exactly_the_head_and_shares_the_unet(model):
    student, ema_seg = model
    seg = student.seg
    ema = copy.deepcopy(ema_seg)
    before = {n: p.clone() for n, p in ema.named_parameters()}
    buffers = {n: b.clone() for n, b in ema.named_buffers()}
    # EMA covers conditioning (P, a_u, a_c, T, a_t), the 4 projections and the head: nothing of the UNet
    names = {n for n, _ in ema.named_parameters()}
    assert {"cond.prompt", "cond.alpha_u", "cond.alpha_c", "cond.time_offset", "cond.alpha_t"} <= names
    assert all(n.startswith(("cond.", "proj.", "head.")) for n in names)
    assert len(names) == len(list(seg.parameters()))
    unet_before = {n: p.clone() for n, p in student.unet.named_parameters()}
    madm.ema_update(ema, seg, step=1, alpha_max=0.999)      # alpha_1 = min(1 - 1/2, 0.999) = 0.5
    for (n, p), p_s in zip(ema.named_parameters(), seg.parameters()):
        assert torch.allclose(p, 0.5 * before[n] + 0.5 * p_s), n
    for n, b in ema.named_buffers():                         # BN statistics untouched
        assert torch.equal(b, buffers[n]), n
    assert all(torch.equal(p, unet_before[n]) for n, p in student.unet.named_parameters())
    madm.ema_update(ema, seg, step=10**6, alpha_max=0.999)  # capped at 0.999
    # The teacher pass runs the student's own UNet: changing a UNet weight changes the teacher's output.
    z = torch.randn(1, 4, 4, 4)
    ema.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a, _ = student(z, 10, seg=ema)
        w = student.unet.conv_in.weight
        old = w.clone()
        w.add_(0.1)
        torch.manual_seed(0)
        b, _ = student(z, 10, seg=ema)
        w.copy_(old)
    assert not torch.allclose(a, b)


def test_backward_per_pass_and_grad_checkpointing_equal_one_backward(model):
    """Optimisations that must not change the maths: backward after each student pass (vs one backward on the
    summed loss), and UNet gradient checkpointing (vs stored activations)."""
    student, _ = model
    student.seg.eval()  # no dropout: identical forwards
    torch.manual_seed(0)
    z1, z2 = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    y = torch.randint(0, 11, (1, 32, 32))
    params = [p for p in student.parameters() if p.requires_grad]

    def loss(z):
        logits, o = student(z, 0)
        return madm.ce_all_pixels(logits, y) + madm.loss_lplr(o, torch.zeros_like(o), (y != 255).float())

    def grads(per_pass: bool, ckpt: bool):
        if ckpt:
            student.unet.enable_gradient_checkpointing()
        for p in params:
            p.grad = None
        if per_pass:
            loss(z1).backward()
            loss(z2).backward()
        else:
            (loss(z1) + loss(z2)).backward()
        if ckpt:
            student.unet.disable_gradient_checkpointing()
        return [p.grad.clone() for p in params]

    reference = grads(False, False)
    for variant in [(True, False), (True, True)]:
        got = grads(*variant)
        for a, b in zip(reference, got):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), variant
    assert sum(float(g.abs().sum()) for g in reference[:10]) > 0
    for p in params:
        p.grad = None
    student.seg.train()


def test_text_encoder_is_freed_after_embedding_the_empty_prompt(model):
    from transformers import CLIPTextModel
    gc.collect()
    alive = lambda: sum(isinstance(o, CLIPTextModel) for o in gc.get_objects())  # noqa: E731
    before = alive()
    madm.build_model(madm.Args(sd_model="tiny"), 11, CPU, choose_precision("fp32", CPU))
    gc.collect()
    assert alive() <= before


# ------------------------------------------------------------------------------------------------------------
# One train_step against the paper's loss (every line of the METHOD STEP is pinned by a test here)
# ------------------------------------------------------------------------------------------------------------
def step_setup(tgt="fmb_infrared", lplr=(3.0, 0.5), precision="fp32", crop=32, rank=0, dropout=0.0, **kw):
    """A tiny-SD model ready for `train_step` at the paper's schedule (10000 steps): args, run, student, EMA head,
    AdamW, scaler. Dropout is off by default so that the test can recompute the same forwards; the student head
    is moved away from the EMA head so that the EMA update is visible."""
    kw = dict(dict(seed=57), **kw)  # seed 57: at step 1, t0 = 51 then 50 and both micro-steps draw the jitter
    args = madm.Args(sd_model="tiny", tgt=tgt, crop_size=crop, fusion_stride=4, lr=1e-3, iters=10000,
                     lplr_weights=lplr, **kw)
    K = check_pair(args.src, args.tgt)
    prec = choose_precision(precision, CPU)
    student, ema_seg = madm.build_model(args, K, CPU, prec)
    for seg in (student.seg, ema_seg):
        seg.head.dropout.p = dropout
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in student.seg.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    t0, frac, w = madm.task_settings(args)
    run = madm.Run(Dist(rank, 2 if rank else 1, CPU), prec, PALETTES[K], CLASS_SETS[K], t0,
                   int(round(frac * args.iters)), w)
    return args, run, student, ema_seg, madm.make_optimizer(student, args), prec.make_scaler()


def make_batch(A, crop, K, seed=0):
    """A micro-batches of one (source image, source label with an ignored stripe, target image)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(A):
        y = torch.randint(0, K, (1, crop // 8, crop // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
        y[:, :, : crop // 4] = 255
        out.append((torch.rand(1, 3, crop, crop, generator=g), y, torch.rand(1, 3, crop, crop, generator=g)))
    return out


class Recorder:
    """Wraps madm's component functions to record what `train_step` feeds them (and calls the real ones)."""

    def __init__(self, monkeypatch):
        self.passes, self.masks, self.augment = [], [], []
        forward, masks, augment = madm.madm_forward, madm.class_mix_masks, madm.strong_augment

        def record_forward(unet, seg, frozen, z0, t):
            logits, o = forward(unet, seg, frozen, z0, t)
            self.passes.append(dict(seg=seg, t=t, z0=z0.detach().clone(), grad=torch.is_grad_enabled(),
                                    logits=logits.detach().clone()))
            return logits, o

        def record_masks(y_s):
            M = masks(y_s)
            self.masks.append(M.clone())
            return M

        def record_augment(x):
            out = augment(x)
            self.augment.append((x.clone(), out.clone()))
            return out
        monkeypatch.setattr(madm, "madm_forward", record_forward)
        monkeypatch.setattr(madm, "class_mix_masks", record_masks)
        monkeypatch.setattr(madm, "strong_augment", record_augment)


def at_optimizer_step(optimizer) -> dict:
    """What the optimizer sees when it steps: the (clipped, unscaled) gradients and each group's lr."""
    seen = {}

    def hook(opt, args, kwargs):
        seen["grads"] = [None if p.grad is None else p.grad.clone() for g in opt.param_groups for p in g["params"]]
        seen["lrs"] = [g["lr"] for g in opt.param_groups]
    optimizer.register_step_pre_hook(hook)
    return seen


def reference_step(student, batch, args, run, teacher_logits, masks, augmented, params):
    """The loss of one optimizer step from the paper's equations (Fig. 2; official mtmadise.py), at the weights
    the step started from: sum over micro-steps k of
        [CE_all(x_s) + l_s LPLR(o_s, y_s != 255) + CE_all(x_aug; y_m, w_m) + l_t LPLR(o_m, (y_m != 255) q)] / A
    with y_hat, q from the teacher logits, y_m = M y_s + (1 - M) y_hat, w_m = M + (1 - M) q. Returns the
    gradient of that loss (list over `params`) and the loss terms averaged over micro-steps."""
    vae, A, lam = student.frozen.vae, len(batch), run.lplr_w
    z_pal = lambda y: ref.encode(vae, ref.palette_image(y, run.palette))  # noqa: E731
    for p in params:
        p.grad = None
    terms = dict(loss_src=0.0, loss_mix=0.0, loss_reg_s=0.0, loss_reg_t=0.0, q=0.0)
    for k, (x_s, y_s, _) in enumerate(batch):
        logits_s, o_s = student(ref.encode(vae, x_s), 0)
        l_src = ref.ce_all_pixels(logits_s, y_s)
        l_reg_s = lam[0] * ref.lplr_l1(o_s, z_pal(y_s), y_s != 255)
        loss, l_mix, l_reg_t, q = l_src + l_reg_s, torch.zeros(()), torch.zeros(()), torch.zeros(())
        if not args.source_only:
            y_hat, q = ref.pseudo_labels(teacher_logits[k], args.pseudo_threshold)
            src = masks[k][:, 0] > 0
            y_m, w_m = torch.where(src, y_s, y_hat), torch.where(src, torch.ones(()), q)
            logits_m, o_m = student(ref.encode(vae, augmented[k]), 0)
            l_mix = ref.ce_all_pixels(logits_m, y_m, w_m)
            if len(lam) > 1:
                l_reg_t = lam[1] * ref.lplr_l1(o_m, z_pal(y_m), (y_m != 255) * q)
            loss = loss + l_mix + l_reg_t
        (loss / A).backward()
        for key, v in zip(terms, (l_src, l_mix, l_reg_s, l_reg_t, q)):
            terms[key] += float(torch.as_tensor(v).detach()) / A
    return [p.grad.clone() for p in params], terms


@pytest.mark.parametrize("tgt,lplr", [("fmb_infrared", (3.0, 0.5)), ("dsec_event", (20.0,))])
def test_train_step_follows_the_paper_loss(tgt, lplr, monkeypatch):
    """One real optimizer step (i = 1 of 10000, A = 2 micro-steps) against everything written out in the test:
    the EMA update of exactly the head (alpha_1 = 0.5) before the teacher pass; the teacher = shared UNet + EMA
    head at the DPLG timestep on the clean target latent; pseudo labels and q; ClassMix of whole classes and the
    strong augmentation of the mixed image only; student passes at t = 0; the summed, 1/A-scaled gradient of
    CE + l_s LPLR (+ q-weighted mixed CE + l_t LPLR with the (y_m != 255) q mask when the task has two LPLR
    weights); clipping to 0.01 of the pre-clip norm; the warm-up LR on every group; one AdamW step with the
    decay groups; gradients cleared. lplr (3, 0.5) are not 1 so that a dropped weight shows."""
    args, run, student, ema_seg, optimizer, scaler = step_setup(tgt, lplr)
    K, A, i, crop = len(run.class_names), 2, 1, args.crop_size
    batch = make_batch(A, crop, K)
    vae = student.frozen.vae
    student0 = {k: v.clone() for k, v in student.state_dict().items()}
    seg0 = {n: p.clone() for n, p in student.seg.named_parameters()}
    ema0 = {n: p.clone() for n, p in ema_seg.named_parameters()}
    # Expected teacher: EMA with alpha_1 = min(1 - 1/2, 0.999) = 0.5, at t = int(t0 (1 - 1/8000)), t0 the first
    # draw of micro-step j after reseeding with SeedSequence(seed, step, j).
    teacher = copy.deepcopy(ema_seg)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            p.copy_(0.5 * ema0[n] + 0.5 * seg0[n])
    t_ref = [ref.dplg_t(i, ref.t0_draw(args.seed, i, k, run.t0_lo), run.t_end) for k in range(A)]
    assert run.t_end == 8000 and t_ref == [50, 49]            # t0 = 51, 50: both DPLG draws occur
    with torch.no_grad():
        logits_t = [student(ref.encode(vae, x_t), t, seg=teacher)[0] for (_, _, x_t), t in zip(batch, t_ref)]
    # a threshold at the median confidence makes q ~ 0.5: the q weighting then shows in the gradient
    p_max = torch.cat([torch.softmax(lt, 1).max(1).values.flatten() for lt in logits_t])
    args.pseudo_threshold = float(p_max.median())
    seen, rec = at_optimizer_step(optimizer), Recorder(monkeypatch)

    logs = madm.train_step(student, ema_seg, optimizer, scaler, batch, i, args, run)

    after = {n: p.detach().clone() for n, p in student.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p.grad is None for p in params)                                    # zero_grad(set_to_none)
    for n, p in ema_seg.named_parameters():                                       # EMA before the teacher pass
        assert torch.allclose(p, teacher.state_dict()[n], atol=1e-7), n
    # three passes per micro-step: teacher (no grad, EMA head, DPLG t, clean target), source, mixed (t = 0)
    assert [(r["grad"], r["seg"] is ema_seg, r["t"]) for r in rec.passes] == [
        x for t in t_ref for x in ((False, True, t), (True, False, 0), (True, False, 0))]
    assert len(rec.masks) == len(rec.augment) == A
    for k, (x_s, y_s, x_t) in enumerate(batch):
        r_t, r_s, r_m = rec.passes[3 * k: 3 * k + 3]
        assert torch.allclose(r_t["z0"], ref.encode(vae, x_t), atol=1e-6)
        assert torch.allclose(r_t["logits"], logits_t[k], atol=1e-5)
        assert torch.allclose(r_s["z0"], ref.encode(vae, x_s), atol=1e-6)
        M = rec.masks[k]
        ref.check_class_mix_mask(M, y_s)
        x_in, x_out = rec.augment[k]
        assert torch.allclose(x_in, M * x_s + (1 - M) * x_t)                      # ClassMix of the images
        assert not torch.allclose(x_in, x_out, atol=1e-3)                         # augmentation applied
        assert torch.allclose(r_m["z0"], ref.encode(vae, x_out), atol=1e-6)       # the augmented mix is seen
    # the gradient the optimizer stepped with = the clipped gradient of the reference loss
    student.load_state_dict(student0)
    g_ref, terms = reference_step(student, batch, args, run, logits_t, rec.masks, [a[1] for a in rec.augment],
                                  params)
    assert 0.1 < terms["q"] < 0.9
    for key, v in terms.items():
        assert logs[key] == pytest.approx(v, rel=1e-4, abs=1e-6), key
    assert logs["t_dplg"] == pytest.approx(sum(t_ref) / A)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g_ref)))
    assert logs["grad_norm"] == pytest.approx(norm, rel=1e-4)
    coef = min(1.0, args.grad_clip / (norm + 1e-6))
    assert coef < 0.01                                                            # the clip acts
    got = torch.cat([g.flatten() for g in seen["grads"]])
    want = torch.cat([g.flatten() for g in g_ref]) * coef
    assert float(got.double().norm()) == pytest.approx(args.grad_clip, rel=1e-4)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # LR: args.lr x the detectron2 warm-up factor at step 1 of 10000, on both groups
    lr = args.lr * ref.lr_factor(i, args.iters)
    assert logs["lr"] == pytest.approx(lr) and seen["lrs"] == pytest.approx([lr, lr]) and lr < 0.2 * args.lr
    # one AdamW step with these gradients: decay 0.05 on weights, 0 on norms and biases
    named = dict(student.named_parameters())
    grads = {id(p): g for p, g in zip(params, seen["grads"])}
    for name, wd in (("seg.head.conv_seg.weight", 0.05), ("unet.conv_in.weight", 0.05),
                     ("seg.head.conv_seg.bias", 0.0), ("seg.proj.s3.norm1.weight", 0.0)):
        expected = ref.adamw_first_step(student0[name], grads[id(named[name])], lr, wd)
        assert torch.allclose(after[name], expected, rtol=1e-5, atol=1e-9), name


class SyncSpy(torch.nn.Module):
    """Stands in for DistributedDataParallel: records, per forward, whether it ran inside `no_sync()`."""

    def __init__(self, module):
        super().__init__()
        self.module, self.skip, self.calls = module, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.skip = True
        try:
            yield
        finally:
            self.skip = False

    def forward(self, *args, **kwargs):
        self.calls.append(self.skip)
        return self.module(*args, **kwargs)


def test_train_step_draws_from_its_micro_seed_and_syncs_once(monkeypatch):
    """Rank 1 of 2, step 0, with dropout on: (a) the step's draws depend only on (seed, step, global micro index
    rank * A + k), not on the generator state before it (DDP ranks and accumulation splits agree); (b) only the
    last backward of the step all-reduces (DDP no_sync on the others); the teacher pass bypasses DDP; (c) no EMA
    update at step 0."""
    args, run, student, ema_seg, optimizer, scaler = step_setup(rank=1, dropout=0.1)
    A, i = 2, 0
    batch = make_batch(A, args.crop_size, len(run.class_names), seed=3)
    t_rank1 = [ref.t0_draw(args.seed, i, 1 * A + k, run.t0_lo) for k in range(A)]
    t_rank0 = [ref.t0_draw(args.seed, i, k, run.t0_lo) for k in range(A)]
    assert t_rank1 != t_rank0                                   # so the micro index matters in this test
    state = {k: v.clone() for k, v in student.state_dict().items()}
    ema0 = {k: v.clone() for k, v in ema_seg.state_dict().items()}
    results = []
    for prior in (0, 12345):                                    # two different generator states before the step
        student.load_state_dict(state)
        ema_seg.load_state_dict(ema0)
        rec, spy = Recorder(monkeypatch), SyncSpy(student)
        torch.manual_seed(prior)
        logs = madm.train_step(spy, ema_seg, madm.make_optimizer(student, args), scaler, batch, i, args, run)
        results.append((logs, [r["t"] for r in rec.passes if not r["grad"]], [m.clone() for m in rec.masks],
                        [a[1] for a in rec.augment], {n: p.detach().clone() for n, p in student.named_parameters()}))
        assert spy.calls == [True, True, True, False]           # source k0, mixed k0, source k1: local only
        assert sum(not r["grad"] for r in rec.passes) == A      # teacher passes ran outside the DDP wrapper
        assert all(torch.equal(p, ema0[n]) for n, p in ema_seg.named_parameters())   # no EMA at step 0
    (logs_a, t_a, m_a, x_a, w_a), (logs_b, t_b, m_b, x_b, w_b) = results
    assert t_a == t_b == t_rank1                                # t = t0 at step 0
    assert logs_a == logs_b
    assert all(torch.equal(a, b) for a, b in zip(m_a + x_a, m_b + x_b))
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


def test_source_only_step_is_the_baseline(monkeypatch):
    """--source-only (the paper's first table row): per micro-step one student pass with CE + l_s LPLR on the source
    crop; no teacher pass, no ClassMix, no augmentation, no mixed pass, no EMA update; the gradient is exactly the
    clipped gradient of that loss; the step's only backward that syncs is the last."""
    args, run, student, ema_seg, optimizer, scaler = step_setup(source_only=True)
    A, i = 2, 1
    batch = make_batch(A, args.crop_size, len(run.class_names), seed=5)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    ema0 = {k: v.clone() for k, v in ema_seg.state_dict().items()}
    seen, rec, spy = at_optimizer_step(optimizer), Recorder(monkeypatch), SyncSpy(student)
    logs = madm.train_step(spy, ema_seg, optimizer, scaler, batch, i, args, run)
    assert [(r["grad"], r["t"], r["seg"] is student.seg) for r in rec.passes] == [(True, 0, True)] * A
    assert rec.masks == [] and rec.augment == [] and spy.calls == [True, False]
    assert logs["loss_mix"] == logs["loss_reg_t"] == logs["q"] == logs["t_dplg"] == 0.0
    assert all(torch.equal(p, ema0[n]) for n, p in ema_seg.named_parameters())      # no EMA update
    student.load_state_dict(state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    g_ref, terms = reference_step(student, batch, args, run, None, None, None, params)
    assert logs["loss_src"] == pytest.approx(terms["loss_src"], rel=1e-5)
    assert logs["loss_reg_s"] == pytest.approx(terms["loss_reg_s"], rel=1e-5)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g_ref)))
    assert logs["grad_norm"] == pytest.approx(norm, rel=1e-4)
    got, want = torch.cat([g.flatten() for g in seen["grads"]]), torch.cat([g.flatten() for g in g_ref])
    assert torch.allclose(got, want * args.grad_clip / (norm + 1e-6), rtol=1e-3, atol=1e-3 * float(got.abs().max()))


@pytest.mark.parametrize("where", ["source", "mixed"])
def test_non_finite_loss_stops_at_its_step(data, tmp_path, monkeypatch, where):
    """A NaN in the source loss or in the mixed loss alone stops the run at step 1 (the first), before the
    backward of that pass: each pass checks its own loss."""
    real = madm.ce_all_pixels

    def nan_in(logits, y, weight=None):
        hit = (weight is None) == (where == "source")
        return real(logits, y, weight) * (torch.tensor(float("nan")) if hit else 1)
    monkeypatch.setattr(madm, "ce_all_pixels", nan_in)
    with pytest.raises(UserError, match="non-finite loss .* at step 1"):
        madm.main(small_args(iters=2, out=str(tmp_path / "nan")))
    assert not (tmp_path / "nan" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_takes_the_gpu_path_on_cpu(name):
    """--precision bf16 / fp16 on the CPU run the GPU's code: frozen VAE stored in the half dtype, trained weights
    fp32, every pass (teacher, source, mixed) autocast to the half dtype, losses in fp32. The first step's losses
    agree with fp32 (bf16: rel 5e-2, fp16: rel 5e-3; q, a share of thresholded pixels, within 0.02, and the
    mixed LPLR term per unit of q) and so does the unscaled pre-clip gradient norm (bf16: rel
    0.1; fp16: rel 0.02, with a GradScaler at scale 8 so that nothing overflows). bf16 has no GradScaler; fp16's
    starts at 2^16 and either halves on an overflowing step without moving a weight or counts a finite step in
    its growth tracker. Crop 48: at crop 32 the tiny UNet's last downsampler sees a 1x1 input, where oneDNN's
    bf16 convolution backward returns NaN (CPU only; real crops never get there)."""
    half = torch.bfloat16 if name == "bf16" else torch.float16

    def setup(p):
        args, run, student, ema_seg, optimizer, scaler = step_setup(precision=p, crop=48, pseudo_threshold=0.2)
        return args, run, student, ema_seg, optimizer, scaler, make_batch(1, 48, len(run.class_names), seed=7)
    args, run, student, ema_seg, optimizer, scaler, batch = setup("fp32")
    logs32 = madm.train_step(student, ema_seg, optimizer, scaler, batch, 1, args, run)
    args, run, student, ema_seg, optimizer, scaler, batch = setup(name)
    assert student.frozen.vae.dtype == half and all(p.dtype == torch.float32 for p in student.parameters())
    assert scaler.is_enabled() == (name == "fp16")
    dtypes = []
    for module in (student.unet.conv_in, ema_seg.head.conv_seg, student.seg.head.conv_seg):
        module.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    w0 = student.unet.conv_in.weight.detach().clone()
    small = torch.amp.GradScaler("cpu", init_scale=8.0) if name == "fp16" else scaler
    logs = madm.train_step(student, ema_seg, optimizer, small, batch, 1, args, run)
    assert dtypes == [half] * 6                                  # (UNet, head) x (teacher, source, mixed)
    tol = 5e-2 if name == "bf16" else 5e-3
    for key in ("loss_src", "loss_mix", "loss_reg_s"):
        assert math.isfinite(logs[key]) and logs[key] == pytest.approx(logs32[key], rel=tol, abs=1e-4), key
    assert logs32["q"] > 0 and logs["q"] == pytest.approx(logs32["q"], abs=0.02)  # thresholded: a few flip
    # the mixed LPLR mask is (y_m != 255) q: compare per unit of q
    assert logs["loss_reg_t"] / logs["q"] == pytest.approx(logs32["loss_reg_t"] / logs32["q"], rel=tol)
    assert logs["grad_norm"] == pytest.approx(logs32["grad_norm"], rel=0.1 if name == "bf16" else 0.02)
    assert not torch.equal(student.unet.conv_in.weight, w0)
    if name == "fp16":
        assert int(small._growth_tracker) == 1 and small.get_scale() == 8.0
        args, run, student, ema_seg, optimizer, scaler, batch = setup(name)
        assert scaler.get_scale() == 2.0**16
        w0 = student.unet.conv_in.weight.detach().clone()
        logs = madm.train_step(student, ema_seg, optimizer, scaler, batch, 1, args, run)
        if math.isfinite(logs["grad_norm"]):                    # a finite step: weights move, tracker counts 1
            assert scaler.get_scale() == 2.0**16 and int(scaler._growth_tracker) == 1
            assert not torch.equal(student.unet.conv_in.weight, w0)
        else:                                                    # an overflowing step: skipped, scale halved
            assert scaler.get_scale() == 2.0**15 and int(scaler._growth_tracker) == 0
            assert torch.equal(student.unet.conv_in.weight, w0)
    logs = madm.train_step(student, ema_seg, optimizer, small if name == "fp16" else scaler, batch, 2, args, run)
    assert all(math.isfinite(logs[k]) for k in ("loss_src", "loss_mix", "loss_reg_s", "loss_reg_t"))


# ------------------------------------------------------------------------------------------------------------
# --profile and --estimate-memory
# ------------------------------------------------------------------------------------------------------------
def test_profile_needs_no_data_and_writes_nothing(tmp_path, monkeypatch):
    from benchmarks import measure
    peak = measure.matmul_peak_gflops
    monkeypatch.setattr(measure, "matmul_peak_gflops", lambda device: peak(device, n=512))  # the peak, measured smaller
    res = madm.main(madm.Args(sd_model="tiny", profile=1, crop_size=32, fusion_stride=4,
                              data_root=str(tmp_path / "no-data"), out=str(tmp_path / "out")))
    for key in ("flops_per_iter", "sec_per_iter", "peak_mem_gb", "matmul_peak_gflops", "utilization"):
        assert res[key] > 0, key
    assert not (tmp_path / "out").exists()


def _param_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def test_estimate_memory_tiny_is_exact_on_parameters_and_writes_nothing(tmp_path):
    """--estimate-memory with the tiny SD: no data, no weights read, nothing written, nothing big allocated, and
    its parameter bytes are those of the real model in the dtypes a bf16 GPU run stores them (UNet and heads fp32,
    frozen VAE bf16; the text encoder is freed after embedding ""). The baseline step (one pass per micro-step)
    keeps it fast: shapes-only dispatch costs the same per op whatever the model size; the full step runs under
    it in test_estimate_memory_at_the_paper_setting."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    res = madm.main(madm.Args(sd_model="tiny", estimate_memory=True, crop_size=32, batch_size=1, source_only=True,
                              data_root=str(tmp_path / "no-data"), out=str(tmp_path / "out")))
    print(f"estimate-memory tiny: {time.time() - t:.1f} s, {res['predicted_peak_gb']} GB")
    assert not (tmp_path / "out").exists() and not (tmp_path / "no-data").exists()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 < 5e8
    student, ema_seg = madm.build_model(madm.Args(sd_model="tiny", crop_size=32), 11, CPU,
                                        choose_precision("bf16", CPU))
    assert student.frozen.vae.dtype == torch.bfloat16
    exact = _param_bytes([student, ema_seg, student.frozen.vae])
    assert res["parameters_gb"] == pytest.approx(exact / 1e9, abs=6e-4)       # reported in GB to 3 decimals
    assert res["gradients_gb"] > 0 and res["optimizer_state_gb"] > 0 and res["activations_gb"] > 0
    assert res["predicted_peak_gb"] >= res["parameters_gb"] + res["optimizer_state_gb"]


@pytest.mark.slow
def test_estimate_memory_at_the_paper_setting(tmp_path):
    """The SD 1.5 architecture (random-sd15) at the paper's crop 512, global batch 2: completes without a GPU or
    a download, allocates nothing big, and its parameter bytes are those of SD 1.5's UNet + our heads (fp32) and
    its VAE (bf16), counted on the meta device."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    res = madm.main(madm.Args(sd_model="random-sd15", estimate_memory=True, data_root=str(tmp_path / "no-data"),
                              out=str(tmp_path / "out")))
    print(f"estimate-memory random-sd15 crop 512: {time.time() - t:.1f} s, {res['predicted_peak_gb']} GB")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 < 2e9
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from common.sd_backbone import sd_config
    cfg = sd_config("sd15")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]).to(torch.bfloat16)
        seg = madm.SegHead(madm.Conditioning(torch.zeros(1, 77, 768), 1280), (320, 640, 1280), 11, 1)
    exact = _param_bytes([unet, seg, seg]) + _param_bytes([vae])
    assert res["parameters_gb"] == pytest.approx(exact / 1e9, abs=6e-4)
    assert 10 < res["predicted_peak_gb"] < 200 and not (tmp_path / "out").exists()


def test_unet_passes_per_step(data, tmp_path, monkeypatch):
    """Per micro-step: one teacher pass without grad and one pass with grad per student input (source, mixed);
    the VAE decodes s0 once per pass, never with grad. Global batch 2 = 2 micro-steps. Evaluation follows the
    official protocol (XiaRho/MADM test_resize_h_w): the image resized to eval_size^2 with Pillow BILINEAR, the
    label with Pillow NEAREST, the metric at that size (the Pillow equivalence itself is tested in
    test_metrics.py)."""
    calls, evals = [], []
    real, real_eval = madm.madm_forward, madm.metrics.evaluate

    def counting(unet, seg, frozen, z0, t):
        calls.append((torch.is_grad_enabled(), t))
        return real(unet, seg, frozen, z0, t)

    def recording_eval(*a, **kw):
        evals.append(kw)
        return real_eval(*a, **kw)
    monkeypatch.setattr(madm, "madm_forward", counting)
    monkeypatch.setattr(madm.metrics, "evaluate", recording_eval)
    madm.main(small_args(iters=1, out=str(tmp_path / "run"), eval_every=100))
    assert evals and all(kw["image_resize"] == "pil-bilinear" and kw["label_resize"] == "pil-nearest"
                         and kw["metric_size"] == "input" and kw["input_size"] == (32, 32) for kw in evals)
    train_calls = calls[:6]
    assert [g for g, _ in train_calls] == [False, True, True] * 2
    assert all(t in (50, 51) for _, t in train_calls[::3])  # DPLG t0 in {lo, lo + 1} at step 0
    assert all(t == 0 for _, t in train_calls[1::3] + train_calls[2::3])
    assert all(not g and t == 0 for g, t in calls[6:])       # evaluation: student, t = 0, no grad


# ------------------------------------------------------------------------------------------------------------
# Learning, errors, reproducibility, resume, DDP, demo
# ------------------------------------------------------------------------------------------------------------
def test_learning_on_synthetic_source(data, tmp_path):
    """Source -> source (cityscapes, 19 classes): the source loss falls and the source mIoU is clearly above
    chance after a short run (24 steps of one micro-batch of 2 pairs, crop 32)."""
    res = madm.main(small_args(src="cityscapes", tgt="cityscapes", iters=24, lr=3e-3, micro_batch_size=2,
                               out=str(tmp_path / "learn"), eval_every=100, ckpt_every=100))
    losses = [r["loss_src"] for r in res["train_log"]]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.9 * np.mean(losses[:3]), losses
    # Chance: the best constant prediction scores IoU = share of its class on that class and 0 elsewhere.
    gt = np.array([n for n in res["gt_pixels"].values()], dtype=float)
    present = (gt > 0).sum()
    best_constant = gt.max() / gt.sum() / present
    assert res["miou"] > max(3 * best_constant, 0.04), (res["miou"], best_constant, res["per_class_iou"])


# Target mIoU gain (points) of MADM over its --source-only baseline on mini at the setting of test_adapts_on_mini,
# measured 2026-12-07 with madm.main at one thread: seeds 0..9 before the scripts set MKL's strict reproducibility
# mode (MKL_CBWR), then seeds 0..4 with it (the numerics every run has now; see the test's docstring).
ADAPT_GAINS = (0.92, 4.50, 2.98, 4.72, 2.90, 3.73, 4.61, 6.00, 2.60, 2.48) + (1.21, 1.89, 5.79, 5.14, 2.80)


def test_adapts_on_mini(data):
    """Adapted beats source-only: MADM cityscapes -> dsec_event on the pretrained mini SD, --demo settings (crop 64,
    eval 64, lr 3e-3, fusion stride 4, the paper's pseudo threshold 0.968), 30 steps on the default sample
    (data/synthetic: 8 train / 4 eval images), seed 0, once with --source-only and once adapted, in process:

        python madm.py --demo --iters 30 --seed 0 [--source-only]

    Measured 2026-12-07 over seeds 0..9 (source-only -> adapted, target mIoU): 10.67 -> 11.59 (+0.92),
    6.54 -> 11.04 (+4.50), 6.44 -> 9.42 (+2.98), 10.57 -> 15.29 (+4.72), 7.96 -> 10.86 (+2.90), 6.59 -> 10.32
    (+3.73), 4.11 -> 8.72 (+4.61), 5.24 -> 11.24 (+6.00), 8.41 -> 11.01 (+2.60), 8.25 -> 10.73 (+2.48): gain
    3.54 +- 1.50, every seed positive. Since every script sets MKL_CBWR=AUTO,STRICT (bit-identical CPU runs), the
    numerics differ in the last bits and the runs diverge: seeds 0..4 now 8.21 -> 9.42 (+1.21), 9.51 -> 11.40
    (+1.89), 6.28 -> 12.07 (+5.79), 10.38 -> 15.51 (+5.14), 8.20 -> 11.00 (+2.80), again every seed positive.
    Margin: half the smallest measured gain (0.46 points), so seed 0 (+1.21 now) passes with room and a change
    that takes the gain away (both runs the baseline: gain 0 exactly) fails. What this step count sees is mostly the mixed pass
    (ClassMix of source classes onto the target crop + strong augmentation): with the pseudo labels' weight
    forced to 0 (q = 0) seeds 0..4 scored 10.64, 10.49, 10.27, 14.56, 9.86, i.e. gains -0.03, +3.95, +3.83,
    +3.99, +1.90 over source-only (an EMA cap of 0.9 or a threshold of 0.9 did not make the pseudo labels' share
    robust either); the pseudo labels carry about 5% of the target pixels' weight in 30 steps (seed 0: q per 5
    steps 0, 0.03, 0.03, 0.05, 0.08, 0.11). So the q assertion below, not the mIoU margin, is what catches pseudo
    labels that carry no weight (of seeds 0..4 the margin catches it at seed 0 only). Cost: 20 s (baseline) +
    37 s (adapted) of one core: both runs 53.7 s wall / 51.5 s CPU, pytest 60 s, with the machine lightly loaded;
    178 s wall under a load of 6 on the shared 2 cores."""
    runs = {}
    for variant in ("base", "full"):  # the two commands, started at collection beside the other tests (conftest.py)
        r, out = background(f"madm-adapt-{variant}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[variant] = json.loads((out / "metrics.json").read_text())
    base, full = (runs[v]["final"] for v in ("base", "full"))
    gain = 100 * (full["miou"] - base["miou"])
    margin = 0.5 * min(ADAPT_GAINS)
    qs = [rec["q"] for rec in runs["full"]["train_log"]]
    print(f"source-only {100 * base['miou']:.2f} | adapted {100 * full['miou']:.2f} | gain {gain:+.2f} "
          f"(margin {margin:.2f}) | q per 5 steps {[round(q, 3) for q in qs]}")
    assert gain > margin, (100 * base["miou"], 100 * full["miou"], margin)
    assert len(qs) == 6 and sum(q > 0 for q in qs) >= 4, qs   # q > 0 in 25 of the 30 steps measured


def test_error_paths(data, tmp_path):
    with pytest.raises(UserError, match="--eval-only"):
        madm.main(small_args(eval_only=True))
    with pytest.raises(UserError, match="--resume"):
        madm.main(small_args(resume=True, out=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="--batch-size"):
        madm.main(small_args(batch_size=3, micro_batch_size=2, out=str(tmp_path / "b")))
    with pytest.raises(UserError, match="--lplr-weights: got 3 values"):
        madm.main(small_args(lplr_weights=(1.0, 1.0, 1.0), out=str(tmp_path / "w")))
    with pytest.raises(UserError, match="--vae-dtype: unknown value"):
        madm.main(small_args(vae_dtype="fp8", out=str(tmp_path / "v")))
    r = _run(["--sd-model", "tiny", "--iters", "1", "--data-root", str(tmp_path / "missing"),
              "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the inputs validate
    assert not any((tmp_path / d).exists() for d in ("empty", "b", "w", "v"))


# Default thread count (no OMP_NUM_THREADS: torch takes the cores of the machine, 2 here). Waiting OpenMP threads
# sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE): on a machine shared with other jobs spinning threads make a
# 2-thread step many times slower; how threads wait changes no result.
ENV_DEFAULT = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
ENV_DEFAULT["OMP_WAIT_POLICY"] = "PASSIVE"


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Same seed, default thread count: `ref` (6 steps) on a FRESH copy of the synthetic sample, so it builds
    the image-size and rare-class-sampling caches itself; `killed`, the same command reading those caches, is
    SIGKILLed after its step-2 checkpoint and then resumed to step 6."""
    tmp = tmp_path_factory.mktemp("madm_repro")
    fresh = tmp / "data"
    cmd = [*SMALL, "--iters", "6", "--ckpt-every", "2", "--eval-every", "100", "--keep-ckpts", "5",
           "--data-root", str(fresh)]
    refrun = _run([*cmd, "--out", str(tmp / "ref")], env=dict(ENV_DEFAULT, XDG_CACHE_HOME=str(tmp / "cache")))
    assert refrun.returncode == 0, refrun.stderr[-2000:]
    assert list(fresh.rglob(".cache/*.json")) or list((tmp / "cache").rglob("*.json"))   # caches were built
    out = tmp / "killed"
    p = subprocess.Popen([sys.executable, "madm.py", *cmd, "--out", str(out)], cwd=ROOT,
                         env=dict(ENV_DEFAULT, XDG_CACHE_HOME=str(tmp / "cache")),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step_0000002" / "state.pt"
    t0 = time.time()
    while not marker.exists() and p.poll() is None and time.time() - t0 < 200:
        time.sleep(0.02)
    alive = p.poll() is None
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert alive, "the run ended before it could be killed"
    assert not (out / "checkpoints" / "step_0000006").exists()
    killed_step2 = _weights(out, 2)
    res = _run([*cmd, "--out", str(out), "--resume"], env=dict(ENV_DEFAULT, XDG_CACHE_HOME=str(tmp / "cache")))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    return tmp, killed_step2


def test_same_seed_runs_are_bit_identical_at_the_default_thread_count(three_runs):
    """Issue 15.4: two same-seed runs with the default thread count, one building the data caches on a fresh
    sample and one reading them, hold bit-identical weights at step 2. (The reported difference, `loss_reg_s`
    2.529 vs 2.539 at step 5, could not be reproduced on this machine; the setting that addresses it is
    oneDNN's deterministic mode, which init_distributed switches on for every CPU run.)"""
    tmp, killed_step2 = three_runs
    a = _weights(tmp / "ref", 2)
    assert a.keys() == killed_step2.keys()
    for k in a:
        assert torch.equal(a[k], killed_step2[k]), k


def test_kill_and_resume_is_bit_identical(three_runs, data, tmp_path):
    """SIGKILL a run after its step-2 checkpoint exists, resume it, and compare the final weights bit for bit
    with an uninterrupted run of the same seed (CPU, default thread count)."""
    tmp, _ = three_runs
    a, b = _weights(tmp / "ref", 6), _weights(tmp / "killed", 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["seg.head.conv_seg.weight"], _weights(tmp / "killed", 2)["seg.head.conv_seg.weight"])
    # --eval-only on the final checkpoint scores what the run scored at its end
    ckpt = tmp / "ref" / "checkpoints" / "step_0000006"
    ev = madm.main(small_args(eval_only=True, ckpt=str(ckpt), data_root=str(tmp / "data"), out=str(tmp_path / "ev")))
    last = json.loads((tmp / "ref" / "metrics.json").read_text())["evals"][-1]
    assert ev["miou"] == pytest.approx(last["miou"], abs=1e-6)
    assert list((tmp_path / "ev" / "predictions").glob("*.png"))


def _stop_after_first_step(procs, signalled, total):
    """Read rank 0's output until its `step 1/<total>` line, send SIGTERM to the `signalled` processes, and
    return ([return codes], rank 0's whole output); every process is killed after 300 s."""
    watchdogs = [threading.Timer(300, p.kill) for p in procs]
    for w in watchdogs:
        w.start()
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if line.startswith(f"step 1/{total} "):
            for p in signalled:
                p.send_signal(signal.SIGTERM)
            break
    lines.append(procs[0].communicate()[0])
    for p in procs[1:]:
        p.communicate()
    for w in watchdogs:
        w.cancel()
    return [p.returncode for p in procs], "".join(lines)


def _stopped_step(output: str, total: int) -> int:
    """The step of the `stopped by SIGTERM` line, which must be the last line of the output."""
    m = re.fullmatch(r"stopped by SIGTERM at step (\d+): checkpoint written, continue with --resume",
                     output.strip().splitlines()[-1])
    assert m, output[-2000:]
    assert 1 <= int(m.group(1)) < total
    return int(m.group(1))


def test_sigterm_writes_a_checkpoint_exits_75_and_resume_is_bit_identical(three_runs):
    """`python madm.py` gets SIGTERM after its first log line: it finishes the step it is in, writes that
    step's checkpoint (no periodic one is due), prints the line and exits with 75; --resume then ends with
    the weights of the uninterrupted run (`ref` of three_runs: same seed, threads and data), bit for bit."""
    tmp, _ = three_runs
    env, out = dict(ENV_DEFAULT, XDG_CACHE_HOME=str(tmp / "cache")), tmp / "sigterm"
    cmd = [*SMALL, "--iters", "6", "--ckpt-every", "100", "--eval-every", "100", "--data-root",
           str(tmp / "data"), "--out", str(out)]
    p = subprocess.Popen([sys.executable, "madm.py", *cmd], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (code,), output = _stop_after_first_step([p], [p], 6)
    step = _stopped_step(output, 6)
    assert code == 75, output[-2000:]
    assert [c.name for c in (out / "checkpoints").iterdir()] == [f"step_{step:07d}"]
    res = _run([*cmd, "--resume"], env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at step {step}" in res.stdout
    a, b = _weights(tmp / "ref", 6), _weights(out, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_with_accumulation(data, tmp_path):
    """2 gloo processes x micro-batch 1 (no accumulation) vs 1 process x micro-batch 1 x 2 accumulation steps.

    Both compute the same thing: micro-batch j of step i reads TrainStream samples j and reseeds the torch
    generator from (seed, i, j), whoever runs it; each micro-batch has its own BatchNorm statistics in both
    set-ups (a 1 x micro 2 run would pool BN over 2 images and differ); DDP averages the two gradients, the
    accumulation sums two 1/2-scaled ones. So the weights after the first optimizer step agree up to float
    rounding (all-reduce order). BN running statistics are not compared: DDP broadcasts rank 0's buffers.
    """
    cmd = [*SMALL, "--iters", "1", "--ckpt-every", "1", "--eval-every", "100", "--batch-size", "2",
           "--micro-batch-size", "1"]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "madm.py", *cmd, "--out", str(tmp_path / "ddp")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "x2" in outs[0][0] and "accumulation 1" in outs[0][0]
    single = _run([*cmd, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    assert "accumulation 2" in single.stdout
    a, b = _weights(tmp_path / "ddp", 1), _weights(tmp_path / "one", 1)
    moved = 0
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
        moved += 1
    assert moved > 100


def _two_ranks(cmd, out):
    """madm.py as ranks 0 and 1 of a 2-process gloo group (the variables torchrun sets); output in pipes."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "madm.py", *cmd, "--out", str(out)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(ENV1, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]


def test_sigterm_under_two_processes_both_ranks_stop_after_the_same_step(data, tmp_path):
    """2 gloo processes; SIGTERM reaches rank 1 only (the all-reduced flag must stop rank 0 too): both exit
    with 75 after the same step, whose checkpoint rank 0 wrote, neither hangs; a 2-process --resume ends
    with the weights of an uninterrupted 2-process run, bit for bit."""
    cmd = [*SMALL, "--iters", "3", "--ckpt-every", "100", "--eval-every", "100", "--batch-size", "2",
           "--micro-batch-size", "1"]
    ref = _two_ranks(cmd, tmp_path / "ref")
    for p in ref:
        o, _ = p.communicate(timeout=300)
        assert p.returncode == 0, o[-2000:]
    procs = _two_ranks(cmd, tmp_path / "cut")
    codes, output = _stop_after_first_step(procs, procs[1:], 3)
    step = _stopped_step(output, 3)
    assert codes == [75, 75], output[-2000:]
    assert [c.name for c in (tmp_path / "cut" / "checkpoints").iterdir()] == [f"step_{step:07d}"]
    for p in _two_ranks([*cmd, "--resume"], tmp_path / "cut"):
        o, _ = p.communicate(timeout=300)
        assert p.returncode == 0, o[-2000:]
    a, b = _weights(tmp_path / "ref", 3), _weights(tmp_path / "cut", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_synthia_run_ends_with_miou16_13_in_the_line_the_result_and_metrics_json(tmp_path, capsys):
    """A SYNTHIA -> Cityscapes demo run (2 steps) reports the SYNTHIA-source columns mIoU16 / mIoU13 at its end:
    the `done` line, main's result and metrics.json's "final" record, equal to the last evaluation's."""
    ensure_synthetic_sample(DATA)
    res = madm.main(madm.Args(demo=True, src="synthia", tgt="cityscapes", data_root=str(DATA), iters=2,
                              eval_every=2, ckpt_every=2, out=str(tmp_path / "run")))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and re.search(r"\| mIoU [\d.]+ \| mIoU16 [\d.]+ \| mIoU13 [\d.]+$", done[0]), done
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("miou", "miou16", "miou13"):
        assert res[key] == data["final"][key] == data["evals"][-1][key]
        assert f"{100 * res[key]:.2f}" in done[0]


def test_demo_end_to_end(tmp_path):
    """`python madm.py --demo`: exit 0, metrics.json, pictures, curves, an mIoU line, and the target side acts for
    most of the run on mini at the paper's threshold 0.968: the start line says what adapts and q > 0 in most steps
    (29 of 40 measured on 2026-12-07)."""
    r, out = background("madm-demo")   # started at collection, beside the other tests (conftest.py)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval step 40 | mIoU" in r.stdout and "per-class results" in r.stdout
    assert "adapting: EMA-teacher pseudo labels on the target" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["args"]["sd_model"] == "mini" and m["args"]["pseudo_threshold"] == 0.968
    assert m["evals"][-1]["step"] == 40
    assert math.isfinite(m["evals"][-1]["miou"]) and "miou_first_half" in m["evals"][-1]
    qs = [rec["q"] for rec in m["train_log"]]
    assert len(qs) == 8 and sum(q > 0 for q in qs) >= 5, qs
    n = int(r.stdout.split("carried weight (q > 0) in ")[1].split(" of 40")[0])
    assert n >= 20, n
    assert list((out / "predictions").glob("*.png"))
    assert (out / "checkpoints" / "step_0000040" / "weights.safetensors").exists()
