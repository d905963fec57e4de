"""ICCLD (iccld.py): components, both training steps against the equations written out here, the baseline flag,
mixed precision, --estimate-memory, sampling, learning, resume, errors and the demo.

Everything runs on CPU with the tiny random SD and the synthetic sample; one tiny-SD load is shared per module.
The step tests run one real `train_step_stage1` / `train_step_stage2`, record what it drew (ClassMix masks, the
augmented image, timesteps, noise, every UNet and discriminator input) and the gradients its optimizers saw,
and recompute the loss from the equations of the header with the weights from before the step. Every line of
both METHOD STEP blocks was deleted or replaced by a plausible wrong alternative once; each change turned one
of these tests red (`python tests/mutations.py iccld` runs that check).
"""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import background, run_two_gloo_processes, sigterm_on_call
import torch

import iccld
from common import runs, sd_backbone, synthetic
from common.cli import Stopped, run_cli
from common.datasets import PALETTES

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd():
    return sd_backbone.load_sd("tiny")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(synthetic.ensure_synthetic_sample(str(ROOT / "data" / "synthetic")))


def _fresh_unet(sd):
    return copy.deepcopy(sd.unet)


def _ctx(sd, n):
    return sd_backbone.encode_prompts(sd.tokenizer, sd.text_encoder, [""]).expand(n, -1, -1)


# ---- references written out from the equations (independent of iccld.py's helpers) ---------------------------
def _ce(logits, y, w=None):
    """CE averaged over all pixels, ignored (255) pixels counting 0, optionally pixel-weighted."""
    valid = y != 255
    nll = -logits.float().log_softmax(1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    nll = nll * valid
    return (nll if w is None else nll * w).mean()


def _label_latent(sd, y):
    """Palette-painted label (ignore black) in [-1, 1] -> pretrained VAE posterior mean x 0.18215."""
    lut = torch.zeros(256, 3)
    lut[:19] = torch.tensor(np.asarray(PALETTES[19]), dtype=torch.float32)
    with torch.no_grad():
        return sd_backbone.vae_encode(sd.vae, lut[y].permute(0, 3, 1, 2) / 255 * 2 - 1).float()


def _alpha_bar():
    """SD's scaled_linear schedule: beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, alpha_bar = prod(1 - beta)."""
    beta = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - beta, 0).float()


def _lr_factor(i, total, warmup):
    """DAFormer poly10warm: (1 - i/total)^1 times the linear warm-up from 1e-6 over `warmup` steps."""
    f = 1 - i / total
    return f * (1e-6 + (1 - 1e-6) * i / warmup) if i < warmup else f


def _pseudo(net_ema, x_t, threshold, rows):
    """argmax, q = fraction of confident pixels, w = q with the top / bottom rows zeroed."""
    with torch.no_grad():
        p = net_ema.direct(x_t).softmax(1)
    conf, y_hat = p.max(1)
    q = (conf >= threshold).float().mean()
    w = torch.full_like(conf, float(q))
    w[:, :rows[0]] = 0
    w[:, conf.shape[1] - rows[1]:] = 0
    return y_hat, q, w


