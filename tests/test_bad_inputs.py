"""Bad inputs, as a hostile or unlucky user gives them: one table (a parametrised test) per input kind.

Each row is an input and the outcome it must have, one of:

* ``Fails``: a clear error before any work, whose message holds every given fragment (the file or
  field, the value, what is allowed);
* ``Listed``: the good records are listed (split -> ids, in order) and every bad one is an error
  row of the stage's errors table (id -> fragments of its reason, which name where it came from).

Nothing may crash with an unrelated exception, and nothing bad may pass silently. Add a row when a
new bad input turns up; add a table for a new input kind. All of it runs without Ray.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from fixtures_data import COCO_MINI_ANNOTATIONS, REPO, coco_mini_dir, make_voc_tree

from ray_wsss.core.errors import WsssError
from ray_wsss.stages.evaluate import EvaluateConfig
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig
from ray_wsss.stages.make_masks import MakeMasksConfig
from ray_wsss.stages.pipeline import PipelineConfig
from ray_wsss.stages.prepare_data import PrepareConfig, list_records
from ray_wsss.stages.segment import SegmentConfig
from ray_wsss.stages.train_acr import TrainClassifierConfig
from ray_wsss.stages.train_deeplab import TrainDeepLabConfig
from ray_wsss.stages.tune_acr import TuneACRConfig

sys.path.insert(0, str(REPO / "jobs"))
_cli = importlib.import_module("_cli")


@dataclasses.dataclass(frozen=True)
class Fails:
    fragments: tuple[str, ...]
    error: type[Exception] = WsssError


@dataclasses.dataclass(frozen=True)
class Listed:
    records: dict[str, list[str]]
    errors: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _check(outcome: Fails | Listed, produce: Callable[[], Any]) -> None:
    if isinstance(outcome, Fails):
        with pytest.raises(outcome.error) as info:
            produce()
        for fragment in outcome.fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
        return
    records, errors = produce()
    by_split: dict[str, list[str]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record["image_id"])
    assert by_split == outcome.records
    reasons = dict(errors)
    assert len(reasons) == len(errors), f"an id has two error rows: {errors}"
    assert sorted(reasons) == sorted(outcome.errors), reasons
    for image_id, fragments in outcome.errors.items():
        for fragment in fragments:
            assert fragment in reasons[image_id], (image_id, fragment, reasons[image_id])


# ---------------------------------------------------------------- prepare --format voc: split lists

GOOD = ["2007_000032", "2007_000039", "2007_000063", "2007_000068"]  # fixtures_data's tree
UNREAD = "; not read"

VOC_SPLIT_LISTS = [
    ("id in two splits", {"train": "\n".join(GOOD), "val": "2007_000068\n2007_000032\n"},
     Listed({"train": GOOD[1:3]}, {
         "2007_000032": ("train.txt line 1 and ", "val.txt line 2", "more than one split"),
         "2007_000068": ("train.txt line 4 and ", "val.txt line 1")})),
    ("id repeated in one split", {"train": "2007_000032\n2007_000039\n2007_000032\n"},
     Listed({"train": GOOD[:2]})),
    ("id with a space", {"train": "2007_000032\n2007 000039\n"},
     Listed({"train": GOOD[:1]}, {"2007 000039": ("train.txt line 2", "no spaces", UNREAD)})),
    ("label column of ImageSets/Main", {"train": "2007_000032 -1\n2007_000039  1\n2007_000063\t0\n"},
     Listed({"train": GOOD[:3]})),
    ("unknown second column", {"train": "2007_000032 yes\n2007_000039\n"},
     Listed({"train": GOOD[1:2]}, {"2007_000032 yes": ("train.txt line 1", "-1/0/1 label column")})),
    ("UTF-8 byte-order mark", {"train": b"\xef\xbb\xbf2007_000032\r\n2007_000039\r\n"},
     Listed({"train": GOOD[:2]})),
    ("../ outside --src", {"train": "2007_000032\n../../../../etc/passwd\n"},
     Listed({"train": GOOD[:1]}, {"../../../../etc/passwd": ("train.txt line 2", "'..'", "outside the source root")})),
    ("absolute path", {"train": "/etc/passwd\n2007_000039\n"},
     Listed({"train": GOOD[1:2]}, {"/etc/passwd": ("train.txt line 1", "absolute path")})),
    ("id with a folder", {"train": "JPEGImages/2007_000032\n2007_000039\n"},
     Listed({"train": GOOD[1:2]}, {"JPEGImages/2007_000032": ("line 1", "no folders")})),
    ("backslash", {"train": "..\\..\\secret\n2007_000039\n"},
     Listed({"train": GOOD[1:2]}, {"..\\..\\secret": ("line 1", "backslash")})),
    ("a URI", {"train": "s3://other-bucket/x\n2007_000039\n"},
     Listed({"train": GOOD[1:2]}, {"s3://other-bucket/x": ("line 1", "URI")})),
    ("not UTF-8", {"train": b"2007_000032\n" + b"caf\xe9\n"},
     Fails(("train.txt", "is not UTF-8", "line 2, byte 15"))),
    ("no valid line", {"train": "my image\n"},
     Fails(("split train lists no images", "train.txt line 1", "1 lines refused"))),
]


@pytest.mark.parametrize("split_files, outcome", [pytest.param(f, o, id=n) for n, f, o in VOC_SPLIT_LISTS])
def test_prepare_voc_split_lists(tmp_path, split_files, outcome):
    tree = make_voc_tree(tmp_path / "VOC2012")
    for split, text in split_files.items():
        path = tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / f"{split}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    cfg = PrepareConfig(format="voc", src=tree["root"], split=",".join(split_files))
    _check(outcome, lambda: list_records(cfg)[:2])


# ---------------------------------------------------------------- prepare --format coco: images entries

def _coco_subset() -> dict:
    """The first four images of coco-mini with their annotations."""
    coco_mini_dir()
    dataset = json.loads(COCO_MINI_ANNOTATIONS.read_text())
    images = dataset["images"][:4]
    keep = {image["id"] for image in images}
    return {**dataset, "images": images, "annotations": [a for a in dataset["annotations"] if a["image_id"] in keep]}


SUBSET = _coco_subset()
STEMS = [image["file_name"].rsplit(".", 1)[0] for image in SUBSET["images"]]
IDS = [image["id"] for image in SUBSET["images"]]


def _edit_image(index: int, **fields) -> Callable[[dict], None]:
    def edit(dataset: dict) -> None:
        dataset["images"][index].update(fields)
    return edit


def _drop_field(index: int, field: str) -> Callable[[dict], None]:
    return lambda dataset: dataset["images"][index].pop(field)


def _append_image(**fields) -> Callable[[dict], None]:
    return lambda dataset: dataset["images"].append({**dataset["images"][0], **fields})


def _append_orphan(dataset: dict) -> None:
    dataset["annotations"].append({**dataset["annotations"][0], "id": 99_999_999, "image_id": 123})


COCO_IMAGES = [
    ("file_name in a folder", _edit_image(0, file_name=f"train2017/{STEMS[0]}.jpg"), Listed({"train": STEMS})),
    ("two entries with one id", _append_image(file_name="copy.jpg"),
     Listed({"train": STEMS[1:]}, {
         STEMS[0]: (f"COCO image id {IDS[0]} is listed 2 times", f"'{STEMS[0]}.jpg', 'copy.jpg'"),
         "copy": (f"COCO image id {IDS[0]} is listed 2 times", "cannot be told apart")})),
    ("two images with one stem", _edit_image(1, file_name=f"other/{STEMS[0]}.png"),
     Listed({"train": STEMS[2:]}, {STEMS[0]: (f"'{STEMS[0]}.jpg' (COCO image id {IDS[0]})",
                                              f"'other/{STEMS[0]}.png' (COCO image id {IDS[1]})", "unique")})),
    ("no file_name", _drop_field(2, "file_name"),
     Listed({"train": STEMS[:2] + STEMS[3:]}, {str(IDS[2]): (f"COCO image id {IDS[2]}", "has no 'file_name'")})),
    ("file_name not a string", _edit_image(0, file_name=5),
     Listed({"train": STEMS[1:]}, {str(IDS[0]): ("is a int, not a file name",)})),
    ("../ outside --src", _edit_image(0, file_name="../../../../etc/passwd.jpg"),
     Listed({"train": STEMS[1:]}, {str(IDS[0]): ("'..'", "outside the source root")})),
    ("absolute file_name", _edit_image(0, file_name="/etc/passwd"),
     Listed({"train": STEMS[1:]}, {str(IDS[0]): ("absolute path",)})),
    ("a URI as file_name", _edit_image(0, file_name="s3://other-bucket/a.jpg"),
     Listed({"train": STEMS[1:]}, {str(IDS[0]): ("URI",)})),
    ("no stem", _edit_image(0, file_name="train2017/.jpg"),
     Listed({"train": STEMS[1:]}, {str(IDS[0]): ("no name before its extension",)})),
    ("no height", _drop_field(3, "height"),
     Listed({"train": STEMS[:3]}, {str(IDS[3]): (f"COCO image id {IDS[3]}", "has no 'height'")})),
    ("width not a number", _edit_image(3, width="640"),
     Listed({"train": STEMS[:3]}, {str(IDS[3]): ("width '640', not a positive integer",)})),
    ("orphan annotation", _append_orphan,
     Listed({"train": STEMS}, {"123": ("annotation 99999999 names image id 123", "not in the annotations' images")})),
    ("no readable image", lambda d: [image.pop("file_name") for image in d["images"]],
     Fails(("lists no images that can be read", "4 refused", "has no 'file_name'"))),
]


@pytest.mark.parametrize("edit, outcome", [pytest.param(e, o, id=n) for n, e, o in COCO_IMAGES])
def test_prepare_coco_images(tmp_path, edit, outcome):
    dataset = copy.deepcopy(SUBSET)
    edit(dataset)
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))
    cfg = PrepareConfig(format="coco", src=str(coco_mini_dir() / "images"), annotations=str(annotations),
                        split="train")
    _check(outcome, lambda: list_records(cfg)[:2])


# ---------------------------------------------------------------- job configs: a YAML file, then flags

def _parse_fails(capsys, cls: type, argv: list[str], fragments: tuple[str, ...]) -> None:
    """The job refuses the config at once: argparse's exit status 2 and a message with every fragment."""
    with pytest.raises(SystemExit) as info:
        _cli.parse_config(cls, "", argv)
    assert info.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


