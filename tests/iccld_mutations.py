"""Mutation check of the ICCLD step tests: break one line of a METHOD STEP block at a time (delete it, or put a
plausible wrong alternative in its place), run the step tests on the broken copy, expect at least one to fail.

Not collected by pytest (a minute per mutation). Run from the repository root:
    OMP_NUM_THREADS=1 python tests/iccld_mutations.py            # every mutation; a Markdown table at the end
    OMP_NUM_THREADS=1 python tests/iccld_mutations.py 3 17       # only mutations 3 and 17
Each mutation runs in a temporary copy of iccld.py and the tests (common/ and data/ linked), so the working
tree is never modified. A mutation whose text is no longer found in iccld.py is reported as such.
"""
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "stage1 or stage2 or mixed_precision"
DEL = "pass  # line deleted"

# (the line or behaviour, the mutation, old text, new text); old must occur exactly once in iccld.py
MUTATIONS = [
    # ---- train_step_stage1
    ("s1 LR factor", "schedule frozen (f = 1)",
     "f = poly_warmup_factor(i, a.iters, a.warmup_iters, WARMUP_RATIO, POLY_POWER)", "f = 1.0"),
    ("s1 LR factor", "warm-up dropped",
     "f = poly_warmup_factor(i, a.iters, a.warmup_iters, WARMUP_RATIO, POLY_POWER)",
     "f = poly_warmup_factor(i, a.iters, 0, WARMUP_RATIO, POLY_POWER)"),
    ("s1 LR per group", "one lr for all groups (new layers not 10x)",
     'for g in opt.param_groups:                                    # each group\'s base lr x the schedule\n'
     '        g["lr"] = g["base"] * f', 'for g in opt.param_groups:\n        g["lr"] = a.lr * f'),
    ("s1 LR per group", "line deleted", 'for g in opt.param_groups:                                    # each '
     'group\'s base lr x the schedule\n        g["lr"] = g["base"] * f', DEL),
    ("s1 EMA update", "deleted", 'ema_update(net_ema, getattr(net, "module", net), i, a.ema_alpha)', DEL),
    ("s1 EMA update", "alpha ramp ignored (always 0.999)",
     'ema_update(net_ema, getattr(net, "module", net), i, a.ema_alpha)',
     'ema_update(net_ema, getattr(net, "module", net), 10**6, a.ema_alpha)'),
    ("s1 label latents of the GT", "image latent instead of the label latent",
     "z_ys = lab(y_s) ", "z_ys = net_ema.E(x_s * 2 - 1)[0] "),
    ("s1 source losses", "student pass through net_ema (wrong network)",
     "l_src_img, l_src_lab = stage1_losses(net, x_s, y_s, z_ys)",
     "l_src_img, l_src_lab = stage1_losses(net_ema, x_s, y_s, z_ys)"),
    ("s1 source backward", "label-latent term dropped",
     "scaler.scale(l_src_img + l_src_lab).backward()", "scaler.scale(l_src_img).backward()"),
    ("s1 source backward", "deleted", "scaler.scale(l_src_img + l_src_lab).backward()", DEL),
    ("s1 logs", "source terms logged swapped",
     'logs = {"loss_src_img": l_src_img, "loss_src_lab": l_src_lab}',
     'logs = {"loss_src_img": l_src_lab, "loss_src_lab": l_src_img}'),
    ("s1 baseline branch", "--source-only ignored", "    if not a.source_only:\n        with prec.autocast():"
     "                                     # (B, c, c)", "    if True:\n        with prec.autocast():"
     "                                     # (B, c, c)"),
    ("s1 pseudo labels", "from net (trained) instead of net_ema",
     "pseudo_labels(net_ema, x_t, a.pseudo_threshold, pl_rows(a))",
     'pseudo_labels(getattr(net, "module", net), x_t, a.pseudo_threshold, pl_rows(a))'),
    ("s1 pseudo labels", "on the augmented source crop instead of the clean target crop",
     "pseudo_labels(net_ema, x_t, a.pseudo_threshold, pl_rows(a))",
     "pseudo_labels(net_ema, strong_augment(x_t), a.pseudo_threshold, pl_rows(a))"),
    ("s1 pseudo labels", "Cityscapes row crop dropped",
     "pseudo_labels(net_ema, x_t, a.pseudo_threshold, pl_rows(a))",
     "pseudo_labels(net_ema, x_t, a.pseudo_threshold, (0, 0))"),
    ("s1 pseudo labels", "threshold ignored (q = 1)",
     "pseudo_labels(net_ema, x_t, a.pseudo_threshold, pl_rows(a))", "pseudo_labels(net_ema, x_t, 0.0, pl_rows(a))"),
    ("s1 ClassMix", "ground truth where pseudo labels belong",
     "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)      # augmented",
     "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_s, w_t)      # augmented"),
    ("s1 ClassMix", "unweighted pseudo labels (w_t = 1)",
     "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)      # augmented",
     "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, torch.ones_like(w_t))      # augmented"),
    ("class_mix (both stages)", "strong augmentation skipped",
     "x_m = strong_augment(M * x_s + (1 - M) * x_t)", "x_m = M * x_s + (1 - M) * x_t"),
    ("s1 mixed label latents", "of the source labels", "z_ym = lab(y_m)", "z_ym = lab(y_s)"),
    ("s1 mixed losses", "unweighted", "stage1_losses(net, x_m, y_m, z_ym, w_m)", "stage1_losses(net, x_m, y_m, z_ym)"),
    ("s1 mixed losses", "on the unmixed target image", "stage1_losses(net, x_m, y_m, z_ym, w_m)",
     "stage1_losses(net, x_t, y_m, z_ym, w_m)"),
    ("s1 mixed backward", "label-latent term dropped",
     "scaler.scale(l_mix_img + l_mix_lab).backward()", "scaler.scale(l_mix_img).backward()"),
    ("s1 mixed backward", "sign of a term flipped",
     "scaler.scale(l_mix_img + l_mix_lab).backward()", "scaler.scale(l_mix_img - l_mix_lab).backward()"),
    ("s1 mixed backward", "deleted", "scaler.scale(l_mix_img + l_mix_lab).backward()", DEL),
    ("s1 logs", "q not logged", "logs.update(loss_mix_img=l_mix_img, loss_mix_lab=l_mix_lab, q=q)",
     "logs.update(loss_mix_img=l_mix_img, loss_mix_lab=l_mix_lab)"),
    ("s1 optimizer step", "deleted", "    scaler.step(opt)\n    scaler.update()\n    opt.zero_grad(set_to_none=True)"
     "\n    # ---------- METHOD STEP END", "    scaler.update()\n    opt.zero_grad(set_to_none=True)"
     "\n    # ---------- METHOD STEP END"),
    ("s1 scaler update", "deleted", "    scaler.step(opt)\n    scaler.update()\n    opt.zero_grad(set_to_none=True)"
     "\n    # ---------- METHOD STEP END", "    scaler.step(opt)\n    opt.zero_grad(set_to_none=True)"
     "\n    # ---------- METHOD STEP END"),
    ("s1 zero_grad", "deleted", "    scaler.step(opt)\n    scaler.update()\n    opt.zero_grad(set_to_none=True)"
     "\n    # ---------- METHOD STEP END", "    scaler.step(opt)\n    scaler.update()"
     "\n    # ---------- METHOD STEP END"),
    # ---- train_step_stage2
    ("s2 LR factor", "schedule frozen (f = 1)",
     "f = poly_warmup_factor(j, a.iters_stage2, a.warmup_iters, WARMUP_RATIO, POLY_POWER)", "f = 1.0"),
    ("s2 LR per group", "one lr for all groups (conv_in not 10x)",
     '    for g in opt.param_groups:\n        g["lr"] = g["base"] * f\n    for g in opt_d',
     '    for g in opt.param_groups:\n        g["lr"] = a.lr * f\n    for g in opt_d'),
    ("s2 discriminator LR", "poly 0.9 frozen", 'g["lr"] = a.disc_lr * (1 - j / a.iters_stage2) ** DISC_POLY_POWER',
     'g["lr"] = a.disc_lr'),
    ("s2 discriminator LR", "UNet's schedule instead", 'g["lr"] = a.disc_lr * (1 - j / a.iters_stage2) ** '
     'DISC_POLY_POWER', 'g["lr"] = a.disc_lr * f'),
    ("s2 EMA of the UNet", "deleted", 'ema_update(unet_ema, getattr(unet, "module", unet), j, a.ema_alpha)', DEL),
    ("s2 EMA of the UNet", "copies the weights (alpha 0)",
     'ema_update(unet_ema, getattr(unet, "module", unet), j, a.ema_alpha)',
     'ema_update(unet_ema, getattr(unet, "module", unet), 0, a.ema_alpha)'),
    ("s2 source pixel weights", "source ignore pixels weighted 0 everywhere (weights zero)",
     "x, y, w_pix = x_s, y_s, torch.ones_like(y_s, dtype=torch.float)",
     "x, y, w_pix = x_s, y_s, torch.zeros_like(y_s, dtype=torch.float)"),
    ("s2 baseline branch", "--source-only ignored", "        if not a.source_only:                                     "
     "# + mixed", "        if True:                                     # + mixed"),
    ("s2 pseudo labels", "Cityscapes row crop dropped", "pseudo_labels(fz.net, x_t, a.pseudo_threshold, pl_rows(a))",
     "pseudo_labels(fz.net, x_t, a.pseudo_threshold, (0, 0))"),
    ("s2 pseudo labels", "threshold ignored (q = 1)", "pseudo_labels(fz.net, x_t, a.pseudo_threshold, pl_rows(a))",
     "pseudo_labels(fz.net, x_t, 0.0, pl_rows(a))"),
    ("s2 ClassMix", "ground truth where pseudo labels belong",
     "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_hat, w_t)\n", "x_m, y_m, w_m = class_mix(x_s, y_s, x_t, y_s, w_t)\n"),
    ("s2 the three groups", "target group gets the source labels",
     "torch.cat([y_s, y_m, y_hat])", "torch.cat([y_s, y_m, y_s])"),
    ("s2 the three groups", "target image replaced by the source image",
     "torch.cat([x_s, x_m, x_t])", "torch.cat([x_s, x_m, x_s])"),
    ("s2 pixel weights", "unweighted mixed and target", "w_pix, logs[\"q\"] = torch.cat([w_pix, w_m, w_t]), q",
     "w_pix, logs[\"q\"] = torch.cat([w_pix, w_pix, w_pix]), q"),
    ("s2 image latents", "image in [0, 1] instead of [-1, 1]", "fz.net.E((x * 2 - 1).to(prec.frozen_dtype))",
     "fz.net.E(x.to(prec.frozen_dtype))"),
    ("s2 label latents", "the image latent generated instead of the label latent", "z_y = fz.lab(y) ", "z_y = z0 "),
    ("s2 latent weights", "ignore pixels not masked", "w_lat = F.avg_pool2d(((y != 255) * w_pix)[:, None], 8)",
     "w_lat = F.avg_pool2d(w_pix[:, None], 8)"),
    ("s2 latent weights", "max instead of mean over 8x8", "w_lat = F.avg_pool2d(((y != 255) * w_pix)[:, None], 8)",
     "w_lat = F.max_pool2d(((y != 255) * w_pix)[:, None].float(), 8)"),
    ("s2 timesteps", "one fixed timestep", "t = torch.randint(0, T, (n,), device=z_y.device)",
     "t = torch.full((n,), T // 2, device=z_y.device)"),
    ("s2 noise", "no noise (eps = 0)", "eps = torch.randn_like(z_y) ", "eps = torch.zeros_like(z_y) "),
    ("s2 forward diffusion", "z_t = z_y (add_noise skipped)", "z_t = fz.sched.add_noise(z_y, eps, t)", "z_t = z_y"),
    ("s2 UNet input", "condition first, noisy latent second", "inp, tt = torch.cat([z_t, z0], 1), t",
     "inp, tt = torch.cat([z0, z_t], 1), t"),
    ("s2 adversarial noise", "the eps-loss noise reused as z_T", "z_T = torch.randn_like(z_y) ", "z_T = eps "),
    ("s2 adversarial timesteps", "the eps-loss timesteps (x0_hat at small t, the old design)",
     "torch.cat([t, torch.full_like(t, T - 1)])", "torch.cat([t, t])"),
    ("s2 UNet call", "the EMA UNet in the generator step (wrong network)",
     "eps_hat = unet(inp, tt, encoder_hidden_states", "eps_hat = unet_ema(inp, tt, encoder_hidden_states"),
    ("s2 eps loss", "unweighted", "eps_loss(eps_hat[:n], eps, w_lat)", "eps_loss(eps_hat[:n], eps, torch.ones_like(w_lat))"),
    ("s2 x0 for the discriminator", "x0_hat of the eps-loss inputs (label latent at small t, the old design)",
     "x0_T = predict_x0(z_T, eps_hat[n:], fz.alpha_bars[T - 1])", "x0_T = predict_x0(z_t, eps_hat[:n], fz.alpha_bars[t])"),
    ("s2 discriminator frozen", "deleted (generator gradient leaks into the discriminator)",
     "        disc.requires_grad_(False)", "        pass"),
    ("s2 generator's discriminator input", "source instead of mixed + target",
     "lsgan_g_loss(getattr(disc, \"module\", disc)(x0_T[b:]))", "lsgan_g_loss(getattr(disc, \"module\", disc)(x0_T[:b]))"),
    ("s2 generator loss", "adversarial term dropped", "loss = loss + a.lambda_adv * l_adv", "loss = loss"),
    ("s2 generator loss", "sign of the adversarial term flipped", "loss = loss + a.lambda_adv * l_adv",
     "loss = loss - a.lambda_adv * l_adv"),
    ("s2 generator loss", "weight hard-coded (1e-3) instead of --lambda-adv", "loss = loss + a.lambda_adv * l_adv",
     "loss = loss + 1e-3 * l_adv"),
    ("s2 generator backward", "deleted", "    scaler.scale(loss).backward()", "    pass"),
    ("s2 generator step", "deleted", "    scaler.step(opt)\n    opt.zero_grad", "    opt.zero_grad"),
    ("s2 generator zero_grad", "deleted", "    scaler.step(opt)\n    opt.zero_grad(set_to_none=True)\n",
     "    scaler.step(opt)\n"),
    ("s2 discriminator trainable", "deleted", "        disc.requires_grad_(True)", "        pass"),
    ("s2 discriminator input", "not detached", "disc(x0_T.detach())", "disc(x0_T)"),
    ("s2 discriminator targets", "swapped (source = 0, mixed + target = 1)", "lsgan_d_loss(d_src, d_tgt)",
     "lsgan_d_loss(d_tgt, d_src)"),
    ("s2 discriminator groups", "mixed counted as source", ".split([b, n - b])", ".split([2 * b, n - 2 * b])"),
    ("s2 discriminator backward", "deleted", "        scaler.scale(l_dis).backward()", "        pass"),
    ("s2 discriminator step", "deleted", "        scaler.step(opt_d)\n", "        pass\n"),
    ("s2 discriminator zero_grad", "deleted", "        opt_d.zero_grad(set_to_none=True)\n", "        pass\n"),
    ("s2 logs", "d_src / d_tgt swapped", "logs.update(d_src=d_src.mean(), d_tgt=d_tgt.mean())",
     "logs.update(d_src=d_tgt.mean(), d_tgt=d_src.mean())"),
    ("s2 scaler update", "deleted", "    scaler.update()\n    # ---------- METHOD STEP END ----------\n    return {**{k: v."
     "item() for k, v in logs.items()}, \"lr\": opt.param_groups[0][\"lr\"]}\n\n\n# ----",
     "    # ---------- METHOD STEP END ----------\n    return {**{k: v.item() for k, v in logs.items()}, \"lr\": opt."
     "param_groups[0][\"lr\"]}\n\n\n# ----"),
]


def run(k: int, work: Path) -> str:
    line, what, old, new = MUTATIONS[k]
    src = (ROOT / "iccld.py").read_text()
    if src.count(old) != 1:
        return f"NOT APPLIED (found {src.count(old)} times)"
    (work / "iccld.py").write_text(src.replace(old, new))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf",
                           "tests/test_iccld.py", "-k", TESTS], cwd=work, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) tests/test_iccld.py::(\S+)", proc.stdout, re.M)
    return ", ".join(failed) if failed else "SURVIVED (all step tests passed)"


def main() -> None:
    picks = [int(a) for a in sys.argv[1:]] or range(len(MUTATIONS))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "tests").mkdir()
        for name in ("tests/test_iccld.py", "tests/conftest.py", "pytest.ini"):
            shutil.copy(ROOT / name, work / name)
        for name in ("common", "data"):
            (work / name).symlink_to(ROOT / name)
        rows = []
        for k in picks:
            verdict = run(k, work)
            rows.append(f"| {k} | {MUTATIONS[k][0]} | {MUTATIONS[k][1]} | {verdict} |")
            print(rows[-1], flush=True)
    print("\n| # | METHOD STEP line | mutation | failing test |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