def _pool8(w):
    """Mean over each 8x8 pixel block: (B, H, W) -> (B, 1, H/8, W/8)."""
    B, H, W = w.shape
    return w.reshape(B, H // 8, 8, W // 8, 8).mean((2, 4))[:, None]


def _setup(sd, prec="fp32", **kw):
    """The Args and the Run a stage is built from (prec: its Precision, as the step functions take it)."""
    a = iccld.Args(**{**dict(sd_model="tiny", crop_size=32, iters=20, iters_stage2=20, warmup_iters=10), **kw})
    run = iccld.Run(iccld.Dist(0, 1, CPU), iccld.choose_precision(prec, CPU), 19, copy.deepcopy(sd),
                    _ctx(sd, 1).float())
    return SimpleNamespace(args=a, run=run, prec=run.precision)


def _build(s, stage):
    return iccld.build_stage1(s.args, s.run) if stage == 1 else iccld.build_stage2(s.args, s.run, None)


def _step(st, batch, i, a, prec):
    """One optimizer step of a built stage, its trained modules passed as the loop passes them (unwrapped)."""
    if isinstance(st, iccld.Stage1):
        return iccld.train_step_stage1(st.net, st.net_ema, st.lab, st.optimizer, st.scaler, batch, i, a, prec)
    return iccld.train_step_stage2(st.unet, st.unet_ema, st.disc, st.frozen, st.optimizer, st.optimizer_d, st.scaler,
                                   batch, i, a, prec)


def _batch(c, seed=0, b=2):
    """Source images with a few block-shaped classes and an ignore region, random target images."""
    g = torch.Generator().manual_seed(seed)
    y_s = torch.randint(0, 4, (b, c // 8, c // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    y_s[:, : c // 4, : c // 4] = 255
    return torch.rand(b, 3, c, c, generator=g), y_s, torch.rand(b, 3, c, c, generator=g)


class Recorder:
    """Wraps a module function (monkeypatch) and keeps each call's inputs and output."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, fn = [], getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            return out
        monkeypatch.setattr(owner, name, wrapped)


def _grads_at_step(opt):
    """The gradients each parameter holds when `opt.step` runs (the optimizer sees exactly these)."""
    seen, step = {}, opt.step

    def recording(*args, **kwargs):
        seen.update({id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None})
        return step(*args, **kwargs)
    opt.step = recording
    return seen


def _inputs(module):
    """Forward pre-hook recording every call's positional and keyword inputs."""
    calls = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls


# ---- components -----------------------------------------------------------------------------------------------
def test_encoder_latent_is_the_vae_posterior_mean(sd):
    net = iccld.ICCLDNet(sd.vae, 19)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z0, skips = net.E(x)
    torch.testing.assert_close(z0, sd_backbone.vae_encode(sd.vae, x), rtol=0, atol=1e-6)
    assert [tuple(f.shape[-2:]) for f in skips] == [(32, 48), (16, 24), (8, 12), (4, 6)]  # strides 1, 2, 4, 8
    assert [f.shape[1] for f in skips] == [b for b in sd.vae.config.block_out_channels]


def test_zero_initialised_skips_leave_decoder_equal_to_plain_decoder(sd):
    torch.manual_seed(0)
    net = iccld.ICCLDNet(sd.vae, 19)
    plain = copy.deepcopy(sd.vae)
    plain.decoder.conv_out = net.D.decoder.conv_out  # "plain decoder" = SD VAE decoder with the same new conv_out
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z0, skips = net.E(x)
        ours = net.D(z0, skips)
        ref = plain.decode(z0 / sd.vae.config.scaling_factor).sample
        assert ours.shape == (2, 19, 32, 32)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        # the connections are live: once a skip conv is non-zero the output changes
        net.D.skip_convs[3].weight.normal_()
        assert (net.D(z0, skips) - ref).abs().max() > 1e-3


def test_widening_conv_in_with_zero_channels_leaves_unet_output_unchanged(sd):
    unet = _fresh_unet(sd)
    z_t, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), _ctx(sd, 2)
    with torch.no_grad():
        before = unet(z_t, t, encoder_hidden_states=ctx).sample
        iccld.widen_conv_in(unet)
        assert unet.conv_in.weight.shape[1] == 8 and unet.config.in_channels == 8
        after = unet(torch.cat([z_t, torch.randn(2, 4, 8, 8)], 1), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_label_latents_paint_with_the_palette_and_ignore_black(sd):
    lab = iccld.LabelLatents(sd.vae, PALETTES[19])
    y = torch.full((1, 16, 16), 255)
    y[0, :8] = 13  # car
    car = torch.tensor(PALETTES[19][13], dtype=torch.float32) / 255 * 2 - 1
    painted = torch.zeros(1, 3, 16, 16) - 1  # black in [-1, 1]
    painted[0, :, :8] = car[:, None, None]
    torch.testing.assert_close(lab(y), sd_backbone.vae_encode(sd.vae, painted).float(), rtol=0, atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients(sd):
    torch.manual_seed(0)
    net = iccld.ICCLDNet(sd.vae, 19).requires_grad_(True)
    for conv in net.D.skip_convs:  # non-zero skips so every path carries gradient
        torch.nn.init.normal_(conv.weight, std=0.1)
    x, z_lab, y = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 4, 4), torch.randint(0, 19, (2, 32, 32))
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.E.grad_checkpointing = net.D.grad_checkpointing = ckpt
        sum(iccld.stage1_losses(net, x, y, z_lab)).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_six_images_in_one_unet_batch_equal_three_group_calls(sd):
    unet = iccld.widen_conv_in(_fresh_unet(sd))
    x, t, ctx = torch.randn(6, 8, 8, 8), torch.randint(0, 1000, (6,)), _ctx(sd, 6)
    with torch.no_grad():
        batched = unet(x, t, encoder_hidden_states=ctx).sample
        groups = torch.cat([unet(x[i:i + 2], t[i:i + 2], encoder_hidden_states=ctx[i:i + 2]).sample
                            for i in (0, 2, 4)])
    torch.testing.assert_close(batched, groups, rtol=1e-4, atol=1e-5)


def test_predicted_x0_inverts_add_noise(sd):
    z0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    z_t = sd.scheduler.add_noise(z0, eps, t)
    torch.testing.assert_close(iccld.predict_x0(z_t, eps, sd.scheduler.alphas_cumprod[t]), z0,
                               rtol=1e-4, atol=1e-3)


def test_discriminator_and_generator_losses_move_in_opposite_directions():
    torch.manual_seed(0)
    disc = iccld.discriminator()
    torch.nn.init.constant_(disc[-1].bias, 0.5)  # start undecided (outputs ~0.5) so both terms have slope
    x_src = torch.randn(2, 4, 16, 16) + 1.0
    x_tgt = torch.nn.Parameter(torch.randn(4, 4, 16, 16) - 1.0)  # stands for eps_theta's predicted x0

    def losses():
        with torch.no_grad():
            return (iccld.lsgan_d_loss(disc(x_src), disc(x_tgt)).item(), iccld.lsgan_g_loss(disc(x_tgt)).item())

    # discriminator step (on detached x0): L_dis falls, L_adv rises
    d0, g0 = losses()
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.05)
    iccld.lsgan_d_loss(disc(x_src), disc(x_tgt.detach())).backward()
    opt_d.step()
    d1, g1 = losses()
    assert d1 < d0 and g1 > g0
    # generator step (discriminator frozen): L_adv falls, L_dis rises
    opt_d.zero_grad(set_to_none=True)
    disc.requires_grad_(False)
    opt_g = torch.optim.SGD([x_tgt], lr=100.0)
    iccld.lsgan_g_loss(disc(x_tgt)).backward()
    opt_g.step()
    d2, g2 = losses()
    assert g2 < g1 and d2 > d1
    assert all(p.grad is None for p in disc.parameters())  # the frozen discriminator got no gradient


def test_ddim_with_t_steps_returns_a_latent_that_d_decodes(sd, monkeypatch):
    net = iccld.ICCLDNet(sd.vae, 19).eval()
    unet = iccld.widen_conv_in(_fresh_unet(sd))
    ddim = iccld.make_sampler(sd.scheduler)
    x, ctx, decoded = torch.rand(1, 3, 32, 48), _ctx(sd, 1)[:1], Recorder(monkeypatch, net.D, "forward")
    with torch.no_grad():
        for T in (1, 3):
            logits = iccld.predict_diffusion(net, unet, ctx, ddim, T, torch.Generator().manual_seed(0), x)
            assert len(ddim.timesteps) == T
            z_bar = decoded.calls[-1][0][0]  # the sampled latent D decodes
            assert z_bar.shape == (1, 4, 4, 6) and torch.isfinite(z_bar).all()
            assert logits.shape == (1, 19, 32, 48) and torch.isfinite(logits).all()
        # same seed, same sample; the condition matters once conv_in's extra channels are non-zero
        a = iccld.predict_diffusion(net, unet, ctx, ddim, 3, torch.Generator().manual_seed(1), x)
        b = iccld.predict_diffusion(net, unet, ctx, ddim, 3, torch.Generator().manual_seed(1), x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        unet.conv_in.weight[:, 4:].normal_(std=0.1)
        c = iccld.predict_diffusion(net, unet, ctx, ddim, 3, torch.Generator().manual_seed(1), x)
        assert (a - c).abs().max() > 1e-4


def test_sampling_starts_at_the_last_training_timestep_and_t1_depends_on_the_image(sd, monkeypatch):
    """Trailing DDIM timesteps (999 for T = 1; 999, 666, 332 for T = 3), one sampler for training-time
    evaluation and --eval-only (both go through `evaluate`), and at T = 1 the decoded latent is the x0 predicted
    from z_T at t = 999 (computed here), which depends on the image, not the starting noise itself."""
    ddim = iccld.make_sampler(sd.scheduler)
    for T, expected in ((1, [999]), (2, [999, 499]), (3, [999, 666, 332])):
        ddim.set_timesteps(T)
        assert ddim.timesteps.tolist() == expected
    torch.manual_seed(0)
    net = iccld.ICCLDNet(sd.vae, 19).eval()
    unet = iccld.widen_conv_in(_fresh_unet(sd))
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(std=0.3)
    ctx, z_bar = _ctx(sd, 1)[:1], Recorder(monkeypatch, net.D, "forward")
    x1, x2 = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for x in (x1, x2):
            iccld.predict_diffusion(net, unet, ctx, iccld.make_sampler(sd.scheduler), 1,
                                    torch.Generator().manual_seed(3), x)
        z_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        x0 = {}  # x0 predicted from z_T at t for both images: (z_T - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
        for t in (999, 1):
            ab = _alpha_bar()[t]
            for k, x in enumerate((x1, x2)):
                eps_hat = unet(torch.cat([z_T, net.E(x * 2 - 1)[0]], 1), torch.tensor([t]),
                               encoder_hidden_states=ctx).sample
                x0[t, k] = (z_T - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    for k in (0, 1):
        torch.testing.assert_close(z_bar.calls[k][0][0], x0[999, k], rtol=1e-4, atol=1e-4)
    # SD's "leading" spacing ran T = 1 at t = 1: x0_hat = the starting noise up to 4 % of eps_hat, so the image
    # barely mattered; at t = 999 the image moves x0_hat at least 10x more
    moved = (x0[999, 0] - x0[999, 1]).abs().mean()
    assert moved > 10 * (x0[1, 0] - x0[1, 1]).abs().mean() and moved > 0.1, moved
    assert (x0[1, 0] - z_T).abs().max() < 0.1 * (x0[999, 0] - z_T).abs().max()


def test_pseudo_labels_quality_weight_and_row_crop(sd):
    net = iccld.ICCLDNet(sd.vae, 19).eval()
    y_hat, q, w = iccld.pseudo_labels(net, torch.rand(2, 3, 32, 32), 0.0, (2, 5))
    assert y_hat.shape == (2, 32, 32) and float(q) == 1.0  # every pixel passes threshold 0
    assert (w[:, :2] == 0).all() and (w[:, -5:] == 0).all() and (w[:, 2:-5] == 1).all()
    _, q, _ = iccld.pseudo_labels(net, torch.rand(2, 3, 32, 32), 1.01, (0, 0))
    assert float(q) == 0.0
    assert iccld.pl_rows(iccld.Args(crop_size=512)) == (15, 120) and iccld.pl_rows(iccld.Args(crop_size=64)) == (2, 15)
    assert iccld.pl_rows(iccld.Args(tgt="acdc")) == (0, 0)


def test_class_mix_mixes_image_label_and_weight_alike():
    torch.manual_seed(0)
    x_s, x_t = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    y_s = torch.randint(0, 4, (2, 16, 16))
    y_hat = torch.full((2, 16, 16), 7)
    w_t = torch.full((2, 16, 16), 0.25)
    torch.manual_seed(1)
    M = iccld.class_mix_masks(y_s)[:, 0].bool()
    torch.manual_seed(1)
    _, y_m, w_m = iccld.class_mix(x_s, y_s, x_t, y_hat, w_t)
    assert torch.equal(y_m, torch.where(M, y_s, y_hat))
    assert torch.equal(w_m, torch.where(M, torch.ones_like(w_t), w_t))
    assert 0 < M.float().mean() < 1


@pytest.mark.parametrize("stage", [1, 2])
def test_param_groups_lr_and_weight_decay_follow_daformer(sd, stage):
    """New layers (skip convs + conv_out; the widened conv_in) at --new-layer-lr, the rest at --lr; weight decay
    0 exactly on the parameters DAFormer's `norm=dict(decay_mult=0.0)` matches (names containing "norm"),
    --weight-decay on every other weight and bias; the discriminator's Adam has no decay (ADVENT)."""
    s = _setup(sd, crop_size=64)
    st = _build(s, stage)
    model = st.net if stage == 1 else st.unet
    names = {id(p): n for n, p in model.named_parameters()}
    new = ({n for n in names.values() if n.startswith(("D.skip_convs.", "D.decoder.conv_out."))} if stage == 1
           else {"conv_in.weight", "conv_in.bias"})
    opt = st.optimizer
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["base"] == (s.args.new_layer_lr if n in new else s.args.lr), n
            assert g["weight_decay"] == (0.0 if "norm" in n else s.args.weight_decay), n
    assert any("norm" in n for n in names.values()) and any(n.endswith(".bias") and "norm" not in n
                                                             for n in names.values())
    assert opt.param_groups[0]["base"] == s.args.lr and opt.param_groups[0]["weight_decay"] > 0  # lr logged
    if stage == 2:
        assert all(g["weight_decay"] == 0 for g in st.optimizer_d.param_groups)


# ---- stage 1 step against the equations -----------------------------------------------------------------------
def _stage1(sd, monkeypatch, source_only=False):
    """One real stage-1 step at i = 3 on a crop of 32 (Cityscapes target: rows 1 / 8 without pseudo weight), with
    net and net_ema made different and the skips opened. Returns everything the tests compare."""
    s = _setup(sd, tgt="cityscapes", source_only=source_only)
    torch.manual_seed(0)
    st = iccld.build_stage1(s.args, s.run)
    net, net_ema, lab, opt, scaler = st.net, st.net_ema, st.lab, st.optimizer, st.scaler
    with torch.no_grad():
        for conv in net.D.skip_convs:
            conv.weight.normal_(std=0.05)
        net_ema.load_state_dict(net.state_dict())
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch, i = _batch(32), 3
    before, ema_before = copy.deepcopy(net), copy.deepcopy(net_ema)
    alpha = min(1 - 1 / (i + 1), s.args.ema_alpha)
    ema_ref = copy.deepcopy(net_ema)
    with torch.no_grad():
        for pe, p in zip(ema_ref.parameters(), net.parameters()):
            pe.copy_(alpha * pe + (1 - alpha) * p)
        conf = ema_ref.direct(batch[2]).softmax(1).max(1)[0]
    s.args.pseudo_threshold = float(conf.median())  # so that 0 < q < 1 and the weights matter
    rec = {"M": Recorder(monkeypatch, iccld, "class_mix_masks"), "aug": Recorder(monkeypatch, iccld, "strong_augment")}
    grads = _grads_at_step(opt)
    torch.manual_seed(5)
    logs = iccld.train_step_stage1(net, net_ema, lab, opt, scaler, batch, i, s.args, s.prec)
    return dict(s=s, net=net, net_ema=net_ema, opt=opt, batch=batch, i=i, before=before, ema_before=ema_before,
                alpha=alpha, rec=rec, grads=grads, logs=logs)


def test_stage1_step_gradient_equals_the_reference_loss(sd, monkeypatch):
    """L = CE(D(E(x_s)), y_s) + CE(D(z_y(y_s), skips(x_s)), y_s) + wCE(D(E(x_m)), y_m; w_m)
    + wCE(D(z_y(y_m), skips(x_m)), y_m; w_m), with pseudo labels from the EMA copy on the clean target crop,
    x_m the strongly augmented ClassMix image: the gradient AdamW saw equals this loss's."""
    r = _stage1(sd, monkeypatch)
    s, (x_s, y_s, x_t), before = r["s"], r["batch"], r["before"]
    y_hat, q, w_t = _pseudo(r["net_ema"], x_t, s.args.pseudo_threshold, (1, 8))
    assert 0 < float(q) < 1 and r["logs"]["q"] == pytest.approx(float(q))
    M, (aug_in,), x_m = r["rec"]["M"].calls[0][2], r["rec"]["aug"].calls[0][0], r["rec"]["aug"].calls[0][2]
    m = M[:, 0].bool()
    torch.testing.assert_close(aug_in, M * x_s + (1 - M) * x_t)            # mix of the clean images
    assert not torch.equal(aug_in, x_m)                                    # this draw augments
    y_m, w_m = torch.where(m, y_s, y_hat), torch.where(m, torch.ones_like(w_t), w_t)

    def dec(x, z_lab):
        z0, skips = before.E(x * 2 - 1)
        return before.D(z0, skips), before.D(z_lab, skips)
    src_img, src_lab = dec(x_s, _label_latent(sd, y_s))
    mix_img, mix_lab = dec(x_m, _label_latent(sd, y_m))
    terms = [_ce(src_img, y_s), _ce(src_lab, y_s), _ce(mix_img, y_m, w_m), _ce(mix_lab, y_m, w_m)]
    for key, ref in zip(("loss_src_img", "loss_src_lab", "loss_mix_img", "loss_mix_lab"), terms):
        assert r["logs"][key] == pytest.approx(ref.item(), rel=1e-4), key
    ref_grads = torch.autograd.grad(sum(terms), list(before.parameters()))
    for (name, p), g in zip(r["net"].named_parameters(), ref_grads):
        torch.testing.assert_close(r["grads"][id(p)], g, rtol=1e-3, atol=1e-7, msg=name)


def test_stage1_step_schedule_ema_and_cleared_gradients(sd, monkeypatch):
    """LR = base x poly-with-warm-up(i) for each group; EMA copy moved by exactly a_i = min(1 - 1/(i+1), 0.999)
    towards the pre-step weights; the trained weights moved; no gradient left behind."""
    r = _stage1(sd, monkeypatch)
    a, f = r["s"].args, _lr_factor(r["i"], 20, 10)
    for g in r["opt"].param_groups:
        assert g["lr"] == pytest.approx(g["base"] * f, rel=1e-9)
    assert {g["base"] for g in r["opt"].param_groups} == {a.lr, a.new_layer_lr}
    assert r["logs"]["lr"] == pytest.approx(a.lr * f)
    for pe, pe0, p0 in zip(r["net_ema"].parameters(), r["ema_before"].parameters(), r["before"].parameters()):
        torch.testing.assert_close(pe, r["alpha"] * pe0 + (1 - r["alpha"]) * p0, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in r["net"].parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(r["net"].parameters(), r["before"].parameters()))


def test_stage1_source_only_is_the_source_loss_alone(sd, monkeypatch):
    """--source-only: no pseudo labels, no ClassMix, no mixed pass; the gradient is that of the two source terms."""
    monkeypatch.setattr(iccld, "pseudo_labels", lambda *a, **k: pytest.fail("pseudo labels in --source-only"))
    r = _stage1(sd, monkeypatch, source_only=True)
    assert not r["rec"]["M"].calls and not r["rec"]["aug"].calls
    assert set(r["logs"]) == {"loss_src_img", "loss_src_lab", "lr"}
    x_s, y_s, _ = r["batch"]
    z0, skips = r["before"].E(x_s * 2 - 1)
    loss = _ce(r["before"].D(z0, skips), y_s) + _ce(r["before"].D(_label_latent(sd, y_s), skips), y_s)
    for p, g in zip(r["net"].parameters(), torch.autograd.grad(loss, list(r["before"].parameters()))):
        torch.testing.assert_close(r["grads"][id(p)], g, rtol=1e-3, atol=1e-7)


# ---- stage 2 step against the equations -----------------------------------------------------------------------
def _stage2(sd, monkeypatch, source_only=False, lab_offset=0.0):
    """One real stage-2 step at j = 3 on a crop of 64 with a perturbed frozen stage-1 model, the condition
    channels of conv_in opened and lambda_adv = 0.5 (so the adversarial term is visible in the gradient)."""
    s = _setup(sd, crop_size=64, tgt="cityscapes", lambda_adv=0.5, source_only=source_only)
    torch.manual_seed(0)
    net = iccld.ICCLDNet(sd.vae, 19)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    st = iccld.build_stage2(s.args, s.run, net.state_dict())
    unet, unet_ema, disc, fz, opt, opt_d, scaler = (st.unet, st.unet_ema, st.disc, st.frozen, st.optimizer,
                                                    st.optimizer_d, st.scaler)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(std=0.1)
        unet_ema.load_state_dict(unet.state_dict())
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    if lab_offset:
        lab = fz.lab
        fz = dataclasses.replace(fz, lab=lambda y: lab(y) + lab_offset)
    x_s, y_s, x_t = _batch(64)
    with torch.no_grad():
        s.args.pseudo_threshold = float(net.direct(x_t).softmax(1).max(1)[0].median())
    rec = {"M": Recorder(monkeypatch, iccld, "class_mix_masks"), "aug": Recorder(monkeypatch, iccld, "strong_augment"),
           "noise": Recorder(monkeypatch, fz.sched, "add_noise"), "unet": _inputs(unet), "disc": _inputs(disc)}
    before = dict(unet=copy.deepcopy(unet), unet_ema=copy.deepcopy(unet_ema), disc=copy.deepcopy(disc))
    grads, grads_d = _grads_at_step(opt), _grads_at_step(opt_d)
    torch.manual_seed(5)
    logs = iccld.train_step_stage2(unet, unet_ema, disc, fz, opt, opt_d, scaler, (x_s, y_s, x_t), 3, s.args, s.prec)
    return dict(s=s, net=net, unet=unet, unet_ema=unet_ema, disc=disc, opt=opt, opt_d=opt_d, batch=(x_s, y_s, x_t),
                before=before, rec=rec, grads=grads, grads_d=grads_d, logs=logs)


def _ddim_to_last_step(unet, z_T, z0, T, ctx):
    """DDIM, eta 0, trailing timesteps t_k = 999 - k 1000 // T (rounded down at the end, as diffusers: 999,
    666, 332 for T = 3), without gradient over all but the last step: eps_hat = unet(cat(z, z0), t_k);
    x0_hat = (z - sqrt(1 - a_t) eps_hat) / sqrt(a_t); z <- sqrt(a_p) x0_hat + sqrt(1 - a_p) eps_hat with
    p = t_k - 1000 // T (diffusers' DDIM step). -> (z at the last step, its timestep)."""
    ab, ts, z = _alpha_bar(), np.round(np.arange(1000, 0, -1000 / T)).astype(int) - 1, z_T
    with torch.no_grad():
        for t in ts[:-1]:
            eps_hat = unet(torch.cat([z, z0], 1), torch.tensor([t] * len(z)),
                           encoder_hidden_states=ctx.expand(len(z), -1, -1)).sample
            x0 = (z - (1 - ab[t]).sqrt() * eps_hat) / ab[t].sqrt()
            p = t - 1000 // T
            z = ab[p].sqrt() * x0 + (1 - ab[p]).sqrt() * eps_hat
    return z, int(ts[-1])


def test_stage2_step_gradients_equal_the_reference_losses(sd, monkeypatch):
    """Generator: L = mean(w_lat (eps_hat - eps)^2) + lambda_adv mean((Dis(x0_T[mix, tgt]) - 1)^2) over source,
    mixed and target latents (z_t = sqrt(a_t) z_y + sqrt(1 - a_t) eps, t ~ U{0..999}; w_lat = 8x8 mean of
    valid x (1 | w_m | q with the row crop)), x0_T = the x0 predicted at the last of T = 3 DDIM steps from pure
    noise with the image latent as condition (the first two without gradient); discriminator:
    1/2 [mean((Dis(x0_T[src]) - 1)^2) + mean(Dis(x0_T[mix, tgt])^2)] on the detached x0_T. Both gradients
    equal those of these losses with the pre-step weights."""
    r = _stage2(sd, monkeypatch)
    a, (x_s, y_s, x_t), rec, b = r["s"].args, r["batch"], r["rec"], 2
    y_hat, q, w_t = _pseudo(r["net"], x_t, a.pseudo_threshold, (2, 15))  # the frozen stage-1 model
    assert 0 < float(q) < 1 and r["logs"]["q"] == pytest.approx(float(q))
    M, (aug_in,), x_m = rec["M"].calls[0][2], rec["aug"].calls[0][0], rec["aug"].calls[0][2]
    torch.testing.assert_close(aug_in, M * x_s + (1 - M) * x_t)
    assert not torch.equal(aug_in, x_m)
    m = M[:, 0].bool()
    y = torch.cat([y_s, torch.where(m, y_s, y_hat), y_hat])                # source, mixed, target
    w = (y != 255) * torch.cat([torch.ones_like(w_t), torch.where(m, torch.ones_like(w_t), w_t), w_t])
    with torch.no_grad():
        z0 = r["net"].E(torch.cat([x_s, x_m, x_t]) * 2 - 1)[0]             # (6, 4, 8, 8) image latents
    z_y, n = _label_latent(sd, y), 6
    (z_y_used, eps, t), _, _ = rec["noise"].calls[0]
    torch.testing.assert_close(z_y_used, z_y, rtol=1e-4, atol=1e-5)
    assert t.shape == (n,) and 0 <= t.min() and t.max() <= 999 and len(set(t.tolist())) > 1
    assert abs(eps.std().item() - 1) < 0.1 and abs(eps.mean().item()) < 0.1
    ab = _alpha_bar()
    z_t = ab[t].sqrt()[:, None, None, None] * z_y + (1 - ab[t]).sqrt()[:, None, None, None] * eps
    assert a.sample_steps == 3 and len(rec["unet"]) == 3                    # 2 no-grad steps, then one batch
    z_T = rec["unet"][0][0][0][:, :4]                                      # the chain's start
    assert abs(z_T.std().item() - 1) < 0.1 and not torch.allclose(z_T, eps)
    unet0, disc0 = r["before"]["unet"], r["before"]["disc"]
    z_s, s = _ddim_to_last_step(unet0, z_T, z0, 3, _ctx(sd, 1))
    assert s == 332
    inp, tt = rec["unet"][2][0][:2]
    assert inp.shape == (2 * n, 8, 8, 8)                                   # one UNet batch: eps loss + last step
    torch.testing.assert_close(inp[:n], torch.cat([z_t, z0], 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inp[n:], torch.cat([z_s, z0], 1), rtol=1e-4, atol=1e-5)
    assert torch.equal(tt[:n], t) and (tt[n:] == s).all()
    eps_hat = unet0(torch.cat([torch.cat([z_t, z0], 1), torch.cat([z_s, z0], 1)]), torch.cat([t, t * 0 + s]),
                    encoder_hidden_states=_ctx(sd, 2 * n)).sample
    x0_T = (z_s - (1 - ab[s]).sqrt() * eps_hat[n:]) / ab[s].sqrt()
    l_eps = (_pool8(w.float()) * (eps_hat[:n] - eps) ** 2).mean()
    l_adv = ((disc0(x0_T[b:]) - 1) ** 2).mean()
    assert r["logs"]["loss_eps"] == pytest.approx(l_eps.item(), rel=1e-4)
    assert r["logs"]["loss_adv"] == pytest.approx(l_adv.item(), rel=1e-4)
    ref = torch.autograd.grad(l_eps + a.lambda_adv * l_adv, list(unet0.parameters()))
    for (name, p), g in zip(r["unet"].named_parameters(), ref):
        torch.testing.assert_close(r["grads"][id(p)], g, rtol=1e-3, atol=1e-6, msg=name)
    # the discriminator judged x0_T (never the label latent): generator call on mixed + target, its own step on all
    gen_in, dis_in = rec["disc"][0][0][0], rec["disc"][1][0][0]
    torch.testing.assert_close(gen_in, x0_T[b:], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dis_in, x0_T, rtol=1e-3, atol=1e-4)
    x0 = x0_T.detach()
    l_dis = 0.5 * (((disc0(x0[:b]) - 1) ** 2).mean() + (disc0(x0[b:]) ** 2).mean())
    assert r["logs"]["loss_dis"] == pytest.approx(l_dis.item(), rel=1e-4)
    assert r["logs"]["d_src"] == pytest.approx(disc0(x0[:b]).mean().item(), rel=1e-4, abs=1e-6)
    assert r["logs"]["d_tgt"] == pytest.approx(disc0(x0[b:]).mean().item(), rel=1e-4, abs=1e-6)
    for p, g in zip(r["disc"].parameters(), torch.autograd.grad(l_dis, list(disc0.parameters()))):
        torch.testing.assert_close(r["grads_d"][id(p)], g, rtol=1e-3, atol=1e-6)


def test_stage2_step_schedules_ema_and_frozen_discriminator(sd, monkeypatch):
    """UNet LR = base x poly-with-warm-up(j) per group; discriminator LR = 1e-4 (1 - j/total)^0.9; unet_ema
    moved by exactly a_j; no gradient left on the UNet (the discriminator step used detached inputs) or the
    discriminator; the discriminator trainable again after the step."""
    r = _stage2(sd, monkeypatch)
    a, f = r["s"].args, _lr_factor(3, 20, 10)
    for g in r["opt"].param_groups:
        assert g["lr"] == pytest.approx(g["base"] * f, rel=1e-9)
    assert {g["base"] for g in r["opt"].param_groups} == {a.lr, a.new_layer_lr}
    assert r["opt_d"].param_groups[0]["lr"] == pytest.approx(a.disc_lr * (1 - 3 / 20) ** 0.9, rel=1e-9)
    alpha = min(1 - 1 / 4, a.ema_alpha)
    for pe, pe0, p0 in zip(r["unet_ema"].parameters(), r["before"]["unet_ema"].parameters(),
                           r["before"]["unet"].parameters()):
        torch.testing.assert_close(pe, alpha * pe0 + (1 - alpha) * p0, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in r["unet"].parameters())
    assert all(p.grad is None and p.requires_grad for p in r["disc"].parameters())
    for mod in ("unet", "disc"):
        assert any(not torch.equal(p, p0) for p, p0 in zip(r[mod].parameters(), r["before"][mod].parameters()))


def test_stage2_discriminator_judges_the_latent_that_prediction_decodes(sd, monkeypatch):
    """From the same z_T and weights, `predict_diffusion` (T = 3) hands D exactly the latents the discriminator
    judged in the step (its own step sees source, mixed and target; the generator term mixed and target)."""
    r = _stage2(sd, monkeypatch)
    (x_s, _, x_t), rec = r["batch"], r["rec"]
    x = torch.cat([x_s, rec["aug"].calls[0][2], x_t])                     # source, mixed, target images
    z_T, decoded = rec["unet"][0][0][0][:, :4], Recorder(monkeypatch, r["net"].D, "forward")
    iccld.predict_diffusion(r["net"], r["before"]["unet"], _ctx(sd, 1), iccld.make_sampler(sd.scheduler),
                            r["s"].args.sample_steps, None, x, z_T=z_T)
    judged, z_bar = rec["disc"][1][0][0], decoded.calls[0][0][0]
    torch.testing.assert_close(z_bar, judged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec["disc"][0][0][0], z_bar[2:], rtol=1e-4, atol=1e-5)


def test_stage2_discriminator_input_does_not_depend_on_the_labels(sd, monkeypatch):
    """Moving every label latent (GT, mixed, pseudo label; ignore pixels included) changes the eps loss but not
    a single value the discriminator sees: the adversarial path has no label cue."""
    r0 = _stage2(sd, monkeypatch)
    r1 = _stage2(sd, monkeypatch, lab_offset=3.0)
    for (args0, _), (args1, _) in zip(r0["rec"]["disc"], r1["rec"]["disc"]):
        assert torch.equal(args0[0], args1[0])
    assert r0["logs"]["loss_eps"] != pytest.approx(r1["logs"]["loss_eps"], rel=1e-3)


def test_stage2_source_only_is_the_eps_loss_on_source_latents(sd, monkeypatch):
    """--source-only: no pseudo labels, no mix, no discriminator; one UNet call on the source latents only, and
    its gradient is that of mean(w_lat (eps_hat - eps)^2) with w_lat = 8x8 mean of the valid mask."""
    monkeypatch.setattr(iccld, "pseudo_labels", lambda *a, **k: pytest.fail("pseudo labels in --source-only"))
    r = _stage2(sd, monkeypatch, source_only=True)
    assert not r["rec"]["M"].calls and not r["rec"]["disc"] and set(r["logs"]) == {"loss_eps", "lr"}
    assert all(torch.equal(p, p0) for p, p0 in zip(r["disc"].parameters(), r["before"]["disc"].parameters()))
    (inp, tt), _ = r["rec"]["unet"][0]
    (z_y, eps, t), _, z_t = r["rec"]["noise"].calls[0]
    x_s, y_s, _ = r["batch"]
    torch.testing.assert_close(z_y, _label_latent(sd, y_s), rtol=1e-4, atol=1e-5)
    assert inp.shape[0] == 2 and torch.equal(tt, t)
    with torch.no_grad():
        z0 = r["net"].E(x_s * 2 - 1)[0]
    unet0 = r["before"]["unet"]
    eps_hat = unet0(torch.cat([z_t, z0], 1), t, encoder_hidden_states=_ctx(sd, 2)).sample
    loss = (_pool8((y_s != 255).float()) * (eps_hat - eps) ** 2).mean()
    for p, g in zip(r["unet"].parameters(), torch.autograd.grad(loss, list(unet0.parameters()))):
        torch.testing.assert_close(r["grads"][id(p)], g, rtol=1e-3, atol=1e-6)


# ---- mixed precision on CPU: the GPU code path ----------------------------------------------------------------
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_mixed_precision_steps_of_both_stages(sd, prec):
    """bf16 / fp16 autocast with frozen parts in half precision: two steps of each stage give finite losses, the
    GradScaler moves as it should (fp16: enabled, each step either counted in _growth_tracker or skipped with
    the scale halved; bf16: disabled), and the first step's losses agree with fp32 from the same weights and
    draws: source CE and eps loss within 1 % (bf16) / 0.5 % (fp16); the mixed CE (it goes through thresholded
    pseudo labels) within 5 %."""
    tol = {"bf16": 1e-2, "fp16": 5e-3}[prec]
    for stage, crop, keys in ((1, 32, ("loss_src_img", "loss_src_lab")), (2, 64, ("loss_eps",))):
        logs = {}
        for name in ("fp32", prec):
            s = _setup(sd, name, crop_size=crop, pseudo_threshold=0.1)
            torch.manual_seed(0)
            st = _build(s, stage)
            scaler = st.scaler
            if name != "fp32":
                lab = st.lab if stage == 1 else st.frozen.lab
                assert next(lab.E_lab.parameters()).dtype == s.prec.frozen_dtype != torch.float32
            steps, tracker = [], 0
            for i in range(2):
                torch.manual_seed(10 + i)
                scale = scaler.get_scale() if scaler.is_enabled() else None
                steps.append(_step(st, _batch(crop, seed=i, b=1), i + 1, s.args, s.prec))
                assert all(math.isfinite(v) for v in steps[-1].values()), steps[-1]
                if name == "fp16":  # a finite step counts, an overflowing one halves the scale and restarts
                    now = scaler.state_dict()["_growth_tracker"]
                    assert ((now, scaler.get_scale()) in ((tracker + 1, scale), (0, scale / 2))
                            and scale is not None), (now, tracker, scale)
                    tracker = now
                else:
                    assert not scaler.is_enabled()
            logs[name] = steps[0]
        for k in keys:
            assert logs[prec][k] == pytest.approx(logs["fp32"][k], rel=tol), (stage, k, logs)
        if stage == 1:
            assert logs[prec]["loss_mix_img"] == pytest.approx(logs["fp32"]["loss_mix_img"], rel=5e-2)


# ---- --estimate-memory ----------------------------------------------------------------------------------------
def _param_bytes(modules_and_dtypes):
    return sum(p.numel() * torch.finfo(dt).bits // 8 for m, dt in modules_and_dtypes for p in m.parameters())


def test_estimate_memory_tiny_is_fast_writes_nothing_and_counts_every_parameter(sd, tmp_path, capsys):
    """--estimate-memory with the tiny SD: no data, no weights read, nothing written, one JSON line; its
    parameter bytes are those of exactly the modules a stage holds on the GPU, in their dtypes (E_lab and the
    frozen stage-1 model in bf16, the trained parts and their EMA copies in fp32)."""
    net = iccld.ICCLDNet(sd.vae, 19)
    unet = iccld.widen_conv_in(_fresh_unet(sd))
    expected = {"1": _param_bytes([(net, torch.float32)] * 2 + [(net.E, torch.bfloat16)]),
                "2": _param_bytes([(unet, torch.float32)] * 2 + [(iccld.discriminator(), torch.float32),
                                                                 (net, torch.bfloat16), (net.E, torch.bfloat16)])}
    for stage, crop in (("1", 32), ("2", 64)):
        t = time.time()
        res = iccld.main(iccld.Args(sd_model="tiny", crop_size=crop, batch_size=1, estimate_memory=True,
                                    stage=stage, data_root=str(tmp_path / "no-data"), out=str(tmp_path / "o")))
        assert time.time() - t < 30
        assert res["parameters_bytes"] == expected[stage], (stage, res["parameters_bytes"], expected)
        assert res["predicted_peak_gb"] >= res["parameters_gb"] and res["stage"] == stage
        assert res["precision"] == "bf16" and res["method"] == "iccld"
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
        assert json.loads(line)["predicted_peak_gb"] == res["predicted_peak_gb"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "no-data").exists()


@pytest.mark.slow
def test_estimate_memory_random_sd15_at_the_paper_crop_allocates_nothing_big(tmp_path):
    """random-sd15 (SD 1.5 architecture, 0.86 B UNet parameters) at crop 512: both stages complete in a
    subprocess whose peak resident memory stays far below the predicted GPU memory (nothing was allocated),
    with parameter bytes equal to the exact count of the real architecture's parameters (meta device)."""
    code = ("import json, resource, sys, iccld\n"
            "res = {st: iccld.main(iccld.Args(sd_model='random-sd15', estimate_memory=True, stage=st, "
            "out=sys.argv[1])) for st in ('1', '2')}\n"
            "print('RESULT ' + json.dumps({'res': res, 'rss_gb': resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss / 1e6}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ")[-1])
    res = out["res"]
    with torch.device("meta"):
        parts = sd_backbone.build_random_sd("sd15", ("vae", "unet"), "meta")
        net = iccld.ICCLDNet(parts["vae"], 19)
        unet = iccld.widen_conv_in(parts["unet"])
    expected = {"1": _param_bytes([(net, torch.float32)] * 2 + [(net.E, torch.bfloat16)]),
                "2": _param_bytes([(unet, torch.float32)] * 2 + [(iccld.discriminator(), torch.float32),
                                                                 (net, torch.bfloat16), (net.E, torch.bfloat16)])}
    for st in ("1", "2"):
        assert res[st]["parameters_bytes"] == expected[st], (st, res[st]["parameters_bytes"], expected)
        assert res[st]["predicted_peak_gb"] > 5
    assert out["rss_gb"] < 0.5 * res["2"]["predicted_peak_gb"], out["rss_gb"]
    assert not (tmp_path / "o").exists()


DDP_CHILD = """
import copy, sys, torch
sys.path.insert(0, "tests")
import iccld, test_iccld as T
from common import runs, sd_backbone
torch.set_num_threads(1)
cpu, dist = torch.device("cpu"), iccld.init_distributed("cpu", False)[0]
sd = sd_backbone.load_sd("tiny")
a = iccld.Args(sd_model="tiny", crop_size=64, iters=20, iters_stage2=20, warmup_iters=10, lambda_adv=0.5,
               pseudo_threshold=0.0)                                # every target pixel weighs: all terms act
batch = T._batch(64, seed=dist.rank, b=1)                           # each process its own images
out = {}
for stage, trained in (("1", ("net",)), ("1 source-only", ("net",)), ("2", ("unet", "disc"))):
    a.source_only = stage.endswith("source-only")                   # then the source pass is the only one
    for run, d in (("alone", iccld.Dist(0, 1, cpu)), ("ddp", dist)):
        torch.manual_seed(0)                                        # the same initial weights everywhere
        r = iccld.Run(d, iccld.choose_precision("fp32", cpu), 19, copy.deepcopy(sd), T._ctx(sd, 1).float())
        st = iccld.build_stage1(a, r) if stage[0] == "1" else iccld.build_stage2(a, r, None)
        if stage == "2":                                            # open the condition channels (zero-initialised):
            with torch.no_grad():                                   # else x0_hat, the discriminator's input, is
                st.unet.conv_in.weight[:, 4:].normal_(std=0.1)      # the same on both processes
        seen = {}
        for m, o in zip(trained, ("optimizer", "optimizer_d")):     # the gradients each optimizer steps on
            named = list(getattr(st, m).named_parameters())
            getattr(st, o).register_step_pre_hook(lambda *_, m=m, named=named: seen.update(
                {f"{m}.{n}": p.grad.clone() for n, p in named if p.grad is not None}))
        torch.manual_seed(5)                                        # the same ClassMix / noise draws in both runs
        if stage[0] == "1":                                         # the trained modules wrapped as train_stage does
            iccld.train_step_stage1(d.wrap(st.net), st.net_ema, st.lab, st.optimizer, st.scaler, batch, 3, a,
                                    r.precision)
        else:
            iccld.train_step_stage2(d.wrap(st.unet), st.unet_ema, d.wrap(st.disc), st.frozen, st.optimizer,
                                    st.optimizer_d, st.scaler, batch, 3, a, r.precision)
        out[(stage, run)] = seen
        out[(stage, run, "weights")] = {f"{m}.{n}": p.detach().clone() for m in trained
                                        for n, p in getattr(st, m).named_parameters()}
torch.save(out, sys.argv[1] + f"/rank{dist.rank}.pt")
"""


def test_ddp_averages_the_two_processes_gradients_and_keeps_the_replicas_equal_in_both_stages(tmp_path):
    """2 gloo processes, one source + one target image each: in each stage (and stage 1 --source-only, whose
    source pass is then the only one), every optimizer (stage 2: eps_theta and the discriminator) steps on the
    mean of the two gradients each process computes alone on its images,
    and both replicas end the step with identical weights (a step that bypassed a DDP wrapper would update each
    replica on its own gradient)."""
    r0, r1 = run_two_gloo_processes(DDP_CHILD, tmp_path, dict(os.environ))
    for stage in ("1", "1 source-only", "2"):
        g0, g1, ddp = r0[(stage, "alone")], r1[(stage, "alone")], r0[(stage, "ddp")]
        assert ddp.keys() == g0.keys() == g1.keys() and any(k.startswith("disc.") for k in ddp) == (stage == "2")
        for n, g in ddp.items():
            ref = (g0[n] + g1[n]) / 2
            assert float((g - ref).norm()) <= 1e-4 * float(ref.norm()) + 1e-10, (stage, n)
        for part in ("net", "unet", "disc"):                       # the two processes' gradients differ
            keys = [n for n in g0 if n.startswith(part + ".")]
            assert sum(not torch.allclose(g0[n], g1[n]) for n in keys) >= len(keys) // 2, (stage, part)
        w0, w1 = r0[(stage, "ddp", "weights")], r1[(stage, "ddp", "weights")]
        assert all(torch.equal(w0[n], w1[n]) for n in w0), stage


# ---- training: learning, resume, errors, profile ------------------------------------------------------------------
def _args(tmp_path, data_root, **kw):
    """--demo settings (synthetic data at 1/8 scale, crop 64, demo LRs) on the random tiny SD (the step tests
    and the mutation table are calibrated on it; the demo itself runs on mini) with a log line every step."""
    base = dict(demo=True, sd_model="tiny", data_root=data_root, log_every=1, out=str(tmp_path / "run"))
    base.update(kw)
    return iccld.Args(**base)


def _logged(text, key):
    return [float(line.split(f"{key} ")[1].split(" |")[0]) for line in text.splitlines() if f"| {key} " in line]


KW = dict(stage="both", iters=2, iters_stage2=2, ckpt_every=1, keep_ckpts=0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root):
    """Both stages, 2 + 2 steps, a checkpoint after every step (all kept): the uninterrupted reference."""
    tmp = tmp_path_factory.mktemp("iccld")
    res = iccld.main(_args(tmp, data_root, out=str(tmp / "full"), **KW))
    return tmp / "full", res


def _final_weights(out):
    return runs.load_checkpoint(runs.latest_checkpoint(Path(out)))[0]


def _record_wraps(monkeypatch):
    """What `Dist.wrap` wrapped (in one process it returns the module itself) and the trained modules each step
    function was handed (stage 1: net; stage 2: unet, disc): the loop must hand the steps its DDP-wrapped
    modules (the 2-process test checks that a wrapped module averages the gradients)."""
    wrapped, handed, wrap = [], [], iccld.Dist.wrap
    monkeypatch.setattr(iccld.Dist, "wrap", lambda self, m: wrapped.append(m) or wrap(self, m))
    for name, where in (("train_step_stage1", (0,)), ("train_step_stage2", (0, 2))):
        monkeypatch.setattr(iccld, name, lambda *a, fn=getattr(iccld, name), where=where, **k: (
            handed.append([a[j] for j in where]), fn(*a, **k))[1])
    return wrapped, handed


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_inside_stage_2_is_bit_identical(tmp_path, data_root, full_run, monkeypatch):
    """A run interrupted right after its stage-2 step-1 checkpoint, then resumed, ends with the same weights
    (trained UNet, its EMA, discriminator, frozen E/D) bit for bit as the uninterrupted run."""
    save = runs.save_checkpoint

    def save_then_die(out, step, *a, **k):
        path = save(out, step, *a, **k)
        if step == 3:  # stage-1 iters 2 + stage-2 step 1
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(iccld.runs, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "cut"), **KW))
    monkeypatch.setattr(iccld.runs, "save_checkpoint", save)
    assert runs.latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "cut"), resume=True, **KW))
    full = _final_weights(full_run[0])
    assert any(k.startswith("unet_ema.") for k in full)
    _assert_bit_identical(full, _final_weights(tmp_path / "cut"))


