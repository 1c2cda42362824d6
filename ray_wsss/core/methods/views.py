"""Geometric views of an image and the exact inverse map f⁻¹ on attention (ACR, Eq. 3-5).

A :class:`View` applies, in this fixed order: horizontal flip, vertical flip, rotation by
``rot90`` counter-clockwise quarter turns (``torch.rot90`` on the H, W axes, i.e. a transpose
followed by a flip), then a resize by ``scale``. f⁻¹ undoes them in reverse order.

Patch tokens are row-major over the grid (gh, gw). Flips and rotations move whole patches, so on
tokens they are index permutations and f⁻¹ is exact: with Q the N×N permutation matrix taking
original tokens to view tokens (t' = Q t, built from Kronecker products in Eq. 5: hflip I⊗J,
vflip J⊗I, transpose the commutation matrix), f⁻¹ of a class-to-patch row is ``row @ Q`` and of a
patch-to-patch block ``Qᵀ @ A' @ Q``. We implement that by indexing rather than matrix products.
A resize is undone by bilinear interpolation of the attention maps (approximate by nature). On the
key axis attention is a distribution: a view with N' keys spreads the same mass over N' tokens, so
interpolating back to N keys also rescales by N'/N; otherwise a resized view could never agree with
the original and Lact/Laff would carry a constant offset. Query rows are resampled as they are.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


@dataclasses.dataclass(frozen=True)
class View:
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0          # counter-clockwise quarter turns, 0..3
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.rot90 not in (0, 1, 2, 3):
            raise ValueError(f"rot90 must be 0..3 quarter turns, got {self.rot90}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    @property
    def is_permutation(self) -> bool:
        """True when the view only permutes patches (no resize), so f⁻¹ is exact."""
        return self.scale == 1.0

    def _permute(self, x: Tensor) -> Tensor:
        """Flips then rotation on the last two (spatial) axes."""
        if self.hflip:
            x = x.flip(-1)
        if self.vflip:
            x = x.flip(-2)
        return torch.rot90(x, self.rot90, dims=(-2, -1)) if self.rot90 else x

    def _permuted_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        gh, gw = grid
        return (gw, gh) if self.rot90 % 2 else (gh, gw)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of the view of an image whose grid is ``grid``."""
        gh, gw = self._permuted_grid(grid)
        return _scaled(gh, self.scale), _scaled(gw, self.scale)

    def apply(self, images: Tensor, patch_size: int) -> Tensor:
        """[B, C, H, W] -> the view; a resize keeps H', W' multiples of ``patch_size``."""
        height, width = images.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
        out = self._permute(images)
        if self.is_permutation:
            return out
        gh, gw = self.output_grid((height // patch_size, width // patch_size))
        return F.interpolate(out, size=(gh * patch_size, gw * patch_size), mode="bilinear", align_corners=False)

    def token_index(self, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
        """[N] long: view token j (before any resize) is original token ``index[j]``."""
        gh, gw = grid
        return self._permute(torch.arange(gh * gw, device=device).reshape(gh, gw)).flatten()

    def _inverse_index(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        return torch.argsort(self.token_index(grid, device))

    def _unscale(self, maps: Tensor, grid: tuple[int, int], keys: bool) -> Tensor:
        """[..., N'] over the view grid -> [..., N] over the permuted (pre-resize) grid.

        ``keys``: the last axis holds attention keys, whose mass is kept (x N'/N).
        """
        src = self.output_grid(grid)
        dst = self._permuted_grid(grid)
        if src == dst:
            return maps
        lead = maps.shape[:-1]
        flat = maps.reshape(-1, 1, *src)
        flat = F.interpolate(flat, size=dst, mode="bilinear", align_corners=False)
        if keys:
            flat = flat * (src[0] * src[1] / (dst[0] * dst[1]))
        return flat.reshape(*lead, dst[0] * dst[1])

    def _check_tokens(self, n: int, grid: tuple[int, int], what: str) -> None:
        gh, gw = self.output_grid(grid)
        if n != gh * gw:
            raise ValueError(f"{what} has {n} tokens but the view of grid {grid} has {gh}x{gw}")

    def invert_cls_row(self, row: Tensor, grid: tuple[int, int]) -> Tensor:
        """Class-to-patch attention [..., N'] of the view -> [..., N] in the original token order.

        ``grid`` is the ORIGINAL (gh, gw).
        """
        self._check_tokens(row.shape[-1], grid, "row")
        row = self._unscale(row, grid, keys=True)
        return row.index_select(-1, self._inverse_index(grid, row.device))

    def invert_patch_block(self, block: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch-to-patch attention [..., N', N'] of the view -> [..., N, N] (queries and keys)."""
        self._check_tokens(block.shape[-1], grid, "block keys")
        self._check_tokens(block.shape[-2], grid, "block queries")
        block = self._unscale(block, grid, keys=True)
        block = self._unscale(block.transpose(-1, -2), grid, keys=False).transpose(-1, -2)  # queries
        inverse = self._inverse_index(grid, block.device)
        return block.index_select(-1, inverse).index_select(-2, inverse)


VIEW_SETS = ("random", "hflip")


def draw_view(view_set: str, generator: torch.Generator, scales: tuple[float, ...] = (1.0,)) -> View:
    """ACR's second view from ``view_set``: "random" (:func:`random_view` over flips, quarter turns and
    ``scales``) or "hflip" (always the horizontal flip, as the authors' training code; ``scales`` unused)."""
    if view_set == "hflip":
        return View(hflip=True)
    if view_set == "random":
        return random_view(generator, scales=scales)
    raise ValueError(f"unknown view set {view_set!r}; choose one of {VIEW_SETS}")


def random_view(generator: torch.Generator, flips: bool = True, rotations: bool = True,
                scales: tuple[float, ...] = (1.0,)) -> View:
    """Draw a view: each flip with p=0.5, a uniform quarter turn, a uniform scale from ``scales``.

    The identity may be drawn; callers that need a non-trivial view can redraw.
    """
    if not scales:
        raise ValueError("random_view needs at least one scale")
    draws = torch.randint(0, 2, (2,), generator=generator).tolist()
    turns = int(torch.randint(0, 4, (1,), generator=generator)) if rotations else 0
    scale = scales[int(torch.randint(0, len(scales), (1,), generator=generator))]
    return View(hflip=flips and bool(draws[0]), vflip=flips and bool(draws[1]), rot90=turns, scale=float(scale))
