"""Views and their exact inverse f⁻¹ on attention (ACR Eq. 3-5)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ray_wsss.core.methods.views import View, draw_view, random_view

GRIDS = [(3, 5), (4, 4), (2, 7)]
PERMUTATION_VIEWS = [View(hflip=h, vflip=v, rot90=r)
                     for h, v, r in itertools.product((False, True), (False, True), range(4))]


def _forward_tokens(view: View, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """f on a token sequence [..., N]: permute it like the view permutes patches."""
    return tokens[..., view.token_index(grid)]


# ---------------------------------------------------------------- Kronecker formula (Eq. 5)

def _flip_matrix(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64).flip(0)


def _commutation_matrix(gh: int, gw: int) -> torch.Tensor:
    """K with K vec_rowmajor(X) = vec_rowmajor(Xᵀ) for X of shape (gh, gw): Σ E_cr ⊗ E_rc."""
    k = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    for r, c in itertools.product(range(gh), range(gw)):
        e_cr = torch.zeros(gw, gh, dtype=torch.float64)
        e_cr[c, r] = 1
        e_rc = torch.zeros(gh, gw, dtype=torch.float64)
        e_rc[r, c] = 1
        k += torch.kron(e_cr, e_rc)
    return k


def _kronecker_matrix(view: View, grid: tuple[int, int]) -> torch.Tensor:
    """Q with view tokens = Q @ original tokens, composed from Kronecker products."""
    gh, gw = grid
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    q = eye(gh * gw)
    if view.hflip:
        q = torch.kron(eye(gh), _flip_matrix(gw)) @ q
    if view.vflip:
        q = torch.kron(_flip_matrix(gh), eye(gw)) @ q
    for _ in range(view.rot90):  # counter-clockwise quarter turn = transpose, then vertical flip
        q = torch.kron(_flip_matrix(gw), eye(gh)) @ _commutation_matrix(gh, gw) @ q
        gh, gw = gw, gh
    return q


def test_commutation_matrix_transposes():
    x = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    assert torch.equal(_commutation_matrix(3, 4) @ x.flatten(), x.T.flatten())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("view", PERMUTATION_VIEWS, ids=str)
def test_index_implementation_equals_kronecker_formula(view, grid):
    n = grid[0] * grid[1]
    q = _kronecker_matrix(view, grid)
    assert torch.equal(q @ q.T, torch.eye(n, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    row = torch.rand(2, n, generator=gen, dtype=torch.float64)
    block = torch.rand(2, n, n, generator=gen, dtype=torch.float64)
    assert torch.equal(view.invert_cls_row(row, grid), row @ q)
    assert torch.equal(view.invert_patch_block(block, grid), q.T @ block @ q)
    # the forward direction agrees too: f(t) = Q t
    tokens = torch.arange(n, dtype=torch.float64)
    assert torch.equal(_forward_tokens(view, tokens, grid), q @ tokens)


# ---------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("view", PERMUTATION_VIEWS, ids=str)
def test_permutation_round_trip_is_exact(view, grid):
    n = grid[0] * grid[1]
    ids = torch.arange(n)
    assert view.output_grid(grid) == ((grid[1], grid[0]) if view.rot90 % 2 else grid)
    assert torch.equal(view.invert_cls_row(_forward_tokens(view, ids, grid), grid), ids)
    block = ids[:, None] * n + ids[None, :]  # unique id per (query, key) pair
    index = view.token_index(grid)
    assert torch.equal(view.invert_patch_block(block[index][:, index], grid), block)


@pytest.mark.parametrize("view", PERMUTATION_VIEWS, ids=str)
def test_apply_moves_patches_like_token_index(view):
    patch, grid = 4, (3, 5)
    ids = torch.arange(grid[0] * grid[1], dtype=torch.float32).reshape(1, 1, *grid)
    image = F.interpolate(ids, scale_factor=patch, mode="nearest")  # each patch holds its token id
    moved = view.apply(image, patch)
    assert moved.shape[-2:] == tuple(g * patch for g in view.output_grid(grid))
    assert torch.equal(moved[0, 0, ::patch, ::patch].flatten().long(), view.token_index(grid))


def test_composition_of_flips_equals_half_turn():
    grid = (3, 5)
    row = torch.rand(4, 15, generator=torch.Generator().manual_seed(1))
    assert torch.equal(View(hflip=True, vflip=True).invert_cls_row(row, grid), View(rot90=2).invert_cls_row(row, grid))


@pytest.mark.parametrize("scale", [0.5, 1.5])
@pytest.mark.parametrize("view", [View(), View(hflip=True, rot90=1)], ids=str)
def test_resize_round_trip_on_smooth_map(view, scale):
    view = View(hflip=view.hflip, rot90=view.rot90, scale=scale)
    grid, patch = (16, 24), 2
    out_grid = view.output_grid(grid)
    assert out_grid == tuple(round(g * scale) for g in (grid[::-1] if view.rot90 % 2 else grid))
    assert view.apply(torch.zeros(2, 3, grid[0] * patch, grid[1] * patch), patch).shape == (
        2, 3, out_grid[0] * patch, out_grid[1] * patch)
    # A smooth attention distribution over the original keys, and the view's: the same scene resampled
    # to the view grid, renormalised (the view's softmax spreads the mass over its N' keys).
    ys, xs = torch.meshgrid(torch.linspace(0, 1, grid[0]), torch.linspace(0, 1, grid[1]), indexing="ij")
    smooth = 0.5 + 0.25 * torch.sin(math.pi * ys) * torch.cos(math.pi * xs)  # [gh, gw]
    original = (smooth / smooth.sum()).flatten()
    permuted = View(hflip=view.hflip, rot90=view.rot90)._permute(smooth)
    resampled = F.interpolate(permuted[None, None], size=out_grid, mode="bilinear", align_corners=False).flatten()
    forward = resampled / resampled.sum()
    back = view.invert_cls_row(forward[None], grid)[0]
    assert back.shape == (grid[0] * grid[1],)
    assert back.sum() == pytest.approx(1.0, rel=0.02)  # the mass is kept
    assert ((back - original).abs() / original).max() < 0.1  # interpolation error of a smooth map (edges)
    # Patch block: each query row a distribution over keys; queries resample, keys keep their mass.
    block = resampled[:, None] * forward[None, :]
    back_block = view.invert_patch_block(block, grid)
    assert back_block.shape == (384, 384)
    expected = smooth.flatten()[:, None] * original[None, :]
    assert ((back_block - expected).abs() / expected).max() < 0.15  # both axes interpolated


def test_wrong_token_count_is_rejected():
    with pytest.raises(ValueError, match="tokens"):
        View(hflip=True).invert_cls_row(torch.zeros(14), (3, 5))
    with pytest.raises(ValueError, match="patch size"):
        View().apply(torch.zeros(1, 3, 30, 32), 16)


def test_random_view_is_deterministic_and_covers_options():
    views = [random_view(torch.Generator().manual_seed(s), scales=(1.0, 0.5)) for s in range(64)]
    again = [random_view(torch.Generator().manual_seed(s), scales=(1.0, 0.5)) for s in range(64)]
    assert views == again
    assert {v.rot90 for v in views} == {0, 1, 2, 3}
    assert {v.scale for v in views} == {1.0, 0.5}
    assert {v.hflip for v in views} == {v.vflip for v in views} == {False, True}
    plain = random_view(torch.Generator().manual_seed(0), flips=False, rotations=False)
    assert plain == View()


# ---------------------------------------------------------------- equivariant attention

def _equivariant_attention(image: torch.Tensor, patch: int) -> torch.Tensor:
    """softmax(XXᵀ/√d) over [mean token; patch tokens], no position embedding: [N+1, N+1].

    Flips/rotations move patches and permute pixels inside every patch the same way, so all dot
    products (and the mean token) are unchanged: the attention is permutation-equivariant.
    """
    tokens = F.unfold(image, kernel_size=patch, stride=patch)[0].T  # [N, C·p·p], row-major grid
    x = torch.cat([tokens.mean(0, keepdim=True), tokens])
    return torch.softmax(x @ x.T / math.sqrt(x.shape[-1]), dim=-1)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
@pytest.mark.parametrize("view", PERMUTATION_VIEWS, ids=str)
def test_inverse_recovers_equivariant_attention(view, grid):
    patch = 4
    image = torch.rand(1, 3, grid[0] * patch, grid[1] * patch, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    attn = _equivariant_attention(image, patch)
    attn_view = _equivariant_attention(view.apply(image, patch), patch)
    torch.testing.assert_close(view.invert_cls_row(attn_view[0, 1:], grid), attn[0, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(view.invert_patch_block(attn_view[1:, 1:], grid), attn[1:, 1:], rtol=0, atol=1e-6)
    if not torch.equal(view.token_index(grid), torch.arange(grid[0] * grid[1])):  # without f⁻¹ they differ
        assert not torch.allclose(attn_view[1:, 1:], attn[1:, 1:], atol=1e-6)


def test_view_sets():
    generator = torch.Generator().manual_seed(5)
    assert all(draw_view("hflip", generator) == View(hflip=True) for _ in range(5))
    drawn = [draw_view("random", torch.Generator().manual_seed(s), (1.0, 0.5)) for s in range(8)]
    assert drawn == [random_view(torch.Generator().manual_seed(s), scales=(1.0, 0.5)) for s in range(8)]
    with pytest.raises(ValueError, match="unknown view set 'vflip'"):
        draw_view("vflip", generator)
