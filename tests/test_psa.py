"""PSA / AffinityNet core (Ray-free): affinity labels, pairs, loss, random walk, inference, the model, the config.

References are independent of the code under test: hand-computed labels, brute-force pair sets, a
per-pair Python loop for the loss and PSA's dense N x N matrix power for the walk.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import timm
import torch
from torch import nn

from ray_wsss.core import affinity_pairs
from ray_wsss.core.models.affinitynet import EMBEDDING_DIM, AffinityNet
from ray_wsss.core.refine import psa

NO_CRF = psa.PSAConfig(label_crf=False)


def half_disc(radius: int) -> set[tuple[int, int]]:
    """Brute force: the displacements that put the second pixel later in raster order, within the radius."""
    return {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if (dy > 0 or (dy == 0 and dx > 0)) and dy * dy + dx * dx < radius * radius}


def brute_force_pairs(height: int, width: int, radius: int) -> list[tuple[int, int, int, int]]:
    """(y1, x1, y2, x2) of every pair PSA forms: first pixel in its crop window, second at a half-disc step."""
    rf = radius - 1
    return [(y, x, y + dy, x + dx) for y in range(height) for x in range(width) for dy, dx in sorted(half_disc(radius))
            if y < height - rf and rf <= x < width - rf]


# ---------------------------------------------------------------- affinity labels

def test_affinity_labels_on_a_crafted_seed_map_equal_the_hand_computed_labels():
    """A 16 x 20 image, classes 3 and 7, grid 2 x 3 (the last column holds 4 image pixels + 4 of padding).

    Hand computation at low alpha 1 and high alpha 12 (no CRF), per 8 x 8 block:
      (0,0) class 3 at 0.9: bg 0.1 / 0.1^12 -> 3 in both -> 3
      (0,1) class 3 at 0.3: low bg 0.7 > 0.3 -> not confident fg; high bg 0.7^12 = 0.014 < 0.3 -> 255
      (0,2) class 7 at 0.8 on 4 columns: pooled 0.4 vs low bg 0.1 -> 7; high bg 0.2^12 / 2 -> 7
      (1,0) class 3 at 0.05: low bg 0.95 -> not fg; high bg 0.95^12 = 0.54 > 0.05 -> 0
      (1,1) class 7 at 1.0 on the top-left 4 x 4 only: pooled 16/64 = 0.25 vs bg 48/64 = 0.75 at both
            alphas -> 0 (sampling the block's first pixel, [::8], would say 7)
      (1,2) class 3 at 0.6 and class 7 at 0.7: bg 0.3 / 0.3^12 -> 7 in both -> 7
    """
    seeds = np.zeros((2, 16, 20), np.float32)
    seeds[0, 0:8, 0:8] = 0.9
    seeds[0, 0:8, 8:16] = 0.3
    seeds[1, 0:8, 16:20] = 0.8
    seeds[0, 8:16, 0:8] = 0.05
    seeds[1, 8:12, 8:12] = 1.0
    seeds[0, 8:16, 16:20] = 0.6
    seeds[1, 8:16, 16:20] = 0.7
    expected = np.array([[3, 255, 7], [0, 0, 7]], np.uint8)
    labels = psa.affinity_labels(seeds, [3, 7], NO_CRF)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)


def test_affinity_labels_without_classes_are_background():
    labels = psa.affinity_labels(np.zeros((0, 17, 9), np.float32), [], NO_CRF)
    np.testing.assert_array_equal(labels, np.zeros((3, 2), np.uint8))


def test_the_crf_takes_a_seed_spilling_past_an_edge_out_of_the_confident_foreground():
    """A bright square at cells 2..5; the seed spills one cell to the right. Without the CRF that cell is
    labelled the class; with it (as PSA), the low-alpha labelling follows the edge and the cell is not."""
    image = np.full((64, 64, 3), 30, np.uint8)
    image[16:48, 16:48] = 220
    image = np.clip(image + np.random.default_rng(0).normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    image.setflags(write=False)  # as np.asarray of a PIL image: pydensecrf needs a writable copy
    seeds = np.zeros((1, 64, 64), np.float32)
    seeds[0, 16:48, 16:56] = 0.9
    plain = psa.affinity_labels(seeds, [4], NO_CRF)
    refined = psa.affinity_labels(seeds, [4], psa.PSAConfig(), image)
    assert (plain[2:6, 2:7] == 4).all() and (refined[2:6, 2:6] == 4).all()
    assert not (refined[2:6, 6] == 4).any()
    outside = np.ones((8, 8), bool)
    outside[2:6, 2:7] = False
    assert (plain[outside] == 0).all() and (refined[outside] == 0).all()


def test_the_crf_parameters_are_psas():
    """psa.affinity_labels uses CRFConfig()'s pairwise terms; they must stay those of PSA's crf_inference."""
    from ray_wsss.core.refine.crf import CRFConfig

    cfg = CRFConfig()
    assert (cfg.gaussian_sxy, cfg.gaussian_compat, cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat,
            cfg.iterations) == (3, 3, 80, 13, 10, 10)


def test_affinity_labels_reject_bad_input():
    with pytest.raises(ValueError, match="seed maps"):
        psa.affinity_labels(np.zeros((2, 8, 8), np.float32), [1], NO_CRF)
    with pytest.raises(ValueError, match="foreground ids"):
        psa.affinity_labels(np.zeros((1, 8, 8), np.float32), [0], NO_CRF)
    with pytest.raises(ValueError, match="pass the image"):
        psa.affinity_labels(np.zeros((1, 8, 8), np.float32), [1], psa.PSAConfig())
    with pytest.raises(ValueError, match="image is"):
        psa.affinity_labels(np.zeros((1, 8, 8), np.float32), [1], psa.PSAConfig(), np.zeros((8, 9, 3), np.uint8))


# ---------------------------------------------------------------- pairs

def test_displacements_are_psas_half_disc_in_its_order():
    steps = affinity_pairs.displacements(5)
    assert set(steps) == half_disc(5) and len(steps) == len(set(steps)) == 34
    assert steps[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)] and steps[4] == (1, -4)  # PSA's order


@pytest.mark.parametrize("height, width, radius", [(9, 12, 5), (7, 7, 3), (63, 47, 5), (3, 9, 5)])
def test_pair_indices_are_the_brute_force_pairs_in_bounds_each_unordered_pair_once(height, width, radius):
    first, second = affinity_pairs.pair_indices(height, width, radius)
    pairs = [(int(a), int(b)) for a, b in zip(np.broadcast_to(first, second.shape).ravel(), second.ravel())]
    expected = [(y1 * width + x1, y2 * width + x2) for y1, x1, y2, x2 in brute_force_pairs(height, width, radius)]
    assert sorted(pairs) == sorted(expected)
    assert all(0 <= a < height * width and 0 <= b < height * width and a != b for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)


def test_loss_terms_equal_a_naive_per_pair_loop():
    rng = np.random.default_rng(1)
    batch, dim, height, width, radius, eps = 2, 5, 9, 12, 4, psa.LOSS_EPS
    embedding = torch.from_numpy(rng.random((batch, dim, height, width)))  # float64
    labels = rng.choice(np.array([0, 2, 5, 255], np.uint8), size=(batch, height, width), p=[0.4, 0.25, 0.25, 0.1])
    terms = psa.affinity_loss(affinity_pairs.pair_affinities(embedding, radius),
                              psa.pair_labels(torch.from_numpy(labels), radius))

    sums, counts = {"bg": 0.0, "fg": 0.0, "neg": 0.0}, {"bg": 0, "fg": 0, "neg": 0}
    f = embedding.numpy()
    for b in range(batch):
        for y1, x1, y2, x2 in brute_force_pairs(height, width, radius):
            aff = math.exp(-np.mean(np.abs(f[b, :, y1, x1] - f[b, :, y2, x2])))
            a, c = int(labels[b, y1, x1]), int(labels[b, y2, x2])
            if 255 in (a, c):
                continue
            kind = "neg" if a != c else ("bg" if a == 0 else "fg")
            sums[kind] += -math.log(1 + eps - aff) if kind == "neg" else -math.log(aff + eps)
            counts[kind] += 1
    assert min(counts.values()) > 20  # every term has pairs to average
    expected = {k: sums[k] / (counts[k] + eps) for k in sums}
    assert terms.bg_pos.item() == pytest.approx(expected["bg"], rel=1e-12)
    assert terms.fg_pos.item() == pytest.approx(expected["fg"], rel=1e-12)
    assert terms.neg.item() == pytest.approx(expected["neg"], rel=1e-12)
    total = expected["bg"] / 4 + expected["fg"] / 4 + expected["neg"] / 2
    assert terms.total.item() == pytest.approx(total, rel=1e-12)


def test_a_loss_term_without_pairs_is_zero():
    labels = torch.zeros(1, 8, 10, dtype=torch.uint8)  # all background: no foreground, no negative pairs
    pairs = len(affinity_pairs.displacements(3)) * 6 * 6  # radius 3 on 8 x 10: a 6 x 6 window of first pixels
    affinity = torch.full((1, len(affinity_pairs.displacements(3)), 6 * 6), 0.5)
    terms = psa.affinity_loss(affinity, psa.pair_labels(labels, 3))
    assert terms.fg_pos.item() == 0 and terms.neg.item() == 0
    assert terms.bg_pos.item() == pytest.approx(-math.log(0.5 + psa.LOSS_EPS) * pairs / (pairs + psa.LOSS_EPS))


# ---------------------------------------------------------------- the random walk

def dense_walk(embedding: np.ndarray, scores: np.ndarray, radius: int, beta: float, logt: int) -> np.ndarray:
    """PSA's infer_aff.py on a dense N x N matrix, float64: every pixel pair's affinity, kept where PSA forms
    the pair (either order) and 1 on the diagonal, ** beta, columns normalised, squared logt times, cam @ T."""
    dim, height, width = embedding.shape
    flat = embedding.reshape(dim, -1).astype(np.float64)
    every = np.exp(-np.abs(flat[:, :, None] - flat[:, None, :]).mean(0))
    kept = np.eye(height * width, dtype=bool)
    for y1, x1, y2, x2 in brute_force_pairs(height, width, radius):
        kept[y1 * width + x1, y2 * width + x2] = kept[y2 * width + x2, y1 * width + x1] = True
    matrix = np.where(kept, every, 0.0) ** beta
    transition = matrix / matrix.sum(axis=0, keepdims=True)
    for _ in range(logt):
        transition = transition @ transition
    return (scores.reshape(len(scores), -1).astype(np.float64) @ transition).reshape(scores.shape)


@pytest.mark.parametrize("height, width, radius, logt", [(11, 13, 5, 8), (10, 9, 3, 6), (6, 7, 2, 3)])
def test_sparse_walk_equals_psas_dense_matrix_power(height, width, radius, logt):
    rng = np.random.default_rng(height)
    embedding = rng.random((6, height, width)).astype(np.float32) * 3
    scores = rng.random((4, height, width)).astype(np.float32)
    affinity = affinity_pairs.pair_affinities(torch.from_numpy(embedding)[None], radius)[0]
    walked = psa.random_walk(torch.from_numpy(scores), affinity, radius, beta=8, logt=logt)
    assert walked.dtype == torch.float32
    np.testing.assert_allclose(walked.numpy(), dense_walk(embedding, scores, radius, 8, logt), atol=1e-5, rtol=0)


def test_transition_matrix_is_sparse_and_row_stochastic():
    height, width, radius = 63, 47, 5  # a 500 x 375 image at stride 8
    _, second = affinity_pairs.pair_indices(height, width, radius)
    affinity = torch.rand(second.shape)
    step = psa.transition_matrix(affinity, height, width, radius, beta=8)
    assert step.layout == torch.sparse_csr and step._nnz() == height * width + 2 * second.size
    torch.testing.assert_close(step @ torch.ones(height * width, 1), torch.ones(height * width, 1))
    with pytest.raises(ValueError, match="do not fit the pairs"):
        psa.transition_matrix(affinity[:, :-1], height, width, radius, beta=8)


# ---------------------------------------------------------------- inference

class HalvesEmbedding(nn.Module):
    """A stand-in AffinityNet: embedding 0 on the left half of the grid, 20 on the right (affinity e^-20 across)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2] // 8, x.shape[-1] // 8
        out = torch.zeros(x.shape[0], 4, height, width)
        out[..., width // 2:] = 20
        return out * self.scale


def test_infer_mask_spreads_a_seed_over_its_affinity_region_and_not_across():
    """90 x 125 image (padded to 96 x 128, grid 12 x 16). A seed on a quarter of the left half walks over the
    left half (its affinities are 1) and not into the right (e^-20, ** 8); against a constant background of
    0.1 the cells of the left half become the class, those of the right stay background, and so do the cells
    PSA's crop leaves without any pair (their own score, 0, stays). At a cell's centre the bilinear
    upsampling gives the cell's own value, so the centres are checked."""
    image = np.zeros((90, 125, 3), np.uint8)
    seeds = np.zeros((1, 90, 125), np.float32)
    seeds[0, 24:72, 32:64] = 1.0  # cells rows 3..8, columns 4..7
    cfg = psa.PSAConfig(infer_background="threshold", infer_threshold=0.1)
    mask = psa.infer_mask(image, seeds, [5], HalvesEmbedding(), cfg)
    assert mask.shape == (90, 125) and mask.dtype == np.uint8
    paired = {(y, x) for y1, x1, y2, x2 in brute_force_pairs(12, 16, 5) for y, x in ((y1, x1), (y2, x2))}
    assert len(paired) < 12 * 16  # the test covers unpaired cells
    for y in range(11):  # row 11's centre (pixel 92) is in the padding
        for x in range(16):
            expected = 5 if x < 8 and (y, x) in paired else 0
            assert mask[y * 8 + 4, x * 8 + 4] == expected, (y, x)


def test_infer_mask_with_an_affinitynet_and_edge_cases():
    torch.manual_seed(0)
    model = AffinityNet("resnet18").eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    seeds = rng.random((2, 37, 50)).astype(np.float32)
    mask = psa.infer_mask(image, seeds, [2, 9], model, psa.PSAConfig(logt=4))
    assert mask.shape == (37, 50) and set(np.unique(mask).tolist()) <= {0, 2, 9}
    empty = psa.infer_mask(image, seeds[:0], [], model, psa.PSAConfig())
    np.testing.assert_array_equal(empty, np.zeros((37, 50), np.uint8))
    with pytest.raises(ValueError, match="expected stride 8"):
        psa.infer_mask(image, seeds, [2, 9], nn.Conv2d(3, 4, 1), psa.PSAConfig())


# ---------------------------------------------------------------- the model

def test_affinitynet_embeds_at_stride_8_and_its_affinities_are_in_0_1():
    torch.manual_seed(0)
    model = AffinityNet("resnet18")
    x = torch.randn(2, 3, 56, 72)
    embedding = model(x)
    assert embedding.shape == (2, EMBEDDING_DIM, 7, 9)
    affinity = model.affinities(x, 3)
    assert affinity.shape == (2, len(affinity_pairs.displacements(3)), 5 * 5)
    assert ((affinity > 0) & (affinity <= 1)).all()


def test_param_groups_hold_every_trainable_parameter_once_at_psas_multipliers():
    model = AffinityNet("resnet18")
    groups = model.param_groups(lr=0.1, weight_decay=5e-4)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(1.0) and by_name["backbone_bias_norm"]["weight_decay"] == 0
    assert by_name["backbone_bias_norm"]["lr"] == pytest.approx(0.2) and by_name["backbone"]["lr"] == 0.1


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_backbone_weights_load_from_a_file_and_freeze_bn_and_stem(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("resnet18")  # a full model: its classifier (fc) is in the file and ignored
    path = str(tmp_path / f"r18.{suffix}")
    (torch.save if suffix == "pth" else save_file)(source.state_dict(), path)
    model = AffinityNet("resnet18", path)
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], msg=key)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not model.backbone.conv1.weight.requires_grad and model.backbone.layer1[0].conv1.weight.requires_grad
    assert [g["name"] for g in model.param_groups(0.1, 0.0)] == ["backbone", "head"]
    assert any(isinstance(m, nn.BatchNorm2d) for m in AffinityNet("resnet18").modules())  # random init: trainable BN