def test_resume_inside_stage_1_is_bit_identical(tmp_path, data_root, full_run, monkeypatch):
    """Resuming from the stage-1 step-1 checkpoint reaches the uninterrupted stage-1 weights (net and
    net_ema), optimizer and RNG states included; the step gets the DDP-wrapped net."""
    (tmp_path / "s1" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run[0] / "checkpoints" / "step_0000001", tmp_path / "s1" / "checkpoints" / "step_0000001")
    wrapped, handed = _record_wraps(monkeypatch)
    iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "s1"), resume=True, **{**KW, "stage": "1"}))
    assert len(handed) == 1 and [type(m).__name__ for m in handed[0]] == ["ICCLDNet"]
    assert all(any(m is w for w in wrapped) for m in handed[0])
    ref = runs.load_checkpoint(full_run[0] / "checkpoints" / "step_0000002")[0]
    _assert_bit_identical(ref, _final_weights(tmp_path / "s1"))


def test_sigterm_in_each_stage_writes_its_step_and_resume_is_bit_identical(tmp_path, data_root, full_run,
                                                                           monkeypatch):
    """SIGTERM during stage 1's step 1, --resume; SIGTERM during stage 2's step 1 (checkpoint step 3),
    --resume: each stop writes the checkpoint of its step (no periodic ones), and the end equals the
    uninterrupted run."""
    kw, out = {**KW, "ckpt_every": 100}, str(tmp_path / "cut")
    for stage, resume, step in ((1, False, 1), (2, True, 3)):
        name = f"train_step_stage{stage}"
        monkeypatch.setattr(iccld, name, sigterm_on_call(getattr(iccld, name), 1))
        with pytest.raises(Stopped, match=rf"^stopped by SIGTERM at step {step}: checkpoint written"):
            iccld.main(_args(tmp_path, data_root, out=out, resume=resume, **kw))
        monkeypatch.undo()
        assert runs.latest_checkpoint(Path(out)).name == f"step_{step:07d}"
    iccld.main(_args(tmp_path, data_root, out=out, resume=True, **kw))
    _assert_bit_identical(_final_weights(full_run[0]), _final_weights(out))