CONFIG_YAML = [
    ("threshold: high", MakeMasksConfig, "threshold: high\n", ("threshold = 'high'", "expected a number")),
    ('crf: "no"', MakeMasksConfig, 'crf: "no"\n', ("crf = 'no'", "expected true or false")),
    ("crf: 0", MakeMasksConfig, "crf: 0\n", ("crf = 0", "true or false")),
    ('batch_size: "abc"', PrepareConfig, 'batch_size: "abc"\n', ("batch_size = 'abc'", "an integer")),
    ("batch_size: true", PrepareConfig, "batch_size: true\n", ("batch_size = True", "an integer")),
    ("epochs: 1.5", TrainClassifierConfig, "epochs: 1.5\n", ("epochs = 1.5", "an integer")),
    ("lr: .nan", TrainClassifierConfig, "lr: .nan\n", ("lr = nan", "a number")),
    ("split: 5", PrepareConfig, "split: 5\n", ("split = 5", "a string")),
    ("format not a choice", PrepareConfig, "format: pdf\n",
     ("format = 'pdf'", "['synthetic', 'shapes', 'voc', 'coco']")),
    ("scales not a list", ExtractSeedsConfig, "scales: 1.0\n", ("scales = 1.0", "a list of numbers")),
    ("scales item not a number", ExtractSeedsConfig, "scales: [1.0, big]\n", ("scales = [1.0, 'big']",)),
    ("misspelt key", EvaluateConfig, "thresold: 0.3\n", ("unknown keys ['thresold']", "'threshold'")),
    ("one key spelt twice", PrepareConfig, "batch-size: 4\nbatch_size: 8\n", ("'batch_size' is given twice",)),
    ("storage key misspelt", PrepareConfig, "storage: {endpont_url: http://x}\n",
     ("storage: unknown keys ['endpont_url']",)),
    ("storage not a mapping", PrepareConfig, "storage: http://minio:9000\n",
     ("storage = 'http://minio:9000'", "a mapping with keys among ['endpoint_url'")),
    ("a list, not a mapping", PrepareConfig, "- out\n- data\n", ("expected a mapping of config keys",)),
    ("not YAML", PrepareConfig, "split: [train\n", ("is not valid YAML",)),
    ("min_size > max_size", PrepareConfig, "min_size: 8\nmax_size: 4\n", ("min_size 8, max_size 4",)),
    ("synthetic option with voc", PrepareConfig, "format: voc\nmax_size: 64\n",
     ("max_size: generator settings, for formats ['synthetic', 'shapes'] only (not voc)",)),
    ("no split named", PrepareConfig, "split: ' , '\n", ("names no split",)),
    ("pipeline section", PipelineConfig, "masks: {crf: 'no'}\n", ("the `masks:` section", "crf = 'no'")),
    ("pipeline section key", PipelineConfig, "seeds: {scale: [1.0]}\n", ("the `seeds:` section", "['scale']")),
    ("tune section", TuneACRConfig, "train: {weight_decay: lots}\n", ("the `train:` section", "weight_decay = 'lots'")),
    ("threshold: 1.5", EvaluateConfig, "threshold: 1.5\n", ("threshold = 1.5", "a number in [0, 1] or null")),
    ("lr: 0", TrainClassifierConfig, "lr: 0\n", ("lr = 0", "a number > 0")),
    ("momentum: 1.5", TrainDeepLabConfig, "momentum: 1.5\n", ("momentum = 1.5", "in [0, 1]")),
    ("epochs: 0", TrainDeepLabConfig, "epochs: 0\n", ("epochs = 0", "an integer >= 1")),
    ("max_failures: -2", TrainClassifierConfig, "max_failures: -2\n", ("max_failures = -2", ">= -1")),
    ("scales: [0]", ExtractSeedsConfig, "scales: [1.0, 0]\n", ("scales = [1.0, 0]", "a list of numbers > 0")),
    ("reduction_factor: 1", TuneACRConfig, "reduction_factor: 1\n", ("reduction_factor = 1", "a number > 1")),
    ("pipeline section range", PipelineConfig, "masks: {threshold: 2}\n",
     ("the `masks:` section", "threshold = 2", "in [0, 1]")),
]


