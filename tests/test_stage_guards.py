"""Stages refuse wrong inputs before any work (no Ray needed: every check runs in the driver first).

A table of scenarios, as in test_bad_inputs.py: each builds committed inputs in a temporary folder and
runs a stage, which must fail with a message holding every fragment. Plus the checkpoint files that
must never run code when loaded.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from ray_wsss.core import checkpoints, commit, schema, storage
from ray_wsss.core.data import synthetic
from ray_wsss.core.errors import WsssError
from ray_wsss.core.methods import get_method
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.stages import evaluate, extract_seeds, make_masks, segment

TINY_VIT = ViTConfig(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
VOC_CLASSES = ["background", *[f"voc{i}" for i in range(1, 21)]]


def _samples(root: Path, class_names: list[str] | None = None) -> str:
    """A committed samples stage of 4 synthetic images (one file of split 'train'), written without Ray."""
    out = str(root / "data")
    cfg = synthetic.SyntheticConfig(num_train=4, num_val=0)
    rows = [synthetic.generate_sample(cfg, "train", i) for i in range(4)]
    commit.write_staged_table(out, "samples", pa.Table.from_pylist(rows, schema=schema.SAMPLES),
                              name="train-00000.parquet")
    commit.write_staged_table(out, "errors", schema.ERRORS.empty_table())
    names = class_names or synthetic.class_names()
    commit.commit_stage(out, ["samples", "errors"], {"table": "samples", "class_names": names,
                                                     "num_classes": len(names)},
                        file_splits={"train-00000.parquet": "train"})
    return out


def _classifier(root: Path, class_names: list[str], history: list[dict] | None = None,
                method: str = "acr") -> str:
    ckpt = root / "ckpt"
    ckpt.mkdir()
    model = get_method("acr").build_model(TINY_VIT, len(class_names) - 1)
    checkpoints.write_checkpoint_dir(str(ckpt), model.state_dict(), {
        "method": method, "class_names": class_names, "model_config": vars(TINY_VIT), "epoch": 6,
        "history": history if history is not None else [{"epoch": 6, "val_map": 0.9, "val_map_chance": 0.3,
                                                         "val_f1": 0.8}]})
    return str(ckpt)


def _seeds_for(root: Path, class_names: list[str]) -> str:
    out = str(root / "seeds")
    commit.write_staged_table(out, "seeds", schema.SEEDS.empty_table(), name="train-00000.parquet")
    commit.write_staged_table(out, "errors", schema.ERRORS.empty_table())
    commit.commit_stage(out, ["seeds", "errors"], {"table": "seeds", "class_names": class_names},
                        file_splits={"train-00000.parquet": "train"})
    return out


def seeds_with_other_classes(root: Path):
    data = _samples(root, VOC_CLASSES)
    return extract_seeds.run(extract_seeds.ExtractSeedsConfig(
        data=data, checkpoint=_classifier(root, synthetic.class_names()), out=str(root / "out")))


def seeds_from_a_deeplab_checkpoint(root: Path):
    return extract_seeds.run(extract_seeds.ExtractSeedsConfig(
        data=_samples(root), checkpoint=_classifier(root, synthetic.class_names(), method="deeplab"),
        out=str(root / "out")))


def seeds_from_an_untrained_classifier(root: Path):
    history = [{"epoch": 6, "val_map": 0.31, "val_map_chance": 0.30, "val_f1": 0.0}]
    return extract_seeds.run(extract_seeds.ExtractSeedsConfig(
        data=_samples(root), checkpoint=_classifier(root, synthetic.class_names(), history), out=str(root / "out")))


def seeds_of_a_missing_split(root: Path):
    return extract_seeds.run(extract_seeds.ExtractSeedsConfig(
        data=_samples(root), checkpoint=_classifier(root, synthetic.class_names()), out=str(root / "out"),
        split="val"))


def seeds_from_a_pickled_checkpoint(root: Path):
    ckpt = root / "old"
    ckpt.mkdir()
    torch.save({"model": {}}, ckpt / checkpoints.LEGACY_FILE)
    return extract_seeds.run(extract_seeds.ExtractSeedsConfig(data=_samples(root), checkpoint=str(ckpt),
                                                              out=str(root / "out")))


def segment_with_a_classifier_checkpoint(root: Path):
    return segment.run(segment.SegmentConfig(data=_samples(root), split="train", out=str(root / "out"),
                                             checkpoint=_classifier(root, synthetic.class_names())))


def evaluate_predictions_of_other_classes(root: Path):
    data = _samples(root)
    return evaluate.run(evaluate.EvaluateConfig(pred=_seeds_for(root, VOC_CLASSES), data=data, kind="seeds"))


def masks_without_a_threshold(root: Path):
    data = _samples(root)
    return make_masks.run(make_masks.MakeMasksConfig(seeds=_seeds_for(root, synthetic.class_names()), data=data,
                                                     out=str(root / "out")))


SCENARIOS: list[tuple[Callable, tuple[str, ...]]] = [
    (seeds_with_other_classes, ("was trained on classes", "voc20", "the class ids would mean different things")),
    (seeds_from_a_deeplab_checkpoint, ("holds a 'deeplab' checkpoint", "not a classifier", "DeepLab checkpoint")),
    (seeds_from_an_untrained_classifier, ("learned nothing", "held-out F1 is 0", "label-frequency level 0.300",
                                          "--epochs", "--allow-untrained")),
    (seeds_of_a_missing_split, ("has no split(s) ['val']", "it has ['train']")),
    (seeds_from_a_pickled_checkpoint, ("older ray-wsss", "unpickling can run code")),
    (segment_with_a_classifier_checkpoint, ("holds a 'acr' checkpoint, not a DeepLab one",)),
    (evaluate_predictions_of_other_classes, ("predictions over classes", "voc20", "different things")),
    (masks_without_a_threshold, ("exactly one of --threshold", "--threshold-from")),
]


@pytest.mark.parametrize("scenario, fragments", [pytest.param(s, f, id=s.__name__) for s, f in SCENARIOS])
def test_stage_refuses_before_any_work(tmp_path, scenario, fragments):
    with pytest.raises(WsssError) as info:
        scenario(tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not commit.is_committed(str(tmp_path / "out"))


def test_allow_untrained_is_the_explicit_override(tmp_path, caplog):
    history = [{"epoch": 6, "val_map": 0.31, "val_map_chance": 0.30, "val_f1": 0.0}]
    ckpt = _classifier(tmp_path, synthetic.class_names(), history)
    meta = storage.read_json(storage.join(ckpt, checkpoints.META_FILE))
    extract_seeds.check_classifier(ckpt, meta, "data", synthetic.class_names(), allow_untrained=True)
    assert "--allow-untrained" in caplog.text
    meta["history"] = []  # trained without held-out metrics: a warning, not a refusal
    extract_seeds.check_classifier(ckpt, meta, "data", synthetic.class_names(), allow_untrained=False)
    assert "no held-out metrics" in caplog.text


# ---------------------------------------------------------------- loading never executes code

class _Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _crafted(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(str(marker))}, f)


def test_a_crafted_model_pt_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _crafted(ckpt / checkpoints.LEGACY_FILE, marker)
    with pytest.raises(WsssError, match="unpickling can run code"):
        checkpoints.load_state(str(ckpt))
    assert not marker.exists()


def test_crafted_training_state_and_weights_files_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / checkpoints.TRAIN_STATE_FILE
    _crafted(state, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(state, weights_only=True)  # what harness.training.resume does
    weights = tmp_path / "weights.pth"
    _crafted(weights, marker)
    with pytest.raises(WsssError, match="cannot read weights"):
        get_method("acr").build_model(ViTConfig(**{**vars(TINY_VIT), "weights": str(weights)}), 5)
    assert not marker.exists()
