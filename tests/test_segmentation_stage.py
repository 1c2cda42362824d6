"""The segmentation stage: DeepLab on Ray Train V2 (DDP on CPU) from a masks table, then batch inference."""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_train import NUM_TRAIN, NUM_VAL, read_metrics, tiny_data
from PIL import Image

from ray_wsss.core import checkpoints, codec, commit, schema, storage
from ray_wsss.core.data.seg_augment import SegmentationTransform
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.models.deeplab import DeepLabConfig, create_deeplab
from ray_wsss.core.refine.crf import CRFConfig
from ray_wsss.harness import training
from ray_wsss.stages import segment, train_deeplab
from ray_wsss.stages.evaluate import EvaluateConfig
from ray_wsss.stages.evaluate import run as evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# resnet18 on 48 px crops, batches of 4: Ray's start-up dominates a step.
TINY = dict(backbone="resnet18", crop=48, batch_size=4, epochs=1, max_failures=0)


@pytest.fixture(scope="module")
def train_data(ray_local, tmp_path_factory) -> str:
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def masks_table(train_data, tmp_path_factory) -> str:
    """A committed masks table over the train split: the ground truth with its top rows set to ignore.

    One masks file per samples file of the split, of the same name and order, as make_masks writes them.
    """
    out = str(tmp_path_factory.mktemp("masks"))
    splits = {name: split for name, split in commit.file_splits(train_data, "samples").items() if split == "train"}
    for name in splits:
        rows = []
        for sample in pq.read_table(storage.join(train_data, "samples", name)).to_pylist():
            mask = codec.decode_mask(sample["gt_mask"]).copy()
            mask[:4] = schema.IGNORE_INDEX
            rows.append({"image_id": sample["image_id"], "height": mask.shape[0], "width": mask.shape[1],
                         "mask": codec.encode_mask(mask)})
        commit.write_staged_table(out, "masks", pa.Table.from_pylist(rows, schema=schema.MASKS), name=name)
    commit.write_staged_table(out, "errors", schema.ERRORS.empty_table())
    commit.commit_stage(out, ["masks", "errors"], {"table": "masks"}, file_splits=splits)
    return out


@pytest.fixture(scope="module")
def deeplab_run(train_data, masks_table, tmp_path_factory):
    """Two DDP workers (gloo) of half a CPU each, one epoch on the joined masks table."""
    out = str(tmp_path_factory.mktemp("deeplab"))
    cfg = train_deeplab.TrainDeepLabConfig(masks=masks_table, data=train_data, out=out, num_workers=2,
                                       cpus_per_worker=0.5, name="ddp", **TINY)
    return cfg, train_deeplab.run(cfg)


@pytest.fixture(scope="module")
def segment_run(deeplab_run, train_data, tmp_path_factory):
    train_cfg, _ = deeplab_run
    out = str(tmp_path_factory.mktemp("segment"))
    cfg = segment.SegmentConfig(checkpoint=train_cfg.out, data=train_data, out=out, split="val",
                                scales=(0.75, 1.0), flip=True, crf=True, batch_size=4, num_actors=1)
    return cfg, segment.run(cfg)


# ---------------------------------------------------------------- augmentation and inference units

