"""A timm ViT classifier that exposes every block's attention probabilities.

The ViT comes from ``timm.create_model`` (never from a hub): plain ViTs, DeiT (distilled too: two
prefix tokens), ViTs with register tokens and hybrids (a conv stem before the patch embedding, e.g.
the ACR paper's ``vit_base_r50_s16_384``). Each block's post-softmax attention ``[B, heads, N, N]``
is captured as a node of the autograd graph, so attention losses (ACR) and
``torch.autograd.grad`` (gradient-weighted attention maps) can use it.

How the attention is captured: timm's ``Attention.forward`` computes, when ``fused_attn`` is off,
``attn = softmax(q @ k^T); attn = self.attn_drop(attn); x = attn @ v``. We turn fused attention
off per module and register a forward *pre*-hook on ``attn_drop``: its input is exactly the
post-softmax probabilities, the very tensor the rest of the block consumes. This needs no copy of
timm's attention code, so it keeps working as timm evolves; a forward that captures a different
number of maps than it asked for (a timm change, an unsupported attention class) fails loudly.

Every block is captured by default (training's losses use them all). Inside
``with capturing(model, blocks):`` only those blocks are; the others run timm's fused kernel (which
never materialises the probabilities) and their entry in ``attentions`` is None. Seed maps ask for
the blocks they read, e.g. ACR's last two when refinement is off.

The model never reads files: :func:`load_pretrained` takes a state dict in timm's keys, which
``ray_wsss.core.weights`` reads and maps from the layouts it knows (timm/DeiT, ACR, this project).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import vision_transformer_hybrid
from timm.models.vision_transformer import checkpoint_filter_fn

from ray_wsss.core.errors import WsssError

_logger = logging.getLogger(__name__)

PARTIAL_PATCHES = ("error", "drop")
POS_EMBED_RESAMPLERS = ("timm", "mctformer")
# Classifier heads: a checkpoint's of another shape (other classes) is dropped, not an error.
HEAD_PREFIXES = ("head.", "head_dist.")


@dataclasses.dataclass
class ViTConfig:
    model_name: str = "vit_tiny_patch16_224"  # any timm ViT/DeiT (distilled too), register or hybrid ViT
    img_size: int = 96
    patch_size: int = 16  # pixels per token side; a hybrid's = its conv stem's reduction x its feature-map patch
    depth: int | None = None       # None = the named model's depth
    embed_dim: int | None = None   # None = the named model's
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    weights: str | None = None     # local path or s3:// URI (read by ray_wsss.core.weights); None = random init
    # The classifier head reads the last block's class token BEFORE the final LayerNorm (the ACR authors'
    # head; the norm is computed and discarded, its parameters kept for the layout). False = timm's head.
    pre_norm_head: bool = False
    # An input side that is not a multiple of the patch: "error", or "drop" its last H mod p rows and
    # W mod p columns, as a stride-p patch conv does (the MCTformer authors' inference on native sizes).
    partial_patches: str = "error"
    # MCTformer's position-embedding resampling to the input grid: "timm" (antialiased bicubic to the grid)
    # or "mctformer" (the authors' bicubic at scale ((gh + 0.1) / g0, (gw + 0.1) / g0), see mctformer.py).
    pos_embed_resampler: str = "timm"

    def __post_init__(self) -> None:
        for name, choices in (("partial_patches", PARTIAL_PATCHES), ("pos_embed_resampler", POS_EMBED_RESAMPLERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ViTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")


@dataclasses.dataclass
class ClassifierOutput:
    logits: torch.Tensor              # [B, C] foreground class scores
    # one per block, post-softmax [B, heads, N, N], in the graph; None for a block not captured (`capturing`)
    attentions: list[torch.Tensor | None]
    grid: tuple[int, int]             # patch grid (gh, gw) of this input
    num_prefix_tokens: int            # tokens before the patch tokens (1 for a cls-token ViT)
    num_register_tokens: int = 0      # of those, the registers (timm puts them after the class tokens)

    @property
    def num_class_tokens(self) -> int:
        """Leading tokens that are class tokens: cls (1), DeiT's cls + dist (2), MCTformer's C."""
        return self.num_prefix_tokens - self.num_register_tokens


class _AttentionRecorder:
    """Collects the attention probabilities seen by ``attn_drop`` pre-hooks during one forward.

    A plain object with a bound-method hook (not a closure) so the model pickles and deep-copies. It
    owns the blocks' ``fused_attn`` switches: off for the captured blocks, timm's choice for the rest.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] | None = None
        self.modules: list[nn.Module] = []
        self.fused_default: list[bool] = []
        self.captured: frozenset[int] | None = None  # None = every block

    def attach(self, modules: list[nn.Module]) -> None:
        """Hook each block's attention module (in block order)."""
        self.modules = list(modules)
        self.fused_default = [bool(m.fused_attn) for m in self.modules]
        for module in self.modules:
            module.fused_attn = False  # the fused kernel never materialises the probabilities
            module.attn_drop.register_forward_pre_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.maps is not None:
            self.maps.append(args[0])

    def blocks(self) -> list[int]:
        return list(range(len(self.modules))) if self.captured is None else sorted(self.captured)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor | None]]:
        """Around one forward: yields the per-block list that is filled (None = not captured) on exit."""
        wanted = set(self.blocks())
        for index, module in enumerate(self.modules):
            module.fused_attn = self.fused_default[index] if index not in wanted else False
        self.maps, result = [], [None] * len(self.modules)
        try:
            yield result
            got = self.maps
        finally:
            self.maps = None
        if len(got) != len(wanted):
            raise RuntimeError(
                f"captured {len(got)} attention maps for {len(wanted)} blocks; "
                "the installed timm's Attention no longer routes probabilities through attn_drop")
        for index, attention in zip(sorted(wanted), got):
            result[index] = attention


