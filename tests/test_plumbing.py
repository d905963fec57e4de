"""The shared plumbing (common/cli.py, common/runs.py, the run records in common/metrics.py): CLI generated from
Args, RNG state round trip, atomic checkpoints, metrics.json, errors, the stop on SIGTERM / SIGINT."""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

from pathlib import Path

import diff  # noqa: E402
import iccld  # noqa: E402
import madm  # noqa: E402
import ptdiffseg  # noqa: E402
from common import cli, metrics, runs  # noqa: E402
from common.cli import UserError, parse_args, replace_defaults
from common.metrics import write_metrics
from common.runs import latest_checkpoint, load_checkpoint, prepare_out_dir, save_checkpoint

ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class _Args:
    # ---- a section banner is no field's help
    src: str = "cityscapes"  # source dataset name
    iters: int = 10  # optimizer steps
    lr: float = 5e-6  # learning
                      # rate
    demo: bool = False  # tiny everything
    ckpt: Optional[str] = None  # checkpoint to load
    sizes: tuple[int, ...] = (1, 2)  # several numbers


def test_parse_args_types_docs_and_bools():
    a = parse_args(_Args, ["--iters", "3", "--lr", "1e-4", "--demo", "--ckpt", "x", "--sizes", "4", "5", "6"])
    assert a == _Args(iters=3, lr=1e-4, demo=True, ckpt="x", sizes=(4, 5, 6))
    assert parse_args(_Args, []) == _Args()
    docs = cli._field_docs(_Args)  # --help: the comment after each field, continued on the lines under it
    assert docs["lr"] == "learning rate" and docs["src"] == "source dataset name" and len(docs) == 6


def test_unknown_dataset_is_a_user_error_with_the_list():
    with pytest.raises(UserError, match=r"^error: --src: unknown dataset 'cityscape'\. Choose one of: cityscapes, "):
        parse_args(_Args, ["--src", "cityscape"])


def test_replace_defaults_keeps_what_the_user_set():
    a = replace_defaults(_Args(iters=3), iters=5, lr=1.0)
    assert a.iters == 3 and a.lr == 1.0
    # a flag typed on the command line is the user's even when it equals the default; abbreviations count too
    a = replace_defaults(parse_args(_Args, ["--demo", "--iters", "10", "--l", "5e-6"]), iters=5, lr=1.0, src="gta5")
    assert (a.iters, a.lr, a.src) == (10, 5e-6, "gta5")
    a = replace_defaults(parse_args(_Args, ["--demo"]), iters=5)
    assert a.iters == 5


