"""Loaders, label maps, transforms, RCS and the one-line error messages of `common.datasets` (with
`common.layouts`, `common.readers` and `common.sampling`), on the synthetic sample.

The expected tables below are typed from their primary sources (listed in data/README.md "Class sets and label
maps"), not computed by the loaders; each label map is checked through the loader (a file with every raw
value, read back by `build_dataset`), not only as a constant.
"""
import json
import shutil
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import datasets as D
from common import layouts as L
from common import readers as R
from common.datasets import (CLASS_SETS, DATASETS, PALETTES, DatasetError, RareClassSampling, TrainStream,
                             build_dataset, check_pair, convert_labels, eval_input_size, resize_size)
from common.synthetic import ensure_synthetic_sample

ROOT = Path(__file__).resolve().parents[1]

# ---- expected tables ---------------------------------------------------------------------------------------
# cityscapesscripts/helpers/labels.py (labelId -> trainId)
CS_LABELID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# DAFormer tools/convert_datasets/synthia.py
SYNTHIA = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6, 16: 9,
           17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
# Rein tools/convert_datasets/mapillary2cityscape.py rules, written per target class (v1.2 ids)
MAPILLARY_BY_CLASS = {0: [7, 8, 10, 13, 14, 23, 24], 1: [2, 9, 11, 15], 2: [17], 3: [6], 4: [3],
                      5: [44, 45, 47], 6: [48], 7: [46, 49, 50], 8: [30], 9: [29], 10: [27], 11: [19],
                      12: [20, 21, 22], 13: [55],
                      14: [61], 15: [54], 16: [58], 17: [57], 18: [52]}
MAPILLARY_IGNORED = [0, 1, 4, 5, 12, 16, 18, 25, 26, 28, *range(31, 44), 51, 53, 56, 59, 60, *range(62, 66)]
# MADM config_files/common/data/*.py; 11 -> 9 and 9 -> 11 are our choice (255 = ignore)
CS_TO_11 = [5, 6, 1, 9, 2, 4, 10, 10, 7, 7, 0, 3, 3, 8, 8, 8, 8, 8, 8]
CS_TO_9 = [4, 5, 1, 255, 255, 3, 8, 8, 6, 6, 0, 2, 2, 7, 7, 7, 7, 7, 7]
DELIVER_RAWM1_TO_11 = [1, 2, 255, 3, 4, 5, 5, 6, 7, 8, 9, 10, 0, 255, 255, 255, 255, 10, 255, 255, 255,
                       7, 8, 8, 8]
