"""ACR class maps (Eq. 7-8), their batched gradients, and the test-time augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_wsss.core.methods import MapOptions, get_method
from ray_wsss.core.models.vit import AttentionViT, ViTConfig
from ray_wsss.core.seeds.acr_maps import GRAD_STRATEGIES, ACRMapConfig, captured_blocks, class_maps, naive_class_maps
from ray_wsss.core.seeds.tta import TTAConfig, minmax_per_class, scaled_size
from ray_wsss.core.seeds.tta import seed_scores_batch as seed_scores_batch_with

ACR = get_method("acr")


def seed_scores(model, rgb, classes, scales=(1.0,), flip=True):
    return ACR.seed_scores(model, [rgb], [classes], tta=TTAConfig(scales=scales, flip=flip))[0]


def seed_scores_batch(model, images, classes):
    return ACR.seed_scores(model, images, classes)

NUM_CLASSES = 5
# Varied classes per image: 1, 3, none, 2.
CLASSES = [[2], [1, 3, 4], [], [5, 2]]


def _tiny_vit(depth: int = 3, seed: int = 0) -> AttentionViT:
    torch.manual_seed(seed)
    model = AttentionViT(ViTConfig(img_size=32, patch_size=8, depth=depth, embed_dim=64, num_heads=2), NUM_CLASSES)
    # Sharper attention than the init's near-uniform one, so the affinity's orientation matters.
    with torch.no_grad():
        for block in model.vit.blocks:
            block.attn.qkv.weight.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> AttentionViT:
    return _tiny_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(len(CLASSES), 3, 32, 48, generator=torch.Generator().manual_seed(1))


_CFGS = {
    "default": ACRMapConfig(),
    "acr_star": ACRMapConfig(refine=False),
    "grad1_refine_first_last": ACRMapConfig(grad_layers=1, refine_layers=(0, -1)),
    "grad_all_layers": ACRMapConfig(grad_layers=3, refine=False),
}
# Every config with the default strategy; the benchmark's other strategies with two configs.
_CASES = [("slots_vmap", name) for name in _CFGS] + [
    (strategy, name) for strategy in GRAD_STRATEGIES if strategy != "slots_vmap" for name in ("default", "acr_star")]


@pytest.mark.parametrize(("strategy", "cfg_name"), _CASES)
def test_batched_equals_naive_loop(model, images, strategy, cfg_name):
    cfg = _CFGS[cfg_name]
    expected = naive_class_maps(model, images, CLASSES, cfg)
    actual = class_maps(model, images, CLASSES, cfg, strategy=strategy)
    assert len(actual) == len(CLASSES)
    assert all(float(m.max()) > 0 for m in expected if len(m))  # non-trivial maps
    scale = max(float(m.abs().max()) for m in expected if len(m))
    for got, want, row in zip(actual, expected, CLASSES):
        assert got.shape == want.shape == (len(row), 4, 6)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_maps_capture_only_the_blocks_they_read(model, images, monkeypatch):
    """The naive reference above captures every block; class_maps only what it reads, the rest run fused."""
    assert captured_blocks(model, _CFGS["default"]) is None                     # refinement reads every block
    assert captured_blocks(model, _CFGS["acr_star"]) == [1, 2]                  # the last grad_layers = 2
    assert captured_blocks(model, _CFGS["grad1_refine_first_last"]) == [0, 2]
    fused_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    class_maps(model, images, CLASSES, _CFGS["acr_star"])
    assert len(fused_calls) == 1                                                 # block 0, one forward


def test_present_classes_only_in_given_order(model, images):
    forward = class_maps(model, images[1:2], [[1, 3, 4]])[0]
    reordered = class_maps(model, images[1:2], [[4, 1]])[0]
    assert forward.shape == (3, 4, 6) and reordered.shape == (2, 4, 6)
    torch.testing.assert_close(reordered, forward[[2, 0]])
    assert not torch.allclose(forward[0], forward[2])  # the classes' maps differ, so order is tested


def test_minmax_per_class(model, images):
    maps = minmax_per_class(class_maps(model, images[1:2], [[1, 3, 4]])[0])
    assert maps.shape == (3, 4, 6)
    flat = maps.flatten(1)
    assert torch.all(flat >= 0) and torch.all(flat <= 1)
    torch.testing.assert_close(flat.max(dim=1).values, torch.ones(3))
    torch.testing.assert_close(flat.min(dim=1).values, torch.zeros(3))
    constant = minmax_per_class(torch.stack([torch.full((2, 3), 7.0), torch.arange(6.0).view(2, 3)]))
    torch.testing.assert_close(constant[0], torch.zeros(2, 3))
    torch.testing.assert_close(constant[1], torch.arange(6.0).view(2, 3) / 5)


def test_matches_hand_computation_of_eq_7_8(model, images):
    """An independent Eq. 7-8 from ClassifierOutput: ReLU, heads mean, last-2-layers mean, affinity @ map."""
    image, class_id = images[3:4], 5
    out = model(image.clone().requires_grad_(True))
    grads = torch.autograd.grad(out.logits[0, class_id - 1], out.attentions[-2:])
    raw = [g[0, :, 0, 1:] for g in grads]                                   # [heads, patches] per layer
    assert any(bool((r < 0).any()) for r in raw)  # negative gradients exist, so the clamp is tested
    gradient_map = torch.stack([r.clamp(min=0).mean(dim=0) for r in raw]).mean(dim=0)
    affinity = torch.stack([a[0].mean(dim=0)[1:, 1:] for a in out.attentions]).mean(dim=0).detach()
    refined = affinity @ gradient_map                      # patch j: sum_i affinity[j, i] * map[i]
    assert not torch.allclose(refined, affinity.T @ gradient_map, rtol=1e-3)  # the orientation is tested

    got_refined = class_maps(model, image, [[class_id]])[0][0]
    got_plain = class_maps(model, image, [[class_id]], ACRMapConfig(refine=False))[0][0]
    torch.testing.assert_close(got_plain, gradient_map.view(4, 6), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got_refined, refined.view(4, 6), rtol=1e-5, atol=1e-8)
    unclamped = torch.stack([r.mean(dim=0) for r in raw]).mean(dim=0)
    assert not torch.allclose(got_plain, unclamped.view(4, 6))


def test_bad_arguments_raise(model, images):
    with pytest.raises(ValueError, match="class id 6"):
        class_maps(model, images[:1], [[6]])
    with pytest.raises(ValueError, match="class id 0"):
        class_maps(model, images[:1], [[0]])
    with pytest.raises(ValueError, match="grad_layers=4"):
        class_maps(model, images[:1], [[1]], ACRMapConfig(grad_layers=4))
    with pytest.raises(ValueError, match="refine_layers"):
        class_maps(model, images[:1], [[1]], ACRMapConfig(refine_layers=(3,)))


def test_works_under_inference_mode(model, images):
    with torch.inference_mode():
        maps = class_maps(model, images[:2], CLASSES[:2])
    torch.testing.assert_close(maps[1], naive_class_maps(model, images[1:2], CLASSES[1:2])[0])


def test_scaled_size_rounding_rule():
    assert scaled_size(37, 53, 1.0, (8, 8)) == (40, 56)
    assert scaled_size(37, 53, 0.75, (8, 8)) == (24, 40)    # 27.75 -> 24, 39.75 -> 40
    assert scaled_size(36, 52, 1.0, (8, 8)) == (40, 56)     # 4.5 and 6.5 patches: halves round up
    assert scaled_size(37, 53, 0.01, (8, 8)) == (8, 8)      # at least one patch
    assert scaled_size(37, 53, 1.0, (8, 8), base_size=96) == (64, 96)


def test_tta_shape_range_non_square_multiscale(model):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    scores = seed_scores(model, rgb, [3, 1], scales=(1.0, 0.75), flip=True)
    assert scores.shape == (2, 37, 53) and scores.dtype == np.float32
    assert scores.min() >= 0 and scores.max() <= 1
    np.testing.assert_allclose(scores.reshape(2, -1).max(axis=1), 1.0)
    single = seed_scores(model, rgb, [3, 1], scales=(1.0,), flip=True)
    assert not np.allclose(single, scores, atol=1e-3)  # the extra scales contribute
    assert seed_scores(model, rgb, []).shape == (0, 37, 53)


def test_tta_flip_is_undone():
    """Zero position embeddings + patch-constant image: the ViT is flip-equivariant, so flip adds nothing."""
    model = _tiny_vit(seed=3)
    with torch.no_grad():
        model.vit.pos_embed.zero_()
    cells = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    rgb = np.kron(cells, np.ones((8, 8, 1), np.uint8))  # constant on the 8 px patch grid, not symmetric
    with_flip = seed_scores(model, rgb, [2, 4], flip=True)
    without_flip = seed_scores(model, rgb, [2, 4], flip=False)
    assert not np.allclose(without_flip, without_flip[:, :, ::-1], atol=1e-3)  # a missed un-flip would show
    np.testing.assert_allclose(with_flip, without_flip, atol=1e-5)


def test_tta_batch_equals_single(model):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(32, 48, 3), (30, 50, 3), (40, 24, 3)]]
    classes = [[1, 2], [5], [3, 4, 1]]  # the first two share the 32x48 view size at scale 1
    batch = seed_scores_batch(model, images, classes)
    for rgb, row, got in zip(images, classes, batch):
        assert got.shape == (len(row), *rgb.shape[:2])
        np.testing.assert_allclose(got, seed_scores(model, rgb, row), atol=1e-5)
    with pytest.raises(ValueError, match="image 1"):
        seed_scores_batch(model, [images[0], images[1][..., :2]], [[1], [1]])


@pytest.mark.parametrize("max_views", [2, 6, 32])
def test_filled_batches_give_the_maps_of_single_images(model, max_views):
    """Many images per call share forwards by exact view size, in chunks of at most max_views views (flips
    included): only the batch composition changes, so every image's maps equal its own call's (float tolerance)."""
    rng = np.random.default_rng(5)
    shapes = [(32, 48), (30, 50), (40, 24), (33, 47), (31, 45), (40, 24), (36, 52)]  # 4 share 32x48, 2 share 40x24
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    classes = [[1, 2], [5], [3, 4, 1], [2], [4, 5], [1], [3]]
    calls = []

    def counted(m, x, c):
        calls.append(len(x))
        return get_method("acr").class_maps(m, x, c, MapOptions())

    tta = TTAConfig(scales=(0.75, 1.0), max_views=max_views)
    batch = seed_scores_batch_with(counted, model, images, classes, tta)
    assert max(calls) <= max_views and (max_views < 8 or max(calls) == 8)  # 4 images + flips at scale 1
    for rgb, row, got in zip(images, classes, batch):
        alone = ACR.seed_scores(model, [rgb], [row], tta=TTAConfig(scales=(0.75, 1.0)))[0]
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)


def test_sum_over_blocks_scales_the_maps_only(model, images):
    """layer_reduction="sum" (the authors' code): gradient maps x L, refined maps x L x depth, same seeds shape."""
    depth, grad_layers = len(model.vit.blocks), 2
    for refine, factor in ((False, grad_layers), (True, grad_layers * depth)):
        mean = class_maps(model, images, CLASSES, ACRMapConfig(grad_layers=grad_layers, refine=refine))
        summed = class_maps(model, images, CLASSES,
                            ACRMapConfig(grad_layers=grad_layers, refine=refine, layer_reduction="sum"))
        for got, want in zip(summed, mean):
            torch.testing.assert_close(got, want * factor, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="layer_reduction"):
        ACRMapConfig(layer_reduction="max")


def _pooled_maps(model, images, classes):
    """A stand-in class-map function: per class, the patch-mean of one channel (a known map per view)."""
    patch = model.patch_size
    pooled = torch.nn.functional.avg_pool2d(images, patch)
    return [torch.stack([pooled[i, c % 3] + c for c in row]) for i, row in enumerate(classes)]


@pytest.mark.parametrize("align_corners,eps", [(False, 0.0), (True, 1e-6)])
def test_tta_upsampling_flip_and_normalisation_options(model, align_corners, eps):
    """Each view's maps upsampled (align_corners as set), un-flipped, summed, then (x-min)/(max-min+eps)."""
    from ray_wsss.core.data.augment import normalize
    from ray_wsss.core.seeds.tta import seed_scores_batch

    rgb = np.random.default_rng(7).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    classes = [2, 4]
    tta = TTAConfig(flip=True, align_corners=align_corners, minmax_eps=eps)
    got = seed_scores_batch(_pooled_maps, model, [rgb], [classes], tta)[0]

    x = normalize(rgb)[None]
    def up(maps):
        return torch.nn.functional.interpolate(maps, size=(32, 48), mode="bilinear", align_corners=align_corners)

    flipped = up(_pooled_maps(model, x.flip(-1), [classes])[0][None]).flip(-1)
    total = up(_pooled_maps(model, x, [classes])[0][None]) + flipped
    flat = total[0].flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    expected = ((flat - low) / (high - low + eps)).reshape(2, 32, 48)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    other = seed_scores_batch(_pooled_maps, model, [rgb], [classes],
                              TTAConfig(flip=True, align_corners=not align_corners))
    assert not np.allclose(got, other[0], atol=1e-4)  # the option changes the result


def test_view_sizes_of_the_three_resize_modes():
    from ray_wsss.core.seeds.tta import view_size

    patch = (16, 16)
    assert view_size(117, 165, 0.5, patch, TTAConfig()) == (64, 80)                       # aspect, patch multiples
    assert view_size(117, 165, 1.0, patch, TTAConfig(resize="square", base_size=224)) == (224, 224)
    # 168 -> 10.5 -> 11 patches
    assert view_size(117, 165, 0.75, patch, TTAConfig(resize="square", base_size=224)) == (176, 176)
    # pillow: Python's round, halves to even, no patch rounding (58.5 -> 58, 82.5 -> 82, 247.5 -> 248)
    assert view_size(117, 165, 0.5, patch, TTAConfig(resize="pillow")) == (58, 82)
    assert view_size(117, 165, 1.5, patch, TTAConfig(resize="pillow")) == (176, 248)
    with pytest.raises(ValueError, match="needs base_size"):
        TTAConfig(resize="square")
    with pytest.raises(ValueError, match="base_size must be None"):
        TTAConfig(resize="pillow", base_size=224)
    with pytest.raises(ValueError, match="resize must be one of"):
        TTAConfig(resize="crop")


def test_square_view_is_float64_bilinear_then_float32_normalisation():
    """The ACR authors' input: resize the float64 pixels without antialias, /255, normalise in float64, cast."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ray_wsss.core.seeds.tta import view_input

    rgb = np.random.default_rng(8).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    got = view_input(rgb, (32, 32), "square")
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].double()
    resized = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(3, 1, 1)
    assert got.dtype == torch.float32
    assert torch.equal(got, ((resized / 255 - mean) / std).float())
    antialiased = view_input(rgb, (32, 32), "aspect")
    assert not torch.allclose(got, antialiased, atol=1e-3)  # downscaling without antialias differs
