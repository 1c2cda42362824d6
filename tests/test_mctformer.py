"""MCTformer-V1/V2: authors' state-dict layout, forward and maps against a hand-written reference, losses."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from ray_wsss.core.errors import WsssError
from ray_wsss.core.methods import MapOptions, get_method
from ray_wsss.core.methods.acr import ACRLossConfig
from ray_wsss.core.methods.mct import mct_acr_losses, mct_losses
from ray_wsss.core.methods.views import View
from ray_wsss.core.models.mctformer import MCTformer, MCTOutput
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.core.seeds.mct_maps import MCTMapConfig, maps_from_output, mct_class_maps
from ray_wsss.core.seeds.tta import TTAConfig
from ray_wsss.core.weights import build_mctformer


def mct_seed_scores(model, rgb, classes, scales=(1.0,), flip=True, layers=None):
    options = MapOptions(layers=layers)
    return get_method("mct-v2").seed_scores(model, [rgb], [classes], options, TTAConfig(scales=scales, flip=flip))[0]

C, D, HEADS, DEPTH, PATCH, IMG = 4, 48, 3, 3, 8, 32   # base grid 4x4
CFG = ViTConfig(model_name="vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=D,
                num_heads=HEADS)
LABELS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def _authors_state_dict(version: str, grid: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the authors' MCTformer releases (their
    vision_transformer.py / models.py), written out by hand rather than taken from our model."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=g)

    sd = {"cls_token": rnd(1, C, D), "pos_embed": rnd(1, C + grid * grid, D),
          "patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH, std=0.05), "patch_embed.proj.bias": rnd(D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": rnd(D, mean=1.0), p + "norm1.bias": rnd(D),
               p + "attn.qkv.weight": rnd(3 * D, D), p + "attn.qkv.bias": rnd(3 * D),
               p + "attn.proj.weight": rnd(D, D), p + "attn.proj.bias": rnd(D),
               p + "norm2.weight": rnd(D, mean=1.0), p + "norm2.bias": rnd(D),
               p + "mlp.fc1.weight": rnd(4 * D, D), p + "mlp.fc1.bias": rnd(4 * D),
               p + "mlp.fc2.weight": rnd(D, 4 * D, std=0.1), p + "mlp.fc2.bias": rnd(D)}
    sd |= {"norm.weight": rnd(D, mean=1.0), "norm.bias": rnd(D)}
    if version == "v2":
        sd |= {"head.weight": rnd(C, D, 3, 3, std=0.05), "head.bias": rnd(C)}
    else:  # the authors' V1 inherits an unused linear head from VisionTransformer
        sd |= {"head.weight": rnd(C, D), "head.bias": rnd(C)}
    return sd


def _load_authors(tmp_path, version: str, grid: int = 4) -> tuple[MCTformer, dict[str, torch.Tensor]]:
    sd = _authors_state_dict(version, grid)
    path = tmp_path / f"mctformer_{version}.pth"
    torch.save({"model": sd}, path)
    model = build_mctformer(ViTConfig(**{**vars(CFG), "weights": str(path)}), C, version)
    return model.eval(), sd


# ------------------------------------------------ independent reference (plain tensor maths)

def _reference_forward(sd: dict[str, torch.Tensor], images: torch.Tensor, version: str):
    """MCTformer forward from the raw state dict: (logits, patch logits, patch cams, attentions)."""
    sd = {k: v.double() for k, v in sd.items()}
    b, _, h, w = images.shape
    gh, gw = h // PATCH, w // PATCH
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)                                      # [B, N, D] row-major
    base = math.isqrt(sd["pos_embed"].shape[1] - C)
    patch_pos = sd["pos_embed"][:, C:].reshape(1, base, base, D).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", antialias=True,
                              align_corners=False).double().permute(0, 2, 3, 1).reshape(1, gh * gw, D)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], 1) + torch.cat([sd["pos_embed"][:, :C], patch_pos], 1)
    attentions, hd = [], D // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, HEADS, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))        # [B, H, T, hd]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        attentions.append(attn)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, D)
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    logits = x[:, :C].mean(-1)                                            # no final norm
    if version == "v1":
        return logits, None, None, attentions
    patches = x[:, C:].transpose(1, 2).reshape(b, D, gh, gw)
    cams = F.conv2d(patches, sd["head.weight"], sd["head.bias"], padding=1)
    return logits, cams.mean((2, 3)), cams, attentions


def _reference_maps(attentions, cams, grid, classes, last_layers: int, refine: bool) -> list[torch.Tensor]:
    """The authors' recipe with explicit loops over classes and patches."""
    gh, gw = grid
    n = gh * gw
    results = []
    for image, row in enumerate(classes):
        maps = []
        for class_id in row:
            c = class_id - 1
            m = torch.zeros(n, dtype=torch.float64)
            for layer in range(DEPTH - last_layers, DEPTH):
                for i in range(n):
                    m[i] += attentions[layer][image, :, c, C + i].double().mean()
            if cams is not None:
                m = m * F.relu(cams[image, c].double()).flatten()
            if refine:
                affinity = sum(a[image, :, C:, C:].double().mean(0) for a in attentions)
                m = torch.stack([sum(affinity[j, i] * m[i] for i in range(n)) for j in range(n)])
            maps.append(m.reshape(gh, gw))
        results.append(torch.stack(maps))
    return results