def test_rng_state_round_trip():
    madm.seed_everything(3)
    state = madm.get_rng_state()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    madm.set_rng_state(state)
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
    stale = tmp_path / "checkpoints" / "step_0000005.tmp-99999"    # left by a process killed mid-write
    stale.mkdir()
    save_checkpoint(tmp_path, 5, {"w": torch.ones(1)}, {"step": 5}, keep=2)
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step_0000005"


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process SIGKILLed while writing a large checkpoint never leaves a half-written 'latest'."""
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1}, keep=3)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from pathlib import Path
        from common.runs import save_checkpoint
        print("start", flush=True)
        save_checkpoint(Path({str(tmp_path)!r}), 2, {{"w": torch.randn(40_000_000)}}, {{"step": 2}}, 3)
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
    save_checkpoint(tmp_path / "run", 5, {"w": torch.ones(1)}, {}, keep=3)
    with pytest.raises(UserError, match="already holds checkpoints"):
        prepare_out_dir(tmp_path / "run", resume=False, demo=False, is_main=True)
    prepare_out_dir(tmp_path / "run", resume=True, demo=False, is_main=True)
    assert latest_checkpoint(tmp_path / "run") is not None
    prepare_out_dir(tmp_path / "run", resume=False, demo=True, is_main=True)    # the demo's folder starts over
    assert latest_checkpoint(tmp_path / "run") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^error: --out: cannot write to"):
        prepare_out_dir(blocker / "sub", resume=False, demo=False, is_main=True)
    with pytest.raises(UserError, match=r"^error: --resume: no checkpoint at '.*empty.checkpoints'"):
        load_checkpoint(latest_checkpoint(tmp_path / "empty") or tmp_path / "empty" / "checkpoints", "--resume")
    with pytest.raises(UserError, match=r"^error: --ckpt: cannot read"):
        (tmp_path / "bad").mkdir(), (tmp_path / "bad" / "weights.safetensors").write_text("truncated")
        load_checkpoint(tmp_path / "bad")


def test_metrics_json_append_and_nan_to_null(tmp_path):
    write_metrics(tmp_path, {"lr": 1.0}, key="args")
    write_metrics(tmp_path, {"miou": 0.5, "per_class_iou": {"a": float("nan")}})
    write_metrics(tmp_path, {"miou": 0.6})
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["args"] == {"lr": 1.0}
    assert [e["miou"] for e in data["evals"]] == [0.5, 0.6]
    assert data["evals"][0]["per_class_iou"]["a"] is None


def test_log_line_format():
    line = madm.log_line({"step": 1200, "loss_src": 0.4123, "q": 0.71, "lr": 5e-6}, 10000, 410.2, torch.device("cpu"))
    assert line.startswith("step 1200/10000 | loss_src 0.412 | q 0.710 | lr 5.0e-06 | 410 ms/step | mem ")


def test_check_finite(tmp_path):
    runs.check_finite(torch.tensor(1.0), 3, None)
    with pytest.raises(UserError, match=r"non-finite loss .* at step 7\. .*fp32\.$"):
        runs.check_finite(torch.tensor(float("nan")), 7, tmp_path)
    save_checkpoint(tmp_path, 6, {"w": torch.ones(1)}, {}, keep=3)
    with pytest.raises(UserError, match="--resume continues from .*step_0000006"):
        runs.check_finite(torch.tensor(float("inf")), 7, tmp_path)


SCRIPTS = (madm, iccld, ptdiffseg, diff)


def test_the_four_scripts_set_up_processes_and_precision_with_the_same_block():
    """The setup block (processes, device, precision, seeds) is written out in every script, the same text so
    that each file stands alone: a change to one copy must be made to all four."""
    import inspect
    for fn in ("Dist", "init_distributed", "Precision", "choose_precision", "seed_everything", "get_rng_state",
               "set_rng_state"):
        assert len({inspect.getsource(getattr(m, fn)) for m in SCRIPTS}) == 1, fn


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_precision_on_cpu(script):
    p = script.choose_precision("auto", torch.device("cpu"))
    assert p.amp_dtype is None and not p.use_scaler and p.frozen_dtype == torch.float32 and p.reason == "fp32"
    with pytest.raises(UserError, match="^error: --precision: unknown value 'fp8'"):
        script.choose_precision("fp8", torch.device("cpu"))


def test_run_cli_prints_one_line_and_exits_2(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from dataclasses import dataclass
        from common.cli import run_cli, UserError
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


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision on the CPU, determinism
# ----------------------------------------------------------------------------------------------------------------
def test_half_precision_on_cpu_takes_the_gpu_code_path():
    """bf16 / fp16 on the CPU: half-precision autocast, frozen parts stored in half, a live GradScaler for fp16
    only; fp32 means fp32 everywhere (frozen parts too)."""
    cpu = torch.device("cpu")
    bf, fp, f32 = (madm.choose_precision(n, cpu) for n in ("bf16", "fp16", "fp32"))
    assert (bf.amp_dtype, bf.frozen_dtype, bf.use_scaler) == (torch.bfloat16, torch.bfloat16, False)
    assert (fp.amp_dtype, fp.frozen_dtype, fp.use_scaler) == (torch.float16, torch.float16, True)
    assert (f32.amp_dtype, f32.frozen_dtype, f32.use_scaler) == (None, torch.float32, False)
    assert "a check" in bf.reason and "GradScaler" in fp.reason
    lin = torch.nn.Linear(8, 8)
    for prec, dtype in ((bf, torch.bfloat16), (fp, torch.float16)):
        with prec.autocast():
            assert lin(torch.randn(2, 8)).dtype == dtype
    scaler = fp.make_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    assert not bf.make_scaler().is_enabled()
    # an inf gradient makes the fp16 scaler skip the step and halve its scale, as on a GPU
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    w = lin.weight.detach().clone()
    with fp.autocast():
        loss = lin(torch.full((2, 8), float("inf"))).float().sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(lin.weight, w) and scaler.get_scale() == 2.0 ** 15


def test_init_distributed_makes_the_cpu_deterministic_and_checks_the_device():
    """oneDNN's deterministic mode, and MKL's strict reproducibility (without it a 3x3 convolution's backward on a
    1x1 map, as the tiny UNet's innermost block has at crop 32, differed between same-seed 2-thread runs: MKL's
    GEMM path depends on memory alignment); --device is checked."""
    torch.backends.mkldnn.deterministic = False
    os.environ.pop("MKL_CBWR", None)  # MKL's conditional numerical reproducibility: read at its first call
    dist, repeatable = madm.init_distributed("cpu", deterministic=False)
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    assert (dist.world, dist.rank, dist.device.type, dist.is_main) == (1, 0, "cpu", True)
    assert torch.backends.mkldnn.deterministic and "bit-identical" in repeatable
    assert dist.wrap(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear   # one process: no DDP
    with pytest.raises(UserError, match="^error: --device tpu"):
        madm.init_distributed("tpu", deterministic=False)


@pytest.mark.parametrize("change, flag", [(dict(eval_only=True), "--eval-only"), (dict(predict="x"), "--predict"),
                                          (dict(eval_only=True, ckpt="x", resume=True), "--resume"),
                                          (dict(iters=0), "--iters"), (dict(log_every=0), "--log-every"),
                                          (dict(ckpt_every=-1), "--ckpt-every"), (dict(crop_size=60), "--crop-size"),
                                          (dict(profile=2, estimate_memory=True), "--estimate-memory")])
def test_common_flag_checks_one_line_per_mistake(change, flag):
    @dataclass
    class A:
        eval_only: bool = False
        ckpt: Optional[str] = None
        predict: Optional[str] = None
        resume: bool = False
        profile: int = 0
        estimate_memory: bool = False
        iters: int = 10
        log_every: int = 1
        eval_every: int = 5
        batch_size: int = 2
        ckpt_every: int = 5
        crop_size: int = 64
    cli.check_common_flags(A(), crop_multiple=64)
    with pytest.raises(UserError) as e:
        cli.check_common_flags(A(**change), crop_multiple=64)
    assert str(e.value).startswith(f"error: {flag}") and "\n" not in str(e.value)


_KERNEL_ARGV = ["/usr/local/lib/python3.11/site-packages/ipykernel_launcher.py", "-f",
                "/root/.local/share/jupyter/runtime/kernel-1234.json"]


def test_run_cli_in_a_notebook_kernel_parses_nothing(capsys, monkeypatch):
    @dataclass
    class Args:
        demo: bool = False
        """tiny everything"""
    called = []
    monkeypatch.setattr(sys, "argv", _KERNEL_ARGV)
    cli.run_cli(lambda a: called.append(a), Args)  # would be SystemExit(2): '-f' is no flag of Args
    assert called == [] and "main(Args(demo=True))" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["madm.py", "--demo"])  # %run madm.py --demo in IPython: parsed as usual
    cli.run_cli(lambda a: called.append(a), Args)
    assert called == [Args(demo=True)]


def test_progress_bars_only_on_a_terminal_and_log_lines_stay_whole(tmp_path):
    """Through a pipe: no carriage return at all. On a pseudo-terminal: a live bar, and every log line starts on
    a line of its own (tqdm.write clears the bar first)."""
    import pty
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        import torch
        from common.cli import log, progress
        bar = progress(total=6, desc="eval")
        for s in range(1, 7):
            time.sleep(0.02)
            bar.update(1)
            if s % 2 == 0:
                log(f"step {{s}}/6 | loss {{1.0 / s:.3f}}")
        bar.close()
    """)
    path = tmp_path / "bar.py"
    path.write_text(script)
    piped = subprocess.run([sys.executable, str(path)], capture_output=True)  # bytes: text mode would turn \r into \n
    assert piped.returncode == 0, piped.stderr
    assert b"\r" not in piped.stdout + piped.stderr
    assert [ln.split(" | ")[0] for ln in piped.stdout.decode().splitlines()] == ["step 2/6", "step 4/6", "step 6/6"]
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 x 0
    p = subprocess.Popen([sys.executable, str(path)], stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait()
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert "it/s" in out or "s/it" in out or "%|" in out           # a bar was drawn
    lines = [seg.split("\r")[-1] for seg in out.replace("\r\n", "\n").split("\n")]
    steps = [ln for ln in lines if "step " in ln and " | loss " in ln]
    assert len(steps) == 3 and all(ln.lstrip("\x1b[A").startswith("step ") for ln in steps), steps


def test_side_by_side_upscales_small_panels_and_names_the_colours(tmp_path):
    from PIL import Image
    palette = np.array([[128, 64, 128], [70, 130, 180], [220, 20, 60]], np.uint8)
    gt = np.zeros((64, 96), np.uint8)
    gt[:, 48:] = 1
    gt[:4] = 255
    pred = gt.copy()
    pred[10:20, 10:20] = 2
    metrics.save_side_by_side(tmp_path / "p.png", torch.rand(3, 64, 96), gt, pred, palette,
                              ["road", "sky", "person"])
    im = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert im.shape[1] == 3 * 96 * 4 and im.shape[0] > 256           # 64 px -> x4 = 256 px, plus the legend
    assert (im[4 * 30, 96 * 4 + 10] == palette[0]).all()               # ground-truth panel, nearest-upscaled
    assert (im[4 * 15, 2 * 96 * 4 + 4 * 15] == palette[2]).all()       # prediction panel
    legend = im[256:]
    for colour in palette:                                             # a swatch for each class that appears
        assert (legend == colour).all(-1).sum() > 100
    big = np.zeros((300, 40), np.uint8)
    metrics.save_side_by_side(tmp_path / "q.png", torch.rand(3, 300, 40), big, big, palette)
    assert Image.open(tmp_path / "q.png").size == (120, 300)          # large enough: untouched, no legend


def test_curves_png_with_matplotlib_and_one_line_without(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path, [{"step": s, "loss_src": 1 / s, "lr": 0.1} for s in (1, 2, 3)], key="train_log")
    write_metrics(tmp_path, {"step": 3, "miou": 0.25})
    try:
        import matplotlib  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        png = metrics.write_curves(tmp_path)
        assert png is not None and png.stat().st_size > 1000
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    (tmp_path / "curves.png").unlink(missing_ok=True)
    assert metrics.write_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    assert "curves.png skipped: matplotlib is not installed" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT stop the loop at the next step boundary, after a checkpoint
# ----------------------------------------------------------------------------------------------------------------
ONE = madm.Dist(0, 1, torch.device("cpu"))


def _handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


def _send(sig):
    """Signal this process, but only while a StopOnSignal handler is installed (else it would kill pytest)."""
    assert getattr(signal.getsignal(sig), "__self__", None).__class__ is runs.StopOnSignal, "no handler"
    os.kill(os.getpid(), sig)


def test_sigterm_stops_after_the_step_and_its_checkpoint_second_signal_changes_nothing(tmp_path,
                                                                                       monkeypatch):
    """SIGTERM during step 3 (of 10, no periodic checkpoint): the step finishes, the body writes a checkpoint
    of step 3 because a stop was requested, then the loop raises Stopped with the one line. A second signal
    (SIGINT) arriving inside the checkpoint write is ignored: the write completes and loads. The handlers in
    place before the loop are back afterwards."""
    before = _handlers()
    done, saving = [], []
    real_save = torch.save

    def save_interrupted(obj, f, *a, **k):
        _send(signal.SIGINT)       # a second signal in the middle of the atomic write
        saving.append(True)
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_interrupted)
    stop = runs.StopOnSignal(ONE)
    with pytest.raises(cli.Stopped) as e:
        for i in stop.steps(0, 10):
            if i == 2:
                _send(signal.SIGTERM)
            done.append(i)         # the rest of the step runs
            if stop.requested():
                save_checkpoint(tmp_path, i + 1, {"w": torch.full((3,), float(i + 1))}, {"step": i + 1}, keep=0)
    assert str(e.value) == "stopped by SIGTERM at step 3: checkpoint written, continue with --resume"
    assert done == [0, 1, 2] and saving == [True]
    weights, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(weights["w"], torch.full((3,), 3.0))
    assert _handlers() == before
    assert cli.EXIT_STOPPED == 75


