"""The PSA stages on a tiny run: affinity labels (batch stage), AffinityNet on Ray Train DDP, the random-walk
masks (batch stage, with resume), and the pipeline with ``masks: {method: psa}`` end to end.

The seeds are crafted from the ground truth (a blurred copy per labelled class), so no classifier is trained
for the stage tests; the pipeline test trains its own.
"""
from __future__ import annotations

import dataclasses
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
import torch.nn.functional as F
from PIL import Image

from ray_wsss.core import checkpoints, codec, commit, schema, storage
from ray_wsss.core.affinity_pairs import grid_size, pair_indices
from ray_wsss.core.data.affinity_augment import AffinityCropTransform, decode_labelled_image
from ray_wsss.core.errors import RecordError
from ray_wsss.core.models.affinitynet import AffinityNet
from ray_wsss.core.refine import psa
from ray_wsss.core.refine.crf import LabellingConfig
from ray_wsss.harness import training
from ray_wsss.stages import affinity_labels, make_masks, pipeline, train_affinity
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_TRAIN, NUM_VAL = 12, 6
# resnet18 at output stride 8 on 96 px crops (12 cells: radius 5 leaves a 4 x 8 window of first pixels).
TINY_AFFINITY = dict(backbone="resnet18", crop=96, batch_size=2, epochs=1, max_failures=0)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("psa") / "data")
    prepare(PrepareConfig(out=out, num_train=NUM_TRAIN, num_val=NUM_VAL, batch_size=6, rows_per_file=4))  # 3 + 2 files
    return out


def blurred_seeds(mask: np.ndarray, classes: list[int]) -> np.ndarray:
    """[k, H, W] in [0, 1]: each labelled class's ground-truth region, box-blurred over 9 px, min-max scaled."""
    maps = torch.from_numpy(np.stack([(mask == c) for c in classes]).astype(np.float32)) if classes else None
    if maps is None:
        return np.zeros((0, *mask.shape), np.float32)
    blurred = F.avg_pool2d(maps[None], 9, stride=1, padding=4, count_include_pad=False)[0]
    low = blurred.flatten(1).min(1).values[:, None, None]
    high = blurred.flatten(1).max(1).values[:, None, None]
    return ((blurred - low) / (high - low).clamp(min=1e-6)).numpy()


@pytest.fixture(scope="module")
def seeds(data, tmp_path_factory) -> str:
    """A committed seeds table co-partitioned with the samples (one file per samples file, same order)."""
    out = str(tmp_path_factory.mktemp("psa") / "seeds")
    splits = commit.file_splits(data, "samples")
    for name in splits:
        rows = []
        for sample in pq.read_table(storage.join(data, "samples", name)).to_pylist():
            classes = [int(c) for c in sample["labels"]]
            scores = blurred_seeds(codec.decode_mask(sample["gt_mask"]), classes)
            rows.append({"image_id": sample["image_id"], "height": sample["height"], "width": sample["width"],
                         "classes": classes, "scores": codec.encode_scores(scores)})
        commit.write_staged_table(out, "seeds", pa.Table.from_pylist(rows, schema=schema.SEEDS), name=name)
    commit.write_staged_table(out, "errors", schema.ERRORS.empty_table())
    meta = storage.read_json(storage.join(data, "dataset.json"))
    commit.commit_stage(out, ["seeds", "errors"], {"table": "seeds", "class_names": meta["class_names"],
                                                   "num_classes": meta["num_classes"], "resolution": "image"},
                        file_splits=splits)
    return out


@pytest.fixture(scope="module")
def labels_run(data, seeds, tmp_path_factory):
    cfg = affinity_labels.AffinityLabelsConfig(seeds=seeds, data=data, out=str(tmp_path_factory.mktemp("labels")),
                                               split="train", num_actors=1)
    return cfg, affinity_labels.run(cfg)


@pytest.fixture(scope="module")
def affinity_run(data, labels_run, tmp_path_factory):
    """Two DDP workers (gloo) of half a CPU each, one epoch."""
    labels_cfg, _ = labels_run
    cfg = train_affinity.TrainAffinityConfig(labels=labels_cfg.out, data=data, out=str(tmp_path_factory.mktemp("aff")),
                                             num_workers=2, cpus_per_worker=0.5, name="ddp", **TINY_AFFINITY)
    return cfg, train_affinity.run(cfg)


def _ids_in_order(out: str, table: str, name: str) -> list[str]:
    return pq.read_table(storage.join(out, table, name), columns=["image_id"])["image_id"].to_pylist()


# ---------------------------------------------------------------- units (no Ray)

