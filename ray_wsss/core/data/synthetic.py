"""A synthetic weakly supervised segmentation data set with the partial-activation problem built in.

Every object is a large BODY whose look is shared by all classes (mottled, earthy, low saturation)
carrying a small DISCRIMINATIVE PART (a saturated colour and pattern of its own, about 12-18 % of
the object). The ground-truth mask covers body and part. Distractor bodies without a part (some with a
grey decoy patch) and small grey clutter are background, so an image-level classifier can only
rely on the part, and its activation maps cover the part alone: the gap that ACR and MCTformer
close. Scenes hold 1-3 objects (classes may repeat) on varied textured backgrounds, drawn in a
random z-order so objects and distractors occlude each other; the mask holds visible pixels.

Variants (:data:`VARIANTS`) change the part size (in pixels instead of a share of the body), the
label space (e.g. VOC's 20 classes with a few used), the body texture and the backgrounds; the
default configuration renders exactly what it always did.

Sample ``i`` of split ``s`` depends only on ``(seed, s, i)``, so generation is parallel and
repeatable anywhere.
"""
from __future__ import annotations

import colorsys
import dataclasses
import zlib

import numpy as np

from ray_wsss.core import codec
from ray_wsss.core.data.voc import VOC_CLASSES

CLASS_NAMES: tuple[str, ...] = ("cardinal", "bee", "frog", "kingfisher", "bluejay", "flamingo")

# Per class: the part's hue (degrees) and shape. Hues ~60 degrees apart so colour alone separates
# the classes even after downsampling; shape and pattern separate them again at full resolution.
PART_HUES = (0.0, 52.0, 120.0, 185.0, 232.0, 305.0)
PART_SHAPES = ("disc", "striped_square", "spotted_disc", "diamond", "triangle", "ring")

# The look every body shares, whatever its class.
BODY_TEXTURES = ("mottled", "striped", "checker", "noise")
BACKGROUND_TEXTURES = ("smooth", "gradient", "stripes", "blobs")
PART_SIZE_RANGE = (4.0, 40.0)  # allowed part diameters, pixels


MIN_SIDE, MAX_SIDE = 32, 4096


@dataclasses.dataclass
class SyntheticConfig:
    """Size, seed and look of the synthetic data set. Image sides are drawn independently per image.

    ``label_space`` names the foreground classes (the classifier's outputs, mask ids 1..K in order);
    ``used_classes`` are those that appear (None = all), the i-th used class getting the i-th part
    design (hue and shape), so at most ``len(PART_SHAPES)`` are used. ``part_size`` is the range of
    a part's diameter in pixels (None = 12-18 % of its body's area, so it scales with the image).
    """

    seed: int = 0
    num_train: int = 600
    num_val: int = 120
    min_size: int = 64
    max_size: int = 128
    max_objects: int = 3
    max_distractors: int = 2
    part_size: tuple[float, float] | None = None
    label_space: tuple[str, ...] = CLASS_NAMES
    used_classes: tuple[str, ...] | None = None
    body_texture: str = "mottled"
    background_textures: tuple[str, ...] = BACKGROUND_TEXTURES

    def __post_init__(self) -> None:
        for name in ("seed", "num_train", "num_val", "min_size", "max_size", "max_objects", "max_distractors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SyntheticConfig.{name} must be an int, got {value!r}")
        if self.seed < 0 or self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"SyntheticConfig.seed/num_train/num_val must be >= 0, got {self.seed}, "
                             f"{self.num_train}, {self.num_val}")
        if not MIN_SIDE <= self.min_size <= self.max_size <= MAX_SIDE:  # objects need room; 4096 px takes ~1 GB
            raise ValueError(f"synthetic data needs {MIN_SIDE} <= min_size <= max_size <= {MAX_SIDE}, got "
                             f"min_size {self.min_size}, max_size {self.max_size}")
        if self.max_objects < 1 or self.max_distractors < 0:
            raise ValueError(f"need max_objects >= 1 and max_distractors >= 0, got {self.max_objects}, "
                             f"{self.max_distractors}")
        if self.part_size is not None:
            self.part_size = _check_part_size(self.part_size)
        self.label_space = _names("label_space", self.label_space)
        if self.used_classes is not None:
            self.used_classes = _names("used_classes", self.used_classes)
            unknown = sorted(set(self.used_classes) - set(self.label_space))
            if unknown:
                raise ValueError(f"SyntheticConfig.used_classes {unknown} are not in label_space {self.label_space}")
        if len(self.used_names()) > len(PART_SHAPES):
            raise ValueError(f"SyntheticConfig uses {len(self.used_names())} classes; there are part designs "
                             f"for at most {len(PART_SHAPES)} (set used_classes)")
        if self.body_texture not in BODY_TEXTURES:
            raise ValueError(f"SyntheticConfig.body_texture {self.body_texture!r} is not one of {BODY_TEXTURES}")
        self.background_textures = tuple(self.background_textures)
        bad = [t for t in self.background_textures if t not in BACKGROUND_TEXTURES]
        if not self.background_textures or bad:
            raise ValueError(f"SyntheticConfig.background_textures {self.background_textures!r} must be a "
                             f"non-empty selection of {BACKGROUND_TEXTURES}")

    def used_names(self) -> tuple[str, ...]:
        return self.label_space if self.used_classes is None else self.used_classes

    def used_ids(self) -> list[int]:
        """Mask ids (1-based positions in ``label_space``) of the used classes, in design order."""
        return [self.label_space.index(name) + 1 for name in self.used_names()]