# ------------------------------------------------ layout and loading

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fresh_model_state_dict_is_the_authors_layout(version):
    model = MCTformer(CFG, C, version)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    authors = {k: tuple(v.shape) for k, v in _authors_state_dict(version).items()}
    if version == "v1":
        authors = {k: s for k, s in authors.items() if not k.startswith("head.")}
    assert ours == authors


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_authors_checkpoint_loads_every_key_into_its_parameter(tmp_path, version):
    model, sd = _load_authors(tmp_path, version)
    own = model.state_dict()
    used = set(sd) if version == "v2" else set(sd) - {"head.weight", "head.bias"}  # V1's head is unused
    assert set(own) == used
    for key in used:
        torch.testing.assert_close(own[key], sd[key], rtol=0, atol=0, msg=key)
    assert model.cls_token.shape == (1, C, D) and model.pos_embed.shape == (1, C + 16, D)


def test_authors_checkpoint_of_another_grid_resamples_patch_positions_only(tmp_path):
    model, sd = _load_authors(tmp_path, "v2", grid=6)  # e.g. their 14x14 release into a smaller model
    pos = model.pos_embed.detach()
    torch.testing.assert_close(pos[:, :C], sd["pos_embed"][:, :C], rtol=0, atol=0)
    patch = sd["pos_embed"][:, C:].reshape(1, 6, 6, D).permute(0, 3, 1, 2)
    expected = F.interpolate(patch, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, C:], expected.permute(0, 2, 3, 1).reshape(1, 16, D))


def test_mismatched_checkpoints_are_rejected(tmp_path):
    sd = _authors_state_dict("v2")
    for name, broken in {"extra": {**sd, "blocks.9.attn.qkv.weight": torch.zeros(3)},
                         "missing": {k: v for k, v in sd.items() if k != "blocks.1.norm1.weight"},
                         "classes": {**sd, "cls_token": torch.zeros(1, C + 1, D)}}.items():
        path = tmp_path / f"{name}.pth"
        torch.save(broken, path)
        with pytest.raises(WsssError):
            build_mctformer(ViTConfig(**{**vars(CFG), "weights": str(path)}), C, "v2")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_single_token_vit_init_repeats_class_token_and_its_position(tmp_path, version):
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, img_size=48,
                            patch_size=PATCH, depth=DEPTH, embed_dim=D, num_heads=HEADS)  # 6x6 grid
    with torch.no_grad():
        vit.cls_token.normal_()
    path = tmp_path / "deit.pth"
    torch.save({"model": vit.state_dict()}, path)
    model = build_mctformer(ViTConfig(**{**vars(CFG), "weights": str(path)}), C, version)
    sd = vit.state_dict()
    torch.testing.assert_close(model.cls_token.detach(), sd["cls_token"].expand(1, C, D), rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed.detach()[:, :C], sd["pos_embed"][:, :1].expand(1, C, D),
                               rtol=0, atol=0)
    patch = sd["pos_embed"][:, 1:].reshape(1, 6, 6, D).permute(0, 3, 1, 2)
    expected = F.interpolate(patch, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.pos_embed.detach()[:, C:], expected.permute(0, 2, 3, 1).reshape(1, 16, D))
    torch.testing.assert_close(model.state_dict()["blocks.2.mlp.fc1.weight"], sd["blocks.2.mlp.fc1.weight"])
    assert (model.head is None) == (version == "v1")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_own_checkpoint_round_trip(tmp_path, version):
    torch.manual_seed(2)
    source = get_method(f"mct-{version}").build_model(CFG, C).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "model_config": vars(CFG)}, path)
    loaded = build_mctformer(ViTConfig(**{**vars(CFG), "weights": str(path)}), C, version).eval()
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, source(x).logits, rtol=0, atol=0)


