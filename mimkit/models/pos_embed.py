"""Position encodings for the ViT: fixed 2-D sin-cos tables, BEiT relative-position indices,
and torch-only resizing of absolute and relative tables (no SciPy: `interp2d` is gone; relative tables
grow the BEiT-segmentation way, a cubic spline over geometrically spaced offsets)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

# Extra rows at the end of a BEiT relative-position table: cls->token, token->cls, cls->cls.
NUM_CLS_RELATIONS = 3


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: first half sin, second half cos, frequencies 1/10000^(i/(dim/2))."""
    assert dim % 2 == 0, "sin-cos needs an even dimension"
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos table, row-major over the grid -> [(1 if cls) + grid_h*grid_w, embed_dim] fp32.

    Same layout as MAE / MILAN checkpoints: the first half of the channels encodes the column
    index, the second half the row index; the cls row is zeros.
    """
    assert embed_dim % 4 == 0, "2-D sin-cos needs embed_dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_cols = _sincos_1d(embed_dim // 2, cols.reshape(-1))  # [h*w, D/2]
    emb_rows = _sincos_1d(embed_dim // 2, rows.reshape(-1))  # [h*w, D/2]
    table = torch.cat([emb_cols, emb_rows], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def num_relative_distances(window: Tuple[int, int]) -> int:
    """Rows of a BEiT relative-position table for a window (Wh, Ww): (2Wh-1)(2Ww-1) + 3."""
    return (2 * window[0] - 1) * (2 * window[1] - 1) + NUM_CLS_RELATIONS


def relative_position_index(window: Tuple[int, int]) -> torch.Tensor:
    """Long [1 + Wh*Ww, 1 + Wh*Ww] index into the table, with the cls token at position 0.

    Token pair (i, j) maps to its offset (dy, dx) shifted to be non-negative, flattened row-major
    over the (2Wh-1, 2Ww-1) offset grid; the last three rows of the table serve the cls pairs.
    """
    wh, ww = window
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)])  # [2, n]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, n, n], query minus key
    dy, dx = rel[0] + (wh - 1), rel[1] + (ww - 1)
    n = wh * ww
    num = num_relative_distances(window)
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * ww - 1) + dx
    index[0, :] = num - 3  # cls -> token
    index[:, 0] = num - 2  # token -> cls
    index[0, 0] = num - 1  # cls -> cls
    return index


def resize_abs_pos_embed(
    pos: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """[1, P + h*w, D] -> [1, P + h'*w', D]: bicubic over the patch part, prefix rows kept."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    dim = pos.shape[-1]
    assert patches.shape[1] == old_grid[0] * old_grid[1], (patches.shape, old_grid)
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


def window_from_table_rows(rows: int) -> Tuple[int, int]:
    """Inverse of `num_relative_distances` for a square window (all public checkpoints are square)."""
    side = math.isqrt(rows - NUM_CLS_RELATIONS)
    if side * side != rows - NUM_CLS_RELATIONS or side % 2 == 0:
        raise ValueError(f"{rows} rows is not a square BEiT relative-position table ((2W-1)^2 + 3)")
    w = (side + 1) // 2
    return (w, w)


def geometric_offsets(old_side: int, new_side: int) -> torch.Tensor:
    """Where the offsets of an old (2W-1)-wide table sit on the new one's offset axis, BEiT's segmentation
    way: offsets 0 and +-1 stay where they are, the gaps then grow by a ratio q found so that the farthest
    old offset lands on the new edge, 1 + q + ... + q^(W-2) = new_side // 2. [old_side] float64, ascending."""
    half, target = old_side // 2, new_side // 2

    def reach(q: float) -> float:  # 1 + q + ... + q^(half-1)
        return (1.0 - q**half) / (1.0 - q)

    low, high, q = 1.01, 1.5, 1.01  # the official bracket; q is the last midpoint tried
    while high - low > 1e-6:
        q = (low + high) / 2.0
        low, high = (low, q) if reach(q) > target else (q, high)
    positive = torch.cumsum(torch.tensor([q**i for i in range(half)], dtype=torch.float64), 0)  # 1, 1+q, ...
    return torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive])


