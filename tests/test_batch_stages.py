"""End to end on a tiny run: prepare -> train -> seeds -> evaluate -> masks -> evaluate, with resume."""
import numpy as np
import pyarrow as pa
import pytest

from ray_wsss.core import codec, commit, schema, storage
from ray_wsss.core.seeds.stored import SeedFormat
from ray_wsss.stages.evaluate import EvaluateConfig
from ray_wsss.stages.evaluate import run as evaluate
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig
from ray_wsss.stages.extract_seeds import run as extract_seeds
from ray_wsss.stages.make_masks import MakeMasksConfig
from ray_wsss.stages.make_masks import run as make_masks
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare
from ray_wsss.stages.train_acr import TrainClassifierConfig
from ray_wsss.stages.train_acr import run as train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
# One epoch on 12 images may learn nothing: the seeds calls pass allow_untrained (the gate has its own tests).
TINY = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8,
            batch_size=8, epochs=1, cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = str(root / "data")
    prepare(PrepareConfig(out=data, num_train=12, num_val=6, batch_size=6, rows_per_file=4))  # 3 + 2 files
    train(TrainClassifierConfig(data=data, out=str(root / "train"), **TINY))
    return root


def _uris(root):
    return {k: str(root / k) for k in ("data", "train", "seeds", "masks")}


