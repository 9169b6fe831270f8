"""Pictures for a run's `pictures/` folder: mask overlays, reconstructions, codebook usage, curves, MILAN
attention, segmentation maps (image / ground truth / prediction in a fixed palette), detections beside their
ground truth.

Matplotlib on the Agg backend (no display). Every function takes images as [B, 3, H, W] floats in 0..1
(call `denormalize` first), tensors or arrays, writes one PNG and returns its path. Figures are laid out
on a fixed grid of `CELL_INCHES` at `DPI`, so the PNG size is predictable: (columns, rows) x CELL_PIXELS for
image grids, CODEBOOK_INCHES x DPI for codebook usage, (keys x 300, 250) pixels for curves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and never pick up a user's interactive backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 100
CELL_INCHES = 2.0
CELL_PIXELS = int(DPI * CELL_INCHES)
CODEBOOK_INCHES = (6.0, 3.0)
CURVE_INCHES = (3.0, 2.5)  # one panel
MASK_GREY = np.array([0.5, 0.5, 0.5])
MASK_ALPHA = 0.75  # how much a masked patch is greyed out: the content stays faintly visible


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `(x - mean) / std` on [B, 3, H, W] (or [3, H, W]) and clamp to 0..1 for display."""
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images * std_t + mean_t).clamp(0, 1)


def _hwc(images) -> np.ndarray:
    """[B, 3, H, W] in 0..1 -> [B, H, W, 3] clipped."""
    array = _numpy(images)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {array.shape}")
    return np.clip(array.transpose(0, 2, 3, 1), 0, 1)


def patch_values_to_pixels(values, height: int, width: int) -> np.ndarray:
    """Per-patch values [B, N] (row-major patch grid) -> [B, H, W], each patch a constant square."""
    values = _numpy(values)
    batch, num_patches = values.shape
    # The grid has the image's aspect ratio: rows * cols = N and rows / cols = H / W.
    rows = int(round(math.sqrt(num_patches * height / width)))
    cols = num_patches // max(rows, 1)
    if rows * cols != num_patches or height % rows or width % cols:
        raise ValueError(f"{num_patches} patches do not tile a {height}x{width} image")
    grid = values.reshape(batch, rows, cols)
    return grid.repeat(height // rows, axis=1).repeat(width // cols, axis=2)


def _grey_out(images_hwc: np.ndarray, mask) -> np.ndarray:
    """Blend masked patches (mask [B, N], True = masked) towards grey."""
    _, h, w, _ = images_hwc.shape
    pixels = patch_values_to_pixels(_numpy(mask).astype(float), h, w)[..., None]
    return images_hwc * (1 - MASK_ALPHA * pixels) + MASK_GREY * MASK_ALPHA * pixels


def _figure(rows: int, cols: int):
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * CELL_INCHES, rows * CELL_INCHES), dpi=DPI, squeeze=False
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    # Thin margins: the default ones leave the images a third of the canvas.
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.12 / rows, wspace=0.05, hspace=0.15)
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": it would make the PNG size depend on the text.
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def save_mask_overlay(
    images,
    mask,
    patch_size: int,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    max_images: int = 16,
) -> Path:
    """Grid of images (up to 8 a row) with masked patches greyed out. mask [B, N] bool, True = masked."""
    hwc = _hwc(images)[:max_images]
    mask = _numpy(mask)[: len(hwc)]
    _, h, w, _ = hwc.shape
    if mask.shape[1] != (h // patch_size) * (w // patch_size):
        raise ValueError(f"mask has {mask.shape[1]} patches, a {h}x{w} image has {(h // patch_size) * (w // patch_size)}")
    shown = _grey_out(hwc, mask)
    cols = min(len(hwc), 8)
    rows = math.ceil(len(hwc) / cols)
    fig, axes = _figure(rows, cols)
    for i, ax in enumerate(axes.flat):
        if i >= len(hwc):
            ax.axis("off")
            continue
        ax.imshow(shown[i], interpolation="nearest")
        label = titles[i] if titles is not None else f"{int(mask[i].sum())}/{mask.shape[1]} masked"
        ax.set_title(label, fontsize=8)
    return _save(fig, path)


def save_reconstructions(
    originals,
    reconstructions,
    path: str | os.PathLike,
    mask=None,
    max_images: int = 8,
) -> Path:
    """Columns of images: original, masked input (when `mask` [B, N] is given), reconstruction."""
    orig, recon = _hwc(originals)[:max_images], _hwc(reconstructions)[:max_images]
    if orig.shape != recon.shape:
        raise ValueError(f"originals {orig.shape} and reconstructions {recon.shape} differ")
    rows = [("original", orig)]
    if mask is not None:
        rows.append(("masked", _grey_out(orig, _numpy(mask)[: len(orig)])))
    rows.append(("reconstruction", recon))
    fig, axes = _figure(len(rows), len(orig))
    for r, (name, batch) in enumerate(rows):
        for c in range(len(orig)):
            axes[r, c].imshow(batch[c], interpolation="nearest")
        axes[r, 0].set_ylabel(name, fontsize=8)
    return _save(fig, path)


def codebook_stats(counts) -> tuple[float, float]:
    """(fraction of codes used, perplexity = exp(entropy of the usage distribution))."""
    counts = _numpy(counts).astype(float).ravel()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum()))


