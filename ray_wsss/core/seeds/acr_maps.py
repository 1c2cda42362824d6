"""ACR class maps (paper Eq. 7-8): gradient-weighted class-to-patch attention, refined by affinity.

For an image and a present class c, with A^l the post-softmax attention of block l:

    G^l_c  = ReLU(dy_c / dA^l[cls, patches])       per head, y_c = the class logit
    M_c    = mean over the last L blocks of mean over heads of G^l_c          (Eq. 7)
    R_c[j] = sum_i A_pp[j, i] * M_c[i]                                         (Eq. 8)

where A_pp is the patch-to-patch attention averaged over heads and the refinement blocks (the
authors' code sums over blocks instead: ``layer_reduction="sum"``): patch j
aggregates the scores of the patches it attends to ("affinity @ cam", as TransCAM and the ACR
code do). ACR* skips the refinement. The same code serves the baseline classifier: only the
checkpoint differs.

With K class tokens (1 for a cls-token ViT, 2 for a distilled DeiT) and P prefix tokens (class
tokens, then any registers) the gradient rows are the class-token rows ``[:K]`` averaged after the
ReLU, the columns the patch tokens ``[P:]``.

Gradients of all (image, class) pairs of a batch come from ONE forward of the batch and one
backward per class *slot*: slot s holds the s-th present class of every image, and since images of
a batch do not interact, the backward of sum_i y_{c_s(i)}(image i) gives every image's gradient for
its own s-th class. The slots are batched into a single vector-Jacobian product with
``torch.autograd.grad(..., is_grads_batched=True)`` (vmap). ``bench/bench_seed_grad.py`` measures
the strategies against the authors' one-backward-per-image-and-class loop (vit_tiny, depth 12,
96 px, 16 images / 36 pairs, 2-core CPU): slots_vmap 4-6x, slots_loop 5x, pairs (one image copy per
class) 3.6-4x, and a vmap over per-pair one-hot selectors ~1-2x, as each pair's VJP then runs over
the whole batch; that last one lives in the benchmark only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ray_wsss.core.models.vit import AttentionViT, ClassifierOutput, capturing

GRAD_STRATEGIES = ("slots_vmap", "slots_loop", "pairs")
LAYER_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class ACRMapConfig:
    grad_layers: int = 2                           # last L blocks for the gradient maps (authors' code: 2)
    refine: bool = True                            # False = ACR* (no affinity refinement)
    refine_layers: tuple[int, ...] | None = None   # block indices (negative from the end) for A_pp; None = all
    # How blocks combine, for the gradient maps and for A_pp alike: "mean" (Eq. 7-8) or "sum" (the
    # authors' code: 2x the gradient maps, and refined maps 24x those of "mean" with 12 blocks). It
    # scales the raw maps only; min-max seeds differ just through the normalisation's epsilon.
    layer_reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduction must be one of {LAYER_REDUCTIONS}, got {self.layer_reduction!r}")


def class_maps(model: AttentionViT, images: Tensor, classes: Sequence[Sequence[int]],
               cfg: ACRMapConfig = ACRMapConfig(), strategy: str = "slots_vmap") -> list[Tensor]:
    """Class maps of the present classes of each image, before min-max normalisation.

    ``images``: normalised [B, 3, H, W] (H, W multiples of the patch size); ``classes[i]``: the
    foreground ids (1-based; logit index = id - 1) of image i. Returns per image float32
    [k_i, gh, gw] in the order of ``classes[i]``. Put the model in eval mode first (dropout would
    make the gradients random). ``strategy`` picks how the gradients are batched (benchmarks only).
    """
    if images.ndim != 4 or len(images) != len(classes):
        raise ValueError(f"images {tuple(images.shape)} and {len(classes)} class lists do not match")
    if strategy not in GRAD_STRATEGIES:
        raise ValueError(f"unknown gradient strategy {strategy!r}; choose one of {GRAD_STRATEGIES}")
    classes = [[int(c) for c in row] for row in classes]
    if not any(classes):  # nothing to explain: skip the forward
        grid = [side // patch for side, patch in zip(images.shape[-2:], model.patch_size)]
        return [images.new_zeros(0, *grid, dtype=torch.float32) for _ in classes]
    with torch.inference_mode(False), torch.enable_grad(), capturing(model, captured_blocks(model, cfg)):
        # Cloned outside inference mode and requiring grad, so the graph exists even for a frozen model.
        images = images.clone().requires_grad_(True)
        if strategy == "pairs":
            return _pair_maps(model, images, classes, cfg)
        out = model(images)
        logit_slots = _logit_slots(classes, out.logits.shape[1])
        maps = _slot_gradient_maps(out, logit_slots, cfg, batched=strategy == "slots_vmap")  # [S, B, Np]
        if cfg.refine:
            maps = _refine(maps.transpose(0, 1), _patch_affinity(out, cfg)).transpose(0, 1)
    return [maps[:len(row), i].reshape(len(row), *out.grid).float() for i, row in enumerate(classes)]


def captured_blocks(model: AttentionViT, cfg: ACRMapConfig) -> list[int] | None:
    """The blocks whose attention the maps read (None = all): the last ``grad_layers``, and the refinement's.

    The other blocks keep timm's fused attention. Raises ValueError for blocks the model lacks.
    """
    depth = len(model.attention_recorder.modules)
    grad = _grad_layers(depth, cfg.grad_layers)
    if not cfg.refine:
        return grad
    refine = _refine_layers(depth, cfg.refine_layers)
    return None if len(refine) == depth else sorted(set(grad) | set(refine))


def naive_class_maps(model: AttentionViT, images: Tensor, classes: Sequence[Sequence[int]],
                     cfg: ACRMapConfig = ACRMapConfig()) -> list[Tensor]:
    """Reference: the authors' loop, one forward per image and one backward per (image, class)."""
    results = []
    for image, row in zip(images, classes):
        with torch.inference_mode(False), torch.enable_grad():
            out = model(image[None].clone().requires_grad_(True))
            layers = _grad_layers(len(out.attentions), cfg.grad_layers)
            maps = []
            for class_id in row:
                logit = _logit_index(class_id, out.logits.shape[1])
                grads = torch.autograd.grad(out.logits[0, logit], [out.attentions[layer] for layer in layers],
                                            retain_graph=True)
                maps.append(_grads_to_map(grads, out, cfg.layer_reduction)[0])
            num_patches = out.grid[0] * out.grid[1]
            stacked = torch.stack(maps) if maps else out.logits.new_zeros(0, num_patches)
            if cfg.refine:
                stacked = _refine(stacked[None], _patch_affinity(out, cfg))[0]
        results.append(stacked.reshape(len(row), *out.grid).float())
    return results


