"""core/weights.py: reading weight files and mapping each known layout onto the project's models."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from ray_wsss.core.errors import WsssError
from ray_wsss.core.models.deeplab import DeepLabConfig
from ray_wsss.core.models.vit import AttentionViT, ViTConfig
from ray_wsss.core.weights import (
    build_classifier,
    build_deeplab,
    build_mctformer,
    detect_layout,
    read_state_dict,
    resnet_state_dict,
    vit_state_dict,
)

NUM_CLASSES = 4
TINY = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _timm_vit(name: str = "vit_tiny_patch16_224", seed: int = 1, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(pretrained=False, num_classes=NUM_CLASSES, img_size=32, patch_size=8, depth=2, embed_dim=64,
                  num_heads=2)
    return timm.create_model(name, **{**kwargs, **overrides}).eval()


def _assert_same_parameters(model: AttentionViT, reference: dict[str, torch.Tensor]) -> None:
    own = model.vit.state_dict()
    assert set(own) == set(reference)
    for key, value in reference.items():
        assert torch.equal(own[key], value), key


def test_acr_layout_loads_backbone_and_head_and_drops_bkg_token(tmp_path):
    """The ACR authors' state dict: backbone under pretrained.model., classifier cls_head, an unused bkg_token,
    decoder parts the classifier does not use."""
    source = _timm_vit().state_dict()
    acr = {f"pretrained.model.{k}": v for k, v in source.items() if not k.startswith("head.")}
    acr |= {"pretrained.model.bkg_token": torch.randn(1, 1, 64), "cls_head.weight": source["head.weight"],
            "cls_head.bias": source["head.bias"], "scratch.refinenet1.out_conv.weight": torch.randn(8, 8, 1, 1)}
    path = tmp_path / "acr.pth"
    torch.save(acr, path)
    assert detect_layout(acr) == "acr"
    model = build_classifier(ViTConfig(**TINY, weights=str(path), pre_norm_head=True), NUM_CLASSES)
    _assert_same_parameters(model, source)


def test_deit_distilled_release_wrapped_in_model_loads_both_tokens_and_heads(tmp_path):
    source = _timm_vit("deit_tiny_distilled_patch16_224").state_dict()
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": source, "epoch": 300}, path)
    model = build_classifier(ViTConfig(**{**TINY, "model_name": "deit_tiny_distilled_patch16_224"}, weights=str(path)),
                             NUM_CLASSES)
    _assert_same_parameters(model, source)
    assert model.num_prefix_tokens == 2


def test_register_vit_in_safetensors_loads(tmp_path):
    name = "vit_small_patch14_reg4_dinov2"
    source = _timm_vit(name).state_dict()
    path = tmp_path / "reg.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = build_classifier(ViTConfig(**{**TINY, "model_name": name}, weights=str(path)), NUM_CLASSES)
    _assert_same_parameters(model, source)


def test_ddp_prefix_and_project_checkpoint_layouts(tmp_path):
    source = _timm_vit().state_dict()
    for name, saved in {"ddp": {f"module.{k}": v for k, v in source.items()},
                        "project": {"model": {f"vit.{k}": v for k, v in source.items()}, "epoch": 3}}.items():
        path = tmp_path / f"{name}.pt"
        torch.save(saved, path)
        _assert_same_parameters(build_classifier(ViTConfig(**TINY, weights=str(path)), NUM_CLASSES), source)


def test_mctformer_checkpoint_into_a_single_token_vit_says_what_it_is(tmp_path):
    model = build_mctformer(ViTConfig(**TINY), NUM_CLASSES, "v1")
    path = tmp_path / "mct.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(WsssError, match=r"mct\.pth are an MCTformer checkpoint \(4 class tokens\)"):
        build_classifier(ViTConfig(**TINY, weights=str(path)), NUM_CLASSES)


def test_acr_layout_initialises_an_mctformer(tmp_path):
    source = _timm_vit().state_dict()
    acr = {f"pretrained.model.{k}": v for k, v in source.items()}
    path = tmp_path / "acr.pth"
    torch.save(acr, path)
    model = build_mctformer(ViTConfig(**TINY, weights=str(path)), NUM_CLASSES, "v2")
    assert torch.equal(model.cls_token.detach(), source["cls_token"].expand(1, NUM_CLASSES, 64))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])


def test_unknown_layout_names_the_file_and_the_layouts_expected(tmp_path):
    path = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, path)
    with pytest.raises(WsssError, match=r"mystery\.pth hold an unknown layout \(keys: \['decoder\.bias', "
                                        r"'encoder\.weight'\]\); expected one of \['timm-vit', 'project-vit', 'acr'\]"):
        build_classifier(ViTConfig(**TINY, weights=str(path)), NUM_CLASSES)
    with pytest.raises(WsssError, match=r"mystery\.pth.*expected one of \['torchvision-resnet'"):
        build_deeplab(DeepLabConfig("resnet18", backbone_weights=str(path)), 3)


def test_a_vit_given_to_deeplab_is_named_as_such(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_timm_vit().state_dict(), path)
    with pytest.raises(WsssError, match=r"vit\.pth hold a timm-vit state dict; expected one of \['torchvision-resnet'"):
        build_deeplab(DeepLabConfig("resnet18", backbone_weights=str(path)), 3)


def test_files_that_are_not_state_dicts(tmp_path):
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WsssError, match=r"list\.pt does not hold a state dict"):
        read_state_dict(str(listing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WsssError, match=r"cannot read weights .*garbage\.pth"):
        read_state_dict(str(garbage))


def test_torchvision_coco_segmentation_layout_gives_the_resnet_backbone(tmp_path):
    """torchvision's COCO-trained segmentation models keep the ResNet under backbone. (classifier dropped)."""
    torch.manual_seed(0)
    coco = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                        aux_loss=True)
    state = coco.state_dict()
    assert detect_layout(state) == "torchvision-segmentation"
    path = tmp_path / "fcn_resnet50_coco.pth"
    torch.save(state, path)
    model = build_deeplab(DeepLabConfig("resnet50", backbone_weights=str(path)), 21)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(backbone)
    for key, value in backbone.items():
        assert torch.equal(loaded[key], value), key


def test_mapping_functions_reject_each_others_layouts():
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    assert detect_layout(resnet) == "torchvision-resnet"
    assert "fc.weight" not in resnet_state_dict(resnet, "r18")
    with pytest.raises(WsssError, match="r18 hold a torchvision-resnet state dict"):
        vit_state_dict(resnet, "r18")
