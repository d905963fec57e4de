"""The synthetic sample (data/README.md): layouts and encodings, sizes, determinism, speed, the class/colour
signal and the style shift the methods' learning tests rely on, and concurrent `ensure_synthetic_sample`."""
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datasets import build_dataset
from common.synthetic import ensure_synthetic_sample, write_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample() -> Path:
    return ensure_synthetic_sample(ROOT / "data" / "synthetic")


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    b = path.read_bytes()[:33]
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    w, h, depth, ctype = struct.unpack(">IIBB", b[16:26])
    return w, h, depth, ctype


def first(root: Path, pattern: str) -> Path:
    files = sorted(root.glob(pattern))
    assert files, pattern
    return files[0]


def test_layouts_sizes_and_encodings(sample):
    assert json.loads((sample / "SYNTHETIC").read_text())["size_ratio"] == 1 / 8
    # native / 8 at the real aspect ratio
    sizes = {"cityscapes/leftImg8bit/train/*/*_leftImg8bit.png": (256, 128),
             "gta5/images/?????.png": (239, 132),
             "synthia/RGB/*.png": (160, 95), "acdc/rgb_anon/fog/train/*/*_rgb_anon.png": (240, 135),
             "dark_zurich/rgb_anon/train/night/*/*.png": (240, 135),
             "bdd100k/images/10k/train/*.jpg": (160, 90),
             "dsec/69mask_train_edges/*/*.png": (80, 60),
             "dsec/test_semantic_labels/*/11classes/*.png": (80, 55),
             "fmb/train/Infrared/*.png": (100, 75), "deliver/depth/*/train/*/*_depth_front.png": (130, 130)}
    for pattern, wh in sizes.items():
        assert Image.open(first(sample, pattern)).size == wh, pattern
    # Cityscapes: labelIds everywhere, labelTrainIds for train only
    cs = sample / "cityscapes" / "gtFine"
    assert len(list(cs.glob("train/*/*_labelTrainIds.png"))) == 8
    assert not list(cs.glob("val/*/*_labelTrainIds.png"))
    assert len(list(cs.glob("val/*/*_labelIds.png"))) == 4
    ids = np.array(Image.open(first(cs, "val/*/*_labelIds.png")))
    assert ids.max() > 18 and set(np.unique(ids)) <= set(range(34))  # really labelIds, not trainIds
    # GTA5 and Mapillary: palette PNGs whose indices are the ids
    for pattern, top in (("gta5/labels/?????.png", 33), ("mapillary/training/v1.2/labels/*.png", 65)):
        im = Image.open(first(sample, pattern))
        assert im.mode == "P" and np.array(im).max() <= top
    assert len(json.loads((sample / "mapillary" / "config_v1.2.json").read_text())["labels"]) == 66
    # SYNTHIA: 16-bit RGB (colour type 2); no terrain (16), truck (18), train (20)
    lab = first(sample, "synthia/GT/LABELS/*.png")
    assert png_header(lab)[2:] == (16, 2)
    from common.readers import read_synthia_label
    for p in sorted((sample / "synthia" / "GT" / "LABELS").glob("*.png")):
        assert not set(np.unique(read_synthia_label("synthia", p))) & {16, 18, 20}
    # DELIVER: RGB label, raw + 1 in channel 0; FMB raw ids
    sem = np.array(Image.open(first(sample, "deliver/semantic/*/train/*/*_semantic_front.png")))
    assert sem.ndim == 3 and sem[..., 0].max() <= 25 and sem[..., 0].min() >= 0
    assert np.array(Image.open(first(sample, "fmb/train/Label/*.png"))).max() <= 14
    # DSEC: timestamps one per label file; edges MADM-style (mid-grey background)
    for split, seq, n in (("train", "zurich_city_00_a", 17), ("test", "zurich_city_13_a", 5)):
        sem_dir = sample / "dsec" / split / seq / "semantic"
        ts = np.loadtxt(sem_dir / "timestamps.txt", dtype=np.int64)
        assert len(ts) == n == len(list(sem_dir.rglob("11classes/data/*.png")))
        assert (np.diff(ts) == 50_000).all()
    edge = np.array(Image.open(first(sample, "dsec/69mask_test_edges/*/*.png")))
    assert np.median(edge) in (127, 128) and edge.min() < 100 and edge.max() > 160


