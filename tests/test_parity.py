"""Numeric parity with the authors' code (ACR 530a59d, MCTformer 9606597) on their golden outputs.

The fixture directory (``$RAY_WSSS_PARITY_DIR``, default ``tests/fixtures/parity``; its README says
what every array is) holds the authors' weight files and what their code computed with them. These
tests load those weights through the project's own loader (``ray_wsss.core.weights``), run the
project's code under the paper options and compare within the README's tolerances. Everything is
read from the directory (image names, sizes, classes, settings from ``metadata.json``, keys from
``fixtures.pt``), so another set made the same way (other seeds, other sizes) is checked as it is.

``RAY_WSSS_PARITY_REPORT=<path>`` writes the table quantity | max abs diff | tolerance there.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_wsss.core.methods import MapOptions, get_method
from ray_wsss.core.methods.acr import ACRLossConfig, classification_loss
from ray_wsss.core.methods.views import draw_view
from ray_wsss.core.metrics import ThresholdSweep, parse_threshold_grid, pick_threshold
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.core.seeds.acr_maps import ACRMapConfig, class_maps
from ray_wsss.core.seeds.mct_maps import MCTMapConfig, maps_from_output
from ray_wsss.core.seeds.tta import TTAConfig, pillow_resize, view_input, view_size

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("RAY_WSSS_PARITY_DIR", REPO / "tests" / "fixtures" / "parity"))

# The README's tolerances.
RAW_REL = 1e-5      # logits and raw maps: relative to the largest reference value
NORMALISED = 1e-4   # min-max normalised maps and seeds (values in [0, 1]): absolute
LOSS_REL = 1e-5     # losses: relative
CURVE = 1e-6        # evaluation curves: percentage points (the chosen threshold: exactly)

# Constants of the authors' code that the README states (they are not per-set settings).
ACR_MINMAX_EPS = 1e-6
MCT_MINMAX_EPS = 1e-8
PRINTED_DECIMALS = 3  # MCTformer's curve prints the best mIoU with 3 decimals


@cache
def fixtures() -> dict:
    return torch.load(PARITY_DIR / "fixtures.pt", map_location="cpu", weights_only=True)


@cache
def metadata() -> dict:
    return json.loads((PARITY_DIR / "metadata.json").read_text())


def image_names() -> list[str]:
    return list(fixtures()["image_names"])


def eval_cases() -> list[str]:
    return sorted({key.split("/")[1] for key in fixtures() if key.startswith("eval/")})


def mct_versions() -> list[str]:
    return sorted({match[1] for key in fixtures() if (match := re.match(r"mct_(v\d+)/", key))})


def image(name: str) -> tuple[np.ndarray, list[int]]:
    fx = fixtures()
    return fx[f"image/{name}/rgb"].numpy(), fx[f"image/{name}/classes"].tolist()


# ---------------------------------------------------------------- comparison and the report table

_TABLE: dict[str, dict] = defaultdict(lambda: {"diff": 0.0, "ratio": 0.0, "rule": ""})


def check(quantity: str, ours: torch.Tensor | np.ndarray | float, reference, rule: str) -> None:
    """Assert ``ours`` matches ``reference`` under ``rule`` ("raw", "normalised", "loss", "curve") and
    record the largest absolute difference for the report table."""
    ours_t = torch.as_tensor(np.asarray(ours), dtype=torch.float64)
    ref_t = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    assert ours_t.shape == ref_t.shape, f"{quantity}: shape {tuple(ours_t.shape)} != {tuple(ref_t.shape)}"
    scale = float(ref_t.abs().max()) if ref_t.numel() else 0.0
    tolerance, text = {
        "raw": (RAW_REL * scale, f"{RAW_REL:g} x max|ref|"),
        "loss": (LOSS_REL * scale, f"{LOSS_REL:g} relative"),
        "normalised": (NORMALISED, f"{NORMALISED:g} abs"),
        "curve": (CURVE, f"{CURVE:g} points"),
    }[rule]
    diff = float((ours_t - ref_t).abs().max()) if ref_t.numel() else 0.0
    row = _TABLE[quantity]
    row["diff"] = max(row["diff"], diff)
    row["ratio"] = max(row["ratio"], diff / tolerance if tolerance else (0.0 if diff == 0 else float("inf")))
    row["rule"] = text
    assert diff <= tolerance, f"{quantity}: max abs diff {diff:.3g} > tolerance {tolerance:.3g} ({text})"


@pytest.fixture(scope="module", autouse=True)
def report_table():
    yield
    path = os.environ.get("RAY_WSSS_PARITY_REPORT")
    if path:
        lines = ["| quantity | max abs diff | tolerance | worst diff / tolerance |", "|---|---|---|---|"]
        lines += [f"| {q} | {r['diff']:.3g} | {r['rule']} | {r['ratio']:.3g} |" for q, r in sorted(_TABLE.items())]
        Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- models, loaded through the project's loader

def _vit_config(weights_file: str, **options) -> ViTConfig:
    model = metadata()["model"]
    return ViTConfig(model_name="vit_tiny_patch16_224", img_size=model["img_size"], patch_size=model["patch_size"],
                     depth=model["depth"], embed_dim=model["embed_dim"], num_heads=model["num_heads"],
                     weights=str(PARITY_DIR / weights_file), **options)


def _check_architecture(vit: torch.nn.Module) -> None:
    """What loading cannot see: the block settings of the authors' model (README, metadata)."""
    model = metadata()["model"]
    block = vit.blocks[0]
    assert block.mlp.fc1.out_features == model["embed_dim"] * model["mlp_ratio"]
    assert (block.attn.qkv.bias is not None) == model["qkv_bias"]
    assert block.norm1.eps == model["layernorm_eps"]


