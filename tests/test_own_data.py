"""Your own data (`folder:PATH`, `--predict PATH`): folders built from the synthetic sample, each script end to end
on them, and every bad input as one line + exit code 2 + nothing written."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import metrics
from common.datasets import CLASS_SETS, PALETTES, build_dataset, check_pair, eval_input_size, eval_target, run_tag
from common.cli import run_cli
from common.metrics import colorize
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
ENV1 = dict(os.environ, OMP_NUM_THREADS="1")


def _export(name: str, split: str, out: Path, labelled=lambda i: True, grey: bool = False, ext: str = ".png",
            k=None) -> int:
    """Write one split of a synthetic dataset as `out/images/<seq>/<stem><ext>` (+ `out/labels/...png` for the
    items `labelled(i)` picks, as trainIds of the class set `k`); grey images as 8-bit 'L' PNGs."""
    ds = build_dataset(name, ensure_synthetic_sample(ROOT / "data" / "synthetic"), split, train=False, num_classes=k)
    for i in range(len(ds)):
        rel = Path(f"seq{i % 2}") / f"frame_{i:03d}"
        im = ds.load_image(i)
        if grey:
            im = Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8), "L")
        (out / "images" / rel.parent).mkdir(parents=True, exist_ok=True)
        im.save(out / "images" / f"{rel}{ext}")
        if labelled(i):
            (out / "labels" / rel.parent).mkdir(parents=True, exist_ok=True)
            lab = ds[i]["label"].numpy().astype(np.uint8)  # converted to the class set k
            Image.fromarray(lab).save(out / "labels" / f"{rel}.png")
    return len(ds)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """src: labelled Cityscapes-like source (19 classes); tgt: unlabelled Dark Zurich JPEGs; part: Dark Zurich with
    labels for half the images; events: DSEC edge frames as single-channel PNGs, 11 classes, no labels."""
    base = tmp_path_factory.mktemp("own")
    _export("cityscapes", "train", base / "src")
    _export("dark_zurich", "val", base / "tgt", labelled=lambda i: False, ext=".jpg")
    _export("dark_zurich", "val", base / "part", labelled=lambda i: i % 2 == 0)
    _export("dsec_event", "test", base / "events", labelled=lambda i: False, grey=True)
    (base / "events" / "classes.txt").write_text("11\n")
    return base


def _run(script: str, *args, timeout=300):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV1)


def _check_predictions(pred_dir: Path, images: Path, k: int) -> None:
    """A colour and a trainId PNG per image, at the image's own size, in the folder's structure."""
    files = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))
    assert files
    for img in files:
        stem = pred_dir / img.relative_to(images).with_suffix("")
        ids = np.asarray(Image.open(f"{stem}_trainId.png"))
        col = Image.open(f"{stem}_color.png")
        assert ids.shape == Image.open(img).size[::-1] and col.size == Image.open(img).size
        assert ids.dtype == np.uint8 and ids.max() < k
        assert np.array_equal(np.asarray(col.convert("RGB")), np.asarray(colorize(ids, PALETTES[k])))


# ------------------------------------------------------------------------------------------------------------
# The folder dataset
# ------------------------------------------------------------------------------------------------------------
def test_folder_splits_sizes_and_modality(folders, tmp_path):
    src = build_dataset(f"folder:{folders / 'src'}", split="train", crop_size=64, scale=1 / 8)
    assert src.has_labels and len(src) == 8 and src.items[0].name == "seq0/frame_000.png"
    s = src.sample(0, np.random.default_rng(0))
    assert s["image"].shape == (3, 64, 64) and (s["label"] != 255).any()
    # the Cityscapes keep-ratio rule: 1920x1080 -> 910x512, 640x480 -> 683x512, and x --demo scale
    assert eval_input_size(f"folder:{folders / 'tgt'}", (1080, 1920)) == (910, 512)
    assert eval_input_size(f"folder:{folders / 'tgt'}", (480, 640)) == (683, 512)
    assert eval_input_size(f"folder:{folders / 'tgt'}", (480, 640), 1 / 8) == (85, 64)
    tgt = build_dataset(f"folder:{folders / 'tgt'}", split="val")
    assert not tgt.has_labels and len(tgt) == 4 and (tgt[0]["label"] == 255).all()
    part = build_dataset(f"folder:{folders / 'part'}", split="val")  # only the labelled images are scored
    assert part.has_labels and len(part) == 2
    assert len(build_dataset(f"folder:{folders / 'part'}", split="train")) == 4
    ev = build_dataset(f"folder:{folders / 'events'}", split="val")
    assert ev.num_classes == 11 and ev.load_image(0).mode == "F"  # single channel: read like the edges
    x = ev[0]["image"]
    raw = np.asarray(Image.open(folders / "events" / "images" / "seq0" / "frame_000.png"), np.float32) / 255
    assert torch.equal(x[0], x[2]) and np.allclose(x[0].numpy(), raw)
    name, split = eval_target("cityscapes", str(folders / "events"))
    pred = build_dataset(name, split=split, num_classes=19)  # the model's class set, whatever classes.txt says
    # 16-bit single-channel files (depth, thermal) are /65535, never cut to 8 bits; grey + alpha is read as RGB
    d = tmp_path / "grey"
    d.mkdir()
    depth = (np.arange(64 * 32).reshape(32, 64) * 31).astype(np.uint16)
    Image.fromarray(depth).save(d / "a.png")
    Image.fromarray(np.full((32, 64, 2), 200, np.uint8), "LA").save(d / "b.png")
    grey = build_dataset(f"folder:{d}", split="val")
    assert np.allclose(grey[0]["image"][1].numpy(), depth / 65535.0, atol=1e-6)
    assert torch.allclose(grey[1]["image"], torch.full((3, 32, 64), 200 / 255))
    assert pred.num_classes == 19 and not pred.has_labels
    assert check_pair(f"folder:{folders / 'src'}", f"folder:{folders / 'events'}") == 11
    assert run_tag(f"folder:{folders / 'src'},cityscapes") == "folder-src+cityscapes"


def test_classes_txt(tmp_path, folders):
    d = tmp_path / "c"
    shutil.copytree(folders / "tgt", d)
    for text, k in (("9", 9), ("\n".join(CLASS_SETS[11]), 11), ("\n".join(CLASS_SETS[19]).upper(), 19)):
        (d / "classes.txt").write_text(text + "\n")
        assert build_dataset(f"folder:{d}", split="val").num_classes == k


def test_evaluate_without_labels_and_predict(tmp_path, folders):
    k = 19
    predict_fn = lambda x: torch.randn(1, k, x.shape[-2] // 4, x.shape[-1] // 4)  # noqa: E731
    tgt = build_dataset(f"folder:{folders / 'tgt'}", split="val")
    kw = dict(device=torch.device("cpu"), input_size=(64, 32), num_pictures=3)
    r = metrics.evaluate(predict_fn, tgt, k, [str(i) for i in range(k)], PALETTES[k], pictures_dir=tmp_path / "p",
                         **kw)
    assert r["no_labels"] and np.isnan(r["miou"]) and len(list((tmp_path / "p").glob("*.png"))) == 3
    assert r["table"] == f"no mIoU without labels: wrote prediction pictures for 3 images to {tmp_path / 'p'}"
    ds = build_dataset(f"folder:{folders / 'tgt'}", split="predict", num_classes=k)
    r = metrics.evaluate(predict_fn, ds, k, [str(i) for i in range(k)], PALETTES[k], pictures_dir=tmp_path / "q",
                         **kw)
    assert r["table"].startswith("predict: wrote colour and trainId PNGs for 4 images")
    _check_predictions(tmp_path / "q", folders / "tgt" / "images", k)


# ------------------------------------------------------------------------------------------------------------
# Each script end to end: train on folders, evaluate (labels or pictures), predict on a folder
# ------------------------------------------------------------------------------------------------------------
NO_MIOU = "no mIoU without labels: wrote prediction pictures for 4 images to"


def test_madm_events_folder_target_then_predict(tmp_path, folders):
    """MADM: labelled source folder -> unlabelled folder of event frames (11 classes from classes.txt)."""
    data = ["--demo", "--src", f"folder:{folders / 'src'}", "--tgt", f"folder:{folders / 'events'}"]
    r = _run("madm.py", *data, "--iters", 2, "--eval-every", 2, "--ckpt-every", 2, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{NO_MIOU} {tmp_path / 'run' / 'predictions'}" in r.stdout and "eval step" not in r.stdout
    assert "11 classes" in r.stdout and len(list((tmp_path / "run" / "predictions").glob("*.png"))) == 4
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    r = _run("madm.py", *data, "--predict", folders / "tgt", "--ckpt", ckpt, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "predict: wrote colour and trainId PNGs for 4 images" in r.stdout
    _check_predictions(tmp_path / "pred" / "predictions", folders / "tgt" / "images", 11)


def test_iccld_partly_labelled_target_then_predict(tmp_path, folders):
    """ICCLD: the labelled half of a partly labelled target folder is scored; predict writes every image."""
    data = ["--demo", "--src", f"folder:{folders / 'src'}", "--tgt", f"folder:{folders / 'part'}"]
    r = _run("iccld.py", *data, "--iters", 2, "--iters-stage2", 2, "--warmup-iters", 1, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val [stage2 diffusion T=3 (unet_ema)], 2 images" in r.stdout and "eval step 2 | mIoU" in r.stdout
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    r = _run("iccld.py", *data, "--predict", folders / "part", "--ckpt", ckpt, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_predictions(tmp_path / "pred" / "predictions", folders / "part" / "images", 19)


def test_ptdiffseg_ttda_on_folder_then_predict(tmp_path, folders):
    """PTDiffSeg: trained on the source folder, TTDA on an unlabelled folder (pictures, no mIoU); predict on
    the event frames, before and after TTDA."""
    data = ["--demo", "--src", f"folder:{folders / 'src'}", "--tgt", f"folder:{folders / 'tgt'}"]
    r = _run("ptdiffseg.py", *data, "--iters", 2, "--eval-every", 2, "--ckpt-every", 2, "--ttda-steps", 2,
             "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{NO_MIOU} {tmp_path / 'run' / 'predictions' / 'ttda'}" in r.stdout
    assert "TTDA steps" in r.stdout and (tmp_path / "run" / "ttda" / "folder-tgt_scene.safetensors").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    r = _run("ptdiffseg.py", *data, "--predict", folders / "events", "--ckpt", ckpt, "--ttda-steps", 1,
             "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    for sub in ("", "ttda"):
        _check_predictions(tmp_path / "pred" / "predictions" / sub, folders / "events" / "images", 19)


def test_diff_folder_source_and_target_then_predict(tmp_path, folders):
    data = ["--demo", "--num-steps", 1, "--src", f"folder:{folders / 'src'}", "--tgt", f"folder:{folders / 'part'}"]
    r = _run("diff.py", *data, "--iters", 2, "--eval-every", 2, "--ckpt-every", 2, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val, 2 images" in r.stdout and "eval step 2 | folder:" in r.stdout
    evals = json.loads((tmp_path / "run" / "metrics.json").read_text())["evals"]
    assert np.isfinite(evals[-1]["miou"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    r = _run("diff.py", *data, "--predict", folders / "tgt", "--ckpt", ckpt, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_predictions(tmp_path / "pred" / "predictions", folders / "tgt" / "images", 19)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file and what was expected, exit code 2, nothing written
# ------------------------------------------------------------------------------------------------------------
def _copy_src(folders, tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(folders / "src", d, ignore=shutil.ignore_patterns(".cache"))
    return d


def _bad_value(d):
    Image.fromarray(np.full((128, 256), 30, np.uint8)).save(d / "labels" / "seq1" / "frame_003.png")
    return r"^error: folder:.*: label '.*frame_003.png' has values \{30\} outside \{0\.\.18, 255\}\. Expected trainIds"


def _missing_label(d):
    (d / "labels" / "seq0" / "frame_002.png").unlink()
    return r"^error: --src folder:.*: 8 images but 7 labels; first without a label: images/seq0/frame_002.png\."


def _corrupt_image(d):
    (d / "images" / "seq1" / "frame_005.png").write_bytes(b"not a png")
    return r"^error: folder:.*: cannot read '.*frame_005.png' \(.*\)\. Replace or remove it"


def _colour_label(d):
    p = d / "labels" / "seq0" / "frame_000.png"
    Image.open(p).convert("RGB").save(p)
    return r"^error: folder:.*: label '.*frame_000.png' is an RGB image\. Expected a single-channel"


def _size_mismatch(d):
    p = d / "labels" / "seq0" / "frame_004.png"
    Image.open(p).resize((64, 32), Image.NEAREST).save(p)
    return r"^error: folder:.*: image '.*frame_004.png' is 256x128 but its label is 64x32\."


def _empty(d):
    shutil.rmtree(d / "images")
    shutil.rmtree(d / "labels")
    return r"^error: folder:.*: '.*src' contains no \.png/\.jpg/\.jpeg images\."


def _no_labels(d):
    shutil.rmtree(d / "labels")
    return r"^error: --src folder:.*: a source needs labels\. Expected .*/images/ \+ .*/labels/"


def _bad_classes(d):
    (d / "classes.txt").write_text("road\nsky\n")
    return r"^error: folder:.*: '.*classes.txt' names no known class set \(2 lines\)\. Expected one line 19"


@pytest.mark.parametrize("break_it", [_bad_value, _missing_label, _corrupt_image, _colour_label, _size_mismatch,
                                      _empty, _no_labels, _bad_classes])
def test_bad_source_folder(tmp_path, folders, capsys, break_it):
    import madm
    d = _copy_src(folders, tmp_path)
    pattern = break_it(d)
    before = sorted(p for p in d.rglob("*"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli(madm.main, madm.Args, ["--demo", "--src", f"folder:{d}", "--tgt", f"folder:{folders / 'tgt'}",
                                       "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert re.match(pattern, err[0]), err[0]
    assert not out.exists() and sorted(p for p in d.rglob("*")) == before  # nothing written, no cache either


@pytest.mark.parametrize("script", ["madm", "iccld", "ptdiffseg", "diff"])
def test_bad_inputs_every_script(tmp_path, folders, capsys, script):
    """Each script: a missing source label, a missing folder and --predict without --ckpt end in one line."""
    mod = __import__(script)
    d = _copy_src(folders, tmp_path)
    _missing_label(d)
    out = tmp_path / "run"
    cases = [(["--src", f"folder:{d}", "--tgt", f"folder:{folders / 'tgt'}"], "first without a label"),
             (["--tgt", f"folder:{tmp_path / 'nope'}"], "folder '" + str(tmp_path / "nope") + "' not found"),
             (["--tgt", "folder_x"], "unknown dataset 'folder_x'. Choose one of: cityscapes"),
             (["--predict", str(folders / "tgt")], "error: --predict: no --ckpt given")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(mod.main, mod.Args, ["--demo", *argv, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
        assert not out.exists()


def test_bad_input_exit_code_subprocess(tmp_path, folders):
    d = _copy_src(folders, tmp_path)
    _bad_value(d)
    r = _run("diff.py", "--demo", "--src", f"folder:{d}", "--tgt", f"folder:{folders / 'tgt'}", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has values {30} outside {0..18, 255}" in r.stderr and not (tmp_path / "o").exists()