FMB_TO_9 = [255, 4, 5, 1, 8, 8, 6, 0, 2, 7, 7, 7, 7, 7, 3]
C11_TO_9 = [0, 1, 255, 2, 3, 4, 5, 6, 7, 255, 8]
C9_TO_11 = [0, 1, 3, 4, 5, 6, 7, 8, 10]
CS_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
              (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
              (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
NAMES = ["cityscapes", "gta5", "synthia", "acdc", "acdc_fog", "acdc_night", "acdc_rain", "acdc_snow",
         "dark_zurich", "bdd100k", "mapillary", "dsec_event", "fmb_infrared", "deliver_depth"]


@pytest.fixture(scope="session")
def sample() -> Path:
    """The shared synthetic sample (what `--demo` uses); tests that modify files copy a dataset first."""
    return ensure_synthetic_sample(ROOT / "data" / "synthetic")


def copy_ds(sample: Path, folder: str, tmp_path: Path, marker: bool = True) -> Path:
    shutil.copytree(sample / folder, tmp_path / folder, ignore=shutil.ignore_patterns(".cache"))
    if marker:
        (tmp_path / "SYNTHETIC").write_text("{}")
    return tmp_path / folder


def png16(path: Path, arr: np.ndarray) -> None:
    """Independent 16-bit RGB PNG writer (not the one in common.synthetic)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def expected_lut(table: dict) -> np.ndarray:
    lut = np.full(256, 255, np.int64)
    for k, v in table.items():
        lut[k] = v
    return lut


# ---- registry, tables --------------------------------------------------------------------------------------
def test_registry_names_class_sets_palettes():
    assert list(DATASETS) == NAMES
    assert {n: DATASETS[n].num_classes for n in NAMES} == {
        **{n: 19 for n in NAMES[:11]}, "dsec_event": 11, "fmb_infrared": 9, "deliver_depth": 11}
    assert len(CLASS_SETS[19]) == 19 and len(CLASS_SETS[11]) == 11 and len(CLASS_SETS[9]) == 9
    assert CLASS_SETS[11][0] == "sky" and CLASS_SETS[11][10] == "traffic sign"
    assert CLASS_SETS[9][8] == "traffic sign"
    assert PALETTES[19].dtype == np.uint8 and PALETTES[19].tolist() == [list(c) for c in CS_PALETTE]
    assert PALETTES[11].shape == (11, 3) and PALETTES[9].shape == (9, 3)
    assert tuple(PALETTES[11][10]) == (250, 170, 30)  # MADM: traffic sign in the traffic-light colour
    assert tuple(PALETTES[11][0]) == (70, 130, 180) and tuple(PALETTES[9][2]) == (220, 20, 60)
    assert DATASETS["mapillary"].metric == "half"
    assert (DATASETS["dsec_event"].eval_input, DATASETS["dsec_event"].metric) == (("exact", (512, 512)), "input")


def test_constant_tables_match_spec():
    assert np.array_equal(R.make_lut(R.CITYSCAPES_LABELID_TO_TRAINID), expected_lut(CS_LABELID_TO_TRAINID))
    assert np.array_equal(R.make_lut(R.SYNTHIA_TO_TRAINID), expected_lut(SYNTHIA))
    mp = {i: c for c, ids in MAPILLARY_BY_CLASS.items() for i in ids}
    assert np.array_equal(R.make_lut(R.MAPILLARY_TO_TRAINID), expected_lut(mp))
    assert sorted(set(range(66)) - set(mp)) == MAPILLARY_IGNORED


def test_convert_labels_tables():
    for (s, t), table in {(19, 11): CS_TO_11, (19, 9): CS_TO_9, (11, 9): C11_TO_9, (9, 11): C9_TO_11}.items():
        lut = convert_labels(s, t)
        assert lut.shape == (256,) and lut.dtype == np.uint8
        assert lut[:s].tolist() == table, (s, t)
        assert (lut[s:] == 255).all()  # unknown and ignore stay 255
    for k in (19, 11, 9):
        lut = convert_labels(k, k)
        assert lut[:k].tolist() == list(range(k)) and lut[255] == 255
    for s in (11, 9):
        with pytest.raises(DatasetError, match="merged class cannot be split"):
            convert_labels(s, 19)


def test_check_pair_and_class_set_message():
    assert check_pair("cityscapes", "dsec_event") == 11
    assert check_pair("gta5", "cityscapes") == 19
    assert check_pair("cityscapes", "fmb_infrared") == 9
    assert check_pair("dsec_event", "fmb_infrared") == 9
    with pytest.raises(DatasetError) as e:
        check_pair("dsec_event", "cityscapes")
    assert str(e.value) == ("error: --src dsec_event has 11 classes but --tgt cityscapes needs 19; a merged "
                            "class cannot be split. Use a 19-class source (cityscapes, gta5, synthia, ...).")


def test_unknown_dataset_name_via_cli(capsys):
    from dataclasses import dataclass

    from common.cli import UserError, parse_args, run_cli

    @dataclass
    class Args:
        src: str = "gta5"
        tgt: str = "cityscapes"
    with pytest.raises(UserError) as e:
        parse_args(Args, ["--tgt", "cityscape"])
    assert str(e.value) == ("error: --tgt: unknown dataset 'cityscape'. Choose one of: cityscapes, gta5, "
                            "synthia, acdc, acdc_fog, acdc_night, acdc_rain, acdc_snow, dark_zurich, "
                            "bdd100k, mapillary, dsec_event, fmb_infrared, deliver_depth, or folder:PATH.")
    with pytest.raises(SystemExit) as ex:
        run_cli(lambda a: {}, Args, ["--tgt", "cityscape"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tgt: unknown dataset 'cityscape'")
    # the datasets side of the check: one function, the same line
    with pytest.raises(DatasetError) as d:
        D.dataset_info("cityscape", "--tgt")
    assert str(d.value) == str(e.value)


def test_sizes():
    assert resize_size(("keep", (1280, 720)), (1914, 1052)) == (1280, 704)  # GTA5's usual size
    assert resize_size(("exact", (1024, 512)), (2048, 1024), 1 / 8) == (128, 64)
    assert resize_size(("keep", (1024, 512)), (4000, 3000)) == (683, 512)
    # mmcv rescale_size: the box is (long edge, short edge), so a portrait image keeps its long edge <= 1024
    assert resize_size(("keep", (1024, 512)), (3000, 4000)) == (512, 683)
    assert eval_input_size("mapillary", (4000, 3000)) == (512, 683)
    assert resize_size(("keep", (1280, 720)), (1052, 1914)) == (704, 1280)
    assert eval_input_size("dsec_event", (440, 640)) == (512, 512)
    assert eval_input_size("cityscapes", (1024, 2048)) == (1024, 512)
    assert eval_input_size("gta5", (1052, 1914)) == (1280, 704)
    assert eval_input_size("mapillary", (3000, 4000), 1 / 8) == (85, 64)
    assert eval_input_size("fmb_infrared", (600, 800), 1 / 8) == (64, 64)


# ---- every loader ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_loader_on_synthetic(sample, name):
    info = DATASETS[name]
    allowed = set(range(info.num_classes)) | {255}
    ev = build_dataset(name, sample, "val")
    assert ev.split == info.eval_split and not ev.train and len(ev) > 0
    for i in range(min(2, len(ev))):
        it = ev[i]
        x, y = it["image"], it["label"]
        assert x.dtype == torch.float32 and x.ndim == 3 and x.shape[0] == 3
        assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.01
        assert y.dtype == torch.int64 and tuple(y.shape) == tuple(x.shape[1:])
        assert set(y.unique().tolist()) <= allowed
        assert len(set(y.unique().tolist()) - {255}) >= 2  # a real scene, not an empty map
        assert (ev.folder / it["name"]).is_file() and it["split"] == info.eval_split
        if ev.image_kind == "rgb":  # eval items keep the native size of the file
            w, h = Image.open(ev.folder / it["name"]).size
            assert tuple(x.shape[1:]) == (h, w)
        else:
            assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey replicated
    tr = build_dataset(name, sample, "train", scale=1 / 8, crop_size=64)  # the demo's setting
    assert tr.train and tr.split == info.train_split and len(tr) > 0
    s = tr.sample(len(tr) - 1, np.random.default_rng(0))
    assert tuple(s["image"].shape) == (3, 64, 64) and s["image"].dtype == torch.float32
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
    assert tuple(s["label"].shape) == (64, 64) and s["label"].dtype == torch.int64
    assert set(s["label"].unique().tolist()) <= allowed


def test_synthetic_split_sizes(sample):
    assert len(build_dataset("cityscapes", sample, "train")) == 8
    assert len(build_dataset("gta5", sample, "all")) == 12
    assert [p.name for p in (i.image for i in build_dataset("gta5", sample, "val").items)] == [
        "00050.png", "00100.png", "00150.png", "00200.png"]
    # ACDC: the *_ref folders are skipped; `acdc` is the union of its conditions
    per = [len(build_dataset(f"acdc_{c}", sample, "train")) for c in ("fog", "night", "rain", "snow")]
    assert sum(per) == len(build_dataset("acdc", sample, "train")) and all(n == 4 for n in per)
    # Dark Zurich: night only, train unlabeled
    dz = build_dataset("dark_zurich", sample, "train")
    assert len(dz) == 8 and not dz.has_labels and all("/night/" in it.name for it in dz.items)
    assert (dz[0]["label"] == 255).all()
    # FMB: test names interleave with train names
    tr, te = build_dataset("fmb_infrared", sample, "train"), build_dataset("fmb_infrared", sample, "test")
    assert len(tr) == 8 and len(te) == 4
    assert not {i.image.name for i in tr.items} & {i.image.name for i in te.items}
    # DELIVER: front camera only
    items = build_dataset("deliver_depth", sample).items
    assert all(i.image.name.endswith("_depth_front.png") for i in items)


def test_root_is_data_root_or_dataset_folder(sample):
    a = build_dataset("cityscapes", sample, "val")
    b = build_dataset("cityscapes", sample / "cityscapes", "val")
    assert a.folder == b.folder and torch.equal(a[0]["label"], b[0]["label"])


def test_cityscapes_label_paths_identical(sample, tmp_path):
    ti = build_dataset("cityscapes", sample, "train", train=False)  # the trainIds when complete
    d = copy_ds(sample, "cityscapes", tmp_path)
    next(d.glob("gtFine/train/*/*_labelTrainIds.png")).unlink()  # incomplete: the labelIds of every image
    li = build_dataset("cityscapes", d, "train", train=False)
    assert ti.label_kind == "cs_trainIds" and li.label_kind == "cs_labelIds"
    assert build_dataset("cityscapes", sample, "val").label_kind == "cs_labelIds"    # none on val: labelIds
    for i in range(len(ti)):
        assert np.array_equal(ti.load_label(i), li.load_label(i))


def _cityscapes_single(tmp_path: Path, label: np.ndarray, suffix: str = "labelIds") -> Path:
    d = tmp_path / "cityscapes"
    (d / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    (d / "gtFine" / "val" / "x").mkdir(parents=True)
    h, w = label.shape
    img = np.full((h, w, 3), 100, np.uint8)
    Image.fromarray(img).save(d / "leftImg8bit/val/x/x_000000_000019_leftImg8bit.png")
    Image.fromarray(label).save(d / f"gtFine/val/x/x_000000_000019_gtFine_{suffix}.png")
    (tmp_path / "SYNTHETIC").write_text("{}")
    return d


def test_cityscapes_labelids_through_loader(tmp_path):
    raw = np.array([list(range(34)), list(range(33, -1, -1))], np.uint8)  # labelIds are 0..33
    d = _cityscapes_single(tmp_path, raw)
    got = build_dataset("cityscapes", d, "val")[0]["label"].numpy()
    assert np.array_equal(got, expected_lut(CS_LABELID_TO_TRAINID)[raw])


def test_gta5_palette_indices_and_converted_files(sample, tmp_path):
    d = copy_ds(sample, "gta5", tmp_path)
    lab = Image.open(d / "labels" / "00001.png")
    assert lab.mode == "P"
    idx = np.array(lab)  # the indices = labelIds
    got = build_dataset("gta5", d, "all", train=False)[0]["label"].numpy()
    assert np.array_equal(got, expected_lut(CS_LABELID_TO_TRAINID)[idx])
    # DAFormer's converted files beside the raw ones are preferred when complete, paired by explicit suffix
    for p in sorted((d / "labels").glob("?????.png")):
        Image.fromarray(expected_lut(CS_LABELID_TO_TRAINID)[np.array(Image.open(p))].astype(np.uint8)).save(
            p.with_name(p.stem + "_labelTrainIds.png"))
    ds = build_dataset("gta5", d, "all", train=False)
    assert ds.label_kind == "trainIds" and len(ds) == 12 and np.array_equal(ds[0]["label"].numpy(), got)


def test_synthia_16bit_decode_and_map(tmp_path):
    d = tmp_path / "synthia"
    (d / "RGB").mkdir(parents=True)
    (d / "GT" / "LABELS").mkdir(parents=True)
    ids = np.arange(24, dtype=np.uint16).reshape(2, 12)
    gt = np.zeros((2, 12, 3), np.uint16)
    gt[..., 0] = ids
    gt[..., 1] = 1000 + np.arange(24).reshape(2, 12)  # instance ids > 255: only R may be used
    gt[0, 0, 0] = 256 + 3                             # high byte set: must not read as 3
    png16(d / "GT" / "LABELS" / "0000001.png", gt)
    Image.fromarray(np.zeros((2, 12, 3), np.uint8)).save(d / "RGB" / "0000001.png")
    assert np.array_equal(R.read_synthia_label("synthia", d / "GT" / "LABELS" / "0000001.png"), gt[..., 0])
    # why the trick exists: Pillow's default decode keeps only the high byte
    assert np.array_equal(np.array(Image.open(d / "GT" / "LABELS" / "0000001.png"))[..., 0], gt[..., 0] >> 8)
    (tmp_path / "SYNTHETIC").write_text("{}")
    got = build_dataset("synthia", d, "all", train=False)[0]["label"].numpy()
    exp = expected_lut(SYNTHIA)[np.minimum(gt[..., 0], 255)]
    exp[0, 0] = 255  # id 259 is not a SYNTHIA class
    assert np.array_equal(got, exp)


def test_synthia_all_zero_label_message(tmp_path):
    d = tmp_path / "synthia"
    (d / "RGB").mkdir(parents=True)
    (d / "GT" / "LABELS").mkdir(parents=True)
    png16(d / "GT" / "LABELS" / "0000001.png", np.zeros((2, 3, 3), np.uint16))
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(d / "RGB" / "0000001.png")
    (tmp_path / "SYNTHETIC").write_text("{}")
    with pytest.raises(DatasetError) as e:
        build_dataset("synthia", d, "all")
    p = d / "GT" / "LABELS" / "0000001.png"
    assert str(e.value) == (f"error: synthia: label '{p}' decoded with max 0; SYNTHIA labels are 16-bit RGB "
                            f"and are read with Pillow's RGB;16B + RGB;16L raw modes; upgrade Pillow if this "
                            f"fails.")


def test_mapillary_map_through_loader_and_config(sample, tmp_path):
    d = copy_ds(sample, "mapillary", tmp_path)
    img = sorted((d / "validation" / "images").glob("*.jpg"))[0]
    w, h = Image.open(img).size
    ids = (np.arange(h * w) % 66).astype(np.uint8).reshape(h, w)
    lab = Image.fromarray(ids)
    lab.putpalette(list(range(256)) * 3)
    lab.save(d / "validation" / "v1.2" / "labels" / f"{img.stem}.png")
    got = build_dataset("mapillary", d, "val")[0]["label"].numpy()
    mp = {i: c for c, v in MAPILLARY_BY_CLASS.items() for i in v}
    assert np.array_equal(got, expected_lut(mp)[ids])
    cfg = json.loads((d / "config_v1.2.json").read_text())
    assert len(cfg["labels"]) == 66
    cfg["labels"] = cfg["labels"] * 2
    (d / "config_v1.2.json").write_text(json.dumps(cfg))
    with pytest.raises(DatasetError, match="Expected the 66 labels of Vistas v1.2"):
        build_dataset("mapillary", d, "val")


def test_deliver_map_and_explicit_ignore(sample, tmp_path):
    d = copy_ds(sample, "deliver", tmp_path)
    ds = build_dataset("deliver_depth", d, "test")
    lab_path = ds.items[0].label
    h, w = np.array(Image.open(lab_path)).shape[:2]
    stored = np.array([list(range(26)) + [255]] * 2, np.uint8)
    full = np.zeros((h, w, 3), np.uint8)
    full[:2, :27, 0] = stored
    full[:2, :27, 1] = 7  # other channels never carry the class
    Image.fromarray(full).save(lab_path)
    got = ds[0]["label"].numpy()[:2, :27]
    exp = [255] + DELIVER_RAWM1_TO_11 + [255]  # stored 0 (unlabelled) -> 255 explicitly, 255 stays 255
    assert got[0].tolist() == exp and got[1].tolist() == exp


def test_fmb_map_through_loader(sample, tmp_path):
    d = copy_ds(sample, "fmb", tmp_path)
    ds = build_dataset("fmb_infrared", d, "test")
    lab_path = ds.items[0].label
    h, w = np.array(Image.open(lab_path)).shape
    raw = np.zeros((h, w), np.uint8)
    raw[0, :15] = np.arange(15)
    Image.fromarray(raw).save(lab_path)
    assert ds[0]["label"].numpy()[0, :15].tolist() == FMB_TO_9


def test_bdd_old_layout(sample, tmp_path):
    new = build_dataset("bdd100k", sample, "val")
    d = tmp_path / "bdd100k"
    for it in new.items:
        (d / "seg" / "images" / "val").mkdir(parents=True, exist_ok=True)
        (d / "seg" / "labels" / "val").mkdir(parents=True, exist_ok=True)
        shutil.copy(it.image, d / "seg" / "images" / "val" / it.image.name)
        shutil.copy(it.label, d / "seg" / "labels" / "val" / f"{it.image.stem}_train_id.png")
    (tmp_path / "SYNTHETIC").write_text("{}")
    old = build_dataset("bdd100k", tmp_path, "val")
    assert len(old) == len(new)
    assert torch.equal(old[1]["label"], new[1]["label"]) and torch.equal(old[1]["image"], new[1]["image"])


# ---- DSEC --------------------------------------------------------------------------------------------------
def without_edges(d: Path) -> Path:
    """Remove MADM's edge images from a DSEC copy: the loader then renders the raw events."""
    for e in d.glob("69mask_*_edges"):
        shutil.rmtree(e)
    return d


def test_dsec_edges_and_events(sample, tmp_path):
    pytest.importorskip("h5py")
    edges = build_dataset("dsec_event", sample, "test")  # the edge images when present
    d = without_edges(copy_ds(sample, "dsec", tmp_path))
    events = build_dataset("dsec_event", d, "test")
    assert edges.image_kind == "grey" and events.image_kind == "events"
    assert len(edges) == len(events) == 4
    for i in range(len(edges)):
        a, b = edges[i], events[i]
        assert tuple(a["image"].shape) == (3, 55, 80)  # 80x60 edge image cropped to the 55 label rows
        assert torch.equal(a["label"], b["label"])
        # both renders of the same events: same sign of the accumulated polarity at every pixel
        sa = torch.sign(a["image"][0] * 255 - 127.5)
        sb = torch.sign(b["image"][0] * 255 - 127.5)
        assert (sa == sb).float().mean() > 0.97
        # events exist (not all mid-grey)
        assert ((a["image"][0] * 255 - 128).abs() > 1).float().mean() > 0.05
    # frames: train even indices >= 2 (stride 2), test all >= 1
    tr = build_dataset("dsec_event", d, "train", scale=1 / 8, crop_size=32)
    assert [Path(it.name).stem for it in tr.items] == [f"{k:06d}" for k in range(2, 17, 2)]
    assert [Path(it.name).stem for it in events.items] == [f"{k:06d}" for k in range(1, 5)]


def test_dsec_edge_images_use_the_frame_rule_of_the_raw_events(sample, tmp_path):
    pytest.importorskip("h5py")
    d = copy_ds(sample, "dsec", tmp_path)
    # a download with more edge files than MADM's lists: frame 0 and odd train frames
    tr_dir = d / "69mask_train_edges" / "zurich_city_00_a"
    te_dir = d / "69mask_test_edges" / "zurich_city_13_a"
    for k in (0, 1, 3, 15):
        shutil.copy(tr_dir / "000002.png", tr_dir / f"{k:06d}.png")
    shutil.copy(te_dir / "000001.png", te_dir / "000000.png")

    def frames(ds):
        return [int(Path(it.name).stem) for it in ds.items]
    kw = dict(scale=1 / 8, crop_size=32)
    tr_edges, te_edges = build_dataset("dsec_event", d, "train", **kw), build_dataset("dsec_event", d, "test")
    without_edges(d)
    tr_events, te_events = build_dataset("dsec_event", d, "train", **kw), build_dataset("dsec_event", d, "test")
    assert tr_edges.image_kind == te_edges.image_kind == "grey" and te_events.image_kind == "events"
    assert frames(tr_edges) == frames(tr_events) == list(range(2, 17, 2))  # MADM: train even frames >= 2
    assert frames(te_edges) == frames(te_events) == [1, 2, 3, 4]  # MADM: test frames >= 1


def test_dsec_label_timestamp_before_t_offset_is_an_empty_window(sample, tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    d = without_edges(copy_ds(sample, "dsec", tmp_path))
    seq = d / "test" / "zurich_city_13_a"
    with h5py.File(seq / "events" / "left" / "events.h5", "r") as f:
        t_offset = int(f["t_offset"][()])
    ts_file = seq / "semantic" / "timestamps.txt"
    ts = [int(v) for v in ts_file.read_text().split()]
    ts[1] = t_offset - 1_000          # 1 ms before the event clock starts: ms index -1 would wrap around
    ts[2] = t_offset - 1_000_000_000  # 1000 s before: ms index -1e6 would be out of range
    ts_file.write_text("".join(f"{t}\n" for t in ts))
    ds = build_dataset("dsec_event", d, "test")
    assert [it.extra["t"] for it in ds.items[:2]] == ts[1:3]
    reads = []
    real_get = ds._events.get

    class Spy:  # records the length of every events/t slice that is read
        def __init__(self, f):
            self.f = f

        def __getitem__(self, key):
            v = self.f[key]
            if key != "events/t":
                return v

            class T:
                shape = v.shape

                def __getitem__(self, sl):
                    reads.append(sl.stop - sl.start)
                    return v[sl]
            return T()
    monkeypatch.setattr(ds._events, "get", lambda h5, path: Spy(real_get(h5, path)))
    with pytest.warns(UserWarning, match="empty event window"):
        for i in (0, 1):
            img = ds[i]["image"][0] * 255
            assert torch.all((img - 127.5).abs() <= 0.5)  # mid-grey: no event
            assert reads == []  # nothing read (a wrapped-around index would read the whole file)
    later = ds[2]["image"][0] * 255  # frame 3 is untouched
    assert reads and ((later - 127.5).abs() > 1).float().mean() > 0.05


def test_render_events_signed_and_rectified():
    rect = np.stack(np.meshgrid(np.arange(4, dtype=np.float32), np.arange(3, dtype=np.float32)), -1) + [1, 0]
    x = np.array([0, 0, 0, 2, 3], np.uint16)
    y = np.array([0, 0, 0, 1, 2], np.uint16)
    p = np.array([1, 1, 0, 0, 1], np.uint8)  # uint8 polarity must become -1/+1, not wrap around
    img = R.render_events(x, y, p, rect, (3, 4))
    assert img.dtype == np.uint8 and img.shape == (3, 4)
    assert img[0, 1] > 128 and img[1, 3] < 127 and img[0, 0] in (127, 128)  # shifted by the map; x'=4 dropped


def test_dsec_timestamps_mismatch(sample, tmp_path):
    pytest.importorskip("h5py")
    d = without_edges(copy_ds(sample, "dsec", tmp_path))
    ts = d / "test" / "zurich_city_13_a" / "semantic" / "timestamps.txt"
    ts.write_text(ts.read_text() + "1600000000999999\n")
    with pytest.raises(DatasetError) as e:
        build_dataset("dsec_event", d, "test")
    assert str(e.value) == ("error: dsec_event: 'zurich_city_13_a' has 6 timestamps but 5 label files; they "
                            "must match one to one.")


def test_dsec_missing_labels_message(sample, tmp_path):
    d = copy_ds(sample, "dsec", tmp_path)
    shutil.rmtree(d / "test_semantic_labels")
    shutil.rmtree(d / "test")
    with pytest.raises(DatasetError) as e:
        build_dataset("dsec_event", d, "test")
    assert str(e.value) == (
        "error: dsec_event: no labels for sequence 'zurich_city_13_a'. Tried "
        "test_semantic_labels/zurich_city_13_a/11classes/, test/zurich_city_13_a/semantic/11classes/data/, "
        "test/zurich_city_13_a/semantic/left/11classes/data/. Download DSEC-Semantic from "
        "https://dsec.ifi.uzh.ch/dsec-semantic/.")
    # the train edges without any label folder are an unlabeled target split
    shutil.rmtree(d / "train")
    tr = build_dataset("dsec_event", d, "train", scale=1 / 8, crop_size=32)
    assert not tr.has_labels and (tr.sample(0, np.random.default_rng(0))["label"] == 255).all()


def test_dsec_h5_without_keys(sample, tmp_path):
    h5py = pytest.importorskip("h5py")
    d = without_edges(copy_ds(sample, "dsec", tmp_path))
    ev = d / "test" / "zurich_city_13_a" / "events" / "left" / "events.h5"
    ev.unlink()
    with h5py.File(ev, "w") as f:
        f.create_dataset("events/x", data=np.zeros(3, np.uint16))
    with pytest.raises(DatasetError) as e:
        build_dataset("dsec_event", d, "test")
    assert str(e.value) == (f"error: dsec_event: '{ev}' lacks '/ms_to_idx' or '/t_offset'. Expected a DSEC "
                            f"events file (events/x, events/y, events/p, events/t, ms_to_idx, t_offset).")


def test_dsec_without_h5py(sample, tmp_path, monkeypatch):
    d = without_edges(copy_ds(sample, "dsec", tmp_path))
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(DatasetError) as e:
        build_dataset("dsec_event", d, "test")
    assert str(e.value) == (f"error: dsec_event: raw events need the optional package h5py (pip install h5py "
                            f"hdf5plugin), or the pre-rendered edge images in '{d}/69mask_test_edges/'.")


# ---- DELIVER depth dtypes ----------------------------------------------------------------------------------
def test_deliver_depth_dtypes(sample, tmp_path, capsys):
    d = copy_ds(sample, "deliver", tmp_path)
    ds = build_dataset("deliver_depth", d, "test")
    p = ds.items[0].image
    h, w = np.array(Image.open(p)).shape[:2]
    d16 = np.full((h, w), 40213, np.uint16)
    Image.fromarray(d16).save(p)
    R._notes_printed.clear()
    x = ds[0]["image"]
    assert abs(float(x[0, 0, 0]) - 40213 / 65535) < 1e-6
    note = f"note: deliver_depth: '{p}' is uint16 (max 40213); normalising by 65535."
    assert note in capsys.readouterr().out
    carla = np.zeros((h, w, 3), np.uint8)
    carla[..., 0], carla[..., 1], carla[..., 2] = 10, 20, 1  # different channels: CARLA 24-bit depth
    Image.fromarray(carla).save(p)
    metres = (10 + 256 * 20 + 65536 * 1) / (2**24 - 1) * 1000
    assert abs(float(ds[0]["image"][0, 3, 3]) - np.log1p(metres) / np.log1p(1000)) < 1e-5


# ---- transforms --------------------------------------------------------------------------------------------
def test_train_transform_matches_resize_then_crop(sample):
    ds = build_dataset("cityscapes", sample, "train", scale=1 / 8, crop_size=40)  # 256x128 -> 128x64
    im, lab = ds.load_image(2), ds.load_label(2)
    full = np.asarray(im.resize((128, 64), Image.BILINEAR)).astype(np.float32) / 255
    lab_r = np.asarray(Image.fromarray(lab).resize((128, 64), Image.NEAREST))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        y0, x0 = int(rng.integers(0, 64 - 40 + 1)), int(rng.integers(0, 128 - 40 + 1))
        flip = rng.random() < 0.5
        exp_img, exp_lab = full[y0:y0 + 40, x0:x0 + 40], lab_r[y0:y0 + 40, x0:x0 + 40]
        if flip:
            exp_img, exp_lab = exp_img[:, ::-1], exp_lab[:, ::-1]
        s = ds.sample(2, np.random.default_rng(seed))
        assert np.abs(s["image"].permute(1, 2, 0).numpy() - exp_img).max() <= 1.5 / 255
        assert np.array_equal(s["label"].numpy(), exp_lab)


def test_train_conversion_after_crop(sample):
    ds19 = build_dataset("cityscapes", sample, "train", scale=1 / 8, crop_size=48)
    ds11 = build_dataset("cityscapes", sample, "train", scale=1 / 8, crop_size=48, num_classes=11)
    a, b = ds19.sample(1, np.random.default_rng(5)), ds11.sample(1, np.random.default_rng(5))
    lut = np.array(CS_TO_11 + [255] * 237)
    assert np.array_equal(b["label"].numpy(), lut[a["label"].numpy()])
    assert ds11.class_names == CLASS_SETS[11] and ds11.num_classes == 11
    with pytest.raises(DatasetError):
        build_dataset("dsec_event", sample, "train", num_classes=19)


def test_cat_max_ratio(sample):
    ds = build_dataset("cityscapes", sample, "train", scale=1 / 8, crop_size=32, cat_max_ratio=0.75)
    ok = 0
    for seed in range(20):
        lab = ds.sample(0, np.random.default_rng(seed))["label"].numpy()
        cnt = np.bincount(lab[lab != 255], minlength=19)
        ok += int((cnt > 0).sum() > 1 and cnt.max() / cnt.sum() < 0.75)
    assert ok >= 15


def test_crop_too_large_message(sample):
    with pytest.raises(DatasetError) as e:
        build_dataset("dsec_event", sample, "train", scale=1 / 8, crop_size=1024)
    assert str(e.value) == ("error: --crop-size 1024 is larger than the resized dsec_event image (96x64 "
                            "after resize). Lower --crop-size.")


# ---- TrainStream, RCS --------------------------------------------------------------------------------------
def test_train_stream_determinism(sample):
    ds = build_dataset("gta5", sample, "all", scale=1 / 8, crop_size=32)
    s1, s2 = TrainStream(ds, seed=3, workers=0), TrainStream(ds, seed=3, workers=2)
    a = s1.batch(5, 0, 4)
    b = s2.batch(5, 0, 4)
    assert a["image"].shape == (4, 3, 32, 32) and a["label"].shape == (4, 32, 32) and len(a["name"]) == 4
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    left, right = s1.batch(5, 0, 2), s1.batch(5, 2, 2)
    assert torch.equal(a["image"], torch.cat([left["image"], right["image"]]))
    assert torch.equal(a["label"], torch.cat([left["label"], right["label"]]))
    assert a["name"] == left["name"] + right["name"]
    nxt = s2.batch(6, 0, 4)  # served by the prefetch
    assert torch.equal(nxt["image"], s1.batch(6, 0, 4)["image"])
    assert not torch.equal(a["image"], nxt["image"])
    # accumulation / DDP pattern: several micro-batches per step, each prefetched for the next step
    s3 = TrainStream(ds, seed=3, workers=2)
    for step in (7, 8, 9):
        parts = [s3.batch(step, k * 2, 2) for k in range(2)]
        whole = s1.batch(step, 0, 4)
        assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"])
    s3.close()
    other = TrainStream(ds, seed=3, stream_id=1, workers=0).batch(5, 0, 4)
    assert not torch.equal(a["image"], other["image"])
    single = s1.sample(5, 2)
    assert torch.equal(single["image"], a["image"][2])
    s2.close()


def test_rcs_statistics_cache_and_draws(sample, tmp_path, monkeypatch):
    d = copy_ds(sample, "gta5", tmp_path)
    ds = build_dataset("gta5", d, "all", scale=1 / 8, crop_size=48)
    rcs = RareClassSampling(ds, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5)
    # stats recomputed here from the labels
    counts = np.zeros(19)
    per_image = []
    for i in range(len(ds)):
        c = np.bincount(ds.load_label(i).ravel(), minlength=256)[:19]
        counts += c
        per_image.append(c)
    freq = counts / counts.sum()
    assert np.allclose(rcs.freq, freq)
    thr = round(3000 / 64)  # thresholds scale with the area (scale 1/8)
    assert rcs.min_pixels == thr and rcs.crop_min_pixels == int(3000 * 0.5 / 64)
    for c in range(19):
        assert rcs.samples[c] == [i for i in range(len(ds)) if per_image[i][c] > thr]
    cls = [c for c in range(19) if freq[c] > 0 and rcs.samples[c]]
    assert rcs.classes.tolist() == cls
    logits = (1 - freq[cls]) / 0.01
    p = np.exp(logits - logits.max())
    assert np.allclose(rcs.probs, p / p.sum())
    # draws favour rare classes: the rarest drawable class is drawn more often than the most frequent one
    rng = np.random.default_rng(0)
    draws = [rcs.draw(rng) for _ in range(3000)]
    hist = np.bincount([c for c, _ in draws], minlength=19)
    rare, common = min(cls, key=lambda c: freq[c]), max(cls, key=lambda c: freq[c])
    assert hist[rare] > hist[common] and hist[rare] / 3000 > freq[rare]
    assert all(i in rcs.samples[c] for c, i in draws)
    # the cache: a second construction reads JSON instead of decoding labels
    assert list((d / ".cache").glob("rcs_gta5_all_*.json"))
    monkeypatch.setattr(D.SegDataset, "load_label", lambda self, i: (_ for _ in ()).throw(AssertionError))
    again = RareClassSampling(ds)
    assert np.allclose(again.freq, rcs.freq)


def _read_only_tree(folder: Path, monkeypatch) -> None:
    """chmod a dataset tree read-only. As root chmod does not stop writes; then the loader's writability probe
    is made to say what a read-only mount would, so the fallback is still exercised."""
    for q in [folder, *folder.rglob("*")]:
        q.chmod(0o555 if q.is_dir() else 0o444)
    try:
        (folder / ".probe").write_text("x")
        (folder / ".probe").unlink()
    except OSError:
        return  # really read-only
    real = R._dir_writable
    inside = folder.resolve()
    monkeypatch.setattr(R, "_dir_writable",
                        lambda d: not Path(d).resolve().is_relative_to(inside) and real(d))


def test_caches_fall_back_to_the_user_cache_on_a_read_only_dataset(sample, tmp_path, monkeypatch):
    d = copy_ds(sample, "gta5", tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _read_only_tree(d, monkeypatch)
    try:
        ds = build_dataset("gta5", d, "all", scale=1 / 8, crop_size=48)
        rcs = RareClassSampling(ds)  # no cache_dir, as madm.py and iccld.py call it
        assert not (d / ".cache").exists()

        def no_decode(*a, **k):
            raise AssertionError("decoded again instead of reading the cache")
        # the second construction reads both caches: no header read, no label decode for the statistics
        with monkeypatch.context() as m:
            m.setattr(L, "image_size", no_decode)
            again = build_dataset("gta5", d, "all", scale=1 / 8, crop_size=48)
        with monkeypatch.context() as m:
            m.setattr(D.SegDataset, "load_label", no_decode)
            assert np.allclose(RareClassSampling(again).freq, rcs.freq)
        user = R.user_cache_dir(d)
        assert user.parent == tmp_path / "xdg" / "diffseg" and len(user.name) == 16
        assert len(list(user.glob("sizes_gta5_all_*.json"))) == 1
        assert len(list(user.glob("rcs_gta5_all_*.json"))) == 1
        # without XDG_CACHE_HOME: ~/.cache/diffseg/<hash>/
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert R.user_cache_dir(d) == tmp_path / "home" / ".cache" / "diffseg" / user.name
        build_dataset("gta5", d, "all", scale=1 / 8, crop_size=48)
        assert list(R.user_cache_dir(d).glob("sizes_gta5_all_*.json"))
        # an explicit cache_dir comes before the per-user folder
        assert R.cache_paths(d, tmp_path / "out", "x.json") == [
            d / ".cache" / "x.json", tmp_path / "out" / "x.json", R.user_cache_dir(d) / "x.json"]
    finally:
        for q in [d, *d.rglob("*")]:
            q.chmod(0o755 if q.is_dir() else 0o644)


def test_rcs_crops_hold_the_class(sample):
    ds = build_dataset("gta5", sample, "all", scale=1 / 8, crop_size=32)
    rcs = RareClassSampling(ds)
    stream, plain = TrainStream(ds, 0, rcs=rcs, workers=0), TrainStream(ds, 0, workers=0)
    rng = np.random.default_rng(1)
    hit_rcs = hit_plain = 0
    for j in range(40):
        c, i = rcs.draw(rng)
        s = ds.sample(i, np.random.default_rng(j), rcs_class=c, rcs_min_pixels=rcs.crop_min_pixels)
        hit_rcs += int((s["label"] == c).sum() > rcs.crop_min_pixels)
        s = ds.sample(int(np.random.default_rng(j).integers(len(ds))), np.random.default_rng(j))
        hit_plain += int((s["label"] == c).sum() > rcs.crop_min_pixels)
    # not every draw can succeed: an image qualifies with > 47 px at native size, the crop needs > 23 px after
    # the resize (as in DAFormer, where 3000 px at 1914x1052 shrink below 1500 px at 1280x704)
    assert hit_rcs > 2 * hit_plain + 5
    assert stream.batch(0, 0, 2)["image"].shape == (2, 3, 32, 32)
    assert plain.batch(0, 0, 1)["label"].shape == (1, 32, 32)


# ---- error messages ----------------------------------------------------------------------------------------
def test_missing_root_message(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_dataset("cityscapes", tmp_path, "val")
    r = tmp_path / "cityscapes"
    assert str(e.value) == (
        f"error: cityscapes: folder '{r}' not found. Expected '{r}/leftImg8bit/val/<city>/*_leftImg8bit.png' "
        f"and '{r}/gtFine/val/<city>/*_gtFine_labelIds.png'. Download leftImg8bit_trainvaltest.zip and "
        f"gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ and set --data-root.")


def test_missing_split_folder_message(sample, tmp_path):
    d = copy_ds(sample, "acdc", tmp_path)
    shutil.rmtree(d / "rgb_anon" / "fog" / "val")
    with pytest.raises(DatasetError) as e:
        build_dataset("acdc", tmp_path, "val")
    assert str(e.value) == (f"error: acdc: no folder 'rgb_anon/fog/val' under '{d}'. Expected "
                            f"rgb_anon/<fog|night|rain|snow>/<train|val|test>/<seq>/*_rgb_anon.png (official "
                            f"layout).")


def test_empty_split_message(sample, tmp_path):
    d = copy_ds(sample, "fmb", tmp_path)
    for p in (d / "test" / "Infrared").glob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset("fmb_infrared", tmp_path, "test")
    assert str(e.value) == f"error: fmb_infrared: '{d}/test/Infrared' contains no .png files."


def test_image_without_label_message(sample, tmp_path):
    d = copy_ds(sample, "gta5", tmp_path)
    (d / "labels" / "00003.png").unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset("gta5", d, "all")
    assert str(e.value) == (f"error: gta5: 12 images but 11 labels; first without a label: 00003.png. Images "
                            f"and labels are paired by stem in '{d}/images' and '{d}/labels'.")


def test_size_mismatch_message_and_gta_skip(sample, tmp_path):
    d = copy_ds(sample, "bdd100k", tmp_path)
    ds = build_dataset("bdd100k", d, "val")
    it = ds.items[1]
    lab = Image.open(it.label)
    lab.crop((0, 0, 160, 88)).save(it.label)
    with pytest.raises(DatasetError) as e:
        build_dataset("bdd100k", d, "val")
    assert str(e.value) == (f"error: bdd100k: image '{it.image}' is 160x90 but its label is 160x88. Image "
                            f"and label must have the same size.")
    g = copy_ds(sample, "gta5", tmp_path)
    lab = g / "labels" / "00002.png"
    Image.open(lab).crop((0, 0, 200, 100)).save(lab)
    with pytest.warns(UserWarning, match="skipped 1 image/label pairs"):
        ds = build_dataset("gta5", g, "all")
    assert len(ds) == 11 and "images/00002.png" not in [i.name for i in ds.items]


def test_out_of_range_ids_message(tmp_path):
    lab = np.zeros((4, 6), np.uint8)
    lab[0, :3] = [19, 26, 33]  # labelIds saved under the trainIds name
    d = _cityscapes_single(tmp_path, lab, "labelTrainIds")
    p = d / "gtFine/val/x/x_000000_000019_gtFine_labelTrainIds.png"
    with pytest.raises(DatasetError) as e:
        build_dataset("cityscapes", d, "val")
    assert str(e.value) == (f"error: cityscapes: label '{p}' has values {{19, 26, 33}} outside "
                            f"{{0..18, 255}}. This is a labelIds map; recreate the *_gtFine_labelTrainIds.png "
                            f"files (cityscapesScripts createTrainIdLabelImgs.py) or remove them to read "
                            f"*_gtFine_labelIds.png.")


def test_rgb_label_message(sample, tmp_path):
    d = copy_ds(sample, "bdd100k", tmp_path)
    ds = build_dataset("bdd100k", d, "val")
    p = ds.items[0].label
    Image.open(p).convert("RGB").save(p)
    with pytest.raises(DatasetError) as e:
        build_dataset("bdd100k", d, "val")
    assert str(e.value) == (f"error: bdd100k: label '{p}' is an RGB image. Expected a single-channel "
                            f"class-index PNG (not a colormap).")


def test_corrupt_file_message(sample, tmp_path):
    d = copy_ds(sample, "deliver", tmp_path)
    ds = build_dataset("deliver_depth", d, "test")
    p = ds.items[1].image
    p.write_bytes(p.read_bytes()[:60])  # truncated: the header still parses, the pixels do not
    with pytest.raises(DatasetError) as e:
        ds[1]
    msg = str(e.value)
    assert msg.startswith(f"error: deliver_depth: cannot read '{p}' (") and msg.endswith("). Re-download the "
                                                                                         "file.")
    p.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"^error: deliver_depth: cannot read '.*' \(.+\)\. Re-download "
                                           r"the file"):
        build_dataset("deliver_depth", d, "test")


def test_test_split_without_ground_truth(sample):
    ds = build_dataset("cityscapes", sample, "test")
    assert not ds.has_labels and (ds[0]["label"] == 255).all()


def test_count_warning_silenced_by_marker(sample, tmp_path):
    copy_ds(sample, "bdd100k", tmp_path / "a", marker=False)
    with pytest.warns(UserWarning, match="official release has 1000"):
        build_dataset("bdd100k", tmp_path / "a", "val")
    copy_ds(sample, "bdd100k", tmp_path / "b", marker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("bdd100k", tmp_path / "b", "val")


def test_acdc_flattened_daformer_layout(sample, tmp_path):
    src = sample / "acdc"
    d = tmp_path / "acdc"
    for kind in ("rgb_anon", "gt"):
        shutil.copytree(src / kind / "fog" / "train", d / kind / "train")
    (tmp_path / "SYNTHETIC").write_text("{}")
    flat = build_dataset("acdc", tmp_path, "train", train=False)
    official = build_dataset("acdc_fog", sample, "train", train=False)
    assert len(flat) == len(official) == 4
    assert torch.equal(flat[0]["label"], official[0]["label"])
    with pytest.raises(DatasetError, match="no folder 'rgb_anon/fog/train'"):
        build_dataset("acdc_fog", tmp_path, "train")  # the condition is lost in the flattened layout


def _rsync_flat_acdc(src: Path, dst: Path, split: str, per_condition: bool = False) -> dict:
    """DAFormer README: `rsync -a rgb_anon/*/<split>/*/* rgb_anon/<split>/` and the same for the gt
    labelTrainIds, i.e. every file directly in the split folder. Returns {new file name: original name}."""
    origin = {}
    for ci, cond in enumerate(("fog", "night", "rain", "snow")):
        for kind, suffix in (("rgb_anon", "_rgb_anon.png"), ("gt", "_gt_labelTrainIds.png")):
            out = dst / kind / cond / split if per_condition else dst / kind / split
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / kind / cond / split).glob(f"*/*{suffix}")):
                # real ACDC file names are unique across conditions; the synthetic ones repeat per condition
                new = f.name.replace("GOPR0", f"GOPR{ci + 1}")
                shutil.copy(f, out / new)
                origin[new] = f.relative_to(src).as_posix()
    return origin


def test_acdc_flattened_rsync_layout_pairs_labels_by_name(sample, tmp_path):
    d = tmp_path / "acdc"
    origin = _rsync_flat_acdc(sample / "acdc", d, "val")
    (tmp_path / "SYNTHETIC").write_text("{}")
    assert not list((d / "rgb_anon" / "val").glob("*/"))  # no sequence folder left
    flat = build_dataset("acdc", tmp_path, "val")
    official = build_dataset("acdc", sample, "val")
    assert len(flat) == len(official) == 8
    index = {it.name: j for j, it in enumerate(official.items)}
    labels = set()
    for i, it in enumerate(flat.items):
        assert it.image.parent == d / "rgb_anon" / "val" and it.label.parent == d / "gt" / "val"
        assert it.label.name == it.image.name.replace("_rgb_anon.png", "_gt_labelTrainIds.png")
        j = index[origin[it.image.name]]
        a, b = flat[i], official[j]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        labels.add(a["label"].numpy().tobytes())
    assert len(labels) == len(flat)  # every label differs, so a wrong pairing could not pass
    with pytest.raises(DatasetError, match="no folder 'rgb_anon/fog/val'"):
        build_dataset("acdc_fog", tmp_path, "val")


def test_acdc_flattened_per_condition(sample, tmp_path):
    d = tmp_path / "acdc"
    origin = _rsync_flat_acdc(sample / "acdc", d, "train", per_condition=True)
    (tmp_path / "SYNTHETIC").write_text("{}")
    fog = build_dataset("acdc_fog", tmp_path, "train", train=False)
    ref = build_dataset("acdc_fog", sample, "train", train=False)
    assert len(fog) == len(ref) == 4
    index = {it.name: j for j, it in enumerate(ref.items)}
    for i, it in enumerate(fog.items):
        assert it.image.parent == d / "rgb_anon" / "fog" / "train"
        assert torch.equal(fog[i]["label"], ref[index[origin[it.image.name]]]["label"])
    assert len(build_dataset("acdc", tmp_path, "train", train=False)) == 16


def test_mapillary_older_and_v2_layouts(sample, tmp_path):
    d = copy_ds(sample, "mapillary", tmp_path)
    ref = build_dataset("mapillary", d, "val")[0]["label"]
    (d / "validation" / "v1.2" / "labels").rename(d / "validation" / "labels")  # older download
    assert torch.equal(build_dataset("mapillary", d, "val")[0]["label"], ref)
    (d / "validation" / "v2.0").mkdir()
    (d / "validation" / "labels").rename(d / "validation" / "v2.0" / "labels")  # v2.0 only: not used
    with pytest.raises(DatasetError, match="no folder 'validation/v1.2/labels'"):
        build_dataset("mapillary", d, "val")


def test_unknown_split_and_name(sample):
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        build_dataset("cityscapes", sample, "validation")
    with pytest.raises(DatasetError, match="^error: unknown dataset 'acdc_haze'. Choose one of: cityscapes, "):
        build_dataset("acdc_haze", sample, "val")  # ACDC conditions are dataset names
    assert build_dataset("mapillary", sample, "validation").split == "validation"
    assert build_dataset("deliver_depth", sample, "val").split == "test"  # "val" is the eval split alias