def save_codebook_usage(counts, path: str | os.PathLike) -> Path:
    """Code usage sorted from most to least used (dead codes are the flat tail at zero)."""
    counts = _numpy(counts).astype(float).ravel()
    used, perplexity = codebook_stats(counts)
    fig, ax = plt.subplots(figsize=CODEBOOK_INCHES, dpi=DPI)
    ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0, color="tab:blue")
    ax.set_xlabel("code (sorted by use)", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(
        f"{int((counts > 0).sum())}/{len(counts)} codes used ({100 * used:.1f}%), perplexity {perplexity:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def save_detections(images: Sequence, ground_truth: Sequence[dict], predictions: Sequence[dict],
                    class_names: Sequence[str], path: str | os.PathLike, min_score: float = 0.5) -> Path:
    """Detection / instance segmentation: per image (a row), the ground truth beside the predictions with
    score >= `min_score`: masks tinted, boxes outlined, class names (and scores) written, one colour per class.
    images: [H, W, 3] in 0..1 (each its own size); each dict: `boxes` [N, 4] x1, y1, x2, y2, `labels` [N]
    (1..K, 0 = background), optional `masks` [N, H, W] bool and `scores` [N]."""
    colours = plt.get_cmap("tab10")
    fig, axes = _figure(len(images), 2)
    for r, image in enumerate(images):
        image = np.clip(_numpy(image), 0, 1)
        for c, (title, found) in enumerate((("ground truth", ground_truth[r]), ("prediction", predictions[r]))):
            scores = _numpy(found["scores"]) if "scores" in found else None
            keep = np.ones(len(_numpy(found["labels"])), bool) if scores is None else scores >= min_score
            shown = image.copy()
            masks = _numpy(found["masks"]).astype(bool)[keep] if found.get("masks") is not None else []
            labels = _numpy(found["labels"]).astype(int)[keep]
            for mask, label in zip(masks, labels):
                shown[mask] = 0.5 * shown[mask] + 0.5 * np.array(colours(label % 10)[:3])
            ax = axes[r, c]
            ax.imshow(shown)
            for i, (box, label) in enumerate(zip(_numpy(found["boxes"])[keep], labels)):
                x1, y1, x2, y2 = box
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1, color=colours(label % 10)))
                name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
                text = name if scores is None else f"{name} {scores[keep][i]:.2f}"
                ax.text(x1, y1, text, fontsize=5, color="white", va="bottom",
                        bbox={"facecolor": colours(label % 10), "pad": 0.5, "lw": 0})
            if r == 0:
                ax.set_title(title, fontsize=8)
    return _save(fig, path)


def save_curves(metrics: Sequence[dict] | Mapping[str, Sequence[dict]], keys: Sequence[str], path: str | os.PathLike,
                x_key: str = "step") -> Path:
    """One panel per key against `x_key` (the record's index when absent); records lacking a key are skipped.
    `metrics` is one run's records, or {label: records} for one line per run (with a legend)."""
    runs = metrics if isinstance(metrics, Mapping) else {"": metrics}
    fig, axes = plt.subplots(1, len(keys), figsize=(CURVE_INCHES[0] * len(keys), CURVE_INCHES[1]), dpi=DPI, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, records in runs.items():
            xs = [m.get(x_key, i) for i, m in enumerate(records) if key in m]
            ys = [float(m[key]) for m in records if key in m]
            ax.plot(xs, ys, lw=1, marker="o" if len(xs) <= 20 else None, ms=3, label=label or None)
        if any(runs):
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def save_attention_overlay(images, attention, mask, error, path: str | os.PathLike, max_images: int = 8) -> Path:
    """MILAN: per image, the teacher's CLS attention [B, N] as a heat-map over the image, the patches
    left visible (mask [B, N] bool, True = masked, greyed out) and the per-patch cosine error [B, N]."""
    hwc = _hwc(images)[:max_images]
    b, h, w, _ = hwc.shape
    attention = patch_values_to_pixels(_numpy(attention)[:b], h, w)
    error = patch_values_to_pixels(_numpy(error)[:b], h, w)
    visible = _grey_out(hwc, _numpy(mask)[:b])
    fig, axes = _figure(3, b)
    for i in range(b):
        att = attention[i] / max(attention[i].max(), 1e-12)
        axes[0, i].imshow(hwc[i])
        axes[0, i].imshow(att, cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
        axes[1, i].imshow(visible[i], interpolation="nearest")
        axes[2, i].imshow(error[i], cmap="viridis", vmin=0, interpolation="nearest")
        axes[2, i].set_title(f"mean err {error[i].mean():.3f}", fontsize=7)
    for r, name in enumerate(["CLS attention", "visible", "cosine error"]):
        axes[r, 0].set_ylabel(name, fontsize=8)
    return _save(fig, path)


IGNORED_COLOUR = (0, 0, 0)  # pixels without a label (255) are drawn black


def segmentation_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """[num_classes, 3] uint8: a fixed colour per class, the same for every run (seeded), never black."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def colourize(labels, palette: np.ndarray) -> np.ndarray:
    """[H, W] class indices (anything outside the palette, e.g. 255, is black) -> [H, W, 3] uint8."""
    labels = _numpy(labels).astype(np.int64)
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    known = (labels >= 0) & (labels < len(palette))
    out[known] = palette[labels[known]]
    out[~known] = IGNORED_COLOUR
    return out


def save_segmentations(images: Sequence, truths: Sequence, predictions: Sequence, palette: np.ndarray,
                       path: str | os.PathLike, titles: Sequence[str] | None = None) -> Path:
    """One row per image: the image ([3, H, W] in 0..1), its ground truth and the prediction ([H, W] each)."""
    fig, axes = _figure(len(images), 3)
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        panels = (_hwc(_numpy(image)[None])[0], colourize(truth, palette), colourize(pred, palette))
        for col, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[row, col].imshow(panel, interpolation="nearest")
            title = name if titles is None or col else f"{titles[row]}"
            axes[row, col].set_title(title, fontsize=8)
    return _save(fig, path)
