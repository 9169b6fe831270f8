"""Which patches a masked-image model hides.

The samplers, one per family of methods:
- `sample_block_mask` (BEiT / PeCo / BEiT v2, EVA): block-wise masks on the patch grid, with NumPy, a
  fixed number of masked patches per sample.
- `random_masking` (MAE, SimMIM): uniform random visible subset, with torch.
- `sample_guided_visible` (MILAN): visible subset sampled without replacement with probability
  proportional to a score (the teacher's CLS-to-patch attention).

and the mask sources built on them (`BlockMasks`, `RandomMasks`, `GuidedMasks`): one interface,
:class:`MaskSource`, `source(batch_size, generator, scores) -> {"mask", "ids_keep"}`, so every method
gets its masks the same way. A source that needs no scores is drawn in the data workers (per batch,
seeded by the stream: free on the training process, and a resumed run draws the same masks); one that
needs the teacher's scores is drawn by the trainer right after the targets.

Convention (ARCHITECTURE.md): masks are True where a patch is masked; `ids_keep` [B, K] lists the
visible patches in ascending order. Every source masks the same number of patches in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

# A block draw is abandoned after this many rejected tries (BEiT's reference value).
TRIES_PER_BLOCK = 10


@dataclass(frozen=True)
class Block:
    top: int
    left: int
    height: int
    width: int

    @property
    def area(self) -> int:
        return self.height * self.width


def sample_blocks(
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[Block]]:
    """BEiT's block phase: rectangles added until no block fits. Returns (mask [H, W] bool, blocks kept).

    The mask may hold fewer than `num_masked` patches; `sample_block_mask` tops it up.
    A block is kept only if it adds at least one patch and no more than the remaining count,
    so this phase never overshoots.
    """
    height, width = grid
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    blocks: list[Block] = []
    while (remaining := num_masked - int(mask.sum())) > 0:
        # Target area in [min_block, remaining] (capped by max_block); once remaining < min_block a
        # block can still fit by overlapping the existing mask, as in the reference.
        high = max(min_block, min(remaining, max_block))
        added = False
        for _ in range(TRIES_PER_BLOCK):
            area = rng.uniform(min_block, high)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # Rounding can leave h * w below min_block: reject those so min_block holds for every block.
            if not (1 <= h <= height and 1 <= w <= width) or h * w < min_block or h * w > max(max_block, min_block):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= remaining:
                mask[top : top + h, left : left + w] = True
                blocks.append(Block(top, left, h, w))
                added = True
                break
        if not added:
            break
    return mask, blocks


def _grow_from_border(mask: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """Mask `count` more patches, one at a time, each a 4-neighbour of the masked region when one exists.

    Growing the border (rather than masking random isolated patches) keeps the top-up block-like.
    """
    for _ in range(count):
        padded = np.pad(mask, 1)
        near = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        candidates = np.flatnonzero(~mask & near)
        if candidates.size == 0:
            candidates = np.flatnonzero(~mask)
        mask.flat[candidates[rng.integers(candidates.size)]] = True


def sample_block_mask(
    grid: tuple[int, int] = (14, 14),
    num_masked: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """BEiT block-wise mask [H, W] bool with exactly `num_masked` True entries.

    The count is fixed per sample so masked positions batch cleanly. The block phase never overshoots
    (see `sample_blocks`), so the count is only ever topped up, never trimmed: the missing patches are
    grown from the border of the masked region.
    """
    height, width = grid
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked={num_masked} does not fit a {height}x{width} grid")
    mask, _ = sample_blocks(grid, num_masked, min_block, max_block, min_aspect, rng=rng)
    _grow_from_border(mask, num_masked - int(mask.sum()), rng)
    return mask


def _mask_from_keep(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    mask = torch.ones(ids_keep.shape[0], num_patches, dtype=torch.bool, device=ids_keep.device)
    mask.scatter_(1, ids_keep, False)
    return mask


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking: per-sample uniform noise, argsort, keep the first K.

    Returns ids_keep [B, K] long, mask [B, N] bool (True = masked), ids_restore [B, N] long
    (the inverse permutation: gathering [visible, mask tokens] with it restores patch order).
    """
    # round, not int: int(10 * (1 - 0.9)) is 0 because of float error.
    num_keep = int(round(num_patches * (1.0 - mask_ratio)))
    # Draw on the generator's device so a CPU generator works with any target device.
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N] ascending noise: first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    ids_keep = ids_shuffle[:, :num_keep]  # [B, K]
    return ids_keep, _mask_from_keep(ids_keep, num_patches), ids_restore


