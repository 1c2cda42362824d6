"""Config building: values converted to their field types, a YAML `storage:` section honoured,
flags on top of the YAML. Bad values are rows of tests/test_bad_inputs.py."""
from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import yaml
from fixtures_data import REPO

from ray_wsss.core import config as config_lib
from ray_wsss.core.storage import StorageOptions
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig
from ray_wsss.stages.make_masks import MakeMasksConfig
from ray_wsss.stages.pipeline import PipelineConfig, stage_configs
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.tune_acr import TuneACRConfig

sys.path.insert(0, str(REPO / "jobs"))
_cli = importlib.import_module("_cli")


def test_yaml_storage_section_is_honoured_and_flags_win_key_by_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"split": "train", "storage": {"endpoint-url": "http://minio:9000",
                                                                  "region": "eu-west-1"}}))
    from_yaml = _cli.parse_config(PrepareConfig, "", ["--config", str(path)])
    assert from_yaml.storage == StorageOptions(endpoint_url="http://minio:9000", region="eu-west-1")
    both = _cli.parse_config(PrepareConfig, "", ["--config", str(path), "--s3-region", "us-east-2"])
    assert both.storage == StorageOptions(endpoint_url="http://minio:9000", region="us-east-2")
    flags_only = _cli.parse_config(PrepareConfig, "", ["--s3-endpoint", "http://s3.local"])
    assert flags_only.storage == StorageOptions(endpoint_url="http://s3.local")


def test_values_take_their_field_types():
    cfg = config_lib.from_dict(ExtractSeedsConfig, {"scales": [1, 1.5], "refine-layers": [0, 2], "flip": False})
    assert cfg.scales == (1.0, 1.5) and all(type(s) is float for s in cfg.scales)
    assert cfg.refine_layers == (0, 2) and cfg.flip is False
    masks = config_lib.from_dict(MakeMasksConfig, {"threshold": 0, "ignore_low": None, "crf": True})
    assert masks.threshold == 0.0 and type(masks.threshold) is float and masks.ignore_low is None


def test_a_dumped_config_loads_back_equal(tmp_path):
    cfg = config_lib.from_dict(ExtractSeedsConfig, {"scales": [0.5, 1.0], "layers": 3, "split": "val"})
    path = tmp_path / "config.yaml"
    path.write_text(config_lib.dump_yaml(cfg))
    assert config_lib.load(ExtractSeedsConfig, str(path)) == cfg


def test_describe_says_what_is_allowed():
    assert config_lib.describe(float | None, {"min": 0, "max": 1}) == "a number in [0, 1] or null"
    assert config_lib.describe(float, {"gt": 0}) == "a number > 0"
    assert config_lib.describe(int, {"min": 1}) == "an integer >= 1"
    assert config_lib.describe(tuple[float, ...], {"gt": 0}) == "a list of numbers > 0"
    assert config_lib.describe(str, {"choices": ("a", "b")}) == "one of ['a', 'b']"
    assert config_lib.describe(bool) == "true or false"


@pytest.mark.parametrize("cls", [*stage_configs().values(), PipelineConfig, TuneACRConfig],
                         ids=lambda cls: cls.__name__)
def test_every_default_passes_its_own_checks(cls):
    defaults = cls()
    values = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}
    assert config_lib.from_dict(cls, values) == defaults


def test_a_nested_crf_section_updates_the_stage_default_key_by_key(tmp_path):
    from ray_wsss.stages.segment import SegmentConfig

    yaml_path = tmp_path / "segment.yaml"
    yaml_path.write_text("crf: {iterations: 5, enabled: true}\n")
    seg = config_lib.load(SegmentConfig, str(yaml_path))
    assert seg.crf.iterations == 5 and seg.crf.enabled
    assert seg.crf.bilateral_sxy == 67.0  # segment's own default section, not the class's 80
    masks = config_lib.from_dict(MakeMasksConfig, {"crf": False, "threshold": 0.3})
    assert not masks.crf.enabled and masks.crf.bilateral_sxy == 80.0
    assert MakeMasksConfig(crf=False).crf == masks.crf  # the same shorthand from Python
    with pytest.raises(config_lib.ConfigError, match="crf: iterations = 0 is not allowed"):
        config_lib.from_dict(MakeMasksConfig, {"crf": {"iterations": 0}})


def test_nested_section_flags():
    sys.path.insert(0, str(REPO / "jobs"))
    cli = importlib.import_module("_cli")
    from ray_wsss.stages.segment import SegmentConfig

    seg = cli.parse_config(SegmentConfig, "", ["--crf", "--crf-iterations", "3", "--crf-bilateral-srgb", "5"])
    assert (seg.crf.enabled, seg.crf.iterations, seg.crf.bilateral_srgb, seg.crf.bilateral_sxy) == (True, 3, 5.0, 67.0)
    masks = cli.parse_config(MakeMasksConfig, "", ["--no-crf", "--threshold", "0.4"])
    assert not masks.crf.enabled and masks.crf.iterations == 10