def test_crop_cuts_image_and_labels_on_the_same_blocks_and_pads_with_ignore():
    """A 40 x 104 image (grid 5 x 13) whose block (r, c) has value 16 r + c in both image and labels."""
    grid = (16 * np.arange(5)[:, None] + np.arange(13)[None]).astype(np.uint8)
    rgb = np.repeat(np.repeat(grid, 8, 0), 8, 1)[..., None].repeat(3, 2)
    transform = AffinityCropTransform(64)  # 8 cells: taller than the image's 5 rows
    for seed in range(20):
        image, labels = transform.augment(rgb, grid, np.random.default_rng(seed))
        assert image.shape == (3, 64, 64) and labels.shape == (8, 8) and labels.dtype == torch.uint8
        assert (labels[5:] == schema.IGNORE_INDEX).all()  # the padded rows
        in_image = labels[:5].numpy()
        columns = in_image[0]  # row 0: the block's column
        assert (np.abs(np.diff(columns.astype(int))) == 1).all()  # whole consecutive columns, maybe flipped
        # the image's pixels carry the same block values as the labels (undo the normalisation on channel 0)
        red = (image[0] * 0.229 + 0.485) * 255
        block_values = red[:40].reshape(5, 8, 8, 8).mean((1, 3)).round().numpy()
        np.testing.assert_array_equal(block_values, in_image)
        assert (image[:, 40:] == 0).all()  # padded with the mean: 0 after normalisation


def test_crop_transform_refuses_labels_that_are_not_the_images_grid():
    rgb = np.zeros((20, 30, 3), np.uint8)
    good = codec.encode_mask(np.zeros(grid_size(20, 30), np.uint8))
    batch = AffinityCropTransform(16)({"image_id": ["a"], "image": [codec.encode_png_image(rgb)], "labels": [good]})
    assert batch["image"].shape == (1, 3, 16, 16) and batch["labels"].shape == (1, 2, 2)
    with pytest.raises(RecordError, match="stride-8 grid is 3x4"):
        decode_labelled_image("a", codec.encode_png_image(rgb), codec.encode_mask(np.zeros((2, 2), np.uint8)))
    with pytest.raises(RecordError, match="no affinity labels"):
        decode_labelled_image("a", codec.encode_png_image(rgb), None)
    with pytest.raises(ValueError, match="multiple of 8"):
        AffinityCropTransform(20)


def test_ground_truth_labels_keep_pure_blocks_only():
    mask = np.zeros((12, 20), np.uint8)   # grid 2 x 3; the last column's blocks hold 4 image columns
    mask[:8, 8:16] = 3                     # block (0, 1): pure 3
    mask[8:, 0:4] = 5                      # block (1, 0): half 5, half 0 -> mixed
    mask[0, 16] = schema.IGNORE_INDEX      # block (0, 2): an ignored pixel
    mask[8:, 16:] = 7                      # block (1, 2): pure 7 over its 4 x 4 in-image pixels
    expected = np.array([[0, 3, 255], [255, 0, 7]], np.uint8)
    np.testing.assert_array_equal(psa.labels_at_stride(mask), expected)


def test_pair_accuracy_counts_against_a_pair_loop():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 255], size=(7, 9)).astype(np.int64)
    first, second = pair_indices(7, 9, 3)
    affinity = torch.rand(second.shape, generator=torch.Generator().manual_seed(0))
    expected = np.zeros(4, np.int64)
    flat = labels.reshape(-1)
    for d in range(second.shape[0]):
        for m in range(second.shape[1]):
            a, b = flat[first[m]], flat[second[d, m]]
            if a == 255 or b == 255:
                continue
            close = affinity[d, m] > 0.5
            if a == b:
                expected[:2] += [int(close), 1]
            else:
                expected[2:] += [int(not close), 1]
    np.testing.assert_array_equal(psa.pair_accuracy_counts(affinity, torch.from_numpy(labels), 3), expected)


def test_walk_masks_are_the_argmax_of_the_walk_or_its_crf():
    """pseudo_mask with a walk: psa.infer_mask without the CRF; with it, a mask of the same classes."""
    torch.manual_seed(0)
    model = AffinityNet("resnet18").eval()
    image = np.random.default_rng(0).integers(0, 255, (72, 88, 3), dtype=np.uint8)
    mask = np.zeros((72, 88), np.uint8)
    mask[10:50, 20:70] = 4
    seeds = blurred_seeds(mask, [4])
    walk = make_masks.Walk(model, psa.PSAConfig(logt=4, infer_background="threshold", infer_threshold=0.3))
    plain = make_masks.pseudo_mask(image, seeds, [4], LabellingConfig(crf=False), walk)
    np.testing.assert_array_equal(plain, psa.infer_mask(image, seeds, [4], model, walk.cfg))
    refined = make_masks.pseudo_mask(image, seeds, [4], LabellingConfig(crf=True), walk)
    assert refined.shape == mask.shape and set(np.unique(refined)) <= {0, 4}
    no_class = make_masks.pseudo_mask(image, np.zeros((0, 72, 88), np.float32), [], LabellingConfig(), walk)
    assert (no_class == 0).all()