def cubic_spline_weights(knots: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """[P, K] linear map from values at ascending `knots` to the not-a-knot cubic spline through them,
    evaluated at `points` (clamped to the knot range, as FITPACK evaluates). float64; K >= 4."""
    k = knots.shape[0]
    h = knots[1:] - knots[:-1]  # [K-1]
    # Second derivatives M solve A M = B y: the interior continuity rows, plus not-a-knot at both ends
    # (the third derivative is continuous across the second and the second-to-last knot).
    A = torch.zeros(k, k, dtype=torch.float64)
    B = torch.zeros(k, k, dtype=torch.float64)
    for i in range(1, k - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        B[i, i - 1], B[i, i], B[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    A[0, 0], A[0, 1], A[0, 2] = -1 / h[0], 1 / h[0] + 1 / h[1], -1 / h[1]
    A[-1, -3], A[-1, -2], A[-1, -1] = -1 / h[-2], 1 / h[-2] + 1 / h[-1], -1 / h[-1]
    M = torch.linalg.solve(A, B)  # [K, K]: second derivatives per unit of each knot value
    x = points.to(torch.float64).clamp(knots[0], knots[-1])
    i = torch.searchsorted(knots, x, right=True).sub(1).clamp(0, k - 2)  # interval of each point
    hi, left, right = h[i], x - knots[i], knots[i + 1] - x
    W = torch.zeros(x.shape[0], k, dtype=torch.float64)
    rows = torch.arange(x.shape[0])
    W[rows, i] += right / hi
    W[rows, i + 1] += left / hi
    W += (right**3 / (6 * hi) - right * hi / 6)[:, None] * M[i] + (left**3 / (6 * hi) - left * hi / 6)[:, None] * M[i + 1]
    return W


def resize_rel_pos_table(
    table: torch.Tensor, old_window: Tuple[int, int], new_window: Tuple[int, int]
) -> torch.Tensor:
    """[(2Wh-1)(2Ww-1)+3, H] -> the same for new_window, the 3 cls rows kept.

    Growing (224 -> 512 px: 14 -> 32 patches), offsets keep their meaning as in BEiT's segmentation code:
    the old offsets are placed on the new axis by :func:`geometric_offsets` (0 and +-1 exactly where they
    were, far ones spread geometrically) and a cubic spline through them is read at every integer offset.
    Stretching the table instead would move offset +1 to +2.2. Shrinking: bicubic over the offset grid.
    """
    old_window, new_window = tuple(old_window), tuple(new_window)
    if old_window == new_window:
        return table
    assert table.shape[0] == num_relative_distances(old_window), (table.shape, old_window)
    heads = table.shape[1]
    offsets, cls_rows = table[:-NUM_CLS_RELATIONS], table[-NUM_CLS_RELATIONS:]
    old_side = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new_side = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    grid = offsets.reshape(old_side[0], old_side[1], heads).permute(2, 0, 1)  # [H, 2Wh-1, 2Ww-1]
    if all(n > o and o >= 5 for o, n in zip(old_side, new_side)):
        weights = []
        for o, n in zip(old_side, new_side):
            t = n // 2
            weights.append(cubic_spline_weights(geometric_offsets(o, n), torch.arange(-t, t + 1, dtype=torch.float64)))
        grid = torch.einsum("yi,hij,xj->hyx", weights[0], grid.double(), weights[1])
    else:
        # align_corners=True keeps offset 0 (the centre) and the extreme offsets on grid points.
        grid = F.interpolate(grid[None].float(), size=new_side, mode="bicubic", align_corners=True)[0]
    offsets = grid.permute(1, 2, 0).reshape(new_side[0] * new_side[1], heads).to(table.dtype)
    return torch.cat([offsets, cls_rows], dim=0)
