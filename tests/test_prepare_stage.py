"""The prepare stage end to end on Ray Data: VOC (local and S3), COCO-mini, synthetic, bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from fixtures_data import make_voc_tree

from ray_wsss.core import codec, commit, storage
from ray_wsss.core.errors import TooManyErrorsError, WsssError
from ray_wsss.stages.prepare_data import PrepareConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")


def _rows(out):
    return {r["image_id"]: r for r in commit.read_table(out, "samples").to_pylist()}


def _errors(out):
    return {r["image_id"]: r for r in commit.read_table(out, "errors").to_pylist()}


def _check_voc_rows(rows, tree):
    assert sorted(rows) == sorted(tree["ids"])
    for image_id in tree["ids"]:
        row = rows[image_id]
        assert row["image"] == tree["images"][image_id]          # stored as is
        assert (row["height"], row["width"]) == tree["sizes"][image_id]
        assert row["labels"] == tree["labels"][image_id]          # XML names, else the mask
        if tree["masks"][image_id] is None:
            assert row["gt_mask"] is None
        else:
            assert np.array_equal(codec.decode_mask(row["gt_mask"]), tree["masks"][image_id])  # 255 kept
            assert row["gt_mask"] == tree["mask_bytes"][image_id]


def test_voc_to_local_with_bad_records(tmp_path):
    tree = make_voc_tree(tmp_path / "VOC2012", split="train", bad_records=True)
    out = str(tmp_path / "prepared")
    summary = run(PrepareConfig(out=out, format="voc", src=tree["root"], split="train"))
    _check_voc_rows(_rows(out), tree)
    errors = _errors(out)
    assert sorted(errors) == sorted(tree["bad"])                  # nothing dropped silently
    for image_id, (path, fragment) in tree["bad"].items():
        assert fragment in errors[image_id]["error"], (image_id, errors[image_id]["error"])
        assert path in errors[image_id]["error"], (image_id, errors[image_id]["error"])
        assert errors[image_id]["stage"] == "prepare"
    assert summary["rows"] == len(tree["ids"]) and summary["errors"] == len(tree["bad"])
    meta = storage.read_json(storage.join(out, "dataset.json"))
    assert meta["num_classes"] == 21 and meta["class_names"][0] == "background"
    assert meta["counts"]["errors"] == len(tree["bad"])


def test_max_errors_fails_the_job_and_commits_nothing(tmp_path):
    tree = make_voc_tree(tmp_path / "VOC2012", split="train", bad_records=True)
    out = str(tmp_path / "prepared")
    with pytest.raises(TooManyErrorsError, match=f"{len(tree['bad'])} records failed, more than --max-errors 2"):
        run(PrepareConfig(out=out, format="voc", src=tree["root"], split="train", max_errors=2))
    assert not commit.is_committed(out)


def test_voc_from_and_to_s3(tmp_path, s3_bucket):
    import s3fs

    tree = make_voc_tree(tmp_path / "VOC2012", split="train_aug")
    src = s3_bucket + "/VOCdevkit/VOC2012"
    s3fs.S3FileSystem(skip_instance_cache=True).put(tree["root"] + "/", src[len("s3://"):], recursive=True)
    out = s3_bucket + "/prepared/voc"
    run(PrepareConfig(out=out, format="voc", src=src, split="train_aug"))
    _check_voc_rows(_rows(out), tree)
    assert commit.read_table(out, "errors").num_rows == 0


def test_source_level_errors_name_the_problem(tmp_path, s3_endpoint):
    tree = make_voc_tree(tmp_path / "VOC2012", split="train")
    with pytest.raises(WsssError, match=r"val.txt"):
        run(PrepareConfig(out=str(tmp_path / "a"), format="voc", src=tree["root"], split="val"))
    (tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n")
    with pytest.raises(WsssError, match="empty"):
        run(PrepareConfig(out=str(tmp_path / "b"), format="voc", src=tree["root"], split="empty"))
    with pytest.raises(WsssError, match="s3://no-such-bucket-zz"):
        run(PrepareConfig(out=str(tmp_path / "c"), format="voc", src="s3://no-such-bucket-zz/VOC2012", split="train"))


def test_coco_mini_all_images_and_orphans(tmp_path):
    from conftest import COCO_MINI

    assert COCO_MINI.is_dir(), f"COCO fixture missing at {COCO_MINI}"
    dataset = json.loads((COCO_MINI / "instances_train2017_subset.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(COCO_MINI / "images", images)
    missing = dataset["images"][0]
    (images / missing["file_name"]).unlink()                      # listed, but the file is gone
    dataset["annotations"].append({**dataset["annotations"][0], "id": 99_999_999, "image_id": 123})  # no such image
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))

    out = str(tmp_path / "coco")
    summary = run(PrepareConfig(out=out, format="coco", src=str(images), annotations=str(annotations), split="train"))
    rows, errors = _rows(out), _errors(out)
    assert summary["rows"] == 159 and len(rows) == 159
    assert missing["file_name"].rsplit(".", 1)[0] in errors
    assert "image file" in errors[missing["file_name"].rsplit(".", 1)[0]]["error"]
    assert "123" in errors and "not in the annotations' images list" in errors["123"]["error"]

    to_class = {c: i + 1 for i, c in enumerate(sorted(c["id"] for c in dataset["categories"]))}
    expected: dict[str, set] = {}
    stems = {im["id"]: im["file_name"].rsplit(".", 1)[0] for im in dataset["images"]}
    for ann in dataset["annotations"]:
        if ann["image_id"] in stems:
            expected.setdefault(stems[ann["image_id"]], set()).add(to_class[ann["category_id"]])
    for image_id, row in rows.items():
        assert row["labels"] == sorted(expected.get(image_id, set())), image_id
        assert codec.decode_mask(row["gt_mask"]).shape == (row["height"], row["width"])
    meta = storage.read_json(storage.join(out, "dataset.json"))
    assert meta["num_classes"] == 81


def test_synthetic_rerun_is_skipped_and_resume_finishes_missing(tmp_path):
    out = str(tmp_path / "syn")
    cfg = PrepareConfig(out=out, num_train=12, num_val=4, batch_size=4, rows_per_file=5)
    first = run(cfg)
    assert first["by_split"] == {"train": 12, "val": 4} and not first["skipped"]
    assert commit.file_splits(out, "samples") == {"train-00000.parquet": "train", "train-00001.parquet": "train",
                                                  "train-00002.parquet": "train", "val-00000.parquet": "val"}
    assert run(cfg)["skipped"]

    # A crash after one file was staged (and one was cut short): the rerun makes only what is missing.
    other = str(tmp_path / "crashed")
    staged = storage.join(commit.staging_uri(other, "samples"), "train-00001.parquet")
    storage.write_bytes(staged, storage.read_bytes(storage.join(out, "samples", "train-00001.parquet")))
    storage.write_bytes(storage.join(commit.staging_uri(other, "samples"), "train-00002.parquet"), b"PAR1 cut short")
    before = os.path.getmtime(staged)
    resumed = run(PrepareConfig(out=other, num_train=12, num_val=4, batch_size=4, rows_per_file=5))
    ids = commit.read_table(other, "samples").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 16 and resumed["rows"] == 16
    assert os.path.getmtime(storage.join(other, "samples", "train-00001.parquet")) == before  # not redone

    # Staged files of a run planned differently are never mixed in.
    third = str(tmp_path / "replanned")
    storage.write_bytes(storage.join(commit.staging_uri(third, "samples"), "train-00001.parquet"),
                        storage.read_bytes(storage.join(out, "samples", "train-00001.parquet")))
    with pytest.raises(WsssError, match="planned differently"):
        run(PrepareConfig(out=third, num_train=12, num_val=4, rows_per_file=12))


def test_coco_resume_with_folders_in_file_names_writes_each_image_once(tmp_path):
    """A resumed run skips what the crashed one staged: listing ids and row ids must agree when
    file_name has a folder (they did not, and every row was written a second time)."""
    from conftest import COCO_MINI

    dataset = json.loads((COCO_MINI / "instances_train2017_subset.json").read_text())
    dataset["images"] = dataset["images"][:6]
    kept = {image["id"] for image in dataset["images"]}
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in kept]
    (tmp_path / "images" / "train2017").mkdir(parents=True)
    for image in dataset["images"]:
        shutil.copy(COCO_MINI / "images" / image["file_name"], tmp_path / "images" / "train2017")
        image["file_name"] = "train2017/" + image["file_name"]
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))
    cfg = dict(format="coco", src=str(tmp_path / "images"), annotations=str(annotations), split="train", batch_size=2,
               rows_per_file=4)

    full = str(tmp_path / "full")
    run(PrepareConfig(out=full, **cfg))
    crashed = str(tmp_path / "crashed")  # it had staged the first of the two files
    storage.write_bytes(storage.join(commit.staging_uri(crashed, "samples"), "train-00000.parquet"),
                        storage.read_bytes(storage.join(full, "samples", "train-00000.parquet")))
    resumed = run(PrepareConfig(out=crashed, **cfg))
    ids = commit.read_table(crashed, "samples").column("image_id").to_pylist()
    assert resumed["rows"] == 6 and sorted(ids) == sorted(set(ids)) == sorted(_rows(full))
