"""A tiny synthetic sample of every dataset in its real layout and label encoding (data/README.md "Synthetic
sample"): `python -m common.synthetic --out data/synthetic` writes a few MB in seconds, so `--demo` and the tests
run the loaders that read the real data. A scene is a 19-class label map with a distance per pixel (flat ground,
pinhole camera); every modality is rendered from it, so every modality predicts the labels: RGB = class colour +
a per-class grating texture + noise, depth = distance, infrared = a temperature per class, events = the
log-intensity change of a 1-2 px ego-motion. Each dataset has a fixed colour transform (its style), scaled by
`shift`: a source-only model loses accuracy on another domain. Sizes are native / 8 at the real aspect ratio.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np
from PIL import Image

from common.datasets import CS19_TO_11, PALETTES
from common.layouts import ACDC_CONDITIONS, DELIVER_CONDITIONS, DSEC_SEQUENCES
from common.readers import (CITYSCAPES_LABELID_TO_TRAINID, MAPILLARY_TO_TRAINID, SYNTHIA_TO_TRAINID, make_lut,
                            render_events)

GENERATOR_VERSION = 2  # bump when the output changes, so ensure_synthetic_sample regenerates stale samples
SIZE_RATIO = 1 / 8     # every size is the real native size times this

# ---- inverse label maps: scene trainId (19) -> each dataset's raw encoding ------------------------------------
TRAIN_TO_LABELID = {v: k for k, v in CITYSCAPES_LABELID_TO_TRAINID.items()}
TRAIN_TO_SYNTHIA = {v: k for k, v in SYNTHIA_TO_TRAINID.items()}
# one canonical Mapillary v1.2 id per trainId (road 13, sidewalk 15, ...)
TRAIN_TO_MAPILLARY = {0: 13, 1: 15, 2: 17, 3: 6, 4: 3, 5: 45, 6: 48, 7: 50, 8: 30, 9: 29, 10: 27, 11: 19,
                      12: 20, 13: 55, 14: 61, 15: 54, 16: 58, 17: 57, 18: 52}
# DELIVER raw (0 Building ... 24 Truck); stored as raw + 1 with 0 = unlabelled
TRAIN_TO_DELIVER_RAW = {0: 6, 1: 7, 2: 0, 3: 10, 4: 1, 5: 4, 6: 17, 7: 11, 8: 8, 9: 21, 10: 12, 11: 3, 12: 3,
                        13: 9, 14: 24, 15: 23, 16: 9, 17: 22, 18: 22}
# FMB raw (1 Road ... 14 Pole, 0 = unlabelled); FMB has no wall / fence
TRAIN_TO_FMB = {0: 1, 1: 2, 2: 3, 5: 14, 6: 4, 7: 5, 8: 6, 9: 6, 10: 7, 11: 8, 12: 8, 13: 9, 14: 10, 15: 11,
                16: 10, 17: 12, 18: 13}

# Cityscapes colours of the labelIds: the palette of GTA5's label PNGs [official cityscapesscripts labels.py]
_LABELID_COLOURS = {0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0),
                    6: (81, 0, 81), 9: (250, 170, 160), 10: (230, 150, 140), 14: (180, 165, 180),
                    15: (150, 100, 100), 16: (150, 120, 90), 18: (153, 153, 153), 29: (0, 0, 90),
                    30: (0, 0, 110)}
_LABELID_COLOURS.update({TRAIN_TO_LABELID[t]: tuple(int(v) for v in PALETTES[19][t]) for t in range(19)})
MAPILLARY_V12_NAMES = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge",
    "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner",
    "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox",
    "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole",
    "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car",
    "Caravan", "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount",
    "Ego Vehicle", "Unlabeled")


def _colour_map(label: np.ndarray) -> np.ndarray:
    """A visualisation file beside the labels (never read: the loaders pair by explicit suffix)."""
    return PALETTES[19].take(np.minimum(label, 18), 0)


def _encode_lut(mapping: dict[int, int], void: int) -> np.ndarray:
    """trainId -> raw id LUT; every trainId without an entry (and 255) becomes the dataset's void id."""
    lut = make_lut(mapping)
    return np.where(lut == 255, np.uint8(void), lut)


