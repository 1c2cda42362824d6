"""MCTformer-V1/V2 (Xu et al., CVPR 2022): a timm ViT/DeiT with one class token per foreground class.

V1: C class tokens, each with its own positional embedding, precede the patch tokens; the score of
class c is the mean over the embedding dimension of output class token c. As in the authors' code
(``x_cls_logits = x[:, 0:C].mean(-1)`` on the output of the last block), there is NO final
LayerNorm on the class tokens; ``norm.*`` exists in their checkpoints but is never applied, so we
keep it (frozen, so DDP sees no unused trainable parameter) only for the state-dict layout.

V2 adds PatchCAM: a 3x3 conv with C outputs (``head``) over the grid of output patch tokens (also
without the LayerNorm), whose global average pool gives a second set of class scores.

``state_dict()`` is the authors' layout: ``cls_token`` [1, C, D], ``pos_embed`` [1, C + N, D],
``patch_embed.*``, ``blocks.*``, ``norm.*`` and, for V2, ``head.weight`` [C, D, 3, 3] and
``head.bias`` [C]. Attention probabilities are captured with vit.py's mechanism (the timm model is
built and hooked by :class:`~ray_wsss.core.models.vit.AttentionViT`, whose parts we take over).

Position embeddings follow ``ViTConfig.pos_embed_resampler``: ``"timm"`` resamples the patch part
to the input grid with timm's antialiased bicubic; ``"mctformer"`` is the authors' rule: unchanged
when the grid has the base grid's token count AND the input is square in pixels, otherwise bicubic
(no antialias) at ``scale_factor=((gh + 0.1) / g0h, (gw + 0.1) / g0w)``, whose output floors to
(gh, gw) while the sampling positions follow the factor. So their 224 x 230 input (a 14 x 14 grid)
is still resampled, by 14.1 / 14. With ``partial_patches="drop"`` the last H mod p rows and W mod p
columns are ignored, as the authors' patch conv does.

The model never reads files: :func:`create_mctformer` takes a state dict in the authors' layout or
a single-class-token timm one (``ray_wsss.core.weights`` reads and recognises files).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from ray_wsss.core.errors import WsssError
from ray_wsss.core.models.vit import AttentionViT, ClassifierOutput, ViTConfig, crop_to_tokens, load_pretrained

_logger = logging.getLogger(__name__)

VERSIONS = ("v1", "v2")
HEAD_KEYS = ("head.weight", "head.bias")
# Parameters of the timm ViT that the MCTformer layout has room for (timm's head is built empty).
_BACKBONE_PARAMS = ("patch_embed.", "blocks.", "norm.", "cls_token", "pos_embed")


@dataclasses.dataclass
class MCTOutput(ClassifierOutput):
    patch_logits: torch.Tensor | None = None  # V2: [B, C] global average of the PatchCAM maps
    patch_cams: torch.Tensor | None = None    # V2: [B, C, gh, gw] PatchCAM conv output (before ReLU)


class MCTformer(nn.Module):
    """MCTformer-V1 (``version="v1"``) or V2 (``"v2"``) over ``num_classes`` foreground classes.

    ``backbone``: a single-class-token :class:`AttentionViT` (built with ``num_classes=0``, weights
    already loaded) whose class token and class positional embedding are repeated C times; without
    it the class tokens and positional embeddings get the authors' random init.
    """

    def __init__(self, cfg: ViTConfig, num_classes: int, version: str = "v1", backbone: AttentionViT | None = None):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"unknown MCTformer version {version!r}; expected one of {VERSIONS}")
        if num_classes < 1:
            raise ValueError(f"MCTformer needs at least one foreground class, got {num_classes}")
        self.cfg = cfg
        self.version = version
        self.num_classes = num_classes
        self.num_prefix_tokens = num_classes
        repeat_backbone_token = backbone is not None
        if backbone is None:
            backbone = AttentionViT(backbone_config(cfg), num_classes=0)
        vit = backbone.vit
        _check_backbone(vit, cfg.model_name)
        self.patch_size: tuple[int, int] = backbone.patch_size
        self.base_grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.patch_embed = vit.patch_embed
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm.requires_grad_(False)  # never applied (see module docstring)
        self.attention_recorder = backbone.attention_recorder  # already hooked into these blocks' attn_drop

        cls_token, pos_embed = vit.cls_token.detach(), vit.pos_embed.detach()
        self.cls_token = nn.Parameter(cls_token.repeat(1, num_classes, 1))
        self.pos_embed = nn.Parameter(torch.cat([pos_embed[:, :1].repeat(1, num_classes, 1), pos_embed[:, 1:]], dim=1))
        if not repeat_backbone_token:
            trunc_normal_(self.cls_token, std=0.02)
            trunc_normal_(self.pos_embed, std=0.02)
        # V2's PatchCAM keeps PyTorch's default conv init, as the authors' _init_weights skips convs.
        embed_dim = self.cls_token.shape[-1]
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1) if version == "v2" else None

    def no_weight_decay(self) -> set[str]:
        """Class tokens and position embeddings take no weight decay (the DeiT/timm parameter groups)."""
        return {"cls_token", "pos_embed"}

    def resampled_pos_embed(self, grid: tuple[int, int], pixels: tuple[int, int] | None = None) -> torch.Tensor:
        """[1, C + gh*gw, D]: the patch part resampled to ``grid``, the class part untouched.

        ``pixels``: the input's (H, W) before any partial patch is dropped (the authors' rule looks at
        it); None = the grid's own pixels.
        """
        if self.cfg.pos_embed_resampler == "mctformer":
            if pixels is None:
                pixels = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])
            return self._authors_pos_embed(grid, pixels)
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.base_grid),
                                      num_prefix_tokens=self.num_classes)

    def _authors_pos_embed(self, grid: tuple[int, int], pixels: tuple[int, int]) -> torch.Tensor:
        """The MCTformer authors' resampling (module docstring), computed as their code does."""
        base_h, base_w = self.base_grid
        if grid[0] * grid[1] == base_h * base_w and pixels[0] == pixels[1]:
            return self.pos_embed
        prefix, patches = self.pos_embed[:, :self.num_classes], self.pos_embed[:, self.num_classes:]
        dim = patches.shape[-1]
        patches = patches.reshape(1, base_h, base_w, dim).permute(0, 3, 1, 2)
        # + 0.1: their guard against float error; the output size floors to the grid
        patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / base_h, (grid[1] + 0.1) / base_w),
                                mode="bicubic", align_corners=False)
        if tuple(patches.shape[-2:]) != tuple(grid):
            raise RuntimeError(f"position embeddings resampled to {tuple(patches.shape[-2:])}, not the grid {grid}")
        return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> MCTOutput:
        pixels = tuple(x.shape[-2:]) if x.ndim == 4 else None
        x, grid = crop_to_tokens(x, self.patch_size, self.cfg.partial_patches)
        tokens = self.patch_embed(x)
        if tokens.ndim == 4:  # dynamic-size timm patch embeds are NHWC
            tokens = tokens.flatten(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.resampled_pos_embed(grid, pixels)
        tokens = self.norm_pre(self.patch_drop(self.pos_drop(tokens)))
        with self.attention_recorder.recording() as attentions:
            tokens = self.blocks(tokens)
        # Authors' code: logits = x[:, 0:C].mean(-1) straight after the blocks, no final LayerNorm.
        logits = tokens[:, :self.num_classes].mean(dim=-1)
        out = MCTOutput(logits=logits, attentions=attentions, grid=grid, num_prefix_tokens=self.num_classes)
        if self.head is not None:
            patches = tokens[:, self.num_classes:].transpose(1, 2).reshape(len(x), -1, *grid)
            out.patch_cams = self.head(patches)
            out.patch_logits = out.patch_cams.mean(dim=(2, 3))
        return out


def _check_backbone(vit: nn.Module, model_name: str) -> None:
    """Refuse timm variants whose extra tokens or parameters the MCTformer layout cannot hold."""
    if getattr(vit, "reg_token", None) is not None or getattr(vit, "no_embed_class", False):
        raise WsssError(f"{model_name}: register tokens / class-free position embeddings are not supported by "
                        "MCTformer")
    extra = [name for name, _ in vit.named_parameters() if not name.startswith(_BACKBONE_PARAMS)]
    if extra:
        raise WsssError(f"{model_name} has parameters outside the MCTformer layout: {extra[:5]}")


def backbone_config(cfg: ViTConfig) -> ViTConfig:
    """The single-class-token ViT an MCTformer is assembled from (its own resampler and head rules apply)."""
    return dataclasses.replace(cfg, weights=None, pos_embed_resampler="timm", pre_norm_head=False)


def create_mctformer(cfg: ViTConfig, num_classes: int, version: str, state_dict: dict[str, torch.Tensor] | None = None,
                     source: str = "state dict") -> MCTformer:
    """Build MCTformer-``version``, loading ``state_dict`` when given (``source`` names it in errors).

    ``state_dict`` is either the authors' MCTformer layout (C class tokens; their ``{"model": sd}`` is
    unwrapped by the reader) or a single-class-token timm/DeiT one, whose class token and class
    positional embedding are repeated per class (V2's PatchCAM starts random).
    """
    if state_dict is None:
        if cfg.weights:
            raise WsssError(f"ViTConfig.weights={cfg.weights!r} but no state dict: build with "
                            "ray_wsss.core.weights.build_mctformer, which reads it")
        return MCTformer(cfg, num_classes, version)
    if "cls_token" not in state_dict or "pos_embed" not in state_dict:
        raise WsssError(f"weights {source} have no cls_token/pos_embed: not a ViT or MCTformer state dict")
    tokens = state_dict["cls_token"].shape[1]
    if tokens == 1 and num_classes > 1:
        backbone = AttentionViT(backbone_config(cfg), num_classes=0)
        # vit.py's loader: patch-embed and position-embedding resampling, clear errors.
        load_pretrained(backbone, state_dict, source)
        return MCTformer(cfg, num_classes, version, backbone=backbone)
    if tokens != num_classes:
        raise WsssError(f"weights {source} have {tokens} class tokens but the model has {num_classes} classes")
    model = MCTformer(cfg, num_classes, version)
    load_mct_state_dict(model, state_dict, source=source)
    return model


def load_mct_state_dict(model: MCTformer, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load an MCTformer state dict (authors' layout) strictly, resampling ``pos_embed`` to the model's grid.

    ``head.*`` is the only tolerated difference: a V1 model ignores it (the authors' V1 keeps an
    unused linear head), a V2 model keeps a random PatchCAM when the checkpoint has none of its shape.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    state_dict["pos_embed"] = _resample_to_grid(state_dict["pos_embed"], model, source)
    for key in HEAD_KEYS:
        if key not in state_dict:
            continue
        if key not in own:
            _logger.info("%s: ignoring %s (MCTformer-%s has no PatchCAM head)", source, key, model.version)
            del state_dict[key]
        elif state_dict[key].shape != own[key].shape:
            _logger.warning("%s: dropping %s of shape %s (PatchCAM expects %s); it stays randomly initialised",
                            source, key, tuple(state_dict[key].shape), tuple(own[key].shape))
            del state_dict[key]
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture
        raise WsssError(f"weights {source} do not fit MCTformer-{model.version} ({model.cfg.model_name}): "
                        f"{err}") from err
    missing = [k for k in result.missing_keys if k not in HEAD_KEYS]
    if missing or result.unexpected_keys:
        raise WsssError(f"weights {source} do not match MCTformer-{model.version}: "
                        f"missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}")
    if result.missing_keys:
        _logger.warning("%s: no PatchCAM head; it stays randomly initialised", source)


def _resample_to_grid(pos_embed: torch.Tensor, model: MCTformer, source: str) -> torch.Tensor:
    """Checkpoint position embeddings (square patch grid) -> the model's base grid."""
    num_patches = pos_embed.shape[1] - model.num_classes
    side = math.isqrt(max(num_patches, 0))
    if pos_embed.ndim != 3 or side * side != num_patches or num_patches == 0:
        raise WsssError(f"weights {source}: pos_embed of shape {tuple(pos_embed.shape)} is not "
                        f"{model.num_classes} class positions + a square patch grid")
    return resample_abs_pos_embed(pos_embed, new_size=list(model.base_grid), old_size=[side, side],
                                  num_prefix_tokens=model.num_classes)
