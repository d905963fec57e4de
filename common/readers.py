"""Reading dataset files: images, labels in each dataset's encoding, DSEC raw events, and a JSON cache of what
was read (header sizes, label checks, class counts) keyed by the file list. Every read checks mode and dtype
(colour PNGs refused as labels, palette PNGs read as indices, 16-bit PNGs never cut to 8 bits); a file that
cannot be decoded is a one-line `DatasetError`. [official] = the dataset's release, [ref: X] = a public
re-implementation."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from common.cli import UserError, progress

IGNORE = 255


class DatasetError(UserError):
    """A dataset on disk does not match its layout or encoding. One line: what is wrong, what was expected, how
    to fix it; the scripts print it and exit with code 2."""


# ---- label encodings -> native class ids (sources: data/README.md "Class sets and label maps") ----------------
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
# [ref: MADM]; keys are DELIVER raw - 1 (0 = Building ... 24 = Truck); files store raw + 1, 0 = unlabelled
DELIVER_TO_11 = {0: 1, 1: 2, 3: 3, 4: 4, 5: 5, 6: 5, 7: 6, 8: 7, 9: 8, 10: 9, 11: 10, 12: 0, 17: 10, 21: 7,
                 22: 8, 23: 8, 24: 8}
# [ref: MADM]; FMB raw ids (0 = unlabelled)
FMB_TO_9 = {1: 4, 2: 5, 3: 1, 4: 8, 5: 8, 6: 6, 7: 0, 8: 2, 9: 7, 10: 7, 11: 7, 12: 7, 13: 7, 14: 3}


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """(256,) uint8 lookup table `lut[v] = mapping.get(v, 255)`, 255 -> 255. Apply it once (`lut[label]`, a
    copy); chained in-place replacements would remap values an earlier replacement produced."""
    lut = np.full(256, IGNORE, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    lut[IGNORE] = IGNORE
    return lut


# label kind -> (LUT to the native class set, largest raw value of the encoding or None: not checked)
_RAW_KINDS = {"cs_labelIds": (make_lut(CITYSCAPES_LABELID_TO_TRAINID), 33),
              "cs_labelIds_palette": (make_lut(CITYSCAPES_LABELID_TO_TRAINID), None),  # GTA5
              "mapillary": (make_lut(MAPILLARY_TO_TRAINID), 65), "fmb": (make_lut(FMB_TO_9), 14),
              # stored 0 (unlabelled) -> 255 explicitly, not MADM's uint8 wrap-around of s - 1
              "deliver": (make_lut({k + 1: v for k, v in DELIVER_TO_11.items()}), 25)}
_SYNTHIA_LUT16 = np.full(65536, IGNORE, np.uint8)
_SYNTHIA_LUT16[list(SYNTHIA_TO_TRAINID)] = list(SYNTHIA_TO_TRAINID.values())


# ---- decoding ------------------------------------------------------------------------------------------------
GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow modes of single-channel files
_READ_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, EOFError, Image.DecompressionBombError)
_notes_printed: set[str] = set()


def note_once(key: str, text: str) -> None:  # print `text` the first time `key` is seen in this process
    if key not in _notes_printed:
        _notes_printed.add(key)
        print(text, flush=True)


def corrupt(name: str, path: Path, e: BaseException) -> DatasetError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    fix = "Replace or remove it (a .png/.jpg/.jpeg file)" if name.startswith("folder:") else "Re-download the file"
    return DatasetError(f"error: {name}: cannot read '{path}' ({reason}). {fix}.")


def decode(name: str, path: Path, fn: Callable[[Image.Image], Any]) -> Any:
    """`fn(Image.open(path))`; a decoder failure becomes the one-line "cannot read" error."""
    try:
        with Image.open(path) as im:
            return fn(im)
    except _READ_ERRORS as e:  # a DatasetError raised by `fn` passes through
        raise corrupt(name, path, e) from None


def image_size(name: str, path: Path) -> tuple[int, int]:
    """(W, H) from the file header only (no pixel decode)."""
    return decode(name, path, lambda im: im.size)


def read_image(name: str, path: Path, kind: str) -> Image.Image:
    """An input at native size: PIL "RGB" (uint8) for kind "rgb", "F" (float32 in [0, 1], `read_grey`) for
    "grey" and "depth"; "auto" (`folder:PATH`) reads a single-channel file as grey, anything else as RGB."""
    if kind == "auto":
        kind = "grey" if decode(name, path, lambda im: im.mode in GREY_MODES) else "rgb"
    if kind != "rgb":
        return Image.fromarray(read_grey(name, path, depth=kind == "depth"))

    def rgb(im: Image.Image) -> Image.Image:
        im.load()  # the decoded pixels outlive the closed file
        return im.convert("RGB") if im.mode != "RGB" else im
    return decode(name, path, rgb)


def read_label_array(name: str, path: Path, allow_rgb: bool = False) -> np.ndarray:
    """A class-index label without colour conversion: uint8 (H, W) (palette PNGs give their indices, as GTA5 and
    Mapillary need), or (H, W, 3) for an RGB file when `allow_rgb` (DELIVER); colour and 16-bit labels refused."""
    def fn(im: Image.Image) -> np.ndarray:
        if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr") and not (allow_rgb and im.mode in ("RGB", "RGBA")):
            article = "an" if im.mode[0] in "RL" else "a"
            raise DatasetError(f"error: {name}: label '{path}' is {article} {im.mode} image. Expected a "
                               f"single-channel class-index PNG (not a colormap).")
        arr = np.asarray(im)
        if arr.dtype != np.uint8:
            raise DatasetError(f"error: {name}: label '{path}' is a {arr.dtype} image. Expected an 8-bit "
                               f"single-channel class-index PNG (not an instance-id or 16-bit map).")
        return arr
    return decode(name, path, fn)


def _with_rawmode(im: Image.Image, rawmode: str) -> np.ndarray:
    # Pillow reads a 16-bit RGB PNG as mode "RGB" with raw mode "RGB;16B", which keeps only the high byte of
    # each sample; another raw mode on every tile, set before `load()`, picks the other byte
    im.tile = [t._replace(args=rawmode if isinstance(t.args, str) else (rawmode,) + tuple(t.args[1:]))
               for t in im.tile]
    im.load()
    return np.asarray(im)[..., 0]


def read_synthia_label(name: str, path: Path) -> np.ndarray:
    """SYNTHIA `GT/LABELS/*.png` (16 bits per channel RGB, the id in R [official]) as uint16 (H, W) ids, decoded
    twice: raw mode "RGB;16B" gives the high bytes, "RGB;16L" (big-endian read as little-endian) the low ones
    [our choice; checked with Pillow 13]."""
    mode, args = decode(name, path, lambda im: (im.mode, im.tile[0].args if im.tile else None))
    rawmode = args if isinstance(args, str) else (args[0] if args else None)
    if mode == "RGB" and rawmode == "RGB;16B":
        high = decode(name, path, lambda im: _with_rawmode(im, "RGB;16B"))
        ids = high.astype(np.uint16) * 256 + decode(name, path, lambda im: _with_rawmode(im, "RGB;16L"))
    elif mode == "RGB":  # an 8-bit RGB export
        ids = decode(name, path, lambda im: np.asarray(im)[..., 0]).astype(np.uint16)
    else:
        ids = read_label_array(name, path).astype(np.uint16)
    if ids.max() == 0:
        raise DatasetError(f"error: synthia: label '{path}' decoded with max 0; SYNTHIA labels are 16-bit "
                           f"RGB and are read with Pillow's RGB;16B + RGB;16L raw modes; upgrade Pillow if "
                           f"this fails.")
    return ids


def read_label(name: str, path: Path, kind: str, k: int) -> np.ndarray:
    """A label file as native class ids, uint8 (H, W), 0..k-1 and 255 = ignore.

    Args:
        kind: "trainIds" / "cs_trainIds" (class ids already), "synthia16" (16-bit RGB, id in R), or a raw
            encoding of `_RAW_KINDS` (one LUT; the values are checked against the encoding's range first).
    """
    if kind == "synthia16":
        return _SYNTHIA_LUT16[read_synthia_label(name, path)]
    raw = read_label_array(name, path, allow_rgb=(kind == "deliver"))
    if raw.ndim == 3:
        raw = raw[..., 0]  # DELIVER: the class is channel 0
    ids = kind in ("trainIds", "cs_trainIds")
    top = k - 1 if ids else _RAW_KINDS[kind][1]
    ok = np.zeros(256, bool)
    ok[: 256 if top is None else top + 1] = ok[IGNORE] = True
    if not ok[raw].all():  # a boolean lookup first: almost every label is clean
        bad = np.flatnonzero(np.bincount(raw.ravel(), minlength=256) * ~ok)
        if not ids:
            hint = f"Expected the raw {name} label encoding."
        elif kind == "cs_trainIds":
            hint = ("This is a labelIds map; recreate the *_gtFine_labelTrainIds.png files (cityscapesScripts "
                    "createTrainIdLabelImgs.py) or remove them to read *_gtFine_labelIds.png.")
        elif name.startswith("folder:"):
            hint = f"Expected trainIds of the {k}-class set (255 = ignore; classes.txt names another set)."
        elif bad.max() <= 33 and k == 19:
            hint = "This looks like a labelIds map; use the *_labelTrainIds.png files."
        else:
            hint = f"Expected {name} class ids."
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) >= 8 else "")
        raise DatasetError(f"error: {name}: label '{path}' has values {{{shown}}} outside {{0..{top}, 255}}. {hint}")
    return raw.copy() if ids else _RAW_KINDS[kind][0][raw]


def read_grey(name: str, path: Path, depth: bool = False) -> np.ndarray:
    """A single-channel modality (infrared, edges, depth, your grey files) as float32 (H, W) in [0, 1]: 8-bit /
    255, 3 identical channels -> channel 0, 16-bit / 65535 (with a note). With `depth` (DELIVER), an RGB file of
    different channels is CARLA's 24-bit depth d = (R + 256 G + 65536 B) / (2^24 - 1) * 1000 m, returned as
    log1p(d) / log1p(1000) [our choice]."""
    arr = decode(name, path, lambda im: np.asarray(im))
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if depth and not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            note_once(f"{name}:carla", f"note: {name}: '{path}' is CARLA 24-bit RGB depth; decoding (R + 256G + "
                                       f"65536B)/(2^24-1)*1000 m, shown as log1p(d)/log1p(1000).")
            d = rgb.astype(np.float64) @ np.array([1.0, 256.0, 65536.0]) / (2**24 - 1) * 1000.0
            return (np.log1p(d) / np.log1p(1000.0)).astype(np.float32)
        arr = rgb[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32) and arr.size:
        note_once(f"{name}:16", f"note: {name}: '{path}' is uint16 (max {int(arr.max())}); normalising by 65535.")
        return np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


# ---- DSEC raw events -> an image like MADM's pre-rendered edge PNGs [our choice; data/README.md "dsec_event"] ----
def check_events_h5(folder: Path, split: str, path: Path) -> None:
    """Open one DSEC events file and check its keys; raw events need the optional h5py (and hdf5plugin for the
    Blosc/ZSTD filters of the official files, imported before h5py opens them)."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    try:
        import h5py
        with h5py.File(path, "r") as f:
            ok = all(k in f for k in ("events/x", "events/y", "events/p", "events/t", "ms_to_idx", "t_offset"))
    except ImportError:
        raise DatasetError(f"error: dsec_event: raw events need the optional package h5py (pip install h5py "
                           f"hdf5plugin), or the pre-rendered edge images in '{folder}/69mask_{split}_edges/'."
                           ) from None
    except OSError as e:
        raise corrupt("dsec_event", path, e) from None
    if not ok:
        raise DatasetError(f"error: dsec_event: '{path}' lacks '/ms_to_idx' or '/t_offset'. Expected a DSEC "
                           f"events file (events/x, events/y, events/p, events/t, ms_to_idx, t_offset).")


def render_events(x: np.ndarray, y: np.ndarray, p: np.ndarray, rectify_map: np.ndarray,
                  hw: tuple[int, int]) -> np.ndarray:
    """A MADM-like signed edge image, uint8 (H, W) = `hw` (127/128: no events, brighter: more positive events).

    Events (x, y, polarity p 0/1 -> -1/+1: (N,) each) move to their rectified pixel (`rectify_map` (H_s, W_s, 2)
    (x', y') per sensor pixel [official DSEC rectify_map.h5], rounded, outside the frame dropped); the sums v per
    pixel are scaled around mid-grey: c = max(1, 95th percentile of |v| over v != 0), 127.5 + 127.5 * clip(v, -c,
    c) / c [our choice]."""
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


class EventFiles:
    """Renders the events of the 50 ms before a label timestamp [ref: ESS, MADM]; opens `events.h5` /
    `rectify_map.h5` once, lazily, and may be called from TrainStream's decode threads."""
    window_us = 50_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, Any] = {}
        self.arrays: dict[tuple[str, str], np.ndarray] = {}  # small whole datasets: ms_to_idx, rectify_map

    def get(self, h5py: Any, path: Path) -> Any:
        with self.lock:
            if str(path) not in self.files:
                self.files[str(path)] = h5py.File(path, "r")
            return self.files[str(path)]

    def array(self, h5py: Any, path: Path, key: str) -> np.ndarray:
        if (str(path), key) not in self.arrays:  # two threads may both read it once: same array
            self.arrays[(str(path), key)] = np.asarray(self.get(h5py, path)[key][()])
        return self.arrays[(str(path), key)]

    def render(self, extra: dict, hw: tuple[int, int]) -> np.ndarray:
        """`render_events` of the window before `extra["t"]` (image clock, us) of sequence `extra["seq"]`."""
        import h5py  # imported (with hdf5plugin) when the split was listed
        ev = extra["events"]
        try:
            f = self.get(h5py, ev)
            t_offset = int(np.asarray(f["t_offset"][()]).reshape(-1)[0])
            ms_to_idx = self.array(h5py, ev, "ms_to_idx")
            rect = self.array(h5py, extra["rectify"], "rectify_map")
            t1 = extra["t"] - t_offset  # image clock -> event clock; int64 throughout
            t0 = t1 - self.window_us
            if t1 <= 0 or len(ms_to_idx) == 0:
                # the label precedes the first event: an empty window (a negative millisecond index into
                # ms_to_idx would wrap around to the end of the file)
                x = y = p = np.zeros(0, np.int64)
            else:
                m0, m1 = min(max(t0, 0) // 1000, len(ms_to_idx) - 1), -(-t1 // 1000)  # floor, ceil (>= 1)
                i0 = int(ms_to_idx[m0])
                i1 = int(ms_to_idx[m1]) if m1 < len(ms_to_idx) else f["events/t"].shape[0]
                t = np.asarray(f["events/t"][i0:i1], dtype=np.int64)
                lo, hi = i0 + int(np.searchsorted(t, t0, "left")), i0 + int(np.searchsorted(t, t1, "left"))
                x, y, p = (np.asarray(f[f"events/{k}"][lo:hi]) for k in ("x", "y", "p"))
        except OSError as e:
            if any(w in str(e).lower() for w in ("filter", "decompress", "plugin")):
                raise DatasetError(f"error: dsec_event: cannot decompress '{ev}' (Blosc). pip install h5py "
                                   f"hdf5plugin, or use the pre-rendered edge images (69mask_*_edges).") from None
            raise corrupt("dsec_event", ev, e) from None
        if len(x) == 0:  # Python shows the same warning once
            warnings.warn(f"dsec_event: empty event window for a frame of '{extra['seq']}' (mid-grey image); "
                          f"further empty windows of this sequence are not reported.")
        return render_events(x, y, p, rect, hw)


# ---- cache of what was read, keyed by a hash of the file list [our choice] -----------------------------------
def files_hash(paths: Sequence[Optional[Path]]) -> str:
    """16 hex digits over the paths, sizes and modification times: a replaced file invalidates a cache."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat() if p is not None else None
        h.update(b"-\n" if st is None else f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def user_cache_dir(folder: Path) -> Optional[Path]:
    """`$XDG_CACHE_HOME/diffseg/<hash>/` (default `~/.cache/diffseg/<hash>/`), <hash> = 16 hex digits of the
    SHA-1 of the resolved dataset folder; None when the process has no home folder either."""
    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except (RuntimeError, KeyError):
        return None
    return Path(base) / "diffseg" / hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def cache_paths(folder: Path, cache_dir: Optional[str | Path], fname: str) -> list[Path]:
    """Where a cache file may live: `<dataset>/.cache/`, `cache_dir`, `user_cache_dir(folder)`. Reads look in
    all of them and writes go to the first writable one, so a read-only dataset (a shared GTA5 copy) is still
    read once per user."""
    out = [folder / ".cache" / fname] + ([Path(cache_dir) / fname] if cache_dir is not None else [])
    user = user_cache_dir(folder)
    return list(dict.fromkeys(out + ([user / fname] if user is not None else [])))


def _dir_writable(directory: Path) -> bool:
    """Whether files can be created in `directory` or, if it does not exist yet, its nearest existing ancestor
    (`os.access` sees read-only mounts; as root it says yes and the write succeeds)."""
    d = Path(directory)
    while not d.exists():
        if d.parent == d:
            return False
        d = d.parent
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def cached(folder: Path, fname: str, valid: Callable[[dict], bool], compute: Callable[[], dict],
           cache_dir: Optional[str | Path] = None) -> dict:
    """The first `valid` JSON dict among `cache_paths`, else `compute()`, written atomically to the first
    writable of them (DDP ranks: the last writer wins, no reader sees half a file)."""
    paths = cache_paths(folder, cache_dir, fname)
    for p in paths:
        try:
            data = json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and valid(data):
            return data
    data = compute()
    for p in (p for p in paths if _dir_writable(p.parent)):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, p)
            break
        except OSError:
            continue
    return data


def parallel_map(fn: Callable[[Any], Any], xs: Sequence[Any], desc: str = "") -> list[Any]:
    """`[fn(x) for x in xs]` on up to 8 threads (Pillow releases the GIL while decoding), with a progress bar on
    a terminal."""
    if len(xs) < 16:
        return [fn(x) for x in xs]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(progress(pool.map(fn, xs, chunksize=8), total=len(xs), desc=desc, leave=False))
