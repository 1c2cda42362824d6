"""Builders of small on-disk data sets for the adapter, Ray-stage and S3 tests (not a conftest)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ray_wsss.core import codec

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
COCO_MINI_ANNOTATIONS = COCO_MINI / "instances_train2017_subset.json"

# Written out here, not imported, so the tests check the adapter's order against the standard one.
VOC_IDS = {name: idx + 1 for idx, name in enumerate((
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor"))}


def coco_mini_dir() -> Path:
    """The real 160-image COCO fixture; a clear failure (never a skip) when it is missing."""
    if not COCO_MINI_ANNOTATIONS.is_file() or not (COCO_MINI / "images").is_dir():
        raise FileNotFoundError(
            f"COCO fixture missing: expected {COCO_MINI_ANNOTATIONS} and {COCO_MINI / 'images'} "
            "(the shared coco-mini data set next to the repository)")
    return COCO_MINI


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(array: np.ndarray, mode: str) -> bytes:
    """Mode "P" gets the VOC palette, like the real SegmentationClass files."""
    img = Image.fromarray(array, mode)
    if mode == "P":
        img.putpalette(codec.VOC_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width].copy()


def _voc_mask(height: int, width: int, boxes: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Boxes (class, y0, x0, y1, x1) painted in order, each outlined by VOC's 255 'void' border."""
    mask = np.zeros((height, width), np.uint8)
    for class_id, y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
        mask[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = class_id
    return mask


def _voc_xml(names: list[str]) -> str:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return f"<annotation><folder>VOC2012</folder>{objects}</annotation>"


# id -> (height, width, boxes, xml names or None, mask folder or None, mask mode)
_GOOD = {
    "2007_000032": (48, 64, [(15, 4, 4, 40, 30), (12, 10, 28, 44, 60)], ["person", "dog"],
                    "SegmentationClass", "P"),
    # XML names a class the mask lacks (a tiny person): labels follow the XML.
    "2007_000039": (40, 56, [(7, 5, 5, 35, 50)], ["car", "car", "person"], "SegmentationClassAug", "L"),
    # No XML: labels come from the mask.
    "2007_000063": (56, 48, [(1, 2, 2, 30, 40), (20, 28, 10, 54, 46)], None, "SegmentationClass", "P"),
    # No mask: a classification-only image.
    "2007_000068": (32, 40, [], ["cat"], None, None),
}


def make_voc_tree(root: Path, split: str = "train", bad_records: bool = False, seed: int = 0) -> dict:
    """Write a small VOCdevkit tree under ``root`` and return what an adapter should read back.

    Returns ``root`` (str), ``split``, ``ids`` (good ids in split-file order), ``labels``
    (id -> sorted ids), ``masks`` (id -> uint8 array or None), ``mask_bytes`` (id -> bytes or None),
    ``images`` (id -> JPEG bytes), ``sizes`` (id -> (h, w)) and ``bad``: id -> (file path, message
    fragment) for the broken records listed in the split file when ``bad_records`` is set.
    """
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations",
                   "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    out: dict = {"root": str(root), "split": split, "ids": list(_GOOD), "labels": {}, "masks": {},
                 "mask_bytes": {}, "images": {}, "sizes": {}, "bad": {}}
    for image_id, (h, w, boxes, names, folder, mode) in _GOOD.items():
        image = jpeg_bytes(_random_image(rng, h, w))
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(image)
        out["images"][image_id], out["sizes"][image_id] = image, (h, w)
        mask = _voc_mask(h, w, boxes) if folder else None
        out["masks"][image_id] = mask
        out["mask_bytes"][image_id] = png_bytes(mask, mode) if folder else None
        if folder:
            (root / folder / f"{image_id}.png").write_bytes(out["mask_bytes"][image_id])
        if names is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(names))
            out["labels"][image_id] = sorted({VOC_IDS[n] for n in names})
        else:
            out["labels"][image_id] = sorted(set(np.unique(mask).tolist()) - {0, 255})
    # SegmentationClass wins over SegmentationClassAug: a decoy Aug mask for the first id.
    decoy = np.full(out["sizes"]["2007_000032"], 3, np.uint8)
    (root / "SegmentationClassAug" / "2007_000032.png").write_bytes(png_bytes(decoy, "P"))

    listed = list(out["ids"])
    if bad_records:
        out["bad"] = _write_bad_records(root, rng)
        listed += list(out["bad"])
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return out


def _write_bad_records(root: Path, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    def image(image_id: str, h: int = 32, w: int = 32) -> Path:
        path = root / "JPEGImages" / f"{image_id}.jpg"
        path.write_bytes(jpeg_bytes(_random_image(rng, h, w)))
        return path

    def xml(image_id: str, text: str) -> Path:
        path = root / "Annotations" / f"{image_id}.xml"
        path.write_text(text)
        return path

    def mask(image_id: str, array: np.ndarray, mode: str) -> Path:
        path = root / "SegmentationClass" / f"{image_id}.png"
        path.write_bytes(png_bytes(array, mode))
        return path

    bad = {}
    truncated = root / "JPEGImages" / "bad_truncated.jpg"
    whole = jpeg_bytes(_random_image(rng, 64, 64))
    truncated.write_bytes(whole[: len(whole) // 2])
    xml("bad_truncated", _voc_xml(["dog"]))
    bad["bad_truncated"] = (str(truncated), "corrupt or truncated image")

    xml("bad_missing_image", _voc_xml(["dog"]))
    bad["bad_missing_image"] = (str(root / "JPEGImages" / "bad_missing_image.jpg"), "image file missing")

    image("bad_mask_size", 32, 32)
    xml("bad_mask_size", _voc_xml(["dog"]))
    path = mask("bad_mask_size", np.zeros((30, 32), np.uint8), "P")
    bad["bad_mask_size"] = (str(path), "differs from its image")

    image("bad_unknown_class")
    path = xml("bad_unknown_class", _voc_xml(["dog", "unicorn"]))
    bad["bad_unknown_class"] = (str(path), "unknown class name 'unicorn'")

    image("bad_xml")
    path = xml("bad_xml", "<annotation><object><name>dog</name></object>")
    bad["bad_xml"] = (str(path), "malformed XML")

    image("bad_rgb_mask")
    xml("bad_rgb_mask", _voc_xml(["dog"]))
    path = mask("bad_rgb_mask", np.zeros((32, 32, 3), np.uint8), "RGB")
    bad["bad_rgb_mask"] = (str(path), "mode RGB")

    path = image("bad_no_labels")
    bad["bad_no_labels"] = (str(root / "Annotations" / "bad_no_labels.xml"), "no labels")
    return bad

