"""Training batches from a `common.datasets.SegDataset`: DAFormer's rare-class sampling and a stream whose
batches are a pure function of (seed, step, index), so resuming and DDP sharding need no sampler state."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common.readers import DatasetError, cached, files_hash, parallel_map


class RareClassSampling:
    """Draw source images so that rare classes are seen more often [ref: DAFormer mmseg/datasets/uda_dataset.py].

    Per native class c, over the split at native resolution (cached by the label file list): the pixel frequency
    `freq[c]` and `samples[c]`, the images with > `min_pixels` pixels of c. Draw c with p_c = softmax((1 - f_c) /
    T) over the `classes` with f_c > 0 and an image (`probs`), then a uniform image of `samples[c]`. The pixel
    thresholds (also `crop_min_pixels` = min_pixels * min_crop_ratio, for `SegDataset.sample`) are for the real
    native resolution, times `dataset.scale ** 2` so the synthetic sample (1/8) keeps the proportions [our choice].
    """

    def __init__(self, dataset: Any, temperature: float = 0.01, min_pixels: int = 3000,
                 min_crop_ratio: float = 0.5, cache_dir: Optional[str | Path] = None) -> None:
        if not dataset.has_labels:
            raise DatasetError(f"error: {dataset.name}: rare-class sampling needs labels but split "
                               f"'{dataset.split}' has none. Expected a labelled source split.")
        area = dataset.scale ** 2
        self.min_pixels = max(1, int(round(min_pixels * area)))
        self.crop_min_pixels = int(min_pixels * min_crop_ratio * area)
        k = dataset.native_classes
        total = np.zeros(k, np.float64)
        self.samples: dict[int, list[int]] = {c: [] for c in range(k)}
        for i, cnt in enumerate(self._counts(dataset, cache_dir)):
            for c, n in cnt.items():
                total[c] += n
                if n > self.min_pixels:
                    self.samples[c].append(i)
        self.freq = total / max(total.sum(), 1.0)
        self.classes = np.array([c for c in range(k) if self.freq[c] > 0 and self.samples[c]], np.int64)
        if not len(self.classes):
            raise DatasetError(f"error: {dataset.name}: no class has an image with more than {self.min_pixels} "
                               f"pixels. Expected a labelled source split (diff.py: or a lower --rcs-min-pixels).")
        logits = (1.0 - self.freq[self.classes]) / temperature
        e = np.exp(logits - logits.max())  # softmax, shifted for stability
        self.probs = e / e.sum()

    @staticmethod
    def _counts(ds: Any, cache_dir: Optional[str | Path]) -> list[dict[int, int]]:  # {native class: pixels}
        names = [it.name for it in ds.items]

        def count(i: int) -> dict[str, int]:
            bc = np.bincount(ds.load_label(i).ravel(), minlength=256)[: ds.native_classes]
            return {str(c): int(bc[c]) for c in np.nonzero(bc)[0]}
        key = f"rcs_{ds.name}_{ds.split}_{ds.label_kind}_{files_hash([it.label for it in ds.items])}.json"
        data = cached(ds.folder, key, lambda d: d.get("names") == names and len(d.get("counts", [])) == len(names),
                      lambda: {"dataset": ds.name, "split": ds.split, "names": names, "counts": parallel_map(
                          count, range(len(ds)), desc=f"RCS stats {ds.name} {ds.split}")}, cache_dir)
        return [{int(c): int(n) for c, n in d.items()} for d in data["counts"]]

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(native class c drawn by p_c, a uniform dataset index among the images holding enough of c)."""
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        lst = self.samples[c]
        return c, int(lst[int(rng.integers(len(lst)))])


class TrainStream:
    """Training batches as a pure function of (seed, stream_id, step, j): no sampler state to checkpoint.

    Sample j of step `step` draws its image (uniform, or RCS), crop and flip from `np.random.default_rng([seed,
    stream_id, step, j])`: a resumed run repeats the original, DDP ranks and micro-steps ask for disjoint ranges.
    Images are drawn with replacement, not in epochs [our choice]. `workers` threads decode and prefetch the same
    range of the next step; the batches are the same with or without threads."""

    def __init__(self, dataset: Any, seed: int, rcs: Optional[RareClassSampling] = None, stream_id: int = 0,
                 workers: int = 2) -> None:
        self.dataset, self.seed, self.rcs, self.stream_id = dataset, int(seed), rcs, int(stream_id)
        self.workers = max(0, int(workers))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[tuple[int, int, int], Future] = {}

    def sample(self, step: int, j: int) -> dict:
        """Sample j (index within the step's global batch) of step `step`."""
        rng = np.random.default_rng([self.seed, self.stream_id, int(step), int(j)])
        if self.rcs is not None:
            c, i = self.rcs.draw(rng)
            return self.dataset.sample(i, rng, rcs_class=c, rcs_min_pixels=self.rcs.crop_min_pixels)
        return self.dataset.sample(int(rng.integers(len(self.dataset))), rng)

    def _compute(self, step: int, start: int, count: int, parallel: bool = True) -> dict:
        js = range(start, start + count)
        # a prefetch already runs on a pool thread: it decodes sequentially so it never waits on its own pool
        items = (list(self._pool.map(lambda j: self.sample(step, j), js)) if parallel and self._pool is not None
                 and count > 1 else [self.sample(step, j) for j in js])
        return {"image": torch.stack([s["image"] for s in items]), "label": torch.stack([s["label"] for s in items]),
                "name": [s["name"] for s in items]}

    def batch(self, step: int, start: int, count: int) -> dict:
        """Samples start .. start+count-1 of this step's global batch (rank r, micro-step k of A, micro-batch m:
        start = (r * A + k) * m): {"image": float32 (count, 3, c, c) in [0, 1], "label": int64 (count, c, c),
        "name": list[str]}."""
        if self.workers and self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers)
        key = (int(step), int(start), int(count))
        fut = self._pending.pop(key, None)
        for k in [k for k in self._pending if k[0] < key[0]]:  # prefetches of past steps (e.g. after a jump)
            self._pending.pop(k)
        out = fut.result() if fut is not None else self._compute(*key)
        nxt = (key[0] + 1, key[1], key[2])
        if self._pool is not None and nxt not in self._pending:
            self._pending[nxt] = self._pool.submit(self._compute, *nxt, parallel=False)
        return out

    def close(self) -> None:
        """Stop the decode threads (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending = {}