@contextlib.contextmanager
def capturing(model: nn.Module, blocks: Iterable[int] | None) -> Iterator[None]:
    """Within it, ``model``'s forwards capture only these blocks' attention (negative = from the end; None =
    all); the other blocks run timm's fused attention. ``model``: an AttentionViT or an MCTformer."""
    recorder: _AttentionRecorder = model.attention_recorder
    depth = len(recorder.modules)
    chosen = None if blocks is None else frozenset(b % depth if -depth <= b < depth else _bad_block(b, depth)
                                                   for b in blocks)
    previous, recorder.captured = recorder.captured, chosen
    try:
        yield
    finally:
        recorder.captured = previous


def _bad_block(block: int, depth: int) -> int:
    raise ValueError(f"block {block} does not exist in a model of {depth} blocks")


class AttentionViT(nn.Module):
    """timm ViT classifier (class-token logits) returning per-block attention maps.

    ``state_dict()`` keys are timm's keys prefixed by ``vit.``. ``patch_size`` is the token stride in
    pixels (a hybrid's conv stem included).
    """

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        if cfg.pos_embed_resampler != "timm":
            raise WsssError(f"pos_embed_resampler={cfg.pos_embed_resampler!r} is MCTformer's; "
                            "a single-class-token ViT resamples with timm's")
        self.cfg = cfg
        self.vit = _create_timm_vit(cfg, num_classes)
        if getattr(self.vit, "cls_token", None) is None or not hasattr(self.vit, "blocks"):
            raise WsssError(f"{cfg.model_name} is not a class-token ViT; AttentionViT needs one")
        self.num_prefix_tokens: int = int(self.vit.num_prefix_tokens)
        self.num_register_tokens: int = int(getattr(self.vit, "num_reg_tokens", 0) or 0)
        self.patch_size: tuple[int, int] = tuple(self.vit.patch_embed.feat_ratio(as_scalar=False))
        self.attention_recorder = _AttentionRecorder()
        for index, block in enumerate(self.vit.blocks):
            attn = getattr(block, "attn", None)
            if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):
                raise WsssError(
                    f"{cfg.model_name} block {index}: attention module {type(attn).__name__} does not "
                    "expose attn_drop/fused_attn, so its attention probabilities cannot be captured")
        self.attention_recorder.attach([block.attn for block in self.vit.blocks])
        if cfg.pre_norm_head:
            # The head gets the norm's input; the frozen norm stays for the state-dict layout (and DDP
            # then sees no trainable parameter without a gradient).
            self.vit.norm.register_forward_hook(_skip_module)
            self.vit.norm.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        """timm's exclusions (position embedding, prefix tokens) under our ``vit.`` prefix, for its optimiser groups."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        x, grid = crop_to_tokens(x, self.patch_size, self.cfg.partial_patches)
        with self.attention_recorder.recording() as attentions:
            logits = self.vit(x)
        return ClassifierOutput(logits=logits, attentions=attentions, grid=grid,
                                num_prefix_tokens=self.num_prefix_tokens, num_register_tokens=self.num_register_tokens)


def _skip_module(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook making a module the identity (its output is computed and discarded)."""
    return args[0]


