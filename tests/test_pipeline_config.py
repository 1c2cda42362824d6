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
