"""The COCO adapter against the real 160-image coco-mini fixture."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fixtures_data import coco_mini_dir
from PIL import Image

from ray_wsss.core import codec
from ray_wsss.core.data.coco import CocoSource
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.schema import SAMPLES

COCO = coco_mini_dir()
ANNOTATIONS = COCO / "instances_train2017_subset.json"


@pytest.fixture(scope="module")
def source() -> CocoSource:
    return CocoSource(str(ANNOTATIONS))


@pytest.fixture(scope="module")
def rows(source) -> dict[int, dict]:
    return {i: source.sample(i, (COCO / "images" / source.file_name(i)).read_bytes(), "train")
            for i in source.image_ids()}


def _rewritten_source(tmp_path, edit) -> CocoSource:
    dataset = json.loads(ANNOTATIONS.read_text())
    edit(dataset)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return CocoSource(str(path))


def test_category_mapping_is_sorted(source):
    cats = json.loads(ANNOTATIONS.read_text())["categories"]
    assert len(cats) == 80
    assert source.category_ids == sorted(c["id"] for c in cats)
    names = {c["id"]: c["name"] for c in cats}
    assert source.class_names() == ["background", *(names[c] for c in sorted(names))]
    assert source.class_names()[1] == "person" and source.class_names()[80] == "toothbrush"


def test_every_image_becomes_a_sample(source, rows):
    images = {i["id"]: i for i in json.loads(ANNOTATIONS.read_text())["images"]}
    assert len(rows) == len(images) == 160
    for image_id, row in rows.items():
        info = images[image_id]
        assert set(row) == set(SAMPLES.names)
        assert row["image_id"] == info["file_name"].rsplit(".", 1)[0]
        assert row["image"] == (COCO / "images" / info["file_name"]).read_bytes()
        assert (row["height"], row["width"]) == (info["height"], info["width"])
    assert len({r["image_id"] for r in rows.values()}) == 160


def test_labels_are_the_mapped_annotation_categories(source, rows):
    dataset = json.loads(ANNOTATIONS.read_text())
    to_class = {cat: idx + 1 for idx, cat in enumerate(sorted(c["id"] for c in dataset["categories"]))}
    expected: dict[int, set[int]] = {i["id"]: set() for i in dataset["images"]}
    for ann in dataset["annotations"]:
        expected[ann["image_id"]].add(to_class[ann["category_id"]])
    for image_id, row in rows.items():
        assert row["labels"] == sorted(expected[image_id])
    assert np.mean([len(r["labels"]) for r in rows.values()]) > 1.5  # a multi-label set


def test_semantic_mask_follows_ann_to_mask(source, rows):
    """Each class pixel lies in an instance of that class; each instance shows where nothing
    painted after it (smaller, or same area with a higher id) covers it; crowd-only pixels are 255."""
    coco = source.coco
    crowd_images = overlaps = 0
    for image_id, row in rows.items():
        mask = codec.decode_mask(row["gt_mask"])
        anns = coco.imgToAnns[image_id]
        instances = [(ann, coco.annToMask(ann).astype(bool)) for ann in anns]
        things = [(a, m) for a, m in instances if not a["iscrowd"]]
        crowd = np.zeros(mask.shape, bool)
        covered = np.zeros(mask.shape, bool)
        for a, m in instances:
            if a["iscrowd"]:
                crowd |= m
            else:
                covered |= m
        class_of = {a["id"]: source.category_ids.index(a["category_id"]) + 1 for a in anns}

        for class_id in set(np.unique(mask).tolist()) - {0, 255}:
            union = np.zeros(mask.shape, bool)
            for a, m in things:
                if class_of[a["id"]] == class_id:
                    union |= m
            assert not ((mask == class_id) & ~union).any(), (image_id, class_id)
        order = sorted(things, key=lambda am: (-int(am[1].sum()), am[0]["id"]))
        above = np.zeros(mask.shape, bool)  # union of the instances painted after this one
        for ann, m in reversed(order):
            overlaps += int((m & above).any())
            assert (mask[m & ~above] == class_of[ann["id"]]).all(), (image_id, ann["id"])
            above |= m
        np.testing.assert_array_equal(mask == 255, crowd & ~covered)
        np.testing.assert_array_equal(mask == 0, ~crowd & ~covered)
        crowd_images += int(crowd.any())
    assert crowd_images > 0 and overlaps > 0  # both rules were exercised


def test_orphan_annotations_are_reported(source, tmp_path):
    assert source.orphan_annotations() == []
    orphan = {"id": 987654321, "image_id": 999999999, "category_id": 1, "iscrowd": 0,
              "segmentation": [[0, 0, 10, 0, 10, 10]], "area": 50.0, "bbox": [0, 0, 10, 10]}
    edited = _rewritten_source(tmp_path, lambda d: d["annotations"].append(orphan))
    assert edited.orphan_annotations() == [orphan]
    assert 999999999 not in edited.image_ids()


def test_image_without_annotations(source, tmp_path):
    first = source.image_ids()[0]
    info = dict(source.coco.imgs[first], id=424242)
    edited = _rewritten_source(tmp_path, lambda d: d["images"].append(info))
    row = edited.sample(424242, (COCO / "images" / info["file_name"]).read_bytes(), "val")
    assert row["labels"] == [] and row["split"] == "val"
    assert not codec.decode_mask(row["gt_mask"]).any()


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs(source, mode):
    image_id = source.image_ids()[0]
    with Image.open(COCO / "images" / source.file_name(image_id)) as img:
        buf = io.BytesIO()
        img.convert(mode).save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    row = source.sample(image_id, data, "train")
    assert row["image"] == data  # stored as is
    rgb = codec.decode_image(row["image"])
    assert rgb.shape == (row["height"], row["width"], 3)
    assert row["labels"]


def test_bad_images_raise_record_errors(source):
    image_id = source.image_ids()[0]
    name = source.file_name(image_id)
    data = (COCO / "images" / name).read_bytes()
    with pytest.raises(RecordError, match=f"corrupt or truncated image {name}") as info:
        source.sample(image_id, data[: len(data) // 2], "train")
    assert info.value.image_id == name.rsplit(".", 1)[0]
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.resize((img.width // 2, img.height // 2)).save(buf, format="JPEG")
    with pytest.raises(RecordError, match=f"image {name} is .* but .* says"):
        source.sample(image_id, buf.getvalue(), "train")
    with pytest.raises(RecordError, match="image id 1 is not in"):
        source.sample(1, data, "train")


def test_unknown_category_is_a_record_error(source, tmp_path):
    image_id = source.image_ids()[0]

    def edit(dataset):
        next(a for a in dataset["annotations"] if a["image_id"] == image_id)["category_id"] = 12345

    edited = _rewritten_source(tmp_path, edit)
    data = (COCO / "images" / edited.file_name(image_id)).read_bytes()
    with pytest.raises(RecordError, match="unknown category_id 12345"):
        edited.sample(image_id, data, "train")


def test_bad_annotation_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(WsssError, match=f"cannot parse COCO annotations {broken}"):
        CocoSource(str(broken))
    no_ids = tmp_path / "no_ids.json"
    no_ids.write_text(json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": [], "categories": []}))
    with pytest.raises(WsssError, match=f"{no_ids} are malformed"):
        CocoSource(str(no_ids))
    no_ids.write_text(json.dumps({"images": []}))
    with pytest.raises(WsssError, match="lack the keys"):
        CocoSource(str(no_ids))


def test_listed_ids_are_the_row_ids_with_folders(tmp_path):
    """Resume skips listed ids that are staged as rows, so the two must be made alike: with a folder
    in file_name, the listing once said "train2017/000000000790" and the row "000000000790"."""
    dataset = json.loads(ANNOTATIONS.read_text())
    dataset["images"] = dataset["images"][:3]
    kept = {info["id"] for info in dataset["images"]}
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in kept]
    for info in dataset["images"]:
        info["file_name"] = f"train2017/{info['file_name']}"
        (tmp_path / "train2017").mkdir(exist_ok=True)
        (tmp_path / info["file_name"]).write_bytes((COCO / "images" / info["file_name"].split("/")[1]).read_bytes())
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    source = CocoSource(str(path))
    images, errors = source.list_images()
    assert errors == [] and len(images) == 3
    for coco_id, image_id, file_name in images:
        row = source.sample(coco_id, (tmp_path / file_name).read_bytes(), "train")
        assert row["image_id"] == image_id == file_name.split("/")[1].rsplit(".", 1)[0]
