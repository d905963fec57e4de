"""One-command GPU check: every method's demo on CUDA in two precisions, then one training step of each paper
setting measured (`--profile`) next to its prediction (`--estimate-memory`), as one JSON file and a README table.

Run it first thing whenever a GPU is available (`bash benchmarks/gpu_check.sh`); it is planned to finish in under
8 minutes on one recent GPU. `--dry-run` runs the same sequence on the CPU at tiny sizes (tiny SD, crop 64,
one step; the demos in precision auto only), which the test suite does, so the script cannot break unseen.

Outputs (default `benchmarks/results/`): `gpu_check.json` (every command, its exit code, wall time and parsed
result) and `gpu_check.md` (the table for the README, with GPU model, date and commit).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper setting of each training step (random weights of the real architectures; nothing downloaded).
PAPER = [
    ("MADM", "madm.py", ["--sd-model", "random-sd15", "--crop-size", "512"]),
    ("PTDiffSeg", "ptdiffseg.py", ["--sd-model", "random-sd15", "--crop-size", "512"]),
    ("DIFF", "diff.py", ["--sd-model", "random-sd21", "--crop-size", "512"]),
    ("ICCLD stage 1", "iccld.py", ["--sd-model", "random-sd15", "--crop-size", "512", "--stage", "1"]),
    ("ICCLD stage 2", "iccld.py", ["--sd-model", "random-sd15", "--crop-size", "512", "--stage", "2"]),
]
DEMOS = [("MADM", "madm.py"), ("PTDiffSeg", "ptdiffseg.py"), ("DIFF", "diff.py"), ("ICCLD", "iccld.py")]
# --dry-run: two steps of every loop a demo runs (ICCLD's two stages, PTDiffSeg's training and TTDA)
DRY_DEMO = {"madm.py": [], "ptdiffseg.py": ["--ttda-steps", "2"], "diff.py": [], "iccld.py": ["--iters-stage2", "2"]}


def tiny(flags: list[str]) -> list[str]:
    """--dry-run: the same command at tiny sizes (tiny SD, crop 64)."""
    out, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
            continue
        if f in ("--sd-model", "--crop-size"):
            out += [f, "tiny" if f == "--sd-model" else "64"]
            skip = True
        else:
            out.append(f)
    return out


def run(cmd: list[str], env: dict) -> dict:
    t = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    res = {"command": "python " + " ".join(cmd), "returncode": r.returncode, "seconds": round(time.time() - t, 1)}
    for line in reversed(r.stdout.splitlines()):  # the JSON line of --profile / --estimate-memory
        try:
            res["result"] = json.loads(line)
            break
        except ValueError:
            continue
    if r.returncode != 0:
        res["stderr"] = r.stderr[-2000:]
    return res


def gpu_name(device: str) -> str:
    if device == "cpu":
        return "CPU (dry run)"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU at tiny sizes")
    p.add_argument("--out", default="benchmarks/results", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--work", default="runs/gpu_check", help="run folders of the demos")
    p.add_argument("--profile-iters", type=int, default=3)
    a = p.parse_args(argv)
    dry = a.dry_run
    device = "cpu" if dry else "cuda"
    env = dict(os.environ)
    if dry:
        env.update(OMP_NUM_THREADS="1")
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    record = {"gpu": gpu_name(device), "date": datetime.date.today().isoformat(), "commit": commit(),
              "dry_run": dry, "demos": [], "steps": []}
    # 1. Demos on the device, precision auto and fp16, two at a time (tiny models: the GPU is far from full).
    demo_jobs = []
    for name, script in DEMOS:
        # --dry-run: auto only. fp16 on a CPU is emulated (a 2-step demo takes minutes) and its code path is pinned by
        # every method's mixed-precision step test; on the GPU fp16 is the T4's path and runs here.
        for prec in ("auto",) if dry else ("auto", "fp16"):
            cmd = [script, "--demo", "--device", device, "--precision", prec, "--out",
                   str(work / f"{script[:-3]}-{prec}")]
            # --dry-run checks the plumbing at tiny sizes, so its demos run on the random tiny SD too
            dry_flags = ["--iters", "2", "--eval-every", "2", "--sd-model", "tiny", *DRY_DEMO[script]] if dry else []
            demo_jobs.append((name, prec, cmd + dry_flags))
    with cf.ThreadPoolExecutor(2) as pool:
        for (name, prec, _), res in zip(demo_jobs, pool.map(lambda j: run(j[2], env), demo_jobs)):
            record["demos"].append({"method": name, "precision": prec, **res})
            print(f"demo {name:9s} {prec:4s} | exit {res['returncode']} | {res['seconds']:.0f} s", flush=True)
    # 2. Predictions (CPU only, no GPU memory) and profiles; on the GPU one at a time (clean time and memory peaks),
    # in the dry run two at a time (its timings mean nothing).
    jobs = [[script, *(tiny(flags) if dry else flags), *extra] for name, script, flags in PAPER for extra in
            (["--estimate-memory"], ["--profile", "1" if dry else str(a.profile_iters), "--device", device])]
    with cf.ThreadPoolExecutor(2 if dry else 1) as pool:
        results = list(pool.map(lambda cmd: run(cmd, env), jobs))
    for k, (name, script, flags) in enumerate(PAPER):
        est, prof = results[2 * k], results[2 * k + 1]
        row = {"method": name, "flags": " ".join(tiny(flags) if dry else flags), "estimate": est, "profile": prof}
        record["steps"].append(row)
        pr, me = est.get("result", {}), prof.get("result", {})
        print(f"step {name:13s} | predicted {pr.get('predicted_peak_gb', float('nan')):.2f} GB | measured "
              f"{me.get('peak_mem_gb', float('nan')):.2f} GB | {me.get('sec_per_iter', float('nan')):.3f} s/iter",
              flush=True)
    record["seconds"] = round(time.time() - t0, 1)
    (out / ("gpu_check-dry.json" if dry else "gpu_check.json")).write_text(json.dumps(record, indent=1))
    (out / ("gpu_check-dry.md" if dry else "gpu_check.md")).write_text(markdown(record))
    print(markdown(record))
    failed = [d for d in record["demos"] if d["returncode"]] + \
        [s for s in record["steps"] for k in ("estimate", "profile") if s[k]["returncode"]]
    return 1 if failed else 0


def markdown(rec: dict) -> str:
    """The README table: one row per paper-setting step, demo results below."""
    head = (f"GPU check: {rec['gpu']}, {rec['date']}, commit `{rec['commit']}`, {rec['seconds'] / 60:.1f} min "
            f"(`bash benchmarks/gpu_check.sh{' --dry-run' if rec['dry_run'] else ''}`)\n\n"
            "| step (paper setting) | flags | predicted peak | measured peak | s / iter | utilization |\n"
            "|---|---|---|---|---|---|")
    rows = []
    for s in rec["steps"]:
        pr, me = s["estimate"].get("result", {}), s["profile"].get("result", {})
        pk = f"{pr['predicted_peak_gb']:.2f} GB" if "predicted_peak_gb" in pr else "failed"
        mk = f"{me['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in me else "failed"
        sec = f"{me['sec_per_iter']:.3f}" if "sec_per_iter" in me else "—"
        ut = f"{100 * me['utilization']:.0f} %" if "utilization" in me else "—"
        rows.append(f"| {s['method']} | `{s['flags']}` | {pk} | {mk} | {sec} | {ut} |")
    demos = ", ".join(f"{d['method']} {d['precision']} {'ok' if d['returncode'] == 0 else 'FAILED'} "
                      f"({d['seconds']:.0f} s)" for d in rec["demos"])
    return "\n".join([head, *rows, "", f"Demos on the device: {demos}.", ""])


if __name__ == "__main__":
    sys.exit(main())
