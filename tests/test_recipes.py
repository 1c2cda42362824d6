"""The papers' recipes (``configs/*.yaml``), loaded as ``jobs/pipeline.py --config`` loads them.

Every recipe: its keys are the stages' own (a key that no longer exists fails the load), every stage config the
pipeline would build from it passes its checks, and each section's values reach that stage unchanged. The smoke
runs then take one epoch / one batch through every stage a recipe configures, with the backbones swapped for tiny
ones of the same timm classes (depth 3, width 32) and the sizes shrunk here, never in the recipe files.

Cost (CI: 2 cores): one shared data set (8 + 4 synthetic images) prepared once for the module, one local Ray
(``ray_local``). Stages whose code and settings are the same in several recipes run once: ACR on the
ViT-hybrid runs all twelve stages (the PSA stages with ACR's second, unrefined extraction, DeepLab, segment and
every evaluation); the MCTformer-based recipes stop after their seeds' evaluation (``until: eval_seeds``), since
their PSA, DeepLab and segment sections are the ACR recipe's (checked below) and their own code paths are the
classifier and its seeds. The COCO recipes differ from the VOC ones only in data format, split names and
epochs: they are checked as configs, not run.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_wsss.core import config as config_lib
from ray_wsss.core import storage
from ray_wsss.core.metrics import parse_threshold_grid
from ray_wsss.stages import pipeline
from ray_wsss.stages.pipeline import PipelineConfig, stage_configs
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare

REPO = Path(__file__).resolve().parents[1]
RECIPES = {path.stem: path for path in sorted((REPO / "configs").glob("*.yaml"))}
COCO = sorted(name for name in RECIPES if name.endswith("_coco"))
VOC = sorted(name for name in RECIPES if name.endswith("_voc"))

# What the tests change, by section: sizes, the local Ray's pool, and no weight files (random initialisation).
TINY_VIT = dict(depth=3, embed_dim=32, num_heads=2, img_size=32, batch_size=4, epochs=1, num_workers=1,
                cpus_per_worker=1.0, max_failures=0, weights=None)
TINY = {
    "train": TINY_VIT,
    "seeds": dict(batch_size=4, num_actors=1, allow_untrained=True),  # one epoch learns nothing
    "affinity_labels": dict(batch_size=4, num_actors=1),
    "affinity": dict(backbone="resnet18", backbone_weights=None, crop=72, batch_size=2, epochs=1, num_workers=1,
                     cpus_per_worker=1.0, max_failures=0),
    "masks": dict(batch_size=4, num_actors=1),
    "deeplab": dict(backbone="resnet18", backbone_weights=None, crop=48, batch_size=2, epochs=1, num_workers=1,
                    cpus_per_worker=1.0, max_failures=0),
    "segment": dict(batch_size=4, num_actors=1),
    "evaluate": dict(num_actors=1),
}
# The smoke runs: the recipe -> the last stage it runs (None: all of them).
SMOKE = {"acr_vit_hybrid_b_voc": None, "mctformer_v1_deit_s_voc": "eval_seeds",
         "mctformer_v2_deit_s_voc": "eval_seeds", "acr_mctformer_v2_deit_s_voc": "eval_seeds"}
# The section each stage is configured by (its values must reach the stage), and what the pipeline fixes there.
SECTION_OF = {"train": "train", "seeds": "seeds", "affinity_seeds": "seeds", "affinity_labels": "affinity_labels",
              "affinity": "affinity", "masks": "masks", "deeplab": "deeplab", "segment": "segment",
              "eval_seeds": "evaluate", "eval_masks": "evaluate", "eval_segment": "evaluate"}
FIXED = {"affinity_seeds": ("refine", "split")}  # ACR*: the second extraction is unrefined, of the training split
TRAINERS = ("train", "affinity", "deeplab")  # they record their config in config.yaml, batch stages in dataset.json


def _pipeline_job():
    """jobs/pipeline.py as a module (its __main__ block does not run), for its parser's description."""
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("pipeline_job", REPO / "jobs" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str, *flags: str) -> PipelineConfig:
    """The recipe as ``python jobs/pipeline.py --config configs/<name>.yaml <flags>`` builds it."""
    job = _pipeline_job()
    return job._cli.parse_config(pipeline.PipelineConfig, job.__doc__, ["--config", str(RECIPES[name]), *flags])