def _palette(colours: dict[int, tuple[int, int, int]]) -> list[int]:
    pal = [0] * 768
    for k, rgb in colours.items():
        pal[3 * k: 3 * k + 3] = rgb
    return pal


def _mapillary_colours() -> dict[int, tuple[int, int, int]]:
    # mapped ids get their Cityscapes colour, the rest a fixed pseudo-random one (the sample's own palette)
    rng = np.random.default_rng(1234)
    cols = {i: tuple(int(v) for v in rng.integers(0, 256, 3)) for i in range(66)}
    cols.update({i: tuple(int(v) for v in PALETTES[19][t]) for i, t in MAPILLARY_TO_TRAINID.items()})
    cols[65] = (0, 0, 0)
    return cols


# ---- scene: a 19-class label map with per-pixel distance (flat ground, pinhole camera at 1.5 m) --------------
SKY_DIST = 1000.0


def _z(w: int, u: float) -> float:
    """Distance of something standing u rows below the horizon (focal length = image width, camera at 1.5 m)."""
    return min(SKY_DIST * 0.9, float(w) * 1.5 / max(u, 0.5))


def make_scene(rng: np.random.Generator, h: int, w: int, absent: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Procedural street scene: horizon row y_h, a ground row y at distance Z = w * 1.5 / (y - y_h); an object
    standing at row y_b has an image size proportional to u = y_b - y_h (painted far to near).

    Args:
        absent: trainIds never drawn (SYNTHIA has no terrain, truck, train).
    Returns:
        {"label": uint8 (h, w) trainIds, 255 = void; "dist": float32 (h, w) metres (sky 1000)}.
    """
    yh = int(h * rng.uniform(0.36, 0.5))
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    label = np.full((h, w), 10, np.uint8)                                    # sky
    dist = np.full((h, w), SKY_DIST, np.float32)
    ground = ys >= yh
    u_rows = np.maximum(ys - yh + 0.5, 0.5)
    dist[:] = np.where(ground, np.minimum(float(w) * 1.5 / u_rows, SKY_DIST * 0.9), SKY_DIST)
    base_ground = 9 if (9 not in absent and rng.random() < 0.6) else 8
    label[np.broadcast_to(ground, (h, w))] = base_ground
    vx = w * rng.uniform(0.35, 0.65)
    # road between vx - a*u and vx + b*u, sidewalks s*u wide on both sides; lat = lateral position in u
    a, b, s = rng.uniform(0.9, 1.8), rng.uniform(0.9, 1.8), rng.uniform(0.5, 1.1)
    lat = (xs - vx) / u_rows
    if 1 not in absent:
        label[ground & (lat > -a - s) & (lat < b + s)] = 1
    label[ground & (lat > -a) & (lat < b)] = 0
    x = 0.0
    while x < w:  # buildings rising from the horizon, leaving the far road end open
        bw = w * rng.uniform(0.08, 0.22)
        if rng.random() < 0.85 and not (x < vx < x + bw and rng.random() < 0.5):
            top = int(yh * rng.uniform(0.05, 0.8))
            x0, x1 = int(x), int(min(w, x + bw))
            label[top:yh + 1, x0:x1] = 2
            dist[top:yh + 1, x0:x1] = _z(w, 1.5)
        x += bw
    for cls, hgt in ((3, 0.12), (4, 0.09)):  # walls, fences
        if cls not in absent and rng.random() < 0.6:
            x0 = int(w * rng.uniform(0, 0.7))
            x1 = int(min(w, x0 + w * rng.uniform(0.15, 0.35)))
            y0 = max(0, int(yh - h * hgt))
            label[y0:yh + 2, x0:x1] = cls
            dist[y0:yh + 2, x0:x1] = _z(w, 2.0)
    if 8 not in absent:  # tree crowns above the horizon
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = w * rng.uniform(0, 1), yh - h * rng.uniform(0.05, 0.25)
            rx, ry = w * rng.uniform(0.04, 0.12), h * rng.uniform(0.06, 0.16)
            m = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
            label[m] = 8
            dist[m] = _z(w, 3.0)
    for _ in range(int(rng.integers(0, 3))):  # vegetation / terrain patches on the ground
        cls = int(rng.choice([8, 9]))
        if cls in absent:
            continue
        cx, cy = w * rng.uniform(0, 1), yh + (h - yh) * rng.uniform(0.2, 0.9)
        rx, ry = w * rng.uniform(0.05, 0.15), (h - yh) * rng.uniform(0.05, 0.15)
        label[(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1) & (label == base_ground)] = cls
    _paint_objects(rng, label, dist, yh, vx, (a, b, s), absent)
    if rng.random() < 0.3:  # void: an ego-vehicle hood, a small unlabelled object
        label[int(h * 0.93):] = 255
    if rng.random() < 0.3:
        cx, cy, r = w * rng.uniform(0, 1), yh + (h - yh) * rng.uniform(0.1, 0.8), w * 0.03
        label[((xs - cx) ** 2 + (ys - cy) ** 2) < r * r] = 255
    return {"label": label, "dist": dist}


def _paint_objects(rng: np.random.Generator, label: np.ndarray, dist: np.ndarray, yh: int, vx: float,
                   road: tuple[float, float, float], absent: tuple[int, ...]) -> None:
    """Vehicles, persons, riders and poles with a sign or a light, painted far to near into `label` / `dist`."""
    (h, w), (a, b, s) = label.shape, road
    # (class, probability, lateral range, width, height), sizes in units of u
    kinds = [(13, 0.5, (-a + 0.6, b - 0.6), 1.3, 1.0), (14, 0.2, (-a + 0.8, b - 0.8), 1.4, 2.2),
             (15, 0.2, (-a + 0.9, b - 0.9), 1.6, 2.2), (16, 0.08, (-a + 0.9, b - 0.9), 1.8, 2.4),
             (11, 0.55, (b + 0.1, b + s - 0.1), 0.35, 1.15), (11, 0.4, (-a - s + 0.1, -a - 0.1), 0.35, 1.15),
             (12, 0.35, (b + 0.1, b + s), 0.6, 1.6), (5, 0.75, (b + s * 0.8, b + s), 0.08, 3.0),
             (5, 0.5, (-a - s, -a - s * 0.8), 0.08, 3.0)]
    objects = []
    for cls, p, (l0, l1), ow, oh in kinds:
        for _ in range(int(rng.integers(1, 3))):
            if cls in absent or rng.random() > p:
                continue
            u = (h - yh) * rng.uniform(0.12, 0.75)
            objects.append((u, cls, rng.uniform(l0, max(l0, l1)), ow, oh))
    objects.sort(key=lambda o: o[0])
    for u, cls, lat0, ow, oh in objects:
        yb, cx = yh + u, vx + lat0 * u
        ww, hh = max(1.0, ow * u), max(2.0, oh * u)
        x0, x1 = int(max(0, cx - ww / 2)), int(min(w, cx + ww / 2 + 1))
        y0, y1 = int(max(0, yb - hh)), int(min(h, yb + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        z = _z(w, u)
        if cls == 12:  # rider on a bicycle or a motorcycle
            bike = 17 if (rng.random() < 0.5 and 17 not in absent) else 18
            yb0 = int(max(0, yb - 0.55 * u))
            label[yb0:y1, x0:x1], dist[yb0:y1, x0:x1] = bike, z
            rx0, rx1 = max(0, int(cx - 0.18 * u)), max(0, int(cx + 0.18 * u + 1))
            label[y0:yb0, rx0:rx1], dist[y0:yb0, rx0:rx1] = 12, z
            continue
        label[y0:y1, x0:x1], dist[y0:y1, x0:x1] = cls, z
        if cls == 5:  # a sign or a light on top of the pole
            sw, sh = max(2, int(0.35 * u)), max(2, int(0.3 * u))
            cls2 = 7 if rng.random() < 0.6 else 6
            if cls2 not in absent:
                sx0 = int(max(0, cx - sw / 2))
                label[y0:y0 + sh, sx0:sx0 + sw], dist[y0:y0 + sh, sx0:sx0 + sw] = cls2, z * 0.99


# ---- renders, all from the label map and the distance --------------------------------------------------------
_C = np.arange(256)
_THETA = np.deg2rad((_C * 47) % 180).astype(np.float32)                 # per-class grating orientation
_LAMBDA = (2.5 + (_C * 5) % 7).astype(np.float32)                       # and wavelength (px)
_TEX_AMP = np.where(_C == 10, 0.15, 1.0).astype(np.float32)             # sky: almost no texture
_BASE_RGB = np.zeros((256, 3), np.float32)
_BASE_RGB[:19] = PALETTES[19]
_BASE_RGB[255] = (60, 50, 40)
_TEMPERATURE = np.full(256, 90.0, np.float32)
_TEMPERATURE[:19] = [120, 105, 95, 90, 80, 70, 150, 60, 75, 100, 15, 235, 225, 185, 175, 170, 160, 200, 130]


def _texture(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class grating in [-1, 1] (orientation and wavelength per class), shared by all modalities."""
    h, w = label.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 256).astype(np.float32)
    th, lam = _THETA[label], _LAMBDA[label]
    return np.sin(2 * np.pi * (xs * np.cos(th) + ys * np.sin(th)) / lam + phase[label]) * _TEX_AMP[label]