@cache
def acr_model() -> torch.nn.Module:
    # The paper options: the authors' head reads the class token before the final LayerNorm.
    model = get_method("acr").build_model(_vit_config("weights_acr.pt", pre_norm_head=True),
                                          metadata()["model"]["num_classes"])
    _check_architecture(model.vit)
    return model.eval()


@cache
def mct_model(version: str) -> torch.nn.Module:
    # The paper options: the authors' position-embedding rule and their patch conv's partial patches.
    model = get_method(f"mct-{version}").build_model(
        _vit_config(f"weights_mct_{version}.pt", pos_embed_resampler="mctformer", partial_patches="drop"),
        metadata()["model"]["num_classes"])
    _check_architecture(model)
    return model.eval()


# ---------------------------------------------------------------- ACR

def acr_settings() -> dict:
    return metadata()["acr_settings"]


def acr_tta() -> TTAConfig:
    settings = acr_settings()
    return TTAConfig(scales=tuple(float(s) for s in settings["scales"]), flip=True, base_size=settings["crop_size"],
                     resize="square", align_corners=True, minmax_eps=ACR_MINMAX_EPS)


def acr_input(name: str) -> torch.Tensor:
    """The authors' preprocessed input of ``name``: the project's square view at the crop size."""
    rgb, _ = image(name)
    size = view_size(*rgb.shape[:2], 1.0, acr_model().patch_size, acr_tta())
    return view_input(rgb, size, "square")


def acr_map_options(refine: bool) -> MapOptions:
    settings = acr_settings()
    assert settings["getam_func"] == "grad", "only the gradient maps (--getam_func grad) are implemented"
    return MapOptions(layers=metadata()["model"]["depth"] - settings["start_layer"], refine=refine,
                      layer_reduction="sum")


@pytest.mark.parametrize("name", image_names())
def test_acr_input_is_the_authors_tensor(name):
    x = acr_input(name).double()
    fingerprint = torch.stack([x.sum(), (x * x).sum(), x.min(), x.max()])
    check("acr input_stats", fingerprint, fixtures()[f"acr/{name}/input_stats"], "raw")


@pytest.mark.parametrize("name", image_names())
def test_acr_logits(name):
    x = acr_input(name)
    with torch.no_grad():
        logits = acr_model()(torch.stack([x, x.flip(-1)])).logits
    check("acr logits", logits[0], fixtures()[f"acr/{name}/logits"], "raw")
    check("acr logits_hflip", logits[1], fixtures()[f"acr/{name}/logits_hflip"], "raw")


@pytest.mark.parametrize("key,refine", [("grad_maps", False), ("refined_maps", True)])
@pytest.mark.parametrize("name", image_names())
def test_acr_raw_maps(name, key, refine):
    """The authors' maps before normalisation, in their convention (blocks summed)."""
    _, classes = image(name)
    x = acr_input(name)
    options = acr_map_options(refine)
    cfg = ACRMapConfig(grad_layers=options.layers, refine=refine, layer_reduction=options.layer_reduction)
    plain, flipped = class_maps(acr_model(), torch.stack([x, x.flip(-1)]), [classes, classes], cfg)
    check(f"acr {key}", plain, fixtures()[f"acr/{name}/{key}"], "raw")
    check(f"acr {key}_hflip", flipped, fixtures()[f"acr/{name}/{key}_hflip"], "raw")


@pytest.mark.parametrize("key,refine", [("seeds", True), ("seeds_acrstar", False)])
@pytest.mark.parametrize("name", image_names())
def test_acr_seeds(name, key, refine):
    rgb, classes = image(name)
    seeds = get_method("acr").seed_scores(acr_model(), [rgb], [classes], acr_map_options(refine), acr_tta())[0]
    check(f"acr {key}", seeds, fixtures()[f"acr/{name}/{key}"], "normalised")


