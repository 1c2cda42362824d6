"""DeepLab-V2 (dilated ResNet + summed ASPP) and multi-scale/flip inference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from ray_wsss.core.errors import WsssError
from ray_wsss.core.inference import IMAGENET_MEAN, IMAGENET_STD, normalize_image, predict_probs
from ray_wsss.core.models.deeplab import ASPP_RATES, DeepLabConfig, DeepLabV2, create_deeplab, output_size
from ray_wsss.core.weights import build_deeplab

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def resnet18_model() -> DeepLabV2:
    torch.manual_seed(0)
    return create_deeplab(DeepLabConfig("resnet18"), NUM_CLASSES).eval()


def _dilated_convs(layer: nn.Sequential) -> list[tuple[int, nn.Conv2d]]:
    """(block index, conv) for every 3x3 conv of a stage."""
    return [(i, m) for i, block in enumerate(layer) for m in block.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def _assert_output_stride_8(model: DeepLabV2) -> None:
    b = model.backbone
    for layer, rate, previous in ((b.layer3, 2, 1), (b.layer4, 4, 2)):
        assert all(m.stride == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))
        convs = _dilated_convs(layer)
        assert convs
        for index, conv in convs:
            # torchvision's convention: the first block of a dilated stage keeps the old rate.
            expected = previous if index == 0 else rate
            assert conv.dilation == (expected, expected) and conv.padding == (expected, expected)
        assert any(conv.dilation == (rate, rate) for _, conv in convs)
    for layer in (b.layer1, b.layer2):
        assert all(conv.dilation == (1, 1) for _, conv in _dilated_convs(layer))


def test_output_size_rule() -> None:
    assert output_size(64, 64) == (8, 8)
    assert output_size(65, 97) == (9, 13)
    assert output_size(1, 8) == (1, 1)
    assert output_size(17, 9) == (3, 2)


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (33, 17), (40, 41)])
def test_resnet18_logits_have_stride_8(resnet18_model: DeepLabV2, size: tuple[int, int]) -> None:
    with torch.no_grad():
        out = resnet18_model(torch.randn(2, 3, *size))
    assert out.shape == (2, NUM_CLASSES, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert out.shape[2:] == output_size(*size)


def test_resnet18_backbone_is_dilated(resnet18_model: DeepLabV2) -> None:
    _assert_output_stride_8(resnet18_model)


def test_resnet50_dilated_and_stride_8() -> None:
    torch.manual_seed(0)
    model = create_deeplab(DeepLabConfig("resnet50"), NUM_CLASSES).eval()
    _assert_output_stride_8(model)
    assert model.head.branches[0].in_channels == 2048
    with torch.no_grad():
        out = model(torch.randn(1, 3, 41, 66))
    assert out.shape == (1, NUM_CLASSES, 6, 9)


def test_resnet101_dilated() -> None:
    model = create_deeplab(DeepLabConfig("resnet101"), 21)
    _assert_output_stride_8(model)
    assert len(model.backbone.layer3) == 23
    assert model.head.branches[0].out_channels == 21


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="resnet152"):
        create_deeplab(DeepLabConfig("resnet152"), NUM_CLASSES)


def test_aspp_sums_four_dilated_branches(resnet18_model: DeepLabV2) -> None:
    head = resnet18_model.head
    assert head.rates == ASPP_RATES == (6, 12, 18, 24)
    assert [b.dilation for b in head.branches] == [(r, r) for r in ASPP_RATES]
    assert [b.padding for b in head.branches] == [(r, r) for r in ASPP_RATES]
    assert all(b.out_channels == NUM_CLASSES and b.kernel_size == (3, 3) for b in head.branches)
    # Biases are zero at init; make them non-zero so a dropped bias would show.
    with torch.no_grad():
        for i, branch in enumerate(head.branches):
            branch.bias.fill_(0.1 * (i + 1))
    captured = {}
    hook = head.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0], y=out))
    try:
        with torch.no_grad():
            logits = resnet18_model(torch.randn(1, 3, 48, 56))
            recomputed = sum(branch(captured["x"]) for branch in head.branches)
    finally:
        hook.remove()
        with torch.no_grad():
            for branch in head.branches:
                branch.bias.zero_()
    torch.testing.assert_close(logits, captured["y"])
    torch.testing.assert_close(logits, recomputed)


def test_param_groups_head_at_10x(resnet18_model: DeepLabV2) -> None:
    groups = resnet18_model.param_groups(0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["head"]["lr"] == pytest.approx(0.1)
    head_ids = {id(p) for p in resnet18_model.head.parameters()}
    assert {id(p) for p in by_name["head"]["params"]} == head_ids
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in resnet18_model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))  # no parameter in two groups
    assert sorted(grouped) == sorted(trainable)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the groups are valid optimizer input


def test_loads_torchvision_resnet_weights(tmp_path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None, num_classes=1000)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(2)
    model = build_deeplab(DeepLabConfig("resnet18", backbone_weights=str(path)), NUM_CLASSES)
    loaded = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("fc."):
            assert key not in loaded
            continue
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WsssError, match=r"nowhere/resnet18.pth"):
        build_deeplab(DeepLabConfig("resnet18", backbone_weights=str(path)), NUM_CLASSES)


def test_wrong_depth_weights_report_keys(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WsssError, match=r"r18\.pth.*missing keys \['layer1\.0\.bn3"):
        build_deeplab(DeepLabConfig("resnet50", backbone_weights=str(path)), NUM_CLASSES)


def test_normalize_image() -> None:
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 1] = 255
    out = normalize_image(rgb)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((5, 7), -IMAGENET_MEAN[0] / IMAGENET_STD[0]))
    torch.testing.assert_close(out[1], torch.full((5, 7), (1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]))
    with pytest.raises(ValueError, match="uint8"):
        normalize_image(rgb.astype(np.float32))


@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((0.5, 1.0, 1.5), True)])
def test_predict_probs_exact_size(resnet18_model: DeepLabV2, scales, flip) -> None:
    rng = np.random.default_rng(0)
    image = normalize_image(rng.integers(0, 256, (65, 97, 3), dtype=np.uint8))
    resnet18_model.train()
    probs = predict_probs(resnet18_model, image, scales=scales, flip=flip)
    assert resnet18_model.training  # mode restored
    resnet18_model.eval()
    assert probs.shape == (NUM_CLASSES, 65, 97)
    assert probs.min() >= 0
    torch.testing.assert_close(probs.sum(0), torch.ones(65, 97))


def test_predict_probs_odd_tiny_sizes(resnet18_model: DeepLabV2) -> None:
    for size in [(1, 1), (7, 3), (31, 12)]:
        probs = predict_probs(resnet18_model, torch.randn(3, *size), scales=(0.5, 1.0), flip=True)
        assert probs.shape == (NUM_CLASSES, *size)


class _PixelwiseStandIn(nn.Module):
    """A 1x1 conv: exactly equivariant to flips, so flip fusion must change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _LeftRightStandIn(nn.Module):
    """Adds a left-to-right ramp: not flip-equivariant, so flip fusion must matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-3, 3, x.shape[-1]).view(1, 1, 1, -1)
        return self.conv(x) + ramp * torch.arange(4.0).view(1, 4, 1, 1)


def test_flip_fusion_is_identity_for_equivariant_model() -> None:
    torch.manual_seed(0)
    model = _PixelwiseStandIn()
    image = torch.randn(3, 13, 22)
    plain = predict_probs(model, image, scales=(1.0, 0.75))
    flipped = predict_probs(model, image, scales=(1.0, 0.75), flip=True)
    torch.testing.assert_close(plain, flipped)


def test_flip_fusion_averages_unflipped_outputs() -> None:
    torch.manual_seed(0)
    model = _LeftRightStandIn()
    image = torch.randn(3, 13, 22)
    with torch.no_grad():
        direct = model(image[None]).softmax(1)[0]
        mirrored = model(image.flip(-1)[None]).softmax(1)[0].flip(-1)
    fused = predict_probs(model, image, flip=True)
    torch.testing.assert_close(fused, (direct + mirrored) / 2)
    assert not torch.allclose(fused, direct, atol=1e-3)
    torch.testing.assert_close(predict_probs(model, image), direct)


def test_multiscale_averages_upsampled_softmax() -> None:
    torch.manual_seed(0)
    model = _LeftRightStandIn()
    image = torch.randn(3, 12, 20)
    with torch.no_grad():
        small = nn.functional.interpolate(image[None], size=(6, 10), mode="bilinear",
                                          align_corners=False)
        small_probs = nn.functional.interpolate(model(small), size=(12, 20), mode="bilinear",
                                                align_corners=False).softmax(1)[0]
        full_probs = model(image[None]).softmax(1)[0]
    fused = predict_probs(model, image, scales=(0.5, 1.0))
    torch.testing.assert_close(fused, (small_probs + full_probs) / 2)