def test_events_h5(sample):
    h5py = pytest.importorskip("h5py")
    ev = sample / "dsec" / "test" / "zurich_city_13_a" / "events" / "left"
    with h5py.File(ev / "events.h5", "r") as f:
        for k in ("events/x", "events/y", "events/p", "events/t"):
            assert f[k].compression is None  # readable without hdf5plugin
        t = f["events/t"][()]
        assert t.dtype == np.int64 and (np.diff(t) >= 0).all()
        ms = f["ms_to_idx"][()]
        for m in (0, 5, len(ms) // 2, len(ms) - 1):  # ms_to_idx[m] = first event at or after m ms
            assert ms[m] == np.searchsorted(t, m * 1000, "left")
        assert set(np.unique(f["events/p"][()])) <= {0, 1}
        assert f["events/x"][()].max() < 80 and f["events/y"][()].max() < 60
    with h5py.File(ev / "rectify_map.h5", "r") as f:
        rm = f["rectify_map"][()]
    assert rm.shape == (60, 80, 2) and rm[7, 3].tolist() == [3.0, 7.0]


def test_modalities_follow_the_labels(sample):
    ir = build_dataset("fmb_infrared", sample, "train", train=False)
    hot, cold = [], []
    for i in range(len(ir)):
        it = ir[i]
        x, y = it["image"][0].numpy(), it["label"].numpy()
        hot += list(x[y == 2]), list(x[y == 7])  # person, car
        cold.append(x[y == 0])                   # sky
    hot_v = np.concatenate([np.asarray(h, np.float32).ravel() for h in hot])
    assert hot_v.mean() > np.concatenate(cold).mean() + 0.3
    dep = build_dataset("deliver_depth", sample, "test")
    it = dep[0]
    sky = it["label"].numpy() == 0
    assert sky.any() and it["image"][0].numpy()[sky].min() > 0.99  # sky is the brightest, farthest
    ev = build_dataset("dsec_event", sample, "test")
    it = ev[0]
    lab = it["label"].numpy()
    boundary = np.zeros_like(lab, bool)
    boundary[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    activity = np.abs(it["image"][0].numpy() - 0.5)
    sky_inside = (lab == 0) & ~boundary
    assert activity[boundary].mean() > activity[sky_inside].mean() + 0.05


def _pixels(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = build_dataset(name, root, split, train=False)
    xs, ys = [], []
    for i in range(len(ds)):
        it = ds[i]
        x, y = it["image"].permute(1, 2, 0).reshape(-1, 3).numpy(), it["label"].reshape(-1).numpy()
        xs.append(x[y != 255]), ys.append(y[y != 255])
    return np.concatenate(xs), np.concatenate(ys)


def _centroid_accuracy(src: tuple, tgt: tuple) -> float:
    """Nearest class-mean colour classifier fitted on `src`, pixel accuracy on `tgt`."""
    (xs, ys), (xt, yt) = src, tgt
    cent = np.full((19, 3), 1e3)
    for c in np.unique(ys):
        cent[c] = xs[ys == c].mean(0)
    pred = ((xt[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yt).mean())


def test_colour_signal_and_style_shift(sample, tmp_path):
    tgt = _pixels(sample, "cityscapes", "val")
    in_domain = _centroid_accuracy(_pixels(sample, "cityscapes", "train"), tgt)
    assert in_domain > 0.8  # class colour is a strong cue: a tiny model learns it in a few steps
    for src, split in (("gta5", "all"), ("synthia", "all"), ("bdd100k", "train"), ("acdc_night", "train")):
        cross = _centroid_accuracy(_pixels(sample, src, split), tgt)
        assert cross < in_domain - 0.25, src  # the style shift costs a source-only model accuracy
    # shift = 0: every dataset in the reference style, so GTA5 -> Cityscapes transfers
    flat = write_synthetic_sample(tmp_path / "s0", n_train=3, n_eval=2, seed=1, shift=0.0)
    cross0 = _centroid_accuracy(_pixels(flat, "gta5", "all"), _pixels(flat, "cityscapes", "val"))
    assert cross0 > in_domain - 0.1


def test_deterministic_per_seed_and_cli(tmp_path, capsys):
    from common.synthetic import main
    a = write_synthetic_sample(tmp_path / "a", n_train=2, n_eval=1, seed=7)
    main(["--out", str(tmp_path / "b"), "--n-train", "2", "--n-eval", "1", "--seed", "7"])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'b'} (")
    b = tmp_path / "b"
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.suffix == ".h5":
            h5py = pytest.importorskip("h5py")
            with h5py.File(a / rel, "r") as fa, h5py.File(b / rel, "r") as fb:
                keys = []
                fa.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset) else None)
                assert keys and all(np.array_equal(fa[k][()], fb[k][()]) for k in keys)
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = write_synthetic_sample(tmp_path / "c", n_train=2, n_eval=1, seed=8)
    rel = Path("cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png")
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_default_sample_fast_and_small(tmp_path):
    t = time.perf_counter()
    root = write_synthetic_sample(tmp_path / "syn")
    elapsed = time.perf_counter() - t
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert elapsed < 20, elapsed  # < 10 s on a free core; margin for busy CI machines
    assert size < 10e6, size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _ensure_child(root: str, queue) -> None:
    queue.put(str(ensure_synthetic_sample(root)))


def test_ensure_is_safe_under_concurrency(tmp_path):
    import multiprocessing as mp
    root = tmp_path / "shared" / "synthetic"
    ctx = mp.get_context("fork")  # two real processes racing on the same folder, without re-importing torch
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_child, args=(str(root), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    assert [queue.get(timeout=5) for _ in procs] == [str(root)] * 2
    assert (root / "SYNTHETIC").is_file()
    assert sorted(p.name for p in root.parent.iterdir()) == ["synthetic"]  # temporary folders removed
    assert len(build_dataset("cityscapes", root, "val")) == 4
    mtime = (root / "SYNTHETIC").stat().st_mtime_ns
    ensure_synthetic_sample(root)  # present and current: nothing rewritten
    assert (root / "SYNTHETIC").stat().st_mtime_ns == mtime


def test_ensure_rewrites_a_sample_written_before_h5py_was_installed(tmp_path, monkeypatch):
    """`--demo` before `pip install h5py` leaves a sample without events.h5; it must not be reused afterwards."""
    pytest.importorskip("h5py")
    root = tmp_path / "synthetic"
    events = root / "dsec" / "train" / "zurich_city_00_a" / "events" / "left" / "events.h5"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError, as without the package
        ensure_synthetic_sample(root)
        assert not events.exists()
        mtime = (root / "SYNTHETIC").stat().st_mtime_ns
        ensure_synthetic_sample(root)  # still no h5py: the sample is current, nothing rewritten
        assert (root / "SYNTHETIC").stat().st_mtime_ns == mtime
    ensure_synthetic_sample(root)  # h5py importable again: rewritten with the raw events
    assert events.is_file()
    assert json.loads((root / "SYNTHETIC").read_text())["raw_events"] is True
