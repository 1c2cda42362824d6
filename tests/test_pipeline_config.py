"""The pipeline's wiring, without running it (the multi-node test runs it end to end)."""
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
