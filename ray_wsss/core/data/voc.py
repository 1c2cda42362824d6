"""PASCAL VOC (VOCdevkit layout, local or s3://) -> ``samples`` rows.

Layout under ``root``::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png      class-id masks (palette or grayscale), 255 = ignore
    SegmentationClassAug/<id>.png   the SBD-augmented masks, consulted second
    Annotations/<id>.xml            object names -> image-level labels
    ImageSets/Segmentation/<split>.txt
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from ray_wsss.core import codec, storage
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.schema import IGNORE_INDEX
from ray_wsss.core.storage import StorageOptions

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
_CLASS_IDS = {name: idx + 1 for idx, name in enumerate(VOC_CLASSES)}
MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


def class_names() -> list[str]:
    return ["background", *VOC_CLASSES]


def split_file(root: str, split: str) -> str:
    return storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")


def list_voc_ids(root: str, split: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Image ids of ``split`` in file order, duplicates dropped."""
    uri = split_file(root, split)
    if not storage.exists(uri, storage_options):
        raise WsssError(f"VOC split file not found: {uri} (is {root} a VOCdevkit/VOC20xx folder?)")
    text = storage.read_bytes(uri, storage_options).decode("utf-8", errors="replace")
    # First token only: ImageSets/Main files carry a second column (-1/0/1).
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise WsssError(f"split {split} lists no images ({uri} is empty)")
    return list(dict.fromkeys(ids))


def read_voc_sample(root: str, image_id: str, split: str,
                    storage_options: StorageOptions | None = None) -> dict:
    """One ``samples`` row; raises :class:`RecordError` naming the bad file and the problem.

    Labels come from the XML's object names, or from the mask where there is no XML. The mask is
    kept byte for byte (palette or grayscale PNG of class ids, 255 = ignore); no mask -> None.
    """
    image_uri = storage.join(root, "JPEGImages", f"{image_id}.jpg")
    if not storage.exists(image_uri, storage_options):
        raise RecordError(image_id, f"image file missing: {image_uri} "
                                    f"(listed in {split_file(root, split)})")
    image = _read(image_id, image_uri, storage_options)
    try:
        height, width = codec.image_size(image)
    except Exception as err:
        raise RecordError(image_id, f"corrupt or truncated image {image_uri}: {err}") from err

    mask_bytes, mask_ids = _read_mask(root, image_id, (height, width), storage_options)
    labels = _xml_labels(root, image_id, storage_options)
    if not labels:
        if mask_ids is None:
            raise RecordError(image_id, f"no labels: {_xml_uri(root, image_id)} is missing or lists "
                                        f"no objects, and there is no mask in {' or '.join(MASK_DIRS)}")
        labels = [c for c in mask_ids if c not in (0, IGNORE_INDEX)]
    return {
        "image_id": image_id,
        "split": split,
        "image": image,
        "height": height,
        "width": width,
        "labels": sorted(set(labels)),
        "gt_mask": mask_bytes,
    }


def _read(image_id: str, uri: str, options: StorageOptions | None) -> bytes:
    try:
        return storage.read_bytes(uri, options)
    except WsssError as err:
        raise RecordError(image_id, str(err)) from err


def _xml_uri(root: str, image_id: str) -> str:
    return storage.join(root, "Annotations", f"{image_id}.xml")


def _xml_labels(root: str, image_id: str, options: StorageOptions | None) -> list[int]:
    """Class ids of all objects in the XML (difficult and truncated ones too); [] without XML."""
    uri = _xml_uri(root, image_id)
    if not storage.exists(uri, options):
        return []
    try:
        tree = ET.fromstring(_read(image_id, uri, options))
    except ET.ParseError as err:
        raise RecordError(image_id, f"malformed XML {uri}: {err}") from err
    labels = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise RecordError(image_id, f"malformed XML {uri}: an <object> has no <name>")
        if name not in _CLASS_IDS:
            raise RecordError(image_id, f"unknown class name {name!r} in {uri}")
        labels.append(_CLASS_IDS[name])
    return labels


def _read_mask(root: str, image_id: str, size: tuple[int, int],
               options: StorageOptions | None) -> tuple[bytes | None, list[int] | None]:
    """(PNG bytes as stored, sorted ids in it) of the first mask found, else (None, None)."""
    for folder in MASK_DIRS:
        uri = storage.join(root, folder, f"{image_id}.png")
        if storage.exists(uri, options):
            break
    else:
        return None, None
    data = _read(image_id, uri, options)
    try:
        mask = codec.decode_mask(data)
    except ValueError as err:  # RGB or other colour modes: colours are not class ids
        raise RecordError(image_id, f"mask {uri} is not a class-id mask: {err}") from err
    except Exception as err:
        raise RecordError(image_id, f"corrupt or truncated mask {uri}: {err}") from err
    if mask.shape != size:
        raise RecordError(image_id, f"mask {uri} size {mask.shape[1]}x{mask.shape[0]} differs from "
                                    f"its image's {size[1]}x{size[0]} (width x height)")
    ids = [int(c) for c in np.unique(mask)]
    bad = [c for c in ids if c > len(VOC_CLASSES) and c != IGNORE_INDEX]
    if bad:
        raise RecordError(image_id, f"mask {uri} holds ids {bad} outside 0..{len(VOC_CLASSES)} "
                                    f"and {IGNORE_INDEX}")
    return data, ids