def test_masks_config_pairs_method_and_affinity():
    with pytest.raises(ValueError, match="needs --affinity"):
        make_masks.MakeMasksConfig(method="psa", threshold=0.3)
    with pytest.raises(ValueError, match="takes no --affinity"):
        make_masks.MakeMasksConfig(affinity="runs/x/affinity", threshold=0.3)
    walk = make_masks.MakeMasksConfig(method="psa+crf", affinity="a", background="power", power_alpha=16, psa_logt=6)
    assert walk.labelling(0.4).crf and not dataclasses.replace(walk, method="psa").labelling(0.4).crf
    cfg = walk.psa_config(0.4, radius=4)
    assert (cfg.radius, cfg.logt, cfg.infer_background) == (4, 6, "power")
    assert (cfg.infer_alpha, cfg.infer_threshold) == (16, 0.4)
    with pytest.raises(ValueError, match="holds no pair at radius 5"):
        train_affinity.TrainAffinityConfig(crop=64)
    with pytest.raises(ValueError, match="high_alpha"):
        affinity_labels.AffinityLabelsConfig(low_alpha=4, high_alpha=2)


# ---------------------------------------------------------------- the stages

@pytest.mark.slow
def test_affinity_labels_stage_writes_the_labels_of_each_image_at_stride_8(labels_run, data, seeds):
    cfg, summary = labels_run
    assert summary["rows"] == NUM_TRAIN and summary["errors"] == 0
    train_files = sorted(n for n, s in commit.file_splits(data, "samples").items() if s == "train")
    assert commit.table_file_names(cfg.out, "affinity_labels") == train_files
    seed_rows = {r["image_id"]: r for r in commit.read_table(seeds, "seeds").to_pylist()}
    samples = {r["image_id"]: r for r in commit.read_table(data, "samples").to_pylist()}
    for name in train_files:
        assert _ids_in_order(cfg.out, "affinity_labels", name) == _ids_in_order(data, "samples", name)
    seen = set()
    for row in commit.read_table(cfg.out, "affinity_labels").to_pylist():
        labels = codec.decode_mask(row["labels"])
        assert labels.shape == grid_size(row["height"], row["width"])
        seed = seed_rows[row["image_id"]]
        assert set(np.unique(labels)) <= {0, schema.IGNORE_INDEX, *seed["classes"]}
        expected = psa.affinity_labels(codec.decode_scores(seed["scores"]), seed["classes"], cfg.psa_config(),
                                       codec.decode_image(samples[row["image_id"]]["image"]))
        np.testing.assert_array_equal(labels, expected)
        seen |= set(np.unique(labels).tolist())
    assert {0, schema.IGNORE_INDEX} < seen  # background, ignored cells and some foreground class
    meta = storage.read_json(storage.join(cfg.out, "dataset.json"))
    assert meta["table"] == "affinity_labels" and meta["label_crf"]
    assert (meta["low_alpha"], meta["high_alpha"]) == (1, 12)
    assert (Path(cfg.out) / "contact_sheet.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_two_worker_ddp_training_of_affinitynet(affinity_run):
    cfg, summary = affinity_run
    assert summary["stage"] == "affinity" and summary["epochs"] == 1 and summary["train_images"] == NUM_TRAIN
    losses = summary["losses"]
    assert set(losses) == {"total", "bg_pos", "fg_pos", "neg"} and all(math.isfinite(v) for v in losses.values())
    # each term is averaged over all ranks and batches, and the total is a fixed mix of them
    assert losses["total"] == pytest.approx(losses["bg_pos"] / 4 + losses["fg_pos"] / 4 + losses["neg"] / 2)
    assert set(summary["val"]) == {"pos_acc", "neg_acc", "pair_acc"}
    assert all(0 <= v <= 1 for v in summary["val"].values())

    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
    assert rows[0]["train_batches"] == NUM_TRAIN // 2 // cfg.batch_size  # each rank gets half of the images
    assert rows[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the poly schedule ran to its end

    ckpt = summary["checkpoint"]
    assert ckpt.startswith(os.path.join(cfg.out, cfg.name) + os.sep) and training.find_checkpoint(cfg.out) == ckpt
    meta = json.loads((Path(ckpt) / checkpoints.META_FILE).read_text())
    assert meta["method"] == "affinitynet" and meta["epoch"] == 1
    assert meta["model_config"] == {"backbone": "resnet18", "radius": 5, "frozen_bn": False}
    state = torch.load(Path(ckpt) / checkpoints.TRAIN_STATE_FILE, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["backbone", "backbone_bias_norm", "head"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([cfg.lr, 2 * cfg.lr, 10 * cfg.lr])
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0, cfg.weight_decay]
    model, loaded = checkpoints.load_affinitynet(ckpt, None, torch.device("cpu"))
    assert not model.training and loaded["labels"] == cfg.labels
    assert (Path(cfg.out) / "learning_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert commit.is_committed(cfg.out)


@pytest.mark.slow
def test_random_walk_masks_resume_with_exact_ids(affinity_run, data, seeds, tmp_path):
    train_cfg, _ = affinity_run
    full_out = str(tmp_path / "full")
    walk = dict(seeds=seeds, data=data, split="train", threshold=0.3, method="psa", affinity=train_cfg.out,
                num_actors=1, psa_logt=5)
    full = make_masks.run(make_masks.MakeMasksConfig(out=full_out, **walk))
    assert full["rows"] == NUM_TRAIN and full["errors"] == 0 and full["method"] == "psa" and not full["crf"]
    masks = {r["image_id"]: r for r in commit.read_table(full_out, "masks").to_pylist()}
    for row in masks.values():
        assert codec.decode_mask(row["mask"]).shape == (row["height"], row["width"])
    meta = storage.read_json(storage.join(full_out, "dataset.json"))
    assert meta["method"] == "psa" and meta["affinity"] == training.find_checkpoint(train_cfg.out)
    sheet = Image.open(io.BytesIO((Path(full_out) / "contact_sheet.png").read_bytes()))
    # image | seeds | CRF mask | PSA mask | ground truth, one row per image (6 shown)
    assert abs(sheet.size[0] / sheet.size[1] - 5 / 6) < 0.1, sheet.size

    # A crashed run left one file staged and a truncated one: the rerun completes it, each image once.
    partial = str(tmp_path / "partial")
    names = commit.table_file_names(full_out, "masks")
    storage.write_bytes(storage.join(commit.staging_uri(partial, "masks"), names[1]),
                        storage.read_bytes(storage.join(full_out, "masks", names[1])))
    storage.write_bytes(storage.join(commit.staging_uri(partial, "masks"), names[2]), b"PAR1 trunc")
    resumed = make_masks.run(make_masks.MakeMasksConfig(out=partial, **walk))
    ids = commit.read_table(partial, "masks").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == NUM_TRAIN and resumed["rows"] == NUM_TRAIN
    assert sorted(ids) == sorted(masks)
    for row in commit.read_table(partial, "masks").to_pylist():  # the walk is deterministic: the same masks
        np.testing.assert_array_equal(codec.decode_mask(row["mask"]), codec.decode_mask(masks[row["image_id"]]["mask"]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_with_psa_masks_end_to_end(data, tmp_path):
    """(the prepared data) -> classifier -> seeds -> evaluation -> affinity labels -> AffinityNet -> walk masks
    -> evaluation, stopping there (``until``): the stages after the masks are the default pipeline's."""
    cfg = pipeline.PipelineConfig(
        out=str(tmp_path / "run"), data=data, until="eval_masks",
        train=dict(model="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8,
                   batch_size=8, lr=1e-3, warmup_epochs=0.0, epochs=1, cpus_per_worker=1.0, max_failures=0),
        seeds=dict(flip=False, batch_size=4, num_actors=1, allow_untrained=True),  # one epoch learns nothing
        affinity_labels=dict(num_actors=1),
        affinity=dict(TINY_AFFINITY, batch_size=6, cpus_per_worker=1.0),
        masks=dict(method="psa", psa_logt=5, batch_size=4, num_actors=1))
    summary = pipeline.run(cfg)
    assert [row["stage"] for row in summary["stages"]] == ["prepare", "train", "seeds", "eval_seeds",
                                                           "affinity_labels", "affinity", "masks", "eval_masks"]
    assert summary["masks_method"] == "psa"
    assert [row["stage"] for row in summary["stages"] if row["skipped"]] == ["prepare"]  # --data is prepared
    train_ids = {r["image_id"] for r in commit.read_table(data, "samples").to_pylist() if r["split"] == "train"}
    labels = commit.read_table(cfg.uri("affinity_labels"), "affinity_labels").column("image_id").to_pylist()
    masks = commit.read_table(cfg.uri("masks"), "masks").column("image_id").to_pylist()
    assert sorted(labels) == sorted(masks) == sorted(train_ids)
    masks_meta = storage.read_json(storage.join(cfg.uri("masks"), "dataset.json"))
    assert masks_meta["method"] == "psa" and masks_meta["affinity"].startswith(cfg.uri("affinity"))
    seeds_eval = storage.read_json(storage.join(cfg.uri("seeds"), "eval", "summary.json"))
    assert masks_meta["threshold"] == seeds_eval["threshold"]  # the walk's background: the seeds' best threshold
    assert 0 <= storage.read_json(storage.join(cfg.uri("masks"), "eval", "summary.json"))["miou"] <= 1
    assert not storage.exists(cfg.uri("deeplab"))  # until: eval_masks