def test_stop_on_signal_restores_handlers_on_errors_and_names_sigint_and_redo(tmp_path):
    before = _handlers()
    with pytest.raises(ValueError):                      # any other error in the loop: handlers restored too
        for i in runs.StopOnSignal(ONE).steps(0, 5):
            raise ValueError
    assert _handlers() == before
    assert list(runs.StopOnSignal(ONE).steps(2, 5)) == [2, 3, 4] and _handlers() == before
    with pytest.raises(cli.Stopped) as e:            # a loop without checkpoints of its own (TTDA)
        for i in runs.StopOnSignal(ONE).steps(0, 20, 40, "TTDA on cityscapes"):
            if i == 4:
                _send(signal.SIGINT)                     # Ctrl-C
    assert str(e.value) == ("stopped by SIGINT at step 40: checkpoint written, continue with --resume "
                            "(TTDA on cityscapes starts over; it stopped after step 5 of 20)")
    assert _handlers() == before


def test_run_cli_exits_75_after_a_stop(tmp_path):
    """The command line: Ctrl-C (SIGINT) in the loop -> the line on stdout, exit code 75, no traceback."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        from dataclasses import dataclass
        import madm
        from common import cli, runs
        @dataclass
        class Args:
            x: int = 1
            \"\"\"a number\"\"\"
        def main(args):
            stop = runs.StopOnSignal(madm.Dist(0, 1, torch.device("cpu")))
            for i in stop.steps(0, 10):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                stop.requested()
        cli.run_cli(main, Args)
    """)
    path = tmp_path / "s.py"
    path.write_text(script)
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    assert r.stdout.strip() == "stopped by SIGINT at step 2: checkpoint written, continue with --resume"
    assert r.stderr == ""