def _check_part_size(value) -> tuple[float, float]:
    lo_allowed, hi_allowed = PART_SIZE_RANGE
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"SyntheticConfig.part_size must be (min, max) pixels, got {value!r}") from None
    if not lo_allowed <= lo <= hi <= hi_allowed:
        raise ValueError(f"SyntheticConfig.part_size {value!r}: need {lo_allowed:g} <= min <= max <= "
                         f"{hi_allowed:g} pixels")
    return lo, hi


def _names(field: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"SyntheticConfig.{field} must be a sequence of class names, got {value!r}")
    names = tuple(value)
    if not names or len(set(names)) != len(names) or "background" in names:
        raise ValueError(f"SyntheticConfig.{field} {names!r} must be non-empty, without duplicates or "
                         "'background'")
    return names


@dataclasses.dataclass
class SyntheticScene:
    """One rendered scene with the layers that tests and visualisations need.

    ``instances`` holds 1 + the object's index in ``objects`` on its visible pixels (0 elsewhere);
    ``parts`` marks visible part pixels; ``distractors`` marks visible distractor-body pixels.
    """

    image: np.ndarray        # uint8 [H, W, 3]
    mask: np.ndarray         # uint8 [H, W] class ids
    instances: np.ndarray    # int32 [H, W]
    parts: np.ndarray        # bool [H, W]
    distractors: np.ndarray  # bool [H, W]
    objects: list[int]       # class id of each placed object
    object_areas: list[int]  # pixels of each object before anything covered it
    num_distractors: int


def class_names(cfg: SyntheticConfig | None = None) -> list[str]:
    return ["background", *(cfg or SyntheticConfig()).label_space]


def split_sizes(cfg: SyntheticConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val}


def generate_sample(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """One ``samples`` row: PNG image, palette-PNG mask, labels = classes visible in the mask."""
    scene = render_scene(cfg, split, index)
    return sample_row(split, index, scene.image, scene.mask)


def sample_row(split: str, index: int, image: np.ndarray, mask: np.ndarray) -> dict:
    """A generated image and its class-id mask as a ``samples`` row (the generators' shared encoding)."""
    height, width = mask.shape
    return {
        "image_id": f"{split}_{index:06d}",
        "split": split,
        "image": codec.encode_png_image(image),
        "height": int(height),
        "width": int(width),
        "labels": sorted(int(c) for c in np.unique(mask) if c != 0),
        "gt_mask": codec.encode_mask(mask),
    }


def render_scene(cfg: SyntheticConfig, split: str, index: int) -> SyntheticScene:
    """Sample ``index`` of ``split`` as pixels plus its label layers."""
    sizes = split_sizes(cfg)
    if split not in sizes:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(sizes)}")
    if not 0 <= index < sizes[split]:
        raise ValueError(f"index {index} out of range for split {split!r} of {sizes[split]} images")
    # crc32, not hash(): Python salts str hashes per process.
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index])
    height, width = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
    canvas = _Canvas(rng, height, width, cfg)
    canvas.paint_background()
    canvas.paint_clutter(int(rng.integers(0, 4)))

    num_objects = int(rng.integers(1, cfg.max_objects + 1))
    num_distractors = int(rng.integers(0, cfg.max_distractors + 1))
    # True = object, False = distractor; shuffled so either may occlude the other.
    order = [True] * num_objects + [False] * num_distractors
    rng.shuffle(order)
    used = cfg.used_ids()
    placed_distractors = 0
    for is_object in order:
        if is_object:
            canvas.place_object(used, int(rng.integers(0, len(used))))
        else:
            placed_distractors += canvas.place_distractor()
    if not canvas.objects:  # every try cut a part at the border: keep trying, nothing can occlude
        canvas.place_object(used, int(rng.integers(0, len(used))), tries=10_000)

    noise = rng.normal(0.0, 5.0, canvas.image.shape)  # sensor noise: no flat synthetic regions
    image = np.clip(canvas.image + noise, 0, 255).astype(np.uint8)
    return SyntheticScene(
        image=image, mask=canvas.mask, instances=canvas.instances, parts=canvas.parts,
        distractors=canvas.distractors, objects=canvas.objects,
        object_areas=canvas.full_area, num_distractors=placed_distractors,
    )


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)) * 255.0