def test_backbone_weights_that_do_not_fit_name_the_file(tmp_path):
    missing = {k: v for k, v in timm.create_model("resnet18").state_dict().items() if not k.startswith("layer4")}
    cases = {"missing.pth": missing, "deeper.pth": timm.create_model("resnet34").state_dict()}
    for name, state in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=name):
            AffinityNet("resnet18", str(tmp_path / name))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pth"):
        AffinityNet("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match=r"absent.pth"):
        AffinityNet("resnet18", str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="not a timm model"):
        AffinityNet("resnet_nonexistent")


# ---------------------------------------------------------------- the config

def test_config_defaults_are_the_papers():
    cfg = psa.PSAConfig()
    assert (cfg.radius, cfg.beta, cfg.logt, cfg.low_alpha, cfg.high_alpha, cfg.infer_alpha) == (5, 8, 8, 1, 12, 16)


@pytest.mark.parametrize("field, value, error", [
    ("radius", 1, ValueError), ("radius", 5.0, TypeError), ("radius", True, TypeError),
    ("beta", 0, ValueError), ("beta", "8", TypeError), ("logt", -1, ValueError), ("logt", 17, ValueError),
    ("low_alpha", 0.0, ValueError), ("high_alpha", 0.5, ValueError), ("label_crf", 1, TypeError),
    ("infer_background", "max", ValueError), ("infer_alpha", -2, ValueError),
    ("infer_threshold", 1.5, ValueError), ("backbone", " ", ValueError), ("backbone", None, TypeError),
])
def test_config_rejects_bad_values_naming_field_value_and_what_is_allowed(field, value, error):
    with pytest.raises(error, match=rf"PSAConfig\.{field} must be .+, got {re.escape(repr(value))}"):
        dataclasses.replace(psa.PSAConfig(), **{field: value})
