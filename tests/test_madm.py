"""Tests of madm.py: components against hand-computed values, equivalence of the memory/speed choices, a
learning test on the synthetic sample, kill-and-resume bit equality, 2-process gloo DDP equivalence and the
demo end to end.

Everything runs on CPU with the tiny random SD (loaded through from_pretrained) at crop 32-64.
"""
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import madm
from common.datasets import PALETTES
from common.runtime import UserError, choose_precision
from common.sd_backbone import vae_encode
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic"
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
    cpu = torch.device("cpu")
    student, ema_seg = madm.build_model(args, 11, cpu, choose_precision("fp32", cpu))
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


def _run(cmd, timeout=300):
    return subprocess.run([sys.executable, "madm.py", *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV1)


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
    assert torch.equal(madm.palette_to_label(img, palette), y)
    # the inverse is robust to the small errors a decoded image has
    assert torch.equal(madm.palette_to_label((img + 0.01 * torch.randn_like(img)).clamp(0, 1), palette), y)


def test_palette_11_classes_follow_madm_colours():
    # datasets.md §4.5: 0 sky 70,130,180; 5 road 128,64,128; 10 traffic sign 250,170,30 (MADM's choice)
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
    # Spec Decision 19 at N = 10000: 0.067 at step 0, ~1 by step 27, x0.1 from 8889, x0.01 from 9630.
    f = lambda i: madm.lr_factor(i, 10000)  # noqa: E731
    assert f(0) == pytest.approx(0.067)
    assert 0.9 < f(26) < 1.0 and f(27) == pytest.approx(1.0, abs=0.01)
    assert f(28) == 1.0 and f(8888) == 1.0
    assert f(8889) == pytest.approx(0.1) and f(9629) == pytest.approx(0.1)
    assert f(9630) == pytest.approx(0.01) and f(9999) == pytest.approx(0.01)


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
    z = madm.palette_latent(vae, y, PALETTES[11])
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


def test_trainable_parts_and_weight_decay_groups(model):
    student, ema_seg = model
    unet = student.unet
    assert not any(p.requires_grad for p in unet.conv_out.parameters())
    assert not any(p.requires_grad for p in unet.conv_norm_out.parameters())
    frozen = ("conv_out", "conv_norm_out")
    assert all(p.requires_grad for n, p in unet.named_parameters() if not n.startswith(frozen))
    assert not any(p.requires_grad for p in student.frozen.vae.parameters())
    assert not any(p.requires_grad for p in ema_seg.parameters())
    decay, no_decay = madm.param_groups(student, 0.05)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    seg = student.seg
    dec, nodec = ids(decay["params"]), ids(no_decay["params"])
    assert ids([seg.cond.prompt, seg.cond.time_offset, seg.cond.alpha_u, seg.cond.alpha_t]) <= dec
    assert ids([seg.proj["s0"].norm1.weight, seg.head.conv_seg.bias, unet.conv_in.bias]) <= nodec
    assert id(unet.conv_in.weight) in dec and id(seg.head.embed[0].weight) in dec
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_conditioning_starts_with_zero_time_offset_and_shapes(model):
    student, _ = model
    cond = student.seg.cond
    assert torch.equal(cond.time_delta(), torch.zeros_like(cond.time_delta()))
    assert cond.context(3).shape == (3, 77, student.unet.config.cross_attention_dim)
    assert "e_empty" in dict(cond.named_buffers()) and "e_empty" not in dict(cond.named_parameters())


def test_fixed_noise_pattern_and_t0_noising(model):
    """Decision 4: one seed-42 pattern (independent of --seed), broadcast over the batch, bicubic-resized;
    at t = 0 the SD schedule gives z_t = 0.99957 z + 0.02915 eps (beta_0 = 0.00085)."""
    student, _ = model
    frozen = student.frozen
    g = torch.Generator().manual_seed(42)
    assert torch.equal(frozen.eps_fix, torch.randn(1, 4, 64, 64, generator=g))
    z = torch.randn(3, 4, 8, 8)
    eps = frozen.noise(z)
    assert eps.shape == (3, 4, 8, 8) and torch.equal(eps[0], eps[2])
    ref = torch.nn.functional.interpolate(frozen.eps_fix, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(eps[:1], ref)
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
    ema = madm.copy.deepcopy(ema_seg)
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
        return madm.loss_ce_source(logits, y) + madm.loss_lplr(o, torch.zeros_like(o), (y != 255).float())

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

    ref = grads(False, False)
    for variant in [(True, False), (True, True)]:
        got = grads(*variant)
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), variant
    assert sum(float(g.abs().sum()) for g in ref[:10]) > 0
    for p in params:
        p.grad = None
    student.seg.train()


def test_text_encoder_is_freed_after_embedding_the_empty_prompt(model):
    from transformers import CLIPTextModel
    gc.collect()
    alive = lambda: sum(isinstance(o, CLIPTextModel) for o in gc.get_objects())  # noqa: E731
    before = alive()
    cpu = torch.device("cpu")
    madm.build_model(madm.Args(sd_model="tiny"), 11, cpu, choose_precision("fp32", cpu))
    gc.collect()
    assert alive() <= before


def test_unet_passes_per_step(data, tmp_path, monkeypatch):
    """Per micro-step: one teacher pass without grad and one pass with grad per student input (source, mixed);
    the VAE decodes s0 once per pass, never with grad. Global batch 2 = 2 micro-steps."""
    calls = []
    real = madm.madm_forward

    def counting(unet, seg, frozen, z0, t):
        calls.append((torch.is_grad_enabled(), t))
        return real(unet, seg, frozen, z0, t)
    monkeypatch.setattr(madm, "madm_forward", counting)
    madm.main(small_args(iters=1, out=str(tmp_path / "run"), eval_every=100))
    train_calls = calls[:6]
    assert [g for g, _ in train_calls] == [False, True, True] * 2
    assert all(t in (50, 51) for _, t in train_calls[::3])  # DPLG t0 in {lo, lo + 1} at step 0
    assert all(t == 0 for _, t in train_calls[1::3] + train_calls[2::3])
    assert all(not g and t == 0 for g, t in calls[6:])       # evaluation: student, t = 0, no grad


# ------------------------------------------------------------------------------------------------------------
# Learning, errors, resume, DDP, demo
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


def test_non_finite_loss_stops_with_the_step(data, tmp_path, monkeypatch):
    monkeypatch.setattr(madm, "loss_ce_source", lambda logits, y: torch.tensor(float("nan")))
    with pytest.raises(UserError, match="non-finite loss .* at step 1"):
        madm.main(small_args(iters=2, out=str(tmp_path / "nan")))
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_error_paths(data, tmp_path):
    with pytest.raises(UserError, match="--eval-only"):
        madm.main(small_args(eval_only=True))
    with pytest.raises(UserError, match="--resume"):
        madm.main(small_args(resume=True, out=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="--batch-size"):
        madm.main(small_args(batch_size=3, micro_batch_size=2, out=str(tmp_path / "b")))
    r = _run(["--sd-model", "tiny", "--iters", "1", "--data-root", str(tmp_path / "missing"),
              "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the inputs validate


def test_profile_needs_no_data_and_writes_nothing(tmp_path):
    res = madm.main(madm.Args(sd_model="tiny", profile=1, crop_size=32, fusion_stride=4,
                              data_root=str(tmp_path / "no-data"), out=str(tmp_path / "out")))
    for key in ("flops_per_iter", "sec_per_iter", "peak_mem_gb", "matmul_peak_gflops", "utilization"):
        assert res[key] > 0, key
    assert not (tmp_path / "out").exists()


def test_kill_and_resume_is_bit_identical(data, tmp_path):
    """SIGKILL a run after its step-2 checkpoint exists, resume it, and compare the final weights bit for bit
    with an uninterrupted run of the same seed (CPU)."""
    cmd = [*SMALL, "--iters", "6", "--ckpt-every", "2", "--eval-every", "100", "--keep-ckpts", "5"]
    ref = _run([*cmd, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "madm.py", *cmd, "--out", str(out)], cwd=ROOT, env=ENV1,
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
    res = _run([*cmd, "--out", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = _weights(tmp_path / "ref", 6), _weights(out, 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["seg.head.conv_seg.weight"], _weights(out, 2)["seg.head.conv_seg.weight"])
    # --eval-only on the final checkpoint scores what the run scored at its end
    ckpt = tmp_path / "ref" / "checkpoints" / "step_0000006"
    ev = madm.main(small_args(eval_only=True, ckpt=str(ckpt), out=str(tmp_path / "ev")))
    last = json.loads((tmp_path / "ref" / "metrics.json").read_text())["evals"][-1]
    assert ev["miou"] == pytest.approx(last["miou"], abs=1e-6)
    assert list((tmp_path / "ev" / "predictions").glob("*.png"))


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
    ref = _run([*cmd, "--out", str(tmp_path / "one")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "accumulation 2" in ref.stdout
    a, b = _weights(tmp_path / "ddp", 1), _weights(tmp_path / "one", 1)
    moved = 0
    for k in a:
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
        moved += 1
    assert moved > 100


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    t = time.time()
    r = _run(["--demo", "--out", str(out)], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval step 40 | mIoU" in r.stdout and "per-class results" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["args"]["sd_model"] == "tiny" and m["evals"][-1]["step"] == 40
    assert math.isfinite(m["evals"][-1]["miou"]) and "miou_first_half" in m["evals"][-1]
    assert list((out / "predictions").glob("*.png"))
    assert (out / "checkpoints" / "step_0000040" / "weights.safetensors").exists()
    print(f"demo wall time {time.time() - t:.1f} s")
