"""ACR and baseline losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ray_wsss.core.methods.acr import ACRLossConfig, acr_losses, baseline_losses, head_mean
from ray_wsss.core.methods.views import View
from ray_wsss.core.models.vit import AttentionViT, ClassifierOutput, ViTConfig

PATCH = 4
LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def _tiny_vit() -> AttentionViT:
    torch.manual_seed(0)
    cfg = ViTConfig(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    return AttentionViT(cfg, num_classes=3).eval()


def _images(h: int = 12, w: int = 20) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _equivariant_output(images: torch.Tensor, prefix: int = 1, depth: int = 2) -> ClassifierOutput:
    """Stand-in model: per head h, softmax(XXᵀ/(h+1)√d) over [prefix mean tokens; patch tokens].

    No position embedding, so it is equivariant to patch permutations (flips, rotations).
    """
    tokens = F.unfold(images, kernel_size=PATCH, stride=PATCH).transpose(1, 2)  # [B, N, D]
    x = torch.cat([tokens.mean(1, keepdim=True) * (i + 1) for i in range(prefix)] + [tokens], dim=1)
    logits = x @ x.transpose(1, 2) / math.sqrt(x.shape[-1])
    attn = torch.stack([torch.softmax(logits / (h + 1), dim=-1) for h in range(2)], dim=1)
    grid = (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
    class_logits = tokens.mean(1)[:, :3]
    return ClassifierOutput(logits=class_logits, attentions=[attn * 1.0 for _ in range(depth)], grid=grid,
                            num_prefix_tokens=prefix)


def test_head_mean():
    attn = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(head_mean(attn), (attn[:, 0] + attn[:, 1]) / 2)


def test_identity_view_same_input_gives_zero_consistency():
    model = _tiny_vit()
    images = torch.randn(2, 3, 32, 24)
    out1, out2 = model(images), model(images)
    losses = acr_losses(out1, out2, View(), LABELS, ACRLossConfig())
    assert losses["act"].item() == 0.0 and losses["aff"].item() == 0.0
    expected_cls = 2 * F.multilabel_soft_margin_loss(out1.logits, LABELS)
    torch.testing.assert_close(losses["cls"], expected_cls)
    torch.testing.assert_close(losses["total"], expected_cls)


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("view", [View(hflip=True), View(vflip=True), View(rot90=1), View(hflip=True, rot90=3)],
                         ids=str)
def test_equivariant_attention_gives_zero_consistency(view, prefix):
    images = _images()
    out1 = _equivariant_output(images, prefix)
    out2 = _equivariant_output(view.apply(images, PATCH), prefix)
    assert out2.grid == view.output_grid(out1.grid)
    losses = acr_losses(out1, out2, view, LABELS, ACRLossConfig())
    assert losses["act"].item() < 1e-9 and losses["aff"].item() < 1e-9
    # the same maps compared under a wrong inverse are far apart
    wrong = acr_losses(out1, out2, View(vflip=not view.vflip, hflip=view.hflip, rot90=view.rot90), LABELS,
                       ACRLossConfig())
    assert wrong["act"].item() > 1e-4 and wrong["aff"].item() > 1e-4


def test_total_combines_terms_with_weights():
    images = _images()
    out1 = _equivariant_output(images)
    out2 = _equivariant_output(torch.rand_like(images))  # unrelated image: non-zero consistency terms
    losses = acr_losses(out1, out2, View(hflip=True), LABELS, ACRLossConfig(alpha=2.0, beta=3.0))
    assert losses["act"] > 0 and losses["aff"] > 0
    torch.testing.assert_close(losses["total"], losses["cls"] + 2.0 * losses["act"] + 3.0 * losses["aff"])
    attn1, attn2 = head_mean(out1.attentions[0]), head_mean(out2.attentions[0])
    expected_act = (attn1[:, 0, 1:] - attn2[:, 0, 1:].reshape(2, 3, 5).flip(-1).reshape(2, 15)).abs().mean()
    torch.testing.assert_close(losses["act"], expected_act)


def test_layer_selection_changes_which_layers_count():
    images, view = _images(), View(hflip=True)
    out1 = _equivariant_output(images)
    out2 = _equivariant_output(view.apply(images, PATCH))
    out2.attentions[1] = torch.softmax(torch.randn(out2.attentions[1].shape, dtype=torch.float64), dim=-1)

    def act(layers):
        return acr_losses(out1, out2, view, LABELS, ACRLossConfig(layers=layers))["act"].item()

    assert act((0,)) < 1e-9
    assert act((1,)) > 1e-3
    assert act((-1,)) == act((1,))
    assert act(None) == pytest.approx(act((1,)) / 2)
    with pytest.raises(ValueError, match="out of range"):
        act((2,))


def test_losses_are_differentiable_on_the_vit():
    model = _tiny_vit()
    images, view = torch.randn(2, 3, 32, 24), View(hflip=True, rot90=1)
    losses = acr_losses(model(images), model(view.apply(images, 8)), view, LABELS, ACRLossConfig())
    assert losses["act"] > 0 and losses["aff"] > 0
    qkv = model.vit.blocks[0].attn.qkv.weight
    (grad_act,) = torch.autograd.grad(losses["act"], qkv, retain_graph=True)
    (grad_aff,) = torch.autograd.grad(losses["aff"], qkv, retain_graph=True)
    assert grad_act.abs().sum() > 0 and grad_aff.abs().sum() > 0
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resize_view_runs_on_the_vit():
    model = _tiny_vit()
    images, view = torch.randn(2, 3, 32, 48), View(vflip=True, scale=1.5)
    out2 = model(view.apply(images, 8))
    assert out2.grid == (6, 9)
    losses = acr_losses(model(images), out2, view, LABELS, ACRLossConfig())
    assert all(torch.isfinite(v) for v in losses.values())


def test_mismatched_view_grid_is_rejected():
    images = _images()
    out = _equivariant_output(images)
    with pytest.raises(ValueError, match="grid"):
        acr_losses(out, out, View(rot90=1), LABELS, ACRLossConfig())


def test_baseline_has_only_classification():
    out = _equivariant_output(_images())
    losses = baseline_losses(out, LABELS)
    assert set(losses) == {"cls", "total"}
    torch.testing.assert_close(losses["total"], F.multilabel_soft_margin_loss(out.logits, LABELS))
    with pytest.raises(ValueError, match="labels"):
        baseline_losses(out, LABELS[:, :2])


def test_default_weights_are_the_papers_with_pretrained_weights_and_small_from_scratch():
    from ray_wsss.core.methods import get_method
    from ray_wsss.stages.train_acr import TrainClassifierConfig

    acr = get_method("acr")
    PRETRAINED_WEIGHT, FROM_SCRATCH_WEIGHT = acr.default_consistency(True), acr.default_consistency(False)
    assert PRETRAINED_WEIGHT == 125.0 and FROM_SCRATCH_WEIGHT == 1.0
    assert TrainClassifierConfig(weights="deit_tiny.pth").consistency_weights() == (125.0, 125.0)
    assert TrainClassifierConfig().consistency_weights() == (FROM_SCRATCH_WEIGHT, FROM_SCRATCH_WEIGHT)
    assert TrainClassifierConfig(alpha=7.0).consistency_weights() == (7.0, FROM_SCRATCH_WEIGHT)
    for method in ("baseline", "mct-v1", "mct-v2"):
        assert TrainClassifierConfig(method=method, weights="w.pth").consistency_weights() == (0.0, 0.0)
    assert TrainClassifierConfig(method="mct-v2", alpha=125.0, beta=125.0).consistency_weights() == (125.0, 125.0)