def command_line(name: str, data: str, out: str) -> list[str]:
    """The flags a user gives (README); COCO's held-out split is prepared apart (``--val-data``)."""
    flags = ["--data", data, "--out", out]
    if name in COCO:
        flags += ["--annotations", "/coco/annotations/instances_train2014.json", "--val-data", "/prepared/val2014"]
    return flags


def tiny(cfg: PipelineConfig, out: str, until: str | None) -> PipelineConfig:
    """The recipe with the tests' sizes on top; a square seeds view shrinks to the tiny crop."""
    sections = {name: {**getattr(cfg, name), **values} for name, values in TINY.items()}
    if sections["seeds"].get("resize") == "square":
        sections["seeds"]["base_size"] = TINY_VIT["img_size"]
    return dataclasses.replace(cfg, out=out, until=until, **sections)


def _plain(value: Any) -> Any:
    """A config value as YAML/JSON records it: sections as mappings, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def expected_values(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The recipe's values of the section configuring ``stage``, in the stage config's types."""
    section = SECTION_OF[stage]
    values = {k: v for k, v in getattr(cfg, section).items() if k not in FIXED.get(stage, ())}
    return _plain(config_lib.check_fields(stage_configs()[section], values, section))


def built_configs(monkeypatch, cfg: PipelineConfig) -> dict[str, Any]:
    """stage name -> the config the pipeline builds for it (every stage's ``run`` replaced by a recorder)."""
    from ray_wsss.stages import (
        affinity_labels,
        evaluate,
        extract_seeds,
        make_masks,
        prepare_data,
        segment,
        train_acr,
        train_affinity,
        train_deeplab,
    )

    built: dict[str, Any] = {}

    def record(stage_config) -> dict:
        built[stage_config.out] = stage_config
        return {}

    for module in (affinity_labels, evaluate, extract_seeds, make_masks, prepare_data, segment, train_acr,
                   train_affinity, train_deeplab):
        monkeypatch.setattr(module, "run", record)
    names = {}
    for name, uri, thunk in pipeline.stage_runners(cfg):
        thunk()
        names[name] = built.get(uri)
    return names


# ---------------------------------------------------------------- every recipe, as configs