def render_rgb(scene: dict, rng: np.random.Generator, tex: np.ndarray) -> np.ndarray:
    """Reference-style RGB, float32 (h, w, 3) in [0, 255]: class colour (per-image jitter), texture, noise."""
    label = scene["label"]
    jitter = rng.normal(0, 8, (256, 3)).astype(np.float32)
    rgb = _BASE_RGB[label] + jitter[label] + 22 * tex[..., None]
    haze = np.clip(np.log1p(scene["dist"]) / np.log1p(SKY_DIST), 0, 1)[..., None] * 0.25
    rgb = rgb * (1 - haze) + haze * np.array([180, 190, 205], np.float32)  # aerial perspective
    rgb += rng.normal(0, 5, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255)


def _hue_rotate(rgb: np.ndarray, deg: float) -> np.ndarray:
    # rotation about the grey axis (1, 1, 1)/sqrt(3) in RGB space
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    k = 1 / 3
    sq = np.sqrt(k)
    m = np.array([[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                  [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
                  [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]], np.float32)
    return rgb @ m.T


def _saturate(rgb: np.ndarray, f: float) -> np.ndarray:
    grey = rgb.mean(-1, keepdims=True)
    return grey + f * (rgb - grey)


def apply_style(rgb: np.ndarray, style: str, shift: float, rng: np.random.Generator) -> np.ndarray:
    """A fixed colour transform per dataset, blended with the reference by `shift` in [0, 1]; uint8 (h, w, 3)."""
    x = rgb.astype(np.float32)
    if style == "gta5":            # saturated, warmer, hue turned
        y = _hue_rotate(_saturate(x, 1.8), 40) * 1.05 + np.array([15, 5, -10], np.float32)
    elif style == "synthia":       # flat: low contrast, desaturated, texture blurred away
        blur = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 5
        y = _hue_rotate(_saturate(0.6 * blur + 0.4 * blur.mean((0, 1)), 0.5), -30) + 25
    elif style in ("night", "dark_zurich"):  # dark, bluish, noisy
        y = 0.35 * x + np.array([0, 8, 35], np.float32) + rng.normal(0, 9, x.shape)
    elif style == "fog":
        y = 0.45 * x + 0.55 * np.array([200, 205, 215], np.float32) + rng.normal(0, 4, x.shape)
    elif style == "rain":
        streaks = (rng.random(x.shape[:2]) < 0.03).astype(np.float32)
        streaks = np.maximum(streaks, np.roll(streaks, 1, 0))[..., None]
        y = 0.55 * x + np.array([5, 15, 35], np.float32) + 60 * streaks + rng.normal(0, 6, x.shape)
    elif style == "snow":
        flakes = (rng.random(x.shape[:2]) < 0.04)[..., None] * 120.0
        y = 0.6 * x + 0.35 * 235 + flakes + np.array([0, 5, 20], np.float32)
    elif style == "bdd100k":
        y = _hue_rotate(_saturate(x, 1.2), 100)
    elif style == "mapillary":
        y = _hue_rotate((x - 128) * 1.25 + 128, -80)
    else:                          # cityscapes: the reference style
        y = x
    out = (1 - shift) * x + shift * y
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_depth(scene: dict, tex: np.ndarray) -> np.ndarray:
    """8-bit depth: near dark, far bright, sky 255; a faint class texture stands for surface relief."""
    d = np.log1p(scene["dist"]) / np.log1p(SKY_DIST)
    v = 20 + 225 * d + 6 * tex
    v[scene["dist"] >= SKY_DIST] = 255
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def render_infrared(scene: dict, rng: np.random.Generator, tex: np.ndarray) -> np.ndarray:
    """8-bit thermal image: per-class temperature (persons and cars hottest, sky coldest) + smooth noise."""
    h, w = scene["label"].shape
    smooth = np.asarray(Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32)).resize((w, h), Image.BILINEAR))
    v = _TEMPERATURE[scene["label"]] + 12 * smooth + 8 * tex + rng.normal(0, 3, (h, w))
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def scene_events(scene: dict, rng: np.random.Generator, tex: np.ndarray) -> tuple[np.ndarray, ...]:
    """x, y (uint16) and p (uint8, 1 = brighter) of the events of a 1-2 px ego-motion: a log-intensity change of
    n steps of 0.12 between two renders fires n events (at most 4)."""
    grey = (_BASE_RGB[scene["label"]].mean(-1) + 25 * tex + 10).astype(np.float32)
    dx = int(rng.integers(1, 3))
    moved = np.concatenate([grey[:, :1].repeat(dx, 1), grey[:, :-dx]], 1)  # the scene slides right by dx px
    diff = np.log(moved + 1) - np.log(grey + 1)
    n = np.minimum(np.floor(np.abs(diff) / 0.12), 4).astype(np.int64)
    ys, xs = np.nonzero(n)
    reps = n[ys, xs]
    return (np.repeat(xs, reps).astype(np.uint16), np.repeat(ys, reps).astype(np.uint16),
            np.repeat(diff[ys, xs] > 0, reps).astype(np.uint8))