def sample_guided_visible(
    scores: torch.Tensor,
    num_visible: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MILAN semantic-aware masking: draw `num_visible` patches per sample WITHOUT replacement,
    with probability proportional to `scores` [B, N] (>= 0). Sampling, not top-k, so low-score
    patches are sometimes visible too.

    Returns ids_keep [B, K] long, sorted ascending (spatial locality for the encoder), and
    mask [B, N] bool (True = masked).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got {tuple(scores.shape)}")
    probs = scores.detach().float()
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("scores must be finite and non-negative")
    num_patches = probs.shape[1]
    if not 0 < num_visible <= num_patches:
        raise ValueError(f"num_visible={num_visible} must be in 1..{num_patches}")
    # A small floor keeps multinomial valid when fewer than K scores are non-zero (e.g. peaked attention).
    probs = probs + 1e-6 * probs.mean(dim=1, keepdim=True) + 1e-12
    if generator is not None and generator.device != probs.device:
        ids_keep = torch.multinomial(
            probs.to(generator.device), num_visible, replacement=False, generator=generator
        ).to(probs.device)
    else:
        ids_keep = torch.multinomial(probs, num_visible, replacement=False, generator=generator)
    ids_keep, _ = torch.sort(ids_keep, dim=1)
    return ids_keep, _mask_from_keep(ids_keep, num_patches)


# ---- mask sources: one interface for every method ------------------------------------------------


class MaskSource(Protocol):
    """`source(batch_size, generator, scores=None) -> {"mask": [B, N] bool, "ids_keep": [B, K] long}`."""

    grid: tuple[int, int]
    num_masked: int
    needs_scores: bool  # True: drawn after the targets, from their "scores" [B, N] (teacher attention)

    def __call__(self, batch_size: int, generator: torch.Generator,
                 scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...


def _masks(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"mask", "ids_keep"} from a mask with the same count in every row (ids ascending)."""
    batch_size = mask.shape[0]
    ids_keep = (~mask).nonzero(as_tuple=True)[1].view(batch_size, -1)
    return {"mask": mask, "ids_keep": ids_keep}


def _check_count(grid: tuple[int, int], num_masked: int, name: str) -> None:
    if not 0 < num_masked < grid[0] * grid[1]:
        raise ValueError(f"{name}: {num_masked} masked patches of a {grid[0]}x{grid[1]} grid leave none "
                         "visible or none masked")


class BlockMasks:
    """BEiT's block-wise masks, `num_masked` patches per image."""

    needs_scores = False

    def __init__(self, grid: tuple[int, int], num_masked: int, min_block: int = 16, max_block: int | None = None,
                 min_aspect: float = 0.3):
        _check_count(tuple(grid), num_masked, "block masks")
        self.grid, self.num_masked = tuple(grid), num_masked
        self.min_block, self.max_block, self.min_aspect = min_block, max_block, min_aspect

    def __call__(self, batch_size: int, generator: torch.Generator,
                 scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        mask = np.stack([sample_block_mask(self.grid, self.num_masked, self.min_block, self.max_block,
                                           self.min_aspect, rng=rng).reshape(-1) for _ in range(batch_size)])
        return _masks(torch.from_numpy(mask))  # [B, N]


class RandomMasks:
    """Uniform random masks, `num_masked` patches per image, in square units of `unit` x `unit` patches
    (SimMIM masks 32 px units of a 16 px patch grid: unit 2); unit 1 is MAE's patch-wise masking."""

    needs_scores = False

    def __init__(self, grid: tuple[int, int], num_masked: int, unit: int = 1):
        grid = tuple(grid)
        if unit < 1 or grid[0] % unit or grid[1] % unit:
            raise ValueError(f"mask unit {unit} must divide the {grid[0]}x{grid[1]} patch grid")
        if num_masked % (unit * unit):
            raise ValueError(f"{num_masked} masked patches is not a whole number of {unit}x{unit} units")
        _check_count(grid, num_masked, "random masks")
        self.grid, self.num_masked, self.unit = grid, num_masked, unit

    def __call__(self, batch_size: int, generator: torch.Generator,
                 scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h, w, u = self.grid[0] // self.unit, self.grid[1] // self.unit, self.unit
        num_units = h * w
        _, unit_mask, _ = random_masking(batch_size, num_units, self.num_masked / (u * u) / num_units, generator)
        mask = unit_mask.view(batch_size, h, 1, w, 1).expand(-1, -1, u, -1, u)  # each unit covers u x u patches
        return _masks(mask.reshape(batch_size, num_units * u * u))


class GuidedMasks:
    """MILAN's semantic-aware masks: the visible patches sampled in proportion to the teacher's scores."""

    needs_scores = True

    def __init__(self, grid: tuple[int, int], num_masked: int):
        _check_count(tuple(grid), num_masked, "guided masks")
        self.grid, self.num_masked = tuple(grid), num_masked

    def __call__(self, batch_size: int, generator: torch.Generator,
                 scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if scores is None:
            raise ValueError("guided masks need the targets' scores (a teacher's CLS attention)")
        num_visible = self.grid[0] * self.grid[1] - self.num_masked
        ids_keep, mask = sample_guided_visible(scores.float().cpu(), num_visible, generator)
        return {"mask": mask, "ids_keep": ids_keep}
