"""Adaptation on the synthetic shift: every method against its paper's baseline row, several seeds, on the CPU.

What it answers: does the adaptation part of each method (MADM's self-training with DPLG and LPLR, ICCLD's two
adaptation stages, PTDiffSeg's prompt randomization and test-time prompt tuning, DIFF's IPKL branch) raise the
target mIoU over the same script run as its baseline (`--source-only` / `--baseline`) with the same steps, crop,
data and seed? It writes a larger synthetic sample than the demo's (so that a target mIoU is not decided by a
handful of pixels), trains each method and its baseline for every seed, and writes

    <out>/adaptation_<sd>[_<tag>].csv   one row per run (method, variant, seed, target mIoU, seconds)
    <out>/adaptation_<sd>[_<tag>].md    the table: target mIoU mean +- std (over seeds), the gain, the verdict
    <out>/adaptation_<sd>[_<tag>].png   the same as a bar chart (Pillow only)

Settings are the scripts' `--demo` settings (1/8-size synthetic data, crop 64) with more steps, on `--sd-model`:
`mini` (pretrained on the synthetic world, common/mini_sd.py) or `tiny` (random weights). Every run is a separate
process, two at a time with one thread each. The numbers say whether the mechanism acts on this shift with a
miniature backbone, nothing about the papers' numbers.

    python benchmarks/adaptation.py                      # the README run on mini (3 seeds)
    python benchmarks/adaptation.py --sample-seed 7 --shift 0.8 --seeds 1 --tag heldout   # a second sample
    python benchmarks/adaptation.py --sd-model tiny      # the same on the random tiny SD, for comparison
    python benchmarks/adaptation.py --smoke              # 1 seed, 3 steps per run: checks that it runs
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One entry per compared pair. `full` and `base` are the extra flags of the two variants; `iters` the steps of both
# (for ICCLD: stage 1 and stage 2); `read` names how the target mIoU is read from the run's metrics.json.
METHODS = {
    "MADM": dict(script="madm.py", src="cityscapes", tgt="dsec_event", iters=["--iters", "400"],
                 full=[], base=["--source-only"], read="madm"),
    "ICCLD": dict(script="iccld.py", src="gta5", tgt="cityscapes",
                  iters=["--iters", "400", "--iters-stage2", "120"], full=[], base=["--source-only"], read="iccld"),
    "PTDiffSeg": dict(script="ptdiffseg.py", src="gta5", tgt="cityscapes",
                      iters=["--iters", "300", "--ttda-steps", "60"], full=[], base=["--baseline"],
                      read="ptdiffseg"),
    "DIFF": dict(script="diff.py", src="gta5", tgt="cityscapes", iters=["--iters", "300"], full=[],
                 base=["--baseline"], read="diff"),
}
SAMPLE = dict(n_train=48, n_eval=24)  # 48 train / 24 eval images per dataset (generator seed and shift: flags)


def read_miou(kind: str, out: Path) -> dict[str, float]:
    """Target mIoU(s) of one finished run from its metrics.json: {"miou": ...} (+ "miou_ttda" for PTDiffSeg)."""
    m = json.loads((out / "metrics.json").read_text())
    evals = [e for e in m.get("evals", []) if isinstance(e, dict) and e.get("miou") is not None]
    if kind == "iccld":
        return {"miou": float(m["final"]["miou"])}
    if kind == "ptdiffseg":
        src = [e for e in evals if e.get("prompt", "source prompt") == "source prompt"]
        res = {"miou": float(src[-1]["miou"])}
        ttda = m.get("ttda") or {}
        if ttda:
            res["miou_ttda"] = float(next(iter(ttda.values()))["miou_after"])
        return res
    return {"miou": float(evals[-1]["miou"])}


def run_one(name: str, variant: str, seed: int, data: Path, out_root: Path, smoke: bool, sd_model: str) -> dict:
    cfg = METHODS[name]
    out = out_root / "runs" / f"{name}-{variant}-seed{seed}"
    iters = ["--iters", "3"] + (["--iters-stage2", "2"] if name == "ICCLD" else []) + \
        (["--ttda-steps", "2"] if name == "PTDiffSeg" else []) if smoke else cfg["iters"]
    cmd = [sys.executable, cfg["script"], "--demo", "--src", cfg["src"], "--tgt", cfg["tgt"],
           "--data-root", str(data), "--seed", str(seed), "--out", str(out), "--sd-model", sd_model, *iters,
           "--eval-every", "100000", "--ckpt-every", "0", "--log-every", "50",
           *(cfg["full"] if variant == "full" else cfg["base"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    sec = time.time() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return {"method": name, "variant": variant, "seed": seed, "seconds": round(sec, 1),
            **read_miou(cfg["read"], out), "command": " ".join(cmd[1:])}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: baseline and adapted mean +- std over seeds, gain, and whether gain > 2 x the larger std.
    PTDiffSeg gets two adapted rows: prompt randomization (before TTDA) and + TTDA (after)."""
    out = []
    for name in METHODS:
        runs = [r for r in rows if r["method"] == name]
        if not runs:
            continue
        base = [100 * r["miou"] for r in runs if r["variant"] == "base"]
        arms = [("adapted", [100 * r["miou"] for r in runs if r["variant"] == "full"])]
        if name == "PTDiffSeg":
            arms = [("prompt randomization", arms[0][1]),
                    ("+ TTDA", [100 * r["miou_ttda"] for r in runs if r["variant"] == "full" and "miou_ttda" in r])]
        for arm, xs in arms:
            if not xs or not base:
                continue
            (mb, sb), (ma, sa) = mean_std(base), mean_std(xs)
            gain = ma - mb
            out.append(dict(method=name, arm=arm, seeds=len(xs), base_mean=mb, base_std=sb, mean=ma, std=sa,
                            gain=gain, clear=gain > 2 * max(sb, sa)))
    return out