# ---- writers: one per dataset, in its real layout and encoding -----------------------------------------------
def write_png16_rgb(path: Path, arr: np.ndarray) -> None:
    """(h, w, 3) uint16 as a 16-bit RGB PNG (colour type 2): SYNTHIA's label encoding, which Pillow cannot write."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row, big-endian

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _save(path: Path, arr: np.ndarray, palette: Optional[list[int]] = None, jpeg: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)  # 'L' -> 'P': the file stores indices, the palette only colours them
    im.save(path, quality=90) if jpeg else im.save(path, compress_level=6)


class _Gen:
    """Scenes and renders for one dataset, from its own generator (datasets do not share random draws)."""

    def __init__(self, seed: int, index: int, shift: float) -> None:
        self.rng = np.random.default_rng([seed, index])
        self.shift = shift

    def scene(self, wh: tuple[int, int], absent: tuple[int, ...] = ()) -> dict:
        s = make_scene(self.rng, wh[1], wh[0], absent)
        s["tex"] = _texture(s["label"], self.rng)
        return s

    def rgb(self, s: dict, style: str) -> np.ndarray:
        return apply_style(render_rgb(s, self.rng, s["tex"]), style, self.shift, self.rng)


def _numbered_ids(n_train: int, n_eval: int) -> list[int]:
    return list(range(1, n_train + 1)) + [50 * (k + 1) for k in range(n_eval)]  # eval split: ids = 0 mod 50


def _write_cityscapes(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "cityscapes"
    lab_ids = _encode_lut(TRAIN_TO_LABELID, 0)  # void -> unlabeled (labelId 0)
    cities = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "test": ["berlin"]}
    for split, n in (("train", n_train), ("val", n_eval), ("test", 1)):
        for k in range(n):
            city = cities[split][k % len(cities[split])]
            stem = f"{city}_{k:06d}_000019"
            s = g.scene((256, 128))
            _save(d / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", g.rgb(s, "cityscapes"))
            if split == "test":
                continue
            _save(d / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab_ids[s["label"]])
            if split == "train":  # converted trainIds for train only, so both label paths are exercised
                _save(d / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", s["label"])
            if k == 0:
                _save(d / "gtFine" / split / city / f"{stem}_gtFine_color.png", _colour_map(s["label"]))


def _write_gta5(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    lut, pal = _encode_lut(TRAIN_TO_LABELID, 0), _palette(_LABELID_COLOURS)  # palette PNGs of labelIds
    for k in _numbered_ids(n_train, n_eval):
        s = g.scene((239, 132))
        _save(root / "gta5" / "images" / f"{k:05d}.png", g.rgb(s, "gta5"))
        _save(root / "gta5" / "labels" / f"{k:05d}.png", lut[s["label"]], palette=pal)


def _write_synthia(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d, lut, ids = root / "synthia", _encode_lut(TRAIN_TO_SYNTHIA, 0), _numbered_ids(n_train, n_eval)
    for k in ids:
        s = g.scene((160, 95), absent=(9, 14, 16))  # terrain, truck and train never occur in SYNTHIA
        _save(d / "RGB" / f"{k:07d}.png", g.rgb(s, "synthia"))
        gt = np.zeros(s["label"].shape + (3,), np.uint16)  # 16-bit RGB: the id in R, instance ids > 255 in G
        gt[..., 0] = lut[s["label"]]
        gt[..., 1] = g.rng.integers(0, 3000, s["label"].shape) * (gt[..., 0] > 0)
        write_png16_rgb(d / "GT" / "LABELS" / f"{k:07d}.png", gt)
        if k == ids[0]:
            _save(d / "GT" / "COLOR" / f"{k:07d}.png", _colour_map(s["label"]))


def _write_acdc(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "acdc"
    for cond in ACDC_CONDITIONS:
        for split, n in (("train", max(1, n_train // 2)), ("val", max(1, n_eval // 2)), ("train_ref", 1)):
            for k in range(n):
                seq = f"GOPR0{400 + k % 2}"
                stem = f"{seq}_frame_{k:06d}"
                s = g.scene((240, 135))
                suffix = "_rgb_ref_anon.png" if split.endswith("_ref") else "_rgb_anon.png"
                _save(d / "rgb_anon" / cond / split / seq / f"{stem}{suffix}", g.rgb(s, cond))
                if not split.endswith("_ref"):
                    _save(d / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png", s["label"])


def _write_dark_zurich(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "dark_zurich"
    for split, cond, n in (("train", "night", n_train), ("train", "day", 1), ("val", "night", n_eval),
                           ("val_ref", "day", 1)):
        for k in range(n):
            seq, stem = "GOPR0356", f"GOPR0356_frame_{k:06d}"
            s = g.scene((240, 135))
            _save(d / "rgb_anon" / split / cond / seq / f"{stem}_rgb_anon.png",
                  g.rgb(s, "dark_zurich" if cond == "night" else "cityscapes"))
            if split == "val":
                _save(d / "gt" / split / cond / seq / f"{stem}_gt_labelTrainIds.png", s["label"])


def _write_bdd(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "bdd100k"
    for split, n in (("train", n_train), ("val", n_eval)):
        for k in range(n):
            stem = f"{split[0]}{k:03d}a1b2c3-d4e5f6a7"
            s = g.scene((160, 90))
            _save(d / "images" / "10k" / split / f"{stem}.jpg", g.rgb(s, "bdd100k"), jpeg=True)
            _save(d / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", s["label"])
            if k == 0:
                _save(d / "labels" / "sem_seg" / "colormaps" / split / f"{stem}.png", _colour_map(s["label"]))


def _write_mapillary(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "mapillary"
    lut, cols = _encode_lut(TRAIN_TO_MAPILLARY, 65), _mapillary_colours()  # void -> Unlabeled
    pal, sizes = _palette(cols), [(256, 192), (240, 135), (200, 150)]  # Mapillary sizes vary
    for split, n in (("training", n_train), ("validation", n_eval)):
        for k in range(n):
            stem = f"{split[:2]}{k:04d}Xy9"
            s = g.scene(sizes[k % len(sizes)])
            lab = lut[s["label"]]
            lab[(s["label"] == 0) & (g.rng.random(lab.shape) < 0.05)] = 24  # lane markings: another road id
            _save(d / split / "images" / f"{stem}.jpg", g.rgb(s, "mapillary"), jpeg=True)
            _save(d / split / "v1.2" / "labels" / f"{stem}.png", lab, palette=pal)
    labels = [{"name": n.lower().replace(" ", "-"), "readable": n, "color": list(cols[i]),
               "instances": False, "evaluate": i != 65} for i, n in enumerate(MAPILLARY_V12_NAMES)]
    (d / "config_v1.2.json").write_text(json.dumps({"labels": labels, "version": "1.2 (synthetic)"}, indent=1))


def _write_dsec(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    """Edge PNGs (80x60, MADM layout), labels (80x55, 11 classes) in MADM and ESS layouts, raw events (h5)."""
    h5py = _h5py()
    d, to11 = root / "dsec", make_lut(CS19_TO_11)
    ident = np.stack(np.meshgrid(np.arange(80, dtype=np.float32), np.arange(60, dtype=np.float32)), -1)
    t_first = 1_600_000_000_000_000                     # absolute microseconds of frame 0 (image clock)
    t_offset = t_first - 20_000                         # event clock = absolute - t_offset
    for split, seq, n_frames in (("train", DSEC_SEQUENCES["train"][0], 2 * n_train + 1),
                                 ("test", DSEC_SEQUENCES["test"][0], n_eval + 1)):
        ts = t_first + 50_000 * np.arange(n_frames, dtype=np.int64)  # label frames at 20 Hz
        ev_x, ev_y, ev_p, ev_t = [], [], [], []
        # ESS layout: train uses semantic/11classes/data, test semantic/left/11classes/data
        sem = d / split / seq / "semantic"
        lab_dir = sem / "11classes" / "data" if split == "train" else sem / "left" / "11classes" / "data"
        for k in range(n_frames):
            s = g.scene((80, 60))
            label11 = to11[s["label"][:55]]  # 640x480 / 8; the labels are the top 55 of 60 rows
            _save(lab_dir / f"{k:06d}.png", label11)
            if split == "test":
                _save(d / "test_semantic_labels" / seq / "11classes" / f"{k:06d}.png", label11)
            if k == 0:
                continue  # frame 0 has no preceding events
            x, y, p = scene_events(s, g.rng, s["tex"])
            # times inside [t_k - 50 ms, t_k) on the event clock, sorted
            t = np.sort(g.rng.integers(ts[k] - t_offset - 49_000, ts[k] - t_offset, len(x))).astype(np.int64)
            order = np.argsort(g.rng.random(len(x)), kind="stable")
            ev_x.append(x[order]), ev_y.append(y[order]), ev_p.append(p[order]), ev_t.append(t)
            if split == "test" or k % 2 == 0:  # MADM's train edges: even frames >= 2
                _save(d / f"69mask_{split}_edges" / seq / f"{k:06d}.png", render_events(x, y, p, ident, (60, 80)))
        sem.mkdir(parents=True, exist_ok=True)
        (sem / "timestamps.txt").write_text("".join(f"{int(t)}\n" for t in ts))
        if h5py is None:
            continue
        ev_dir = d / split / seq / "events" / "left"
        ev_dir.mkdir(parents=True, exist_ok=True)
        t_all = np.concatenate(ev_t)
        ms = np.arange(0, t_all[-1] // 1000 + 2) * 1000
        data = {"events/x": np.concatenate(ev_x), "events/y": np.concatenate(ev_y), "events/p": np.concatenate(ev_p),
                "events/t": t_all, "ms_to_idx": np.searchsorted(t_all, ms, "left").astype(np.uint64),  # first event
                "t_offset": np.int64(t_offset)}                                                   # at or after a ms
        for fname, content in (("events.h5", data), ("rectify_map.h5", {"rectify_map": ident})):  # identity map
            with h5py.File(ev_dir / fname, "w") as f:  # uncompressed: readable without hdf5plugin
                for key, v in content.items():
                    f.create_dataset(key, data=v)


def _write_fmb(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "fmb"
    lut = _encode_lut(TRAIN_TO_FMB, 0)  # wall, fence and void -> unlabelled
    for k in range(n_train + n_eval):
        split = "test" if k % 3 == 1 and sum(1 for j in range(k) if j % 3 == 1) < n_eval else "train"
        s = g.scene((100, 75))
        stem = f"{k + 1:05d}"  # test names interleave with train names
        _save(d / split / "Infrared" / f"{stem}.png", render_infrared(s, g.rng, s["tex"]))
        _save(d / split / "Visible" / f"{stem}.png", g.rgb(s, "cityscapes"))
        _save(d / split / "Label" / f"{stem}.png", lut[s["label"]])


def _write_deliver(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "deliver"
    raw = make_lut(TRAIN_TO_DELIVER_RAW)
    for split, n in (("train", n_train), ("test", n_eval)):
        for k in range(n):
            cond, m, frame = DELIVER_CONDITIONS[k % 5], f"MAP_{1 + k % 2}_point{k}", f"{k:06d}"
            s = g.scene((130, 130))
            _save(d / "depth" / cond / split / m / f"{frame}_depth_front.png", render_depth(s, s["tex"]))
            stored = np.where(s["label"] == 255, 0, raw[s["label"]].astype(np.int64) + 1).astype(np.uint8)
            sem = np.stack([stored, g.rng.integers(0, 255, stored.shape, dtype=np.uint8),
                            np.zeros_like(stored)], -1)  # class in channel 0; others carry no class
            _save(d / "semantic" / cond / split / m / f"{frame}_semantic_front.png", sem)
            if k == 0:  # another camera beside the front one: not listed
                _save(d / "depth" / cond / split / m / f"{frame}_depth_left.png", render_depth(s, s["tex"]))


# in this order: writer i draws from the generator (seed, i)
_WRITERS = [_write_cityscapes, _write_gta5, _write_synthia, _write_acdc, _write_dark_zurich, _write_bdd,
            _write_mapillary, _write_dsec, _write_fmb, _write_deliver]


def _h5py() -> Optional[ModuleType]:
    """The optional h5py, or None: raw DSEC events (events.h5) are written only when it is installed."""
    try:
        return importlib.import_module("h5py")
    except ImportError:
        return None


def _is_current(root: Path) -> bool:
    """A complete sample of this generator, with the raw events once h5py is installed (a sample written by
    `--demo` before `pip install h5py` lacks events.h5, which the raw-event loader would then miss)."""
    try:
        marker = json.loads((root / "SYNTHETIC").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("generator_version") == GENERATOR_VERSION and (marker.get("raw_events") or _h5py() is None)


def _write(root: Path, n_train: int, n_eval: int, seed: int, shift: float, keep_current: bool) -> Path:
    """Write into a temporary sibling folder, then rename it to `root` (an existing `root` is moved aside and
    removed): readers never see half a sample. With `keep_current`, a current sample that another process
    finished meanwhile is kept."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (root.with_name(f".{root.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}") for kind in ("tmp", "old"))
    try:
        for index, writer in enumerate(_WRITERS):
            writer(tmp, _Gen(seed, index, shift), n_train, n_eval)
        marker = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
                  "shift": shift, "size_ratio": SIZE_RATIO, "raw_events": _h5py() is not None}
        (tmp / "SYNTHETIC").write_text(json.dumps(marker) + "\n")  # written last: marks a complete sample
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_current and _is_current(root):
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    try:
        os.rename(root, old)
    except OSError:
        old = None
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race: keep its sample
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return root


