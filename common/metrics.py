"""Semantic-segmentation metric (datasets.md §7): one confusion matrix over the whole evaluation set, per-class IoU,
mIoU as the NaN-mean over classes present in ground truth or prediction, the mmseg-style table, and `evaluate`,
which runs a method's `predict_fn` over an evaluation dataset with the resolution protocol of datasets.md §5.

Convention: confusion matrices are (K, K) int64 with **rows = ground truth, columns = prediction**. Never average
per-image IoUs: accumulate the matrix over the set by summing, then compute IoU once.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import console
from common.runtime import save_side_by_side

# SYNTHIA shares 16 of the 19 Cityscapes classes (terrain, truck, train never occur); mIoU13 also drops wall,
# fence, pole (datasets.md §7).
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
    return np.bincount(num_classes * target + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.full(a.shape, np.nan, dtype=np.float64)
    np.divide(a, b, out=out, where=b > 0)
    return out


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (row_c + col_c − TP); NaN where the class is absent from both ground truth and prediction.

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
        lines.append(f"| {i:2d} | {name:<{width}} | {100 * iou:6.2f} | {100 * acc:6.2f} | {gt_str:<9} |{note}")
    present = int(np.isfinite(iou_per_class(conf)).sum())
    line = (f"mIoU {100 * s['miou']:.2f} | mAcc {100 * s['macc']:.2f} | aAcc {100 * s['aacc']:.2f} | "
            f"classes {present}/{len(class_names)}")
    if synthia:
        line += f" | mIoU16 {100 * s['miou16']:.2f} | mIoU13 {100 * s['miou13']:.2f}"
    return "\n".join(lines + [line])


# --------------------------------------------------------------------------------------------------------------
# evaluate(): a method's predict_fn over an evaluation dataset
# --------------------------------------------------------------------------------------------------------------
def _metric_size(metric_size: str | tuple[int, int], label_hw: tuple[int, int],
                 input_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) at which logits and labels are compared."""
    if metric_size == "native":
        return label_hw
    if metric_size == "half":
        return (label_hw[0] // 2, label_hw[1] // 2)
    if metric_size == "input":
        return input_hw
    w, h = metric_size  # (W, H) like every size in datasets.md
    return (h, w)


@torch.no_grad()
def evaluate(predict_fn: Callable[[torch.Tensor], torch.Tensor], dataset: torch.utils.data.Dataset,
             num_classes: int, class_names: Sequence[str], palette: np.ndarray, *, device: torch.device,
             dist=None, input_size: Optional[tuple[int, int]] = None, metric_size: str | tuple[int, int] = "native",
             desc: str = "", pictures_dir: Optional[str | Path] = None, num_pictures: int = 4,
             synthia: bool = False, pad_to: Optional[int] = None, progress: bool = True) -> dict:
    """Score `predict_fn` on every item of `dataset` (each process a disjoint shard; matrices summed).

    Args:
        predict_fn: image (1, 3, h, w) float in [0, 1] on `device` -> logits (1, K, h', w') (any stride).
        dataset: evaluation dataset; items {"image" (3, H, W) in [0, 1], "label" int64 (H, W), "name"} at native size.
        num_classes, class_names, palette: the model's class set (the target's).
        device: where predict_fn runs.
        dist: a `common.runtime.Dist` (None = one process).
        input_size: (W, H) to which the image is resized bilinearly before predict_fn; None keeps it.
        metric_size: "native" (label size), "half" (half the label size, label nearest-halved; Mapillary),
            "input" (the input size, label nearest-resized; MADM) or (W, H). Logits are upsampled bilinearly to it;
            an argmax is never upsampled.
        desc: dataset description for the table header, e.g. "cityscapes val".
        pictures_dir: where side-by-side PNGs of the first `num_pictures` items go (rank 0 only); None = none.
        synthia: also report mIoU16 / mIoU13.
        pad_to: pad the input right/bottom with zeros to a multiple of this and crop the logits back (DIFF: 64).
    Returns:
        `summarize(...)` plus "resolution" (the string printed in the header), "num_images" and "table".
    """
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    indices = list(range(rank, len(dataset), world))  # disjoint shards, no padding: no image counted twice
    conf = np.zeros((num_classes, num_classes), np.int64)
    in_str = "native"
    n_pictures = 0
    it = indices
    if progress and rank == 0:
        it = console.progress(indices, desc=f"eval {desc}".strip(), leave=False)
    for i in it:
        item = dataset[i]
        image, label = item["image"], np.asarray(item["label"])
        x = image[None].to(device)
        if input_size is not None:
            x = F.interpolate(x, size=(input_size[1], input_size[0]), mode="bilinear", align_corners=False)
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
        mh, mw = _metric_size(metric_size, label.shape, (h, w))
        logits = F.interpolate(logits, size=(mh, mw), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy()
        if (mh, mw) != label.shape:
            lab = torch.from_numpy(label.astype(np.int64))[None, None].float()
            label = F.interpolate(lab, size=(mh, mw), mode="nearest")[0, 0].long().numpy()
        conf += confusion_matrix(pred, label, num_classes)
        if pictures_dir is not None and rank == 0 and n_pictures < num_pictures:
            n_pictures += 1
            name = Path(str(item.get("name", i))).stem
            save_side_by_side(Path(pictures_dir) / f"{i:04d}_{name}.png", image, label, pred, palette,
                              class_names)
    conf_t = torch.from_numpy(conf).to(device if (dist is not None and dist.world > 1
                                                  and device.type == "cuda") else "cpu")
    if dist is not None:
        dist.all_reduce_sum(conf_t)
    conf = conf_t.cpu().numpy()
    metric_str = {"native": "native label size", "half": "half the native label size",
                  "input": f"{in_str} (label nearest-resized)"}.get(metric_size, f"{metric_size}")  # type: ignore
    resolution = f"input {in_str}, metric at {metric_str}"
    header = f"per-class results — {desc}, {len(dataset)} images, {resolution}"
    out = summarize(conf, class_names, synthia)
    out.update(resolution=resolution, num_images=len(dataset), table=format_table(conf, class_names, header,
                                                                                    synthia))
    return out


__all__ = ["confusion_matrix", "iou_per_class", "acc_per_class", "mean_iou", "summarize", "format_table",
           "evaluate", "SYNTHIA16", "SYNTHIA13"]
warnings.filterwarnings("ignore", message="Mean of empty slice")
