"""AttentionViT: attention capture, dynamic sizes, weight loading."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from ray_wsss.core.errors import WsssError
from ray_wsss.core.models.vit import AttentionViT, ViTConfig, capturing, load_pretrained
from ray_wsss.core.weights import build_classifier, read_mapped, vit_state_dict

NUM_CLASSES = 4
TINY = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _tiny(**overrides) -> AttentionViT:
    torch.manual_seed(0)
    return AttentionViT(ViTConfig(**{**TINY, **overrides}), NUM_CLASSES).eval()


def load_weights(model: AttentionViT, path) -> None:
    load_pretrained(model, *read_mapped(str(path), vit_state_dict))


def _timm_model(img_size: int, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size,
                             patch_size=8, depth=2, embed_dim=64, num_heads=2).eval()


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (48, 16)])
def test_attention_shapes_and_rows_sum_to_one(size):
    model = _tiny()
    out = model(torch.randn(2, 3, *size))
    grid = (size[0] // 8, size[1] // 8)
    n = 1 + grid[0] * grid[1]
    assert out.grid == grid and out.num_prefix_tokens == 1
    assert out.logits.shape == (2, NUM_CLASSES)
    assert len(out.attentions) == 2
    for attn in out.attentions:
        assert attn.shape == (2, 2, n, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, n))
        assert (attn >= 0).all()


def test_attention_is_in_the_graph():
    model = _tiny()
    out = model(torch.randn(2, 3, 32, 24))
    (grad,) = torch.autograd.grad(out.logits[:, 1].sum(), out.attentions[-1])
    assert grad.shape == out.attentions[-1].shape
    assert grad.abs().sum() > 0


def test_capturing_some_blocks_runs_the_others_fused(monkeypatch):
    model = _tiny(depth=3)
    x = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    everything = model(x)
    fused_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    with capturing(model, [-1]):
        last_only = model(x)
    assert len(fused_calls) == 2                     # blocks 0 and 1 ran timm's fused kernel
    assert last_only.attentions[:2] == [None, None]
    torch.testing.assert_close(last_only.attentions[2], everything.attentions[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_only.logits, everything.logits, rtol=1e-5, atol=1e-6)
    restored = model(x)                              # outside the block: every block captured again
    assert len(fused_calls) == 2 and all(a is not None for a in restored.attentions)
    with pytest.raises(ValueError, match="block 3 does not exist"), capturing(model, [3]):
        pass


def test_logits_match_plain_timm_forward():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, model.vit(x), atol=1e-6)


def test_bad_input_size_is_rejected():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _tiny()(torch.randn(1, 3, 30, 32))


def test_timm_state_dict_with_same_grid_gives_same_logits(tmp_path):
    source = _timm_model(img_size=32)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    model = build_classifier(ViTConfig(**TINY, weights=str(path)), NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, source(x), rtol=1e-5, atol=1e-5)


def test_deit_wrapped_state_dict_is_resampled_to_another_grid(tmp_path):
    source = _timm_model(img_size=48)  # 6x6 grid; the model below has a 4x4 grid
    path = tmp_path / "deit.pth"
    torch.save({"model": source.state_dict()}, path)
    model = _tiny()
    load_weights(model, path)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    assert model.vit.pos_embed.shape == (1, 17, 64)
    torch.testing.assert_close(model.vit.pos_embed.detach(), expected)
    for key, value in source.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(model.vit.state_dict()[key], value), key
    out = model(torch.randn(1, 3, 48, 48))
    assert out.logits.shape == (1, NUM_CLASSES) and torch.isfinite(out.logits).all()


def test_safetensors_with_other_head_drops_the_head(tmp_path, caplog):
    source = _timm_model(img_size=32, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = _tiny()
    head_before = model.vit.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="ray_wsss.core.models.vit"):
        load_weights(model, path)
    assert "head.weight" in caplog.text
    assert torch.equal(model.vit.head.weight, head_before)
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_project_checkpoint_loads(tmp_path):
    trained = _tiny()
    with torch.no_grad():
        trained.vit.head.bias.add_(3.0)  # differs from a fresh init
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": trained.state_dict(), "model_config": dict(TINY), "epoch": 3}, path)
    model = AttentionViT(ViTConfig(**TINY), NUM_CLASSES).eval()
    load_weights(model, path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained(x).logits)


def test_missing_weight_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(WsssError, match=r"nope.pth"):
        build_classifier(ViTConfig(**TINY, weights=missing), NUM_CLASSES)


def test_missing_parameters_are_an_error(tmp_path):
    state = _timm_model(img_size=32).state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WsssError, match=r"blocks.1.mlp.fc1.weight"):
        load_weights(_tiny(), path)


def test_pre_norm_head_reads_the_last_blocks_class_token_before_the_norm():
    """The ACR authors' head: block outputs -> head(class token), the final LayerNorm skipped."""
    model = _tiny(pre_norm_head=True)
    x = torch.randn(2, 3, 32, 40)
    vit = model.vit
    with torch.no_grad():
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))  # timm's own stages, without norm and pooling
        torch.testing.assert_close(model(x).logits, vit.head(tokens[:, 0]), rtol=1e-6, atol=1e-6)
        timm_head = _tiny()  # the same weights (seed), timm's head after the final norm
        normed = F.layer_norm(tokens, (tokens.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps)
        torch.testing.assert_close(timm_head(x).logits, vit.head(normed[:, 0]), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(x).logits, timm_head(x).logits, atol=1e-3)
    assert "vit.norm.weight" in model.state_dict()  # kept for the layout (the authors' checkpoints have it)
    assert not any(p.requires_grad for p in vit.norm.parameters())  # frozen: DDP sees no unused parameter


def test_partial_patches_are_an_error_or_dropped_like_a_patch_conv():
    x = torch.randn(1, 3, 37, 45)
    with pytest.raises(ValueError, match="partial_patches='drop'"):
        _tiny()(x)
    model = _tiny(partial_patches="drop")
    out = model(x)
    assert out.grid == (4, 5)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x[..., :32, :40]).logits, rtol=0, atol=0)


@pytest.mark.parametrize("stride,timm_patch", [(8, 2), (16, 4), (32, 8)])
def test_hybrid_patch_size_is_its_token_stride(stride, timm_patch):
    """A conv-stem ViT (stem reduction 4): patch_size is pixels per token; timm's patch is stride / 4."""
    model = _tiny(model_name="vit_tiny_r_s16_p8_224", img_size=32, patch_size=stride)
    assert model.vit.patch_embed.feature_ratio == (4, 4)
    assert tuple(model.vit.patch_embed.patch_size) == (timm_patch, timm_patch) and model.patch_size == (stride, stride)
    out = model(torch.randn(2, 3, 32, 64))
    grid = (32 // stride, 64 // stride)
    assert out.grid == grid and all(a.shape[-1] == 1 + grid[0] * grid[1] for a in out.attentions)


def test_hybrid_rejects_a_stride_finer_than_its_stem():
    with pytest.raises(WsssError, match=r"patch size 2 must be a multiple of its conv stem's reduction \(4, 4\)"):
        _tiny(model_name="vit_tiny_r_s16_p8_224", patch_size=2)


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="partial_patches"):
        ViTConfig(partial_patches="pad")
    with pytest.raises(WsssError, match="MCTformer's"):
        _tiny(pos_embed_resampler="mctformer")