def test_there_is_a_recipe_per_paper_setup():
    assert sorted(RECIPES) == ["acr_mctformer_v2_deit_s_voc", "acr_vit_hybrid_b_coco", "acr_vit_hybrid_b_voc",
                               "mctformer_v1_deit_s_coco",
                               "mctformer_v1_deit_s_voc", "mctformer_v2_deit_s_coco", "mctformer_v2_deit_s_voc"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_every_stage_config_with_its_values(name, monkeypatch):
    cfg = load_recipe(name, *command_line(name, "/data/root", "/tmp/recipe-run"))
    built = built_configs(monkeypatch, cfg)
    assert list(built) == list(cfg.stage_names())
    for stage, stage_config in built.items():
        if stage not in SECTION_OF:
            continue
        recorded = _plain(config_lib.to_dict(stage_config))
        for key, value in expected_values(cfg, stage).items():
            assert recorded[key] == value, f"{name}: {stage}.{key} is {recorded[key]!r}, the recipe says {value!r}"
    if name in COCO:  # only the training split is prepared; the held-out one comes from --val-data
        assert built["prepare"].split == cfg.train_split() and built["segment"].data == "/prepared/val2014"


def test_a_recipe_key_that_no_longer_exists_fails_the_load(tmp_path):
    recipe = yaml.safe_load(RECIPES["mctformer_v2_deit_s_voc"].read_text())
    recipe["seeds"]["attention_type"] = "fused"  # MCTformer's flag name, not a seeds option
    path = tmp_path / "stale.yaml"
    path.write_text(yaml.safe_dump(recipe))
    job = _pipeline_job()
    with pytest.raises(SystemExit):  # argparse's error exit, with the message on stderr
        job._cli.parse_config(pipeline.PipelineConfig, job.__doc__, ["--config", str(path)])
    with pytest.raises(config_lib.ConfigError, match=r"the `seeds:` section: unknown keys \['attention_type'\]"):
        config_lib.load(PipelineConfig, str(path))


@pytest.mark.parametrize("names,sections", [
    (VOC, ("deeplab", "segment")),   # the DeepLab-V2 R101 recipe, one copy per file
    (COCO, ("deeplab", "segment")),
    (sorted(RECIPES), ("affinity_labels", "affinity", "masks")),  # PSA as both papers ran it
    ([n for n in RECIPES if "mctformer" in n], ("seeds", "evaluate")),
], ids=["voc-deeplab", "coco-deeplab", "psa", "mctformer-seeds"])
def test_duplicated_sections_agree(names, sections):
    """YAML has no includes: the sections the recipes share are copies, and the copies must not drift apart."""
    loaded = {name: yaml.safe_load(RECIPES[name].read_text()) for name in names}
    for section in sections:
        first = loaded[names[0]][section]
        assert all(recipe[section] == first for recipe in loaded.values()), f"`{section}:` differs among {names}"


# ---------------------------------------------------------------- smoke runs

@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("recipes") / "data")
    prepare(PrepareConfig(out=out, num_train=8, num_val=4, min_size=32, max_size=48, batch_size=4))
    return out


def recorded_config(cfg: PipelineConfig, stage: str, uri: str) -> dict[str, Any]:
    if stage in TRAINERS:
        return yaml.safe_load(storage.read_bytes(storage.join(uri, "config.yaml")))
    return storage.read_json(storage.join(uri, "dataset.json"))["config"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(SMOKE))
def test_recipe_runs_one_step_of_every_stage(name, data, tmp_path):
    # --split maps the recipe's split names (train_aug, val) onto the synthetic data's, as a user's flag would.
    recipe = load_recipe(name, *command_line(name, data, str(tmp_path / "run")), "--split", "train,val")
    cfg = tiny(recipe, str(tmp_path / "run"), SMOKE[name])
    summary = pipeline.run(cfg)
    stages = list(cfg.stage_names())
    expected = stages if SMOKE[name] is None else stages[:stages.index(SMOKE[name]) + 1]
    assert [row["stage"] for row in summary["stages"]] == expected
    assert [row["stage"] for row in summary["stages"] if row["skipped"]] == ["prepare"]  # --data is prepared
    uris = {row["stage"]: row["out"] for row in summary["stages"]}
    for stage in expected:
        if stage in SECTION_OF:  # the recipe's values (with the tests' sizes) are what the stage ran with
            recorded = recorded_config(cfg, stage, uris[stage])
            for key, value in expected_values(cfg, stage).items():
                assert _plain(recorded[key]) == value, f"{name}: {stage} ran with {key}={recorded[key]!r}"
    seeds_eval = storage.read_json(storage.join(uris["eval_seeds"], "summary.json"))
    grid = parse_threshold_grid(cfg.evaluate["thresholds"])  # the recipe's protocol, swept in full
    assert [threshold for threshold, _ in seeds_eval["curve"]] == pytest.approx(grid)
    assert seeds_eval["threshold"] in grid and 0 <= seeds_eval["miou"] <= 1
    if SMOKE[name] is None:
        assert 0 <= storage.read_json(storage.join(uris["eval_segment"], "summary.json"))["miou"] <= 1