def _two_tone(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Black left, white right; the mask says class 1 exactly where the image is white."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, width // 2:] = 255
    mask = (rgb[..., 0] > 0).astype(np.uint8)
    return rgb, mask


def test_transform_pads_crops_and_flips_image_and_mask_together():
    rgb, mask = _two_tone(30, 70)
    transform = SegmentationTransform(48, num_classes=2, scale_range=(1.0, 1.0))
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(8):
        image, target = transform.augment(rgb, mask, rng)
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert target.shape == (48, 48) and target.dtype == torch.int64
        # Height 30 < 48: rows 30.. are padding, ignored in the mask and the mean (0) in the image.
        assert (target[30:] == schema.IGNORE_INDEX).all() and (image[:, 30:] == 0).all()
        labelled = target[:30]
        assert set(labelled.unique().tolist()) <= {0, 1}
        np.testing.assert_array_equal((image[0, :30] > 0).numpy(), (labelled == 1).numpy())
        flips.add(bool(labelled[0, 0] == 1))  # white (class 1) on the left only when flipped
    assert flips == {True, False}


def test_transform_batch_and_bad_records():
    rgb, mask = _two_tone(64, 90)
    transform = SegmentationTransform(48, num_classes=2)
    batch = {"image_id": np.array(["a", "b"], object),
             "image": np.array([codec.encode_png_image(rgb)] * 2, object),
             "mask": np.array([codec.encode_mask(mask)] * 2, object)}
    out = transform(batch)
    assert out["image"].shape == (2, 3, 48, 48) and out["mask"].shape == (2, 48, 48)
    assert set(np.unique(out["mask"]).tolist()) <= {0, 1, schema.IGNORE_INDEX}

    with pytest.raises(RecordError, match=r"^b: mask is 64x89 but the image is 64x90"):
        transform({**batch, "mask": np.array([codec.encode_mask(mask), codec.encode_mask(mask[:, :89])], object)})
    bad = mask.copy()
    bad[0, 0] = 7
    with pytest.raises(RecordError, match=r"^a: mask has class ids \[7\] outside 0..1"):
        transform({**batch, "mask": np.array([codec.encode_mask(bad)] * 2, object)})


def test_segment_image_keeps_a_non_square_image_size():
    torch.manual_seed(0)
    model = create_deeplab(DeepLabConfig(backbone="resnet18"), num_classes=3).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    plain = segment.segment_image(model, rgb)
    fused = segment.segment_image(model, rgb, scales=(0.5, 1.0, 1.5), flip=True, crf=CRFConfig(iterations=3))
    for mask in (plain, fused):
        assert mask.shape == (37, 53) and mask.dtype == np.uint8
        assert mask.max() < 3


def test_segmenter_refuses_a_classifier_checkpoint(tmp_path):
    checkpoints.write_checkpoint_dir(str(tmp_path), {"w": torch.zeros(1)},
                                     {"method": "acr", "class_names": ["background", "a"], "model_config": {}})
    with pytest.raises(WsssError, match="holds a 'acr' checkpoint, not a DeepLab one"):
        checkpoints.load_segmenter(str(tmp_path), None, torch.device("cpu"))


def test_job_flags_fill_the_configs():
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    cli = importlib.import_module("_cli")
    train = cli.parse_config(train_deeplab.TrainDeepLabConfig, "", [
        "--gt-masks", "--data", "d", "--out", "o", "--backbone", "resnet101", "--crop", "321",
        "--scale-range", "0.75", "1.25", "--val-split", "", "--no-freeze-bn", "--num-workers", "4", "--use-gpu"])
    assert (train.gt_masks, train.masks, train.backbone, train.crop, train.scale_range) == (
        True, None, "resnet101", 321, (0.75, 1.25))
    assert train.val_split == "" and train.freeze_bn is False and train.num_workers == 4 and train.use_gpu
    assert train_deeplab.TrainDeepLabConfig(backbone_weights="w.pth").frozen_bn()
    assert not train_deeplab.TrainDeepLabConfig().frozen_bn()
    seg = cli.parse_config(segment.SegmentConfig, "", [
        "--checkpoint", "c", "--data", "d", "--out", "o", "--scales", "0.5", "1.0", "1.5", "--no-flip", "--crf",
        "--split", "train,val"])
    assert (seg.scales, seg.flip, seg.crf.enabled, seg.split) == ((0.5, 1.0, 1.5), False, True, "train,val")
    assert seg.crf_config().bilateral_sxy == 67.0 and segment.SegmentConfig().crf_config() is None


# ---------------------------------------------------------------- training records

@pytest.mark.slow
def test_training_records_count_the_join_or_use_the_ground_truth(train_data, masks_table, tmp_path):
    from_masks = train_deeplab.TrainDeepLabConfig(masks=masks_table, data=train_data, out=str(tmp_path))
    from_gt = train_deeplab.TrainDeepLabConfig(gt_masks=True, data=train_data, out=str(tmp_path))
    assert train_deeplab.count_training_rows(from_masks) == NUM_TRAIN
    assert train_deeplab.count_training_rows(from_gt) == NUM_TRAIN
    other_split = train_deeplab.TrainDeepLabConfig(masks=masks_table, data=train_data, out=str(tmp_path),
                                                   train_split="val")
    assert train_deeplab.count_training_rows(other_split) == 0  # the masks cover train only

    # The file-by-file pairing runs in the DDP test below; the ground-truth path is a plain column rename.
    samples = {r["image_id"]: r for r in commit.read_table(train_data, "samples").to_pylist() if r["split"] == "train"}
    rows = train_deeplab.training_records(from_gt).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(samples)
    for row in rows:
        assert row["image"] == samples[row["image_id"]]["image"] and row["mask"] == samples[row["image_id"]]["gt_mask"]

    with pytest.raises(ValueError, match=r"--masks URI .* is required unless --gt-masks"):
        train_deeplab.run(train_deeplab.TrainDeepLabConfig(data=train_data, out=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="0 images of split 'val' have a mask in"):
        train_deeplab.run(other_split)


# ---------------------------------------------------------------- Ray Train and the segment stage

@pytest.mark.slow
def test_two_worker_ddp_training_on_the_masks_table(deeplab_run, masks_table):
    cfg, summary = deeplab_run
    assert summary["stage"] == "deeplab" and summary["epochs"] == 1 and summary["masks"] == masks_table
    assert summary["train_images"] == NUM_TRAIN
    assert set(summary["losses"]) == {"ce", "total"} and summary["losses"]["total"] == summary["losses"]["ce"]
    assert math.isfinite(summary["losses"]["ce"]) and summary["losses"]["ce"] > 0
    assert 0.0 <= summary["val"]["miou"] <= 1.0 and 0.0 <= summary["val"]["pixel_acc"] <= 1.0

    rows = read_metrics(cfg.out)
    assert [row["epoch"] for row in rows] == [1]
    # Each rank reads half of the joined rows: every train image found its mask.
    assert rows[0]["train_batches"] == NUM_TRAIN // 2 // cfg.batch_size
    # The poly schedule ran every step: lr = base * (1 - steps/total)^0.9 with steps == total here.
    assert rows[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    ckpt = summary["checkpoint"]
    assert ckpt.startswith(os.path.join(cfg.out, cfg.name) + os.sep) and training.find_checkpoint(cfg.out) == ckpt
    meta = json.loads((Path(ckpt) / checkpoints.META_FILE).read_text())
    assert meta["method"] == "deeplab" and meta["epoch"] == 1 and meta["model_config"]["backbone"] == "resnet18"
    state = torch.load(Path(ckpt) / checkpoints.TRAIN_STATE_FILE, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert all(g["momentum"] == cfg.momentum and g["weight_decay"] == cfg.weight_decay for g in groups)
    assert [g["initial_lr"] for g in groups] == pytest.approx([cfg.lr, 10 * cfg.lr])
    assert (Path(cfg.out) / "learning_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((Path(cfg.out) / "summary.json").read_text()) == summary
    assert commit.is_committed(cfg.out)


@pytest.mark.slow
def test_segment_stage_writes_image_sized_masks_that_evaluate_scores(segment_run, train_data):
    cfg, summary = segment_run
    assert summary["stage"] == "segment" and summary["rows"] == NUM_VAL and summary["errors"] == 0
    assert summary["crf"] and summary["scales"] == [0.75, 1.0]

    samples = {r["image_id"]: r for r in commit.read_table(train_data, "samples").to_pylist() if r["split"] == "val"}
    rows = commit.read_table(cfg.out, "masks").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(samples)
    assert any(r["height"] != r["width"] for r in rows)  # the synthetic sides vary: non-square images
    for row in rows:
        sample = samples[row["image_id"]]
        assert (row["height"], row["width"]) == (sample["height"], sample["width"])
        mask = codec.decode_mask(row["mask"])
        assert mask.shape == (sample["height"], sample["width"])
        assert mask.max() < len(storage.read_json(storage.join(train_data, "dataset.json"))["class_names"])
    sheet = Image.open(io.BytesIO((Path(cfg.out) / "contact_sheet.png").read_bytes()))
    # one row per sample (at most 6), three panels across: image | prediction | ground truth
    rows_shown = min(6, NUM_VAL)
    assert abs(sheet.size[0] / sheet.size[1] - 3 / rows_shown) < 0.1, sheet.size

    scored = evaluate(EvaluateConfig(pred=cfg.out, data=train_data, kind="masks"))
    assert scored["images"] == NUM_VAL and scored["errors"] == 0
    assert 0.0 <= scored["miou"] <= 1.0

    again = segment.run(cfg)  # committed: left as it is
    assert again["skipped"] is True and again["rows"] == NUM_VAL
