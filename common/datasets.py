"""The 14 dataset names of the four methods, read in their official on-disk layouts (documented, with download
pages, sizes and label-map sources, in data/README.md).

What is here, top to bottom:
- the registry `DATASETS` (folder, class set, splits, counts, train / eval sizes) and `EVAL_PROTOCOL`; your
  own data as `folder:PATH` (`dataset_info`, `_folder_items`, `_list_folder`; data/README.md "Your own data");
- class sets, palettes and every label map as 256-entry lookup tables, `convert_labels`, `check_pair`,
  `eval_input_size`;
- file readers that handle each dataset's label encoding (palette PNGs read as indices, SYNTHIA 16-bit labels
  through Pillow's raw modes, DELIVER depth by dtype, DSEC raw events rendered into an edge-like image);
- one listing function per layout, then `SegDataset` (eval items at native size, train items resized, cropped,
  flipped and converted), `RareClassSampling` (DAFormer RCS) and `TrainStream` (batches as a pure function of
  (seed, step, index), so resuming and DDP sharding need no sampler state).

Conventions: images float32 (3, H, W) in [0, 1] (grey modalities replicated to 3 channels); labels int64 (H,
W) with 255 = ignore; sizes are written (W, H) as in data/README.md, array shapes (H, W). Bad input fails at
construction with a one-line message (what is wrong, what was expected, how to fix it) as `DatasetError`, a
`UserError`.

Tags: [official] the dataset's own release or tooling, [ref: X] a public re-implementation, [our choice].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from common.console import UserError, progress

IGNORE = 255


class DatasetError(UserError):
    """A dataset on disk does not match its official layout or encoding (one line: what is wrong, what was
    expected, how to fix it)."""


# ------------------------------------------------------------------------------------------------------------
# Registry (the tables of data/README.md)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry.

    Attributes:
        name: the `--src` / `--tgt` name.
        folder: default folder under the data root.
        num_classes: size of the native class set (19, 11 or 9).
        train_split, eval_split: native split names used for training and for the metric.
        train_resize: ("exact", (W, H)) or ("keep", (W, H)) = keep-ratio into the box (`resize_size`).
        eval_input: same convention, the input size at evaluation.
        metric: "native" (label size), "half" (half the label size, Mapillary) or "input" (the eval input
            size; MADM's targets). The label is resized only for "half" and "input", with Pillow's NEAREST
            rule (`common.metrics.resize_label`), as Rein and MADM do.
        modality: "rgb" | "event" | "infrared" | "depth" | "auto" (`folder:PATH`: per file).
        download: where to get it.
        splits: every native split name the loader knows.
        no_gt_splits: splits listed without labels (no public ground truth, or an unlabeled target train
            split).
        counts: expected number of items per split (a mismatch is a warning: downloads differ slightly).
        native_size: typical native (W, H).
    """
    name: str
    folder: str
    num_classes: int
    train_split: str
    eval_split: str
    train_resize: tuple[str, tuple[int, int]]
    eval_input: tuple[str, tuple[int, int]]
    metric: str
    modality: str
    download: str
    splits: tuple[str, ...] = ()
    no_gt_splits: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()
    native_size: tuple[int, int] = (0, 0)


def _exact(w: int, h: int) -> tuple[str, tuple[int, int]]:
    return ("exact", (w, h))


def _keep(w: int, h: int) -> tuple[str, tuple[int, int]]:
    return ("keep", (w, h))


def _acdc_info(cond: Optional[str]) -> DatasetInfo:
    val_counts = {"fog": 100, "night": 106, "rain": 100, "snow": 100}
    n_val = val_counts[cond] if cond else sum(val_counts.values())
    return DatasetInfo(
        f"acdc_{cond}" if cond else "acdc", "acdc", 19, "train", "val", _exact(960, 540), _exact(960, 540),
        "native", "rgb",
        "https://acdc.vision.ee.ethz.ch/download (rgb_anon_trainvaltest.zip, gt_trainval.zip)",
        ("train", "val", "test"), ("test",), (("train", 400 if cond else 1600), ("val", n_val)), (1920, 1080))


# Fields in order: name, folder, classes, train split, eval split, train resize, eval input, metric, modality,
# download, splits, splits without labels, expected counts, native (W, H). Sizes: DAFormer's dataset configs
# (Cityscapes, GTA5, SYNTHIA, ACDC, Dark Zurich), Rein's (BDD100K, Mapillary), MADM's (DSEC, FMB, DELIVER);
# data/README.md "Train sizes and transform" names the files and the choices that are ours.
DATASETS: dict[str, DatasetInfo] = {
    "cityscapes": DatasetInfo(
        "cityscapes", "cityscapes", 19, "train", "val", _exact(1024, 512), _exact(1024, 512), "native", "rgb",
        "https://www.cityscapes-dataset.com/downloads/ "
        "(leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)",
        ("train", "val", "test"), ("test",), (("train", 2975), ("val", 500)), (2048, 1024)),
    # GTA5 and SYNTHIA are sources: "all" is the whole release, "val" the ids = 0 mod 50 [our choice]
    "gta5": DatasetInfo(
        "gta5", "gta5", 19, "all", "val", _keep(1280, 720), _keep(1280, 720), "native", "rgb",
        "https://download.visinf.tu-darmstadt.de/data/from_games/", ("all", "val"), (),
        (("all", 24966), ("val", 499)), (1914, 1052)),
    "synthia": DatasetInfo(
        "synthia", "synthia", 19, "all", "val", _exact(1280, 760), _exact(1280, 760), "native", "rgb",
        "https://synthia-dataset.net/downloads/ (SYNTHIA-RAND-CITYSCAPES)", ("all", "val"), (),
        (("all", 9400), ("val", 188)), (1280, 760)),
    "acdc": _acdc_info(None),
    "acdc_fog": _acdc_info("fog"),
    "acdc_night": _acdc_info("night"),
    "acdc_rain": _acdc_info("rain"),
    "acdc_snow": _acdc_info("snow"),
    # the train split is unlabeled (night images only) [ref: DAFormer CS->DZ]
    "dark_zurich": DatasetInfo(
        "dark_zurich", "dark_zurich", 19, "train", "val", _exact(960, 540), _exact(960, 540), "native", "rgb",
        "https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/ (Dark_Zurich_train_anon.zip, "
        "Dark_Zurich_val_anon.zip)",
        ("train", "val", "test"), ("train", "test"), (("train", 2416), ("val", 50)), (1920, 1080)),
    "bdd100k": DatasetInfo(
        "bdd100k", "bdd100k", 19, "train", "val", _exact(1280, 720), _exact(1280, 720), "native", "rgb",
        "https://bdd-data.berkeley.edu (10K images + semantic segmentation labels)", ("train", "val", "test"),
        ("test",), (("train", 7000), ("val", 1000)), (1280, 720)),
    "mapillary": DatasetInfo(
        "mapillary", "mapillary", 19, "training", "validation", _keep(1024, 512), _keep(1024, 512), "half",
        "rgb", "https://www.mapillary.com/dataset/vistas (v1.2)", ("training", "validation", "testing"),
        ("testing",), (("training", 18000), ("validation", 2000)), (0, 0)),
    "dsec_event": DatasetInfo(
        "dsec_event", "dsec", 11, "train", "test", _exact(768, 512), _exact(512, 512), "input", "event",
        "https://dsec.ifi.uzh.ch (events; DSEC-Semantic labels); edge PNGs: links in the XiaRho/MADM README",
        ("train", "test"), (), (("train", 4037), ("test", 2806)), (640, 440)),
    "fmb_infrared": DatasetInfo(
        "fmb_infrared", "fmb", 9, "train", "test", _exact(683, 512), _exact(512, 512), "input", "infrared",
        "links in the JinyuanLiu-CV/SegMiF README", ("train", "test"), (),
        (("train", 1220), ("test", 280)), (800, 600)),
    "deliver_depth": DatasetInfo(
        "deliver_depth", "deliver", 11, "train", "test", _exact(712, 712), _exact(512, 512), "input", "depth",
        "links in the jamycheung/DELIVER README", ("train", "val", "test"), (),
        (("train", 3983), ("test", 1897)), (1042, 1042)),
}

# name -> (eval input, metric resolution); see data/README.md "Evaluation sizes and resampling"
EVAL_PROTOCOL: dict[str, tuple[tuple[str, tuple[int, int]], str]] = {
    n: (i.eval_input, i.metric) for n, i in DATASETS.items()}

# Your own data: `folder:PATH` (data/README.md "Your own data"). Train resize and eval input keep the ratio
# into the Cityscapes box 1024x512 (long edge <= 1024, short edge <= 512, up or down; x --demo scale), so a
# crop of 512 always fits and a 1920x1080 camera gives 910x512 [our choice]; metric at the native label size.
FOLDER = "folder:"
FOLDER_SIZE = ("keep", (1024, 512))
FOLDER_SPLITS = ("train", "val", "predict")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_folder(name: str) -> bool:
    """True for a `folder:PATH` dataset name."""
    return name.startswith(FOLDER)


def run_tag(name: str) -> str:
    """A dataset name (or comma list) as it may appear in a run folder name: `folder:PATH` -> `folder-<last
    part of PATH>`, comma lists joined by "+"."""
    return "+".join(f"folder-{Path(n[len(FOLDER):]).resolve().name}" if is_folder(n) else n
                    for n in name.split(","))


def eval_target(name: str, predict: Optional[str]) -> tuple[str, str]:
    """(dataset, split) a script evaluates: `name`'s eval split, or with `--predict PATH` the "predict"
    split of `folder:PATH` (every image, no labels: `common.metrics.evaluate` writes a prediction for
    each)."""
    return (FOLDER + predict, "predict") if predict else (name, "val")


def dataset_info(name: str) -> DatasetInfo:
    """`DATASETS[name]`, or the entry of a `folder:PATH` dataset (its class set from `PATH/classes.txt`).

    Raises:
        DatasetError: an unknown name, a missing folder or a classes.txt naming no known class set.
    """
    if name in DATASETS:
        return DATASETS[name]
    if not is_folder(name):
        raise DatasetError(f"error: unknown dataset '{name}'. Choose one of: {', '.join(DATASETS)}, or "
                           f"folder:PATH.")
    path = Path(name[len(FOLDER):])
    if not path.is_dir():
        raise DatasetError(f"error: {name}: folder '{path}' not found. Expected a folder of .png/.jpg/.jpeg "
                           f"images, or {path}/images/ + {path}/labels/ (data/README.md, \"Your own data\").")
    return DatasetInfo(name, str(path), _folder_classes(name, path), "train", "val", FOLDER_SIZE, FOLDER_SIZE,
                       "native", "auto", "your own data", FOLDER_SPLITS)


