"""Plumbing: CLI generated from Args, RNG state round trip, atomic checkpoints, metrics.json, errors."""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

from common import runtime
from common.runtime import (UserError, latest_checkpoint, load_checkpoint, log_line, parse_args,
                            prepare_out_dir, replace_defaults, save_checkpoint, write_metrics)


@dataclass
class _Args:
    src: str = "cityscapes"
    """source dataset name"""
    iters: int = 10
    """optimizer steps"""
    lr: float = 5e-6
    """learning rate"""
    demo: bool = False
    """tiny everything"""
    ckpt: Optional[str] = None
    """checkpoint to load"""
    sizes: tuple[int, ...] = (1, 2)
    """several numbers"""


def test_parse_args_types_docs_and_bools():
    a = parse_args(_Args, ["--iters", "3", "--lr", "1e-4", "--demo", "--ckpt", "x", "--sizes", "4", "5", "6"])
    assert a == _Args(iters=3, lr=1e-4, demo=True, ckpt="x", sizes=(4, 5, 6))
    assert parse_args(_Args, []) == _Args()
    assert runtime.field_docs(_Args)["lr"] == "learning rate"


def test_unknown_dataset_is_a_user_error_with_the_list():
    with pytest.raises(UserError, match=r"^error: --src: unknown dataset 'cityscape'\. Choose one of: cityscapes, "):
        parse_args(_Args, ["--src", "cityscape"])


def test_replace_defaults_keeps_what_the_user_set():
    a = replace_defaults(_Args(iters=3), iters=5, lr=1.0)
    assert a.iters == 3 and a.lr == 1.0


def test_rng_state_round_trip():
    runtime.seed_everything(3)
    state = runtime.get_rng_state()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    runtime.set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_checkpoint_round_trip_rotation_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"]
    w, s = load_checkpoint(latest_checkpoint(tmp_path))
    assert s["step"] == 4 and torch.equal(w["w"], torch.full((2,), 4.0))
    w2, _ = load_checkpoint(latest_checkpoint(tmp_path) / "weights.safetensors")
    assert torch.equal(w2["w"], w["w"])


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process SIGKILLed while writing a large checkpoint never leaves a half-written 'latest'."""
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1})
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(runtime.Path(runtime.__file__).parents[1])!r})
        from common.runtime import save_checkpoint
        print("start", flush=True)
        save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.randn(40_000_000)}}, {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    import time
    time.sleep(0.3)  # inside save_file / torch.save of 160 MB
    proc.kill()
    proc.wait()
    latest = latest_checkpoint(tmp_path)
    weights, state = load_checkpoint(latest)
    assert state["step"] in (1, 2)  # 2 only if the whole write finished before the kill
    assert weights["w"].numel() in (3, 40_000_000)
    assert not any(p.name.startswith("step_0000002") and ".tmp" not in p.name and not (p / "state.pt").exists()
                   for p in (tmp_path / "checkpoints").iterdir())


def test_prepare_out_dir_refuses_to_overwrite_and_unwritable(tmp_path):
    save_checkpoint(tmp_path / "run", 5, {"w": torch.ones(1)}, {})
    with pytest.raises(UserError, match="already holds checkpoints"):
        prepare_out_dir(str(tmp_path / "run"))
    prepare_out_dir(str(tmp_path / "run"), resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^error: --out: cannot write to"):
        prepare_out_dir(str(blocker / "sub"))
    with pytest.raises(UserError, match=r"^error: --resume: no checkpoint in"):
        runtime.resume_checkpoint(tmp_path / "empty")


def test_metrics_json_append_and_nan_to_null(tmp_path):
    write_metrics(tmp_path, {"lr": 1.0}, key="args")
    write_metrics(tmp_path, {"miou": 0.5, "per_class_iou": {"a": float("nan")}})
    write_metrics(tmp_path, {"miou": 0.6})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["args"] == {"lr": 1.0}
    assert [e["miou"] for e in data["evals"]] == [0.5, 0.6]
    assert data["evals"][0]["per_class_iou"]["a"] is None


def test_log_line_format():
    line = log_line(1200, 10000, {"loss_src": 0.4123, "q": 0.71, "lr": 5e-6}, 410.2, 17.33)
    assert line == "step 1200/10000 | loss_src 0.412 | q 0.710 | lr 5.0e-06 | 410 ms/step | mem 17.3 GB"


def test_check_finite():
    runtime.check_finite(torch.tensor(1.0), 3)
    with pytest.raises(UserError, match="non-finite loss .* at step 7"):
        runtime.check_finite(torch.tensor(float("nan")), 7)


def test_precision_on_cpu_and_profile_keys():
    p = runtime.choose_precision("auto", torch.device("cpu"))
    assert p.amp_dtype is None and not p.use_scaler and p.frozen_dtype == torch.float32
    with pytest.raises(UserError):
        runtime.choose_precision("bf16", torch.device("cpu"))
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)

    def step():
        lin(x).sum().backward()

    out = runtime.profile_training(step, 2, torch.device("cpu"))
    # forward 2*32*64*64 + backward: only the weight gradient (x needs none), the same count again
    assert out["flops_per_iter"] == 2 * 2 * 32 * 64 * 64
    assert set(out) >= {"flops_per_iter", "sec_per_iter", "peak_mem_gb", "matmul_peak_gflops", "utilization"}


def test_cpu_flash_attention_is_counted_like_the_math_path():
    """On CPU, SDPA runs a flash kernel that FlopCounterMode would count as 0; ours counts it as 2 bmm."""
    import torch.nn.functional as F
    b, h, lq, lk, d = 2, 3, 16, 24, 8
    q = torch.randn(b, h, lq, d)
    k, v = torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    cpu = runtime.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    meta = runtime.count_flops(lambda: F.scaled_dot_product_attention(q.to("meta"), k.to("meta"), v.to("meta")))
    assert cpu == meta == 2 * (2 * b * h * lq * lk * d)
    qg = q.clone().requires_grad_()
    with_backward = runtime.count_flops(lambda: F.scaled_dot_product_attention(qg, k, v).sum().backward())
    assert with_backward > cpu


def test_grouped_conv_backward_is_not_counted_as_dense():
    """torch's convolution_backward formula ignores groups; ours: each gradient costs one forward."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 16, 12, 12, requires_grad=True)
    for groups in (1, 4, 16):
        conv = torch.nn.Conv2d(16, 8 if groups == 4 else 16, 3, padding=1, groups=groups)
        fwd = runtime.count_flops(lambda: conv(x))
        assert fwd == 2 * 12 * 12 * 9 * (16 // groups) * conv.out_channels
        assert runtime.count_flops(lambda: conv(x).sum().backward()) == 3 * fwd
        if groups == 1:  # identical to PyTorch's own count where PyTorch is right
            with FlopCounterMode(display=False) as ref:
                conv(x).sum().backward()
            assert ref.get_total_flops() == 3 * fwd


def test_run_cli_prints_one_line_and_exits_2(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(runtime.Path(runtime.__file__).parents[1])!r})
        from dataclasses import dataclass
        from common.runtime import run_cli, UserError
        @dataclass
        class Args:
            x: int = 1
            \"\"\"a number\"\"\"
        def main(args):
            raise UserError("error: --x: bad. Expected good.")
        run_cli(main, Args)
    """)
    path = tmp_path / "s.py"
    path.write_text(script)
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --x: bad. Expected good."