def write_synthetic_sample(root: str | Path = "data/synthetic", n_train: int = 8, n_eval: int = 4,
                           seed: int = 0, shift: float = 1.0) -> Path:
    """Write the sample under `root` (one folder per dataset and the `SYNTHETIC` marker: generator version, seed,
    counts, shift, size ratio), replacing an existing one: `n_train` / `n_eval` items per train / eval split
    (ACDC: half of each per condition), a deterministic function of `seed`; `shift` 0 = every dataset in the
    reference style, 1 = the full per-dataset style shift."""
    return _write(Path(root), n_train, n_eval, seed, shift, keep_current=False)


def ensure_synthetic_sample(root: str | Path = "data/synthetic") -> Path:
    """`root`, after writing the default sample if it is missing or from an older generator. Safe when several
    processes call it at once (tests, DDP ranks): the loser of the race keeps the winner's identical sample."""
    root = Path(root)
    return root if _is_current(root) else _write(root, 8, 4, 0, 1.0, keep_current=True)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic sample of every dataset (data/README.md).")
    p.add_argument("--out", default="data/synthetic", help="target folder")
    p.add_argument("--n-train", type=int, default=8, help="items per train split")
    p.add_argument("--n-eval", type=int, default=4, help="items per eval split")
    p.add_argument("--seed", type=int, default=0, help="random seed (the output is a function of it)")
    p.add_argument("--shift", type=float, default=1.0, help="style shift between datasets, 0..1")
    a = p.parse_args(argv)
    t = time.time()
    root = write_synthetic_sample(a.out, a.n_train, a.n_eval, a.seed, a.shift)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote {root} ({size / 1e6:.1f} MB) in {time.time() - t:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
