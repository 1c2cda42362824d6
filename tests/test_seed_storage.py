"""Compact seeds: the score encodings, the stored resolutions, and the one read function every reader uses."""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

from ray_wsss.core import codec
from ray_wsss.core.methods import get_method
from ray_wsss.core.models.vit import AttentionViT, ViTConfig
from ray_wsss.core.seeds.stored import SeedFormat, read_scores
from ray_wsss.core.seeds.tta import TTAConfig, map_size, scaled_size

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _bilinear_reference(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resampling written from its definition (float64): PyTorch's source coordinates, edge-clamped."""
    def axis(out: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dst = np.arange(out, dtype=np.float64)
        if align_corners:
            pos = dst * ((src - 1) / (out - 1) if out > 1 else 0.0)
        else:
            pos = np.maximum((dst + 0.5) * src / out - 0.5, 0.0)
        low = np.minimum(np.floor(pos).astype(int), src - 1)
        return low, np.minimum(low + 1, src - 1), pos - low

    (y0, y1, fy), (x0, x1, fx) = axis(size[0], maps.shape[1]), axis(size[1], maps.shape[2])
    m = maps.astype(np.float64)
    top = m[:, y0][:, :, x0] * (1 - fx) + m[:, y0][:, :, x1] * fx
    bottom = m[:, y1][:, :, x0] * (1 - fx) + m[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


@pytest.mark.parametrize("shape", [(3, 5, 7), (0, 4, 4), (1, 1, 1)])
def test_encodings_round_trip_within_their_step(shape):
    scores = RNG.random(shape).astype(np.float32)
    if len(scores) == 3:
        scores.reshape(3, -1)[:, 0] = [0.0, 1.0, 0.5]  # the ends and the midpoint
    as_float16 = codec.decode_scores(codec.encode_scores(scores, "float16"))
    as_uint8 = codec.decode_scores(codec.encode_scores(scores, "uint8"))
    assert as_float16.shape == as_uint8.shape == shape and as_uint8.dtype == np.float32
    np.testing.assert_allclose(as_float16, scores, atol=2 ** -12)          # float16: 11 bits of [0, 1]
    np.testing.assert_allclose(as_uint8, scores, atol=1 / 510 + 1e-7)      # uint8: half a step of 1/255
    np.testing.assert_array_equal(codec.decode_scores(codec.encode_scores(as_uint8, "uint8")), as_uint8)  # stable
    if len(scores) == 3:
        assert as_uint8.max() == 1.0 and as_uint8.min() == 0.0                # min-max ends kept exactly


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match=r"uint8 scores must lie in \[0, 1\]"):
        codec.encode_scores(np.full((1, 2, 2), 1.5, np.float32), "uint8")
    with pytest.raises(ValueError, match="score encoding must be one of"):
        codec.encode_scores(np.zeros((1, 2, 2)), "int4")
    import io
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 2, 2), np.float64))
    with pytest.raises(ValueError, match="float16 or uint8, got float64"):
        codec.decode_scores(buf.getvalue())


@pytest.mark.parametrize("align_corners", [False, True])
def test_read_upsamples_compact_maps_bilinearly_to_the_row_size(align_corners):
    stored = RNG.random((2, 4, 6)).astype(np.float32)
    data = codec.encode_scores(stored, "uint8")
    got = read_scores(data, 37, 53, align_corners)
    expected = _bilinear_reference(codec.decode_scores(data), (37, 53), align_corners)
    assert got.shape == (2, 37, 53) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(read_scores(data, 4, 6), codec.decode_scores(data))  # image size: as stored
    assert read_scores(codec.encode_scores(np.zeros((0, 4, 6)), "uint8"), 37, 53).shape == (0, 37, 53)


def test_read_refuses_maps_that_cannot_be_of_the_image():
    data = codec.encode_scores(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="8x8 do not fit a 6x9 image"):
        read_scores(data, 6, 9)
    with pytest.raises(ValueError, match="the table's resolution is the image's"):
        SeedFormat().read({"scores": data, "height": 16, "width": 16})
    with pytest.raises(ValueError):
        read_scores(b"not a numpy array", 8, 8)


def test_dataset_json_round_trip_and_tables_written_before_formats_were_stated():
    fmt = SeedFormat(resolution="short-side", short_side=64, encoding="uint8", align_corners=True)
    meta = {"table": "seeds", **fmt.metadata()}
    assert SeedFormat.from_metadata(meta) == fmt
    assert meta["upsampling"] == {"mode": "bilinear", "align_corners": True}
    legacy = {"table": "seeds", "resolution": "image", "scores_format": "npy float16 [len(classes), height, width]"}
    assert SeedFormat.from_metadata(legacy) == SeedFormat()
    scores = RNG.random((2, 5, 7)).astype(np.float32)
    row = {"scores": codec.encode_scores(scores), "height": 5, "width": 7}
    np.testing.assert_array_equal(SeedFormat.from_metadata(legacy).read(row), codec.decode_scores(row["scores"]))


