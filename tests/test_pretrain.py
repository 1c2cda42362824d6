"""The pretrain stage: the shapes task rendered under its out, trained on the classifier's loop, its backbone
loaded by the classifier through ``weights:``; the pipeline's ``pretrain:`` section."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

from ray_wsss.core import checkpoints, commit, storage
from ray_wsss.core.config import ConfigError, from_dict
from ray_wsss.core.data import shapes
from ray_wsss.core.errors import WsssError
from ray_wsss.core.methods import get_method
from ray_wsss.core.models.vit import HEAD_PREFIXES
from ray_wsss.harness import training
from ray_wsss.stages import pipeline, prepare_data, pretrain, train_acr

# A 2-block, 32-wide ViT on 32 px crops: Ray's start-up dominates the run.
MODEL = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def pretrained(ray_local, tmp_path_factory) -> tuple[pretrain.PretrainConfig, dict]:
    out = str(tmp_path_factory.mktemp("run") / "pretrain")
    cfg = pretrain.PretrainConfig(out=out, num_train=24, num_val=8, epochs=1, batch_size=8, lr=1e-3,
                                  warmup_epochs=0.0, num_workers=1, cpus_per_worker=1.0, max_failures=0, **MODEL)
    return cfg, pretrain.run(cfg)


@pytest.mark.slow
def test_pretrain_renders_its_task_trains_and_commits(pretrained):
    cfg, summary = pretrained
    assert commit.is_committed(cfg.out) and summary["stage"] == "pretrain" and summary["epochs"] == 1
    assert summary["weights"] == storage.join(cfg.out, pretrain.BACKBONE_FILE)
    data = storage.join(cfg.out, pretrain.DATA_DIR)
    meta = storage.read_json(storage.join(data, "dataset.json"))
    assert meta["class_names"] == shapes.class_names()
    assert meta["counts"]["by_split"] == {"train": 24, "val": 8}
    # the rendered rows are the generator's (hue cue on by default)
    first = commit.read_first_rows(data, "samples", 1)[0]
    row = shapes.generate_sample(shapes.ShapesConfig(num_train=24, num_val=8, hue_cue=True), "train", 0)
    assert first["image_id"] == row["image_id"] and first["image"] == row["image"]
    assert {"map", "f1"} <= set(summary["val"])
    # both folders are in the stage's journal: an --overwrite deletes them with it
    assert {pretrain.DATA_DIR, cfg.name} <= commit.read_journal(cfg.out).dirs


@pytest.mark.slow
def test_a_rerun_with_other_task_settings_is_refused(pretrained):
    cfg, _ = pretrained
    with pytest.raises(WsssError, match=r"other settings \(num_train: 24 there, 30 now\)"):
        pretrain.run(dataclasses.replace(cfg, num_train=30))


@pytest.mark.slow
def test_classifier_starts_from_the_backbone_with_a_fresh_head(pretrained):
    cfg, summary = pretrained
    trained = checkpoints.load_state(training.find_checkpoint(cfg.out))["model"]
    backbone = load_file(summary["weights"])
    assert backbone and not any(k.startswith(HEAD_PREFIXES) for k in backbone)
    assert set(backbone) == {k[len("vit."):] for k in trained if not k[len("vit."):].startswith(HEAD_PREFIXES)}

    classifier_cfg = train_acr.TrainClassifierConfig(method="acr", weights=summary["weights"], **MODEL)
    model = get_method("acr").build_model(classifier_cfg.vit_config(), 6)
    own = model.vit.state_dict()
    for key, value in backbone.items():
        assert torch.equal(own[key], value), key
        assert torch.equal(own[key], trained["vit." + key]), key
    # the head is the classifier's own: its class count, not the shapes task's
    assert own["head.weight"].shape == (6, MODEL["embed_dim"])
    assert trained["vit.head.weight"].shape == (len(shapes.SHAPES), MODEL["embed_dim"])
    # from pretrained weights ACR takes the paper's consistency weight, as with any --weights
    assert classifier_cfg.consistency_weights() == (get_method("acr").pretrained_weight,) * 2


@pytest.mark.slow
def test_pipeline_reuses_a_committed_pretrain(pretrained, monkeypatch):
    cfg, summary = pretrained
    monkeypatch.setattr(pretrain, "run", lambda c: pytest.fail("a committed pretrain ran again"))
    run = pipeline.PipelineConfig(out=os.path.dirname(cfg.out), pretrain={"enabled": True}, train=MODEL)
    runners = {name: (uri, thunk) for name, uri, thunk in pipeline.stage_runners(run)}
    uri, thunk = runners["pretrain"]
    assert storage.path_components(uri) == storage.path_components(cfg.out)
    result = thunk()
    assert result["skipped"] is True and result["weights"] == summary["weights"]


def test_pipeline_wires_pretrain_before_train_and_its_weights(monkeypatch):
    ran = {}
    monkeypatch.setattr(pretrain, "run", lambda c: ran.setdefault("pretrain", c))
    monkeypatch.setattr(train_acr, "run", lambda c: ran.setdefault("train", c))
    cfg = pipeline.PipelineConfig(out="/tmp/no-such-run", train={**MODEL, "epochs": 3},
                                  pretrain={"enabled": True, "epochs": 2, "hue_cue": False})
    runners = {name: (uri, thunk) for name, uri, thunk in pipeline.stage_runners(cfg)}
    assert list(runners)[:3] == ["prepare", "pretrain", "train"]
    assert cfg.stage_names()[:3] == ("prepare", "pretrain", "train")
    runners["pretrain"][1]()
    runners["train"][1]()
    assert ran["pretrain"].out == "/tmp/no-such-run/pretrain" and ran["pretrain"].epochs == 2
    assert ran["pretrain"].hue_cue is False
    assert {k: getattr(ran["pretrain"], k) for k in MODEL} == MODEL  # built as the classifier
    assert ran["train"].weights == "/tmp/no-such-run/pretrain/backbone.safetensors" and ran["train"].epochs == 3
    assert pipeline.refine_by_default(cfg) is True  # as with any --weights

    off = pipeline.PipelineConfig(out="/tmp/no-such-run", pretrain={"epochs": 2})
    assert "pretrain" not in off.stage_names() and off.classifier_weights() is None
    assert "pretrain" not in [name for name, _, _ in pipeline.stage_runners(off)]


def test_pretrain_config_errors():
    with pytest.raises(ConfigError, match="both set the classifier's initial weights"):
        from_dict(pipeline.PipelineConfig, {"pretrain": {"enabled": True}, "train": {"weights": "deit.pth"}})
    with pytest.raises(ConfigError, match="enabled = 'yes'"):
        from_dict(pipeline.PipelineConfig, {"pretrain": {"enabled": "yes"}})
    with pytest.raises(ConfigError, match=r"pretrain:.*epochs"):
        from_dict(pipeline.PipelineConfig, {"pretrain": {"enabled": True, "epochs": 0}})
    with pytest.raises(ConfigError, match="method"):  # MCTformer's many class tokens are not a backbone
        from_dict(pretrain.PretrainConfig, {"method": "mct-v2"})
    with pytest.raises(ValueError, match="renders its own task"):
        pretrain.PretrainConfig(data="runs/default/data")
    with pytest.raises(ConfigError, match="until"):
        from_dict(pipeline.PipelineConfig, {"until": "pretrain"})  # not a stage of a pipeline without it
    with pytest.raises(ValueError, match="hue_cue: settings of the shapes generator"):
        prepare_data.PrepareConfig(format="synthetic", hue_cue=True)
