"""The dataset names of the four methods (`--src` / `--tgt`, the table of data/README.md, or your own data as
`folder:PATH`) and `build_dataset`, which lists a split (`common.layouts`), decodes it (`common.readers`) and
returns a `SegDataset`: eval items at native size, train items resized, cropped, flipped and converted to the
model's class set (`common.sampling` draws the batches). Images float32 (3, H, W) in [0, 1], grey replicated to
3 channels; labels int64 (H, W), 255 = ignore; sizes (W, H), shapes (H, W). Bad input fails at construction
with a one-line `DatasetError`. [ref: X] = a public re-implementation.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from common.layouts import ACDC_CONDITIONS, LISTERS, Listing, check_sizes, folder_items, list_folder, resolve_folder
from common.readers import IGNORE, DatasetError, EventFiles, image_size, make_lut, read_image, read_label
from common.sampling import RareClassSampling, TrainStream  # noqa: F401  (the scripts use datasets.TrainStream)


# ---- the registry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: name, default folder under the data root, native class count, native train / eval
    split, train resize and eval input (("exact", (W, H)) or ("keep", (W, H)): the ratio kept, `resize_size`),
    the metric's resolution ("native", "half" for Mapillary, "input" for MADM's targets; `common.metrics`),
    the splits, those without labels, the item counts (a mismatch is a warning: downloads differ slightly)."""
    name: str
    folder: str
    num_classes: int
    train_split: str
    eval_split: str
    train_resize: tuple[str, tuple[int, int]]
    eval_input: tuple[str, tuple[int, int]]
    metric: str
    splits: tuple[str, ...] = ()
    no_gt_splits: tuple[str, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()


def _exact(w: int, h: int) -> tuple[str, tuple[int, int]]:
    return ("exact", (w, h))


def _keep(w: int, h: int) -> tuple[str, tuple[int, int]]:
    return ("keep", (w, h))


def _acdc(cond: str) -> DatasetInfo:
    n_val = {"fog": 100, "night": 106, "rain": 100, "snow": 100}
    return DatasetInfo(f"acdc_{cond}" if cond else "acdc", "acdc", 19, "train", "val", _exact(960, 540),
                       _exact(960, 540), "native", ("train", "val", "test"), ("test",),
                       (("train", 400 if cond else 1600), ("val", n_val[cond] if cond else sum(n_val.values()))))


# Sizes: DAFormer's dataset configs (Cityscapes, GTA5, SYNTHIA, ACDC, Dark Zurich), Rein's (BDD100K, Mapillary),
# MADM's (DSEC, FMB, DELIVER); data/README.md "Train sizes and transform" names the files and our choices.
DATASETS: dict[str, DatasetInfo] = {
    "cityscapes": DatasetInfo("cityscapes", "cityscapes", 19, "train", "val", _exact(1024, 512), _exact(1024, 512),
                              "native", ("train", "val", "test"), ("test",), (("train", 2975), ("val", 500))),
    # GTA5 and SYNTHIA are sources: "all" is the whole release, "val" the ids = 0 mod 50 [our choice]
    "gta5": DatasetInfo("gta5", "gta5", 19, "all", "val", _keep(1280, 720), _keep(1280, 720), "native",
                        ("all", "val"), (), (("all", 24966), ("val", 499))),
    "synthia": DatasetInfo("synthia", "synthia", 19, "all", "val", _exact(1280, 760), _exact(1280, 760), "native",
                           ("all", "val"), (), (("all", 9400), ("val", 188))),
    "acdc": _acdc(""), **{f"acdc_{c}": _acdc(c) for c in ACDC_CONDITIONS},
    # the train split is unlabeled (night images only) [ref: DAFormer CS->DZ]
    "dark_zurich": DatasetInfo("dark_zurich", "dark_zurich", 19, "train", "val", _exact(960, 540), _exact(960, 540),
                               "native", ("train", "val", "test"), ("train", "test"), (("train", 2416), ("val", 50))),
    "bdd100k": DatasetInfo("bdd100k", "bdd100k", 19, "train", "val", _exact(1280, 720), _exact(1280, 720), "native",
                           ("train", "val", "test"), ("test",), (("train", 7000), ("val", 1000))),
    "mapillary": DatasetInfo("mapillary", "mapillary", 19, "training", "validation", _keep(1024, 512),
                             _keep(1024, 512), "half", ("training", "validation", "testing"), ("testing",),
                             (("training", 18000), ("validation", 2000))),
    "dsec_event": DatasetInfo("dsec_event", "dsec", 11, "train", "test", _exact(768, 512), _exact(512, 512), "input",
                              ("train", "test"), (), (("train", 4037), ("test", 2806))),
    "fmb_infrared": DatasetInfo("fmb_infrared", "fmb", 9, "train", "test", _exact(683, 512), _exact(512, 512),
                                "input", ("train", "test"), (), (("train", 1220), ("test", 280))),
    "deliver_depth": DatasetInfo("deliver_depth", "deliver", 11, "train", "test", _exact(712, 712), _exact(512, 512),
                                 "input", ("train", "val", "test"), (), (("train", 3983), ("test", 1897))),
}

# Your own data. Train resize and eval input keep the ratio into the Cityscapes box 1024x512 (x the demo's
# scale), so a crop of 512 always fits and a 1920x1080 camera gives 910x512 [our choice].
FOLDER = "folder:"
FOLDER_SIZE = ("keep", (1024, 512))


def is_folder(name: str) -> bool:
    """True for a `folder:PATH` dataset name."""
    return name.startswith(FOLDER)


def run_tag(name: str) -> str:
    """A dataset name (or comma list) for a run folder name: `folder:PATH` -> `folder-<last part of PATH>`,
    comma lists joined by "+"."""
    return "+".join(f"folder-{Path(n[len(FOLDER):]).resolve().name}" if is_folder(n) else n
                    for n in name.split(","))


def eval_target(name: str, predict: Optional[str]) -> tuple[str, str]:
    """(dataset, split) a script evaluates: `name`'s eval split, or with `--predict PATH` every image of
    `folder:PATH` without labels (`common.metrics.evaluate` writes a prediction for each)."""
    return (FOLDER + predict, "predict") if predict else (name, "val")


def dataset_info(name: str, flag: str = "") -> DatasetInfo:
    """`DATASETS[name]` or the entry of a `folder:PATH`: the one check of a dataset name. DatasetError for an
    unknown name (`flag`, e.g. "--tgt", is named in the message), a missing folder, a bad classes.txt."""
    if name in DATASETS:
        return DATASETS[name]
    if not is_folder(name):
        raise DatasetError(f"error: {flag + ': ' if flag else ''}unknown dataset '{name}'. Choose one of: "
                           f"{', '.join(DATASETS)}, or folder:PATH.")
    path = Path(name[len(FOLDER):])
    if not path.is_dir():
        raise DatasetError(f"error: {name}: folder '{path}' not found. Expected a folder of .png/.jpg/.jpeg "
                           f"images, or {path}/images/ + {path}/labels/ (data/README.md, \"Your own data\").")
    return DatasetInfo(name, str(path), _folder_classes(name, path), "train", "val", FOLDER_SIZE, FOLDER_SIZE,
                       "native", ("train", "val", "predict"))


def _folder_classes(name: str, path: Path) -> int:
    """19 (Cityscapes) unless `classes.txt` holds 19 / 11 / 9, or the names of one of `CLASS_SETS` in order."""
    f = path / "classes.txt"
    try:
        lines = [ln.strip().lower() for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else ["19"]
    except (OSError, UnicodeDecodeError):
        raise DatasetError(f"error: {name}: cannot read '{f}'. Expected a text file: 19, 11 or 9, or class "
                           f"names, one per line.") from None
    for k, names in CLASS_SETS.items():
        if lines == [str(k)] or lines == list(names):
            return k
    raise DatasetError(f"error: {name}: '{f}' names no known class set ({len(lines)} lines). Expected one "
                       f"line 19, 11 or 9, or the names of one of these sets in order, one per line "
                       f"(data/README.md).")


# ---- class sets, palettes, conversions (sources: data/README.md "Class sets and label maps") ------------------
CLASS_SETS: dict[int, tuple[str, ...]] = {
    19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
         "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
         "bicycle"),
    # [ref: MADM config_files/common/data/*.py]; ESS calls id 0 "background", MADM maps Cityscapes sky to it
    11: ("sky", "building", "fence", "person", "pole", "road", "sidewalk", "vegetation", "car", "wall",
         "traffic sign"),
    9: ("sky", "building", "person", "pole", "road", "sidewalk", "vegetation", "car", "traffic sign"),
}
# [official cityscapesscripts/helpers/labels.py] trainId colours; the 11/9-class "traffic sign" is drawn in the
# traffic-light colour, as in MADM
_CS_COLOURS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
               (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
               (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
               (0, 80, 100), (0, 0, 230), (119, 11, 32)]
_SMALL_COLOURS = {**dict(zip(CLASS_SETS[19], _CS_COLOURS)), "traffic sign": (250, 170, 30)}
PALETTES: dict[int, np.ndarray] = {19: np.array(_CS_COLOURS, np.uint8),
                                   **{k: np.array([_SMALL_COLOURS[n] for n in CLASS_SETS[k]], np.uint8)
                                      for k in (11, 9)}}
# [ref: MADM config_files/common/data/*.py]; 11 -> 9 and 9 -> 11 [our choice]
CS19_TO_11 = {0: 5, 1: 6, 2: 1, 3: 9, 4: 2, 5: 4, 6: 10, 7: 10, 8: 7, 9: 7, 10: 0, 11: 3, 12: 3,
              **{i: 8 for i in range(13, 19)}}
CS19_TO_9 = {0: 4, 1: 5, 2: 1, 5: 3, 6: 8, 7: 8, 8: 6, 9: 6, 10: 0, 11: 2, 12: 2, **{i: 7 for i in range(13, 19)}}
C11_TO_9 = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 10: 8}
C9_TO_11 = {0: 0, 1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 10}
_CONVERSIONS = {(19, 11): CS19_TO_11, (19, 9): CS19_TO_9, (11, 9): C11_TO_9, (9, 11): C9_TO_11}


def convert_labels(src_k: int, tgt_k: int) -> np.ndarray:
    """(256,) uint8 LUT from one class set to another (255 -> 255); DatasetError for 11 -> 19 or 9 -> 19 (a
    merged class cannot be split) or an unknown class count. The model's class set is the target's [our choice]."""
    if src_k == tgt_k and src_k in CLASS_SETS:
        return make_lut({i: i for i in range(src_k)})
    if (src_k, tgt_k) in _CONVERSIONS:
        return make_lut(_CONVERSIONS[(src_k, tgt_k)])
    if src_k in CLASS_SETS and tgt_k in CLASS_SETS:
        raise DatasetError(f"error: class sets: cannot convert {src_k}-class labels to {tgt_k} classes; a "
                           f"merged class cannot be split. Expected a conversion 19->19/11/9, 11->11/9 or "
                           f"9->9/11.")
    raise DatasetError(f"error: class sets: unknown class count {src_k if src_k not in CLASS_SETS else tgt_k}. "
                       f"Expected 19, 11 or 9.")


def check_pair(src: str, tgt: str) -> int:
    """The model's class count for a `--src` / `--tgt` pair (the target's; `tgt` may be a comma list).
    DatasetError when the source's class set cannot be mapped onto the target's (11 or 9 classes onto 19), the
    targets differ in class set, or a source folder has unlabelled images."""
    tgts = tgt.split(",")
    infos = {n: dataset_info(n) for n in [src] + tgts}
    if is_folder(src):
        folder_items(src, Path(src[len(FOLDER):]), source=True)
    ks = {infos[t].num_classes for t in tgts}
    if len(ks) > 1:
        raise DatasetError(f"error: --tgt {tgt}: the targets have different class sets ({sorted(ks)}). "
                           f"Expected targets sharing one class set.")
    k_src, k_tgt = infos[src].num_classes, ks.pop()
    if k_src != k_tgt and (k_src, k_tgt) not in _CONVERSIONS:  # 11 -> 19 or 9 -> 19
        raise DatasetError(f"error: --src {src} has {k_src} classes but --tgt {tgts[0]} needs {k_tgt}; a "
                           f"merged class cannot be split. Use a {k_tgt}-class source (cityscapes, gta5, "
                           f"synthia, ...).")
    return k_tgt


def resize_size(spec: tuple[str, tuple[int, int]], wh: tuple[int, int], scale: float = 1.0) -> tuple[int, int]:
    """(W, H) of a resize rule ("exact" or "keep", box (W, H) x `scale`) for an image of size `wh` = (w, h). Keep
    is mmcv's `rescale_size` (mmseg's `Resize(keep_ratio=True)`): the box is a long and a short edge, s = min(max(W,
    H) / max(w, h), min(W, H) / min(w, h)), so a portrait 3000x4000 goes to 512x683 in 1024x512 [ref: mmseg]."""
    mode, (bw, bh) = spec
    bw, bh = max(1, int(bw * scale + 0.5)), max(1, int(bh * scale + 0.5))
    if mode == "exact":
        return bw, bh
    w, h = wh
    s = min(max(bw, bh) / max(w, h), min(bw, bh) / min(w, h))
    return int(w * s + 0.5), int(h * s + 0.5)


def eval_input_size(name: str, hw: tuple[int, int], scale: float = 1.0) -> tuple[int, int]:
    """(W, H) of the eval input of `name` for an image of shape `hw` = (H, W): `input_size` of
    `common.metrics.evaluate`, which resamples the native-size eval items as the method's reference does."""
    return resize_size(dataset_info(name).eval_input, hw[::-1], scale)


# ---- the dataset ---------------------------------------------------------------------------------------------
def _to_tensor(a: np.ndarray) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from uint8 (H, W, 3) or float (H, W) grey (replicated to 3 channels)."""
    if a.ndim == 2:
        g = np.clip(a, 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(np.broadcast_to(g, (3,) + g.shape).copy())
    return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)).mul_(1.0 / 255.0)


def _label_rows(w: int, h: int) -> int:
    """MADM's 640x480 DSEC edge images hold the 440 label rows at the top [ref: MADM]."""
    return int(round(w * 440 / 640)) if h * 640 == w * 480 else h


class SegDataset(torch.utils.data.Dataset):
    """One split of one dataset (`build_dataset`): name, split (native), info, folder, items, train (items go
    through the train transform), num_classes / class_names / palette (the model's class set), native_classes,
    has_labels (False: every label is 255), synthetic (no count warning), scale (of every size), crop_size,
    cat_max_ratio."""

    def __init__(self, name: str, folder: Path, split: str, listing: Listing, info: DatasetInfo, *, train: bool,
                 crop_size: int, scale: float, num_classes: int, cat_max_ratio: Optional[float]) -> None:
        self.name, self.folder, self.split, self.info, self.train = name, folder, split, info, train
        self.crop_size, self.scale, self.cat_max_ratio = int(crop_size), float(scale), cat_max_ratio
        self.native_classes, self.num_classes = info.num_classes, num_classes
        self.class_names, self.palette = CLASS_SETS[num_classes], PALETTES[num_classes]
        self.synthetic = any((d / "SYNTHETIC").is_file() for d in (folder, folder.parent))
        self.items, self.label_kind, self.image_kind = listing.items, listing.label_kind, listing.image_kind
        self.has_labels, self.crop_top = listing.has_labels, listing.crop_top
        self._convert = convert_labels(self.native_classes, num_classes)
        self._events = EventFiles()
        if listing.image_kind not in ("events", "auto") and self.has_labels:  # folders: checked by list_folder
            self.items = check_sizes(name, folder, split, listing)
        if not self.items:
            raise DatasetError(f"error: {name}: '{folder / split}' contains no .png files.")
        expected = dict(info.counts).get(split)
        if expected is not None and expected != len(self.items) and not self.synthetic:
            warnings.warn(f"{name}: split '{split}' has {len(self.items)} items; the official release has "
                          f"{expected} (downloads differ slightly).", stacklevel=3)
        first = self.load_label(0)  # a wrong encoding fails now, not at the first training step
        if train:
            self._train_size(first.shape[::-1])

    def __len__(self) -> int:
        return len(self.items)

    def load_label(self, i: int) -> np.ndarray:
        """The native label of item `i`: uint8 (H, W), 0..K-1 and 255 = ignore (all 255 without labels)."""
        it = self.items[i]
        if self.label_kind == "none" or it.label is None:
            w, h = image_size(self.name, it.image) if it.image is not None else (0, 0)
            return np.full((_label_rows(w, h) if self.crop_top else h, w), IGNORE, np.uint8)
        return read_label(self.name, it.label, self.label_kind, self.native_classes)

    def load_image(self, i: int) -> Image.Image:
        """The input of item `i` at native size: PIL "RGB" (uint8) or "F" (grey, float32 in [0, 1])."""
        it = self.items[i]
        if self.image_kind == "events":
            w, h = image_size(self.name, it.label)
            return Image.fromarray(self._events.render(it.extra, (h, w)).astype(np.float32) / 255.0)
        im = read_image(self.name, it.image, self.image_kind)
        if self.crop_top:
            w, h = im.size
            rows = _label_rows(w, h)
            if it.label is not None:
                lw, lh = image_size(self.name, it.label)
                rows = lh if lw == w and h > lh else h
            im = im.crop((0, 0, w, rows)) if rows != h else im
        return im

    def _load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        im, label = self.load_image(i), self.load_label(i)
        if not self.has_labels:
            label = np.full((im.size[1], im.size[0]), IGNORE, np.uint8)
        elif im.size != label.shape[::-1]:
            raise DatasetError(f"error: {self.name}: image '{self.items[i].image}' is {im.size[0]}x{im.size[1]} "
                               f"but its label is {label.shape[1]}x{label.shape[0]}. Image and label must have "
                               f"the same size.")
        return im, label

    def _train_size(self, wh: tuple[int, int]) -> tuple[int, int]:
        tw, th = resize_size(self.info.train_resize, wh, self.scale)
        if self.crop_size > min(tw, th):
            raise DatasetError(f"error: --crop-size {self.crop_size} is larger than the resized {self.name} image "
                               f"({tw}x{th} after resize). Lower --crop-size.")
        return tw, th

    def __getitem__(self, i: int) -> dict:
        """Item `i` at native size (a random train sample when `train`): {"image": float32 (3, H, W) in [0, 1],
        "label": int64 (H, W) in the model's class set, "name": path relative to the dataset folder, "split"}."""
        if self.train:
            return self.sample(i, np.random.default_rng())
        im, label = self._load(i)
        return {"image": _to_tensor(np.asarray(im)), "label": torch.from_numpy(self._convert[label].astype(np.int64)),
                "name": self.items[i].name, "split": self.split}

    def sample(self, i: int, rng: np.random.Generator, rcs_class: Optional[int] = None,
               rcs_min_pixels: int = 0) -> dict:
        """Item `i` resized to the train size (Pillow: image bilinear, label nearest, as MADM's loader; mmseg's
        OpenCV does not antialias, a train-time difference [our choice]), cropped to `crop_size` squared (with
        `cat_max_ratio` up to 10 redraws until >= 2 classes and the largest < ratio of the labelled pixels [ref:
        mmseg RandomCrop]; with `rcs_class` up to 10 redraws until > `rcs_min_pixels` of that native class [ref:
        DAFormer RCS]), flipped with p = 0.5, converted to the model's class set [ref: MADM order]. `rng` is the
        only randomness. Returns {"image": float32 (3, c, c) in [0, 1], "label": int64 (c, c), "name", "split"}."""
        im, label = self._load(i)
        w0, h0 = im.size
        tw, th = self._train_size((w0, h0))
        c = self.crop_size
        lab = label if (tw, th) == (w0, h0) else np.asarray(Image.fromarray(label).resize((tw, th), Image.NEAREST))
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
        # resize only the crop window: Pillow's `box` maps output pixels to the same source coordinates as
        # resizing the whole image and cropping, at a fraction of the cost
        sx, sy = w0 / tw, h0 / th
        img = im.resize((c, c), Image.BILINEAR, box=(x0 * sx, y0 * sy, (x0 + c) * sx, (y0 + c) * sy)) \
            if (tw, th) != (w0, h0) else im.crop((x0, y0, x0 + c, y0 + c))
        arr = np.asarray(img)
        if rng.random() < 0.5:  # joint horizontal flip, on the small crop before any float conversion
            arr, lab = arr[:, ::-1], lab[:, ::-1]
        return {"image": _to_tensor(arr), "label": torch.from_numpy(self._convert[lab].astype(np.int64)),
                "name": self.items[i].name, "split": self.split}


def build_dataset(name: str, root: str | Path = "data", split: str = "train", *, train: Optional[bool] = None,
                  crop_size: int = 512, scale: float = 1.0, num_classes: Optional[int] = None,
                  cat_max_ratio: Optional[float] = None) -> SegDataset:
    """One split of a dataset in its official layout (data/README.md), checked at construction.

    Args:
        name: a registry name or `folder:PATH` (then `root` is not used).
        root: the data root holding the default folder (`data/` with `data/cityscapes/`), or that folder itself.
        split: "train" / "val" (the registry's train / eval split) or a native name ("all", "validation", ...;
            folders: "predict" = every image, no labels).
        train: items go through the train transform (default: for the train split); crop_size: not scaled;
            scale: multiplies every train / eval size (the demo: 1/8); num_classes: the model's class set
            (default: the native one); cat_max_ratio: mmseg's crop constraint.
    """
    info = dataset_info(name)
    # the aliases win over native names: "val" is DELIVER's eval split "test", not its own "val" [our choice]
    split = {"train": info.train_split, "val": info.eval_split}.get(split, split)
    if split not in info.splits:
        raise DatasetError(f"error: {name}: unknown split '{split}'. Expected train, val or one of "
                           f"{', '.join(info.splits)}.")
    k = num_classes or info.num_classes
    if is_folder(name):
        folder = Path(info.folder)
        listing = list_folder(name, folder, split, info.num_classes)
        if not listing.has_labels:  # a folder split without labels takes the model's class set
            info = dataclasses.replace(info, num_classes=k)
    else:
        convert_labels(info.num_classes, k)  # fail on 11/9 -> 19 before reading anything
        folder = resolve_folder(name, info.folder, root, split)
        listing = LISTERS[name](name, folder, split, split in info.no_gt_splits)
    return SegDataset(name, folder, split, listing, info, train=split == info.train_split if train is None else train,
                      crop_size=crop_size, scale=scale, num_classes=k, cat_max_ratio=cat_max_ratio)