# ------------------------------------------------ forward and maps against the reference

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forward_matches_reference_on_non_square_input(tmp_path, version):
    model, sd = _load_authors(tmp_path, version)
    images = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))  # grid 3x5 from a 4x4 base
    with torch.no_grad():
        out = model(images)
    logits, patch_logits, cams, attentions = _reference_forward(sd, images, version)
    assert isinstance(out, MCTOutput) and out.grid == (3, 5) and out.num_prefix_tokens == C
    for ours, ref in zip(out.attentions, attentions, strict=True):
        assert ours.shape == (2, HEADS, C + 15, C + 15)
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits.double(), logits, rtol=0, atol=1e-5)
    if version == "v2":
        torch.testing.assert_close(out.patch_cams.double(), cams, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.patch_logits.double(), patch_logits, rtol=0, atol=1e-5)
    else:
        assert out.patch_logits is None and out.patch_cams is None


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_class_maps_match_reference(tmp_path, version, refine):
    model, sd = _load_authors(tmp_path, version)
    images = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(6))
    classes = [[3, 1], [2]]
    maps = mct_class_maps(model, images, classes, MCTMapConfig(last_layers=2, refine=refine))
    _, _, cams, attentions = _reference_forward(sd, images, version)
    expected = _reference_maps(attentions, cams, (3, 5), classes, last_layers=2, refine=refine)
    for ours, ref in zip(maps, expected, strict=True):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_seed_scores_match_reference_tta(tmp_path):
    model, sd = _load_authors(tmp_path, "v2")
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    scores = mct_seed_scores(model, rgb, [2, 4], scales=(1.0,), flip=True, layers=3)
    from ray_wsss.core.data.augment import normalize

    x = normalize(rgb)[None]
    total = 0
    for flipped in (False, True):
        _, _, cams, attentions = _reference_forward(sd, x.flip(-1) if flipped else x, "v2")
        (maps,) = _reference_maps(attentions, cams, (3, 5), [[2, 4]], last_layers=3, refine=True)
        up = F.interpolate(maps[None], size=(24, 40), mode="bilinear", align_corners=False)[0]
        total = total + (up.flip(-1) if flipped else up)
    flat = total.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    expected = ((flat - low) / (high - low)).reshape(total.shape)
    assert scores.shape == (2, 24, 40) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