class _Canvas:
    """Paints layers back to front, keeping the label layers in step with the pixels."""

    # Occlusion limits: an earlier object keeps most of its body and nearly all of its part,
    # so every label stays visible and recognisable.
    MAX_COVER_OBJECT = 0.45
    MAX_COVER_PART = 0.2
    TRIES = 25

    def __init__(self, rng: np.random.Generator, height: int, width: int, cfg: SyntheticConfig):
        self.rng = rng
        self.cfg = cfg
        self.height, self.width = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.image = np.zeros((height, width, 3), np.float32)
        self.mask = np.zeros((height, width), np.uint8)
        self.instances = np.zeros((height, width), np.int32)
        self.parts = np.zeros((height, width), bool)
        self.distractors = np.zeros((height, width), bool)
        self.objects: list[int] = []
        self.full_area: list[int] = []
        self.part_area: list[int] = []

    # ---------------------------------------------------------------- background

    def paint_background(self) -> None:
        rng = self.rng
        base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.45), rng.uniform(0.35, 0.9))
        other = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.9))
        kinds = self.cfg.background_textures
        kind = kinds[int(rng.integers(0, len(kinds)))]
        if kind == "smooth":  # smooth noise
            t = self._smooth_noise(scale=rng.uniform(4, 16))
        elif kind == "gradient":
            angle = rng.uniform(0, np.pi)
            proj = self.xx * np.cos(angle) + self.yy * np.sin(angle)
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        elif kind == "stripes":
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(6, 24)
            proj = self.xx * np.cos(angle) + self.yy * np.sin(angle)
            t = (np.sin(2 * np.pi * proj / period) > 0).astype(np.float32) * rng.uniform(0.4, 1.0)
        else:  # soft blobs
            t = np.zeros((self.height, self.width), np.float32)
            for _ in range(int(rng.integers(3, 9))):
                cy, cx = rng.uniform(0, self.height), rng.uniform(0, self.width)
                r = rng.uniform(5, 0.3 * min(self.height, self.width) + 6)
                t = np.maximum(t, np.exp(-((self.yy - cy) ** 2 + (self.xx - cx) ** 2) / (2 * r * r)))
        self.image[:] = base + t[..., None] * (other - base)
        self.image += self._smooth_noise(scale=3)[..., None] * rng.uniform(0, 30) - 15

    def paint_clutter(self, count: int) -> None:
        """Small grey shapes the size of a part: texture the classifier must learn to ignore."""
        rng = self.rng
        for _ in range(count):
            r = rng.uniform(3, 0.08 * min(self.height, self.width) + 3)
            cy, cx = rng.uniform(0, self.height), rng.uniform(0, self.width)
            dy, dx = self.yy - cy, self.xx - cx
            if rng.random() < 0.5:
                region = (np.abs(dy) <= r) & (np.abs(dx) <= r)
            else:
                region = dy ** 2 + dx ** 2 <= r * r
            self.image[region] = rng.uniform(20, 235)

    # ---------------------------------------------------------------- objects

    def place_object(self, used_ids: list[int], design: int, tries: int = TRIES) -> bool:
        """Places an object of class ``used_ids[design]`` wearing part design ``design``."""
        class_id = used_ids[design]
        for _ in range(tries):
            shape = self._sample_shape(PART_SHAPES[design])
            if shape is None or not self._occlusion_ok(shape.body):
                continue
            self._paint_body(shape.body)
            self._paint_part(shape, design)
            self._take_pixels(shape.body)
            self.objects.append(class_id)
            self.mask[shape.body] = class_id
            self.instances[shape.body] = len(self.objects)
            self.parts[shape.part] = True
            self.full_area.append(int(shape.body.sum()))
            self.part_area.append(int(shape.part.sum()))
            return True
        return False

    def place_distractor(self) -> bool:
        for _ in range(self.TRIES):
            shape = self._sample_shape("disc")
            if shape is None or not self._occlusion_ok(shape.body):
                continue
            self._paint_body(shape.body)
            if self.rng.random() < 0.5:  # a grey decoy where a part would be
                self.image[shape.part] = self.rng.uniform(30, 230)
            self._take_pixels(shape.body)
            self.distractors[shape.body] = True
            return True
        return False

    def _take_pixels(self, region: np.ndarray) -> None:
        """A new layer hides everything beneath it: the label layers forget those pixels."""
        self.mask[region] = 0
        self.instances[region] = 0
        self.parts[region] = False
        self.distractors[region] = False

    def _occlusion_ok(self, region: np.ndarray) -> bool:
        """Whether covering ``region`` leaves every placed object enough of its body and part."""
        for idx in range(len(self.objects)):
            left = (self.instances == idx + 1) & ~region
            if left.sum() < (1 - self.MAX_COVER_OBJECT) * self.full_area[idx]:
                return False
            if (left & self.parts).sum() < (1 - self.MAX_COVER_PART) * self.part_area[idx]:
                return False
        return True

    def _sample_shape(self, part_shape: str) -> _Shape | None:
        """A body (wobbly ellipse) with a part at one end of its long axis; None if the part is cut."""
        rng = self.rng
        side = min(self.height, self.width)
        a = rng.uniform(0.22, 0.34) * side  # semi-major axis
        b = a * rng.uniform(0.6, 0.85)      # semi-minor axis
        theta = rng.uniform(0, 2 * np.pi)
        cy, cx = rng.uniform(0.15, 0.85) * self.height, rng.uniform(0.15, 0.85) * self.width
        u, v = _rotate(self.yy - cy, self.xx - cx, theta)
        u, v = u / a, v / b
        angle = np.arctan2(v, u)
        edge = (1.0 + 0.06 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
                + 0.04 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi)))
        body = np.hypot(u, v) <= edge

        # Part area is a fraction of the body's ellipse area (or a size in pixels): a disc-sized
        # shape of radius r.
        if self.cfg.part_size is None:
            r = float(np.sqrt(rng.uniform(0.12, 0.18) * a * b))
        else:
            r = float(rng.uniform(*self.cfg.part_size)) / 2
        offset = max(a * 0.88 - r, 0.0)
        py, px = cy + offset * np.sin(theta), cx + offset * np.cos(theta)
        if not (r <= py <= self.height - 1 - r and r <= px <= self.width - 1 - r):
            return None
        pu, pv = _rotate(self.yy - py, self.xx - px, theta)
        part = _part_region(part_shape, pu, pv, r) & body
        return _Shape(body=body, part=part, u=pu, v=pv, r=r)

    def _paint_body(self, body: np.ndarray) -> None:
        """The shared body look: earthy tones in the configured texture with a dark rim, identical
        for all classes."""
        rng = self.rng
        hue = rng.uniform(15, 50)
        light = _hsv(hue, rng.uniform(0.15, 0.35), rng.uniform(0.55, 0.8))
        dark = _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.2, 0.4), rng.uniform(0.25, 0.45))
        t = self._body_pattern()
        texture = dark + t[..., None] * (light - dark)
        self.image[body] = texture[body]
        rim = body & ~_erode(body)
        self.image[rim] = self.image[rim] * 0.45

    def _body_pattern(self) -> np.ndarray:
        """[H, W] in [0, 1]: where the body texture is light (1) or dark (0)."""
        rng, kind = self.rng, self.cfg.body_texture
        if kind == "mottled":
            return self._smooth_noise(scale=rng.uniform(2.5, 5))
        if kind == "noise":
            return rng.random((self.height, self.width)).astype(np.float32)
        u, v = _rotate(self.yy, self.xx, rng.uniform(0, np.pi))
        if kind == "striped":
            period = rng.uniform(5, 10)
            return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
        cell = rng.uniform(3, 7)  # checker
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)

    def _paint_part(self, shape: _Shape, design: int) -> None:
        rng = self.rng
        hue = PART_HUES[design] + rng.uniform(-6, 6)
        main = _hsv(hue, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
        part, u, v, r = shape.part, shape.u, shape.v, shape.r
        self.image[part] = main
        kind = PART_SHAPES[design]
        if kind == "striped_square":
            self.image[part & (np.floor(u / max(r * 0.45, 1.5)) % 2 == 0)] = (20, 20, 20)
        elif kind == "spotted_disc":
            spacing = max(r * 0.7, 3.0)
            spots = ((u % spacing - spacing / 2) ** 2 + (v % spacing - spacing / 2) ** 2
                     <= (spacing * 0.22) ** 2)
            self.image[part & spots] = main * 0.35
        elif kind == "ring":
            self.image[part & (u ** 2 + v ** 2 <= (0.5 * r) ** 2)] = (250, 250, 250)
        elif kind == "diamond":
            self.image[part & (u ** 2 + v ** 2 <= (0.3 * r) ** 2)] = (15, 15, 15)

    def _smooth_noise(self, scale: float) -> np.ndarray:
        """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
        gh = int(np.ceil(self.height / scale)) + 2
        gw = int(np.ceil(self.width / scale)) + 2
        grid = self.rng.random((gh, gw)).astype(np.float32)
        y, x = self.yy / scale, self.xx / scale
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        fy, fx = y - y0, x - x0
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy


@dataclasses.dataclass
class _Shape:
    body: np.ndarray
    part: np.ndarray
    u: np.ndarray  # part-centred coordinates along the body's long axis
    v: np.ndarray
    r: float


def _rotate(dy: np.ndarray, dx: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets -> coordinates along (u) and across (v) the direction ``theta``."""
    return dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)


