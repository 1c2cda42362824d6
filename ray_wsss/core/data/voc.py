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
from ray_wsss.core.data import ids
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


# ImageSets/Main/<class>_<split>.txt lines carry a second column: 1 present, -1 absent, 0 difficult.
LABEL_COLUMN = ("-1", "0", "1")


def voc_id_problem(token: str) -> str | None:
    """Why a split-file token is not the image id of ``JPEGImages/<token>.jpg``, or None when it is."""
    try:
        if ids.image_id(f"JPEGImages/{token}.jpg") == token:
            return None
    except ids.UnsafeName:
        pass
    return ids.path_problem(token) or "is not a plain file name (VOC ids name a file in JPEGImages/, no folders)"


def list_voc_ids(root: str, split: str,
                 storage_options: StorageOptions | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """({image id: line number} in file order, error rows for the lines that hold no valid id).

    A line holds one id, optionally followed by the -1/0/1 label column of ``ImageSets/Main``
    files; an id cannot contain spaces, so any other line is reported with its number. A UTF-8
    byte-order mark (Windows editors write one) is dropped. An id repeated in the same file is the
    same image in the same split and is listed once. Raises when the file is missing, is not UTF-8
    text, or lists no valid id.
    """
    uri = split_file(root, split)
    if not storage.exists(uri, storage_options):
        raise WsssError(f"VOC split file not found: {uri} (is {root} a VOCdevkit/VOC20xx folder?)")
    data = storage.read_bytes(uri, storage_options)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise WsssError(f"VOC split file {uri} is not UTF-8 text (line {line}, byte {err.start}: "
                        f"{err.reason})") from err
    listed: dict[str, int] = {}
    errors: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and fields[1] not in LABEL_COLUMN):
            problem = (f"is not an image id: a line holds one id (ids have no spaces), optionally followed "
                       f"by a {'/'.join(LABEL_COLUMN)} label column")
        else:
            problem = voc_id_problem(fields[0])
        if problem:
            errors.append((line.strip(), f"{uri} line {number}: {line.strip()!r} {problem}; not read"))
        else:
            listed.setdefault(fields[0], number)
    if not listed:
        refused = f"; {len(errors)} lines refused, the first: {errors[0][1]}" if errors else ""
        raise WsssError(f"split {split} lists no images ({uri} holds no valid image id{refused})")
    return listed, errors


def list_splits(root: str, splits: list[str],
                storage_options: StorageOptions | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records {image_id, split} of every split, error rows). An id listed in two splits is an
    error row naming both places and is read in neither: one image must not train and score."""
    per_split = {split: list_voc_ids(root, split, storage_options) for split in splits}
    errors = [error for _, split_errors in per_split.values() for error in split_errors]
    twice = ids.duplicates((image, f"{split_file(root, split)} line {number}")
                           for split, (listed, _) in per_split.items() for image, number in listed.items())
    errors += [(image, f"listed in more than one split: {' and '.join(places)}; read in none, so that no "
                       f"image is in two splits") for image, places in twice.items()]
    records = [{"image_id": image, "split": split} for split, (listed, _) in per_split.items()
               for image in listed if image not in twice]
    return records, errors


def read_voc_sample(root: str, image_id: str, split: str,
                    storage_options: StorageOptions | None = None) -> dict:
    """One ``samples`` row; raises :class:`RecordError` naming the bad file and the problem.

    Labels come from the XML's object names, or from the mask where there is no XML. The mask is
    kept byte for byte (palette or grayscale PNG of class ids, 255 = ignore); no mask -> None.
    """
    problem = voc_id_problem(image_id)
    if problem:  # listing refuses these already; a direct caller must not read outside root either
        raise RecordError(image_id, f"{image_id!r} {problem}; not read")
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
