"""Reading images for seam-check, and the overlay outputs it writes.

8-bit images take a fast path: Pillow decodes them and converts to "L" (Rec. 601
luma, rounded to whole grey levels) in C, so no float copy of the image is made.
16-bit and float images go through `core.imageio.load_image` and keep their
precision. Alpha is ignored in both paths: seams are judged on the colour channels
as stored, including under transparent pixels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from renderqa.core.atomic import atomic_path
from renderqa.core.imageio import (
    DEFAULT_MAX_PIXELS,
    is_16bit_colour_png,
    load_image,
    open_image,
    save_png,
    to_uint8,
)
from renderqa.core.seams_profiles import luma_levels

logger = logging.getLogger(__name__)

# Pillow modes whose samples are 8 bits per channel; "L" conversion of these is exact
# Rec. 601 luma rounded to whole grey levels.
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}

# Colour of the seam lines drawn on overlays (RGB, 8-bit).
OVERLAY_COLOUR = (255, 0, 64)


@dataclass
class LumaImage:
    """An image file reduced to the luma plane that seam detection reads."""

    path: Path
    luma: np.ndarray  # (H, W) uint8 (8-bit files) or float32, in 8-bit grey levels
    bit_depth: int  # 8 or 16
    mode: str  # Pillow mode of the file
    has_alpha: bool


def read_luma(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> LumaImage:
    """Decode an image file to its luma plane, applying the EXIF orientation.

    Raises ImageReadError for a missing, zero-byte, truncated or non-image file and
    for an image above `max_pixels`.
    """
    path = Path(path)
    with open_image(path, max_pixels) as image:
        mode = image.mode
        # Pillow reports a 16-bit RGB(A) PNG as plain RGB(A) and keeps only the
        # high byte, so such files take the full-precision path too.
        high_depth = mode not in EIGHT_BIT_MODES or is_16bit_colour_png(image)
        if not high_depth:
            image.load()
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            luma = np.asarray(ImageOps.exif_transpose(image).convert("L"))
    if high_depth:
        return _read_high_depth(path, max_pixels)
    return LumaImage(path=path, luma=luma, bit_depth=8, mode=mode, has_alpha=has_alpha)


def _read_high_depth(path: Path, max_pixels: int) -> LumaImage:
    logger.debug("%s: reading as float to keep its precision", path)
    loaded = load_image(path, max_pixels=max_pixels)
    return LumaImage(
        path=path,
        luma=luma_levels(loaded.pixels),
        bit_depth=loaded.bit_depth,
        mode=loaded.mode,
        has_alpha=loaded.alpha is not None,
    )


def read_rgb8(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return the image as (H, W, 3) uint8 RGB for drawing overlays."""
    loaded = load_image(path, max_pixels=max_pixels)
    pixels = loaded.pixels
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return to_uint8(pixels)


def write_seam_overlay(
    target: Path, rgb: np.ndarray, vertical: list[int], horizontal: list[int]
) -> None:
    """Write a PNG copy of `rgb` with each seam drawn as a 1-pixel line, atomically.

    A line at position p is drawn on pixel p - 1 and p (both sides of the boundary)
    so it shows at any zoom.
    """
    marked = rgb.copy()
    for position in vertical:
        marked[:, max(position - 1, 0) : position + 1] = OVERLAY_COLOUR
    for position in horizontal:
        marked[max(position - 1, 0) : position + 1, :] = OVERLAY_COLOUR
    save_png(target, Image.fromarray(marked, mode="RGB"))


def write_profile_plot(
    target: Path,
    title: str,
    profiles: dict[str, tuple[np.ndarray, np.ndarray, list[int]]],
    factor: float,
) -> None:
    """Plot, per axis, the mean grey step and the line score, with seams marked.

    `profiles` maps an axis label to (difference, line score, seam positions).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(len(profiles), 1, figsize=(10, 3.2 * len(profiles)))
    axes = np.atleast_1d(axes)
    for axis, (label, (difference, score, seams)) in zip(
        axes, profiles.items(), strict=True
    ):
        positions = np.arange(len(difference))
        axis.plot(
            positions, difference, linewidth=0.6, color="0.4", label="mean |grey step|"
        )
        axis.set_ylabel("grey levels")
        axis.set_xlabel(f"{label} position (pixels)")
        ratio_axis = axis.twinx()
        ratio_axis.plot(
            positions, score, linewidth=0.6, color="tab:blue", label="line score"
        )
        ratio_axis.axhline(factor, color="tab:blue", linestyle="--", linewidth=0.8)
        ratio_axis.set_ylabel("ratio to nearby lines")
        for position in seams:
            axis.axvline(position, color="tab:red", linewidth=0.8, alpha=0.7)
        axis.set_title(f"{title}: {label} lines ({len(seams)} seams)")
    figure.tight_layout()
    with atomic_path(target) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)
    plt.close(figure)