def _part_region(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a part of the given shape, about the area of a disc of radius ``r``."""
    if shape in ("disc", "spotted_disc", "ring"):
        return u ** 2 + v ** 2 <= r * r
    if shape == "striped_square":
        half = r * np.sqrt(np.pi) / 2
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "diamond":
        half = r * np.sqrt(np.pi / 2)
        return np.abs(u) + np.abs(v) <= half
    if shape == "triangle":  # equilateral, pointing outwards along the long axis
        circum = r * 1.55
        return (u >= -circum / 2) & (np.abs(v) <= (circum - u) / np.sqrt(3))
    raise ValueError(f"unknown part shape {shape!r}")


def _erode(region: np.ndarray) -> np.ndarray:
    """One-pixel binary erosion (4-neighbourhood), edges counting as outside."""
    padded = np.pad(region, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


# ---------------------------------------------------------------- named variants

# The six VOC classes the VOC-layout variant uses (any six would do: each gets one part design).
_VOC_USED = ("bird", "cat", "dog", "car", "boat", "person")

# Named data sets for robustness checks of the training recipe. DEV_VARIANTS may be used to choose
# a recipe; HELDOUT_VARIANTS must not be (they test that the choice generalises).
VARIANTS: dict[str, SyntheticConfig] = {
    "default": SyntheticConfig(),
    # Dev: parts of a fixed pixel size, small next to larger images (the hard case for a model that
    # sees a downscaled input), another seed.
    "dev-small-parts": SyntheticConfig(seed=1, min_size=96, max_size=160, part_size=(6.0, 12.0)),
    # Held out. Closest to the hidden VOC-layout set of issue 17: VOC's 20-class label space with 6
    # used, 130-170 px images, small saturated parts on striped bodies, 600/150 images.
    "voc20-striped": SyntheticConfig(seed=11, num_val=150, min_size=130, max_size=170, part_size=(6.0, 14.0),
                                     label_space=VOC_CLASSES, used_classes=_VOC_USED, body_texture="striped"),
    # Part sizes over the whole 4-20 px range, checkered bodies.
    "parts-4-20-checker": SyntheticConfig(seed=12, num_val=150, min_size=80, max_size=144, part_size=(4.0, 20.0),
                                          body_texture="checker"),
    # VOC's label space with only three classes used, noisy bodies, plain backgrounds.
    "voc20-three-noise": SyntheticConfig(seed=13, num_val=150, label_space=VOC_CLASSES,
                                         used_classes=("aeroplane", "cow", "tvmonitor"), body_texture="noise",
                                         background_textures=("smooth", "gradient")),
    # Another seed of the default look.
    "default-seed-5": SyntheticConfig(seed=5, num_val=150),
}
DEV_VARIANTS = ("default", "dev-small-parts")
HELDOUT_VARIANTS = ("voc20-striped", "parts-4-20-checker", "voc20-three-noise", "default-seed-5")