def table(summary: list[dict]) -> str:
    lines = ["| method | adaptation | seeds | baseline mIoU | adapted mIoU | gain | gain > 2 std |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['arm']} | {s['seeds']} | {s['base_mean']:.2f} ± {s['base_std']:.2f} | "
                     f"{s['mean']:.2f} ± {s['std']:.2f} | {s['gain']:+.2f} | {'yes' if s['clear'] else 'no'} |")
    return "\n".join(lines)


def chart(summary: list[dict], path: Path) -> None:
    """Grouped bars (baseline grey, adapted blue) with +-1 std whiskers and the gain printed above each pair."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    W, H, left, bottom, top = 140 * max(len(summary), 1) + 120, 420, 70, 80, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vmax = max([s["mean"] + s["std"] for s in summary] + [s["base_mean"] + s["base_std"] for s in summary]
               + [1.0])
    vmax = 10 * math.ceil(vmax / 10)
    y = lambda v: H - bottom - (H - bottom - top) * v / vmax  # noqa: E731
    for v in range(0, int(vmax) + 1, max(5, int(vmax) // 6 // 5 * 5 or 5)):
        d.line([(left, y(v)), (W - 20, y(v))], fill=(225, 225, 225))
        d.text((left - 8, y(v)), f"{v}", fill="black", font=small, anchor="rm")
    d.text((left - 50, top - 30), "target mIoU (%), mean ± std over seeds", fill="black", font=font)
    for k, s in enumerate(summary):
        x0 = left + 30 + 140 * k
        for j, (m, sd, colour) in enumerate(((s["base_mean"], s["base_std"], (160, 160, 160)),
                                             (s["mean"], s["std"], (60, 110, 200)))):
            xa, xb = x0 + 45 * j, x0 + 45 * j + 38
            d.rectangle([xa, y(m), xb, y(0)], fill=colour)
            xm = (xa + xb) / 2
            d.line([(xm, y(m - sd)), (xm, y(m + sd))], fill="black", width=2)
            for yy in (y(m - sd), y(m + sd)):
                d.line([(xm - 6, yy), (xm + 6, yy)], fill="black", width=2)
        d.text((x0 + 41, y(max(s["mean"] + s["std"], s["base_mean"] + s["base_std"])) - 14),
               f"{s['gain']:+.1f}", fill=(0, 120, 0) if s["clear"] else (170, 0, 0), font=font, anchor="mm")
        d.text((x0 + 41, H - bottom + 14), s["method"], fill="black", font=font, anchor="mm")
        d.text((x0 + 41, H - bottom + 34), s["arm"], fill="black", font=small, anchor="mm")
    d.rectangle([left, H - 26, left + 14, H - 12], fill=(160, 160, 160))
    d.text((left + 20, H - 19), "baseline row (--source-only / --baseline)", fill="black", font=small, anchor="lm")
    d.rectangle([left + 330, H - 26, left + 344, H - 12], fill=(60, 110, 200))
    d.text((left + 350, H - 19), "adapted (the method)", fill="black", font=small, anchor="lm")
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="where the CSV, table and chart go")
    p.add_argument("--work", default="runs/adaptation", help="where the sample and the run folders go")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--sd-model", default="mini", help="mini (pretrained miniature) or tiny (random weights)")
    p.add_argument("--sample-seed", type=int, default=0, help="generator seed of the synthetic sample")
    p.add_argument("--shift", type=float, default=1.0, help="style shift of the synthetic sample, 0..1")
    p.add_argument("--tag", default="", help="suffix of the output names (e.g. heldout)")
    p.add_argument("--smoke", action="store_true", help="1 seed, 3 steps per run: checks the plumbing only")
    a = p.parse_args(argv)
    from common.synthetic import write_synthetic_sample
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = dict(SAMPLE, seed=a.sample_seed, shift=a.shift)
    data = Path(a.work) / f"synthetic-seed{a.sample_seed}-shift{a.shift:g}"
    work = Path(a.work) / f"{a.sd_model}-seed{a.sample_seed}-shift{a.shift:g}"
    t0 = time.time()
    if not (data / "SYNTHETIC").exists() or {k: v for k, v in json.loads((data / "SYNTHETIC").read_text()).items()
                                              if k in sample} != sample:
        write_synthetic_sample(data, **sample)
    names = a.methods.split(",")
    seeds = [0] if a.smoke else list(range(a.seeds))
    jobs = [(n, v, s) for n in names for s in seeds for v in ("base", "full")]
    rows = []
    with cf.ThreadPoolExecutor(a.workers) as pool:
        futs = {pool.submit(run_one, n, v, s, data, work, a.smoke, a.sd_model): (n, v, s) for n, v, s in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            rows.append(r)
            print(f"{r['method']:9s} {r['variant']:4s} seed {r['seed']} | mIoU {100 * r['miou']:.2f}"
                  + (f" | after TTDA {100 * r['miou_ttda']:.2f}" if "miou_ttda" in r else "")
                  + f" | {r['seconds']:.0f} s", flush=True)
    rows.sort(key=lambda r: (names.index(r["method"]), r["variant"], r["seed"]))
    suffix = f"_{a.sd_model}" + (f"_{a.tag}" if a.tag else "") + ("-smoke" if a.smoke else "")
    with open(out / f"adaptation{suffix}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "variant", "seed", "miou", "miou_ttda", "seconds", "command"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in w.fieldnames})
    summary = summarize(rows)
    wall = time.time() - t0
    cpu = sum(r["seconds"] for r in rows)
    text = (table(summary) + f"\n\n{len(rows)} runs, {len(seeds)} seed(s), --sd-model {a.sd_model}, synthetic "
            f"sample seed {a.sample_seed} shift {a.shift:g}, wall-clock {wall / 60:.1f} min, "
            f"summed run time {cpu / 60:.1f} min ({a.workers} at a time, 1 thread each).\n")
    (out / f"adaptation{suffix}.md").write_text(text)
    chart(summary, out / f"adaptation{suffix}.png")
    print(text)


if __name__ == "__main__":
    main()