def test_acr_losses_with_the_hflip_view():
    fx = fixtures()
    name, labels = fx["acr/loss/image"], fx["acr/loss/label"]
    x = acr_input(name)[None]
    model, method = acr_model(), get_method("acr")
    view = draw_view("hflip", torch.Generator().manual_seed(0))
    model.train()  # the authors' loss runs in training mode (dropout and drop path are 0)
    try:
        out1 = model(x)
        out2 = model(view.apply(x, model.patch_size[0]))
        losses = method.two_view_losses(out1, out2, view, labels,
                                        ACRLossConfig(alpha=fx["acr/loss/alpha"], beta=fx["acr/loss/beta"]))
    finally:
        model.eval()
    check("acr loss logits_view1", out1.logits[0].detach(), fx["acr/loss/logits_view1"], "raw")
    check("acr loss logits_view2", out2.logits[0].detach(), fx["acr/loss/logits_view2"], "raw")
    check("acr loss Lcls_view1", classification_loss(out1.logits, labels).item(), fx["acr/loss/Lcls_view1"], "loss")
    check("acr loss Lcls_view2", classification_loss(out2.logits, labels).item(), fx["acr/loss/Lcls_view2"], "loss")
    for ours, theirs in (("cls", "Lcls"), ("act", "Lact"), ("aff", "Laff"), ("total", "total")):
        check(f"acr loss {theirs}", losses[ours].item(), fx[f"acr/loss/{theirs}"], "loss")


# ---------------------------------------------------------------- MCTformer

def mct_settings() -> dict:
    return metadata()["mct_settings"]


def mct_map_options() -> MapOptions:
    return MapOptions(layers=mct_settings()["layer_index"])


def mct_map_config(refine: bool) -> MCTMapConfig:
    return MCTMapConfig(last_layers=mct_settings()["layer_index"], refine=refine,
                        map_type=mct_settings()["attention_type"])


def mct_tta(scales: list[float]) -> TTAConfig:
    return TTAConfig(scales=tuple(scales), flip=True, resize="pillow", align_corners=False, minmax_eps=MCT_MINMAX_EPS)


def mct_view(name: str, scale: float, stored: bool) -> torch.Tensor:
    """The normalised scale view of ``name``: the authors' stored resize (``stored``) or the project's."""
    rgb, _ = image(name)
    size = view_size(*rgb.shape[:2], scale, (metadata()["model"]["patch_size"],) * 2, mct_tta([scale]))
    key = f"mct_views/{name}/{scale}"
    if stored and key in fixtures():
        rgb = fixtures()[key].numpy()
        assert rgb.shape[:2] == size, f"{key}: stored view {rgb.shape[:2]} is not round(side * scale) {size}"
    return view_input(rgb, size, "pillow")


@pytest.mark.parametrize("name", image_names())
@pytest.mark.parametrize("version", mct_versions())
def test_mct_logits(version, name):
    x = mct_view(name, 1.0, stored=True)
    with torch.no_grad():
        out = mct_model(version)(x[None])
    check(f"mct_{version} logits", out.logits[0], fixtures()[f"mct_{version}/{name}/logits"], "raw")
    key = f"mct_{version}/{name}/patch_logits"
    assert (key in fixtures()) == (out.patch_logits is not None)
    if out.patch_logits is not None:
        check(f"mct_{version} patch_logits", out.patch_logits[0], fixtures()[key], "raw")


@pytest.mark.parametrize("key,refine", [("maps", False), ("refined_maps", True)])
@pytest.mark.parametrize("name", image_names())
@pytest.mark.parametrize("version", mct_versions())
def test_mct_maps_of_every_class(version, name, key, refine):
    x = mct_view(name, 1.0, stored=True)
    with torch.no_grad():
        maps = maps_from_output(mct_model(version)(torch.stack([x, x.flip(-1)])), mct_map_config(refine))
    check(f"mct_{version} {key}", maps[0], fixtures()[f"mct_{version}/{name}/{key}"], "raw")
    check(f"mct_{version} {key}_hflip", maps[1], fixtures()[f"mct_{version}/{name}/{key}_hflip"], "raw")


@pytest.mark.parametrize("stored", [True, False], ids=["stored-views", "own-resize"])
@pytest.mark.parametrize("name", image_names())
@pytest.mark.parametrize("version", mct_versions())
def test_mct_multiscale_view_maps(version, name, stored):
    """Every view of the multi-scale run, from the authors' resized images and from the project's resize."""
    _, classes = image(name)
    method, model = get_method(f"mct-{version}"), mct_model(version)
    for scale in mct_settings()["scales_multi"]:
        x = mct_view(name, scale, stored)
        plain, flipped = method.class_maps(model, torch.stack([x, x.flip(-1)]), [classes, classes], mct_map_options())
        prefix = f"mct_{version}/{name}/ms_view_maps/{scale}"
        check(f"mct_{version} ms_view_maps/{scale}", plain, fixtures()[prefix], "raw")
        check(f"mct_{version} ms_view_maps/{scale}_hflip", flipped, fixtures()[f"{prefix}_hflip"], "raw")