@pytest.mark.parametrize("cls, text, fragments", [pytest.param(c, t, f, id=n) for n, c, t, f in CONFIG_YAML])
def test_config_yaml(tmp_path, capsys, cls, text, fragments):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    _parse_fails(capsys, cls, ["--config", str(path)], (*fragments, str(path)))


CONFIG_FLAGS = [
    ("--threshold high", MakeMasksConfig, ["--threshold", "high"], ("--threshold", "invalid float value: 'high'")),
    ("--format pdf", PrepareConfig, ["--format", "pdf"], ("--format", "invalid choice: 'pdf'")),
    ("--threshold 1.5", MakeMasksConfig, ["--threshold", "1.5"], ("--threshold: threshold = 1.5", "in [0, 1]")),
    ("--threshold -0.5", EvaluateConfig, ["--threshold", "-0.5"], ("--threshold: threshold = -0.5", "in [0, 1]")),
    ("--max-errors -1", PrepareConfig, ["--max-errors", "-1"], ("--max-errors: max_errors = -1", "an integer >= 0")),
    ("--batch-size 0", PrepareConfig, ["--batch-size", "0"], ("--batch-size: batch_size = 0", "an integer >= 1")),
    ("--num-actors 0", SegmentConfig, ["--num-actors", "0"], ("num_actors = 0", ">= 1 or null")),
    ("--min-size 8 --max-size 4", PrepareConfig, ["--min-size", "8", "--max-size", "4"],
     ("min_size 8, max_size 4", "32 <= min_size <= max_size")),
    ("--config that does not exist", PrepareConfig, ["--config", "/nonexistent/job.yaml"],
     ("file not found: /nonexistent/job.yaml",)),
]


@pytest.mark.parametrize("cls, argv, fragments", [pytest.param(c, a, f, id=n) for n, c, a, f in CONFIG_FLAGS])
def test_config_flags(capsys, cls, argv, fragments):
    _parse_fails(capsys, cls, argv, fragments)
