"""The benchmark scripts: the GPU check's dry run end to end on the CPU, and the adaptation table's arithmetic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import background

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_dry_run_runs_the_whole_sequence_on_the_cpu():
    """`bash benchmarks/gpu_check.sh --dry-run`: every demo (precision auto; fp16 demos run on the GPU only) and
    every paper-setting step (profiled and predicted) at tiny sizes, then the JSON record and the README table."""
    r, tmp_path = background("gpu-check")   # started at collection, beside the other tests (conftest.py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "gpu_check-dry.json").read_text())
    assert rec["dry_run"] and rec["gpu"] == "CPU (dry run)" and rec["commit"]
    assert [(d["method"], d["precision"]) for d in rec["demos"]] == [   # fp16 demos: on the GPU only
        (m, "auto") for m in ("MADM", "PTDiffSeg", "DIFF", "ICCLD")]
    assert all(d["returncode"] == 0 for d in rec["demos"])
    assert [s["method"] for s in rec["steps"]] == ["MADM", "PTDiffSeg", "DIFF", "ICCLD stage 1", "ICCLD stage 2"]
    for s in rec["steps"]:
        assert s["estimate"]["result"]["predicted_peak_gb"] > 0 and s["profile"]["result"]["sec_per_iter"] > 0
    table = (tmp_path / "out" / "gpu_check-dry.md").read_text()
    assert "| step (paper setting) |" in table and "failed" not in table and "FAILED" not in table


def test_adaptation_summary_mean_std_gain_and_verdict(tmp_path):
    import adaptation
    rows = [{"method": "MADM", "variant": v, "seed": s, "miou": m}
            for v, ms in (("base", (0.10, 0.12, 0.14)), ("full", (0.20, 0.21, 0.22))) for s, m in enumerate(ms)]
    rows += [{"method": "DIFF", "variant": v, "seed": s, "miou": m}
             for v, ms in (("base", (0.10, 0.20)), ("full", (0.12, 0.21))) for s, m in enumerate(ms)]
    summary = {s["method"]: s for s in adaptation.summarize(rows)}
    madm = summary["MADM"]
    assert madm["base_mean"] == pytest.approx(12.0) and madm["base_std"] == pytest.approx(2.0)   # sample std
    assert madm["mean"] == pytest.approx(21.0) and madm["std"] == pytest.approx(1.0)
    assert madm["gain"] == pytest.approx(9.0) and madm["clear"]                                   # 9 > 2 x 2
    diff = summary["DIFF"]                                                                         # +1.5, std 7
    assert diff["gain"] == pytest.approx(1.5) and not diff["clear"]
    text = adaptation.table(list(summary.values()))
    assert "| MADM | adapted | 3 | 12.00 ± 2.00 | 21.00 ± 1.00 | +9.00 | yes |" in text
    adaptation.chart(list(summary.values()), tmp_path / "c.png")
    from PIL import Image
    assert Image.open(tmp_path / "c.png").size[0] > 300
