"""The VOCdevkit adapter: labels, byte-exact masks, and a clear error per kind of bad input."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import VOC_IDS, make_voc_tree, png_bytes

from ray_wsss.core import codec
from ray_wsss.core.data import voc
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.schema import SAMPLES


def test_class_order_is_the_standard_one():
    assert {name: idx + 1 for idx, name in enumerate(voc.VOC_CLASSES)} == VOC_IDS
    assert voc.class_names()[0] == "background" and len(voc.class_names()) == 21


def test_good_records_read_back_exactly(tmp_path):
    tree = make_voc_tree(tmp_path)
    listed, errors = voc.list_voc_ids(tree["root"], "train")
    assert list(listed) == tree["ids"] and errors == []
    assert list(listed.values()) == [1, 2, 3, 4]  # line numbers, for error messages
    for image_id in tree["ids"]:
        row = voc.read_voc_sample(tree["root"], image_id, "train")
        assert set(row) == set(SAMPLES.names)
        assert row["image_id"] == image_id and row["split"] == "train"
        assert row["image"] == tree["images"][image_id]  # stored as is, no re-encode
        assert (row["height"], row["width"]) == tree["sizes"][image_id]
        assert row["labels"] == tree["labels"][image_id], image_id
        expected = tree["masks"][image_id]
        if expected is None:
            assert row["gt_mask"] is None
            continue
        assert row["gt_mask"] == tree["mask_bytes"][image_id]
        decoded = codec.decode_mask(row["gt_mask"])
        np.testing.assert_array_equal(decoded, expected)
        assert 255 in decoded  # the void borders survive


def test_label_sources(tmp_path):
    tree = make_voc_tree(tmp_path)
    root = tree["root"]
    # XML wins over the mask: it names a person the mask does not show.
    assert voc.read_voc_sample(root, "2007_000039", "train")["labels"] == [VOC_IDS["car"], VOC_IDS["person"]]
    # No XML: the mask's ids, without background and 255.
    assert voc.read_voc_sample(root, "2007_000063", "train")["labels"] == [1, 20]
    # SegmentationClass/ is read before SegmentationClassAug/ (which holds a decoy of all 3s).
    mask = codec.decode_mask(voc.read_voc_sample(root, "2007_000032", "train")["gt_mask"])
    assert 3 not in mask and {12, 15} <= set(np.unique(mask).tolist())


def test_each_bad_record_names_its_file_and_problem(tmp_path):
    tree = make_voc_tree(tmp_path, bad_records=True)
    listed, _ = voc.list_voc_ids(tree["root"], "train")
    assert list(listed) == tree["ids"] + list(tree["bad"])
    for image_id, (path, fragment) in tree["bad"].items():
        with pytest.raises(RecordError) as info:
            voc.read_voc_sample(tree["root"], image_id, "train")
        assert info.value.image_id == image_id
        assert path in info.value.message, (image_id, info.value.message)
        assert fragment in info.value.message, (image_id, info.value.message)


def test_mask_ids_outside_voc_are_rejected(tmp_path):
    tree = make_voc_tree(tmp_path)
    h, w = tree["sizes"]["2007_000063"]
    bad = np.full((h, w), 42, np.uint8)
    path = tmp_path / "SegmentationClass" / "2007_000063.png"
    path.write_bytes(png_bytes(bad, "P"))
    with pytest.raises(RecordError, match="42"):
        voc.read_voc_sample(tree["root"], "2007_000063", "train")


def test_split_file_problems(tmp_path):
    tree = make_voc_tree(tmp_path)
    with pytest.raises(WsssError, match=r"train_aug.txt"):
        voc.list_voc_ids(tree["root"], "train_aug")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(WsssError, match="split val lists no images"):
        voc.list_voc_ids(tree["root"], "val")


@pytest.mark.parametrize("image_id", ["../outside", "/etc/passwd", "JPEGImages/2007_000032", "s3://b/x"])
def test_ids_outside_the_root_are_never_read(tmp_path, image_id):
    """The adapter itself refuses them (listing does too), before it reads anything."""
    tree = make_voc_tree(tmp_path / "VOC2012")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "JPEGImages" / "outside.jpg").write_bytes(tree["images"]["2007_000032"])
    with pytest.raises(RecordError, match="not read") as info:
        voc.read_voc_sample(tree["root"], image_id, "train")
    assert info.value.image_id == image_id
