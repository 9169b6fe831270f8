import numpy as np
import pytest
import torch

from mimkit.data.masking import (
    BlockMasks,
    GuidedMasks,
    RandomMasks,
    random_masking,
    sample_block_mask,
    sample_blocks,
    sample_guided_visible,
)


def _masked_neighbours(mask: np.ndarray) -> np.ndarray:
    """Number of masked 4-neighbours of each masked patch."""
    p = np.pad(mask, 1).astype(int)
    count = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return count[mask]


@pytest.mark.parametrize(
    "grid,num_masked,min_block",
    [((14, 14), 75, 16), ((7, 7), 3, 4), ((7, 7), 12, 4), ((7, 7), 30, 4), ((8, 8), 24, 9), ((8, 8), 1, 16), ((8, 8), 64, 4)],
)
def test_block_mask_has_exact_count(grid, num_masked, min_block):
    for seed in range(60):
        mask = sample_block_mask(grid, num_masked, min_block, rng=np.random.default_rng(seed))
        assert mask.shape == grid and mask.dtype == bool
        assert int(mask.sum()) == num_masked


def test_block_mask_is_blocky_unlike_random_masking():
    rng = np.random.default_rng(0)
    block = [_masked_neighbours(sample_block_mask(rng=rng)) for _ in range(100)]
    _, mask, _ = random_masking(100, 196, 75 / 196, torch.Generator().manual_seed(0))
    uniform = [_masked_neighbours(m.view(14, 14).numpy()) for m in mask]
    assert all(len(n) == 75 for n in block + uniform)
    # almost every masked patch touches another one, and most sit inside a block
    assert np.mean([(n > 0).mean() for n in block]) > 0.97
    assert np.mean([n.mean() for n in block]) > 2.8
    # random masking, same count, is far less clustered: the checks can tell the two apart
    assert np.mean([(n > 0).mean() for n in uniform]) < 0.9
    assert np.mean([n.mean() for n in uniform]) < 2.0


def test_blocks_respect_min_block_max_block_and_aspect():
    rng = np.random.default_rng(1)
    seen = 0
    for _ in range(100):
        _, blocks = sample_blocks((14, 14), 75, min_block=16, max_block=40, min_aspect=0.3, rng=rng)
        for b in blocks:
            seen += 1
            assert 16 <= b.area <= 40
            # rounding of h and w lets the aspect drift a little past 1/0.3
            assert 0.2 <= b.height / b.width <= 5
            assert b.top + b.height <= 14 and b.left + b.width <= 14
    assert seen > 100


def test_block_phase_never_overshoots():
    rng = np.random.default_rng(2)
    for _ in range(100):
        mask, blocks = sample_blocks((14, 14), 75, rng=rng)
        assert 16 <= mask.sum() <= 75 and blocks


def test_block_mask_is_deterministic_per_seed():
    a = [sample_block_mask(rng=np.random.default_rng(7)) for _ in range(2)]
    b = sample_block_mask(rng=np.random.default_rng(8))
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)
    source = BlockMasks((14, 14), 75)
    drawn = [source(5, torch.Generator().manual_seed(3))["mask"] for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1])  # a function of the generator's seed


def test_block_masks_batch():
    out = BlockMasks((8, 8), 20, min_block=4)(6, torch.Generator().manual_seed(0))
    masks = out["mask"]
    assert masks.shape == (6, 64) and masks.dtype == torch.bool
    assert (masks.sum(1) == 20).all()
    assert len({tuple(m.tolist()) for m in masks}) > 1  # samples differ
    assert torch.equal(out["ids_keep"], (~masks).nonzero()[:, 1].view(6, 44))  # the visible ones, ascending


def test_random_masks_in_units_hide_whole_units():
    """SimMIM: 32 px units on a 16 px patch grid are 2x2 patches, all masked or all visible."""
    out = RandomMasks((4, 4), 8, unit=2)(16, torch.Generator().manual_seed(0))
    units = out["mask"].view(16, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(16, 4, 4)  # [B, unit, 4 patches]
    assert (units.all(-1) | ~units.any(-1)).all()  # each unit wholly masked or wholly visible
    assert (out["mask"].sum(1) == 8).all() and out["ids_keep"].shape == (16, 8)
    assert len({tuple(m.tolist()) for m in out["mask"]}) > 1
    with pytest.raises(ValueError, match="divide"):
        RandomMasks((5, 5), 4, unit=2)


def test_guided_masks_need_scores():
    source = GuidedMasks((4, 4), 12)
    assert source.needs_scores and not RandomMasks((4, 4), 12).needs_scores
    out = source(3, torch.Generator().manual_seed(0), torch.rand(3, 16))
    assert (out["mask"].sum(1) == 12).all() and out["ids_keep"].shape == (3, 4)
    with pytest.raises(ValueError, match="scores"):
        source(3, torch.Generator())


def test_random_masking_keeps_k_and_restores_order():
    g = torch.Generator().manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(8, 196, 0.75, g)
    assert ids_keep.shape == (8, 49) and ids_keep.dtype == torch.long
    assert (mask.sum(1) == 147).all()
    # kept ids are exactly the unmasked positions
    assert (~mask).gather(1, ids_keep).all()
    # ids_restore inverts the shuffle: MAE appends mask tokens after the K visible tokens and
    # gathers with ids_restore; each position must get back its own patch, visible ones unmasked.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :49], ids_keep)
    unshuffled = ids_shuffle.gather(1, ids_restore)
    assert torch.equal(unshuffled, torch.arange(196).expand(8, -1))
    is_mask_token = (torch.arange(196) >= 49).expand(8, -1).gather(1, ids_restore)
    assert torch.equal(is_mask_token, mask)
    # float error must not lose a patch: 10 * (1 - 0.9) is 0.999...
    assert random_masking(2, 10, 0.9, g)[0].shape == (2, 1)


def test_random_masking_is_deterministic_and_per_sample():
    a = random_masking(4, 64, 0.5, torch.Generator().manual_seed(3))[1]
    b = random_masking(4, 64, 0.5, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_guided_visible_follows_scores():
    torch.manual_seed(0)
    n, k, draws = 49, 12, 4000
    scores = torch.rand(n) ** 2 + 0.01
    g = torch.Generator().manual_seed(0)
    ids_keep, mask = sample_guided_visible(scores.expand(draws, -1).contiguous(), k, g)
    assert ids_keep.shape == (draws, k)
    # no duplicates, sorted, mask consistent
    assert (ids_keep[:, 1:] > ids_keep[:, :-1]).all()
    assert (mask.sum(1) == n - k).all()
    assert (~mask).gather(1, ids_keep).all()
    freq = (~mask).float().mean(0)
    rank = lambda v: torch.argsort(torch.argsort(v)).float()
    spearman = torch.corrcoef(torch.stack([rank(scores), rank(freq)]))[0, 1]
    assert spearman > 0.9
    # sampling, not top-k: low-score patches are visible sometimes, and top-k is not always the answer
    assert freq.min() > 0
    topk = set(torch.topk(scores, k).indices.tolist())
    assert sum(set(row.tolist()) == topk for row in ids_keep) < draws // 2


def test_guided_visible_handles_sparse_scores_and_rejects_bad_input():
    scores = torch.zeros(3, 16)
    scores[:, 0] = 1.0
    ids_keep, mask = sample_guided_visible(scores, 4, torch.Generator().manual_seed(0))
    assert (ids_keep[:, 0] == 0).all() and (mask.sum(1) == 12).all()
    with pytest.raises(ValueError):
        sample_guided_visible(-scores, 4)
    with pytest.raises(ValueError):
        sample_guided_visible(scores, 17)