def _logit_index(class_id: int, num_logits: int) -> int:
    if not 1 <= class_id <= num_logits:
        raise ValueError(f"class id {class_id} is not a foreground class of a {num_logits}-class model "
                         f"(ids are 1..{num_logits}; 0 = background has no logit)")
    return class_id - 1


def _logit_slots(classes: list[list[int]], num_logits: int) -> Tensor:
    """[S, B] logit indices, slot s = the s-th class of each image, -1 where an image has fewer."""
    slots = torch.full((max((len(r) for r in classes), default=0), len(classes)), -1, dtype=torch.long)
    for i, row in enumerate(classes):
        for s, class_id in enumerate(row):
            slots[s, i] = _logit_index(class_id, num_logits)
    return slots


def _grad_layers(depth: int, grad_layers: int) -> list[int]:
    if not 1 <= grad_layers <= depth:
        raise ValueError(f"grad_layers={grad_layers} must be within 1..{depth} (the model's blocks)")
    return list(range(depth - grad_layers, depth))


def _refine_layers(depth: int, layers: tuple[int, ...] | None) -> list[int]:
    if layers is None:
        return list(range(depth))
    bad = [i for i in layers if not -depth <= i < depth]
    if not layers or bad:
        raise ValueError(f"refine_layers {layers} must be non-empty block indices within ±{depth}, or None")
    return sorted({i % depth for i in layers})