def crop_to_tokens(x: torch.Tensor, patch_size: tuple[int, int],
                   partial_patches: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images [B, C, H, W] -> (the part the tokens cover, its grid (gh, gw)), per ``partial_patches``."""
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    (height, width), (ph, pw) = x.shape[-2:], patch_size
    if height < ph or width < pw:
        raise ValueError(f"image size {height}x{width} is smaller than one patch {ph}x{pw}")
    if height % ph or width % pw:
        if partial_patches != "drop":
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw} "
                             "(partial_patches='drop' would ignore the last rows/columns)")
        x = x[..., :height - height % ph, :width - width % pw]
    return x, (height // ph, width // pw)


def _create_timm_vit(cfg: ViTConfig, num_classes: int) -> nn.Module:
    """The timm model whose tokens are ``cfg.patch_size`` pixels apart.

    timm's ``patch_size`` of a hybrid is the patch on its conv stem's feature map, so for a hybrid it
    is the stride divided by the stem's reduction, which a build with patch 1 reveals (timm's own
    default for ``vit_base_r50_s16_384``, so the paper's model is built once).
    """
    optional = {"depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads}
    kwargs = dict(pretrained=False, num_classes=num_classes, img_size=cfg.img_size,
                  dynamic_img_size=True,  # pos-embed interpolated per forward: any size, non-square too
                  global_pool="token", drop_path_rate=cfg.drop_path_rate,
                  **{k: v for k, v in optional.items() if v is not None})
    stride = cfg.patch_size
    if not _is_hybrid(cfg.model_name):
        return _checked_stride(timm.create_model(cfg.model_name, patch_size=stride, **kwargs), cfg)
    vit = timm.create_model(cfg.model_name, patch_size=1, **kwargs)
    reduction = tuple(vit.patch_embed.feature_ratio)
    if any(stride % r for r in reduction) or cfg.img_size % stride:
        raise WsssError(f"{cfg.model_name}: patch size {stride} must be a multiple of its conv stem's reduction "
                        f"{reduction} and divide img_size {cfg.img_size}")
    if reduction != (stride, stride):
        vit = timm.create_model(cfg.model_name, patch_size=(stride // reduction[0], stride // reduction[1]), **kwargs)
    return _checked_stride(vit, cfg)


def _is_hybrid(model_name: str) -> bool:
    return timm.models.model_entrypoint(model_name).__module__ == vision_transformer_hybrid.__name__


def _checked_stride(vit: nn.Module, cfg: ViTConfig) -> nn.Module:
    stride = tuple(vit.patch_embed.feat_ratio(as_scalar=False))
    if stride != (cfg.patch_size, cfg.patch_size):
        kind = "hybrid " if isinstance(vit.patch_embed, HybridEmbed) else ""
        raise WsssError(f"{cfg.model_name}: the {kind}patch embedding has stride {stride}, not the requested "
                        f"patch size {cfg.patch_size}")
    return vit


def create_classifier(cfg: ViTConfig, num_classes: int, state_dict: dict[str, torch.Tensor] | None = None,
                      source: str = "state dict") -> AttentionViT:
    """Build the classifier, loading ``state_dict`` (timm keys) when given; ``source`` names it in errors.

    ``cfg.weights`` is a file for ``ray_wsss.core.weights.build_classifier`` to read; naming one here
    without its state dict is an error rather than a silently random model.
    """
    if cfg.weights and state_dict is None:
        raise WsssError(f"ViTConfig.weights={cfg.weights!r} but no state dict: build with "
                        "ray_wsss.core.weights.build_classifier, which reads it")
    model = AttentionViT(cfg, num_classes)
    if state_dict is not None:
        load_pretrained(model, state_dict, source)
    return model


def load_pretrained(model: AttentionViT, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load a state dict in timm's keys (``ray_wsss.core.weights`` maps other layouts to them).

    Position embeddings are resampled to the model's grid and a patch embedding to its patch size
    (timm's ``checkpoint_filter_fn``, which uses ``resample_abs_pos_embed``). A classifier head of
    another shape (other classes) is dropped and stays randomly initialised. Missing non-head keys
    are an error; unexpected keys are logged.
    """
    # adapt_layer_scale: DeiT-3 releases name LayerScale gamma_1/gamma_2
    state_dict = checkpoint_filter_fn(dict(state_dict), model.vit, adapt_layer_scale=True)
    own = model.vit.state_dict()
    for key in [k for k in state_dict if k.startswith(HEAD_PREFIXES)]:
        if key in own and state_dict[key].shape != own[key].shape:
            _logger.warning("%s: dropping %s of shape %s (model expects %s: different classes)",
                            source, key, tuple(state_dict[key].shape), tuple(own[key].shape))
            del state_dict[key]
    try:
        result = model.vit.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches: another architecture
        raise WsssError(f"weights {source} do not fit {model.cfg.model_name}: {err}") from err
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    if missing:
        raise WsssError(f"weights {source} lack {len(missing)} parameters of {model.cfg.model_name}: {missing[:10]}")
    if result.unexpected_keys:
        _logger.warning("%s: ignored %d unexpected keys: %s", source, len(result.unexpected_keys),
                        result.unexpected_keys[:10])
    _logger.info("loaded weights from %s", source)
