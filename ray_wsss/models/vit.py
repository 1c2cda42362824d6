"""A timm ViT classifier that exposes every block's attention probabilities.

The ViT comes from ``timm.create_model`` (never from a hub). Each block's post-softmax attention
``[B, heads, N, N]`` is captured as a node of the autograd graph, so attention losses (ACR) and
``torch.autograd.grad`` (gradient-weighted attention maps) can use it.

How the attention is captured: timm's ``Attention.forward`` computes, when ``fused_attn`` is off,
``attn = softmax(q @ k^T); attn = self.attn_drop(attn); x = attn @ v``. We turn fused attention
off per module and register a forward *pre*-hook on ``attn_drop``: its input is exactly the
post-softmax probabilities, the very tensor the rest of the block consumes. This needs no copy of
timm's attention code, so it keeps working as timm evolves; a forward that captures a different
number of maps than there are blocks (a timm change, an unsupported attention class) fails loudly.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import checkpoint_filter_fn

from ray_wsss import storage
from ray_wsss.errors import WsssError

_logger = logging.getLogger(__name__)

HEAD_KEYS = ("head.weight", "head.bias")
# Prefixes a state dict may carry: ``vit.`` from AttentionViT.state_dict(), ``module.`` from DDP.
_KEY_PREFIXES = ("module.", "vit.")


@dataclasses.dataclass
class ViTConfig:
    model_name: str = "vit_tiny_patch16_224"  # any timm ViT/DeiT name
    img_size: int = 96
    patch_size: int = 16
    depth: int | None = None       # None = the named model's depth
    embed_dim: int | None = None   # None = the named model's
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    weights: str | None = None     # local path or s3:// URI; None = random init (the demo default)


@dataclasses.dataclass
class ClassifierOutput:
    logits: torch.Tensor              # [B, C] foreground class scores
    attentions: list[torch.Tensor]    # one per block, post-softmax [B, heads, N, N], in the graph
    grid: tuple[int, int]             # patch grid (gh, gw) of this input
    num_prefix_tokens: int            # tokens before the patch tokens (1 for a cls-token ViT)


class _AttentionRecorder:
    """Collects the attention probabilities seen by ``attn_drop`` pre-hooks during one forward.

    A plain object with a bound-method hook (not a closure) so the model pickles and deep-copies.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.maps is not None:
            self.maps.append(args[0])


class AttentionViT(nn.Module):
    """timm ViT classifier (class-token logits) returning per-block attention maps.

    ``state_dict()`` keys are timm's keys prefixed by ``vit.``; :func:`load_weights` accepts both.
    """

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        optional = {"depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads}
        self.vit = timm.create_model(
            cfg.model_name,
            pretrained=False,
            num_classes=num_classes,
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            dynamic_img_size=True,  # pos-embed interpolated per forward: any size, non-square too
            global_pool="token",
            drop_path_rate=cfg.drop_path_rate,
            **{k: v for k, v in optional.items() if v is not None},
        )
        if getattr(self.vit, "cls_token", None) is None or not hasattr(self.vit, "blocks"):
            raise WsssError(f"{cfg.model_name} is not a class-token ViT; AttentionViT needs one")
        self.num_prefix_tokens: int = int(self.vit.num_prefix_tokens)
        self.patch_size: tuple[int, int] = tuple(self.vit.patch_embed.patch_size)
        self._recorder = _AttentionRecorder()
        for index, block in enumerate(self.vit.blocks):
            attn = getattr(block, "attn", None)
            if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):
                raise WsssError(
                    f"{cfg.model_name} block {index}: attention module {type(attn).__name__} does not "
                    "expose attn_drop/fused_attn, so its attention probabilities cannot be captured")
            attn.fused_attn = False  # the fused kernel never materialises the probabilities
            attn.attn_drop.register_forward_pre_hook(self._recorder.hook)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        (height, width), (ph, pw) = x.shape[-2:], self.patch_size
        if height % ph or width % pw:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
        self._recorder.maps = []
        try:
            logits = self.vit(x)
            attentions = self._recorder.maps
        finally:
            self._recorder.maps = None
        if len(attentions) != len(self.vit.blocks):
            raise RuntimeError(
                f"captured {len(attentions)} attention maps for {len(self.vit.blocks)} blocks; "
                "the installed timm's Attention no longer routes probabilities through attn_drop")
        return ClassifierOutput(logits=logits, attentions=attentions, grid=(height // ph, width // pw),
                                num_prefix_tokens=self.num_prefix_tokens)


def create_classifier(cfg: ViTConfig, num_classes: int,
                      storage_options: storage.StorageOptions | None = None) -> AttentionViT:
    """Build the classifier and load ``cfg.weights`` when set."""
    model = AttentionViT(cfg, num_classes)
    if cfg.weights:
        load_weights(model, cfg.weights, storage_options)
    return model


def _read_state_dict(uri: str, storage_options: storage.StorageOptions | None) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(uri, storage_options)
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            # weights_only: a checkpoint is data, never code to run
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt file, pickle with custom classes, ...
        raise WsssError(f"cannot read weights {uri}: {type(err).__name__}: {err}") from err
    # DeiT releases and our own checkpoints wrap the state dict as {"model": sd, ...}
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WsssError(f"{uri} does not hold a state dict (name -> tensor)")
    for prefix in _KEY_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_weights(model: AttentionViT, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
    """Load a timm/DeiT state dict, a ``.safetensors`` file or a project checkpoint into ``model``.

    Position embeddings are resampled to the model's grid and a patch embedding to its patch size
    (timm's ``checkpoint_filter_fn``, which uses ``resample_abs_pos_embed``). A classifier head of
    another shape (other classes) is dropped and stays randomly initialised. Missing non-head keys
    are an error; unexpected keys are logged.
    """
    state_dict = checkpoint_filter_fn(_read_state_dict(uri, storage_options), model.vit, adapt_layer_scale=True)
    own = model.vit.state_dict()
    for key in HEAD_KEYS:
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            _logger.warning("%s: dropping %s of shape %s (model expects %s: different classes)",
                            uri, key, tuple(state_dict[key].shape), tuple(own[key].shape))
            del state_dict[key]
    try:
        result = model.vit.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture
        raise WsssError(f"weights {uri} do not fit {model.cfg.model_name}: {err}") from err
    missing = [k for k in result.missing_keys if k not in HEAD_KEYS]
    if missing:
        raise WsssError(f"weights {uri} lack {len(missing)} parameters of {model.cfg.model_name}: {missing[:10]}")
    if result.unexpected_keys:
        _logger.warning("%s: ignored %d unexpected keys: %s", uri, len(result.unexpected_keys),
                        result.unexpected_keys[:10])
    _logger.info("loaded weights from %s", uri)