def test_map_sizes():
    patch = (16, 16)
    assert map_size(100, 150, patch, TTAConfig()) == (100, 150)
    assert map_size(100, 150, patch, TTAConfig(resolution="grid")) == (6, 9)            # the 96 x 144 view's grid
    assert map_size(100, 150, patch, TTAConfig(resolution="grid", scales=(0.5, 1.5))) == (9, 14)  # 144 x 224
    assert map_size(100, 150, patch, TTAConfig(resolution="grid", scales=(0.5,))) == (6, 9)  # scale 1 at least
    assert map_size(100, 150, patch, TTAConfig(resolution="grid", base_size=320)) == (13, 20)  # 208 x 320 view
    assert map_size(100, 150, patch, TTAConfig(resolution="grid", resize="square", base_size=96)) == (6, 6)
    assert map_size(100, 150, patch, TTAConfig(resolution="short-side", short_side=64)) == (64, 96)
    assert map_size(50, 75, patch, TTAConfig(resolution="short-side", short_side=64)) == (50, 75)  # never larger
    with pytest.raises(ValueError, match="short_side"):
        TTAConfig(resolution="short-side")
    with pytest.raises(ValueError, match="short_side"):
        TTAConfig(short_side=64)


def _smooth_model() -> AttentionViT:
    torch.manual_seed(0)
    model = AttentionViT(ViTConfig(img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2), 5)
    with torch.no_grad():
        for block in model.vit.blocks:
            block.attn.qkv.weight.mul_(8)
    return model.eval()


# scales -> (mean |diff|, max |diff|, label agreement at 0.3): the stated tolerance of compact seeds against the
# image-resolution float16 ones, on a random ViT with sharpened attention (jagged maps: a worst case; a trained
# model's, and their mIoU, are in experiments/compact_seeds.py). Measured: single 0.005-0.013 / 0.041 / 0.976;
# three scales 0.026-0.045 / 0.25 / 0.914.
TOLERANCES = {(1.0,): (0.015, 0.05, 0.97), (0.75, 1.0, 1.5): (0.05, 0.3, 0.9)}


@pytest.mark.parametrize("scales", list(TOLERANCES))
def test_compact_seeds_read_back_close_to_image_resolution_seeds(scales):
    """Summing and normalising at the patch grid, storing uint8 and upsampling on read stays close to the
    original image-resolution float16 maps (tolerances above)."""
    mean_tol, max_tol, agree_tol = TOLERANCES[scales]
    model = _smooth_model()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (64, 48), (90, 70))]
    classes = [[1, 3], [2], [5, 4, 1]]
    acr, compact_tta = get_method("acr"), TTAConfig(scales=scales, resolution="grid")
    reference = acr.seed_scores(model, images, classes, tta=TTAConfig(scales=scales))
    compact = acr.seed_scores(model, images, classes, tta=compact_tta)
    fmt = SeedFormat.of(compact_tta, "uint8")
    for ref, small, rgb in zip(reference, compact, images):
        h, w = rgb.shape[:2]
        largest = scaled_size(h, w, max(scales), model.patch_size)
        assert small.shape == (len(ref), largest[0] // 8, largest[1] // 8)
        today = codec.decode_scores(codec.encode_scores(ref, "float16"))
        got = fmt.read({"scores": fmt.encode(small), "height": h, "width": w})
        assert got.shape == today.shape
        diff = np.abs(got - today)
        agree = (got.argmax(0) * (got.max(0) > 0.3) == today.argmax(0) * (today.max(0) > 0.3)).mean()
        assert diff.mean() <= mean_tol and diff.max() <= max_tol and agree >= agree_tol, (diff.mean(), diff.max(),
                                                                                          agree)


def test_every_reader_of_seed_scores_goes_through_the_read_function():
    """No stage, core module or experiment decodes a seeds row's scores itself: only stored.read_scores may call
    codec.decode_scores, so a compact table is upsampled the same way everywhere."""
    allowed = {ROOT / "ray_wsss" / "core" / "seeds" / "stored.py"}
    offenders = []
    for folder in ("ray_wsss", "experiments", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
                if name == "decode_scores" and path not in allowed and path.name != "codec.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"decode seeds with SeedFormat.read / read_scores instead: {offenders}"
