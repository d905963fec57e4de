"""ICCLD (iccld.py): components, the training losses, sampling, learning, resume, errors and the demo.

Everything runs on CPU with the tiny random SD and the synthetic sample; one tiny-SD load is shared per module.
"""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import iccld
from common import runtime, sd_backbone, synthetic
from common.runtime import UserError

ROOT = Path(__file__).resolve().parents[1]


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
    from common.datasets import PALETTES
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
    disc = iccld.Discriminator()
    torch.nn.init.constant_(disc.net[-1].bias, 0.5)  # start undecided (outputs ~0.5) so both terms have slope
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


def test_ddim_with_t_steps_returns_a_latent_that_d_decodes(sd):
    from diffusers import DDIMScheduler
    net = iccld.ICCLDNet(sd.vae, 19).eval()
    unet = iccld.widen_conv_in(_fresh_unet(sd))
    ddim = DDIMScheduler.from_config(sd.scheduler.config, prediction_type="epsilon", clip_sample=False)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        z0, skips = net.E(x * 2 - 1)
        for T in (1, 3):
            gen = torch.Generator().manual_seed(0)
            z_bar = iccld.ddim_sample(unet, z0, _ctx(sd, 1)[:1], ddim, T, gen)
            assert len(ddim.timesteps) == T
            assert z_bar.shape == (1, 4, 4, 6) and torch.isfinite(z_bar).all()
            logits = net.D(z_bar, skips)
            assert logits.shape == (1, 19, 32, 48)
        # same seed, same sample; the condition matters once conv_in's extra channels are non-zero
        a = iccld.predict_diffusion(net, unet, _ctx(sd, 1)[:1], ddim, 3, torch.Generator().manual_seed(1), x)
        b = iccld.predict_diffusion(net, unet, _ctx(sd, 1)[:1], ddim, 3, torch.Generator().manual_seed(1), x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        unet.conv_in.weight[:, 4:].normal_(std=0.1)
        c = iccld.predict_diffusion(net, unet, _ctx(sd, 1)[:1], ddim, 3, torch.Generator().manual_seed(1), x)
        assert (a - c).abs().max() > 1e-4


def test_pseudo_labels_quality_weight_and_row_crop(sd):
    net = iccld.ICCLDNet(sd.vae, 19).eval()
    y_hat, q, w = iccld.pseudo_labels(net, torch.rand(2, 3, 32, 32), 0.0, (2, 5))
    assert y_hat.shape == (2, 32, 32) and float(q) == 1.0  # every pixel passes threshold 0
    assert (w[:, :2] == 0).all() and (w[:, -5:] == 0).all() and (w[:, 2:-5] == 1).all()
    _, q, _ = iccld.pseudo_labels(net, torch.rand(2, 3, 32, 32), 1.01, (0, 0))
    assert float(q) == 0.0


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


# ---- training: learning, resume, errors, profile ------------------------------------------------------------------
def _args(tmp_path, data_root, **kw):
    """--demo settings (tiny SD, synthetic data at 1/8 scale, crop 64, demo LRs) with a log line every step."""
    base = dict(demo=True, data_root=data_root, log_every=1, out=str(tmp_path / "run"))
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
    return runtime.load_checkpoint(runtime.latest_checkpoint(out))[0]


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_inside_stage_2_is_bit_identical(tmp_path, data_root, full_run, monkeypatch):
    """A run interrupted right after its stage-2 step-1 checkpoint, then resumed, ends with the same weights
    (trained UNet, its EMA, discriminator, frozen E/D) bit for bit as the uninterrupted run."""
    save = runtime.save_checkpoint

    def save_then_die(out, step, *a, **k):
        path = save(out, step, *a, **k)
        if step == 3:  # stage-1 iters 2 + stage-2 step 1
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(iccld.runtime, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "cut"), **KW))
    monkeypatch.setattr(iccld.runtime, "save_checkpoint", save)
    assert runtime.latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "cut"), resume=True, **KW))
    full = _final_weights(full_run[0])
    assert any(k.startswith("unet_ema.") for k in full)
    _assert_bit_identical(full, _final_weights(tmp_path / "cut"))


