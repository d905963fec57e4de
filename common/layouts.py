"""Where each dataset keeps its files: one lister per official layout (trees in data/README.md) returning the
items of a split and how to decode them, your own `folder:PATH`, the image/label size check, `resolve_folder`.
Images and labels are paired by explicit suffix and stem, never by `*.png` (DAFormer's converted files sit next
to the raw ones); a missing folder, an empty split or an image without its label is a one-line `DatasetError`.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from common.readers import (DatasetError, cached, check_events_h5, corrupt, files_hash, image_size, note_once,
                            parallel_map, read_label)

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DELIVER_CONDITIONS = ("cloud", "fog", "night", "rain", "sun")
# DSEC-Semantic sequences [official; ref: ESS, MADM]
DSEC_SEQUENCES = {
    "train": ("zurich_city_00_a", "zurich_city_01_a", "zurich_city_02_a", "zurich_city_04_a",
              "zurich_city_05_a", "zurich_city_06_a", "zurich_city_07_a", "zurich_city_08_a"),
    "test": ("zurich_city_13_a", "zurich_city_14_c", "zurich_city_15_a"),
}


@dataclass
class Item:
    image: Optional[Path]  # None for raw DSEC events (rendered from the h5 file)
    label: Optional[Path]  # None without ground truth
    name: str              # path relative to the dataset folder (`folder:PATH`: to its image folder)
    extra: dict = field(default_factory=dict)  # raw DSEC events: seq, t (us), events and rectify files


@dataclass
class Listing:
    items: list[Item]
    label_kind: str              # a `readers.read_label` kind, or "none" (every label 255)
    image_kind: str              # "rgb" | "grey" | "depth" | "auto" (`readers.read_image`) | "events"
    has_labels: bool = True
    skip_mismatch: bool = False  # GTA5: about 25 pairs differ in size; skipped with one warning [our choice]
    crop_top: bool = False       # DSEC edge images 640x480 -> the top 440 rows, the label frame [ref: MADM]


def _missing(name: str, folder: Path, rel: str, pattern: str) -> DatasetError:
    return DatasetError(f"error: {name}: no folder '{rel}' under '{folder}'. Expected {pattern} (official layout).")


def _require_dir(name: str, folder: Path, rel: str, pattern: str) -> Path:
    if not (folder / rel).is_dir():
        raise _missing(name, folder, rel, pattern)
    return folder / rel


def _empty(name: str, directory: Path, what: str) -> DatasetError:
    return DatasetError(f"error: {name}: '{directory}' contains no {what} files.")


def _unlabeled(images: list[Path], folder: Path) -> list[Item]:
    return [Item(p, None, p.relative_to(folder).as_posix()) for p in images]


def _pair(name: str, folder: Path, img_dir: Path, images: list[Path], lab_dir: Path,
          labels: list[tuple[Callable[[Path], Path], str]], image_kind: str = "rgb") -> Listing:
    """Every image with its label. `labels`: (image path relative to `img_dir` -> label path under `lab_dir`,
    label kind), tried in order: the first that has a label for every image is used, else the last (DAFormer's
    converted trainIds when complete for the split, else the raw encoding)."""
    for to_label, kind in labels:
        paths = [lab_dir / to_label(p.relative_to(img_dir)) for p in images]
        if all(p.is_file() for p in paths):
            break
    missing = [img for img, lab in zip(images, paths) if not lab.is_file()]
    if missing:
        raise DatasetError(f"error: {name}: {len(images)} images but {len(images) - len(missing)} labels; first "
                           f"without a label: {missing[0].name}. Images and labels are paired by stem in "
                           f"'{img_dir}' and '{lab_dir}'.")
    return Listing([Item(p, q, p.relative_to(folder).as_posix()) for p, q in zip(images, paths)], kind,
                   image_kind)


def _list(name: str, folder: Path, pattern: str, img_rel: str, glob: str, lab_rel: str,
          labels: list[tuple[Callable[[Path], Path], str]], no_gt: bool = False, image_kind: str = "rgb",
          what: str = "", keep: Callable[[Path], bool] = lambda p: True) -> Listing:
    """The files matching `glob` (sorted) in `folder/img_rel` that `keep` accepts, paired with their labels in
    `folder/lab_rel` (`_pair`); without labels for a split without ground truth (`no_gt`: the metric refuses
    it). A missing folder or no file is an error naming `pattern`."""
    img_dir = _require_dir(name, folder, img_rel, pattern)
    images = [p for p in sorted(img_dir.glob(glob)) if keep(p)]
    if not images:
        what = what or Path(glob).name
        raise _empty(name, img_dir, what[1:] if what.startswith("*.") else what)
    if no_gt:
        return Listing(_unlabeled(images, folder), "none", image_kind, False)
    return _pair(name, folder, img_dir, images, _require_dir(name, folder, lab_rel, pattern), labels, image_kind)


# ---- one lister per layout: (name, dataset folder, native split, split without ground truth) -> Listing ------
def _list_cityscapes(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    def label(suffix: str) -> Callable[[Path], Path]:
        return lambda r: r.with_name(r.name[: -len("_leftImg8bit.png")] + f"_gtFine_{suffix}.png")
    # labelTrainIds are not in the download (cityscapesScripts makes them): used when complete [our choice]
    return _list(name, folder, "leftImg8bit/<train|val|test>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/"
                 "*_gtFine_labelIds.png", f"leftImg8bit/{split}", "*/*_leftImg8bit.png", f"gtFine/{split}",
                 [(label("labelTrainIds"), "cs_trainIds"), (label("labelIds"), "cs_labelIds")], no_gt)


def _list_numbered(name: str, folder: Path, split: str, img_rel: str, lab_rel: str, digits: int, raw_kind: str,
                   hint: str) -> Listing:
    """GTA5 (`images/NNNNN.png`) and SYNTHIA (`RGB/NNNNNNN.png`); "val" = the ids = 0 mod 50 [our choice]."""
    n, num = "N" * digits, re.compile(rf"^\d{{{digits}}}\.png$")  # raw files are exactly N digits + .png
    listing = _list(name, folder, f"{img_rel}/{n}.png and {lab_rel}/{n}.png ({hint})", img_rel, "*.png", lab_rel,
                    [(lambda r: r.with_name(f"{r.stem}_labelTrainIds.png"), "trainIds"), (lambda r: r, raw_kind)],
                    what=f"{n}.png", keep=lambda p: num.match(p.name) and (split != "val" or int(p.stem) % 50 == 0))
    listing.skip_mismatch = name == "gta5"
    return listing


def _acdc_files(directory: Path, suffix: str) -> list[Path]:
    """`*<suffix>` directly in `directory` or one folder deeper: the official layout keeps a sequence folder,
    DAFormer's rsync flattens it. Only the exact split folder is listed, so `*_ref` folders never match."""
    return sorted(set(directory.glob(f"*{suffix}")) | set(directory.glob(f"*/*{suffix}")))


