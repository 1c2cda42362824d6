"""Pretrain the classifier's backbone on a whole-object task: a stand-in for ImageNet weights.

The papers start from ImageNet weights, whose attention already groups whole objects; a from-scratch
backbone does not. This stage renders the shapes task (:mod:`ray_wsss.core.data.shapes`: categories
told apart by their whole outline, not by a small part) into sample shards under ``<out>/data`` (the
prepare stage's ``shapes`` format), trains the classifier's own model on it through the classifier
stage's training loop (``train_acr.fit_classifier``: Ray Train, the same harness, checkpoints under
``<out>/<name>/``), and writes the trained ViT without its head (the class count differs) as
``<out>/backbone.safetensors`` in timm's keys: a file the classifier's ``weights:`` loads.

Whether this start helps the WSSS classifier is not measured yet (issue 17).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from safetensors.torch import save as safetensors_bytes

from ray_wsss.core import checkpoints, commit, ownership, storage, weights
from ray_wsss.core.config import option
from ray_wsss.core.errors import WsssError
from ray_wsss.core.models.vit import HEAD_PREFIXES
from ray_wsss.harness import training
from ray_wsss.stages import prepare_data, train_acr

STAGE = "pretrain"
DATA_DIR = "data"                      # the rendered task, inside the stage's out
BACKBONE_FILE = "backbone.safetensors"
TASK_SETTINGS = ("format", "seed", "num_train", "num_val", "hue_cue")  # prepare's fields that make the task
# Objectives on the shapes task; both train a single-class-token ViT, whose weights every method loads.
METHODS = ("baseline", "acr")
# The classifier's model fields: a backbone made for a classifier must be built as it is.
MODEL_FIELDS = ("model", "img_size", "patch_size", "depth", "embed_dim", "num_heads", "pre_norm_head")


@dataclasses.dataclass
class PretrainConfig(train_acr.TrainClassifierConfig):
    out: str = option("runs/default/pretrain", "output URI: the rendered task (<out>/data), checkpoints and "
                                               f"{BACKBONE_FILE}")
    data: str | None = option(None, "not an option here: the stage renders its own task into <out>/data")
    name: str = option("pretrain", "run name; rerunning with the same name resumes")
    method: str = option("baseline", "objective on the shapes task: baseline (multi-label loss) or acr (plus its "
                                     "consistency terms)", choices=METHODS)
    shapes_seed: int = option(0, "shapes generator seed", min=0)
    num_train: int | None = option(None, "shapes train images (default: the generator's)", min=1)
    num_val: int | None = option(None, "shapes held-out images (default: the generator's)", min=1)
    hue_cue: bool = option(True, "each shape category also has its own hue: without it a from-scratch ViT did not "
                                 "start learning the task in 3 epochs (experiments/recipe_search.py, variants "
                                 "shapes and shapes-hue)")

    def __post_init__(self) -> None:
        if self.data is not None or self.val_data is not None:
            raise ValueError(f"pretrain renders its own task into <out>/{DATA_DIR}: data and val_data are not "
                             f"options of it (got data={self.data!r}, val_data={self.val_data!r})")

    def classifier_config(self, data: str) -> train_acr.TrainClassifierConfig:
        """The same training as the classifier stage's config, on ``data``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(train_acr.TrainClassifierConfig)}
        return train_acr.TrainClassifierConfig(**{**fields, "data": data})

    def prepare_config(self, data: str) -> prepare_data.PrepareConfig:
        return prepare_data.PrepareConfig(out=data, format="shapes", seed=self.shapes_seed, num_train=self.num_train,
                                          num_val=self.num_val, hue_cue=self.hue_cue, storage=self.storage,
                                          break_lock=self.break_lock)


@ownership.owns_output(STAGE, inputs=("weights",))
def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Render the task (once), train on it, export the backbone, commit; -> the job summary (``weights``:
    the backbone file)."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    started = time.time()
    data = storage.join(cfg.out, DATA_DIR)
    commit.claim(cfg.out, STAGE, cfg.storage, dirs=[DATA_DIR])  # the task folder is the stage's before it exists
    if commit.is_committed(data, cfg.storage):
        check_rendered(cfg, data)
    else:
        prepare_data.run(cfg.prepare_config(data))
    checkpoint_path = train_acr.fit_classifier(cfg.classifier_config(data), STAGE)
    backbone = export_backbone(cfg, training.checkpoint_uri_for(cfg.out, checkpoint_path))
    return training.finish(cfg, checkpoint_path, started, {"stage": STAGE, "method": cfg.method, "weights": backbone})


def check_rendered(cfg: PretrainConfig, data: str) -> None:
    """A task rendered before with other generator settings would be trained on silently: refuse it."""
    wanted = dataclasses.asdict(cfg.prepare_config(data))
    rendered = storage.read_json(storage.join(data, "dataset.json"), cfg.storage)["config"]
    differ = {k: (rendered.get(k), wanted[k]) for k in TASK_SETTINGS if rendered.get(k) != wanted[k]}
    if differ:
        shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise WsssError(f"{data} holds the shapes task rendered with other settings ({shown}); rerun with those, "
                        "or give another --out")


def export_backbone(cfg: PretrainConfig, checkpoint_uri: str) -> str:
    """The checkpoint's ViT in timm's keys without its head, as ``<out>/backbone.safetensors``; -> its URI."""
    state = checkpoints.load_state(checkpoint_uri, cfg.storage)
    timm_keys = weights.vit_state_dict(state["model"], checkpoint_uri)
    backbone = {k: v.contiguous() for k, v in timm_keys.items() if not k.startswith(HEAD_PREFIXES)}
    commit.write_output(cfg.out, BACKBONE_FILE, safetensors_bytes(backbone), cfg.storage)
    return storage.join(cfg.out, BACKBONE_FILE)
