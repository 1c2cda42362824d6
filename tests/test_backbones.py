"""Any timm class-token ViT trains with the ACR losses and gives seeds: hybrids (the ACR paper's
``vit_base_r50_s16_384``, built from the same timm class at a tiny depth and width), DeiT distilled
(two class tokens) and register ViTs. Ray-free: one optimisation step on two views, then seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_wsss.core.methods import MapOptions, get_method
from ray_wsss.core.methods.acr import ACRLossConfig
from ray_wsss.core.methods.views import View
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.core.seeds.tta import TTAConfig

NUM_CLASSES = 3
# name -> (timm patch size on its input, class tokens, register tokens) for a token stride of 16
BACKBONES = {
    "vit_base_r50_s16_384": ((1, 1), 1, 0),        # ResNet-50 stem, stride 16: timm's patch 1
    "vit_tiny_r_s16_p8_224": ((4, 4), 1, 0),       # stem reduction 4: timm's patch 16 / 4
    "deit_tiny_distilled_patch16_224": ((16, 16), 2, 0),
    "vit_small_patch14_reg4_dinov2": ((16, 16), 1, 4),
}


def _config(name: str) -> ViTConfig:
    return ViTConfig(model_name=name, img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_trains_one_acr_step_and_gives_seeds(name):
    timm_patch, class_tokens, registers = BACKBONES[name]
    method = get_method("acr")
    torch.manual_seed(0)
    model = method.build_model(_config(name), NUM_CLASSES)
    assert model.patch_size == (16, 16) and tuple(model.vit.patch_embed.patch_size) == timm_patch

    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    view = View(hflip=True, rot90=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out1, out2 = model(images), model(view.apply(images, 16))
    assert out1.num_class_tokens == class_tokens and out1.num_prefix_tokens == class_tokens + registers
    losses = method.two_view_losses(out1, out2, view, labels, ACRLossConfig(alpha=1.0, beta=1.0))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["act"] > 0 and losses["aff"] > 0
    optimizer.zero_grad()
    losses["total"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    # timm's ResNetV2 zero-initialises each block's last norm, so the stem's inner convs start with a zero
    # gradient; everything with a non-zero gradient must move, and the transformer must have one.
    moving = {n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().max() > 0}
    assert {"vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight", "vit.head.weight"} <= moving
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in moving)

    model.eval()
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    classes = [[1, 3], [2]]
    for options in (MapOptions(), MapOptions(refine=False)):
        seeds = method.seed_scores(model, rgbs, classes, options, TTAConfig(scales=(1.0, 0.5), flip=True))
        for rgb, row, score in zip(rgbs, classes, seeds):
            assert score.shape == (len(row), *rgb.shape[:2]) and score.dtype == np.float32
            assert np.isfinite(score).all() and score.min() >= 0 and score.max() <= 1
            assert (score.reshape(len(row), -1).max(1) == 1).all()  # every class map spans [0, 1]
