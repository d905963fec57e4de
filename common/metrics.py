"""Semantic-segmentation metric, mmseg's convention (`IoUMetric`: intersections and unions summed over the
whole evaluation set): one confusion matrix over the set, per-class IoU, mIoU as the NaN-mean over classes
present in ground truth or prediction, the mmseg-style table, and `evaluate`, which runs a method's
`predict_fn` over an evaluation dataset with the sizes and the image / label resampling of the reference a
method compares with (`resize_image`, `resize_label`; data/README.md "Evaluation sizes and resampling").

Convention: confusion matrices are (K, K) int64 with **rows = ground truth, columns = prediction**. Never
average per-image IoUs: accumulate the matrix over the set by summing, then compute IoU once.
"""
from __future__ import annotations

import json
import math
import os
import resource
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import cli

# SYNTHIA shares 16 of the 19 Cityscapes classes (terrain, truck, train never occur); mIoU13 also drops wall,
# fence, pole. Both are the usual SYNTHIA -> Cityscapes numbers, computed from the per-class IoUs.
SYNTHIA16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13 = tuple(c for c in SYNTHIA16 if c not in (3, 4, 5))


def confusion_matrix(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """Count (ground truth, prediction) pairs.

    Args:
        pred: int class ids of any shape, in [0, K) wherever the target is not ignored.
        target: int class ids, same shape; `ignore_index` pixels are skipped.
        num_classes: K.
        ignore_index: the ignore label (255).
    Returns:
        int64 (K, K), rows = ground truth, columns = prediction.
    Raises:
        ValueError: a kept prediction or target lies outside [0, K).
    """
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    pred, target = np.asarray(pred).astype(np.int64).ravel(), np.asarray(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels but the target has {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    for what, arr in (("prediction", pred), ("target", target)):
        bad = arr[(arr < 0) | (arr >= num_classes)]
        if bad.size:
            raise ValueError(f"{what} contains class {int(bad[0])} but num_classes is {num_classes} "
                             f"(valid 0..{num_classes - 1}).")
    k = num_classes
    return np.bincount(k * target + pred, minlength=k**2).reshape(k, k)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.full(a.shape, np.nan, dtype=np.float64)
    np.divide(a, b, out=out, where=b > 0)
    return out


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (row_c + col_c − TP); NaN where the class is absent from both ground truth and
    prediction.

    A class predicted but absent from the ground truth gets IoU 0 and counts in the mean.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    return _safe_div(tp, conf.sum(1) + conf.sum(0) - tp)


def acc_per_class(conf: np.ndarray) -> np.ndarray:
    """Acc_c = TP / row_c (recall); NaN where the class has no ground-truth pixel."""
    conf = np.asarray(conf, dtype=np.float64)
    return _safe_div(np.diag(conf), conf.sum(1))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan  # no "mean of empty slice" warning


def mean_iou(conf: np.ndarray) -> float:
    """NaN-mean of `iou_per_class` (NaN if every class is absent)."""
    return _nanmean(iou_per_class(conf))


def summarize(conf: np.ndarray, class_names: Sequence[str], synthia: bool = False) -> dict:
    """Every number of the table as a dict (IoUs as fractions in [0, 1], NaN for absent classes).

    Returns:
        {"miou", "macc", "aacc", "per_class_iou": {name: float}, "per_class_acc": {...},
         "gt_pixels": {...}, "confusion": list of lists} plus "miou16", "miou13" when `synthia`.
    """
    iou, acc = iou_per_class(conf), acc_per_class(conf)
    total = conf.sum()
    out = {"miou": mean_iou(conf), "macc": _nanmean(acc),
           "aacc": float(np.trace(conf) / total) if total else math.nan,
           "per_class_iou": {n: float(v) for n, v in zip(class_names, iou)},
           "per_class_acc": {n: float(v) for n, v in zip(class_names, acc)},
           "gt_pixels": {n: int(v) for n, v in zip(class_names, conf.sum(1))},
           "confusion": np.asarray(conf).tolist()}
    if synthia:
        out["miou16"] = _nanmean(iou[list(SYNTHIA16)])
        out["miou13"] = _nanmean(iou[list(SYNTHIA13)])
    return out


def format_table(conf: np.ndarray, class_names: Sequence[str], header: str, synthia: bool = False) -> str:
    """The mmseg-style per-class table (values ×100, 2 decimals) followed by the summary line."""
    s = summarize(conf, class_names, synthia)
    width = max(13, max(len(n) for n in class_names))
    lines = [header, f"| id | {'class':<{width}} |    IoU |    Acc | GT pixels |"]
    for i, name in enumerate(class_names):
        iou, acc, gt = s["per_class_iou"][name], s["per_class_acc"][name], s["gt_pixels"][name]
        note = "   (absent: excluded from the mean)" if math.isnan(iou) else ""
        gt_str = f"{gt:.2e}" if gt else "0"
        lines.append(f"| {i:2d} | {name:<{width}} | {100 * iou:6.2f} | {100 * acc:6.2f} | {gt_str:<9} |"
                     f"{note}")
    present = int(np.isfinite(iou_per_class(conf)).sum())
    line = (f"mIoU {100 * s['miou']:.2f} | mAcc {100 * s['macc']:.2f} | aAcc {100 * s['aacc']:.2f} | "
            f"classes {present}/{len(class_names)}")
    if synthia:
        line += f" | mIoU16 {100 * s['miou16']:.2f} | mIoU13 {100 * s['miou13']:.2f}"
    return "\n".join(lines + [line])


# ------------------------------------------------------------------------------------------------------------
# Resizing as the references do it
# ------------------------------------------------------------------------------------------------------------
IMAGE_RESIZE = ("bilinear", "pil-bilinear")
LABEL_RESIZE = ("pil-nearest", "nearest-exact", "nearest")
# The options each reference's numbers were measured with (see `evaluate`).
RESIZE_PROTOCOLS: dict[str, dict[str, str]] = {
    "madm": {"image_resize": "pil-bilinear", "label_resize": "pil-nearest"},
    "mmseg": {"image_resize": "bilinear", "label_resize": "pil-nearest"},
}


def _check_option(flag: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise cli.UserError(f"error: {flag}: unknown value '{value}'. Expected {' or '.join(allowed)}.")


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output pixel of Pillow's NEAREST resize along one axis.

    Pillow (`Image.resize(..., NEAREST)` -> libImaging `ImagingScaleAffine`) starts at x = s/2 with s = n_in /
    n_out in double precision, adds s once per output pixel and truncates. The running sum is reproduced
    here with a sequential float64 cumsum, so the result is bit-identical to Pillow for every size pair
    (checked against Pillow 13 in tests/test_metrics.py). torch's "nearest-exact" computes floor((i + 0.5) s)
    in one step: the same for the protocol sizes (640->512, 440->512, 800->512, 600->512, 1042->512,
    halving), different by one pixel on rounding boundaries of other size pairs.

    Returns:
        (n_out,) int64 in [0, n_in).
    """
    s = n_in / n_out
    pos = np.cumsum(np.r_[s * 0.5, np.full(n_out - 1, s)])
    return np.minimum(pos.astype(np.int64), n_in - 1)


def resize_label(label: np.ndarray | torch.Tensor, size: tuple[int, int],
                 mode: str = "pil-nearest") -> np.ndarray:
    """Resize a class-id map with a nearest-neighbour rule.

    Args:
        label: int (H, W) class ids (255 = ignore).
        size: (W, H) of the output.
        mode: "pil-nearest" (Pillow's NEAREST, bit-exact; MADM's labels, Rein's Mapillary half-size labels),
            "nearest-exact" (torch; floor((i + 0.5) * in / out)) or "nearest" (torch's legacy floor(i * in /
            out), which picks other pixels: halving a 640-wide map moves every column by one).
    Returns:
        int64 (H', W') numpy array.
    """
    _check_option("label_resize", mode, LABEL_RESIZE)
    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    w, h = size
    if lab.shape == (h, w):
        return lab.astype(np.int64)
    if mode == "pil-nearest":
        rows, cols = pil_nearest_index(lab.shape[0], h), pil_nearest_index(lab.shape[1], w)
        return lab[np.ix_(rows, cols)].astype(np.int64)
    t = torch.from_numpy(lab.astype(np.int64))[None, None].double()  # exact for any id < 2**53
    return F.interpolate(t, size=(h, w), mode=mode)[0, 0].long().numpy()


def resize_image(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a float image batch as the reference pipeline does.

    Args:
        x: float (N, C, h, w), values in [0, 1].
        size: (W, H) of the output.
        mode: "bilinear" = torch bilinear, half-pixel centres, no antialiasing: the convention of OpenCV's
            `cv2.resize(INTER_LINEAR)`, which mmcv's `imresize` / mmseg's `Resize` use (DAFormer, DIFF,
            Rein); "pil-bilinear" = torch bilinear with `antialias=True`, which reproduces Pillow's
            `Image.resize(BILINEAR)` (a triangle filter widened by the scale when shrinking), as used by
            MADM's test loader. Measured against Pillow 13: max 1.0015/255 on uint8 images (Pillow rounds to
            uint8 after each of its two passes), max 3e-5 on float32 ("F") images.
    Returns:
        float (N, C, H, W).
    """
    _check_option("image_resize", mode, IMAGE_RESIZE)
    w, h = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                         antialias=(mode == "pil-bilinear"))


# ------------------------------------------------------------------------------------------------------------
# evaluate(): a method's predict_fn over an evaluation dataset
# ------------------------------------------------------------------------------------------------------------
def _metric_size(metric_size: str | tuple[int, int], label_hw: tuple[int, int],
                 input_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) at which logits and labels are compared."""
    if metric_size == "native":
        return label_hw
    if metric_size == "half":
        return (label_hw[0] // 2, label_hw[1] // 2)
    if metric_size == "input":
        return input_hw
    w, h = metric_size  # (W, H) like every size in data/README.md
    return (h, w)


@torch.no_grad()
# Resizing follows the reference whose numbers a method is compared with [our choice of defaults]:
#
# - MADM (`XiaRho/MADM` `data/dataset/cross_modality_dataset.py`, `test_resize_h_w`): Pillow resizes the
#   test image to 512x512 with BILINEAR (antialiased when shrinking: DELIVER 1042->512, DSEC 640x440->512,
#   FMB 800x600->512) and the label with NEAREST; metric at 512x512. Pass `image_resize="pil-bilinear"`,
#   `label_resize="pil-nearest"`, `metric_size="input"` (= `**RESIZE_PROTOCOLS["madm"]`).
# - mmseg-based protocols (DAFormer, DIFF, ICCLD, PTDiffSeg; Cityscapes 2048x1024 -> 1024x512 and every
#   keep-ratio resize): mmcv `imresize` = OpenCV bilinear without antialiasing -> `image_resize="bilinear"`
#   (the default). The metric is at the native label size, so no label is resized, except Mapillary's half
#   size [ref: Rein `tools/convert_datasets/mapillary_resize.py`], where labels are halved with Pillow
#   NEAREST -> `label_resize="pil-nearest"` (the default; `**RESIZE_PROTOCOLS["mmseg"]`). Rein also
#   halves the Mapillary *image* offline (Pillow BICUBIC, re-saved as JPEG) before mmseg's resize; that
#   chain is not replicated: the image is resized once, native -> eval input.
#
# Every reference that resizes labels uses Pillow's NEAREST, hence the default "pil-nearest"; torch's legacy
# "nearest" picks other source pixels (all columns differ when halving a 640-wide label, every other one
# for 640 -> 512) and is kept only for comparison.
def evaluate(predict_fn: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
             num_classes: int, class_names: Sequence[str], palette: np.ndarray, *, device: torch.device,
             dist=None,
             input_size: Optional[tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]]] = None,
             metric_size: str | tuple[int, int] = "native", desc: str = "",
             pictures_dir: Optional[str | Path] = None, num_pictures: int = 4, synthia: bool = False,
             pad_to: Optional[int] = None, progress: bool = True, image_resize: str = "bilinear",
             label_resize: str = "pil-nearest") -> dict:
    """Score `predict_fn` on every item of `dataset` (each process a disjoint shard; matrices summed).

    Args: predict_fn: image (1, 3, h, w) in [0, 1] on `device` -> logits (1, K, h', w') (any stride);
    dataset: items {"image" (3, H, W) in [0, 1], "label" int64 (H, W), "name"} at native size; num_classes,
    class_names, palette: the target's class set; dist: a script's `Dist` (None = one process);
    input_size: (W, H) every image is resized to, or a function (H, W) -> (W, H) (keep-ratio targets), None =
    native; metric_size: "native" (label size), "half" (Mapillary), "input" (MADM) or (W, H): logits are
    upsampled bilinearly to it (never an argmax), labels resized by `label_resize`; desc: the table header's
    dataset, e.g. "cityscapes val"; pictures_dir: side-by-side PNGs of the first `num_pictures` items (rank 0);
    a dataset without labels is not scored (only these pictures), a "predict" split (`folder:PATH`) writes
    `<pictures_dir>/<relative stem>_color.png` and `_trainId.png` for every image at its own size; synthia:
    also mIoU16 / mIoU13; pad_to: zero-pad right/bottom to a multiple (DIFF: 64), logits cropped back;
    image_resize / label_resize: see `resize_image` / `resize_label` (an unknown value is a UserError).
    Returns `summarize(...)` + "resolution", "num_images", "table", "image_resize", "label_resize"; without
    labels or for "predict": mIoU NaN, "no_labels" True, "table" the one line saying what was written.
    """
    _check_option("image_resize", image_resize, IMAGE_RESIZE)
    _check_option("label_resize", label_resize, LABEL_RESIZE)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    indices = list(range(rank, len(dataset), world))  # disjoint shards, no padding: no image counted twice
    base = getattr(dataset, "dataset", dataset)  # a Subset's dataset
    mode = ("predict" if getattr(base, "split", "") == "predict" else
            "score" if getattr(base, "has_labels", True) else "pictures")
    if mode != "score":  # rank 0 alone: every image (predict) or the first `num_pictures` (no labels)
        n_max = len(dataset) if mode == "predict" else min(num_pictures, len(dataset))
        indices = list(range(n_max)) if rank == 0 and pictures_dir is not None else []
    conf = np.zeros((num_classes, num_classes), np.int64)
    in_str, n_pictures = "native", 0
    it = cli.progress(indices, desc=f"eval {desc}".strip(), leave=False) if progress and rank == 0 else indices
    for i in it:
        item = dataset[i]
        image, label = item["image"], np.asarray(item["label"])
        x = image[None].to(device)
        if input_size is not None:
            size = input_size(tuple(x.shape[-2:])) if callable(input_size) else input_size
            x = resize_image(x, size, image_resize)
        h, w = x.shape[-2:]
        in_str = f"{w}x{h}"
        if pad_to:
            ph, pw = (-h) % pad_to, (-w) % pad_to
            x = F.pad(x, (0, pw, 0, ph))
        logits = predict_fn(x).float()
        if pad_to:
            # logits at stride s of the padded input: keep the part covering the real image
            s = x.shape[-1] / logits.shape[-1]
            logits = logits[..., : math.ceil(h / s), : math.ceil(w / s)]
        mh, mw = _metric_size("native" if mode == "predict" else metric_size, label.shape, (h, w))
        logits = F.interpolate(logits, size=(mh, mw), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy()
        if mode == "predict":  # at the image's own size: colour and trainId PNGs, the folder structure kept
            n_pictures += _write_prediction(pred, Path(pictures_dir) / Path(str(item["name"])).with_suffix(""),
                                            palette)
            continue
        if (mh, mw) != label.shape:
            label = resize_label(label, (mw, mh), label_resize)
        if mode == "score":
            conf += confusion_matrix(pred, label, num_classes)
        if pictures_dir is not None and rank == 0 and n_pictures < num_pictures:
            n_pictures += 1
            name = Path(str(item.get("name", i))).stem
            save_side_by_side(Path(pictures_dir) / f"{i:04d}_{name}.png", image, label, pred, palette,
                              class_names)
    if mode != "score":  # no metric: one line says what was written instead
        out = summarize(conf, class_names)
        line = (f"no mIoU without labels: wrote prediction pictures for {n_pictures} images to {pictures_dir}"
                if mode == "pictures" else f"predict: wrote colour and trainId PNGs for {n_pictures} images "
                f"to {pictures_dir}")
        return dict(out, no_labels=True, resolution=f"input {in_str}", num_images=n_pictures, table=line,
                    image_resize=image_resize, label_resize=label_resize)
    return _scores(conf, dist, device, class_names, len(dataset), in_str, metric_size, desc, synthia,
                   image_resize, label_resize)


def _write_prediction(pred: np.ndarray, stem: Path, palette: np.ndarray) -> int:
    stem.parent.mkdir(parents=True, exist_ok=True)
    colorize(pred, palette).save(f"{stem}_color.png")
    Image.fromarray(pred.astype(np.uint8)).save(f"{stem}_trainId.png")
    return 1


def _scores(conf: np.ndarray, dist, device: torch.device, class_names: Sequence[str], n: int, in_str: str,
            metric_size, desc: str, synthia: bool, image_resize: str, label_resize: str) -> dict:
    """`evaluate`'s result from this process's confusion matrix: summed over the processes, then summarized."""
    conf_t = torch.from_numpy(conf).to(device if (dist is not None and dist.world > 1
                                                  and device.type == "cuda") else "cpu")
    if dist is not None:
        dist.all_reduce_sum(conf_t)
    conf = conf_t.cpu().numpy()
    metric_names = {"native": "native label size", "half": "half the native label size",
                    "input": f"{in_str} (label nearest-resized)"}
    metric_str = metric_names.get(metric_size, f"{metric_size}")  # type: ignore[call-overload]
    resolution = f"input {in_str}, metric at {metric_str}"
    resize_str = f"image {image_resize}" + (f", label {label_resize}" if metric_size != "native" else "")
    header = f"per-class results — {desc}, {n} images, {resolution} ({resize_str})"
    out = summarize(conf, class_names, synthia)
    out.update(resolution=resolution, num_images=n, image_resize=image_resize,
               label_resize=label_resize, table=format_table(conf, class_names, header, synthia))
    return out


__all__ = ["confusion_matrix", "iou_per_class", "acc_per_class", "mean_iou", "summarize", "format_table",
           "evaluate", "resize_image", "resize_label", "pil_nearest_index", "IMAGE_RESIZE", "LABEL_RESIZE",
           "RESIZE_PROTOCOLS", "SYNTHIA16", "SYNTHIA13", "colorize", "save_side_by_side", "write_curves",
           "write_metrics", "peak_memory_gb"]
warnings.filterwarnings("ignore", message="Mean of empty slice")


# ------------------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------------------
def colorize(label: np.ndarray, palette: np.ndarray) -> "Image.Image":
    """Label map (H, W) of class ids (255 = ignore) -> RGB PIL image with the class-set palette, ignore
    black."""
    from PIL import Image
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return Image.fromarray(lut[np.asarray(label, dtype=np.uint8)])


def _legend(classes: list[tuple[str, tuple[int, int, int]]], width: int) -> "Image.Image":
    """A white strip naming the colour of each class: swatch + name, wrapped over as many rows as needed."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, y, row_h = [], 8, 6, 22
    for name, colour in classes:
        w = 18 + 6 + int(probe.textlength(name, font=font)) + 16
        if x + w > width and x > 8:
            x, y = 8, y + row_h
        items.append((x, y, name, colour))
        x += w
    strip = Image.new("RGB", (width, y + row_h + 4), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in items:
        draw.rectangle([x, y + 2, x + 18, y + 18], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + 24, y + 2), name, fill="black", font=font)
    return strip


def save_side_by_side(path: str | Path, image: torch.Tensor, gt: np.ndarray, pred: np.ndarray,
                      palette: np.ndarray, class_names: Optional[Sequence[str]] = None,
                      min_height: int = 256) -> None:
    """Write `input | ground truth | prediction` as one PNG, with a legend strip under it.

    Panels smaller than `min_height` pixels are upscaled (nearest, so labels stay crisp) until they are at
    least that high; the legend names the colours of the classes that appear in the ground truth or the
    prediction (ignore = black).

    Args:
        image: float (3, H, W) in [0, 1] (resized to the label size if it differs).
        gt, pred: int (H, W) class ids, 255 = ignore (black).
        palette: (K, 3) uint8.
        class_names: K names for the legend (None = no legend).
        min_height: smallest panel height in pixels.
    """
    from PIL import Image
    h, w = gt.shape
    img = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    panels = [Image.fromarray(img).resize((w, h), Image.BILINEAR), colorize(gt, palette),
              colorize(pred, palette)]
    f = max(1, -(-min_height // h))  # integer upscale factor: a 64-pixel demo panel becomes 256 pixels high
    panels = [p.resize((w * f, h * f), Image.NEAREST) for p in panels]
    canvas = Image.new("RGB", (3 * w * f, h * f), "white")
    for k, p in enumerate(panels):
        canvas.paste(p, (k * w * f, 0))
    if class_names is not None:
        present = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()))
        classes = [(class_names[c], tuple(palette[c])) for c in present if c < len(class_names)]
        if 255 in present:
            classes.append(("ignore", (0, 0, 0)))
        legend = _legend(classes, canvas.width)
        full = Image.new("RGB", (canvas.width, canvas.height + legend.height), "white")
        full.paste(canvas, (0, 0))
        full.paste(legend, (0, canvas.height))
        canvas = full
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_curves(out_dir: str | Path) -> Optional[Path]:
    """`<out>/curves.png`: every logged loss and the evaluation mIoU over steps, from `<out>/metrics.json`.

    Needs matplotlib (installed in Colab; not a dependency): without it one line says the plot was skipped.
    Returns the file, or None when nothing was written.
    """
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        return None
    try:  # a bare Figure, not pyplot: no global backend switch in the user's notebook
        from matplotlib.figure import Figure
    except ImportError:
        cli.log("curves.png skipped: matplotlib is not installed (pip install matplotlib to get the training "
            "curves)")
        return None
    data = json.loads(path.read_text())
    logs = {k: v for k, v in data.items() if k.startswith("train_log") and isinstance(v, list) and v}
    evals = [e for e in data.get("evals", []) if isinstance(e, dict) and e.get("miou") is not None]
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, recs in logs.items():
        for name in recs[0]:
            if name.startswith("loss") and all(r.get(name) is not None for r in recs):
                label = name if len(logs) == 1 else f"{key.replace('train_log', '').strip('_')} {name}"
                ax1.plot([r["step"] for r in recs], [r[name] for r in recs], label=label)
    ax1.set(xlabel="step", ylabel="loss", title="training losses")
    if ax1.get_lines():  # an --eval-only run has no losses
        ax1.legend(fontsize=8)
    groups: dict[str, list] = {}
    for e in evals:  # one line per evaluated target / path
        tag = " ".join(str(e[k]) for k in ("target", "path", "prompt") if k in e) or "mIoU"
        groups.setdefault(tag, []).append(e)
    for tag, es in groups.items():
        ax2.plot([e.get("step", 0) for e in es], [100 * e["miou"] for e in es], "o-", label=tag)
    ax2.set(xlabel="step", ylabel="mIoU (%)", title="evaluation")
    if groups:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    png = Path(out_dir) / "curves.png"
    fig.savefig(png, dpi=100)
    return png


# ---- metrics.json: args, train log, evaluations, final result ----
def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, torch.Tensor)):
        return [_jsonable(v) for v in (obj.tolist() if hasattr(obj, "tolist") else obj)]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None  # NaN -> null: the file stays valid JSON
    return int(obj) if isinstance(obj, np.integer) else obj


def write_metrics(out: Path, record: Any, key: str = "evals") -> None:
    """Append `record` to the list "evals" of <out>/metrics.json, or set `key` to it; an atomic rewrite."""
    path = out / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("evals", []).append(_jsonable(record)) if key == "evals" else data.update({key: _jsonable(record)})
    (out / "metrics.json.tmp").write_text(json.dumps(data, indent=1))
    os.replace(out / "metrics.json.tmp", path)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory held by tensors, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
