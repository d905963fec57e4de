"""Diagnostic for the adaptation benchmark: the same MADM / ICCLD runs with the teacher's target pseudo labels
replaced by the target's ground truth (quality weight 1).

Why: on the synthetic shift with a randomly initialised tiny SD, self-training did not beat its source-only row
(benchmarks/adaptation.py). Two explanations predict different things here. If the assembled step were broken
(target terms not reaching the model, wrong weights, wrong mixing), perfect labels would not help either. If the
labels are the problem (a random tiny backbone gives a teacher whose target labels are mostly wrong), perfect
labels make the same step adapt. Nothing else changes: same command, steps, seed and data as the benchmark's
"full" variant; only `pseudo_labels` is swapped, in this process, for one returning the ground truth of the very
target crops the step received.

    python benchmarks/adaptation_oracle.py                    # 3 seeds each of MADM and ICCLD on mini
    python benchmarks/adaptation_oracle.py --sd-model tiny    # the same on the random tiny SD
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(name: str, seed: int, data: str, out: str, sd_model: str) -> None:
    """Run one oracle training in this process (called in a subprocess by `main`)."""
    import importlib

    import torch

    from adaptation import METHODS
    from common import cli, datasets
    cfg = METHODS[name]
    mod = importlib.import_module(cfg["script"][:-3])
    labels: list = []                             # target labels of the crops handed to the step, in order
    batch = datasets.TrainStream.batch

    def recording_batch(self, step, start, count):
        out = batch(self, step, start, count)
        if self.stream_id == 1:                   # the target stream
            labels.append(out["label"])
        return out
    datasets.TrainStream.batch = recording_batch
    real = mod.pseudo_labels

    def oracle(*args, **kwargs):
        y_hat, q, *rest = real(*args, **kwargs)   # the teacher still runs (same random draws and cost)
        y = labels.pop(0).to(y_hat.device)
        one = torch.ones((), device=y_hat.device)
        return (y, one, torch.ones_like(rest[0])) if rest else (y, one)
    mod.pseudo_labels = oracle
    argv = ["--demo", "--src", cfg["src"], "--tgt", cfg["tgt"], "--data-root", data, "--seed", str(seed),
            "--out", out, "--sd-model", sd_model, *cfg["iters"], "--eval-every", "100000", "--ckpt-every", "0",
            "--log-every", "50"]
    res = mod.main(cli.parse_args(mod.Args, argv))
    print("RESULT " + json.dumps({"miou": res["miou"]}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/adaptation", help="the benchmark's work folder (holds its sample)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sd-model", default="mini", help="mini (pretrained miniature) or tiny (random weights)")
    p.add_argument("--sample-seed", type=int, default=0, help="generator seed of adaptation.py's sample")
    p.add_argument("--shift", type=float, default=1.0, help="style shift of adaptation.py's sample")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    data = Path(a.work) / f"synthetic-seed{a.sample_seed}-shift{a.shift:g}"   # written by adaptation.py
    work = Path(a.work) / f"{a.sd_model}-seed{a.sample_seed}-shift{a.shift:g}"
    if a.child:
        name, seed = a.child
        return child(name, int(seed), str(data), str(work / "runs" / f"{name}-oracle-seed{seed}"), a.sd_model)
    jobs = [(n, s) for n in ("MADM", "ICCLD") for s in range(a.seeds)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(job):
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--work", a.work, "--sd-model", a.sd_model, "--sample-seed",
                            str(a.sample_seed), "--shift", str(a.shift), "--child", job[0], str(job[1])],
                           cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        miou = json.loads(r.stdout.split("RESULT ")[-1])["miou"]
        return {"method": job[0], "seed": job[1], "miou_oracle": miou, "seconds": round(time.time() - t, 1)}
    with cf.ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(run, jobs))
    lines = ["| method | seed | target mIoU with ground-truth pseudo labels |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {100 * r['miou_oracle']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"adaptation_oracle_{a.sd_model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