def _grads_to_map(grads: Sequence[Tensor], out: ClassifierOutput, reduction: str) -> Tensor:
    """Per-layer gradients [..., heads, N, N] -> ReLU, mean over class rows and heads, ``reduction`` over
    layers: [..., Np]."""
    rows, prefix = out.num_class_tokens, out.num_prefix_tokens
    per_layer = [g[..., :rows, prefix:].clamp(min=0).mean(dim=-2).mean(dim=-2) for g in grads]
    return _reduce_layers(torch.stack(per_layer), reduction)


def _reduce_layers(stacked: Tensor, reduction: str) -> Tensor:
    return stacked.sum(dim=0) if reduction == "sum" else stacked.mean(dim=0)


def _slot_gradient_maps(out: ClassifierOutput, logit_slots: Tensor, cfg: ACRMapConfig, batched: bool) -> Tensor:
    """[S, B, Np] gradient maps (Eq. 7) of every (slot, image); padded slots are zero."""
    attentions = [out.attentions[layer] for layer in _grad_layers(len(out.attentions), cfg.grad_layers)]
    num_slots = logit_slots.shape[0]
    selectors = torch.zeros(num_slots, *out.logits.shape, dtype=out.logits.dtype, device=out.logits.device)
    slot_idx, image_idx = torch.nonzero(logit_slots >= 0, as_tuple=True)
    selectors[slot_idx, image_idx, logit_slots[slot_idx, image_idx].to(selectors.device)] = 1.0
    if batched:
        grads = torch.autograd.grad(out.logits, attentions, grad_outputs=selectors, is_grads_batched=True)
        return _grads_to_map(grads, out, cfg.layer_reduction)
    maps = []
    for s in range(num_slots):
        grads = torch.autograd.grad(out.logits, attentions, grad_outputs=selectors[s],
                                    retain_graph=s < num_slots - 1)
        maps.append(_grads_to_map(grads, out, cfg.layer_reduction))
    return torch.stack(maps)


def _pair_maps(model: AttentionViT, images: Tensor, classes: list[list[int]], cfg: ACRMapConfig) -> list[Tensor]:
    """Strategy "pairs": repeat each image once per class, one forward and one backward of the sum."""
    image_idx = torch.tensor([i for i, row in enumerate(classes) for _ in row], dtype=torch.long)
    out = model(images[image_idx.to(images.device)])
    logits = torch.tensor([_logit_index(c, out.logits.shape[1]) for row in classes for c in row],
                          dtype=torch.long, device=out.logits.device)
    attentions = [out.attentions[layer] for layer in _grad_layers(len(out.attentions), cfg.grad_layers)]
    grads = torch.autograd.grad(out.logits.gather(1, logits[:, None]).sum(), attentions)
    maps = _grads_to_map(grads, out, cfg.layer_reduction)  # [pairs, Np]
    if cfg.refine:
        maps = _refine(maps[:, None], _patch_affinity(out, cfg))[:, 0]
    return [m.reshape(len(m), *out.grid).float() for m in maps.split([len(row) for row in classes])]


@torch.no_grad()
def _patch_affinity(out: ClassifierOutput, cfg: ACRMapConfig) -> Tensor:
    """[B, Np, Np] patch-to-patch attention averaged over heads, reduced over the refinement blocks."""
    prefix = out.num_prefix_tokens
    layers = _refine_layers(len(out.attentions), cfg.refine_layers)
    return _reduce_layers(torch.stack([out.attentions[layer][:, :, prefix:, prefix:].mean(dim=1) for layer in layers]),
                          cfg.layer_reduction)


def _refine(maps: Tensor, affinity: Tensor) -> Tensor:
    """Eq. 8: maps [B, k, Np], affinity [B, Np, Np] -> refined[b, s, j] = sum_i affinity[b, j, i] maps[b, s, i]."""
    return maps.detach() @ affinity.transpose(1, 2)
