"""A tiny synthetic sample of every dataset in its real layout and label encoding (data/README.md
"Synthetic sample").

`python -m common.synthetic --out data/synthetic` writes, in a few seconds and a few MB, procedural street
scenes for all 14 registry names, so `--demo` runs and the tests exercise exactly the loaders that read the
real data: Cityscapes labelIds (+ labelTrainIds for train), GTA5 palette PNGs, SYNTHIA 16-bit RGB labels, ACDC
/ Dark Zurich / BDD trainIds, Mapillary v1.2 palette PNGs + config, DSEC edge PNGs and raw `events.h5`,
DELIVER depth with raw+1 in channel 0, FMB raw ids.

How a sample is made: a 19-class label map first (sky, buildings, road trapezoid, sidewalks, vegetation, poles
with signs/lights, vehicles, persons/riders), each object with a distance from a flat-ground camera model.
Every modality
is rendered from that map and geometry, so every modality predicts the labels: RGB = per-class colour + a
per-class grating texture + noise; depth = distance; infrared = per-class temperature; events = two renders
1-2 px apart, log-intensity change thresholded. Each dataset applies a fixed colour transform (its "style"),
scaled by `shift`, so a model trained on one source loses accuracy on another domain, which the methods'
learning tests rely on.

Sizes are native / 8 at the real aspect ratio (Cityscapes 256x128, DSEC 80x55 labels and 80x60 edge images).
Nothing here is committed: the sample is generated on demand (`ensure_synthetic_sample`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from common.datasets import CS19_TO_11, PALETTES
from common.layouts import DSEC_SEQUENCES
from common.readers import CITYSCAPES_LABELID_TO_TRAINID, MAPILLARY_TO_TRAINID, SYNTHIA_TO_TRAINID, make_lut, render_events

GENERATOR_VERSION = 2  # bump when the output changes, so ensure_synthetic_sample regenerates stale samples
SIZE_RATIO = 1 / 8     # every size is the real native size times this

# ------------------------------------------------------------------------------------------------------------
# Inverse label maps: scene trainId (19) -> each dataset's raw encoding
# ------------------------------------------------------------------------------------------------------------
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
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane",
    "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider",
    "Lane Marking - Crosswalk", "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain",
    "Vegetation", "Water", "Banner", "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera",
    "Fire Hydrant", "Junction Box", "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole",
    "Traffic Sign Frame", "Utility Pole", "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)",
    "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle", "On Rails", "Other Vehicle",
    "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle",
    "Unlabeled")


def _encode_lut(mapping: dict[int, int], void: int) -> np.ndarray:
    """trainId -> raw id LUT; every trainId without an entry (and 255) becomes the dataset's void id."""
    lut = np.full(256, void, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _palette(colours: dict[int, tuple[int, int, int]]) -> list[int]:
    pal = [0] * 768
    for k, (r, g, b) in colours.items():
        pal[3 * k: 3 * k + 3] = [r, g, b]
    return pal


def _mapillary_colours() -> dict[int, tuple[int, int, int]]:
    # mapped ids get their Cityscapes colour, the rest a fixed pseudo-random one (the sample's own palette)
    rng = np.random.default_rng(1234)
    cols = {i: tuple(int(v) for v in rng.integers(0, 256, 3)) for i in range(66)}
    cols.update({i: tuple(int(v) for v in PALETTES[19][t]) for i, t in MAPILLARY_TO_TRAINID.items()})
    cols[65] = (0, 0, 0)
    return cols


# ------------------------------------------------------------------------------------------------------------
# Scene: a 19-class label map with per-pixel distance (flat ground, pinhole camera at 1.5 m)
# ------------------------------------------------------------------------------------------------------------
SKY_DIST = 1000.0


def make_scene(rng: np.random.Generator, h: int, w: int,
               absent: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Procedural street scene.

    Geometry: horizon row y_h; a ground point at row y is at distance Z = f * 1.5 / (y - y_h) with f = w; an
    object standing at row y_b has image size proportional to u = y_b - y_h (objects are painted far to near).

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
    f = float(w)

    def z_of(u: float) -> float:
        return min(SKY_DIST * 0.9, f * 1.5 / max(u, 0.5))
    ground = ys >= yh
    u_rows = np.maximum(ys - yh + 0.5, 0.5)
    dist[:] = np.where(ground, np.minimum(f * 1.5 / u_rows, SKY_DIST * 0.9), SKY_DIST)
    base_ground = 9 if (9 not in absent and rng.random() < 0.6) else 8
    label[np.broadcast_to(ground, (h, w))] = base_ground
    vx = w * rng.uniform(0.35, 0.65)
    # road between vx - a*u and vx + b*u, sidewalks s*u wide on both sides (u = y - y_h)
    a, b, s = rng.uniform(0.9, 1.8), rng.uniform(0.9, 1.8), rng.uniform(0.5, 1.1)
    # lateral position in camera heights
    lat = (xs - vx) / u_rows
    if 1 not in absent:
        label[ground & (lat > -a - s) & (lat < b + s)] = 1
    label[ground & (lat > -a) & (lat < b)] = 0
    # buildings (and walls / fences) rising from the horizon, leaving the far road end open
    x = 0.0
    while x < w:
        bw = w * rng.uniform(0.08, 0.22)
        if rng.random() < 0.85 and not (x < vx < x + bw and rng.random() < 0.5):
            top = int(yh * rng.uniform(0.05, 0.8))
            x0, x1 = int(x), int(min(w, x + bw))
            label[top:yh + 1, x0:x1] = 2
            dist[top:yh + 1, x0:x1] = z_of(1.5)
        x += bw
    for cls, hgt in ((3, 0.12), (4, 0.09)):
        if cls not in absent and rng.random() < 0.6:
            x0 = int(w * rng.uniform(0, 0.7))
            x1 = int(min(w, x0 + w * rng.uniform(0.15, 0.35)))
            y0 = max(0, int(yh - h * hgt))
            label[y0:yh + 2, x0:x1] = cls
            dist[y0:yh + 2, x0:x1] = z_of(2.0)
    # tree crowns above the horizon, vegetation / terrain patches on the ground
    if 8 not in absent:
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = w * rng.uniform(0, 1), yh - h * rng.uniform(0.05, 0.25)
            rx, ry = w * rng.uniform(0.04, 0.12), h * rng.uniform(0.06, 0.16)
            m = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
            label[m] = 8
            dist[m] = z_of(3.0)
    for _ in range(int(rng.integers(0, 3))):
        cls = int(rng.choice([8, 9]))
        if cls in absent:
            continue
        cx, cy = w * rng.uniform(0, 1), yh + (h - yh) * rng.uniform(0.2, 0.9)
        rx, ry = w * rng.uniform(0.05, 0.15), (h - yh) * rng.uniform(0.05, 0.15)
        m = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1) & (label == base_ground)
        label[m] = cls
    # objects, painted far to near: (class, lateral range, width, height) in units of u
    objects = []
    kinds = [(13, 0.5, (-a + 0.6, b - 0.6), 1.3, 1.0), (14, 0.2, (-a + 0.8, b - 0.8), 1.4, 2.2),
             (15, 0.2, (-a + 0.9, b - 0.9), 1.6, 2.2), (16, 0.08, (-a + 0.9, b - 0.9), 1.8, 2.4),
             (11, 0.55, (b + 0.1, b + s - 0.1), 0.35, 1.15), (11, 0.4, (-a - s + 0.1, -a - 0.1), 0.35, 1.15),
             (12, 0.35, (b + 0.1, b + s), 0.6, 1.6), (5, 0.75, (b + s * 0.8, b + s), 0.08, 3.0),
             (5, 0.5, (-a - s, -a - s * 0.8), 0.08, 3.0)]
    for cls, p, (l0, l1), ow, oh in kinds:
        for _ in range(int(rng.integers(1, 3))):
            if cls in absent or rng.random() > p:
                continue
            u = (h - yh) * rng.uniform(0.12, 0.75)
            objects.append((u, cls, rng.uniform(l0, max(l0, l1)), ow, oh))
    objects.sort(key=lambda o: o[0])
    for u, cls, lat0, ow, oh in objects:
        yb = yh + u
        cx = vx + lat0 * u
        ww, hh = max(1.0, ow * u), max(2.0, oh * u)
        x0, x1 = int(max(0, cx - ww / 2)), int(min(w, cx + ww / 2 + 1))
        y0, y1 = int(max(0, yb - hh)), int(min(h, yb + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        z = z_of(u)
        if cls == 12:  # rider on a bicycle or a motorcycle
            bike = 17 if (rng.random() < 0.5 and 17 not in absent) else 18
            yb0 = int(max(0, yb - 0.55 * u))
            label[yb0:y1, x0:x1], dist[yb0:y1, x0:x1] = bike, z
            rx0, rx1 = int(cx - 0.18 * u), int(cx + 0.18 * u + 1)
            label[y0:yb0, max(0, rx0):max(0, rx1)] = 12
            dist[y0:yb0, max(0, rx0):max(0, rx1)] = z
            continue
        label[y0:y1, x0:x1], dist[y0:y1, x0:x1] = cls, z
        if cls == 5:  # a sign or a light on top of the pole
            top = int(y0)
            sw, sh = max(2, int(0.35 * u)), max(2, int(0.3 * u))
            cls2 = 7 if rng.random() < 0.6 else 6
            if cls2 not in absent:
                sx0 = int(max(0, cx - sw / 2))
                label[top:top + sh, sx0:sx0 + sw], dist[top:top + sh, sx0:sx0 + sw] = cls2, z * 0.99
    # void: an ego-vehicle hood or a small unlabelled object
    if rng.random() < 0.3:
        label[int(h * 0.93):] = 255
    if rng.random() < 0.3:
        cx, cy, r = w * rng.uniform(0, 1), yh + (h - yh) * rng.uniform(0.1, 0.8), w * 0.03
        label[((xs - cx) ** 2 + (ys - cy) ** 2) < r * r] = 255
    return {"label": label, "dist": dist}


# ------------------------------------------------------------------------------------------------------------
# Renders (all from the label map and the distance)
# ------------------------------------------------------------------------------------------------------------
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


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((w, h), Image.BILINEAR))


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
    """Fixed per-dataset colour transform, blended with the reference by `shift` in [0, 1].

    Returns:
        uint8 (h, w, 3).
    """
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
    v = _TEMPERATURE[scene["label"]] + 12 * _smooth_noise(rng, h, w) + 8 * tex + rng.normal(0, 3, (h, w))
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def scene_events(scene: dict, rng: np.random.Generator, tex: np.ndarray, threshold: float = 0.12
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events of an ego-motion of 1-2 px: log-intensity change between two renders, thresholded.

    Returns:
        x, y (uint16) and p (uint8, 1 = brighter) of every event; a pixel whose change spans n thresholds
        fires n events (at most 4).
    """
    grey = (_BASE_RGB[scene["label"]].mean(-1) + 25 * tex + 10).astype(np.float32)
    dx = int(rng.integers(1, 3))
    moved = np.concatenate([grey[:, :1].repeat(dx, 1), grey[:, :-dx]], 1)  # the scene slides right by dx px
    diff = np.log(moved + 1) - np.log(grey + 1)
    n = np.minimum(np.floor(np.abs(diff) / threshold), 4).astype(np.int64)
    ys, xs = np.nonzero(n)
    reps = n[ys, xs]
    y = np.repeat(ys, reps).astype(np.uint16)
    x = np.repeat(xs, reps).astype(np.uint16)
    p = np.repeat(diff[ys, xs] > 0, reps).astype(np.uint8)
    return x, y, p


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------
def write_png16_rgb(path: Path, arr: np.ndarray) -> None:
    """Write (h, w, 3) uint16 as a 16-bit-per-channel RGB PNG (colour type 2) with the stdlib only.

    Pillow cannot write 16-bit RGB, and this is exactly the SYNTHIA label encoding the loader has to read.
    """
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row, big-endian

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _save(path: Path, arr: np.ndarray, palette: Optional[list[int]] = None, jpeg: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(palette)  # 'L' -> 'P': the file stores indices, the palette only colours them
    if jpeg:
        im.save(path, quality=90)
    else:
        im.save(path, compress_level=6)


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
            if k == 0:  # a colour file beside the labels: the loader must pair by explicit suffix
                _save(d / "gtFine" / split / city / f"{stem}_gtFine_color.png", PALETTES[19].take(
                    np.minimum(s["label"], 18), 0))


def _write_numbered(root: Path, g: _Gen, n_train: int, n_eval: int, name: str) -> None:
    """GTA5 (5-digit palette PNGs of labelIds) and SYNTHIA (7-digit, 16-bit RGB labels)."""
    ids = list(range(1, n_train + 1)) + [50 * (k + 1) for k in range(n_eval)]  # eval split: ids = 0 mod 50
    if name == "gta5":
        d, wh, digits = root / "gta5", (239, 132), 5
        lut = _encode_lut(TRAIN_TO_LABELID, 0)
        pal = _palette(_LABELID_COLOURS)
    else:
        d, wh, digits = root / "synthia", (160, 95), 7
        lut = _encode_lut(TRAIN_TO_SYNTHIA, 0)
    for k in ids:
        stem = f"{k:0{digits}d}"
        if name == "gta5":
            s = g.scene(wh)
            _save(d / "images" / f"{stem}.png", g.rgb(s, "gta5"))
            _save(d / "labels" / f"{stem}.png", lut[s["label"]], palette=pal)
        else:
            s = g.scene(wh, absent=(9, 14, 16))  # terrain, truck and train never occur in SYNTHIA
            _save(d / "RGB" / f"{stem}.png", g.rgb(s, "synthia"))
            gt = np.zeros(s["label"].shape + (3,), np.uint16)
            gt[..., 0] = lut[s["label"]]
            gt[..., 1] = g.rng.integers(0, 3000, s["label"].shape) * (gt[..., 0] > 0)  # instance ids > 255
            write_png16_rgb(d / "GT" / "LABELS" / f"{stem}.png", gt)
            if k == ids[0]:
                _save(d / "GT" / "COLOR" / f"{stem}.png", PALETTES[19].take(np.minimum(s["label"], 18), 0))


def _write_acdc(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "acdc"
    for cond in ("fog", "night", "rain", "snow"):
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
            seq = "GOPR0356"
            stem = f"{seq}_frame_{k:06d}"
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
            if k == 0:  # a colour map, never a label
                _save(d / "labels" / "sem_seg" / "colormaps" / split / f"{stem}.png",
                      PALETTES[19].take(np.minimum(s["label"], 18), 0))


def _write_mapillary(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "mapillary"
    lut = _encode_lut(TRAIN_TO_MAPILLARY, 65)  # void -> Unlabeled
    cols = _mapillary_colours()
    pal = _palette(cols)
    sizes = [(256, 192), (240, 135), (200, 150)]  # Mapillary sizes vary
    for split, n in (("training", n_train), ("validation", n_eval)):
        for k in range(n):
            stem = f"{split[:2]}{k:04d}Xy9"
            s = g.scene(sizes[k % len(sizes)])
            lab = lut[s["label"]]
            road = s["label"] == 0
            lab[road & (g.rng.random(lab.shape) < 0.05)] = 24  # lane markings: another road id
            _save(d / split / "images" / f"{stem}.jpg", g.rgb(s, "mapillary"), jpeg=True)
            _save(d / split / "v1.2" / "labels" / f"{stem}.png", lab, palette=pal)
    labels = [{"name": n.lower().replace(" ", "-"), "readable": n, "color": list(cols[i]),
               "instances": False, "evaluate": i != 65} for i, n in enumerate(MAPILLARY_V12_NAMES)]
    cfg = {"labels": labels, "version": "1.2 (synthetic)"}
    (d / "config_v1.2.json").write_text(json.dumps(cfg, indent=1))


def _write_dsec(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    """Edge PNGs (80x60, MADM layout), labels (80x55, 11 classes) in MADM and ESS layouts, raw events (h5)."""
    try:
        import h5py
    except ImportError:
        h5py = None
    d = root / "dsec"
    to11 = make_lut(CS19_TO_11)
    sensor = (60, 80)                                   # (H, W): 640x480 / 8; labels are the top 55 rows
    label_hw = (55, 80)
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
            label11 = to11[s["label"][: label_hw[0]]]
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
            keep = (k % 2 == 0) if split == "train" else True  # MADM's train edges: even frames >= 2
            if keep:
                edges = render_events(x, y, p, ident, sensor)
                _save(d / f"69mask_{split}_edges" / seq / f"{k:06d}.png", edges)
        sem.mkdir(parents=True, exist_ok=True)
        (sem / "timestamps.txt").write_text("".join(f"{int(t)}\n" for t in ts))
        if h5py is None:
            continue
        ev_dir = d / split / seq / "events" / "left"
        ev_dir.mkdir(parents=True, exist_ok=True)
        t_all = np.concatenate(ev_t)
        ms = np.arange(0, t_all[-1] // 1000 + 2) * 1000
        ms_to_idx = np.searchsorted(t_all, ms, "left").astype(np.uint64)  # first event at or after each ms
        with h5py.File(ev_dir / "events.h5", "w") as f:  # uncompressed: readable without hdf5plugin
            f.create_dataset("events/x", data=np.concatenate(ev_x))
            f.create_dataset("events/y", data=np.concatenate(ev_y))
            f.create_dataset("events/p", data=np.concatenate(ev_p))
            f.create_dataset("events/t", data=t_all)
            f.create_dataset("ms_to_idx", data=ms_to_idx)
            f.create_dataset("t_offset", data=np.int64(t_offset))
        with h5py.File(ev_dir / "rectify_map.h5", "w") as f:
            f.create_dataset("rectify_map", data=ident)  # identity rectification


def _write_fmb(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "fmb"
    lut = _encode_lut(TRAIN_TO_FMB, 0)  # wall, fence and void -> unlabelled
    n = n_train + n_eval
    for k in range(n):
        split = "test" if k % 3 == 1 and sum(1 for j in range(k) if j % 3 == 1) < n_eval else "train"
        s = g.scene((100, 75))
        stem = f"{k + 1:05d}"  # test names interleave with train names
        _save(d / split / "Infrared" / f"{stem}.png", render_infrared(s, g.rng, s["tex"]))
        _save(d / split / "Visible" / f"{stem}.png", g.rgb(s, "cityscapes"))
        _save(d / split / "Label" / f"{stem}.png", lut[s["label"]])


def _write_deliver(root: Path, g: _Gen, n_train: int, n_eval: int) -> None:
    d = root / "deliver"
    raw = make_lut(TRAIN_TO_DELIVER_RAW)
    conds = ("cloud", "fog", "night", "rain", "sun")
    for split, n in (("train", n_train), ("test", n_eval)):
        for k in range(n):
            cond = conds[k % len(conds)]
            m = f"MAP_{1 + k % 2}_point{k}"
            frame = f"{k:06d}"
            s = g.scene((130, 130))
            _save(d / "depth" / cond / split / m / f"{frame}_depth_front.png", render_depth(s, s["tex"]))
            stored = np.where(s["label"] == 255, 0, raw[s["label"]].astype(np.int64) + 1).astype(np.uint8)
            sem = np.stack([stored, g.rng.integers(0, 255, stored.shape, dtype=np.uint8),
                            np.zeros_like(stored)], -1)  # class in channel 0; others carry no class
            _save(d / "semantic" / cond / split / m / f"{frame}_semantic_front.png", sem)
            if k == 0:  # another camera beside the front one: not listed
                _save(d / "depth" / cond / split / m / f"{frame}_depth_left.png", render_depth(s, s["tex"]))


_WRITERS = [("cityscapes", _write_cityscapes),
            ("gta5", lambda r, g, a, b: _write_numbered(r, g, a, b, "gta5")),
            ("synthia", lambda r, g, a, b: _write_numbered(r, g, a, b, "synthia")), ("acdc", _write_acdc),
            ("dark_zurich", _write_dark_zurich), ("bdd100k", _write_bdd), ("mapillary", _write_mapillary),
            ("dsec", _write_dsec), ("fmb", _write_fmb), ("deliver", _write_deliver)]


def _write_into(folder: Path, n_train: int, n_eval: int, seed: int, shift: float) -> None:
    for index, (_, writer) in enumerate(_WRITERS):
        writer(folder, _Gen(seed, index, shift), n_train, n_eval)
    marker = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
              "shift": shift, "size_ratio": SIZE_RATIO, "raw_events": _have_h5py()}
    (folder / "SYNTHETIC").write_text(json.dumps(marker) + "\n")  # written last: marks a complete sample


def _swap_in(tmp: Path, root: Path) -> None:
    """Rename a finished sample to `root`; an existing `root` is moved aside first, then removed."""
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
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
        return
    try:
        os.rename(tmp, root)
    except OSError:  # created meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)


def write_synthetic_sample(root: str | Path = "data/synthetic", n_train: int = 8, n_eval: int = 4,
                           seed: int = 0, shift: float = 1.0) -> Path:
    """Write the synthetic sample of every dataset under `root` (replacing an existing one).

    Args:
        root: target folder; it receives one folder per dataset (cityscapes/, gta5/, ..., deliver/) and the
            `SYNTHETIC` marker (JSON: generator version, seed, counts, shift, size ratio).
        n_train, n_eval: items per train / eval split (ACDC: half of each per condition; DSEC: frames).
        seed: everything is a deterministic function of the seed.
        shift: 0 = every dataset in the reference style, 1 = the full per-dataset style shift.
    Returns:
        `Path(root)`. The sample is built in a temporary sibling folder and renamed into place, so readers
        never see half a sample.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        _write_into(tmp, n_train, n_eval, seed, shift)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, root)
    return root


def _have_h5py() -> bool:
    """Raw DSEC events (events.h5) are written only when the optional h5py is installed."""
    try:
        import h5py  # noqa: F401
    except ImportError:
        return False
    return True


def _is_current(root: Path) -> bool:
    """A complete sample from this generator -- and, once h5py is installed, one that has the raw events.

    Why the second condition: a sample written by `--demo` before `pip install h5py` lacks events.h5; reusing
    it would make the raw-event loader fail on a file the user was never told is missing.
    """
    try:
        marker = json.loads((root / "SYNTHETIC").read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("generator_version") == GENERATOR_VERSION
            and (marker.get("raw_events", False) or not _have_h5py()))


def ensure_synthetic_sample(root: str | Path = "data/synthetic") -> Path:
    """Return `root`, writing the default sample first if it is missing or from an older generator.

    Safe when several processes call it at once (tests, DDP ranks): each writes to its own temporary folder
    and renames it into place; a process that loses the race keeps the winner's (identical) sample.
    """
    root = Path(root)
    if _is_current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        _write_into(tmp, 8, 4, 0, 1.0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _is_current(root):  # finished by another process while we wrote ours
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    _swap_in(tmp, root)
    return root


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