def _list_acdc(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    """ACDC, official (`rgb_anon/<cond>/<split>/<seq>/`) or DAFormer's flattened layout (`rgb_anon/<split>/`),
    which has lost the condition: it serves `acdc` when no condition folder exists for the split [our choice].
    Labels are paired by file name, unique across sequences and conditions (any flattening works)."""
    pattern = "rgb_anon/<fog|night|rain|snow>/<train|val|test>/<seq>/*_rgb_anon.png"
    conds = ACDC_CONDITIONS if name == "acdc" else (name.split("_", 1)[1],)
    flat = (name == "acdc" and (folder / "rgb_anon" / split).is_dir()
            and not any((folder / "rgb_anon" / c / split).is_dir() for c in conds))
    items: list[Item] = []
    for sub in ([split] if flat else [f"{c}/{split}" for c in conds]):
        img_dir = _require_dir(name, folder, f"rgb_anon/{sub}", pattern)
        images = _acdc_files(img_dir, "_rgb_anon.png")
        if not images:
            raise _empty(name, img_dir, "*_rgb_anon.png")
        if no_gt:
            items += _unlabeled(images, folder)
            continue
        lab_dir = _require_dir(name, folder, f"gt/{sub}", "gt/<cond>/<split>/<seq>/*_gt_labelTrainIds.png")
        by_name: dict[str, list[Path]] = {}
        for q in _acdc_files(lab_dir, "_gt_labelTrainIds.png"):
            by_name.setdefault(q.name, []).append(q)

        def label(r: Path) -> Path:  # the same relative path, else the one file of that name (absolute)
            r = r.with_name(r.name[: -len("_rgb_anon.png")] + "_gt_labelTrainIds.png")
            found = by_name.get(r.name, [])
            return found[0] if not (lab_dir / r).is_file() and len(found) == 1 else r
        items += _pair(name, folder, img_dir, images, lab_dir, [(label, "trainIds")]).items
    return Listing(items, "none" if no_gt else "trainIds", "rgb", not no_gt)


def _list_dark_zurich(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    # train conditions are day / twilight / night; the target is night [ref: DAFormer CS->DZ]
    return _list(name, folder, "rgb_anon/<train|val|test>/night/<seq>/*_rgb_anon.png and gt/val/night/<seq>/"
                 "*_gt_labelTrainIds.png", f"rgb_anon/{split}/night", "*/*_rgb_anon.png", f"gt/{split}/night",
                 [(lambda r: r.with_name(r.name.replace("_rgb_anon.png", "_gt_labelTrainIds.png")), "trainIds")],
                 no_gt)


def _list_bdd(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    pattern = "images/10k/<train|val|test>/*.jpg and labels/sem_seg/masks/<split>/*.png"
    if (folder / "images" / "10k").is_dir():
        return _list(name, folder, pattern, f"images/10k/{split}", "*.jpg", f"labels/sem_seg/masks/{split}",
                     [(lambda r: r.with_suffix(".png"), "trainIds")], no_gt)
    return _list(name, folder, pattern + " (or seg/images/<split>/*.jpg)", f"seg/images/{split}", "*.jpg",
                 f"seg/labels/{split}", [(lambda r: r.with_name(r.stem + "_train_id.png"), "trainIds")], no_gt)


def _list_mapillary(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    cfg = folder / "config_v1.2.json"
    if cfg.is_file():  # v1.2 has 66 labels, v2.0 has 124
        try:
            n = len(json.loads(cfg.read_text())["labels"])
        except (ValueError, KeyError, TypeError) as e:
            raise corrupt(name, cfg, e) from None
        if n != 66:
            raise DatasetError(f"error: mapillary: '{cfg}' lists {n} labels. Expected the 66 labels of "
                               f"Vistas v1.2 (v2.0 with 124 is not used).")
    old = not (folder / split / "v1.2" / "labels").is_dir() and (folder / split / "labels").is_dir()  # v1.x
    return _list(name, folder, "<training|validation>/images/*.jpg and <split>/v1.2/labels/*.png (v2.0 labels "
                 "are not used)", f"{split}/images", "*.jpg", f"{split}/labels" if old else f"{split}/v1.2/labels",
                 [(lambda r: r.with_suffix(".png"), "mapillary")], no_gt)


def _list_fmb(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    # always the split's own folder: test names interleave with train names
    return _list(name, folder, "<train|test>/{Infrared,Visible,Label}/NNNNN.png", f"{split}/Infrared", "*.png",
                 f"{split}/Label", [(lambda r: r, "fmb")], image_kind="grey")


def _list_deliver(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    pattern = "depth/<cloud|fog|night|rain|sun>/<train|val|test>/<map>/*_depth_front.png (not hha/)"
    _require_dir(name, folder, "depth", pattern)
    conds = [c for c in DELIVER_CONDITIONS if (folder / "depth" / c / split).is_dir()]
    if not conds:
        raise _missing(name, folder, f"depth/{DELIVER_CONDITIONS[0]}/{split}", pattern)
    items: list[Item] = []
    for cond in conds:
        img_dir = folder / "depth" / cond / split
        lab_dir = _require_dir(name, folder, f"semantic/{cond}/{split}",
                               "semantic/<cond>/<split>/<map>/*_semantic_front.png")
        items += _pair(name, folder, img_dir, sorted(img_dir.glob("*/*_depth_front.png")), lab_dir, [  # front camera
            (lambda r: r.with_name(r.name.replace("_depth_front.png", "_semantic_front.png")), "deliver")]).items
    if not items:
        raise _empty(name, folder / "depth" / conds[0] / split, "*_depth_front.png")
    return Listing(items, "deliver", "depth")


def _dsec_frame(k: int, split: str) -> bool:
    """The frames of MADM's lists (`data/json_file/Cityscapes_RGB_to_DSEC_Event_*.json`): train 2, 4, 6, ...,
    test 1, 2, 3, ... (frame 0 has no preceding events), for the edge PNGs (frame = file stem) and the raw events
    (frame = index of the label file) alike, even where a download holds more edge files [ref: MADM]."""
    return k >= 1 and k % (2 if split == "train" else 1) == 0


def _dsec_labels(folder: Path, split: str, seq: str, events: bool) -> Optional[Path]:
    """The label folder of one sequence (MADM's layout, then ESS's); MADM's has no timestamps, so raw events need
    ESS's. None for MADM's train edges, an unlabeled target split."""
    tried = [f"test_semantic_labels/{seq}/11classes/", f"{split}/{seq}/semantic/11classes/data/",
             f"{split}/{seq}/semantic/left/11classes/data/"]
    for rel in (tried[1:] if events else tried):
        if (folder / rel).is_dir():
            return folder / rel
    if split == "train" and not events:
        return None
    raise DatasetError(f"error: dsec_event: no labels for sequence '{seq}'. Tried {', '.join(tried)}. Download "
                       f"DSEC-Semantic from https://dsec.ifi.uzh.ch/dsec-semantic/.")


def _list_dsec(name: str, folder: Path, split: str, no_gt: bool) -> Listing:
    """MADM's edge images when `69mask_<split>_edges/` exists, else the raw events (data/README.md
    "dsec_event")."""
    edges, seqs = folder / f"69mask_{split}_edges", DSEC_SEQUENCES[split]
    if not edges.is_dir():
        return _list_dsec_events(name, folder, split)
    present = [s for s in seqs if (edges / s).is_dir()]
    if not present:
        raise _missing(name, folder, f"69mask_{split}_edges/{seqs[0]}",
                       f"69mask_{split}_edges/<seq>/NNNNNN.png for {', '.join(seqs)}")
    items: list[Item] = []
    for seq in present:
        files = sorted(p for p in (edges / seq).glob("*.png") if p.stem.isdigit() and _dsec_frame(int(p.stem), split))
        lab_dir = _dsec_labels(folder, split, seq, events=False)
        items += (_pair(name, folder, edges / seq, files, lab_dir, [(lambda r: r, "trainIds")]).items if lab_dir
                  else _unlabeled(files, folder))
    if not items:
        raise DatasetError(f"error: dsec_event: '{edges / present[0]}' contains no NNNNNN.png frames kept by the "
                           f"frame rule (frames >= 1, stride {2 if split == 'train' else 1}). Expected MADM's edge "
                           f"images 69mask_{split}_edges/<seq>/NNNNNN.png.")
    has_labels = all(it.label is not None for it in items)
    note_once(f"dsec:{split}:edges", f"dsec_event {split}: edge images, frames of MADM's lists ({len(items)})"
              + ("" if has_labels else "; no labels: all-ignore labels (an unlabeled target split)"))
    return Listing(items, "trainIds" if has_labels else "none", "grey", has_labels, crop_top=True)


def _list_dsec_events(name: str, folder: Path, split: str) -> Listing:
    present = [s for s in DSEC_SEQUENCES[split] if (folder / split / s).is_dir()]
    if not present:
        raise _missing(name, folder, f"{split}/{DSEC_SEQUENCES[split][0]}",
                       f"{split}/<seq>/events/left/events.h5 and {split}/<seq>/semantic/11classes/data/")
    items: list[Item] = []
    for seq in present:
        ev = folder / split / seq / "events" / "left" / "events.h5"
        rect = ev.parent / "rectify_map.h5"
        for f in (ev, rect):
            if not f.is_file():
                raise DatasetError(f"error: dsec_event: no file '{f.relative_to(folder)}' under '{folder}'. "
                                   f"Expected {split}/<seq>/events/left/{{events.h5,rectify_map.h5}} (official "
                                   f"layout).")
        check_events_h5(folder, split, ev)
        lab_dir = _dsec_labels(folder, split, seq, events=True)
        labels = sorted(lab_dir.glob("*.png"))
        sem = lab_dir.parent.parent  # .../semantic or .../semantic/left
        ts_file = next((p for p in (sem / "timestamps.txt", sem.parent / "timestamps.txt") if p.is_file()), None)
        if ts_file is None:
            raise DatasetError(f"error: dsec_event: no timestamps.txt for sequence '{seq}' in '{sem}'. Expected "
                               f"one int64 microsecond timestamp per label file (DSEC-Semantic).")
        ts = np.loadtxt(ts_file, dtype=np.int64, ndmin=1)  # int64 us: never through float
        if len(ts) != len(labels):
            raise DatasetError(f"error: dsec_event: '{seq}' has {len(ts)} timestamps but {len(labels)} label "
                               f"files; they must match one to one.")
        items += [Item(None, lab, lab.relative_to(folder).as_posix(), {"seq": seq, "t": int(ts[k]), "events": ev,
                                                                     "rectify": rect})
                  for k, lab in enumerate(labels) if _dsec_frame(k, split)]
    if not items:
        raise _empty(name, folder / split, "label")
    note_once(f"dsec:{split}:events", f"dsec_event {split}: raw events, 50 ms before each label, frames of MADM's "
                                      f"lists ({len(items)})")
    return Listing(items, "trainIds", "events")


LISTERS: dict[str, Callable[[str, Path, str, bool], Listing]] = {
    "cityscapes": _list_cityscapes,
    "gta5": lambda n, f, s, _: _list_numbered(n, f, s, "images", "labels", 5, "cs_labelIds_palette",
                                              "palette PNGs of Cityscapes labelIds"),
    "synthia": lambda n, f, s, _: _list_numbered(n, f, s, "RGB", "GT/LABELS", 7, "synthia16", "16-bit RGB, id in R"),
    **{n: _list_acdc for n in ("acdc", *(f"acdc_{c}" for c in ACDC_CONDITIONS))},
    "dark_zurich": _list_dark_zurich, "bdd100k": _list_bdd, "mapillary": _list_mapillary, "dsec_event": _list_dsec,
    "fmb_infrared": _list_fmb, "deliver_depth": _list_deliver,
}


# ---- your own data: `folder:PATH` (data/README.md "Your own data") ------------------------------------------
def folder_items(name: str, path: Path, source: bool = False) -> list[Item]:
    """Every image of `folder:PATH` (`PATH/images/**` if that folder exists, else `PATH/**`; .png/.jpg/.jpeg, any
    case, hidden folders skipped) with its label `labels/<rel>/<stem>.png` where there is one (a `source` needs
    one for every image). Names are relative to the image folder: predictions keep the folder structure."""
    img_dir, lab_dir = path / "images", path / "labels"
    layout = f"{path}/images/ + {path}/labels/ (trainId PNGs, same stems)"
    if lab_dir.is_dir() and not img_dir.is_dir():
        raise DatasetError(f"error: {name}: '{lab_dir}' has no images/ folder beside it. Expected {layout}.")
    root = img_dir if img_dir.is_dir() else path
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file()
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
        items.append(Item(img, lab if lab.is_file() else None, img.relative_to(root).as_posix()))
    unlabeled = [it for it in items if it.label is None]
    if source and unlabeled:
        raise DatasetError(f"error: --src {name}: {len(items)} images but {len(items) - len(unlabeled)} labels; "
                           f"first without a label: images/{unlabeled[0].name}. Expected {lab_dir}/<same "
                           f"stem>.png for every image.")
    return items


def list_folder(name: str, folder: Path, split: str, k: int) -> Listing:
    """`folder:PATH` splits: "train" = every image (labels where present), "val" = the labelled images if any,
    else every image without labels (pictures, no metric), "predict" = every image, no labels. Every image
    header and label is checked once (cached): a bad file never stops a run half-way."""
    items = folder_items(name, folder)
    if split == "predict":
        items = [Item(it.image, None, it.name) for it in items]
    def check(it: Item) -> None:
        w, h = image_size(name, it.image)
        lab = read_label(name, it.label, "trainIds", k) if it.label is not None else None
        if lab is not None and (w, h) != lab.shape[::-1]:
            raise DatasetError(f"error: {name}: image '{it.image}' is {w}x{h} but its label is "
                               f"{lab.shape[1]}x{lab.shape[0]}. Image and label must have the same size.")
    _cached(folder, f"folder_check_{k}", items, lambda: len(parallel_map(check, items)))
    labelled = [it for it in items if it.label is not None]
    return Listing(labelled if split == "val" and labelled else items, "trainIds", "auto", bool(labelled))


def _cached(folder: Path, key: str, items: list[Item], compute: Callable[[], Any]) -> Any:
    """`compute()` (JSON), computed once per list of image and label files (`common.readers.cached`)."""
    return cached(folder, f"{key}_{files_hash([p for it in items for p in (it.image, it.label)])}.json",
                  lambda d: d.get("n") == len(items) and "value" in d, lambda: {"n": len(items), "value": compute()}
                  )["value"]


def check_sizes(name: str, folder: Path, split: str, listing: Listing) -> list[Item]:
    """The items whose image and label have the same size (file headers, cached by the file list); a mismatch
    is an error, or skipped with one warning (GTA5)."""
    items = listing.items
    sizes = _cached(folder, f"sizes_{name}_{split}", items, lambda: parallel_map(
        lambda it: (image_size(name, it.image), image_size(name, it.label)), items))
    bad = []
    for it, (si, sl) in zip(items, map(lambda s: tuple(map(tuple, s)), sizes)):
        if listing.crop_top and si[0] == sl[0] and si[1] > sl[1]:
            si = (si[0], sl[1])  # 640x480 edge image -> top 440 rows
        if si != sl:
            bad.append((it, si, sl))
    if bad and listing.skip_mismatch:
        warnings.warn(f"{name}: skipped {len(bad)} image/label pairs of different sizes (e.g. {bad[0][0].name}: "
                      f"{bad[0][1][0]}x{bad[0][1][1]} vs {bad[0][2][0]}x{bad[0][2][1]})", stacklevel=3)
        skipped = {id(b[0]) for b in bad}
        return [it for it in items if id(it) not in skipped]
    if bad:
        it, si, sl = bad[0]
        raise DatasetError(f"error: {name}: image '{it.image}' is {si[0]}x{si[1]} but its label is "
                           f"{sl[0]}x{sl[1]}. Image and label must have the same size.")
    return items


# subfolders that mark a dataset folder passed directly as the root; two example paths; what to download
_ROOTS = {
    "cityscapes": (("leftImg8bit",), "leftImg8bit/{split}/<city>/*_leftImg8bit.png",
                   "gtFine/{split}/<city>/*_gtFine_labelIds.png", "leftImg8bit_trainvaltest.zip and "
                   "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/"),
    "gta5": (("images", "labels"), "images/NNNNN.png", "labels/NNNNN.png",
             "the images and labels zips from https://download.visinf.tu-darmstadt.de/data/from_games/"),
    "synthia": (("RGB", "GT"), "RGB/NNNNNNN.png", "GT/LABELS/NNNNNNN.png",
                "SYNTHIA-RAND-CITYSCAPES from https://synthia-dataset.net/downloads/"),
    "acdc": (("rgb_anon", "gt"), "rgb_anon/<cond>/{split}/<seq>/*_rgb_anon.png",
             "gt/<cond>/{split}/<seq>/*_gt_labelTrainIds.png",
             "rgb_anon_trainvaltest.zip and gt_trainval.zip from https://acdc.vision.ee.ethz.ch/download"),
    "dark_zurich": (("rgb_anon",), "rgb_anon/{split}/night/<seq>/*_rgb_anon.png",
                    "gt/val/night/<seq>/*_gt_labelTrainIds.png", "Dark_Zurich_train_anon.zip and "
                    "Dark_Zurich_val_anon.zip from https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/"),
    "bdd100k": (("images", "seg", "labels"), "images/10k/{split}/*.jpg", "labels/sem_seg/masks/{split}/*.png",
                "the 10K images and semantic segmentation labels from https://bdd-data.berkeley.edu"),
    "mapillary": (("training", "validation", "testing"), "{split}/images/*.jpg", "{split}/v1.2/labels/*.png",
                  "Mapillary Vistas v1.2 from https://www.mapillary.com/dataset/vistas"),
    "dsec_event": (("69mask_train_edges", "69mask_test_edges", "test_semantic_labels", "train", "test"),
                   "69mask_{split}_edges/<seq>/NNNNNN.png", "test_semantic_labels/<seq>/11classes/NNNNNN.png",
                   "the edge images (links in the XiaRho/MADM README) and DSEC-Semantic from "
                   "https://dsec.ifi.uzh.ch/dsec-semantic/"),
    "fmb_infrared": (("train", "test"), "{split}/Infrared/NNNNN.png", "{split}/Label/NNNNN.png",
                     "FMB (links in the JinyuanLiu-CV/SegMiF README)"),
    "deliver_depth": (("depth", "semantic"), "depth/<cond>/{split}/<map>/*_depth_front.png",
                      "semantic/<cond>/{split}/<map>/*_semantic_front.png",
                      "DELIVER (links in the jamycheung/DELIVER README)"),
}


def resolve_folder(name: str, default_folder: str, root: str | Path, split: str) -> Path:
    """`root/<default folder>` if it exists, else `root` itself if it looks like the dataset's folder; else a
    DatasetError naming the expected paths and the download page."""
    root = Path(root)
    markers, a, b, how = _ROOTS["acdc" if name.startswith("acdc") else name]
    if (root / default_folder).is_dir():
        return root / default_folder
    if root.is_dir() and any((root / m).is_dir() for m in markers):
        return root
    shown = root if root.name == default_folder else root / default_folder
    raise DatasetError(f"error: {name}: folder '{shown}' not found. Expected '{shown}/{a.format(split=split)}' "
                       f"and '{shown}/{b.format(split=split)}'. Download {how} and set --data-root.")
