import math

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data.masking import random_masking
from mimkit.pictures import (
    CELL_PIXELS,
    codebook_stats,
    denormalize,
    patch_values_to_pixels,
    save_attention_overlay,
    save_codebook_usage,
    save_curves,
    save_mask_overlay,
    save_reconstructions,
)


def _images(b=4, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g)


def _png(path):
    assert path.exists() and path.stat().st_size > 1000
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def test_denormalize_inverts_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = _images()
    normed = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(denormalize(normed, mean, std), x, atol=1e-6)
    assert denormalize(normed * 10, mean, std).max() <= 1 and denormalize(normed * 10, mean, std).min() >= 0


def test_patch_values_to_pixels_tiles_row_major():
    values = torch.arange(8.0).view(1, 8)  # 2 rows x 4 cols on a 16 x 32 image
    pixels = patch_values_to_pixels(values, 16, 32)
    assert pixels.shape == (1, 16, 32)
    assert pixels[0, 0, 0] == 0 and pixels[0, 0, 31] == 3 and pixels[0, 15, 0] == 4 and pixels[0, 15, 31] == 7
    with pytest.raises(ValueError):
        patch_values_to_pixels(torch.zeros(1, 7), 16, 16)


def test_mask_overlay_greys_exactly_the_masked_patches(tmp_path):
    images = torch.zeros(10, 3, 32, 32)
    images[:, 0] = 1.0  # pure red
    _, mask, _ = random_masking(10, 16, 0.5, torch.Generator().manual_seed(0))
    path = save_mask_overlay(images, mask, 8, tmp_path / "p" / "mask.png")
    image = _png(path)
    assert image.size == (8 * CELL_PIXELS, 2 * CELL_PIXELS)  # 10 images: rows of 8
    # red where visible, red blended to grey where masked, in equal amounts (half the patches masked)
    panel = np.asarray(image.convert("RGB")).astype(int)
    red = (panel[..., 0] > 200) & (panel[..., 1] < 60)
    greyish = (abs(panel[..., 0] - 160) < 30) & (abs(panel[..., 1] - 100) < 30)
    assert red.sum() > 0 and greyish.sum() > 0
    assert 0.8 < red.sum() / greyish.sum() < 1.25
    assert red.sum() + greyish.sum() > 0.2 * panel.shape[0] * panel.shape[1]  # images fill the canvas
    with pytest.raises(ValueError):
        save_mask_overlay(images, mask[:, :8], 8, tmp_path / "bad.png")


def test_reconstructions_png_size(tmp_path):
    x = _images(3)
    _, mask, _ = random_masking(3, 16, 0.75)
    assert _png(save_reconstructions(x, x.flip(-1), tmp_path / "r.png")).size == (3 * CELL_PIXELS, 2 * CELL_PIXELS)
    assert _png(save_reconstructions(x, x, tmp_path / "r2.png", mask=mask)).size == (3 * CELL_PIXELS, 3 * CELL_PIXELS)


def test_codebook_usage_stats_and_png(tmp_path):
    counts = torch.zeros(64)
    counts[:16] = 5
    used, perplexity = codebook_stats(counts)
    assert used == 0.25 and math.isclose(perplexity, 16, rel_tol=1e-6)  # uniform over 16 codes
    assert codebook_stats(torch.zeros(4)) == (0.0, 0.0)
    assert _png(save_codebook_usage(counts, tmp_path / "codes.png")).size == (600, 300)


def test_curves_png_size(tmp_path):
    metrics = [{"step": i, "loss": 6 - 0.01 * i, "lr": 1e-3} for i in range(50)] + [{"step": 50, "lr": 1e-4}]
    assert _png(save_curves(metrics, ["loss", "lr"], tmp_path / "curves.png")).size == (600, 250)


def test_curves_of_several_runs_draw_one_line_each(tmp_path):
    runs = {"mae": [{"step": s, "knn_top1": 30 + s / 100} for s in (0, 250, 500)],
            "beit": [{"step": s, "knn_top1": 40 - s / 100} for s in (0, 250, 500)] + [{"step": 500, "loss": 1.0}]}
    image = _png(save_curves(runs, ["knn_top1"], tmp_path / "knn.png"))
    assert image.size == (300, 250)
    colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # matplotlib's first two line colours: one per run


def test_attention_overlay_png_size(tmp_path):
    x = _images(2)
    attention = torch.rand(2, 16)
    _, mask, _ = random_masking(2, 16, 0.75)
    error = torch.rand(2, 16)
    path = save_attention_overlay(x, attention, mask, error, tmp_path / "att.png")
    assert _png(path).size == (2 * CELL_PIXELS, 3 * CELL_PIXELS)
