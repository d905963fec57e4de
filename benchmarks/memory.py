"""Predicted peak GPU memory of every method at its paper setting and at the low-memory settings the README
recommends for a 24 GB GPU and a 16 GB Colab T4, without a GPU (`--estimate-memory`: FakeTensorMode +
MemTracker, nothing allocated, no weights or data). Writes the README's hardware-tier table.

    python benchmarks/memory.py          # ~10 minutes on 2 CPU cores; writes benchmarks/results/memory.md
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD15, SD21 = ["--sd-model", "random-sd15"], ["--sd-model", "random-sd21"]
T4 = ["--precision", "fp16"]  # a T4 has no bf16: --precision auto picks fp16 + GradScaler there
ROWS = [  # (method, tier, script, flags)
    ("MADM", "paper (bf16)", "madm.py", SD15),
    ("MADM", "24 GB", "madm.py", SD15 + ["--grad-checkpointing", "--fusion-stride", "4"]),
    ("MADM", "16 GB T4", "madm.py", SD15 + T4 + ["--grad-checkpointing", "--fusion-stride", "4"]),
    ("PTDiffSeg", "paper (bf16)", "ptdiffseg.py", SD15),
    ("PTDiffSeg", "16 GB T4", "ptdiffseg.py", SD15 + T4 + ["--grad-checkpointing"]),
    ("DIFF", "paper (bf16)", "diff.py", SD21),
    ("DIFF", "16 GB T4", "diff.py", SD21 + T4 + ["--grad-checkpointing"]),
    ("ICCLD stage 1", "paper (bf16)", "iccld.py", SD15 + ["--stage", "1"]),
    ("ICCLD stage 1", "16 GB T4", "iccld.py", SD15 + T4 + ["--stage", "1", "--grad-checkpointing"]),
    ("ICCLD stage 2", "paper (bf16)", "iccld.py", SD15 + ["--stage", "2"]),
    ("ICCLD stage 2", "24 GB", "iccld.py", SD15 + ["--stage", "2", "--grad-checkpointing"]),
    ("ICCLD stage 2", "16 GB T4", "iccld.py", SD15 + T4 + ["--stage", "2", "--grad-checkpointing"]),
]


def fits(total: float) -> str:
    return ", ".join(f"{g} GB {'yes' if total <= g else 'no'}" for g in (16, 24, 40, 80))


def main() -> None:
    lines = ["| method | tier | flags (all: crop 512, the paper's batch) | predicted peak | with margin | fits |",
             "|---|---|---|---|---|---|"]
    t0 = time.time()
    for method, tier, script, flags in ROWS:
        r = subprocess.run([sys.executable, script, *flags, "--estimate-memory"], cwd=ROOT, capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError(f"{script} {' '.join(flags)}: {r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        peak, total = res["predicted_peak_gb"], res["predicted_total_gb"]
        lines.append(f"| {method} | {tier} | `{' '.join(flags)}` | {peak:.1f} GB | {total:.1f} GB | {fits(total)} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + f"\n\n{len(ROWS)} predictions in {(time.time() - t0) / 60:.1f} min on the CPU.\n"
    out = ROOT / "benchmarks" / "results" / "memory.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