def test_stage_2_from_the_stage_1_checkpoint_reproduces_both(tmp_path, data_root, full_run, monkeypatch):
    """--stage 2 --stage1-ckpt <run> starts from the saved net_ema and gives the second half of --stage both; the
    step gets the DDP-wrapped UNet and discriminator."""
    wrapped, handed = _record_wraps(monkeypatch)
    res = iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "s2"), stage1_ckpt=str(full_run[0]),
                           **{**KW, "stage": "2"}))
    assert len(handed) == 2 and [type(m).__name__ for m in handed[0]] == ["UNet2DConditionModel", "Sequential"]
    assert all(any(m is w for w in wrapped) for ms in handed for m in ms)
    _assert_bit_identical(_final_weights(full_run[0]), _final_weights(tmp_path / "s2"))
    assert res["miou"] == full_run[1]["miou"] and res["miou_direct"] == full_run[1]["miou_direct"]


def test_eval_only_reproduces_the_final_evaluation(tmp_path, data_root, full_run):
    """--eval-only --ckpt <stage-2 checkpoint>: same z_T seed, same numbers for both paths as the run's own."""
    ck = runs.latest_checkpoint(full_run[0])
    res = iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "ev"), eval_only=True, ckpt=str(ck)))
    assert res["miou"] == full_run[1]["miou"] and res["miou_direct"] == full_run[1]["miou_direct"]
    assert not (tmp_path / "ev" / "checkpoints").exists()
    assert (tmp_path / "ev" / "curves.png").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--stage", "2"], "--stage 2: no stage-1 checkpoint"),
    (["--eval-only"], "--eval-only: no --ckpt given"),
    (["--resume"], "--resume: no checkpoint"),
    (["--crop-size", "60"], "--crop-size: got 60. Expected a positive multiple of 8"),
    (["--stage1-ckpt", "/nonexistent/ckpt", "--stage", "2"], "--stage1-ckpt: '/nonexistent/ckpt' not found"),
    (["--crop-size", "32"], "--crop-size 32: stage 2's discriminator needs >= 64"),
    (["--iters-stage2", "0"], "--iters-stage2: got 0. Expected an integer >= 1"),
    (["--sample-steps", "0"], "--sample-steps 0: expected 1..50"),
    (["--estimate-memory"], "--profile / --estimate-memory: one stage at a time"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_root, capsys, argv, needle):
    base = ["--sd-model", "tiny", "--data-root", data_root, "--crop-size", "64", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        run_cli(iccld.main, iccld.Args, base + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_profile_each_stage_writes_nothing(tmp_path, capsys, monkeypatch):
    """--profile without any dataset: random tensors of the training shapes, one JSON line, no run folder."""
    from benchmarks import measure
    peak = measure.matmul_peak_gflops  # the 2048^3 peak measurement is not under test here: a small one
    monkeypatch.setattr(measure, "matmul_peak_gflops", lambda device: peak(device, n=256))
    for stage, crop in (("1", 32), ("2", 64)):
        res = iccld.main(iccld.Args(sd_model="tiny", crop_size=crop, batch_size=1, profile=1, stage=stage,
                                    data_root=str(tmp_path / "no-data"), out=str(tmp_path / "o")))
        assert res["flops_per_iter"] > 0 and res["sec_per_iter"] > 0 and res["stage"] == stage
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{\"flops_per_iter")]
        assert json.loads(line[-1])["utilization"] > 0
    assert not (tmp_path / "o").exists()


def test_synthia_run_ends_with_miou16_13_in_the_line_the_result_and_metrics_json(tmp_path, data_root, capsys):
    """A SYNTHIA -> Cityscapes run (1 + 1 steps) reports the SYNTHIA-source columns mIoU16 / mIoU13 at its end:
    the `done` line, main's result and metrics.json's "final" record, equal to the last (stage-2) evaluation."""
    res = iccld.main(iccld.Args(demo=True, src="synthia", data_root=data_root, iters=1, iters_stage2=1,
                                out=str(tmp_path / "run")))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and re.search(r"\| mIoU [\d.]+ \| mIoU16 [\d.]+ \| mIoU13 [\d.]+$", done[0]), done
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    last = [e for e in data["evals"] if e["path"].startswith("stage2 diffusion")][-1]
    for key in ("miou", "miou16", "miou13"):
        assert res[key] == data["final"][key] == last[key]
        assert f"{100 * res[key]:.2f}" in done[0]


# ---- the demo, end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_end_to_end_and_learns():
    """`python iccld.py --demo`: both stages on the synthetic sample. Exit 0, metrics.json, pictures, the eval
    lines; the losses fall and both evaluated paths beat any constant prediction (the learning test); the target
    side acts (q > 0) in most steps of both stages and the printout says what adapts."""
    proc, out = background("iccld-demo")   # started at collection, beside the other tests (conftest.py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    assert data["args"]["demo"] and data["args"]["sd_model"] == "mini"
    evals = {e["path"].split()[0]: e for e in data["evals"]}
    assert set(evals) == {"stage1", "stage2"}
    assert list((out / "predictions").glob("*.png"))
    assert runs.latest_checkpoint(out / "stage1") is not None
    assert "eval step" in proc.stdout and "| mIoU " in proc.stdout
    # learning: the first logged step against the last three
    src, eps = _logged(proc.stdout, "loss_src_img"), _logged(proc.stdout, "loss_eps")
    assert np.mean(src[-3:]) < 0.7 * src[0], src
    # eps_theta starts from mini's pretrained UNet, so its loss starts low (0.14 measured, ~1 for a random UNet)
    # and cannot fall by 30 % in 50 steps: it must stay far below the random level and fall below its start
    assert np.mean(eps[-3:]) < 0.5 and min(eps[1:]) < eps[0], eps
    # the most frequent class covers < 20% of the eval pixels, so a constant prediction has aAcc < 0.2
    for e in evals.values():
        assert e["aacc"] > 0.3 and e["miou"] > 1.5 / 19, e["path"]
    # adaptation is on: the start line of each stage names what adapts, the end line counts steps with q > 0
    assert "[stage 1] adapting: E and D" in proc.stdout and "[stage 2] adapting: eps_theta" in proc.stdout
    for stage, steps in ((1, 100), (2, 50)):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"[stage {stage}] target side: q > 0 in"))
        n_q = int(line.split("q > 0 in ")[1].split()[0])
        assert n_q > steps // 2 and f"of {steps} steps" in line, line
    assert len(data["train_log_stage1"]) == 10 and len(data["train_log_stage2"]) == 5
    assert (out / "curves.png").exists()


def test_checkpointed_recomputes_in_backward_with_the_same_gradients():
    w, calls = torch.nn.Parameter(torch.randn(4)), []

    def fn(x):
        calls.append(1)
        return (x * w).sin()
    x, grads = torch.randn(4), []
    for enabled in (False, True):
        calls.clear()
        w.grad = None
        iccld.checkpointed(enabled, fn, x).sum().backward()
        grads.append(w.grad.clone())
        assert len(calls) == (2 if enabled else 1)                  # checkpointed: fn runs again in backward
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    calls.clear()
    with torch.no_grad():
        iccld.checkpointed(True, fn, x)
    assert len(calls) == 1
