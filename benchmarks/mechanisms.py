"""Mechanism checks on the pretrained miniature SD: does each method's adaptation mechanism do what its paper says?

benchmarks/adaptation.py asks whether a method beats its baseline row; this script looks *inside* the same runs
(same scripts, flags, steps, seed and synthetic sample: adaptation.METHODS, `--demo --sd-model mini`) and
measures the quantity each mechanism is supposed to move. Every run is one script's `main` called in a child
process, with a few functions wrapped in that process to observe what the training step sees; the wrappers
never change what the step computes (extra passes restore the RNG state and the BatchNorm buffers they touch).

1. MADM, DPLG: on every target crop the step hands to the EMA teacher, the teacher's pseudo labels at the DPLG
   timestep t > 0 (as the step uses them) and the same teacher at t = 0 (same weights, same dropout draw),
   both scored against the crop's ground truth (recorded by wrapping TrainStream.batch; labels never reach the
   step). Reported per quarter of training: pixel accuracy, mIoU of the pseudo labels, the share of pixels
   whose label differs between t > 0 and t = 0, mean t.
   MADM, LPLR: target mIoU with the task's LPLR weights (dsec_event: 20, source latent) vs `--lplr-weights 0`
   (the L1 latent regression off; the decoded s0 still feeds the head), same seed.
2. PTDiffSeg: after training (the benchmark's full variant; also the `--baseline` variant, trained with the
   neutral prompt only, for reference), on every target eval image: mean per-pixel KL(p_prompt0 || p_prompt_k)
   and the share of pixels whose argmax changes, for each other scene prompt k of SCENE_PROMPTS (measured by
   wrapping slide_logits during the script's final evaluation), and the same between the TTDA-learned prompt
   and prompt 0; TTDA's mIoU before / after as the script records it.
3. DIFF: per training step, CE of the conditional (IPKL, class prompts) and the unconditional branch and their
   MSE (wrapping ipkl_loss); after training, both branches' CE, pixel accuracy and mIoU on the target eval
   images (the conditional branch gets the eval image's ground-truth class masks, as in training).
4. ICCLD: per stage-2 step, the discriminator's mean output on the source, mixed and target x0_hat of its own
   update (a forward hook; LSGAN: 1 = source, 0 = mixed/target), its domain accuracy (threshold 0.5), the gap
   between the source and target x0_hat channel means, and the norm of the condition weights of the widened
   conv_in (zero at the start of stage 2); reported for the first and last sixth of stage 2.

Run (two runs at a time, one thread each; one seed = 25 min of summed CPU time, so about 13-15 minutes on 2
free cores; 27 minutes measured on a shared, loaded 2-core machine):

    python benchmarks/mechanisms.py                          # every method, seed 0, --sd-model mini
    python benchmarks/mechanisms.py --methods DIFF,ICCLD,PTDiffSeg --seeds 2 --reuse --out X   # report in X
    python benchmarks/mechanisms.py --reuse                  # rewrite the report from finished runs
    python benchmarks/mechanisms.py --smoke                  # a few steps per run: checks the plumbing

Writes benchmarks/results/mechanisms.md (tables + the commands) and benchmarks/results/mechanisms.json (every
number, per-step records included). The sample: common.synthetic.write_synthetic_sample(n_train=48, n_eval=24,
seed 0, shift 1.0) in <work>/synthetic-seed0-shift1 (the benchmark's sample, own copy).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adaptation import METHODS, SAMPLE  # noqa: E402  (the benchmark's pairs, steps and sample size)

# The runs per seed: (method, variant, extra script flags), started in this order, two at a time (balanced
# for the two slots: the long MADM probe in one, short runs and MADM without LPLR in the other); the PTDiffSeg
# baseline (a reference for the prompt sensitivity) last.
JOBS = [("MADM", "dplg-probe", []), ("DIFF", "full", []), ("PTDiffSeg", "full", []),
        ("MADM", "lplr-off", ["--lplr-weights", "0"]), ("ICCLD", "full", []),
        ("PTDiffSeg", "baseline", ["--baseline"])]
SMOKE_ITERS = {"MADM": ["--iters", "8"], "ICCLD": ["--iters", "4", "--iters-stage2", "12"],
               "PTDiffSeg": ["--iters", "4", "--ttda-steps", "2"], "DIFF": ["--iters", "4"]}


def weights_info(sd_model: str) -> dict:
    """Which mini weights are in common/mini-sd: the smoke flag of their pretraining record and its hash."""
    if sd_model != "mini":
        return {"sd_model": sd_model}
    p = ROOT / "common" / "mini-sd" / "pretraining.json"
    text = p.read_text()
    return {"sd_model": "mini", "smoke": bool(json.loads(text)["settings"].get("smoke")),
            "pretraining_sha1": hashlib.sha1(text.encode()).hexdigest()[:12]}


def script_argv(name: str, seed: int, data: str, out: str, sd_model: str, extra: list, smoke: bool) -> list:
    """The script's command line: adaptation.py's run_one flags for the benchmark's full variant + `extra`."""
    cfg = METHODS[name]
    iters = SMOKE_ITERS[name] if smoke else cfg["iters"]
    return ["--demo", "--src", cfg["src"], "--tgt", cfg["tgt"], "--data-root", data, "--seed", str(seed),
            "--out", out, "--sd-model", sd_model, *iters, "--eval-every", "100000", "--ckpt-every", "0",
            "--log-every", "50", *extra]


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan


# ---------------------------------------------------------------------------------------------------------
# Child processes: one script's main() with observing wrappers. Each returns a JSON-able dict.
# ---------------------------------------------------------------------------------------------------------
def child_madm(argv: list, probe: bool) -> dict:
    """MADM run; with `probe`, score the DPLG teacher (t > 0) and the same teacher at t = 0 on each target crop."""
    import numpy as np
    import torch

    import madm
    from common import cli, datasets, metrics
    labels: list = []          # ground truth of the target crops handed to the step, in order
    now = {"step": -1, "t": 0}  # step and DPLG timestep of the teacher call about to happen
    steps: list = []           # one record per teacher call (micro-step)
    confs: dict = {}           # (quarter, "t"/"0") -> summed confusion matrix of the pseudo labels
    if probe:
        batch = datasets.TrainStream.batch

        def recording_batch(self, step, start, count):
            out = batch(self, step, start, count)
            if self.stream_id == 1:                           # the target stream
                labels.append(out["label"].clone())
            return out
        datasets.TrainStream.batch = recording_batch
        dplg = madm.dplg_timestep

        def recording_dplg(step, t0, t_end):
            t = dplg(step, t0, t_end)
            now.update(step=step, t=t)
            return t
        madm.dplg_timestep = recording_dplg
        forward = madm.Student.forward

        def probing_forward(self, z0, t=0, seg=None):
            if seg is None:                                   # student / evaluation pass: untouched
                return forward(self, z0, t, seg)
            rng = torch.get_rng_state()                       # the teacher pass as the step runs it (t > 0)
            out = forward(self, z0, t, seg)
            if t == 0:                                        # after DPLG: both teachers are the same pass
                logits0 = out[0]
            else:                                             # same teacher, same dropout draw, at t = 0
                rng_after = torch.get_rng_state()
                buffers = {k: b.clone() for k, b in seg.named_buffers()}   # BN statistics of the EMA head
                torch.set_rng_state(rng)
                logits0 = forward(self, z0, 0, seg)[0]
                for k, b in seg.named_buffers():
                    b.copy_(buffers[k])
                torch.set_rng_state(rng_after)                # the step goes on exactly as without the probe
            y = labels.pop(0)                                 # (b, H, W) ground truth of this target crop
            K = out[0].shape[1]
            p_t, y_t = torch.softmax(out[0].float(), 1).max(1)
            y_0 = logits0.float().argmax(1)
            valid = y != 255
            n = int(valid.sum())
            quarter = min(3, 4 * now["step"] // max(run_iters[0], 1))
            for key, pred in (("t", y_t), ("0", y_0)):
                c = metrics.confusion_matrix(pred, y, K)
                confs[(quarter, key)] = confs.get((quarter, key), 0) + c
            steps.append({"step": now["step"], "t": now["t"], "pixels": n,
                          "acc_t": float((y_t == y)[valid].float().mean()) if n else math.nan,
                          "acc_0": float((y_0 == y)[valid].float().mean()) if n else math.nan,
                          "changed": float((y_t != y_0).float().mean()),
                          "confident_t": float((p_t >= threshold[0]).float().mean())})
            return out
        madm.Student.forward = probing_forward
    args = cli.parse_args(madm.Args, argv)
    run_iters, threshold = [args.iters], [madm.DEMO["pseudo_threshold"] if args.demo else args.pseudo_threshold]
    res = madm.main(args)
    out = {"miou": float(res["miou"]), "lplr_weights": list(madm.task_settings(
        cli.replace_defaults(args, **madm.DEMO) if args.demo else args)[2])}
    if probe:
        assert not labels, "every recorded target crop was seen by the teacher"
        quarters = []
        for qi in range(4):
            rows = [s for s in steps if min(3, 4 * s["step"] // args.iters) == qi]
            if not rows:
                continue
            conf_t, conf_0 = confs[(qi, "t")], confs[(qi, "0")]
            quarters.append({"steps": f"{min(r['step'] for r in rows)}-{max(r['step'] for r in rows)}",
                             "mean_t": mean(r["t"] for r in rows),
                             "acc_t": float(np.trace(conf_t) / conf_t.sum()),
                             "acc_0": float(np.trace(conf_0) / conf_0.sum()),
                             "miou_t": metrics.mean_iou(conf_t), "miou_0": metrics.mean_iou(conf_0),
                             "changed": mean(r["changed"] for r in rows),
                             "confident_t": mean(r["confident_t"] for r in rows)})
        active = [s for s in steps if s["t"] > 0]
        out.update(dplg_quarters=quarters, dplg_steps=steps, dplg_active={
            "micro_steps": len(active), "acc_t": mean(s["acc_t"] for s in active),
            "acc_0": mean(s["acc_0"] for s in active), "changed": mean(s["changed"] for s in active)})
    return out


def child_ptdiffseg(argv: list) -> dict:
    """PTDiffSeg run; its final evaluations also score every other scene prompt (and prompt 0 vs TTDA's)."""
    import torch

    import ptdiffseg
    from common import cli
    slide = ptdiffseg.slide_logits
    n_prompts = len(ptdiffseg.SCENE_PROMPTS)
    per_prompt = {k: {"kl": [], "changed": []} for k in range(1, n_prompts)}   # prompt k vs prompt 0
    ttda_vs_0 = {"kl": [], "changed": []}                                       # TTDA prompt vs prompt 0

    def compare(ref: torch.Tensor, other: torch.Tensor, into: dict) -> None:
        """Mean per-pixel KL(p_ref || p_other) and share of pixels whose argmax differs; logits (1, K, H, W)."""
        lr, lo = ref.float().log_softmax(1), other.float().log_softmax(1)
        into["kl"].append(float((lr.exp() * (lr - lo)).sum(1).mean()))
        into["changed"].append(float((lr.argmax(1) != lo.argmax(1)).float().mean()))

    def probing_slide(run, x, scene):
        out = slide(run, x, scene)
        pool = run.model.scene_pool                                              # (P, d)
        if torch.equal(scene, pool[:1]):                                         # the neutral prompt's eval
            for k in range(1, n_prompts):
                compare(out, slide(run, x, pool[k:k + 1]), per_prompt[k])
        else:                                                                    # the TTDA prompt's eval
            compare(slide(run, x, pool[:1]), out, ttda_vs_0)
        return out
    ptdiffseg.slide_logits = probing_slide
    args = cli.parse_args(ptdiffseg.Args, argv)
    res = ptdiffseg.main(args)
    prompts = [{"k": k, "prompt": ptdiffseg.SCENE_PROMPTS[k], "kl": mean(v["kl"]),
                "changed": mean(v["changed"]), "images": len(v["kl"])} for k, v in per_prompt.items()]
    out = {"miou": float(res.get("miou_before_ttda", res["miou"])), "prompts": prompts,
           "kl_mean": mean(p["kl"] for p in prompts), "changed_mean": mean(p["changed"] for p in prompts),
           "kl_max": max(p["kl"] for p in prompts), "changed_max": max(p["changed"] for p in prompts)}
    if res.get("ttda"):
        rec = next(iter(res["ttda"].values()))
        out["ttda"] = {k: rec[k] for k in ("miou_before", "miou_after", "delta", "steps", "stepped",
                                           "mean_kept", "s_change")}
        out["ttda"].update(kl_vs_prompt0=mean(ttda_vs_0["kl"]), changed_vs_prompt0=mean(ttda_vs_0["changed"]))
    return out


def child_diff(argv: list) -> dict:
    """DIFF run: per-step CE of both branches; after training both branches scored on the target eval set."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import diff
    from common import cli, datasets, metrics
    per_step: list = []
    final: dict = {}
    ipkl = diff.ipkl_loss

    def recording_ipkl(logits_cond, logits_uncond, y, weight=1.0):
        loss, logs = ipkl(logits_cond, logits_uncond, y, weight)
        per_step.append(dict(logs))                      # loss_ce_cond, loss_ce_uncond, loss_mse
        return loss, logs
    diff.ipkl_loss = recording_ipkl
    evaluate = diff.evaluate

    @torch.no_grad()
    def both_branches(model, extractor, sets, args, dist, precision) -> dict:
        """CE (valid pixels), pixel accuracy and mIoU of each branch on every target eval image: the script's
        protocol (bilinear resize to the eval size, pad to 64, metric at the native label size); the
        conditional branch is steered by the image's own ground-truth class masks (as in training)."""
        model.eval()
        res = {}
        for ds in sets:
            gen = torch.Generator(dist.device).manual_seed(args.seed)
            K = ds.num_classes
            acc = {b: {"ce": [], "conf": np.zeros((K, K), np.int64)} for b in ("uncond", "cond")}
            prompted = 0
            for i in range(len(ds)):
                item = ds[i]
                label = np.asarray(item["label"])
                x = item["image"][None].to(dist.device)
                x = metrics.resize_image(x, datasets.eval_input_size(ds.name, tuple(x.shape[-2:]), 1 / 8))
                h, w = x.shape[-2:]
                y_in = torch.as_tensor(metrics.resize_label(label, (w, h)))          # label at the input size
                ph, pw = (-h) % 64, (-w) % 64
                xp = F.pad(x * 2 - 1, (0, pw, 0, ph))                              # 0 in [-1, 1], as mmseg
                yp = F.pad(y_in, (0, pw, 0, ph), value=255)[None].to(dist.device)  # (1, H', W')
                prompted += int(any(bool((y_in == c).any()) for c in extractor.prompt_ids))
                feats = extractor(xp, yp, generator=gen, branches=("uncond", "cond"))
                target = torch.as_tensor(label)[None]
                for b in ("uncond", "cond"):
                    with precision.autocast():
                        lg = model.forward_branch(feats[b]).float()[..., : math.ceil(h / 4), : math.ceil(w / 4)]
                    lg = F.interpolate(lg, size=label.shape, mode="bilinear", align_corners=False).cpu()
                    if (target != 255).any():
                        acc[b]["ce"].append(float(F.cross_entropy(lg, target, ignore_index=255)))
                    acc[b]["conf"] += metrics.confusion_matrix(lg.argmax(1), target, K)
            res[ds.name] = {b: {"ce": mean(v["ce"]), "pixel_acc": float(np.trace(v["conf"]) / v["conf"].sum()),
                                "miou": metrics.mean_iou(v["conf"])} for b, v in acc.items()}
            res[ds.name]["images_with_prompt_class"] = prompted
            res[ds.name]["images"] = len(ds)
        model.train()
        return res

    def probing_evaluate(model, extractor, sets, args, dist, precision, step, out):
        r = evaluate(model, extractor, sets, args, dist, precision, step, out)
        if step == args.iters and not args.baseline:
            final.update(both_branches(model, extractor, sets, args, dist, precision))
            final["prompt_classes"] = [datasets.CLASS_SETS[model.head.conv_seg.out_channels][c]
                                       for c in extractor.prompt_ids]
        return r
    diff.evaluate = probing_evaluate
    args = cli.parse_args(diff.Args, argv)
    res = diff.main(args)
    n = len(per_step)
    w = max(1, n // 6)                                    # first and last sixth of training
    window = lambda rows: {k: mean(r[k] for r in rows) for k in ("loss_ce_cond", "loss_ce_uncond",  # noqa
                                                                  "loss_mse")}
    return {"miou": float(res["miou"]), "train_all": window(per_step), "train_first": window(per_step[:w]),
            "train_last": window(per_step[-w:]), "window_steps": w, "eval_branches": final,
            "per_step": per_step}


def child_iccld(argv: list) -> dict:
    """ICCLD run: the stage-2 discriminator's outputs on source / mixed / target x0_hat at each of its updates."""
    import torch

    import iccld
    from common import cli
    args = cli.parse_args(iccld.Args, argv)
    B = args.batch_size
    per_step: list = []
    unet_ref: dict = {}
    widen = iccld.widen_conv_in

    def recording_widen(unet, extra=4):
        unet_ref["unet"] = widen(unet, extra)             # eps_theta of stage 2 (its conv_in reads cat(z_t, z0))
        return unet_ref["unet"]
    iccld.widen_conv_in = recording_widen
    make_disc = iccld.discriminator

    def hook(module, inputs, out):
        x = inputs[0]
        if x.shape[0] != 3 * B:                           # the generator term sees mixed + target only
            return
        with torch.no_grad():                             # the discriminator update: source | mixed | target
            d = out.float()
            src, mix, tgt = d[:B], d[B:2 * B], d[2 * B:]
            per_step.append({
                "d_src": float(src.mean()), "d_mix": float(mix.mean()), "d_tgt": float(tgt.mean()),
                "acc_src_vs_tgt": float(((src > 0.5).float().mean() + (tgt < 0.5).float().mean()) / 2),
                "mu_src": x[:B].float().mean((0, 2, 3)).tolist(),      # channel means (4,) of each domain
                "mu_tgt": x[2 * B:].float().mean((0, 2, 3)).tolist(),
                "x0_std": float(x.float().std()),
                "cond_weight_norm": float(unet_ref["unet"].conv_in.weight[:, 4:].norm())})

    def recording_disc(*a, **k):
        d = make_disc(*a, **k)
        d.register_forward_hook(hook)
        return d
    iccld.discriminator = recording_disc
    res = iccld.main(args)

    def window(rows):
        if not rows:
            return {}
        mu_s = [mean(r["mu_src"][c] for r in rows) for c in range(4)]   # window-mean latent per channel
        mu_t = [mean(r["mu_tgt"][c] for r in rows) for c in range(4)]
        gap = math.sqrt(sum((a - b) ** 2 for a, b in zip(mu_s, mu_t)))
        out = {k: mean(r[k] for r in rows) for k in ("d_src", "d_mix", "d_tgt", "acc_src_vs_tgt", "x0_std",
                                                      "cond_weight_norm")}
        return dict(out, latent_mean_gap=gap, steps=len(rows))
    n = len(per_step)
    w = max(1, n // 6)
    return {"miou": float(res["miou"]), "miou_direct": res.get("miou_direct"), "first": window(per_step[:w]),
            "last": window(per_step[-w:]), "disc_updates": n,
            "per_step": [{k: v for k, v in r.items() if not k.startswith("mu_")} for r in per_step]}


def child(name: str, variant: str, argv: list) -> dict:
    if name == "MADM":
        return child_madm(argv, probe=variant == "dplg-probe")
    if name == "PTDiffSeg":
        return child_ptdiffseg(argv)
    if name == "DIFF":
        return child_diff(argv)
    if name == "ICCLD":
        return child_iccld(argv)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------
def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def f3(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report(runs: list, meta: dict) -> str:
    """Markdown: one section per method, every row with the run it comes from (commands at the end)."""
    by = lambda m, v: sorted([r for r in runs if r["method"] == m and r["variant"] == v],  # noqa: E731
                             key=lambda r: r["seed"])
    w = meta["weights"]
    lines = ["# Mechanism checks on the miniature SD", "",
             f"Weights: --sd-model {w['sd_model']}" + (f", pretraining smoke={w['smoke']} (sha1 "
                                                       f"{w['pretraining_sha1']})" if "smoke" in w else "")
             + (" — PLACEHOLDER WEIGHTS, not the real pretrained mini SD" if w.get("smoke") else "")
             + f". Seeds {meta['seeds']}; synthetic sample {meta['sample']}. Wall-clock {meta['wall_min']:.1f} "
             f"min, 2 runs at a time, 1 thread each (summed CPU time of the runs "
             f"{sum(r.get('cpu_seconds', 0) for r in runs) / 60:.1f} min). Command: `{meta['command']}`."
             + (" SMOKE RUN (a few steps): plumbing only." if meta["smoke"] else "")
             + ("" if meta.get("complete", True) else f" PARTIAL: {meta['runs_done']} runs finished."), ""]
    # ---- MADM
    probe, off = by("MADM", "dplg-probe"), by("MADM", "lplr-off")
    if probe or off:
        lines += ["## MADM (cityscapes -> dsec_event, 400 steps)", "",
                  "DPLG: the EMA teacher's pseudo labels on the target crops the step receives, at the DPLG "
                  "timestep (t > 0 until step 320) vs the same teacher at t = 0, against the crops' ground truth.",
                  "", "| seed | steps | mean t | pixel acc t>0 | pixel acc t=0 | mIoU t>0 | mIoU t=0 | "
                  "labels changed by noise | share p_max >= 0.3 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in probe:
            for q in r["dplg_quarters"]:
                lines.append(f"| {r['seed']} | {q['steps']} | {q['mean_t']:.1f} | {pct(q['acc_t'])} | "
                             f"{pct(q['acc_0'])} | {pct(q['miou_t'])} | {pct(q['miou_0'])} | "
                             f"{pct(q['changed'])} | {pct(q['confident_t'])} |")
            a = r["dplg_active"]
            lines.append(f"| {r['seed']} | all t>0 ({a['micro_steps']} crops) | | {pct(a['acc_t'])} | "
                         f"{pct(a['acc_0'])} | | | {pct(a['changed'])} | |")
        lines += ["", "LPLR: target mIoU with the task's LPLR weights vs `--lplr-weights 0` (same seed, "
                  "same steps).",
                  "", "| seed | mIoU LPLR on | mIoU LPLR off | difference |", "|---|---|---|---|"]
        for s in sorted({r["seed"] for r in probe} & {r["seed"] for r in off}):
            on = next(r for r in probe if r["seed"] == s)["miou"]
            no = next(r for r in off if r["seed"] == s)["miou"]
            lines.append(f"| {s} | {pct(on)} (weights {next(r for r in probe if r['seed'] == s)['lplr_weights']}) "
                         f"| {pct(no)} | {100 * (on - no):+.2f} |")
        lines.append("")
    # ---- PTDiffSeg
    full, base = by("PTDiffSeg", "full"), by("PTDiffSeg", "baseline")
    if full or base:
        lines += ["## PTDiffSeg (gta5 -> cityscapes, 300 steps + 60 TTDA steps)", "",
                  "Scene-prompt sensitivity of the trained model on the 24 target eval images: mean per-pixel "
                  "KL(p_prompt0 || p_prompt_k) and share of pixels whose class changes, over the 11 other scene "
                  "prompts (mean and max over prompts).", "",
                  "| variant | seed | target mIoU (prompt 0) | KL mean | KL max | changed mean | changed max |",
                  "|---|---|---|---|---|---|---|"]
        for r in full + base:
            lines.append(f"| {r['variant']} | {r['seed']} | {pct(r['miou'])} | {r['kl_mean']:.2e} | "
                         f"{r['kl_max']:.2e} | {pct(r['changed_mean'])} | {pct(r['changed_max'])} |")
        if full:
            lines += ["", "Per prompt (full variant, seed " + str(full[0]["seed"]) + "): " + "; ".join(
                f"\"{p['prompt'] or '(empty)'}\" KL {p['kl']:.2e}, {pct(p['changed'])}% px"
                for p in full[0]["prompts"]), "",
                "TTDA (scene token tuned on target train crops):", "",
                "| seed | mIoU before | mIoU after | delta | steps with a loss | mean kept px | ||s - s0|| | "
                "KL vs prompt 0 | px changed vs prompt 0 |", "|---|---|---|---|---|---|---|---|---|"]
            for r in full:
                t = r.get("ttda") or {}
                if t:
                    lines.append(f"| {r['seed']} | {pct(t['miou_before'])} | {pct(t['miou_after'])} | "
                                 f"{100 * t['delta']:+.2f} | {t['stepped']}/{t['steps']} | {f3(t['mean_kept'])} | "
                                 f"{t['s_change']:.4f} | {t['kl_vs_prompt0']:.2e} | "
                                 f"{pct(t['changed_vs_prompt0'])} |")
        lines.append("")
    # ---- DIFF
    d = by("DIFF", "full")
    if d:
        lines += ["## DIFF (gta5 -> cityscapes, 300 steps)", "",
                  "Training (source crops): CE of the conditional (IPKL) and unconditional branch, and their "
                  "MSE, mean over the first / last sixth of the steps and over all steps.", "",
                  "| seed | window | CE cond | CE uncond | MSE(cond, uncond) |", "|---|---|---|---|---|"]
        for r in d:
            for win in ("train_first", "train_last", "train_all"):
                x = r[win]
                lines.append(f"| {r['seed']} | {win[6:]} | {f3(x['loss_ce_cond'])} | {f3(x['loss_ce_uncond'])} | "
                             f"{x['loss_mse']:.4f} |")
        lines += ["", "Target eval images after training (cond branch steered by each image's ground-truth masks "
                  "of the prompt classes; the script evaluates uncond only):", "",
                  "| seed | branch | CE | pixel acc | mIoU | images with a prompt class |",
                  "|---|---|---|---|---|---|"]
        for r in d:
            for tgt, e in r["eval_branches"].items():
                if not isinstance(e, dict):
                    continue
                for b in ("cond", "uncond"):
                    lines.append(f"| {r['seed']} | {b} | {f3(e[b]['ce'])} | {pct(e[b]['pixel_acc'])} | "
                                 f"{pct(e[b]['miou'])} | {e['images_with_prompt_class']}/{e['images']} |")
            lines.append(f"| {r['seed']} | script's eval (uncond) | | | {pct(r['miou'])} | |")
        lines.append("")
    # ---- ICCLD
    ic = by("ICCLD", "full")
    if ic:
        lines += ["## ICCLD (gta5 -> cityscapes, 400 + 120 steps)", "",
                  "Stage-2 discriminator at its own updates (LSGAN targets: source 1, mixed/target 0), first vs "
                  "last sixth of stage 2; latent gap = distance between the window-mean channel means of the "
                  "source and target x0_hat (x0_hat std for scale); cond |W| = norm of conv_in's condition "
                  "weights (zero-initialised).", "",
                  "| seed | window | D(src) | D(mix) | D(tgt) | domain acc | latent gap | x0_hat std | cond |W| |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ic:
            for win in ("first", "last"):
                x = r[win]
                if x:
                    lines.append(f"| {r['seed']} | {win} {x['steps']} | {x['d_src']:.3f} | {x['d_mix']:.3f} | "
                                 f"{x['d_tgt']:.3f} | {pct(x['acc_src_vs_tgt'])} | {x['latent_mean_gap']:.4f} | "
                                 f"{x['x0_std']:.3f} | {x['cond_weight_norm']:.4f} |")
            lines.append(f"| {r['seed']} | final mIoU (diffusion path / direct D(E(x))) | {pct(r['miou'])} / "
                         f"{pct(r['miou_direct'])} | | | | | | |")
        lines.append("")
    lines += ["## Runs", "", "Each run is the script's main() in a child process "
              "(`python benchmarks/mechanisms.py --child METHOD VARIANT -- <script flags>`), i.e. the "
              "command:", ""]
    for r in runs:
        lines.append(f"- {r['method']} {r['variant']} seed {r['seed']} ({r['seconds']:.0f} s wall, "
                     f"{r.get('cpu_seconds', math.nan):.0f} s CPU): "
                     f"`python {METHODS[r['method']]['script']} {' '.join(r['argv'])}`")
    return "\n".join(lines) + "\n"


def run_job(job: tuple, a, data: Path, work: Path) -> dict:
    name, variant, extra, seed = job
    out_dir = work / "runs" / f"{name}-{variant}-seed{seed}"
    result_file = work / "results" / f"{name}-{variant}-seed{seed}.json"
    argv = script_argv(name, seed, str(data), str(out_dir), a.sd_model, extra, a.smoke)
    weights = weights_info(a.sd_model)
    if a.reuse and result_file.exists():
        r = json.loads(result_file.read_text())
        if r.get("weights") == weights and r.get("argv") == argv:
            return r
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", name, variant, "--", *argv], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{name} {variant} seed {seed} failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.split("RESULT ")[-1])
    r.update(method=name, variant=variant, seed=seed, argv=argv, weights=weights, seconds=time.time() - t)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(r))
    return r


def main(argv: list | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:                      # --child METHOD VARIANT -- <script flags>
        name, variant, script_flags = argv[1], argv[2], argv[4:]
        sys.argv = [METHODS[name]["script"], *script_flags]
        res = child(name, variant, script_flags)
        res["cpu_seconds"] = time.process_time()        # CPU time of this run (machine load aside)
        print("RESULT " + json.dumps(res))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="MADM,PTDiffSeg,DIFF,ICCLD", help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1")
    p.add_argument("--sd-model", default="mini")
    p.add_argument("--work", default="runs/mechanisms", help="sample, run folders, per-run results")
    p.add_argument("--out", default="benchmarks/results", help="where mechanisms[-smoke].md / .json go")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep finished runs with the same weights and flags")
    p.add_argument("--smoke", action="store_true", help="a few steps per run: checks the plumbing only")
    a = p.parse_args(argv)
    from common.synthetic import write_synthetic_sample
    t0 = time.time()
    sample = dict(SAMPLE, seed=0, shift=1.0)
    work = Path(a.work)
    data = work / f"synthetic-seed{sample['seed']}-shift{sample['shift']:g}"
    if not (data / "SYNTHETIC").exists() or {k: v for k, v in json.loads((data / "SYNTHETIC").read_text())
                                              .items() if k in sample} != sample:
        write_synthetic_sample(data, **sample)
    names = a.methods.split(",")
    jobs = [(n, v, e, s) for s in range(a.seeds) for n, v, e in JOBS if n in names]
    order = {(n, v): i for i, (n, v, _) in enumerate(JOBS)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "mechanisms" + ("-smoke" if a.smoke else "")
    runs: list = []

    def write(done: bool) -> str:
        """The report of the runs finished so far (rewritten after each run: a partial one survives a stop)."""
        runs.sort(key=lambda r: (order[(r["method"], r["variant"])], r["seed"]))
        meta = {"weights": weights_info(a.sd_model), "seeds": list(range(a.seeds)), "sample": sample,
                "wall_min": (time.time() - t0) / 60, "smoke": a.smoke, "complete": done,
                "runs_done": f"{len(runs)} of {len(jobs)}",
                "command": "python benchmarks/mechanisms.py " + " ".join(argv)}
        text = report(runs, meta)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        return text
    with cf.ThreadPoolExecutor(a.workers) as pool:
        futs = {pool.submit(run_job, j, a, data, work): j for j in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            runs.append(r)
            print(f"{r['method']:9s} {r['variant']:10s} seed {r['seed']} | mIoU {pct(r['miou'])} | "
                  f"{r['seconds']:.0f} s", flush=True)
            write(done=len(runs) == len(jobs))
    print(write(done=True))


if __name__ == "__main__":
    main()
