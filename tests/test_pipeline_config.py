"""The pipeline's wiring, without running it (the multi-node test runs it end to end)."""
import pytest

from ray_wsss.stages import extract_seeds, pipeline


def test_stages_in_order_under_out():
    cfg = pipeline.PipelineConfig(out="/tmp/run")
    names = [name for name, _, _ in pipeline.stage_runners(cfg)]
    assert names == ["prepare", "train", "seeds", "eval_seeds", "masks", "eval_masks", "deeplab", "segment",
                     "eval_segment"]
    outs = {name: uri for name, uri, _ in pipeline.stage_runners(cfg)}
    assert outs["seeds"] == "/tmp/run/seeds" and outs["eval_seeds"] == "/tmp/run/seeds/eval"


def test_refinement_follows_pretrained_weights_unless_the_yaml_says():
    assert pipeline.refine_by_default(pipeline.PipelineConfig()) is False
    assert pipeline.refine_by_default(pipeline.PipelineConfig(train={"weights": "s3://b/deit_small.pth"})) is True
    wired = {"checkpoint": "c", "data": "d", "out": "o", "refine": False}
    overridden = pipeline._stage_config(extract_seeds.ExtractSeedsConfig, wired, {"refine": True, "out": "ignored"},
                                        pipeline.PipelineConfig().storage)
    assert overridden.refine is True and overridden.out == "o"  # the YAML wins, except the wired URIs


def test_psa_masks_add_the_affinity_stages_and_wire_them():
    cfg = pipeline.PipelineConfig(out="/tmp/run", masks={"method": "psa"})
    runners = {name: uri for name, uri, _ in pipeline.stage_runners(cfg)}
    assert list(runners) == ["prepare", "train", "seeds", "eval_seeds", "affinity_labels", "affinity", "masks",
                             "eval_masks", "deeplab", "segment", "eval_segment"]
    assert runners["affinity_labels"] == "/tmp/run/affinity_labels" and runners["affinity"] == "/tmp/run/affinity"
    assert pipeline.PipelineConfig().stage_names() == pipeline.STAGES  # the default pipeline keeps its stages


def test_acr_recipe_trains_affinitynet_on_a_second_unrefined_extraction(monkeypatch):
    """ACR's recipe: the masks walk the refined seeds, AffinityNet learns from ACR* (no refinement) seeds."""
    from ray_wsss.stages import affinity_labels, extract_seeds

    ran = {}
    monkeypatch.setattr(extract_seeds, "run", lambda c: ran.setdefault("seeds", c))
    monkeypatch.setattr(affinity_labels, "run", lambda c: ran.setdefault("labels", c))
    cfg = pipeline.PipelineConfig(out="/tmp/run", masks={"method": "psa+crf"}, affinity_seeds="unrefined",
                                  seeds={"refine": True, "flip": False})
    stages = {name: (uri, thunk) for name, uri, thunk in pipeline.stage_runners(cfg)}
    assert stages["affinity_seeds"][0] == "/tmp/run/affinity_seeds"
    stages["affinity_seeds"][1]()
    stages["affinity_labels"][1]()
    assert (ran["seeds"].out, ran["seeds"].refine, ran["seeds"].flip, ran["seeds"].split) == (
        "/tmp/run/affinity_seeds", False, False, "train")
    assert ran["labels"].seeds == "/tmp/run/affinity_seeds" and ran["labels"].split == "train"

    # already unrefined seeds (from scratch, the default): no second extraction, AffinityNet learns from them
    ran.clear()
    same = pipeline.PipelineConfig(out="/tmp/run", masks={"method": "psa"}, affinity_seeds="unrefined")
    stages = {name: (uri, thunk) for name, uri, thunk in pipeline.stage_runners(same)}
    assert stages["affinity_seeds"][0] == "/tmp/run/seeds" and stages["affinity_seeds"][1]()["skipped"] is True
    stages["affinity_labels"][1]()
    assert "seeds" not in ran and ran["labels"].seeds == "/tmp/run/seeds"