def test_seeds_shapes_classes_values_and_evaluation(run_dir):
    u = _uris(run_dir)
    summary = extract_seeds(ExtractSeedsConfig(checkpoint=u["train"], data=u["data"], out=u["seeds"], batch_size=4,
                                                  allow_untrained=True))
    assert summary["rows"] == 18 and summary["errors"] == 0
    samples = {r["image_id"]: r for r in commit.read_table(u["data"], "samples").to_pylist()}
    meta = storage.read_json(storage.join(u["seeds"], "dataset.json"))
    assert meta["resolution"] == "grid" and meta["scores_encoding"] == "uint8" and "min-max" in meta["normalisation"]
    seed_format = SeedFormat.from_metadata(meta)
    for row in commit.read_table(u["seeds"], "seeds").to_pylist():
        sample = samples[row["image_id"]]
        stored = codec.decode_scores(row["scores"])                     # the patch grid of the scale-1 view
        # halves round up
        assert stored.shape == (len(row["classes"]), (sample["height"] + 4) // 8, (sample["width"] + 4) // 8)
        scores = seed_format.read(row)                                  # what every reader sees
        assert row["classes"] == sample["labels"]                       # only the labelled classes
        assert scores.shape == (len(row["classes"]), sample["height"], sample["width"])
        assert scores.min() >= 0 and scores.max() <= 1 and np.isfinite(scores).all()
        if len(scores):
            np.testing.assert_array_equal(stored.reshape(len(stored), -1).max(1), 1)  # min-max per class
    assert storage.exists(storage.join(u["seeds"], "contact_sheet.png"))

    result = evaluate(EvaluateConfig(pred=u["seeds"], data=u["data"], kind="seeds"))
    assert result["images"] == 18 and 0 <= result["miou"] <= 1
    assert set(result) >= {"miou", "threshold", "fp", "fn", "per_class"}
    assert storage.read_json(storage.join(u["seeds"], "eval", "summary.json"))["miou"] == result["miou"]


def _stage_committed_files(source: str, table: str, names: list[str], out: str) -> None:
    """Copy whole committed files of ``source`` into ``out``'s staging area: what a crashed run leaves."""
    for name in names:
        data = storage.read_bytes(storage.join(source, table, name))
        storage.write_bytes(storage.join(commit.staging_uri(out, table), name), data)


def test_masks_resume_and_bad_seeds(run_dir, tmp_path):
    u = _uris(run_dir)
    threshold_from = storage.join(u["seeds"], "eval", "summary.json")
    full = make_masks(MakeMasksConfig(seeds=u["seeds"], data=u["data"], out=u["masks"], split="train",
                                      threshold_from=threshold_from))
    assert full["rows"] == 12 and full["errors"] == 0
    assert full["threshold"] == storage.read_json(threshold_from)["threshold"]
    masks = commit.read_table(u["masks"], "masks").to_pylist()
    for row in masks:
        assert codec.decode_mask(row["mask"]).shape == (row["height"], row["width"])
    # Every masks file follows the samples file of the same name, in its order.
    assert commit.table_file_names(u["masks"], "masks") == ["train-00000.parquet", "train-00001.parquet",
                                                            "train-00002.parquet"]
    for name in commit.table_file_names(u["masks"], "masks"):
        samples_order = [i for i in _ids_in_order(u["data"], "samples", name)]
        assert _ids_in_order(u["masks"], "masks", name) == samples_order
    assert 0 <= evaluate(EvaluateConfig(pred=u["masks"], data=u["data"], kind="masks"))["miou"] <= 1

    # A crashed run left one file staged and a truncated one: the rerun completes it exactly.
    partial = str(tmp_path / "partial")
    _stage_committed_files(u["masks"], "masks", ["train-00001.parquet"], partial)
    storage.write_bytes(storage.join(commit.staging_uri(partial, "masks"), "train-00002.parquet"), b"PAR1 trunc")
    resumed = make_masks(MakeMasksConfig(seeds=u["seeds"], data=u["data"], out=partial, split="train", threshold=0.3))
    ids = commit.read_table(partial, "masks").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 and resumed["rows"] == 12

    # Bad, missing or foreign seeds become error rows, not crashes and not silence.
    seeds = commit.read_table(u["seeds"], "seeds")
    broken_id, missing_id = seeds["image_id"][0].as_py(), seeds["image_id"][1].as_py()
    first_file = commit.table_file_names(u["seeds"], "seeds")[0]
    rows = [r for r in commit.read_table(u["seeds"], "seeds").to_pylist() if r["image_id"] != missing_id]
    for r in rows:
        if r["image_id"] == broken_id:
            r["scores"] = b"not a numpy array"
    orphan = {**rows[-1], "image_id": "not_in_the_data"}
    bad_seeds = str(tmp_path / "bad_seeds")
    for name in commit.table_file_names(u["seeds"], "seeds"):
        in_file = [r for r in rows if r["image_id"] in _ids_of(u["seeds"], "seeds", name)]
        extra = [orphan] if name == first_file else []
        commit.write_staged_table(bad_seeds, "seeds", pa.Table.from_pylist(in_file + extra, schema=schema.SEEDS),
                                  name=name)
    commit.commit_stage(bad_seeds, ["seeds", "errors"], storage.read_json(storage.join(u["seeds"], "dataset.json")),
                        file_splits=commit.file_splits(u["seeds"], "seeds"))
    out = str(tmp_path / "bad_masks")
    summary = make_masks(MakeMasksConfig(seeds=bad_seeds, data=u["data"], out=out, threshold=0.3))
    errors = {r["image_id"]: r["error"] for r in commit.read_table(out, "errors").to_pylist()}
    assert "bad seed scores" in errors[broken_id]
    assert "no seeds for this image" in errors[missing_id]
    assert "not in this file of the data" in errors["not_in_the_data"]
    assert summary["rows"] == 16 and summary["errors"] == 3


def _ids_in_order(out: str, table: str, name: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(storage.join(out, table, name), columns=["image_id"])["image_id"].to_pylist()


def _ids_of(out: str, table: str, name: str) -> set[str]:
    return set(_ids_in_order(out, table, name))


def test_seed_extraction_resumes_without_duplicates(run_dir, tmp_path):
    u = _uris(run_dir)
    partial = str(tmp_path / "seeds")
    _stage_committed_files(u["seeds"], "seeds", commit.table_file_names(u["seeds"], "seeds")[:2], partial)
    summary = extract_seeds(ExtractSeedsConfig(checkpoint=u["train"], data=u["data"], out=partial, batch_size=4,
                                                  allow_untrained=True))
    ids = commit.read_table(partial, "seeds").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 18 and summary["rows"] == 18
