"""The pairs of PSA / AffinityNet (Ahn & Kwak, CVPR'18) on the stride-8 grid, and their affinities.

Shared by the model (``ray_wsss.core.models.affinitynet``) and the PSA step (``ray_wsss.core.refine.psa``),
so neither depends on the other. Followed line by line (github.com/jiwoon-ahn/psa): ``tool/pyutils.py
get_indices_of_pairs``, ``voc12/data.py ExtractAffinityLabelInRadius`` and ``network/resnet38_aff.py``
(``aff = exp(-mean_c |f_from - f_to|)``: the paper writes the L1 norm, the code takes the MEAN over the D
channels, the norm / D; this module follows the code).

Pair layout on an h x w grid (PSA's, so every pair is in bounds and each unordered pair appears once):
``rf = radius - 1``; the displacements are a half disc, in PSA's order ``(0, 1..rf)`` then, for
``dy = 1..rf``, ``dx = -rf..rf`` with ``dy² + dx² < radius²`` (34 of them at radius 5). The "from" pixels
are rows ``[0, h - rf)`` x columns ``[rf, w - rf)`` in raster order (``M`` of them); pair ``(d, m)`` joins
from-pixel ``m`` with the pixel at ``from + d``. Pairs whose first pixel lies in the last ``rf`` rows or
the outer ``rf`` columns are not formed: PSA's crop, kept as it is. So pixels in the outer ``rf`` columns
have fewer pairs than others (a smaller weight in the walk's average), and a few have none at all (the first
``rf`` pixels of row 0 and a bottom-left corner triangle): the walk leaves their scores as they are.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

STRIDE = 8  # the feature stride: labels, affinities and the walk live on the ceil(H/8) x ceil(W/8) grid


def displacements(radius: int) -> list[tuple[int, int]]:
    """The half disc of (dy, dx) displacements, in PSA's order (see the module doc)."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    half = [(0, dx) for dx in range(1, radius)]
    half += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
             if dx * dx + dy * dy < radius * radius]
    return half


def grid_size(height: int, width: int) -> tuple[int, int]:
    """The stride-8 grid of an image: (ceil(H/8), ceil(W/8)), the image padded to multiples of 8 as PSA does."""
    return -(-height // STRIDE), -(-width // STRIDE)


def pair_windows(height: int, width: int, radius: int) -> tuple[tuple[slice, slice], list[tuple[slice, slice]]]:
    """(rows, cols) slices of the from-pixels, and of the to-pixels of each displacement."""
    rf = radius - 1
    rows, cols = max(height - rf, 0), max(width - 2 * rf, 0)  # an empty window on a grid too small for pairs
    start = (slice(0, rows), slice(rf, rf + cols))
    ends = [(slice(dy, dy + rows), slice(rf + dx, rf + dx + cols)) for dy, dx in displacements(radius)]
    return start, ends


def pair_indices(height: int, width: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Raster indices of the pairs: from [M] and to [n_displacements, M], int64 (PSA's get_indices_of_pairs)."""
    grid = np.arange(height * width, dtype=np.int64).reshape(height, width)
    start, ends = pair_windows(height, width, radius)
    return grid[start].reshape(-1), np.stack([grid[end].reshape(-1) for end in ends])


def pair_affinities(embedding: Tensor, radius: int) -> Tensor:
    """Embedding [B, D, h, w] -> affinities [B, n_displacements, M], exp(-mean_c |f_from - f_to|).

    One displacement at a time (slices, no gathered copy), so inference holds one [B, D, M] difference at once.
    """
    start, ends = pair_windows(*embedding.shape[-2:], radius)
    first = embedding[..., start[0], start[1]]
    return torch.stack([torch.exp(-(first - embedding[..., rows, cols]).abs().mean(1)).flatten(1)
                        for rows, cols in ends], dim=1)