def test_pipeline_refuses_psa_options_without_psa_masks_and_unknown_stops():
    with pytest.raises(ValueError, match="affinity_seeds: unrefined is for masks"):
        pipeline.PipelineConfig(affinity_seeds="unrefined")
    with pytest.raises(ValueError, match="until: 'affinity' is not a stage of this pipeline"):
        pipeline.PipelineConfig(until="affinity")
    assert pipeline.PipelineConfig(until="affinity", masks={"method": "psa"}).until == "affinity"


def _captured_configs(monkeypatch, cfg: pipeline.PipelineConfig) -> dict[str, object]:
    """Every stage's config as the pipeline builds it (each stage's ``run`` replaced by a recorder)."""
    from ray_wsss.stages import evaluate, make_masks, prepare_data, segment, train_acr, train_deeplab

    built: dict[str, object] = {}

    def record(stage_config) -> dict:
        built[stage_config.out] = stage_config
        return {}

    for module in (evaluate, extract_seeds, make_masks, prepare_data, segment, train_acr, train_deeplab):
        monkeypatch.setattr(module, "run", record)
    for _, _, thunk in pipeline.stage_runners(cfg):
        thunk()
    return built


def test_evaluate_section_sets_the_protocol_of_every_evaluation(monkeypatch):
    cfg = pipeline.PipelineConfig(out="/tmp/run", evaluate={"thresholds": "0.00:0.59:0.01",
                                                            "threshold-pick": "early-stop", "mean_over": "all"})
    built = _captured_configs(monkeypatch, cfg)
    evaluations = {out: c for out, c in built.items() if out.endswith("/eval")}
    assert sorted(evaluations) == ["/tmp/run/masks/eval", "/tmp/run/seeds/eval", "/tmp/run/segment/eval"]
    for c in evaluations.values():
        assert (c.thresholds, c.threshold_pick, c.mean_over) == ("0.00:0.59:0.01", "early-stop", "all")
    assert (evaluations["/tmp/run/seeds/eval"].kind, evaluations["/tmp/run/seeds/eval"].split) == ("seeds", "train")
    assert (evaluations["/tmp/run/segment/eval"].kind, evaluations["/tmp/run/segment/eval"].split) == ("masks", "val")
    default = _captured_configs(monkeypatch, pipeline.PipelineConfig(out="/tmp/run"))["/tmp/run/seeds/eval"]
    assert (default.threshold_pick, default.mean_over) == ("max", "present")  # without a section: the stage's


def test_evaluate_section_is_checked_when_the_pipeline_config_is_built():
    with pytest.raises(ValueError, match=r"the `evaluate:` section: mean_over = 'some'"):
        pipeline.PipelineConfig(evaluate={"mean_over": "some"})
    with pytest.raises(ValueError, match=r"sets \['kind', 'split'\], which the pipeline sets for each evaluation"):
        pipeline.PipelineConfig(evaluate={"split": "val", "kind": "masks"})


def test_val_data_is_the_held_out_split_of_training_segment_and_its_evaluation(monkeypatch):
    cfg = pipeline.PipelineConfig(out="/tmp/run", data="/src/train2014", format="coco", annotations="/a/train.json",
                                  split="train2014,val2014", val_data="/prepared/val2014")
    built = _captured_configs(monkeypatch, cfg)
    assert built["/tmp/run/data"].split == "train2014"  # only the training split is prepared
    assert (built["/tmp/run/train"].val_data, built["/tmp/run/train"].val_split) == ("/prepared/val2014", "val2014")
    assert built["/tmp/run/deeplab"].val_data == "/prepared/val2014"
    assert (built["/tmp/run/segment"].data, built["/tmp/run/segment"].split) == ("/prepared/val2014", "val2014")
    assert built["/tmp/run/segment/eval"].data == "/prepared/val2014"
    assert built["/tmp/run/seeds/eval"].data == built["/tmp/run/masks/eval"].data == "/tmp/run/data"
    without = _captured_configs(monkeypatch, pipeline.PipelineConfig(out="/tmp/run"))
    assert without["/tmp/run/train"].val_data is None and without["/tmp/run/segment"].data == "/tmp/run/data"
    with pytest.raises(ValueError, match="val_data holds the held-out split"):
        pipeline.PipelineConfig(split="train2014", val_data="/prepared/val2014")
