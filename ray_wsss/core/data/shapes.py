"""A whole-object synthetic classification task: a stand-in for pretrained weights.

The papers start from ImageNet weights, whose attention already groups whole objects. This task
asks for the same from a small synthetic set: every object's category is its SILHOUETTE (one of
:data:`SHAPES`), drawn at a random size, rotation and aspect and filled with a random colour and
texture that say nothing about the category. Only the whole outline tells categories apart, so a
classifier must group an object's pixels; no small part gives it away. It is a different generator
from the WSSS data (:mod:`ray_wsss.core.data.synthetic`), whose classes differ only by a small part.

With ``hue_cue`` each category also has its own hue, over the whole object: an easier start (a
randomly initialised ViT finds colour before outline) that still rewards attending to whole objects.

Scenes hold 1-3 objects (categories may repeat) on the WSSS generator's backgrounds and clutter;
sample ``i`` of split ``s`` depends only on ``(seed, s, i)``.
"""
from __future__ import annotations

import colorsys
import dataclasses
import zlib

import numpy as np

from ray_wsss.core.data import synthetic

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "star", "cross", "ring", "crescent", "ell", "heart", "bar")
FILLS = ("flat", "stripes", "noise", "gradient")


@dataclasses.dataclass
class ShapesConfig:
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    min_size: int = 64
    max_size: int = 128
    max_objects: int = 3
    hue_cue: bool = False  # True: category c's fill has hue 360 c / len(SHAPES) (+-12 degrees)

    def __post_init__(self) -> None:
        for name in ("seed", "num_train", "num_val", "min_size", "max_size", "max_objects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ShapesConfig.{name} must be an int >= 0, got {value!r}")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"ShapesConfig: need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not isinstance(self.hue_cue, bool):
            raise ValueError(f"ShapesConfig.hue_cue must be a bool, got {self.hue_cue!r}")
        if self.max_objects < 1:
            raise ValueError(f"ShapesConfig.max_objects must be >= 1, got {self.max_objects}")


def class_names(cfg: ShapesConfig | None = None) -> list[str]:
    """The category names (the same for every config; ``cfg`` as the WSSS generator's signature)."""
    return ["background", *SHAPES]


def split_sizes(cfg: ShapesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val}


def generate_sample(cfg: ShapesConfig, split: str, index: int) -> dict:
    """One ``samples`` row, encoded as the WSSS generator's (labels: the categories visible in the mask)."""
    return synthetic.sample_row(split, index, *render_scene(cfg, split, index))


def render_scene(cfg: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of ``split``: uint8 image [H, W, 3] and its mask of category ids [H, W]."""
    sizes = split_sizes(cfg)
    if split not in sizes:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {sorted(sizes)}")
    if not 0 <= index < sizes[split]:
        raise ValueError(f"index {index} out of range for split {split!r} of {sizes[split]} images")
    # A seed stream of its own (the "shapes" tag): never the WSSS generator's scenes.
    rng = np.random.default_rng([cfg.seed, zlib.crc32(b"shapes"), zlib.crc32(split.encode()), index])
    height, width = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
    canvas = synthetic._Canvas(rng, height, width, synthetic.SyntheticConfig())  # its backgrounds and clutter
    canvas.paint_background()
    canvas.paint_clutter(int(rng.integers(0, 4)))
    mask = np.zeros((height, width), np.uint8)
    placed: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        category = int(rng.integers(0, len(SHAPES)))
        for _ in range(25):  # a new object may hide at most 30 % of any earlier one
            region = _silhouette(rng, SHAPES[category], canvas.yy, canvas.xx, min(height, width))
            if region.sum() >= 30 and all((old & ~region).sum() >= 0.7 * old.sum() for old in placed):
                break
        else:
            continue
        canvas.image[region] = _fill(rng, canvas, region, _category_hue(cfg, category))
        placed = [old & ~region for old in placed] + [region]
        mask[region] = category + 1
    if not placed:  # every try collided: one object on its own always fits
        category = int(rng.integers(0, len(SHAPES)))
        region = _silhouette(rng, SHAPES[category], canvas.yy, canvas.xx, min(height, width))
        canvas.image[region] = _fill(rng, canvas, region, _category_hue(cfg, category))
        mask[region] = category + 1
    noise = rng.normal(0.0, 5.0, canvas.image.shape)
    return np.clip(canvas.image + noise, 0, 255).astype(np.uint8), mask


def _silhouette(rng: np.random.Generator, shape: str, yy: np.ndarray, xx: np.ndarray, side: int) -> np.ndarray:
    """Pixels of ``shape`` at a random place, size, rotation and aspect (coordinates in units of its radius)."""
    height, width = yy.shape
    radius = rng.uniform(0.16, 0.32) * side
    cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
    theta = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.8, 1.25)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / (radius * aspect)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (radius / aspect)
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disc":
        return rho <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return _regular_polygon(u, v, 3)
    if shape == "star":
        return rho <= 0.45 + 0.55 * np.abs(np.cos(2.5 * phi))
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if shape == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if shape == "crescent":
        return (rho <= 1) & (np.hypot(u - 0.55, v) > 0.8)
    if shape == "ell":
        return ((np.abs(u) <= 0.9) & (v >= 0.3) & (v <= 0.9)) | ((u >= -0.9) & (u <= -0.3) & (np.abs(v) <= 0.9))
    if shape == "heart":  # (x^2 + y^2 - 1)^3 <= x^2 y^3, point up
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1) ** 3 <= x * x * y ** 3
    if shape == "bar":
        return (np.abs(u) <= 1) & (np.abs(v) <= 0.3)
    raise ValueError(f"unknown shape {shape!r}")


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
    inside = np.ones(u.shape, bool)
    for k in range(sides):
        angle = 2 * np.pi * k / sides
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _category_hue(cfg: ShapesConfig, category: int) -> float | None:
    return category / len(SHAPES) if cfg.hue_cue else None


def _fill(rng: np.random.Generator, canvas: synthetic._Canvas, region: np.ndarray, hue: float | None) -> np.ndarray:
    """[n, 3] colours for the region's pixels: a random texture between two random colours, or two
    saturated shades of the given hue."""
    if hue is None:
        first, second = (np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.2, 1)))
                         * 255 for _ in range(2))
    else:  # two shades of the category's hue
        hue = (hue + rng.uniform(-12, 12) / 360) % 1
        first, second = (np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.45, 1))) * 255
                         for _ in range(2))
    kind = FILLS[int(rng.integers(0, len(FILLS)))]
    yy, xx = canvas.yy[region], canvas.xx[region]
    if kind == "flat":
        t = np.zeros(len(yy), np.float32)
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        t = (np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0).astype(np.float32)
    elif kind == "noise":
        t = canvas._smooth_noise(scale=rng.uniform(2, 6))[region]
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    return first + t[:, None] * (second - first)