@pytest.mark.parametrize("name", image_names())
def test_mct_pillow_resize_is_the_authors(name):
    """The project's Pillow bicubic at round(side * scale) gives the authors' resized images, pixel for pixel."""
    rgb, _ = image(name)
    views = [key for key in fixtures() if key.startswith(f"mct_views/{name}/")]
    assert views, f"no stored views of {name}"
    for key in views:
        scale = float(key.rsplit("/", 1)[1])
        size = view_size(*rgb.shape[:2], scale, (metadata()["model"]["patch_size"],) * 2, mct_tta([scale]))
        ours = pillow_resize(rgb, size).astype(np.int16)
        theirs = fixtures()[key].numpy().astype(np.int16)
        assert ours.shape == theirs.shape, f"{key}: {ours.shape} != {theirs.shape}"
        _TABLE["mct_views (uint8 pixels)"].update(diff=float(np.abs(ours - theirs).max()), rule="exact")
        np.testing.assert_array_equal(ours, theirs, err_msg=key)


@pytest.mark.parametrize("key,scales", [("seeds_s1", "scales_single"), ("seeds_ms", "scales_multi")])
@pytest.mark.parametrize("name", image_names())
@pytest.mark.parametrize("version", mct_versions())
def test_mct_seeds(version, name, key, scales):
    rgb, classes = image(name)
    seeds = get_method(f"mct-{version}").seed_scores(mct_model(version), [rgb], [classes], mct_map_options(),
                                                     mct_tta(mct_settings()[scales]))[0]
    check(f"mct_{version} {key}", seeds, fixtures()[f"mct_{version}/{name}/{key}"], "normalised")


# ---------------------------------------------------------------- evaluation

def sweep(case: str, grid: list[float]) -> ThresholdSweep:
    fx = fixtures()
    num_classes = fx[f"eval/{case}/per_class_iou"].shape[1]
    result = ThresholdSweep(num_classes, parse_threshold_grid(":".join(str(v) for v in grid)))
    for name in fx[f"eval/{case}/names"]:
        prefix = f"eval/{case}/{name}/"
        result.add(fx[prefix + "scores"].numpy(), fx[prefix + "classes"].numpy(), fx[prefix + "gt"].numpy())
    return result


@pytest.mark.parametrize("case", eval_cases())
def test_mctformer_evaluation_curve(case):
    fx, prefix = fixtures(), f"eval/{case}/"
    result = sweep(case, metadata()["eval_thresholds"]["mctformer_curve"])
    np.testing.assert_array_equal(result.thresholds, fx[prefix + "thresholds"].numpy())
    gt_present = np.flatnonzero(result.confusion_at(0).counts.sum(axis=1))
    np.testing.assert_array_equal(gt_present, fx[prefix + "gt_classes_present"].numpy())
    rows = [result.confusion_at(i).scores(mean_over="all") for i in range(len(result.thresholds))]
    miou = np.array([row["miou"] for row in rows]) * 100
    check("eval miou", miou, fx[prefix + "miou"], "curve")
    check("eval fp", np.array([row["fp"] for row in rows]) * 100, fx[prefix + "fp"], "curve")
    check("eval fn", np.array([row["fn"] for row in rows]) * 100, fx[prefix + "fn"], "curve")
    per_class = np.array([list(row["per_class"].values()) for row in rows]) * 100
    check("eval per_class_iou", per_class, fx[prefix + "per_class_iou"], "curve")

    index, evaluated = pick_threshold(list(miou), "early-stop")
    assert result.thresholds[index] == fx[prefix + "best_threshold"]
    assert evaluated == fx[prefix + "curve_steps_run"]
    best = result.best(mean_over="all", pick="early-stop")
    assert best["threshold"] == fx[prefix + "best_threshold"]
    assert abs(best["miou"] * 100 - fx[prefix + "best_miou_printed"]) <= 0.5 * 10 ** -PRINTED_DECIMALS + 1e-9


@pytest.mark.parametrize("case", eval_cases())
def test_acr_evaluation_curve(case):
    fx, prefix = fixtures(), f"eval/{case}/"
    result = sweep(case, metadata()["eval_thresholds"]["acr_curve"])
    np.testing.assert_array_equal(result.thresholds, fx[prefix + "acr_thresholds"].numpy())
    check("eval acr_miou", [miou * 100 for _, miou in result.curve("all")], fx[prefix + "acr_miou"], "curve")
