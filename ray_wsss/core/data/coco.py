"""MS COCO instance annotations -> ``samples`` rows, through pycocotools.

Category ids (1..90 with gaps in COCO) map to our ids 1..K in sorted order. The semantic mask is
painted from the instance masks (``COCO.annToMask``) by two rules:

* Overlaps: non-crowd instances are painted largest first (area = pixels of the decoded mask),
  so smaller objects lying on larger ones stay visible; equal areas paint in ascending
  annotation id, so the higher id ends on top.
* Crowd regions (``iscrowd=1``) become 255 (ignore), except where a non-crowd instance covers
  them: a crowd box says "many of these, outlines unknown", so it is neither background nor a
  trustworthy class region. A crowd annotation's category still counts among the image's labels.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
from pycocotools.coco import COCO

from ray_wsss.core import codec, storage
from ray_wsss.core.data import ids
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.schema import IGNORE_INDEX
from ray_wsss.core.storage import StorageOptions


class CocoSource:
    """One COCO annotations file (local or s3://) and the rows it describes."""

    def __init__(self, annotations_uri: str, storage_options: StorageOptions | None = None):
        self.uri = annotations_uri
        try:
            dataset = json.loads(storage.read_bytes(annotations_uri, storage_options))
        except json.JSONDecodeError as err:
            raise WsssError(f"cannot parse COCO annotations {annotations_uri}: {err}") from err
        if not isinstance(dataset, dict):
            raise WsssError(f"COCO annotations {annotations_uri} must hold a JSON object, not {type(dataset).__name__}")
        missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
        if missing:
            raise WsssError(f"COCO annotations {annotations_uri} lack the keys {missing}")
        self.coco = COCO()
        self.coco.dataset = dataset
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
                self.coco.createIndex()
        except (KeyError, TypeError) as err:
            raise WsssError(f"COCO annotations {annotations_uri} are malformed: missing or bad field {err}") from err
        self.category_ids: list[int] = sorted(self.coco.cats)
        self._class_of = {cat_id: idx + 1 for idx, cat_id in enumerate(self.category_ids)}

    def class_names(self) -> list[str]:
        return ["background", *(self.coco.cats[c]["name"] for c in self.category_ids)]

    def image_ids(self) -> list[int]:
        return sorted(self.coco.imgs)

    def file_name(self, image_id: int) -> str:
        """The image's file name as listed in the annotations (relative to the images folder)."""
        return self._image_info(image_id)["file_name"]

    def record_id(self, image_id: int) -> str:
        """Our ``image_id``: the file name's stem (:func:`ids.image_id`), e.g. "000000000790"."""
        try:
            return ids.image_id(self.file_name(image_id))
        except ids.UnsafeName as err:
            raise RecordError(str(image_id), f"COCO image id {image_id} in {self.uri}: file_name {err}") from None

    def list_images(self) -> tuple[list[tuple[int, str, str]], list[tuple[str, str]]]:
        """((COCO id, image id, file name) of each image that can be read, error rows for the rest).

        Read from the raw ``images`` list, not pycocotools' index, which keeps only the last of
        two entries with the same id. Refused, each with a row naming every entry involved: an
        entry without a usable ``file_name``, ``height`` or ``width``; a ``file_name`` outside the
        image folder; entries sharing an id (whose annotations cannot be told apart); entries whose
        file names share a stem (they would make one image id). Orphan annotations are rows too.
        """
        entries = self.coco.dataset["images"]
        id_counts = Counter(entry["id"] for entry in entries)
        reasons: dict[str, list[str]] = {}
        usable: list[tuple[int, str, str]] = []
        for entry in entries:
            coco_id, name = entry["id"], entry.get("file_name")
            problem = self._entry_problem(entry)
            if problem:
                reasons.setdefault(str(coco_id), []).append(f"COCO image id {coco_id} in {self.uri} {problem}")
                continue
            stem = ids.image_id(name)
            if id_counts[coco_id] > 1:
                names = ", ".join(repr(e.get("file_name")) for e in entries if e["id"] == coco_id)
                reasons.setdefault(stem, []).append(
                    f"COCO image id {coco_id} is listed {id_counts[coco_id]} times in {self.uri} (file names "
                    f"{names}): its annotations cannot be told apart, so none of them is read")
            usable.append((coco_id, stem, name))
        for stem, places in ids.duplicates((stem, f"{name!r} (COCO image id {coco_id})")
                                           for coco_id, stem, name in usable).items():
            reasons.setdefault(stem, []).append(
                f"image id {stem!r} is the file-name stem of {' and '.join(places)} in {self.uri}; "
                f"image ids must be unique, so none of them is read")
        images = [(coco_id, stem, name) for coco_id, stem, name in usable if stem not in reasons]
        errors = [(key, "; ".join(dict.fromkeys(why))) for key, why in reasons.items()]
        errors += [(str(ann["image_id"]), f"annotation {ann['id']} names image id {ann['image_id']}, which is "
                                          f"not in the annotations' images list") for ann in self.orphan_annotations()]
        return images, errors

    @staticmethod
    def _entry_problem(entry: dict) -> str | None:
        """What makes an ``images`` entry unreadable, or None."""
        if "file_name" not in entry:
            return "has no 'file_name'"
        try:
            ids.image_id(entry["file_name"])
        except ids.UnsafeName as err:
            return f"has a file_name that cannot be read: {err}"
        for field in ("height", "width"):
            value = entry.get(field)
            if field not in entry:
                return f"has no {field!r}"
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"has {field} {value!r}, not a positive integer"
        return None

    def orphan_annotations(self) -> list[dict]:
        """Annotations naming an image id absent from "images", in file order."""
        return [a for a in self.coco.dataset["annotations"] if a.get("image_id") not in self.coco.imgs]

    def sample(self, image_id: int, image_bytes: bytes, split: str) -> dict:
        """One ``samples`` row from the stored image bytes (kept as they are) and the annotations."""
        info = self._image_info(image_id)
        record = self.record_id(image_id)
        try:
            height, width = codec.image_size(image_bytes)
        except Exception as err:
            raise RecordError(record, f"corrupt or truncated image {info['file_name']}: {err}") from err
        if (height, width) != (info["height"], info["width"]):
            raise RecordError(record, f"image {info['file_name']} is {width}x{height} but {self.uri} "
                                      f"says {info['width']}x{info['height']} (width x height)")
        labels = {self._class_id(image_id, ann) for ann in self.coco.imgToAnns.get(image_id, [])}
        return {
            "image_id": record,
            "split": split,
            "image": image_bytes,
            "height": height,
            "width": width,
            "labels": sorted(labels),
            "gt_mask": codec.encode_mask(self.semantic_mask(image_id)),
        }

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """uint8 [H, W] class ids by the module's overlap and crowd rules."""
        info = self._image_info(image_id)
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        crowd = np.zeros_like(mask, dtype=bool)
        painted = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            instance = self._instance_mask(image_id, ann)
            if ann.get("iscrowd", 0):
                crowd |= instance
            else:
                painted.append((-int(instance.sum()), ann["id"], instance, self._class_id(image_id, ann)))
        covered = np.zeros_like(crowd)
        for _, _, instance, class_id in sorted(painted, key=lambda p: p[:2]):
            mask[instance] = class_id
            covered |= instance
        mask[crowd & ~covered] = IGNORE_INDEX
        return mask

    def _class_id(self, image_id: int, ann: dict) -> int:
        try:
            return self._class_of[ann["category_id"]]
        except KeyError:
            raise RecordError(self.record_id(image_id), f"annotation {ann.get('id')} in {self.uri} has "
                                                        f"unknown category_id {ann['category_id']}") from None

    def _instance_mask(self, image_id: int, ann: dict) -> np.ndarray:
        try:
            return self.coco.annToMask(ann).astype(bool)
        except Exception as err:
            raise RecordError(self.record_id(image_id),
                              f"annotation {ann.get('id')} in {self.uri} has a bad segmentation: {err}") from err

    def _image_info(self, image_id: int) -> dict:
        try:
            return self.coco.imgs[image_id]
        except KeyError:
            raise RecordError(str(image_id), f"image id {image_id} is not in {self.uri}") from None
