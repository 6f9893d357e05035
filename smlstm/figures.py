"""Attention figures: what sm-LSTM looks at, step by step, for one (image, sentence) pair.

`attention_figure` draws, from `SMLSTM.explain`'s output:

- top row: the photo, then one panel per step t with the image attention p[t] (a map over the
  instance grid) upsampled to the photo and overlaid on it;
- bottom row: the word attention q[t] as a heat row per step, one column per word.

Matplotlib's Agg canvas only (no pyplot, no display), and a fixed size and dpi with no
"tight" bounding box, so every PNG is exactly FIGURE_SIZE_PX pixels.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["FIGURE_DPI", "FIGURE_SIZE_PX", "attention_figure", "load_photo"]

FIGURE_SIZE_PX = (1200, 600)
FIGURE_DPI = 100
_MAX_PHOTO_SIDE = 512  # the photo is only a backdrop: no need to carry a 12-megapixel array


def load_photo(path: str | os.PathLike) -> np.ndarray | None:
    """The upright RGB photo as uint8 (H, W, 3), downscaled to at most 512 px; None if the file
    is gone or unreadable (a figure is still drawn, without the photo)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((_MAX_PHOTO_SIDE, _MAX_PHOTO_SIDE))
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _upsample(grid_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to (height, width); each cell covers its image area."""
    img = Image.fromarray(grid_map.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def attention_figure(
    image: str | os.PathLike | np.ndarray | None,
    explain_output: Mapping[str, Any],
    caption_tokens: Sequence[str],
    out_png: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw the per-step image maps and word weights of one pair into `out_png` (atomic write).

    image: a path to the original photo, an (H, W, 3) array, or None (maps drawn on grey and
    the figure says the photo is unavailable; a missing file counts as None).
    explain_output: `SMLSTM.explain`'s dict: image_maps (T, h, w), word_weights (T, L), score.
    caption_tokens: the L words of the caption, as shown under the heat row.
    Returns the PNG path; the PNG is exactly FIGURE_SIZE_PX (width, height) pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = _as_numpy(explain_output["image_maps"])
    words = _as_numpy(explain_output["word_weights"])
    if maps.ndim != 3 or words.ndim != 2 or maps.shape[0] != words.shape[0]:
        raise ValueError(f"explain_output: image_maps (T, h, w) and word_weights (T, L) expected, "
                         f"got {maps.shape} and {words.shape}")
    steps, length = words.shape
    tokens = list(caption_tokens)[:length] + ["?"] * max(0, length - len(caption_tokens))

    photo = image if isinstance(image, np.ndarray) or image is None else load_photo(image)
    if photo is None:
        height, width = 224, 224
    else:
        photo = np.asarray(photo)
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        height, width = photo.shape[:2]

    fig = Figure(figsize=(FIGURE_SIZE_PX[0] / FIGURE_DPI, FIGURE_SIZE_PX[1] / FIGURE_DPI),
                 dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, steps + 1, height_ratios=[3, 1.3], hspace=0.45, wspace=0.08,
                            left=0.06, right=0.99, top=0.86, bottom=0.12)
    extent = (0, width, height, 0)

    ax = fig.add_subplot(grid[0, 0])
    if photo is None:
        ax.imshow(np.full((height, width), 0.85), cmap="gray", vmin=0, vmax=1, extent=extent)
        ax.text(width / 2, height / 2, "photo not available", ha="center", va="center",
                fontsize=9)
    else:
        ax.imshow(photo, extent=extent)
    ax.set_title("image", fontsize=9)
    ax.set_axis_off()

    for t in range(steps):
        ax = fig.add_subplot(grid[0, t + 1])
        saliency = _upsample(maps[t], width, height)
        if photo is not None:
            ax.imshow(photo, extent=extent)
        # colours span this step's own min..max: the figure shows where, the title how much
        low, high = float(maps[t].min()), float(maps[t].max())
        ax.imshow(saliency, cmap="jet", alpha=0.5 if photo is not None else 1.0,
                  extent=extent, vmin=low, vmax=max(high, low + 1e-12))
        y, x = np.unravel_index(int(np.argmax(maps[t])), maps[t].shape)
        ax.set_title(f"step {t + 1}: p {low:.2f}..{high:.2f}, max at ({y},{x})", fontsize=9)
        ax.set_axis_off()

    ax = fig.add_subplot(grid[1, :])
    low, high = float(words.min()), float(words.max())
    ax.imshow(words, cmap="Reds", vmin=low, vmax=max(high, low + 1e-12), aspect="auto")
    ax.set_yticks(range(steps), [f"step {t + 1}" for t in range(steps)], fontsize=8)
    ax.set_xticks(range(length), tokens, rotation=45 if length > 12 else 0, ha="right"
                  if length > 12 else "center", fontsize=8 if length <= 24 else 6)
    if length <= 30:
        for t in range(steps):
            for j in range(length):
                dark = words[t, j] > low + 0.6 * (high - low)
                ax.text(j, t, f"{words[t, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    ax.set_title(f"word weights q[t] ({low:.2f}..{high:.2f})", fontsize=9)

    score = explain_output.get("score")
    heading = title or ""
    if score is not None:
        heading = f"{heading}   score {float(score):.3f}".strip()
    fig.suptitle(heading, fontsize=10)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)  # no bbox_inches: keep the exact size
    out_png = Path(out_png)
    _write_atomic(out_png, buffer.getvalue())
    return out_png