def _folder_classes(name: str, path: Path) -> int:
    """Class set of a folder: 19 (Cityscapes) unless `classes.txt` holds one of 19 / 11 / 9, or the names of
    one of `CLASS_SETS` in order, one per line."""
    f = path / "classes.txt"
    if not f.is_file():
        return 19
    try:
        lines = [ln.strip().lower() for ln in f.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        raise DatasetError(f"error: {name}: cannot read '{f}'. Expected a text file: 19, 11 or 9, or class "
                           f"names, one per line.") from None
    for k, names in CLASS_SETS.items():
        if lines == [str(k)] or lines == list(names):
            return k
    raise DatasetError(f"error: {name}: '{f}' names no known class set ({len(lines)} lines). Expected one "
                       f"line 19, 11 or 9, or the names of one of these sets in order, one per line "
                       f"(data/README.md).")


# DSEC-Semantic sequences [official; ref: ESS, MADM]
DSEC_SEQUENCES = {
    "train": ("zurich_city_00_a", "zurich_city_01_a", "zurich_city_02_a", "zurich_city_04_a",
              "zurich_city_05_a", "zurich_city_06_a", "zurich_city_07_a", "zurich_city_08_a"),
    "test": ("zurich_city_13_a", "zurich_city_14_c", "zurich_city_15_a"),
}
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DELIVER_CONDITIONS = ("cloud", "fog", "night", "rain", "sun")

# ------------------------------------------------------------------------------------------------------------
# Class sets, palettes, label maps (sources: data/README.md "Class sets and label maps")
# ------------------------------------------------------------------------------------------------------------
CLASS_SETS: dict[int, tuple[str, ...]] = {
    19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
         "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
         "bicycle"),
    # [ref: MADM config_files/common/data/*.py]; ESS calls id 0 "background", MADM maps Cityscapes sky to it
    11: ("sky", "building", "fence", "person", "pole", "road", "sidewalk", "vegetation", "car", "wall",
         "traffic sign"),
    9: ("sky", "building", "person", "pole", "road", "sidewalk", "vegetation", "car", "traffic sign"),
}
# [official cityscapesscripts/helpers/labels.py] trainId colours
_CS_COLOURS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
               (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
               (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
               (0, 80, 100), (0, 0, 230), (119, 11, 32)]
_NAMED_COLOURS = dict(zip(CLASS_SETS[19], _CS_COLOURS))
# the 11/9-class "traffic sign" is drawn in the Cityscapes traffic-light colour, as in MADM
_NAMED_COLOURS_SMALL = {**_NAMED_COLOURS, "traffic sign": (250, 170, 30)}
PALETTES: dict[int, np.ndarray] = {
    19: np.array(_CS_COLOURS, np.uint8),
    11: np.array([_NAMED_COLOURS_SMALL[n] for n in CLASS_SETS[11]], np.uint8),
    9: np.array([_NAMED_COLOURS_SMALL[n] for n in CLASS_SETS[9]], np.uint8),
}

# [official cityscapesscripts/helpers/labels.py]; also the GTA5 palette indices
CITYSCAPES_LABELID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                                 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# [ref: DAFormer tools/convert_datasets/synthia.py, FDA]
SYNTHIA_TO_TRAINID = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6,
                      16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
# [ref: Rein tools/convert_datasets/mapillary2cityscape.py rules], v1.2 ids
MAPILLARY_TO_TRAINID = {
    **{i: 0 for i in (7, 8, 10, 13, 14, 23, 24)}, **{i: 1 for i in (2, 9, 11, 15)}, 17: 2, 6: 3, 3: 4,
    **{i: 5 for i in (44, 45, 47)}, 48: 6, **{i: 7 for i in (46, 49, 50)}, 30: 8, 29: 9, 27: 10, 19: 11,
    **{i: 12 for i in (20, 21, 22)}, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
# [ref: MADM]; keys are DELIVER raw - 1 (0 = Building ... 24 = Truck)
DELIVER_TO_11 = {0: 1, 1: 2, 3: 3, 4: 4, 5: 5, 6: 5, 7: 6, 8: 7, 9: 8, 10: 9, 11: 10, 12: 0, 17: 10, 21: 7,
                 22: 8, 23: 8, 24: 8}
# [ref: MADM]; FMB raw ids (0 = unlabelled)
FMB_TO_9 = {1: 4, 2: 5, 3: 1, 4: 8, 5: 8, 6: 6, 7: 0, 8: 2, 9: 7, 10: 7, 11: 7, 12: 7, 13: 7, 14: 3}
# [ref: MADM config_files/common/data/*.py]
CS19_TO_11 = {0: 5, 1: 6, 2: 1, 3: 9, 4: 2, 5: 4, 6: 10, 7: 10, 8: 7, 9: 7, 10: 0, 11: 3, 12: 3,
              **{i: 8 for i in range(13, 19)}}
CS19_TO_9 = {0: 4, 1: 5, 2: 1, 5: 3, 6: 8, 7: 8, 8: 6, 9: 6, 10: 0, 11: 2, 12: 2,
             **{i: 7 for i in range(13, 19)}}
C11_TO_9 = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 10: 8}  # [our choice]
C9_TO_11 = {0: 0, 1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 10}  # [our choice]


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry lookup table: `lut[v] = mapping.get(v, 255)`, with 255 -> 255.

    Returns:
        (256,) uint8. Apply once to a copy (`lut[label]`): never chain in-place replacements, which would
        remap a value that an earlier replacement produced.
    """
    lut = np.full(256, IGNORE, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    lut[IGNORE] = IGNORE
    return lut


def _deliver_lut() -> np.ndarray:
    # Stored value s = raw + 1 (0 = unlabelled). Do 0 -> 255 explicitly instead of relying on uint8
    # wrap-around of s - 1 (MADM's trick; with int64 it would give -1).
    lut = np.full(256, IGNORE, np.uint8)
    for raw_minus_1, c in DELIVER_TO_11.items():
        lut[raw_minus_1 + 1] = c
    return lut


_CONVERSIONS = {(19, 11): CS19_TO_11, (19, 9): CS19_TO_9, (11, 9): C11_TO_9, (9, 11): C9_TO_11}


def convert_labels(src_k: int, tgt_k: int) -> np.ndarray:
    """LUT from one class set to another: the model's class set is the target's [our choice].

    Args:
        src_k: the labels' class count (19, 11 or 9).
        tgt_k: the model's class count.
    Returns:
        (256,) uint8 LUT, default 255 and 255 -> 255; identity (except > K -> 255) when src_k == tgt_k.
    Raises:
        DatasetError: 11 -> 19 or 9 -> 19 (a merged class cannot be split) or an unknown class count.
    """
    if src_k == tgt_k and src_k in CLASS_SETS:
        return make_lut({i: i for i in range(src_k)})
    if (src_k, tgt_k) in _CONVERSIONS:
        return make_lut(_CONVERSIONS[(src_k, tgt_k)])
    if src_k in CLASS_SETS and tgt_k in CLASS_SETS:
        raise DatasetError(f"error: class sets: cannot convert {src_k}-class labels to {tgt_k} classes; a "
                           f"merged class cannot be split. Expected a conversion 19->19/11/9, 11->11/9 or "
                           f"9->9/11.")
    raise DatasetError(f"error: class sets: unknown class count "
                       f"{src_k if src_k not in CLASS_SETS else tgt_k}. Expected 19, 11 or 9.")


def check_pair(src: str, tgt: str) -> int:
    """The model's class count for a `--src` / `--tgt` pair (the target's); `tgt` may be a comma list.

    Raises:
        DatasetError: the source's class set cannot be mapped onto the target's (11 or 9 classes onto 19),
            or targets of a comma list have different class sets.
    """
    infos = {n: dataset_info(n) for n in [src] + tgt.split(",")}
    if is_folder(src):
        _folder_items(src, Path(src[len(FOLDER):]), source=True)  # a source folder is fully labelled
    tgts = tgt.split(",")
    ks = {infos[t].num_classes for t in tgts}
    if len(ks) > 1:
        raise DatasetError(f"error: --tgt {tgt}: the targets have different class sets ({sorted(ks)}). "
                           f"Expected targets sharing one class set.")
    k_src, k_tgt = infos[src].num_classes, ks.pop()
    if k_src != k_tgt and (k_src, k_tgt) not in _CONVERSIONS:
        # only 11 -> 19 and 9 -> 19 land here: every other pair of class sets has a table in `_CONVERSIONS`
        raise DatasetError(f"error: --src {src} has {k_src} classes but --tgt {tgts[0]} needs {k_tgt}; a "
                           f"merged class cannot be split. Use a {k_tgt}-class source (cityscapes, gta5, "
                           f"synthia, ...).")
    return k_tgt


def _scaled(v: int, scale: float) -> int:
    return max(1, int(v * scale + 0.5))


def resize_size(spec: tuple[str, tuple[int, int]], wh: tuple[int, int],
                scale: float = 1.0) -> tuple[int, int]:
    """Target (W, H) of a resize rule for an image of size `wh` = (w, h).

    Keep-ratio follows mmcv's `rescale_size` (`mmcv/image/geometric.py`), which mmseg's `Resize(keep_ratio=
    True)` calls: the box is a long edge and a short edge, not a width and a height, s = min(max(W, H) /
    max(w, h), min(W, H) / min(w, h)), size = int(w*s + 0.5) x int(h*s + 0.5). For landscape images this is
    min(W/w, H/h); a portrait Mapillary image 3000x4000 goes to 512x683 (long edge <= 1024, short <= 512),
    not to 384x512 [ref: mmseg].

    Args:
        spec: ("exact", (W, H)) or ("keep", (W, H)); the box is multiplied by `scale` first (the demo uses
            1/8).
        wh: the image's (w, h).
    Returns:
        (W, H).
    """
    mode, (bw, bh) = spec
    bw, bh = _scaled(bw, scale), _scaled(bh, scale)
    if mode == "exact":
        return bw, bh
    w, h = wh
    s = min(max(bw, bh) / max(w, h), min(bw, bh) / min(w, h))
    return int(w * s + 0.5), int(h * s + 0.5)


def eval_input_size(name: str, hw: tuple[int, int], scale: float = 1.0) -> tuple[int, int]:
    """The evaluation input size of `name` for an image of shape `hw` = (H, W) (`DATASETS[name].eval_input`).

    Only the size: eval items stay at native size and `common.metrics.evaluate` resamples them, with the
    filter of the reference a method compares with (`image_resize`: "bilinear" for mmseg / OpenCV,
    "pil-bilinear" for MADM's Pillow loader; `label_resize`: Pillow NEAREST). Keep-ratio sizes differ per
    image: pass `input_size=lambda hw: eval_input_size(name, hw, scale)` to `evaluate`.

    Returns:
        (W, H) to pass as `input_size` to `common.metrics.evaluate`.
    """
    h, w = hw
    return resize_size(dataset_info(name).eval_input, (w, h), scale)


# ------------------------------------------------------------------------------------------------------------
# File readers (every read checks mode / dtype: colour PNGs refused as labels, palette PNGs read as indices,
# 16-bit PNGs never cut to 8 bits)
# ------------------------------------------------------------------------------------------------------------
# Pillow modes of single-channel files (event frames, infrared, depth); `folder:PATH` reads them with
# `read_grey` as the named grey modalities are read, replicated to 3 channels [our choice]
GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_READ_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, EOFError, Image.DecompressionBombError)


def _corrupt(name: str, path: Path, e: BaseException) -> DatasetError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    fix = "Replace or remove it (a .png/.jpg/.jpeg file)" if is_folder(name) else "Re-download the file"
    return DatasetError(f"error: {name}: cannot read '{path}' ({reason}). {fix}.")


def _decode(name: str, path: Path, fn: Callable[[Image.Image], Any]) -> Any:
    """Open `path` with Pillow and apply `fn`; a decoder failure becomes the one-line "cannot read" error."""
    try:
        with Image.open(path) as im:
            return fn(im)
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise _corrupt(name, path, e) from None


def _image_size(name: str, path: Path) -> tuple[int, int]:
    """(W, H) from the file header only (no pixel decode)."""
    return _decode(name, path, lambda im: im.size)


def read_rgb(name: str, path: Path) -> Image.Image:
    """Decode an RGB image (PNG / JPEG). Images, unlike labels, may go through `.convert("RGB")`.

    Returns:
        a loaded PIL image in mode "RGB" (H, W, 3) uint8.
    """
    def fn(im: Image.Image) -> Image.Image:
        im.load()  # leaving the `with` block closes only the file; the decoded pixels stay (no copy needed)
        return im.convert("RGB") if im.mode != "RGB" else im
    return _decode(name, path, fn)


def read_label_array(name: str, path: Path, allow_rgb: bool = False) -> np.ndarray:
    """Decode a class-index label without any colour conversion.

    Palette ('P') PNGs give their indices (GTA5, Mapillary: never `.convert()`, which would turn them into
    colours); 'L' gives values.

    Args:
        allow_rgb: accept a 3-channel label (DELIVER keeps channel 0).
    Returns:
        uint8 (H, W), or (H, W, 3) when `allow_rgb` and the file is RGB.
    Raises:
        DatasetError: colour (RGB/RGBA) labels unless allowed, 16-bit labels, undecodable files.
    """
    def fn(im: Image.Image) -> np.ndarray:
        colour = im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr")
        if colour and not (allow_rgb and im.mode in ("RGB", "RGBA")):
            article = "an" if im.mode[0] in "RL" else "a"
            raise DatasetError(f"error: {name}: label '{path}' is {article} {im.mode} image. Expected a "
                               f"single-channel class-index PNG (not a colormap).")
        arr = np.asarray(im)
        if arr.dtype != np.uint8:
            raise DatasetError(f"error: {name}: label '{path}' is a {arr.dtype} image. Expected an 8-bit "
                               f"single-channel class-index PNG (not an instance-id or 16-bit map).")
        return arr
    return _decode(name, path, fn)


def _with_rawmode(im: Image.Image, rawmode: str) -> np.ndarray:
    # Pillow's PNG plugin describes a 16-bit RGB file as mode "RGB" with decoder raw mode "RGB;16B", which
    # keeps only the high byte of every sample. Replacing the raw mode of each tile before `load()` picks the
    # other byte.
    im.tile = [t._replace(args=rawmode if isinstance(t.args, str) else (rawmode,) + tuple(t.args[1:]))
               for t in im.tile]
    im.load()
    return np.asarray(im)[..., 0]


def read_synthia_label(name: str, path: Path) -> np.ndarray:
    """SYNTHIA `GT/LABELS/*.png`: 16 bits per channel RGB, class id in R [official SYNTHIA-RAND-CITYSCAPES].

    Decoded twice with Pillow's raw modes: "RGB;16B" gives the high bytes, "RGB;16L" (reading the big-endian
    samples as little-endian) the low bytes; value = high * 256 + low [our choice; checked with Pillow 13].

    Returns:
        uint16 (H, W) SYNTHIA ids.
    """
    def header(im: Image.Image) -> tuple[str, Any]:
        return im.mode, (im.tile[0].args if im.tile else None)
    mode, args = _decode(name, path, header)
    rawmode = args if isinstance(args, str) else (args[0] if args else None)
    if mode == "RGB" and rawmode == "RGB;16B":
        high = _decode(name, path, lambda im: _with_rawmode(im, "RGB;16B"))
        low = _decode(name, path, lambda im: _with_rawmode(im, "RGB;16L"))
        ids = high.astype(np.uint16) * 256 + low
    elif mode == "RGB":
        ids = _decode(name, path, lambda im: np.asarray(im)[..., 0]).astype(np.uint16)  # an 8-bit RGB export
    else:
        ids = read_label_array(name, path).astype(np.uint16)
    if ids.max() == 0:
        raise DatasetError(f"error: synthia: label '{path}' decoded with max 0; SYNTHIA labels are 16-bit "
                           f"RGB and are read with Pillow's RGB;16B + RGB;16L raw modes; upgrade Pillow if "
                           f"this fails.")
    return ids


_notes_printed: set[str] = set()


def _note_once(key: str, text: str) -> None:
    if key not in _notes_printed:
        _notes_printed.add(key)
        print(text, flush=True)


def read_grey(name: str, path: Path, depth: bool = False) -> np.ndarray:
    """A single-channel modality image (infrared, edges, depth) as float32 (H, W) in [0, 1].

    8-bit grey -> /255; 3 identical channels -> channel 0; 16-bit -> /65535 with a printed note (never through
    the /255 path). With `depth` (DELIVER), an RGB file with *different* channels is CARLA's 24-bit depth:
    d = (R + 256 G + 65536 B) / (2^24 - 1) * 1000 m, returned as log1p(d) / log1p(1000) [our choice].
    """
    arr = _decode(name, path, lambda im: np.asarray(im))
    if arr.ndim == 3:
        rgb = arr[..., :3]
        same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        if depth and not same:
            _note_once(f"{name}:carla", f"note: {name}: '{path}' is CARLA 24-bit RGB depth; decoding (R + "
                                        f"256G + 65536B)/(2^24-1)*1000 m, shown as log1p(d)/log1p(1000).")
            d = rgb.astype(np.float64) @ np.array([1.0, 256.0, 65536.0]) / (2**24 - 1) * 1000.0
            return (np.log1p(d) / np.log1p(1000.0)).astype(np.float32)
        arr = rgb[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32) and arr.size:
        _note_once(f"{name}:16", f"note: {name}: '{path}' is uint16 (max {int(arr.max())}); normalising by "
                                 f"65535.")
        return np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# DSEC raw events -> image [our choice; approximates MADM's pre-rendered edge PNGs, see data/README.md
# "dsec_event"]
# ------------------------------------------------------------------------------------------------------------
def _import_h5py(folder: Path, split: str) -> Any:
    try:
        # registers the Blosc/ZSTD filters of the official files; must be imported before h5py opens them
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"error: dsec_event: raw events need the optional package h5py (pip install h5py "
                           f"hdf5plugin), or the pre-rendered edge images in "
                           f"'{folder}/69mask_{split}_edges/'."
                           ) from None
    return h5py


def render_events(x: np.ndarray, y: np.ndarray, p: np.ndarray, rectify_map: np.ndarray,
                  hw: tuple[int, int]) -> np.ndarray:
    """Accumulate events into a MADM-like signed edge image [our choice].

    Each event moves to its rectified pixel (rounded; outside the label frame dropped), polarity 0/1 counts
    as -1/+1, and the per-pixel sums v are scaled around mid-grey: c = max(1, 95th percentile of |v| over
    v != 0), image = 127.5 + 127.5 * clip(v, -c, c) / c.

    Args:
        x, y: (N,) int pixel coordinates on the distorted sensor.
        p: (N,) polarity 0/1.
        rectify_map: (H_s, W_s, 2) float rectified (x', y') per sensor pixel [official DSEC rectify_map.h5].
        hw: (H, W) of the label frame (440 x 640 for DSEC); events outside are dropped.
    Returns:
        uint8 (H, W): 127/128 = no events, brighter = more positive events, darker = more negative.
    """
    h, w = hw
    v = np.zeros(h * w, np.int64)
    if len(x):
        xy = rectify_map[y.astype(np.int64), x.astype(np.int64)]  # (N, 2) float
        xr, yr = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
        keep = (xr >= 0) & (xr < w) & (yr >= 0) & (yr < h)
        pol = p[keep].astype(np.int64) * 2 - 1  # 0/1 -> -1/+1 in a signed dtype
        v = np.bincount(yr[keep] * w + xr[keep], weights=pol, minlength=h * w).astype(np.int64)
    nz = np.abs(v[v != 0])
    c = max(1.0, float(np.percentile(nz, 95))) if nz.size else 1.0
    img = 127.5 + 127.5 * np.clip(v, -c, c) / c
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(h, w)


class _EventFiles:
    """Per-process lazy handles on `events.h5` / `rectify_map.h5` (never opened before a DataLoader fork)."""

    def __init__(self) -> None:
        self.pid = -1
        self.lock = threading.Lock()
        self.files: dict[str, Any] = {}
        self.arrays: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {}  # handles never travel to workers: each process reopens

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, h5py: Any, path: Path) -> Any:
        with self.lock:
            if self.pid != os.getpid():
                self.files, self.arrays, self.pid = {}, {}, os.getpid()
            key = str(path)
            if key not in self.files:
                self.files[key] = h5py.File(key, "r")
            return self.files[key]

    def array(self, h5py: Any, path: Path, key: str) -> np.ndarray:
        f = self.get(h5py, path)
        with self.lock:
            if (str(path), key) not in self.arrays:
                self.arrays[(str(path), key)] = np.asarray(f[key][()])
            return self.arrays[(str(path), key)]


# ------------------------------------------------------------------------------------------------------------
# Layouts: each lister returns the items of one split (layouts: data/README.md)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    image: Optional[Path]          # None for raw DSEC events (rendered from the h5 file)
    label: Optional[Path]          # None for splits without ground truth
    name: str                      # path relative to the dataset folder
    extra: dict = field(default_factory=dict)


@dataclass
class _Listing:
    items: list[_Item]
    label_kind: str                # how to decode labels, see SegDataset._native_label
    image_kind: str                # "rgb" | "grey" | "depth" | "events" | "auto" (per file)
    has_labels: bool = True
    check_sizes: bool = True       # compare image and label sizes at construction
    size_mismatch: str = "error"   # "error" | "skip" (GTA5)
    crop_top: bool = False         # DSEC edge images of 640x480 -> top 440 rows (the label frame) [ref: MADM]


def _err_missing_split(name: str, folder: Path, rel: str, pattern: str) -> DatasetError:
    return DatasetError(f"error: {name}: no folder '{rel}' under '{folder}'. Expected {pattern} (official "
                        f"layout).")


def _err_empty(name: str, directory: Path, what: str = ".png") -> DatasetError:
    return DatasetError(f"error: {name}: '{directory}' contains no {what} files.")


def _pair(name: str, images: list[Path], label_for: Callable[[Path], Path], img_dir: Path, lab_dir: Path,
          folder: Path, n_labels_present: Callable[[], int]) -> list[_Item]:
    """Pair every image with its label by explicit suffix (never `*.png`: DAFormer's converted files sit next
    to the raw ones)."""
    items = []
    for img in images:
        lab = label_for(img)
        if not lab.is_file():
            n_lab = n_labels_present()
            raise DatasetError(f"error: {name}: {len(images)} images but {n_lab} labels; first without a "
                               f"label: {img.name}. Images and labels are paired by stem in '{img_dir}' and "
                               f"'{lab_dir}'.")
        items.append(_Item(img, lab, img.relative_to(folder).as_posix()))
    return items


def _unlabeled(images: list[Path], folder: Path) -> _Listing:
    """A split without ground truth: items carry all-ignore labels, the metric refuses it."""
    return _Listing([_Item(p, None, p.relative_to(folder).as_posix()) for p in images], "none", "rgb", False)


def _require_dir(name: str, folder: Path, rel: str, pattern: str) -> Path:
    d = folder / rel
    if not d.is_dir():
        raise _err_missing_split(name, folder, rel, pattern)
    return d


def _list_cityscapes(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = ("leftImg8bit/<train|val|test>/<city>/*_leftImg8bit.png and "
               "gtFine/<split>/<city>/*_gtFine_labelIds.png")
    img_dir = _require_dir(name, folder, f"leftImg8bit/{split}", pattern)
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise _err_empty(name, img_dir, "*_leftImg8bit.png")
    if split in DATASETS[name].no_gt_splits:
        return _unlabeled(images, folder)
    lab_dir = _require_dir(name, folder, f"gtFine/{split}", pattern)
    fmt = opts.get("label_format", "auto")

    def label_path(img: Path, suffix: str) -> Path:
        stem = img.name[: -len("_leftImg8bit.png")]
        return lab_dir / img.parent.name / f"{stem}_gtFine_{suffix}.png"
    # trainIds if the converted files are complete for this split, else labelIds [our choice]
    if fmt == "auto":
        fmt = "trainIds" if all(label_path(p, "labelTrainIds").is_file() for p in images) else "labelIds"
    if fmt not in ("trainIds", "labelIds"):
        raise DatasetError(f"error: --label-format: unknown value '{fmt}'. Expected auto, trainIds or "
                           f"labelIds.")
    suffix = "labelTrainIds" if fmt == "trainIds" else "labelIds"
    items = _pair(name, images, lambda p: label_path(p, suffix), img_dir, lab_dir, folder,
                  lambda: len(list(lab_dir.glob(f"*/*_gtFine_{suffix}.png"))))
    return _Listing(items, "cs_trainIds" if fmt == "trainIds" else "cs_labelIds", "rgb")


def _list_numbered(name: str, folder: Path, split: str, opts: dict, img_rel: str, lab_rel: str, digits: int,
                   raw_kind: str, download_hint: str) -> _Listing:
    """GTA5 (`images/NNNNN.png`, 5 digits) and SYNTHIA (`RGB/NNNNNNN.png`, 7 digits)."""
    pattern = f"{img_rel}/{'N' * digits}.png and {lab_rel}/{'N' * digits}.png ({download_hint})"
    img_dir = _require_dir(name, folder, img_rel, pattern)
    lab_dir = _require_dir(name, folder, lab_rel, pattern)
    num = re.compile(rf"^\d{{{digits}}}\.png$")  # raw files are exactly N digits + .png
    images = sorted(p for p in img_dir.iterdir() if num.match(p.name))
    if split == "val":  # ids = 0 mod 50 [our choice]
        images = [p for p in images if int(p.stem) % 50 == 0]
    if not images:
        raise _err_empty(name, img_dir, f"{'N' * digits}.png")
    fmt = opts.get("label_format", "auto")
    if fmt == "auto":  # DAFormer's converted files if complete, else the raw encoding
        complete = all((lab_dir / f"{p.stem}_labelTrainIds.png").is_file() for p in images)
        fmt = "trainIds" if complete else "raw"
    if fmt == "labelIds":
        fmt = "raw"
    if fmt not in ("trainIds", "raw"):
        raise DatasetError(f"error: --label-format: unknown value '{fmt}'. Expected auto, trainIds or "
                           f"labelIds.")
    suffix = "_labelTrainIds" if fmt == "trainIds" else ""
    items = _pair(name, images, lambda p: lab_dir / f"{p.stem}{suffix}.png", img_dir, lab_dir, folder,
                  lambda: len([q for q in lab_dir.iterdir()
                               if re.match(rf"^\d{{{digits}}}{suffix}\.png$", q.name)]))
    listing = _Listing(items, "trainIds" if fmt == "trainIds" else raw_kind, "rgb")
    if name == "gta5":
        listing.size_mismatch = opts.get("size_mismatch", "skip")
    return listing


def _acdc_files(directory: Path, suffix: str) -> list[Path]:
    """`*<suffix>` files directly in `directory` and one folder deeper (sorted, no duplicates).

    The official ACDC release keeps a sequence folder (`<split>/<seq>/<file>`); DAFormer's README flattens it
    with `rsync -a rgb_anon/*/<split>/*/* rgb_anon/<split>/` (the same for `gt/`), which leaves the files
    directly in the split folder. Only the exact split folder is listed, so `*_ref` folders never match.
    """
    return sorted(set(directory.glob(f"*{suffix}")) | set(directory.glob(f"*/*{suffix}")))


def _acdc_label_finder(img_dir: Path, lab_dir: Path) -> Callable[[Path], Path]:
    """Image path -> label path, for nested, flattened or mixed image and label folders.

    The label is `<stem>_gt_labelTrainIds.png` at the image's own relative path under `lab_dir` when it is
    there, else the one file of that name anywhere in `lab_dir` (directly or in a sequence folder): ACDC names
    (`GOPRxxxx_frame_NNNNNN`) are unique across sequences. A missing or ambiguous name gives the expected
    nested path, which `_pair` reports as "first without a label".
    """
    by_name: dict[str, list[Path]] = {}
    for q in _acdc_files(lab_dir, "_gt_labelTrainIds.png"):
        by_name.setdefault(q.name, []).append(q)

    def label_for(img: Path) -> Path:
        fname = img.name[: -len("_rgb_anon.png")] + "_gt_labelTrainIds.png"
        same = lab_dir / img.relative_to(img_dir).parent / fname
        if same.is_file():
            return same
        found = by_name.get(fname, [])
        return found[0] if len(found) == 1 else same
    return label_for


def _list_acdc(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    """ACDC in the official nested layout or DAFormer's flattened one (data/README.md "acdc").

    Official: `rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png`. Flattened [ref: DAFormer README, `rsync -a
    rgb_anon/*/<split>/*/* rgb_anon/<split>/`]: `rgb_anon/<split>/*_rgb_anon.png` and
    `gt/<split>/*_gt_labelTrainIds.png`, files directly in the split folder. The flattened folder is used only
    when no selected condition has `rgb_anon/<cond>/<split>/` (DAFormer's rsync copies, so both usually exist
    and the official one, which keeps the condition, wins) and only for `acdc`: the condition is lost there,
    so `acdc_<cond>` and `--conditions` need the condition folders [our choice]. Inside any split folder,
    files may sit directly in it or in sequence folders (a per-condition flattening also works); labels are
    paired by file name, not by the parent folder.
    """
    pattern = "rgb_anon/<fog|night|rain|snow>/<train|val|test>/<seq>/*_rgb_anon.png"
    if name != "acdc":
        conds = [name.split("_", 1)[1]]
    else:
        conds = list(opts.get("conditions") or ACDC_CONDITIONS)
        if isinstance(opts.get("conditions"), str):
            conds = [c for c in opts["conditions"].split(",") if c]
        bad = [c for c in conds if c not in ACDC_CONDITIONS]
        if bad:
            raise DatasetError(f"error: --conditions: unknown ACDC condition '{bad[0]}'. Expected a comma "
                               f"list of {', '.join(ACDC_CONDITIONS)}.")
    flat = (name == "acdc" and (folder / "rgb_anon" / split).is_dir()
            and not any((folder / "rgb_anon" / c / split).is_dir() for c in conds))
    if flat and sorted(set(conds)) != sorted(ACDC_CONDITIONS):
        raise DatasetError(f"error: --conditions: '{folder}/rgb_anon/{split}/' is DAFormer's flattened ACDC "
                           f"layout, which has no condition folders. Expected {pattern} (official layout) "
                           f"to select conditions, or no --conditions.")
    no_gt = split in DATASETS[name].no_gt_splits
    items: list[_Item] = []
    for cond in ([""] if flat else conds):
        rel = f"rgb_anon/{split}" if flat else f"rgb_anon/{cond}/{split}"
        img_dir = _require_dir(name, folder, rel, pattern)
        images = _acdc_files(img_dir, "_rgb_anon.png")
        if not images:
            raise _err_empty(name, img_dir, "*_rgb_anon.png")
        if no_gt:
            items += [_Item(p, None, p.relative_to(folder).as_posix()) for p in images]
            continue
        lab_rel = f"gt/{split}" if flat else f"gt/{cond}/{split}"
        lab_dir = _require_dir(name, folder, lab_rel, "gt/<cond>/<split>/<seq>/*_gt_labelTrainIds.png")
        items += _pair(name, images, _acdc_label_finder(img_dir, lab_dir), img_dir, lab_dir, folder,
                       lambda: len(_acdc_files(lab_dir, "_gt_labelTrainIds.png")))
    return _Listing(items, "none" if no_gt else "trainIds", "rgb", not no_gt)


def _list_dark_zurich(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = "rgb_anon/<train|val|test>/night/<seq>/*_rgb_anon.png"
    # train conditions are day / twilight / night; the target split is night [ref: DAFormer CS->DZ]
    img_dir = _require_dir(name, folder, f"rgb_anon/{split}/night", pattern)
    images = sorted(img_dir.glob("*/*_rgb_anon.png"))
    if not images:
        raise _err_empty(name, img_dir, "*_rgb_anon.png")
    if split in DATASETS[name].no_gt_splits:
        return _unlabeled(images, folder)
    lab_dir = _require_dir(name, folder, f"gt/{split}/night", "gt/val/night/<seq>/*_gt_labelTrainIds.png")
    items = _pair(name, images, lambda p: lab_dir / p.parent.name / p.name.replace(
        "_rgb_anon.png", "_gt_labelTrainIds.png"), img_dir, lab_dir, folder,
        lambda: len(list(lab_dir.glob("*/*_gt_labelTrainIds.png"))))
    return _Listing(items, "trainIds", "rgb")


def _list_bdd(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = "images/10k/<train|val|test>/*.jpg and labels/sem_seg/masks/<split>/*.png"
    if (folder / "images" / "10k").is_dir():
        img_dir = _require_dir(name, folder, f"images/10k/{split}", pattern)
        lab_dir, lab_suffix = folder / "labels" / "sem_seg" / "masks" / split, ".png"
        lab_rel = f"labels/sem_seg/masks/{split}"
    else:  # the older release: seg/images/<split>/*.jpg + seg/labels/<split>/*_train_id.png [ref: mmseg]
        img_dir = _require_dir(name, folder, f"seg/images/{split}",
                               pattern + " (or seg/images/<split>/*.jpg)")
        lab_dir, lab_suffix = folder / "seg" / "labels" / split, "_train_id.png"
        lab_rel = f"seg/labels/{split}"
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise _err_empty(name, img_dir, ".jpg")
    if split in DATASETS[name].no_gt_splits:
        return _unlabeled(images, folder)
    _require_dir(name, folder, lab_rel, pattern)
    items = _pair(name, images, lambda p: lab_dir / f"{p.stem}{lab_suffix}", img_dir, lab_dir, folder,
                  lambda: len(list(lab_dir.glob(f"*{lab_suffix}"))))
    return _Listing(items, "trainIds", "rgb")


def _list_mapillary(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = "<training|validation>/images/*.jpg and <split>/v1.2/labels/*.png"
    img_dir = _require_dir(name, folder, f"{split}/images", pattern)
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise _err_empty(name, img_dir, ".jpg")
    cfg = folder / "config_v1.2.json"
    if cfg.is_file():  # v1.2 has 66 labels, v2.0 has 124
        try:
            n = len(json.loads(cfg.read_text())["labels"])
        except (ValueError, KeyError, TypeError) as e:
            raise _corrupt(name, cfg, e) from None
        if n != 66:
            raise DatasetError(f"error: mapillary: '{cfg}' lists {n} labels. Expected the 66 labels of "
                               f"Vistas v1.2 (v2.0 with 124 is not used).")
    if split in DATASETS[name].no_gt_splits:
        return _unlabeled(images, folder)
    lab_dir = folder / split / "v1.2" / "labels"
    if not lab_dir.is_dir():
        lab_dir = folder / split / "labels"  # older downloads: labels/ directly under the split (v1.x)
    if not lab_dir.is_dir():
        raise _err_missing_split(name, folder, f"{split}/v1.2/labels",
                                 pattern + " (v2.0 labels are not used)")
    items = _pair(name, images, lambda p: lab_dir / f"{p.stem}.png", img_dir, lab_dir, folder,
                  lambda: len(list(lab_dir.glob("*.png"))))
    return _Listing(items, "mapillary", "rgb")


def _list_fmb(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = "<train|test>/{Infrared,Visible,Label}/NNNNN.png"
    img_dir = _require_dir(name, folder, f"{split}/Infrared", pattern)
    images = sorted(img_dir.glob("*.png"))  # always list the split folder: test names interleave with train
    if not images:
        raise _err_empty(name, img_dir)
    lab_dir = _require_dir(name, folder, f"{split}/Label", pattern)
    items = _pair(name, images, lambda p: lab_dir / p.name, img_dir, lab_dir, folder,
                  lambda: len(list(lab_dir.glob("*.png"))))
    return _Listing(items, "fmb", "grey")


def _list_deliver(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    pattern = "depth/<cloud|fog|night|rain|sun>/<train|val|test>/<map>/*_depth_front.png (not hha/)"
    _require_dir(name, folder, "depth", pattern)
    conds = [c for c in DELIVER_CONDITIONS if (folder / "depth" / c / split).is_dir()]
    if not conds:
        raise _err_missing_split(name, folder, f"depth/{DELIVER_CONDITIONS[0]}/{split}", pattern)
    items: list[_Item] = []
    for cond in conds:
        img_dir = folder / "depth" / cond / split
        lab_dir = _require_dir(name, folder, f"semantic/{cond}/{split}",
                               "semantic/<cond>/<split>/<map>/*_semantic_front.png")
        images = sorted(img_dir.glob("*/*_depth_front.png"))  # front camera only
        items += _pair(name, images, lambda p: lab_dir / p.parent.name / p.name.replace(
            "_depth_front.png", "_semantic_front.png"), img_dir, lab_dir, folder,
            lambda: len(list(lab_dir.glob("*/*_semantic_front.png"))))
    if not items:
        raise _err_empty(name, folder / "depth" / conds[0] / split, "*_depth_front.png")
    return _Listing(items, "deliver", "depth")


def _dsec_label_dir(folder: Path, split: str, seq: str, events: bool) -> tuple[Optional[Path], list[str]]:
    tried = [f"test_semantic_labels/{seq}/11classes/", f"{split}/{seq}/semantic/11classes/data/",
             f"{split}/{seq}/semantic/left/11classes/data/"]
    # MADM's layout has no timestamps: the raw-event path needs an ESS layout
    for rel in (tried[1:] if events else tried):
        if (folder / rel).is_dir():
            return folder / rel, tried
    return None, tried


def _dsec_stride(split: str, opts: dict) -> int:
    """Frame stride: `frame_stride` if given, else 2 for train and 1 for test [ref: MADM lists]."""
    raw = opts.get("frame_stride") or (2 if split == "train" else 1)
    try:
        stride = int(raw)
    except (TypeError, ValueError):
        stride = 0
    if stride < 1:
        raise DatasetError(f"error: --frame-stride: invalid value '{raw}'. Expected a positive integer (2 "
                           f"for train, 1 for test by default).")
    return stride


def _dsec_frame_kept(k: int, stride: int) -> bool:
    """DSEC frame sampling: frames k >= 1 with k % stride == 0 (the stride is printed).

    Frame 0 has no preceding events. MADM's lists (`data/json_file/Cityscapes_RGB_to_DSEC_Event_{train,test}
    .json` in XiaRho/MADM) hold exactly these frames: every train sequence 2, 4, 6, ... (4,037 in all), every
    test sequence 1, 2, 3, ... (2,806). The same rule applies to the edge PNGs (frame = file stem) and to the
    raw events (frame = index of the label file, one timestamp each), so both inputs list the same frames even
    when a download holds more edge files than MADM's lists [ref: MADM].
    """
    return k >= 1 and k % stride == 0


def _list_dsec(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    mode = opts.get("dsec_input", "auto")
    edges_dir = folder / f"69mask_{split}_edges"
    if mode == "auto":
        mode = "edges" if edges_dir.is_dir() else "events"
    if mode not in ("edges", "events"):
        raise DatasetError(f"error: --dsec-input: unknown value '{mode}'. Expected auto, edges or events.")
    seqs = DSEC_SEQUENCES[split]
    stride = _dsec_stride(split, opts)
    items: list[_Item] = []
    has_labels = True
    if mode == "edges":
        present = [s for s in seqs if (edges_dir / s).is_dir()]
        if not present:
            raise _err_missing_split(name, folder, f"69mask_{split}_edges/{seqs[0]}",
                                     f"69mask_{split}_edges/<seq>/NNNNNN.png for {', '.join(seqs)}")
        for seq in present:
            # frame = the file stem (NNNNNN.png); the frames of MADM's lists, not every file present
            files = sorted(p for p in (edges_dir / seq).glob("*.png")
                           if p.stem.isdigit() and _dsec_frame_kept(int(p.stem), stride))
            lab_dir, tried = _dsec_label_dir(folder, split, seq, events=False)
            if lab_dir is None:
                if split == "test":
                    raise DatasetError(f"error: dsec_event: no labels for sequence '{seq}'. Tried "
                                       f"{', '.join(tried)}. Download DSEC-Semantic from "
                                       f"https://dsec.ifi.uzh.ch/dsec-semantic/.")
                # MADM's train split is an unlabeled target: items get all-ignore labels
                has_labels = False
                items += [_Item(p, None, p.relative_to(folder).as_posix()) for p in files]
                continue
            items += _pair(name, files, lambda p: lab_dir / p.name, edges_dir / seq, lab_dir, folder,
                           lambda: len(list(lab_dir.glob("*.png"))))
        if not items:
            raise DatasetError(f"error: dsec_event: '{edges_dir / present[0]}' contains no NNNNNN.png frames "
                               f"kept by the frame rule (frames >= 1, stride {stride}). Expected MADM's edge "
                               f"images 69mask_{split}_edges/<seq>/NNNNNN.png.")
        _note_once(f"dsec:{split}:edges:stride", f"dsec_event {split}: edge images, frame stride {stride}, "
                                                 f"frames >= 1 ({len(items)} frames)")
        if not has_labels:
            _note_once(f"dsec:{split}:nolabels", f"note: dsec_event: no labels for the {split} edge images; "
                                                 f"items carry all-ignore labels (an unlabeled target "
                                                 f"split).")
            has_labels = all(it.label is not None for it in items)
        return _Listing(items, "trainIds" if has_labels else "none", "grey", has_labels, crop_top=True)
    # raw events: the same frames as the edge images (`_dsec_frame_kept`)
    h5py = _import_h5py(folder, split)
    present = [s for s in seqs if (folder / split / s).is_dir()]
    if not present:
        raise _err_missing_split(name, folder, f"{split}/{seqs[0]}",
                                 f"{split}/<seq>/events/left/events.h5 and "
                                 f"{split}/<seq>/semantic/11classes/data/")
    for seq in present:
        ev = folder / split / seq / "events" / "left" / "events.h5"
        rect = ev.parent / "rectify_map.h5"
        for f in (ev, rect):
            if not f.is_file():
                raise DatasetError(f"error: dsec_event: no file '{f.relative_to(folder)}' under '{folder}'. "
                                   f"Expected {split}/<seq>/events/left/{{events.h5,rectify_map.h5}} "
                                   f"(official layout).")
        _check_events_h5(h5py, ev)
        lab_dir, tried = _dsec_label_dir(folder, split, seq, events=True)
        if lab_dir is None:
            raise DatasetError(f"error: dsec_event: no labels for sequence '{seq}'. Tried "
                               f"{', '.join(tried)}. Download DSEC-Semantic from "
                               f"https://dsec.ifi.uzh.ch/dsec-semantic/.")
        labels = sorted(lab_dir.glob("*.png"))
        sem = lab_dir.parent.parent  # .../semantic or .../semantic/left
        candidates = (sem / "timestamps.txt", sem.parent / "timestamps.txt")
        ts_file = next((p for p in candidates if p.is_file()), None)
        if ts_file is None:
            raise DatasetError(f"error: dsec_event: no timestamps.txt for sequence '{seq}' in '{sem}'. "
                               f"Expected one int64 microsecond timestamp per label file (DSEC-Semantic).")
        ts = np.loadtxt(ts_file, dtype=np.int64, ndmin=1)  # int64 us: never through float
        if len(ts) != len(labels):
            raise DatasetError(f"error: dsec_event: '{seq}' has {len(ts)} timestamps but {len(labels)} label "
                               f"files; they must match one to one.")
        for k, lab in enumerate(labels):
            if _dsec_frame_kept(k, stride):
                items.append(_Item(None, lab, lab.relative_to(folder).as_posix(),
                                   {"seq": seq, "t": int(ts[k]), "events": ev, "rectify": rect}))
    if not items:
        raise _err_empty(name, folder / split, "label")
    _note_once(f"dsec:{split}:stride", f"dsec_event {split}: raw events, frame stride {stride}, frames >= 1 "
                                       f"({len(items)} frames), window {opts.get('event_window_ms', 50)} ms")
    return _Listing(items, "trainIds", "events", check_sizes=False)


def _check_events_h5(h5py: Any, path: Path) -> None:
    """Open, check the keys of, and close one events file (handles are reopened lazily per worker)."""
    try:
        with h5py.File(path, "r") as f:
            keys = ("events/x", "events/y", "events/p", "events/t", "ms_to_idx", "t_offset")
            ok = all(k in f for k in keys)
    except OSError as e:
        raise _corrupt("dsec_event", path, e) from None
    if not ok:
        raise DatasetError(f"error: dsec_event: '{path}' lacks '/ms_to_idx' or '/t_offset'. Expected a DSEC "
                           f"events file (events/x, events/y, events/p, events/t, ms_to_idx, t_offset).")


def _folder_items(name: str, path: Path, source: bool = False) -> list[_Item]:
    """Every image of a `folder:PATH` dataset with its label where there is one (data/README.md "Your own
    data"): the images are `PATH/images/**` if that folder exists, else `PATH/**` (.png/.jpg/.jpeg, any case,
    hidden folders skipped); the label of `images/<rel>/<stem>.<ext>` is `labels/<rel>/<stem>.png`. A source
    (`source`) needs images/ and labels/ and a label for every image. Item names are relative to the image
    folder, so predictions keep the folder structure.
    """
    img_dir, lab_dir = path / "images", path / "labels"
    layout = f"{path}/images/ + {path}/labels/ (trainId PNGs, same stems)"
    if lab_dir.is_dir() and not img_dir.is_dir():
        raise DatasetError(f"error: {name}: '{lab_dir}' has no images/ folder beside it. Expected {layout}.")
    root = img_dir if img_dir.is_dir() else path
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise DatasetError(f"error: {name}: '{root}' contains no .png/.jpg/.jpeg images. Expected a folder "
                           f"of images (searched recursively) or {layout}.")
    if source and not (img_dir.is_dir() and lab_dir.is_dir()):
        raise DatasetError(f"error: --src {name}: a source needs labels. Expected {layout}.")
    items, stems = [], {}
    for img in images:
        rel = img.relative_to(root).with_suffix("")
        if rel in stems:
            raise DatasetError(f"error: {name}: '{stems[rel]}' and '{img}' share the stem '{rel}'. Expected "
                               f"one image per stem (labels are paired by stem).")
        stems[rel] = img
        lab = lab_dir / rel.with_name(rel.name + ".png")
        items.append(_Item(img, lab if lab.is_file() else None, img.relative_to(root).as_posix()))
    if source and any(it.label is None for it in items):
        first = next(it for it in items if it.label is None)
        raise DatasetError(f"error: --src {name}: {len(items)} images but "
                           f"{sum(it.label is not None for it in items)} labels; first without a label: "
                           f"images/{first.name}. Expected {lab_dir}/<same stem>.png for every image.")
    return items


def _check_folder(name: str, path: Path, items: list[_Item], k: int) -> None:
    """Read every image header and decode every label once: 8-bit single channel, values in {0..K-1, 255},
    the size of its image. Cached by the file list, like the header sizes: a folder is checked once, before
    anything is written, so a bad file never stops a run half-way."""
    paths = _cache_candidates(path, None, f"folder_check_{k}_"
                              f"{_files_hash([p for it in items for p in (it.image, it.label)])}.json")
    if _read_json_cache(paths, lambda d: d.get("n") == len(items)) is not None:
        return

    def check(it: _Item) -> None:
        w, h = _image_size(name, it.image)
        if it.label is None:
            return
        lab = read_label_array(name, it.label)
        bad = _bad_values(lab, np.r_[np.arange(k), IGNORE])
        if bad.size:
            raise DatasetError(f"error: {name}: label '{it.label}' has values {_fmt_set(bad)} outside "
                               f"{{0..{k - 1}, 255}}. Expected trainIds of the {k}-class set (255 = ignore; "
                               f"classes.txt names another set).")
        if (w, h) != lab.shape[::-1]:
            raise DatasetError(f"error: {name}: image '{it.image}' is {w}x{h} but its label is "
                               f"{lab.shape[1]}x{lab.shape[0]}. Image and label must have the same size.")
    _parallel_map(check, items)
    _write_json_cache(paths, {"n": len(items)})


def _list_folder(name: str, folder: Path, split: str, opts: dict) -> _Listing:
    """`folder:PATH`: "train" = every image (labels where present), "val" = the labelled images if there are
    any, else every image without labels (pictures, no metric), "predict" = every image, no labels."""
    items = _folder_items(name, folder)
    if split == "predict":
        items = [_Item(it.image, None, it.name) for it in items]
    _check_folder(name, folder, items, dataset_info(name).num_classes)
    labelled = [it for it in items if it.label is not None]
    if split == "val" and labelled:
        items = labelled
    return _Listing(items, "trainIds", "auto", bool(labelled), check_sizes=False)


_LISTERS: dict[str, Callable[[str, Path, str, dict], _Listing]] = {
    "cityscapes": _list_cityscapes,
    "gta5": lambda n, f, s, o: _list_numbered(n, f, s, o, "images", "labels", 5, "cs_labelIds_palette",
                                              "palette PNGs of Cityscapes labelIds"),
    "synthia": lambda n, f, s, o: _list_numbered(n, f, s, o, "RGB", "GT/LABELS", 7, "synthia16",
                                                 "16-bit RGB, id in R"),
    **{n: _list_acdc for n in ("acdc", "acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")},
    "dark_zurich": _list_dark_zurich,
    "bdd100k": _list_bdd,
    "mapillary": _list_mapillary,
    "dsec_event": _list_dsec,
    "fmb_infrared": _list_fmb,
    "deliver_depth": _list_deliver,
}
# subfolders that identify a dataset folder passed directly as `root`
_MARKERS = {"cityscapes": ("leftImg8bit",), "gta5": ("images", "labels"), "synthia": ("RGB", "GT"),
            "acdc": ("rgb_anon", "gt"), "dark_zurich": ("rgb_anon",), "bdd100k": ("images", "seg", "labels"),
            "mapillary": ("training", "validation", "testing"),
            "dsec": ("69mask_train_edges", "69mask_test_edges", "test_semantic_labels", "train", "test"),
            "fmb": ("train", "test"), "deliver": ("depth", "semantic")}
_ROOT_HINTS = {
    "cityscapes": ("leftImg8bit/{split}/<city>/*_leftImg8bit.png",
                   "gtFine/{split}/<city>/*_gtFine_labelIds.png",
                   "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                   "https://www.cityscapes-dataset.com/downloads/"),
    "gta5": ("images/NNNNN.png", "labels/NNNNN.png", "the images and labels zips from "
             "https://download.visinf.tu-darmstadt.de/data/from_games/"),
    "synthia": ("RGB/NNNNNNN.png", "GT/LABELS/NNNNNNN.png", "SYNTHIA-RAND-CITYSCAPES from "
                "https://synthia-dataset.net/downloads/"),
    "acdc": ("rgb_anon/<cond>/{split}/<seq>/*_rgb_anon.png", "gt/<cond>/{split}/<seq>/*_gt_labelTrainIds.png",
             "rgb_anon_trainvaltest.zip and gt_trainval.zip from https://acdc.vision.ee.ethz.ch/download"),
    "dark_zurich": ("rgb_anon/{split}/night/<seq>/*_rgb_anon.png",
                    "gt/val/night/<seq>/*_gt_labelTrainIds.png",
                    "Dark_Zurich_train_anon.zip and Dark_Zurich_val_anon.zip from "
                    "https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/"),
    "bdd100k": ("images/10k/{split}/*.jpg", "labels/sem_seg/masks/{split}/*.png",
                "the 10K images and semantic segmentation labels from https://bdd-data.berkeley.edu"),
    "mapillary": ("{split}/images/*.jpg", "{split}/v1.2/labels/*.png",
                  "Mapillary Vistas v1.2 from https://www.mapillary.com/dataset/vistas"),
    "dsec_event": ("69mask_{split}_edges/<seq>/NNNNNN.png", "test_semantic_labels/<seq>/11classes/NNNNNN.png",
                   "the edge images (links in the XiaRho/MADM README) and DSEC-Semantic from "
                   "https://dsec.ifi.uzh.ch/dsec-semantic/"),
    "fmb_infrared": ("{split}/Infrared/NNNNN.png", "{split}/Label/NNNNN.png",
                     "FMB (links in the JinyuanLiu-CV/SegMiF README)"),
    "deliver_depth": ("depth/<cond>/{split}/<map>/*_depth_front.png",
                      "semantic/<cond>/{split}/<map>/*_semantic_front.png",
                      "DELIVER (links in the jamycheung/DELIVER README)"),
}


def resolve_folder(name: str, root: str | Path, split: str = "train") -> Path:
    """The dataset's folder: `root/<default folder>` if it exists, else `root` itself if it looks like one.

    Raises:
        DatasetError: neither exists (one line naming the expected paths and the download page).
    """
    info = DATASETS[name]
    root = Path(root)
    sub = root / info.folder
    if sub.is_dir():
        return sub
    if root.is_dir() and any((root / m).is_dir() for m in _MARKERS[info.folder]):
        return root
    shown = root if root.name == info.folder else sub
    a, b, how = _ROOT_HINTS["acdc" if name.startswith("acdc") else name]
    raise DatasetError(f"error: {name}: folder '{shown}' not found. Expected "
                       f"'{shown}/{a.format(split=split)}' and '{shown}/{b.format(split=split)}'. Download "
                       f"{how} and set --data-root.")


def native_split(name: str, split: str) -> str:
    """Map the aliases "train" / "val" to the registry's train / eval split; native names pass through."""
    info = dataset_info(name)
    # the aliases win over native names: "val" is DELIVER's eval split "test", not its own "val" [our choice]
    if split == "train":
        return info.train_split
    if split == "val":
        return info.eval_split
    if split in info.splits:
        return split
    raise DatasetError(f"error: {name}: unknown split '{split}'. Expected train, val or one of "
                       f"{', '.join(info.splits)}.")


def is_synthetic(folder: Path) -> bool:
    """True inside the synthetic sample (a `SYNTHETIC` marker in the folder or its parent)."""
    return (folder / "SYNTHETIC").is_file() or (folder.parent / "SYNTHETIC").is_file()


# ------------------------------------------------------------------------------------------------------------
# Small caches (header sizes, RCS statistics) keyed by a hash of the file list
# ------------------------------------------------------------------------------------------------------------
def _files_hash(paths: Sequence[Optional[Path]]) -> str:
    """Hash of the file list with sizes and modification times, so a replaced file invalidates a cache."""
    h = hashlib.sha1()
    for p in paths:
        if p is None:
            h.update(b"-\n")
            continue
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def user_cache_dir(folder: Path) -> Optional[Path]:
    """The per-user cache folder of one dataset folder: `$XDG_CACHE_HOME/diffseg/<hash>/`, or
    `~/.cache/diffseg/<hash>/` when XDG_CACHE_HOME is unset; <hash> = 16 hex digits of the SHA-1 of the
    resolved dataset folder, so two copies of a dataset never share entries. None when the process has no
    home folder either (then only the other candidates are used)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    digest = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(base) / "diffseg" / digest


def _cache_candidates(folder: Path, cache_dir: Optional[str | Path], fname: str) -> list[Path]:
    """Where a cache file may live, in order: `<dataset>/.cache/`, an explicit `cache_dir`, the per-user
    `user_cache_dir(folder)`. Writes go to the first writable one, reads look in all of them, so a read-only
    dataset (a shared GTA5 copy) still computes its header sizes and RCS statistics once per user, with no
    flag to pass [our choice]."""
    out = [folder / ".cache" / fname]
    if cache_dir is not None:
        out.append(Path(cache_dir) / fname)
    user = user_cache_dir(folder)
    if user is not None:
        out.append(user / fname)
    return list(dict.fromkeys(out))  # drop duplicates, keep the order


def _dir_writable(directory: Path) -> bool:
    """Whether files can be created in `directory` (or, when it does not exist yet, in its nearest existing
    ancestor, where it would be created). `os.access` answers for the real user and sees read-only mounts;
    as root it says True for a chmod-protected folder, and the write then simply succeeds."""
    d = Path(directory)
    while not d.exists():
        if d.parent == d:
            return False
        d = d.parent
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def _read_json_cache(paths: list[Path], valid: Callable[[dict], bool] = lambda d: True) -> Optional[dict]:
    """The first candidate that exists, parses and passes `valid`; None if none does."""
    for p in paths:
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and valid(data):
                return data
    return None


def _write_json_cache(paths: list[Path], data: dict) -> Optional[Path]:
    """Write atomically to the first writable candidate (`_cache_candidates` order); None if none is."""
    for p in paths:
        if not _dir_writable(p.parent):
            continue
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, p)  # concurrent DDP ranks: last writer wins, readers never see half a file
            return p
        except OSError:
            continue
    return None


def _parallel_map(fn: Callable[[Any], Any], xs: Sequence[Any], workers: int = 8) -> list[Any]:
    # PIL releases the GIL while decoding, so threads give real parallelism for header reads and label decodes
    if len(xs) < 16:
        return [fn(x) for x in xs]
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, xs, chunksize=16))


# ------------------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------------------
# Allowed raw values per label encoding, checked after every decode (a value outside them means the file
# is not in the encoding its name promises).
_RAW_MAX = {"cs_labelIds": 33, "mapillary": 65, "fmb": 14, "deliver": 25}
_NATIVE_LUTS = {"cs_labelIds": make_lut(CITYSCAPES_LABELID_TO_TRAINID),
                "cs_labelIds_palette": make_lut(CITYSCAPES_LABELID_TO_TRAINID),
                "mapillary": make_lut(MAPILLARY_TO_TRAINID), "fmb": make_lut(FMB_TO_9),
                "deliver": _deliver_lut()}
_SYNTHIA_LUT16 = np.full(65536, IGNORE, np.uint8)
for _k, _v in SYNTHIA_TO_TRAINID.items():
    _SYNTHIA_LUT16[_k] = _v


def _present(raw: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a uint8 map."""
    return np.flatnonzero(np.bincount(raw.ravel(), minlength=256))


def _bad_values(raw: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Values of `raw` outside `allowed`; a boolean lookup first, since almost every label is clean."""
    bad = np.ones(256, bool)
    bad[allowed] = False
    if not bad[raw].any():
        return np.empty(0, np.int64)
    return np.setdiff1d(_present(raw), allowed)


def _fmt_set(vals: np.ndarray) -> str:
    vals = [int(v) for v in vals[:8]]
    return "{" + ", ".join(map(str, vals)) + (", ..." if len(vals) == 8 else "") + "}"


class SegDataset(torch.utils.data.Dataset):
    """One split of one dataset in its official layout; built by `build_dataset`.

    Attributes:
        name, split (native name), info (`DatasetInfo`), folder (dataset folder), train (bool: items go
        through the train transform), num_classes (the output class set), native_classes, class_names and
        palette (of the output class set), has_labels (False for splits without ground truth: labels are all
        255), synthetic (inside the synthetic sample), scale (multiplies every train / eval size),
        crop_size, cat_max_ratio.
    """

    def __init__(self, name: str, folder: Path, split: str, listing: _Listing, *, train: bool, crop_size: int,
                 scale: float, num_classes: int, cat_max_ratio: Optional[float], options: dict,
                 info: Optional[DatasetInfo] = None) -> None:
        self.name, self.folder, self.split, self.info = name, folder, split, info or dataset_info(name)
        self.train, self.crop_size, self.scale = train, int(crop_size), float(scale)
        self.cat_max_ratio = cat_max_ratio
        self.native_classes = self.info.num_classes
        self.num_classes = num_classes
        self.class_names = CLASS_SETS[num_classes]
        self.palette = PALETTES[num_classes]
        self.options = options
        self.synthetic = is_synthetic(folder)
        self.items = listing.items
        self.label_kind, self.image_kind = listing.label_kind, listing.image_kind
        self.has_labels, self.crop_top = listing.has_labels, listing.crop_top
        self._convert = convert_labels(self.native_classes, num_classes)
        self.event_window_us = int(float(options.get("event_window_ms", 50)) * 1000)
        self._events = _EventFiles()
        self._empty_warned: set[str] = set()
        self._warn_lock = threading.Lock()
        if listing.check_sizes and self.has_labels:
            self._check_sizes(listing.size_mismatch)
        if not self.items:
            raise _err_empty(name, folder / split)
        self._check_counts()
        # decode the first pair now: a wrong encoding fails at construction, not at the first training step
        first = self.load_label(0)
        if self.train:
            w, h = self._train_size(first.shape[::-1])
            if self.crop_size > min(w, h):
                raise DatasetError(f"error: --crop-size {self.crop_size} is larger than the resized {name} "
                                   f"image ({w}x{h} after resize). Lower --crop-size.")

    def __getstate__(self) -> dict:
        # DataLoader workers started with "spawn" pickle the dataset: locks cannot travel, h5 handles must not
        state = dict(self.__dict__)
        del state["_warn_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._warn_lock = threading.Lock()

    # ---------------------------------------------------------------- construction checks
    def _check_sizes(self, on_mismatch: str) -> None:
        """Image vs label size from the file headers; GTA5 may skip mismatches.

        The sizes are cached per file list (hash of paths, sizes, mtimes) like the RCS statistics: in
        `<dataset>/.cache/`, or the per-user `user_cache_dir(folder)` when the dataset folder is read-only.
        """
        parts = [p for it in self.items for p in (it.image, it.label)]
        key = f"sizes_{self.name}_{self.split}_{_files_hash(parts)}.json"
        paths = _cache_candidates(self.folder, None, key)
        cached = _read_json_cache(paths, lambda d: len(d.get("sizes", [])) == len(self.items))
        if cached is not None:
            sizes = [tuple(map(tuple, s)) for s in cached["sizes"]]
        else:
            sizes = _parallel_map(
                lambda it: (_image_size(self.name, it.image), _image_size(self.name, it.label)), self.items)
            _write_json_cache(paths, {"sizes": [list(map(list, s)) for s in sizes]})
        keep, bad = [], []
        for it, (si, sl) in zip(self.items, sizes):
            if self.crop_top and si[0] == sl[0] and si[1] > sl[1]:
                si = (si[0], sl[1])  # 640x480 edge image -> top 440 rows
            (keep if si == sl else bad).append((it, si, sl))
        if bad and on_mismatch == "skip":
            warnings.warn(f"{self.name}: skipped {len(bad)} image/label pairs of different sizes (e.g. "
                          f"{bad[0][0].name}: {bad[0][1][0]}x{bad[0][1][1]} vs "
                          f"{bad[0][2][0]}x{bad[0][2][1]}) [size_mismatch=skip]", stacklevel=3)
            self.items = [k[0] for k in keep]
        elif bad:
            it, si, sl = bad[0]
            raise DatasetError(f"error: {self.name}: image '{it.image}' is {si[0]}x{si[1]} but its label is "
                               f"{sl[0]}x{sl[1]}. Image and label must have the same size.")

    def _check_counts(self) -> None:
        expected = dict(self.info.counts).get(self.split)
        if expected is not None and expected != len(self.items) and not self.synthetic:
            warnings.warn(f"{self.name}: split '{self.split}' has {len(self.items)} items; the official "
                          f"release has {expected} (downloads differ slightly).", stacklevel=3)

    def require_labels(self) -> None:
        """Raise the "no public ground truth" error when this split has none (the metric refuses it)."""
        if not self.has_labels:
            raise DatasetError(f"error: {self.name}: split '{self.split}' has no public ground truth; use "
                               f"--split val for a metric.")

    # ---------------------------------------------------------------- decoding
    def __len__(self) -> int:
        return len(self.items)

    def load_label(self, i: int) -> np.ndarray:
        """The native label of item `i`, no transform.

        Returns:
            uint8 (H, W) in the native class set (0..K-1, 255 = ignore); all 255 for splits without labels.
        Raises:
            DatasetError: wrong mode/dtype, values outside the encoding's range, undecodable file.
        """
        it = self.items[i]
        kind = self.label_kind
        if kind == "none" or it.label is None:
            w, h = _image_size(self.name, it.image) if it.image is not None else (0, 0)
            if self.crop_top:
                h = int(round(w * 440 / 640)) if h * 640 == w * 480 else h
            return np.full((h, w), IGNORE, np.uint8)
        if kind == "synthia16":
            return _SYNTHIA_LUT16[read_synthia_label(self.name, it.label)]
        raw = read_label_array(self.name, it.label, allow_rgb=(kind == "deliver"))
        if raw.ndim == 3:
            raw = raw[..., 0]  # DELIVER: the class is channel 0
        if kind in ("trainIds", "cs_trainIds"):
            k = self.native_classes
            bad = _bad_values(raw, np.r_[np.arange(k), IGNORE])
            if bad.size:
                hint = (" This is a labelIds map; use *_gtFine_labelTrainIds.png or --label-format labelIds."
                        if kind == "cs_trainIds" else
                        " This looks like a labelIds map; use the *_labelTrainIds.png files."
                        if bad.max() <= 33 and k == 19 else f" Expected {self.name} class ids.")
                raise DatasetError(f"error: {self.name}: label '{it.label}' has values {_fmt_set(bad)} "
                                   f"outside {{0..{k - 1}, 255}}.{hint}")
            return raw.copy()
        if kind in _RAW_MAX:
            bad = _bad_values(raw, np.r_[np.arange(_RAW_MAX[kind] + 1), IGNORE])
            if bad.size:
                raise DatasetError(f"error: {self.name}: label '{it.label}' has values {_fmt_set(bad)} "
                                   f"outside {{0..{_RAW_MAX[kind]}, 255}}. Expected the raw {self.name} "
                                   f"label encoding.")
        return _NATIVE_LUTS[kind][raw]  # one LUT on a copy, never chained replacements

    def load_image(self, i: int) -> Image.Image:
        """The input of item `i` at native size: PIL "RGB" (uint8) or "F" (float32 in [0, 1], grey)."""
        it = self.items[i]
        if self.image_kind == "auto":  # folders: single-channel files read as the grey modalities are
            grey = _decode(self.name, it.image, lambda im: im.mode in GREY_MODES)
            return Image.fromarray(read_grey(self.name, it.image)) if grey else read_rgb(self.name, it.image)
        if self.image_kind == "rgb":
            return read_rgb(self.name, it.image)
        if self.image_kind == "events":
            w, h = _image_size(self.name, it.label)
            return Image.fromarray(self._render_item_events(it, (h, w)).astype(np.float32) / 255.0)
        arr = read_grey(self.name, it.image, depth=(self.image_kind == "depth"))
        if self.crop_top and it.label is not None:
            lw, lh = _image_size(self.name, it.label)
            if arr.shape[1] == lw and arr.shape[0] > lh:
                arr = arr[:lh]
        elif self.crop_top and arr.shape[0] * 640 == arr.shape[1] * 480:
            arr = arr[: int(round(arr.shape[1] * 440 / 640))]
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))

    def _render_item_events(self, it: _Item, hw: tuple[int, int]) -> np.ndarray:
        h5py = _import_h5py(self.folder, self.split)
        ev = it.extra["events"]
        try:
            f = self._events.get(h5py, ev)
            t_offset = int(np.asarray(f["t_offset"][()]).reshape(-1)[0])
            ms_to_idx = self._events.array(h5py, ev, "ms_to_idx")
            rect = self._events.array(h5py, it.extra["rectify"], "rectify_map")
            # window [t - 50 ms, t) on the image clock, minus t_offset -> event clock; int64 throughout
            t1 = it.extra["t"] - t_offset
            t0 = t1 - self.event_window_us
            if t1 <= 0 or len(ms_to_idx) == 0:
                # the label precedes the first event (t < t_offset): an empty window. Indexing ms_to_idx with
                # a negative millisecond would wrap around to the end of the file (or raise IndexError).
                x = y = p = np.zeros(0, np.int64)
            else:
                m0 = min(max(t0, 0) // 1000, len(ms_to_idx) - 1)
                m1 = -(-t1 // 1000)  # ceil, >= 1 here
                i0 = int(ms_to_idx[m0])
                i1 = int(ms_to_idx[m1]) if m1 < len(ms_to_idx) else f["events/t"].shape[0]
                t = np.asarray(f["events/t"][i0:i1], dtype=np.int64)
                lo, hi = i0 + int(np.searchsorted(t, t0, "left")), i0 + int(np.searchsorted(t, t1, "left"))
                x, y, p = (np.asarray(f[f"events/{k}"][lo:hi]) for k in ("x", "y", "p"))
        except OSError as e:
            if "filter" in str(e).lower() or "decompress" in str(e).lower() or "plugin" in str(e).lower():
                raise DatasetError(f"error: dsec_event: cannot decompress '{ev}' (Blosc). pip install h5py "
                                   f"hdf5plugin, or use the pre-rendered edge images "
                                   f"(69mask_*_edges).") from None
            raise _corrupt(self.name, ev, e) from None
        if len(x) == 0:
            with self._warn_lock:
                if it.extra["seq"] not in self._empty_warned:
                    self._empty_warned.add(it.extra["seq"])
                    warnings.warn(f"dsec_event: empty event window for a frame of '{it.extra['seq']}' "
                                  f"(mid-grey image); further empty windows of this sequence are not "
                                  f"reported.")
        return render_events(x, y, p, rect, hw)

    # ---------------------------------------------------------------- items
    def _train_size(self, wh: tuple[int, int]) -> tuple[int, int]:
        return resize_size(self.info.train_resize, wh, self.scale)

    @staticmethod
    def _to_array(im: Image.Image) -> np.ndarray:
        """(H, W, C) uint8 for RGB, (H, W) float32 in [0, 1] for grey modalities."""
        return np.asarray(im)

    @staticmethod
    def _to_tensor(a: np.ndarray) -> torch.Tensor:
        # one pass: channel-first layout, float conversion and /255 together (C-ordered copy by astype)
        if a.ndim == 2:
            g = np.clip(a, 0.0, 1.0).astype(np.float32)
            # grey replicated to 3 channels
            return torch.from_numpy(np.broadcast_to(g, (3,) + g.shape).copy())
        return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)).mul_(1.0 / 255.0)

    def _check_same_size(self, i: int, im: Image.Image, label: np.ndarray) -> None:
        if self.has_labels and im.size != label.shape[::-1]:
            raise DatasetError(f"error: {self.name}: image '{self.items[i].image}' is "
                               f"{im.size[0]}x{im.size[1]} but its label is "
                               f"{label.shape[1]}x{label.shape[0]}. Image and label must have the same size.")

    def __getitem__(self, i: int) -> dict:
        """Eval item at native size (or a random train sample when `train`).

        Returns:
            {"image": float32 (3, H, W) in [0, 1], "label": int64 (H, W) in the output class set (255 =
             ignore), "name": str (path relative to the dataset folder), "split": str}.
        """
        if self.train:
            return self.sample(i, np.random.default_rng())
        im = self.load_image(i)
        label = self.load_label(i)
        if not self.has_labels:
            label = np.full((im.size[1], im.size[0]), IGNORE, np.uint8)
        self._check_same_size(i, im, label)
        return {"image": self._to_tensor(self._to_array(im)),
                "label": torch.from_numpy(self._convert[label].astype(np.int64)),
                "name": self.items[i].name, "split": self.split}

    def sample(self, i: int, rng: np.random.Generator, rcs_class: Optional[int] = None,
               rcs_min_pixels: int = 0) -> dict:
        """Train transform of item `i`: resize -> random crop -> flip -> label conversion.

        Resize: image bilinear, label nearest, to the (scaled) train size, both with Pillow (BILINEAR is
        antialiased when shrinking; NEAREST picks floor((i + 0.5) * in / out)) as MADM's train loader does;
        mmseg's train pipeline uses OpenCV (no antialiasing, INTER_NEAREST) instead, a train-time difference
        kept [our choice: augmentation, not the metric]. Crop: `crop_size` squared; with
        `cat_max_ratio`, up to 10 redraws until >= 2 labelled classes and the largest < ratio of labelled
        pixels [ref: mmseg RandomCrop]; with `rcs_class`, up to 10 redraws until the crop holds >
        `rcs_min_pixels` pixels of that class in NATIVE ids [ref: DAFormer RCS]. Flip: horizontal, p = 0.5,
        joint. Conversion to the model's class set after cropping [ref: MADM order].

        Args:
            rng: the only source of randomness (TrainStream passes a generator seeded by (seed, step, j)).
        Returns:
            {"image": float32 (3, c, c) in [0, 1], "label": int64 (c, c), "name", "split"}.
        """
        im = self.load_image(i)
        label = self.load_label(i)
        if not self.has_labels:
            label = np.full((im.size[1], im.size[0]), IGNORE, np.uint8)
        self._check_same_size(i, im, label)
        w0, h0 = im.size
        tw, th = self._train_size((w0, h0))
        c = self.crop_size
        if c > tw or c > th:
            raise DatasetError(f"error: --crop-size {c} is larger than the resized {self.name} image "
                               f"({tw}x{th} after resize). Lower --crop-size.")
        # labels: nearest only; resizing the uint8 map costs little next to the image decode
        lab = label if (tw, th) == (w0, h0) else np.asarray(
            Image.fromarray(label).resize((tw, th), Image.NEAREST))
        x0 = y0 = 0
        for _ in range(10 if rcs_class is not None else 1):
            for _ in range(10 if self.cat_max_ratio else 1):
                y0, x0 = int(rng.integers(0, th - c + 1)), int(rng.integers(0, tw - c + 1))
                crop = lab[y0:y0 + c, x0:x0 + c]
                if not self.cat_max_ratio:
                    break
                cnt = np.bincount(crop.ravel(), minlength=256)[:IGNORE]
                cnt = cnt[cnt > 0]
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
            if rcs_class is None or int((crop == rcs_class).sum()) > rcs_min_pixels:
                break
        lab = lab[y0:y0 + c, x0:x0 + c]
        # Resize only the crop window: Pillow's `box` maps output pixels to the same source coordinates as
        # resizing the whole image and cropping, so this equals resize-then-crop at a fraction of the cost.
        sx, sy = w0 / tw, h0 / th
        img = im.resize((c, c), Image.BILINEAR, box=(x0 * sx, y0 * sy, (x0 + c) * sx, (y0 + c) * sy)) \
            if (tw, th) != (w0, h0) else im.crop((x0, y0, x0 + c, y0 + c))
        arr = self._to_array(img)
        if rng.random() < 0.5:  # joint horizontal flip, on the small crop before any float conversion
            arr, lab = arr[:, ::-1], lab[:, ::-1]
        label_t = torch.from_numpy(self._convert[lab].astype(np.int64))  # LUT indexing makes a fresh copy
        return {"image": self._to_tensor(arr), "label": label_t, "name": self.items[i].name,
                "split": self.split}

    def eval_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """`eval_input_size(self.name, hw, self.scale)`: (W, H) of the eval input for an image (H, W)."""
        return eval_input_size(self.name, hw, self.scale)

    def __repr__(self) -> str:
        return (f"SegDataset({self.name}, split={self.split}, n={len(self)}, train={self.train}, "
                f"classes={self.native_classes}->{self.num_classes}, folder='{self.folder}')")


def build_dataset(name: str, root: str | Path = "data", split: str = "train", *, train: Optional[bool] = None,
                  crop_size: int = 512, scale: float = 1.0, num_classes: Optional[int] = None,
                  cat_max_ratio: Optional[float] = None, **options: Any) -> SegDataset:
    """Build one split of a dataset from its official layout (data/README.md).

    Args:
        name: a registry name (`DATASETS`) or `folder:PATH` (your own data; `root` is not used).
        root: the data root containing the default folder (e.g. `data/` with `data/cityscapes/`) or the
            dataset folder itself.
        split: "train" / "val" (aliases of the registry's train / eval split) or a native name ("all", "test",
            "validation", ...; folders: "predict" = every image, no labels).
        train: items go through the train transform; default: split is the train split.
        crop_size: train crop side (not scaled by `scale`).
        scale: multiplies every train / eval size of the registry (the demo uses 1/8).
        num_classes: the model's class set (default: the native one); labels are converted after cropping.
        cat_max_ratio: optional mmseg crop constraint (e.g. 0.75).
        options: label_format ("auto" | "trainIds" | "labelIds"; Cityscapes, GTA5, SYNTHIA), dsec_input
            ("auto" | "edges" | "events"), event_window_ms (50), frame_stride (DSEC edges and events; train 2,
            test 1; frames >= 1),
            conditions (ACDC, comma list), size_mismatch (GTA5: "skip" | "error").
    Returns:
        a `SegDataset`.
    Raises:
        DatasetError (a UserError) with a one-line message, at construction.
    """
    info = dataset_info(name)
    split = native_split(name, split)
    folder = Path(info.folder) if is_folder(name) else resolve_folder(name, root, split)
    if train is None:
        train = split == info.train_split
    k = num_classes or info.num_classes
    if is_folder(name):  # a folder split without labels ("predict", unlabelled) takes the model's class set
        listing = _list_folder(name, folder, split, options)
        info = info if listing.has_labels else dataclasses.replace(info, num_classes=k)
    convert_labels(info.num_classes, k)  # fail early on 11/9 -> 19
    if not is_folder(name):
        listing = _LISTERS[name](name, folder, split, options)
    return SegDataset(name, folder, split, listing, train=train, crop_size=crop_size, scale=scale,
                      num_classes=k, cat_max_ratio=cat_max_ratio, options=options, info=info)


# ------------------------------------------------------------------------------------------------------------
# Rare-class sampling [ref: DAFormer mmseg/datasets/uda_dataset.py, tools/convert_datasets/gta.py]
# ------------------------------------------------------------------------------------------------------------
class RareClassSampling:
    """Sample source images so that rare classes are seen more often (DAFormer RCS).

    Statistics over the train split at original resolution, per native class c: pixel frequency f_c (over
    labelled pixels) and the images with > `min_pixels` pixels of c. Draw: p_c = softmax((1 - f_c) / T) over
    classes with f_c > 0 (and at least one qualifying image), then a uniform image from c's list. Stats are
    computed once (tqdm) and cached as JSON, keyed by dataset, split and a hash of the label file list, in the
    first writable of `<dataset folder>/.cache/`, `cache_dir` (optional) and the per-user
    `user_cache_dir(folder)` (`~/.cache/diffseg/<hash>/`); reads look in all three, so a read-only dataset
    folder needs no `cache_dir`.

    Pixel thresholds are defined at the real native resolution; they are multiplied by `dataset.scale ** 2` so
    the synthetic sample (native / 8, demo scale 1/8) keeps the same proportions [our choice].

    Attributes:
        classes: (C,) int native ids that can be drawn; probs: (C,) float64 their probabilities.
        freq: (K,) float64 pixel frequency per native class.
        samples: {class: [dataset indices]}.
        crop_min_pixels: min_pixels * min_crop_ratio (scaled), for `SegDataset.sample(rcs_min_pixels=...)`.
    """

    def __init__(self, dataset: SegDataset, temperature: float = 0.01, min_pixels: int = 3000,
                 min_crop_ratio: float = 0.5, cache_dir: Optional[str | Path] = None) -> None:
        if not dataset.has_labels:
            raise DatasetError(f"error: {dataset.name}: rare-class sampling needs labels but split "
                               f"'{dataset.split}' has none. Expected a labelled source split.")
        self.dataset, self.temperature = dataset, temperature
        area = dataset.scale ** 2
        self.min_pixels = max(1, int(round(min_pixels * area)))
        self.crop_min_pixels = int(min_pixels * min_crop_ratio * area)
        counts = self._stats(cache_dir)  # list of {class: n} per item
        k = dataset.native_classes
        total = np.zeros(k, np.float64)
        self.samples: dict[int, list[int]] = {c: [] for c in range(k)}
        for i, cnt in enumerate(counts):
            for c, n in cnt.items():
                total[c] += n
                if n > self.min_pixels:
                    self.samples[c].append(i)
        self.freq = total / max(total.sum(), 1.0)
        self.classes = np.array([c for c in range(k) if self.freq[c] > 0 and self.samples[c]], np.int64)
        if not len(self.classes):
            raise DatasetError(f"error: {dataset.name}: no class has an image with more than "
                               f"{self.min_pixels} pixels. Expected a labelled split; lower "
                               f"--rcs-min-pixels.")
        logits = (1.0 - self.freq[self.classes]) / temperature
        e = np.exp(logits - logits.max())  # softmax, shifted for stability
        self.probs = e / e.sum()

    def _stats(self, cache_dir: Optional[str | Path]) -> list[dict[int, int]]:
        ds = self.dataset
        key = f"rcs_{ds.name}_{ds.split}_{ds.label_kind}_{_files_hash([it.label for it in ds.items])}.json"
        paths = _cache_candidates(ds.folder, cache_dir, key)
        names = [it.name for it in ds.items]
        cached = _read_json_cache(paths, lambda d: d.get("names") == names
                                  and len(d.get("counts", [])) == len(names))
        if cached is not None:
            return [{int(c): int(n) for c, n in d.items()} for d in cached["counts"]]
        def count(i: int) -> dict[int, int]:
            lab = ds.load_label(i)
            bc = np.bincount(lab.ravel(), minlength=256)[: ds.native_classes]
            return {int(c): int(bc[c]) for c in np.nonzero(bc)[0]}
        out: list[dict[int, int]] = []
        workers = max(1, min(8, os.cpu_count() or 1))
        # stream over the labels (nothing kept but the counts); threads overlap the PNG decodes
        desc = f"RCS stats {ds.name} {ds.split}"
        with ThreadPoolExecutor(workers) as pool, progress(total=len(ds), desc=desc, leave=False) as bar:
            for d in pool.map(count, range(len(ds)), chunksize=8):
                out.append(d)
                bar.update(1)
        _write_json_cache(paths, {"dataset": ds.name, "split": ds.split, "names": names,
                                  "counts": [{str(c): n for c, n in d.items()} for d in out]})
        return out

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """Pick a class by p_c, then a uniform image that holds enough of it.

        Returns:
            (native class id c, dataset index i).
        """
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        lst = self.samples[c]
        return c, int(lst[int(rng.integers(len(lst)))])


# ------------------------------------------------------------------------------------------------------------
# Deterministic, resumable training stream
# ------------------------------------------------------------------------------------------------------------
class TrainStream:
    """Training batches as a pure function of (seed, stream_id, step, j): no sampler state to checkpoint.

    Sample j of step `step` uses `rng = np.random.default_rng([seed, stream_id, step, j])` for the image
    choice (uniform, or RCS when given), the crop and the flip, so resuming at step s reproduces the original
    run and DDP ranks / accumulation micro-steps just ask for disjoint `start` ranges. Images are drawn with
    replacement (not epoch permutations) [our choice]: the batch size need not be known to the stream.

    Decoding runs in `workers` threads (PIL releases the GIL) and, after each call, the same range of the next
    step is prefetched in the background; results are identical with or without threads.
    """

    def __init__(self, dataset: SegDataset, seed: int, rcs: Optional[RareClassSampling] = None,
                 stream_id: int = 0, workers: int = 2, prefetch: bool = True) -> None:
        self.dataset, self.seed, self.rcs, self.stream_id = dataset, int(seed), rcs, int(stream_id)
        self.workers, self.prefetch = max(0, int(workers)), prefetch
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[tuple[int, int, int], Future] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"], state["_pending"] = None, {}
        return state

    def sample(self, step: int, j: int) -> dict:
        """Sample j (global index within the step's batch) of step `step`."""
        rng = np.random.default_rng([self.seed, self.stream_id, int(step), int(j)])
        if self.rcs is not None:
            c, i = self.rcs.draw(rng)
            return self.dataset.sample(i, rng, rcs_class=c, rcs_min_pixels=self.rcs.crop_min_pixels)
        i = int(rng.integers(len(self.dataset)))
        return self.dataset.sample(i, rng)

    def _compute(self, step: int, start: int, count: int, parallel: bool = True) -> dict:
        js = range(start, start + count)
        # a prefetch already runs on a pool thread: it decodes sequentially so it never waits on its own pool
        if parallel and self._pool is not None and count > 1:
            items = list(self._pool.map(lambda j: self.sample(step, j), js))
        else:
            items = [self.sample(step, j) for j in js]
        return {"image": torch.stack([s["image"] for s in items]),
                "label": torch.stack([s["label"] for s in items]),
                "name": [s["name"] for s in items]}

    def batch(self, step: int, start: int, count: int) -> dict:
        """Samples start .. start+count-1 of this step's global batch.

        DDP / accumulation: rank r, micro-step k of A, micro-batch m -> start = (r * A + k) * m.

        Returns:
            {"image": float32 (count, 3, c, c) in [0, 1], "label": int64 (count, c, c), "name": list[str]}.
        """
        if self.workers and self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers)
        key = (int(step), int(start), int(count))
        fut = self._pending.pop(key, None)
        for k in list(self._pending):  # prefetches of past steps will not be asked for (e.g. after a jump)
            if k[0] < key[0]:
                self._pending.pop(k)
        out = fut.result() if fut is not None else self._compute(*key)
        if self._pool is not None and self.prefetch:
            nxt = (key[0] + 1, key[1], key[2])
            if nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._compute, *nxt, parallel=False)
        return out

    def close(self) -> None:
        """Stop the decode threads (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending = {}


__all__ = ["DATASETS", "DatasetInfo", "EVAL_PROTOCOL", "CLASS_SETS", "PALETTES", "convert_labels",
           "check_pair", "eval_input_size", "resize_size", "build_dataset", "SegDataset", "RareClassSampling",
           "TrainStream", "DatasetError", "dataset_info", "is_folder", "run_tag", "eval_target", "FOLDER",
           "GREY_MODES", "make_lut", "render_events", "read_synthia_label", "IGNORE",
           "DSEC_SEQUENCES", "CITYSCAPES_LABELID_TO_TRAINID", "SYNTHIA_TO_TRAINID", "MAPILLARY_TO_TRAINID",
           "DELIVER_TO_11", "FMB_TO_9", "CS19_TO_11", "CS19_TO_9", "C11_TO_9", "C9_TO_11"]
