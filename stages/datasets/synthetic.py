"""Deterministic synthetic segmentation scenes in the folder layout (for demos and tests).

Five classes, separable by colour and texture: sky (vertical gradient), grass (green noise), road
(grey stripes in a perspective band), water (blue waves) and objects (saturated blobs). The label
maps are exact: they are the region masks the image was painted from. Image ``i`` of a split is
drawn from ``numpy.random.default_rng([seed, split_code, i])``, so the same seed always writes
byte-identical files and adding images never changes the earlier ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError, InputError

SYNTHETIC_CLASS_NAMES: list[str] = ["sky", "grass", "road", "water", "object"]
SKY, GRASS, ROAD, WATER, OBJECT = range(5)
_SPLIT_CODES = {"train": 0, "val": 1}
_OBJECT_COLOURS = np.array([[210, 40, 40], [230, 140, 20], [200, 40, 180], [235, 215, 30]], dtype=np.float64)


def synthetic_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 RGB ``[H, W, 3]``, uint8 label ``[H, W]`` with ids 0..4)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    label = np.full((height, width), GRASS, dtype=np.uint8)

    # Sky above a gently curved horizon.
    horizon = height * rng.uniform(0.25, 0.5) + height * rng.uniform(0.0, 0.05) * np.sin(
        2 * np.pi * xx[0] / (width * rng.uniform(0.6, 1.5)) + rng.uniform(0, 2 * np.pi)
    )
    label[yy < horizon[None, :]] = SKY
    below = label != SKY

    # Water on one side of the ground (sometimes absent).
    if rng.random() < 0.75:
        edge = width * rng.uniform(0.2, 0.45)
        side = xx < edge if rng.random() < 0.5 else xx > width - edge
        label[below & side] = WATER

    # Road: a band widening from a vanishing point on the horizon to the bottom edge.
    vx = width * rng.uniform(0.3, 0.7)
    h0 = float(horizon.mean())
    depth = np.clip((yy - h0) / max(height - h0, 1.0), 0.0, 1.0)
    half = depth * width * rng.uniform(0.15, 0.35)
    centre = vx + depth * width * rng.uniform(-0.2, 0.2)
    label[below & (np.abs(xx - centre) < half) & (depth > 0.05)] = ROAD

    # One to three object blobs anywhere below the top fifth.
    blob_shade = np.zeros((height, width))
    blob_colour = np.zeros((height, width, 3))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.2 * height, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.06, 0.15) * height, rng.uniform(0.05, 0.12) * width
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        inside = r2 < 1.0
        label[inside] = OBJECT
        blob_shade[inside] = 1.0 - 0.35 * r2[inside]
        blob_colour[inside] = _OBJECT_COLOURS[rng.integers(len(_OBJECT_COLOURS))]

    img = np.zeros((height, width, 3))
    t = np.clip(yy / max(float(horizon.max()), 1.0), 0.0, 1.0)[..., None]
    sky = (1 - t) * np.array([50, 100, 200]) + t * np.array([175, 205, 240])
    grass = np.array([60, 140, 45]) + rng.normal(0, 22, (height, width, 1)) * np.array([0.6, 1.0, 0.4])
    period = rng.uniform(5, 9)
    stripes = np.where(np.sin(2 * np.pi * (xx + yy * rng.uniform(-1, 1)) / period) > 0, 28.0, -28.0)
    road = np.array([115, 115, 120]) + stripes[..., None] + rng.normal(0, 4, (height, width, 1))
    waves = np.sin(xx * rng.uniform(0.15, 0.35) + 2.5 * np.sin(yy * rng.uniform(0.2, 0.5)))
    water = np.array([35, 90, 140]) + waves[..., None] * np.array([5, 20, 35])
    obj = blob_colour * blob_shade[..., None]
    for cls, paint in ((SKY, sky), (GRASS, grass), (ROAD, road), (WATER, water), (OBJECT, obj)):
        img[label == cls] = paint[label == cls]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def generate_synthetic(
    root: str | Path, *, n_train: int, n_val: int, size: tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Write ``imgs/{train,val}/{i:05d}.png`` and ``labels/{train,val}/{i:05d}.png`` under ``root``.

    Existing files with the same names are overwritten; any other file in those folders is an
    InputError (so a smaller re-generation never leaves stale samples behind). Returns ``root``.
    """
    height, width = size
    if n_train < 0 or n_val < 0:
        raise ConfigError(f"synthetic: n_train={n_train}, n_val={n_val} must be >= 0")
    if height < 8 or width < 8:
        raise ConfigError(f"synthetic: size={size} must be at least 8x8")
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        names = {f"{i:05d}.png" for i in range(n)}
        dirs = (root / "imgs" / split, root / "labels" / split)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            stale = sorted(p.name for p in d.iterdir() if p.name not in names)
            if stale:
                raise InputError(f"synthetic: folder {d} already holds other files ({', '.join(stale[:3])}); "
                                 "use an empty root")
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            img, label = synthetic_scene(rng, height, width)
            Image.fromarray(img).save(dirs[0] / f"{i:05d}.png", format="PNG")
            Image.fromarray(label).save(dirs[1] / f"{i:05d}.png", format="PNG")
    return root
