"""The whole-object pretraining task: determinism, labels, and that only the outline names a category."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ray_wsss.core.data import shapes, synthetic

CFG = shapes.ShapesConfig(seed=3, num_train=80, num_val=5)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [shapes.render_scene(CFG, "train", i) for i in range(CFG.num_train)]


def test_deterministic_and_its_own_stream():
    image, mask = shapes.render_scene(CFG, "train", 4)
    again = shapes.render_scene(CFG, "train", 4)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    assert not np.array_equal(image, shapes.render_scene(CFG, "val", 4)[0])
    # Never a WSSS scene with the same key: the WSSS generator's seed stream is not shared.
    wsss = synthetic.render_scene(synthetic.SyntheticConfig(seed=3), "train", 4).image
    assert wsss.shape != image.shape or not np.array_equal(wsss, image)
    with pytest.raises(ValueError, match="out of range"):
        shapes.render_scene(CFG, "val", 5)
    with pytest.raises(ValueError, match=r"ShapesConfig.max_objects"):
        shapes.ShapesConfig(max_objects=0)


def test_every_category_appears_whole_and_visible(scenes):
    seen = set()
    for image, mask in scenes:
        assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3)
        assert CFG.min_size <= min(mask.shape) and max(mask.shape) <= CFG.max_size
        ids = set(np.unique(mask).tolist()) - {0}
        assert 1 <= len(ids) and max(ids) <= len(shapes.SHAPES)
        # Objects are large: each visible category covers a good share of the image.
        assert all((mask == c).sum() >= 30 for c in ids)
        seen |= ids
    assert seen == set(range(1, len(shapes.SHAPES) + 1))
    assert shapes.class_names() == ["background", *shapes.SHAPES]


def test_colour_carries_no_category(scenes):
    """The mean colour of an object's pixels is drawn the same way for every category."""
    means = {c: [] for c in range(1, len(shapes.SHAPES) + 1)}
    for image, mask in scenes:
        for c in set(np.unique(mask).tolist()) - {0}:
            means[c].append(image[mask == c].mean(axis=0))
    spread = np.std(np.concatenate([np.array(v) for v in means.values()]), axis=0)
    centres = np.array([np.mean(v, axis=0) for v in means.values() if len(v) >= 5])
    assert len(centres) >= 5
    # Category centres sit well within the spread of individual objects (no colour code).
    assert (np.abs(centres - centres.mean(axis=0)) < 0.6 * spread).all()


def test_hue_cue_colours_each_category():
    cfg = shapes.ShapesConfig(seed=3, num_train=40, num_val=1, hue_cue=True)
    for i in range(cfg.num_train):
        image, mask = shapes.render_scene(cfg, "train", i)
        hsv = np.asarray(Image.fromarray(image).convert("HSV"), np.float32)
        for c in set(np.unique(mask).tolist()) - {0}:
            hue = hsv[..., 0][mask == c] * 360 / 255
            distance = np.abs((hue - 360 * (c - 1) / len(shapes.SHAPES) + 180) % 360 - 180)
            # The category's hue fills a good share of every object (the rest is the second colour).
            assert (distance < 25).mean() > 0.2
