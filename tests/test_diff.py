"""DIFF + IPKL (diff.py): the official schedule, the three waste removals against references that keep the
waste, the IPKL latent fusion, learning on the synthetic sample, the demo end to end, kill-and-resume,
--profile and the error paths. CPU only, tiny SD (one load per module), a few minutes on two busy cores.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import diff
from common.runtime import UserError, load_checkpoint, latest_checkpoint
from common.sd_backbone import FeatureCapture, build_random_sd, encode_prompts, load_sd
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread, here and in the subprocesses: on two cores shared with other test processes, OpenMP worker
# threads spin-wait for each other and every small op gets 5-20x slower (measured: 0.36 s vs 6-30 s per 5-step
# extraction). The results do not depend on it (the resume test compares runs made with the same setting).
torch.set_num_threads(1)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
DEMO_DIMS = (128, 320, 512, 64)

# The official table (diff_config.yaml, diffusion.py generalized_steps), written out by hand from the spec:
# the UNet is evaluated at seq_next[i] = 0, 1, ..., 22, 23, 26, 30, 34, 40, 45, 52, 60, 69, 80, 91, 105, 121,
# 139.
OFFICIAL_UNET_T = list(range(0, 24)) + [26, 30, 34, 40, 45, 52, 60, 69, 80, 91, 105, 121, 139]
OFFICIAL_SAVE = [33, 29, 25, 22, 18, 14, 11, 7, 3]
OFFICIAL_SAVED_T = [91, 52, 30, 22, 18, 14, 11, 7, 3]


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    sd = load_sd("tiny")
    prompts, ids = diff.class_prompts(diff.Args.prompt_classes, 19)
    sd.emb = encode_prompts(sd.tokenizer, sd.text_encoder, [""] + prompts)    # (1 + 5, 77, 32)
    sd.prompt_ids = ids
    return sd


def make_extractor(sd, num_steps=5):
    return diff.DiffusionExtractor(sd.unet, sd.vae, sd.scheduler, sd.emb, sd.prompt_ids, num_steps)


def image_and_label(prompted=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    y = torch.zeros(1, 64, 64, dtype=torch.long)        # road: no prompt
    if prompted:
        y[:, :24] = 1                                   # sidewalk
        y[:, 40:, :32] = 12                             # rider
        y[:, 40:, 32:] = 255                            # ignore: never a prompt
    return x, y


# ------------------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------------------
def test_schedule_tables():
    seq, seq_next, save = diff.inversion_schedule(37)
    assert seq_next == OFFICIAL_UNET_T and save == OFFICIAL_SAVE
    assert [seq_next[i] for i in save] == OFFICIAL_SAVED_T
    assert seq[-1] == 160 and len(seq) == 37
    _, nxt5, save5 = diff.inversion_schedule(5)
    assert [nxt5[i] for i in save5] == [60, 40, 20, 1, 0]
    _, nxt1, save1 = diff.inversion_schedule(1)
    assert nxt1 == [0] and save1 == [0]
    with pytest.raises(UserError, match="--num-steps"):
        diff.inversion_schedule(10)


def test_unet_timesteps_visited_and_saved_steps(sd):
    """The UNet sees the official timesteps (34 of them: we stop after index 33; the reference sees all 37),
    and the channels of each layer hold its outputs at the saved steps, in the official order."""
    ext = make_extractor(sd, 37)
    x, y = image_and_label(prompted=False)
    visited, outputs = [], []
    name = "up_blocks.3.resnets.0.conv2"                 # first layer of stride 8
    hook = sd.unet.register_forward_pre_hook(lambda m, a: visited.append(int(a[1][0])))
    try:
        with FeatureCapture(sd.unet, [name]) as cap:
            h2 = sd.unet.register_forward_hook(lambda *a: outputs.append(cap.features[name][0].clone()))
            feats = ext(x, y, generator=torch.Generator().manual_seed(0), branches=("uncond",))
            h2.remove()
        assert visited == OFFICIAL_UNET_T[:34]
        visited.clear()
        ext(x, y, generator=torch.Generator().manual_seed(0), branches=("uncond",), official=True)
        assert visited == OFFICIAL_UNET_T
    finally:
        hook.remove()
    c = sd.unet.up_blocks[3].resnets[0].conv2.out_channels
    f8 = feats["uncond"][8][0]                           # (C_in, 8, 8), first layer = channels [0, 9c)
    assert f8.shape[0] == ext.in_channels[8] == 9 * 6 * c
    for k, t in enumerate(OFFICIAL_SAVED_T):
        assert torch.equal(f8[k * c:(k + 1) * c], outputs[OFFICIAL_UNET_T.index(t)].float()), f"save slot {k}"


# ------------------------------------------------------------------------------------------------------------
# The three waste removals, each against a reference that keeps the waste
# ------------------------------------------------------------------------------------------------------------
def test_guidance_shortcut_equals_two_pass(sd):
    """One "" pass with CA counted twice == the official negative + positive "" passes with guidance 5, in
    both branches, with class prompts present (same seed, so the same noise draws)."""
    ext = make_extractor(sd, 5)
    x, y = image_and_label(prompted=True)
    ours = ext(x, y, generator=torch.Generator().manual_seed(1))
    ref = ext(x, y, generator=torch.Generator().manual_seed(1), official=True)
    for branch in ("uncond", "cond"):
        for s in (8, 16, 32):
            torch.testing.assert_close(ours[branch][s], ref[branch][s], rtol=1e-4, atol=1e-4)
    # the conditional branch really differs from the unconditional one (prompts changed it)
    assert not torch.allclose(ours["cond"][8], ours["uncond"][8], atol=1e-3)


def test_stopping_after_last_saved_step_equals_full_loop(sd):
    ext = make_extractor(sd, 37)
    x, y = image_and_label(prompted=True)
    ours = ext(x, y, generator=torch.Generator().manual_seed(2))
    full = ext(x, y, generator=torch.Generator().manual_seed(2), full_loop=True)
    for branch in ("uncond", "cond"):
        for s in (8, 16, 32):
            assert torch.equal(ours[branch][s], full[branch][s])


def test_skipping_stride64_changes_no_output(sd):
    """Logits, loss and every gradient equal a reference that builds and runs the stride-64 bottleneck."""
    ext = make_extractor(sd, 5)
    x, y = image_and_label(prompted=True)
    feats = ext(x, y, generator=torch.Generator().manual_seed(3), official=True)   # includes stride 64
    torch.manual_seed(0)
    ours = diff.DIFFSegmentor(ext.in_channels, 19, DEMO_DIMS)
    ref = diff.DIFFSegmentor(ext.in_channels, 19, DEMO_DIMS, with_stride64=feats["uncond"][64].shape[1])
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert all(k.startswith("bottlenecks.s64.") for k in missing) and missing and not unexpected
    results = []
    without64 = [{s: f[s] for s in (8, 16, 32)} for f in (feats["uncond"], feats["cond"])]
    for model, branches in ((ours, without64), (ref, [feats["uncond"], feats["cond"]])):
        torch.manual_seed(1)                             # same dropout masks
        logits_u, logits_c = model(branches)
        loss, _ = diff.ipkl_loss(logits_c, logits_u, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if not n.startswith("bottlenecks.s64")}
        results.append((logits_u.detach(), logits_c.detach(), loss.detach(), grads))
    (lu, lc, l0, g0), (ru, rc, l1, g1) = results
    assert torch.equal(lu, ru) and torch.equal(lc, rc) and torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert all(p.grad is None or not p.grad.any() for n, p in ref.named_parameters() if "s64" in n)


def test_grad_checkpointing_changes_no_gradient():
    torch.manual_seed(0)
    ch = {8: 96, 16: 192, 32: 384}
    feats = [{s: torch.randn(1, c, 64 // s, 64 // s) for s, c in ch.items()} for _ in range(2)]
    y = torch.randint(0, 19, (1, 64, 64))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = diff.DIFFSegmentor(ch, 19, DEMO_DIMS, grad_checkpointing=ckpt)
        torch.manual_seed(2)                             # same dropout masks
        loss, _ = diff.ipkl_loss(*reversed(model(feats)), y)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*grads))


# ------------------------------------------------------------------------------------------------------------
# IPKL latent fusion
# ------------------------------------------------------------------------------------------------------------
def test_fusion_with_single_full_mask_is_the_plain_update():
    g = torch.Generator().manual_seed(0)
    x_t, eps_base, eps_c, z0, z1 = (torch.randn(4, 8, 8, generator=g) for _ in range(5))
    a_t, a_n = 0.98, 0.95
    plain = diff.inversion_update(x_t, eps_base, a_t, a_n, 1.0, z0)
    prompted = diff.inversion_update(x_t, eps_c, a_t, a_n, 1.0, z1)
    ones = torch.ones(1, 8, 8)
    # only the base prompt (mask 1 everywhere): exactly the plain update
    assert torch.equal(diff.fuse_candidates(plain[None], ones[None]), plain)
    # a class covering the whole image: the mean of the plain and the prompted update
    both = diff.fuse_candidates(torch.stack([plain, prompted]), torch.stack([ones, ones]))
    torch.testing.assert_close(both, (plain + prompted) / 2)
    # a class on the left half: right half untouched, left half the mean
    half = ones.clone()
    half[..., 4:] = 0
    mixed = diff.fuse_candidates(torch.stack([plain, prompted]), torch.stack([ones, half]))
    assert torch.equal(mixed[..., 4:], plain[..., 4:])
    torch.testing.assert_close(mixed[..., :4], (plain[..., :4] + prompted[..., :4]) / 2)
    # the update rule itself (Decision 4) at eta 0 is DDIM: x_n = sqrt(a_n) x0 + sqrt(1 - a_n) eps
    x0 = (x_t - (1 - a_t) ** 0.5 * eps_base) / a_t ** 0.5
    torch.testing.assert_close(diff.inversion_update(x_t, eps_base, a_t, a_n, 0.0, z0),
                               a_n ** 0.5 * x0 + (1 - a_n) ** 0.5 * eps_base)


def test_conditional_branch_with_only_the_base_mask_equals_unconditional(sd):
    """No prompted class in the label: the conditional branch is the plain "" update (same draws -> same
    features); with prompted classes it differs only through them."""
    ext = make_extractor(sd, 5)
    x, y = image_and_label(prompted=False)
    cond = ext(x, y, generator=torch.Generator().manual_seed(4), branches=("cond",))["cond"]
    uncond = ext(x, y, generator=torch.Generator().manual_seed(4), branches=("uncond",))["uncond"]
    for s in (8, 16, 32):
        assert torch.equal(cond[s], uncond[s])
    plan = ext.prompt_plan(image_and_label(prompted=True)[1], 1, 8, 8, torch.device("cpu"))
    assert [(b, k) for b, k, _ in plan] == [(0, 0), (0, 1), (0, 3)]      # "", sidewalk, rider (prompt 3)
    assert plan[1][2][0, :3].all() and not plan[1][2][0, 3:].any()        # nearest-resized sidewalk rows


def test_prompt_classes_follow_the_target_class_set():
    assert diff.class_prompts(diff.Args.prompt_classes, 19)[1] == [1, 3, 12, 14, 16]
    prompts, ids = diff.class_prompts(diff.Args.prompt_classes, 11)
    assert [diff.CLASS_SETS[11][i] for i in ids] == ["sidewalk", "wall"]
    assert prompts[0] == "A high quality photo; europe city; sidewalk, Paths for pedestrian use"
    assert [diff.CLASS_SETS[9][i] for i in diff.class_prompts(diff.Args.prompt_classes, 9)[1]] == ["sidewalk"]
    with pytest.raises(UserError, match="prompt-classes"):
        diff.class_prompts(("sidwalk",), 19)


def test_poly_warmup_schedule():
    f = lambda s: diff.poly_warmup_factor(s, 40000, 1500, 1e-6, 1.0)  # noqa: E731
    assert f(0) == pytest.approx(1e-6) and f(750) == pytest.approx(0.5 * (1 - 750 / 40000), rel=1e-5)
    assert f(1500) == pytest.approx(1 - 1500 / 40000) and f(40000) == 0.0


# ------------------------------------------------------------------------------------------------------------
# Learning, demo, resume, profile, errors
# ------------------------------------------------------------------------------------------------------------
def test_learning_on_the_synthetic_sample(sd):
    """Overfit one real-loader batch of the synthetic GTA5: the IPKL loss halves and the batch is segmented
    far above chance (the whole trained part learns through both branches; a detached graph or a wrong sign
    fails here)."""
    from common.datasets import TrainStream, build_dataset
    from common.metrics import confusion_matrix, mean_iou
    root = ensure_synthetic_sample(str(ROOT / "data" / "synthetic"))
    ds = build_dataset("gta5", root, "train", crop_size=64, scale=1 / 8, num_classes=19)
    batch = TrainStream(ds, seed=0, workers=0).batch(0, 0, 2)
    x, y = batch["image"] * 2 - 1, batch["label"]
    feats = make_extractor(sd, 5)(x, y, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = diff.DIFFSegmentor(make_extractor(sd, 5).in_channels, 19, DEMO_DIMS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(25):
        logits_u, logits_c = model([feats["uncond"], feats["cond"]])
        loss, _ = diff.ipkl_loss(logits_c, logits_u, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        logits = model.forward_branch(feats["uncond"])
        pred = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear").argmax(1)
    conf = confusion_matrix(pred, y, 19)
    chance = 1 / len(np.unique(y[y != 255]))
    assert mean_iou(conf) > 3 * chance, mean_iou(conf)


def _run(args, timeout=600, **kw):
    return subprocess.run([sys.executable, str(ROOT / "diff.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = _run(["--demo", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["sd_model"] == "tiny" and metrics["evals"][-1]["miou"] is not None
    assert list((out / "predictions").glob("*.png"))
    assert "eval step" in r.stdout and "mIoU" in r.stdout
    assert latest_checkpoint(out) is not None
    # the demo learns: the logged cross-entropy falls
    ce = [float(line.split("loss_ce_uncond ")[1].split(" ")[0]) for line in r.stdout.splitlines()
          if line.startswith("step ")]
    assert len(ce) >= 3 and ce[-1] < 0.8 * ce[0], ce
    # --eval-only on the final checkpoint reproduces the demo's last evaluation (the eval generator is reseeded)
    r2 = diff.main(diff.Args(demo=True, eval_only=True, ckpt=str(latest_checkpoint(out)), out=str(tmp_path / "ev")))
    assert r2["miou"] == pytest.approx(metrics["evals"][-1]["miou"], abs=1e-9)


def test_kill_and_resume_is_bit_identical(tmp_path):
    """SIGKILL a run after a checkpoint exists, --resume it: the final weights equal an uninterrupted run's,
    bit for bit (data stream, photometric draws, dropout RNG, the extractor's generator and AdamW state all
    restored)."""
    common = ["--demo", "--num-steps", "1", "--iters", "5", "--ckpt-every", "1", "--eval-every", "1000",
              "--log-every", "1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _run(common + ["--out", str(full)])
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, str(ROOT / "diff.py"), *common, "--out", str(killed)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (killed / "checkpoints" / "step_0000002" / "state.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 240, "run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(latest_checkpoint(killed))[1]["step"] < 5
    r = _run(common + ["--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    w_full, s_full = load_checkpoint(latest_checkpoint(full))
    w_res, s_res = load_checkpoint(latest_checkpoint(killed))
    assert s_full["step"] == s_res["step"] == 5
    assert w_full.keys() == w_res.keys()
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert torch.equal(s_full["generator"], s_res["generator"])


def test_official_structure_reference_rows(sd):
    """The reference rebuilt for --profile has the official structure: 37 steps x (2 + 2 + |C|) UNet rows
    against our 34 x (2 + |C|) in one call per step, plus the stride-64 features (their FLOPs: the --profile
    test)."""
    ext = make_extractor(sd, 37)
    x, y = image_and_label(prompted=True)                             # sidewalk + rider: |C| = 2
    rows = []
    hook = sd.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        ours = ext(x, y)
        assert rows == [2 + 2] * 34
        rows.clear()
        official = ext(x, y, official=True)
        assert rows == [4 + 2] * 37
    finally:
        hook.remove()
    assert 64 in official["cond"] and 64 not in ours["cond"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIFF_SD21_FLOPS") != "1",
                    reason="minutes of meta-device counting; set DIFF_SD21_FLOPS=1 (benchmarks/diff.sh)")
def test_flop_ratio_at_sd21_size():
    """Issue 8 targets at SD 2.1 size, counted on the meta device (no weights, no compute), crop 512, 37
    steps: ours / official <= 0.5 without a prompted class, < 1 with all five prompted classes present."""
    parts = build_random_sd("sd21", ("unet", "vae"), device="meta")
    emb = torch.zeros(6, 77, 1024, device="meta")
    ext = diff.DiffusionExtractor(parts["unet"], parts["vae"], parts["scheduler"], emb, [1, 3, 12, 14, 16],
                                  37)
    assert ext.in_channels == {32: 69120, 16: 34560, 8: 17280}            # spec Decision 8
    y_none = torch.zeros(1, 512, 512, dtype=torch.long)
    y_all = y_none.clone()
    for k, c in enumerate([1, 3, 12, 14, 16]):
        y_all[:, 80 * k: 80 * (k + 1)] = c
    ratios = {}
    for name, y in (("none", y_none), ("all", y_all)):
        ours = diff.structure_flops(ext, 19, diff.Args.proj_dims, (1, 3, 512, 512), y, official=False)
        official = diff.structure_flops(ext, 19, diff.Args.proj_dims, (1, 3, 512, 512), y, official=True)
        ratios[name] = (ours, official, ours / official)
    print("FLOPs ours, official, ratio:", ratios)
    assert ratios["none"][2] <= 0.5 and ratios["all"][2] < 1


def test_profile_cli_reports_both_structures(capsys):
    """--profile runs without any dataset and prints one JSON line with the comparison keys."""
    result = diff.main(diff.Args(sd_model="tiny", profile=1, crop_size=64, num_steps=1, proj_dims=DEMO_DIMS,
                                 data_root="/nonexistent"))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("flops_per_iter", "sec_per_iter", "utilization", "ratio_no_prompt_class",
                "ratio_prompt_classes", "flops_official_no_prompt_class", "flops_official_prompt_classes"):
        assert key in line and key in result
    assert line["flops_no_prompt_class"] < line["flops_official_no_prompt_class"]
    assert line["flops_prompt_classes"] < line["flops_official_prompt_classes"]


def test_bad_input_errors(tmp_path):
    r = _run(["--eval-only"], timeout=120)
    assert r.returncode == 2 and "--eval-only" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="multiple of 64"):
        diff.main(diff.Args(crop_size=100, sd_model="tiny"))
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        diff.main(diff.Args(demo=True, resume=True, out=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="--num-steps"):
        diff.main(diff.Args(demo=True, num_steps=7, out=str(tmp_path / "x")))