def test_multi_scale_seed_scores_on_non_square_image():
    model = MCTformer(CFG, C, "v1").eval()
    rgb = np.random.default_rng(1).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    scores = mct_seed_scores(model, rgb, [1, 3, 4], scales=(1.0, 0.5, 1.5), flip=True)
    assert scores.shape == (3, 30, 45)
    np.testing.assert_allclose(scores.reshape(3, -1).min(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(scores.reshape(3, -1).max(1), 1.0, atol=1e-6)
    assert mct_seed_scores(model, rgb, []).shape == (0, 30, 45)


def test_map_config_errors():
    out = MCTformer(CFG, C, "v1").eval()(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="last_layers"):
        maps_from_output(out, MCTMapConfig(last_layers=DEPTH + 1))
    with pytest.raises(ValueError, match="PatchCAM"):
        maps_from_output(out, MCTMapConfig(map_type="patchcam"))
    with pytest.raises(ValueError, match="foreground classes"):
        mct_class_maps(MCTformer(CFG, C, "v1").eval(), torch.randn(1, 3, 32, 32), [[0]])


# ------------------------------------------------ logits and losses

def _mlsm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss written out."""
    per_class = labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)
    return -per_class.mean(1).mean(0)


def test_logits_are_class_token_means_without_layernorm(tmp_path):
    model, _ = _load_authors(tmp_path, "v1")
    captured = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        logits = model(x).logits
        torch.testing.assert_close(logits, captured["tokens"][:, :C].mean(-1), rtol=0, atol=0)
        normed = model.norm(captured["tokens"][:, :C]).mean(-1)
        assert not torch.allclose(logits, normed, atol=1e-3)
        model.norm.weight.mul_(3.0)
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.norm.parameters())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mct_loss_and_every_trainable_parameter_gets_a_gradient(version):
    torch.manual_seed(3)
    model = MCTformer(CFG, C, version).train()
    out = model(torch.randn(2, 3, 24, 40))
    losses = mct_losses(out, LABELS)
    expected = _mlsm(out.logits, LABELS)
    if version == "v2":
        expected = expected + _mlsm(out.patch_logits, LABELS)
        torch.testing.assert_close(losses["patchcam"], _mlsm(out.patch_logits, LABELS))
    torch.testing.assert_close(losses["cls"], expected)
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    # DDP without find_unused_parameters needs a gradient for every trainable parameter
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mct_acr_identity_view_has_zero_consistency(version):
    torch.manual_seed(4)
    model = MCTformer(CFG, C, version).eval()
    images = torch.randn(2, 3, 24, 40)
    out1, out2 = model(images), model(View().apply(images, PATCH))
    losses = mct_acr_losses(out1, out2, View(), LABELS, ACRLossConfig(alpha=125.0, beta=125.0))
    assert losses["act"].item() == 0.0 and losses["aff"].item() == 0.0
    expected = 2 * _mlsm(out1.logits, LABELS)
    if version == "v2":
        expected = expected + 2 * _mlsm(out1.patch_logits, LABELS)
    torch.testing.assert_close(losses["cls"], expected)
    torch.testing.assert_close(losses["total"], expected)


def test_mct_acr_flip_regularises_every_class_token_row():
    torch.manual_seed(5)
    model = MCTformer(CFG, C, "v2").eval()
    images = torch.randn(2, 3, 24, 40)
    view = View(hflip=True)
    out1, out2 = model(images), model(view.apply(images, PATCH))
    cfg = ACRLossConfig(alpha=2.0, beta=3.0)
    losses = mct_acr_losses(out1, out2, view, LABELS, cfg)
    act, aff = [], []
    for a1, a2 in zip(out1.attentions, out2.attentions):
        a1, a2 = a1.mean(1), a2.mean(1)
        rows2 = a2[:, :C, C:].reshape(2, C, 3, 5).flip(-1).reshape(2, C, 15)  # un-flip the keys
        act.append((a1[:, :C, C:] - rows2).abs().mean())
        block2 = a2[:, C:, C:].reshape(2, 3, 5, 3, 5).flip(2, 4).reshape(2, 15, 15)
        aff.append((a1[:, C:, C:] - block2).abs().mean())
    torch.testing.assert_close(losses["act"], torch.stack(act).mean())
    torch.testing.assert_close(losses["aff"], torch.stack(aff).mean())
    cls = (_mlsm(out1.logits, LABELS) + _mlsm(out2.logits, LABELS)
           + _mlsm(out1.patch_logits, LABELS) + _mlsm(out2.patch_logits, LABELS))
    torch.testing.assert_close(losses["total"], cls + 2.0 * losses["act"] + 3.0 * losses["aff"])
    assert losses["act"] > 0 and losses["aff"] > 0


def test_model_deep_copies_and_rejects_bad_sizes():
    model = MCTformer(CFG, C, "v2").eval()
    clone = copy.deepcopy(model)
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        a, b = model(x), clone(x)
    assert len(b.attentions) == DEPTH
    torch.testing.assert_close(a.patch_cams, b.patch_cams, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="version"):
        MCTformer(CFG, C, "v3")


def test_authors_position_embedding_rule():
    """pos_embed_resampler="mctformer": unchanged only for the base grid's token count from a SQUARE input;
    otherwise bicubic (no antialias) at scale ((gh + 0.1) / 4, (gw + 0.1) / 4) on the 4x4 base grid."""
    model = MCTformer(ViTConfig(**{**vars(CFG), "pos_embed_resampler": "mctformer"}), C, "v1")
    pos = model.pos_embed.detach()
    base = pos[:, C:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)

    def expected(grid):
        out = F.interpolate(base, scale_factor=((grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4), mode="bicubic",
                            align_corners=False)
        assert out.shape[-2:] == grid
        return torch.cat([pos[:, :C], out.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)

    with torch.no_grad():
        assert torch.equal(model.resampled_pos_embed((4, 4), (32, 32)), pos)
        # the base grid from a 32 x 39 input (partial patches dropped): still resampled, by 4.1 / 4
        same_grid = model.resampled_pos_embed((4, 4), (32, 39))
        torch.testing.assert_close(same_grid, expected((4, 4)), rtol=0, atol=0)
        assert not torch.allclose(same_grid, pos)
        for grid in [(3, 6), (7, 5), (2, 2)]:
            torch.testing.assert_close(model.resampled_pos_embed(grid), expected(grid), rtol=0, atol=0)
        timm_like = MCTformer(CFG, C, "v1")
        timm_like.load_state_dict(model.state_dict())
        assert not torch.allclose(timm_like.resampled_pos_embed((3, 6)), expected((3, 6)))


def test_partial_patches_and_the_square_rule_in_the_forward():
    cfg = ViTConfig(**{**vars(CFG), "pos_embed_resampler": "mctformer", "partial_patches": "drop"})
    model = MCTformer(cfg, C, "v2").eval()
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        # square 36 x 36 -> grid 4x4 = the base grid, square: same as the cropped 32 x 32 input
        torch.testing.assert_close(model(x).logits, model(x[..., :32, :32]).logits, rtol=0, atol=0)
        # 32 x 36 -> the same 4x4 grid but not square: the position embeddings are resampled
        assert not torch.allclose(model(x[..., :32, :]).logits, model(x[..., :32, :32]).logits)