def test_resume_inside_stage_1_is_bit_identical(tmp_path, data_root, full_run):
    """Resuming from the stage-1 step-1 checkpoint reaches the uninterrupted stage-1 weights (net and
    net_ema), optimizer and RNG states included."""
    (tmp_path / "s1" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run[0] / "checkpoints" / "step_0000001", tmp_path / "s1" / "checkpoints" / "step_0000001")
    iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "s1"), resume=True, **{**KW, "stage": "1"}))
    ref = runtime.load_checkpoint(full_run[0] / "checkpoints" / "step_0000002")[0]
    _assert_bit_identical(ref, _final_weights(tmp_path / "s1"))


def test_stage_2_from_the_stage_1_checkpoint_reproduces_both(tmp_path, data_root, full_run):
    """--stage 2 --stage1-ckpt <run> starts from the saved net_ema and gives the second half of --stage both."""
    res = iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "s2"), stage1_ckpt=str(full_run[0]),
                           **{**KW, "stage": "2"}))
    _assert_bit_identical(_final_weights(full_run[0]), _final_weights(tmp_path / "s2"))
    assert res["miou"] == full_run[1]["miou"] and res["miou_direct"] == full_run[1]["miou_direct"]


def test_eval_only_reproduces_the_final_evaluation(tmp_path, data_root, full_run):
    """--eval-only --ckpt <stage-2 checkpoint>: same z_T seed, same numbers for both paths as the run's own."""
    ck = runtime.latest_checkpoint(full_run[0])
    res = iccld.main(_args(tmp_path, data_root, out=str(tmp_path / "ev"), eval_only=True, ckpt=str(ck)))
    assert res["miou"] == full_run[1]["miou"] and res["miou_direct"] == full_run[1]["miou_direct"]
    assert not (tmp_path / "ev" / "checkpoints").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--stage", "2"], "--stage 2: no stage-1 checkpoint"),
    (["--eval-only"], "--eval-only: no --ckpt given"),
    (["--resume"], "--resume: no checkpoint"),
    (["--crop-size", "60"], "not a multiple of 8"),
    (["--stage1-ckpt", "/nonexistent/ckpt", "--stage", "2"], "--stage1-ckpt: '/nonexistent/ckpt' not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_root, capsys, argv, needle):
    base = ["--sd-model", "tiny", "--data-root", data_root, "--crop-size", "64", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        runtime.run_cli(iccld.main, iccld.Args, base + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_profile_each_stage_writes_nothing(tmp_path, capsys):
    """--profile without any dataset: random tensors of the training shapes, one JSON line, no run folder."""
    for stage in ("1", "2"):
        res = iccld.main(iccld.Args(sd_model="tiny", crop_size=64, profile=1, stage=stage,
                                    data_root=str(tmp_path / "no-data"), out=str(tmp_path / "o")))
        assert res["flops_per_iter"] > 0 and res["sec_per_iter"] > 0 and res["stage"] == stage
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{\"flops_per_iter")]
        assert json.loads(line[-1])["utilization"] > 0
    assert not (tmp_path / "o").exists()


# ---- the demo, end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_end_to_end_and_learns(tmp_path):
    """`python iccld.py --demo`: both stages on the synthetic sample. Exit 0, metrics.json, pictures, the eval
    lines; the losses fall and both evaluated paths beat any constant prediction (the learning test)."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "iccld.py", "--demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    assert data["args"]["demo"] and data["args"]["sd_model"] == "tiny"
    evals = {e["path"].split()[0]: e for e in data["evals"]}
    assert set(evals) == {"stage1", "stage2"}
    assert list((out / "predictions").glob("*.png"))
    assert runtime.latest_checkpoint(out / "stage1") is not None
    assert "eval step" in proc.stdout and "| mIoU " in proc.stdout
    # learning: the first logged step against the last three
    src, eps = _logged(proc.stdout, "loss_src_img"), _logged(proc.stdout, "loss_eps")
    assert np.mean(src[-3:]) < 0.7 * src[0], src
    assert np.mean(eps[-3:]) < 0.7 * eps[0], eps
    # the most frequent class covers < 20% of the eval pixels, so a constant prediction has aAcc < 0.2
    for e in evals.values():
        assert e["aacc"] > 0.3 and e["miou"] > 1.5 / 19, e["path"]
