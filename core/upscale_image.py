"""Upscaling decoded image files: colour, greyscale and alpha, then writing them.

The model sees the channels it was trained on (3 or 1). A greyscale image is
replicated to three channels for an RGB model and averaged back afterwards; alpha
goes through the model separately as a greyscale image, unless it is constant, in
which case the output keeps that constant exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from renderqa.core.atomic import atomic_path
from renderqa.core.canvas import discard_rows
from renderqa.core.errors import InvalidInputError, OutputError
from renderqa.core.imageio import (
    QUANTIZE_BLOCK,
    LoadedImage,
    quantize_into,
    save_png,
    save_png16,
)
from renderqa.core.upscale import ProgressCallback, TiledResult, TileSettings
from renderqa.core.upscale import upscale_array as _upscale_array
from renderqa.core.upscale_model import Upscaler

OUTPUT_FORMATS = ("png", "tiff", "webp", "jpeg")
METADATA_KEY = "renderqa-upscale"

# Stage(pass name) is called before each model pass (colour, then alpha).
StageCallback = Callable[[str], None]


@dataclass
class UpscaledImage:
    """An upscaled image: (H, W, C) float32 [0, 1] pixels and optional alpha.

    `take_samples` quantises the pixels and sets `pixels` and `alpha` to None.
    """

    pixels: np.ndarray | None
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    passes: list[TiledResult]  # model pass statistics, with `pixels` set to None


def _to_model_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.shape[2] == channels:
        return pixels
    if pixels.shape[2] == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 3 and channels == 1:
        raise InvalidInputError(
            "the model takes 1-channel (greyscale) input but the image is RGB; "
            "use an RGB upscaler or convert the image to greyscale"
        )
    raise InvalidInputError(
        f"images with {pixels.shape[2]} channels do not fit a {channels}-channel model"
    )


def _from_model_channels(canvas: np.ndarray, channels: int) -> np.ndarray:
    """Return the canvas, or its channel mean when the image has one channel.

    The mean is taken a block of rows at a time and each block's canvas rows are
    then discarded, so after a mean the canvas must not be read again.
    """
    if canvas.shape[2] == channels:
        return canvas
    grey = np.empty((*canvas.shape[:2], 1), dtype=np.float32)
    rows = max(1, QUANTIZE_BLOCK // (canvas.shape[1] * canvas.shape[2]))
    for top in range(0, len(canvas), rows):
        # Averaging in float64 returns a grey sample exactly when all three agree.
        # The dtype argument sums in float64 without a float64 copy of the block.
        block = canvas[top : top + rows]
        grey[top : top + rows] = block.mean(axis=2, keepdims=True, dtype=np.float64)
        discard_rows(canvas, top + rows)
    return grey


def upscale_image(
    image: LoadedImage,
    upscaler: Upscaler,
    settings: TileSettings,
    progress: ProgressCallback | None = None,
    stage: StageCallback | None = None,
) -> UpscaledImage:
    """Upscale a decoded image's colour channels and, if it has one, its alpha."""
    if upscaler.output_channels != upscaler.input_channels:
        raise InvalidInputError(
            f"{upscaler.name} maps {upscaler.input_channels} channels to "
            f"{upscaler.output_channels}; only models that keep the channel count "
            "can upscale images"
        )
    # Alpha goes first: its canvas shrinks to an (H, W) array before the colour
    # canvas is allocated, so the two canvases never exist together.
    alpha, alpha_pass = _upscale_alpha(image, upscaler, settings, progress, stage)
    if stage is not None:
        stage("colour")
    colour = _upscale_array(
        _to_model_channels(image.pixels, upscaler.input_channels),
        upscaler,
        settings,
        progress,
    )
    pixels = _from_model_channels(colour.pixels, image.pixels.shape[2])
    # Only `pixels` keeps the colour canvas (or its grey mean), so that saving can
    # release it.
    colour.pixels = None
    passes = [colour] if alpha_pass is None else [colour, alpha_pass]
    return UpscaledImage(pixels=pixels, alpha=alpha, passes=passes)


def _upscale_alpha(
    image: LoadedImage,
    upscaler: Upscaler,
    settings: TileSettings,
    progress: ProgressCallback | None,
    stage: StageCallback | None,
) -> tuple[np.ndarray | None, TiledResult | None]:
    """Return the upscaled (H, W) alpha, or None, and its model pass, if one ran."""
    if image.alpha is None:
        return None, None
    alpha_min, alpha_max = image.alpha.min(), image.alpha.max()
    if alpha_min == alpha_max:
        # A read-only broadcast view: a constant needs no (H, W) array.
        shape = (image.height * upscaler.scale, image.width * upscaler.scale)
        return np.broadcast_to(np.float32(alpha_min), shape), None
    if stage is not None:
        stage("alpha")
    alpha_pass = _upscale_array(
        _to_model_channels(image.alpha[..., None], upscaler.input_channels),
        upscaler,
        settings,
        progress,
    )
    alpha = _from_model_channels(alpha_pass.pixels, 1)[..., 0]
    alpha_pass.pixels = None
    return alpha, alpha_pass


def take_samples(result: UpscaledImage, bit_depth: int) -> np.ndarray:
    """Quantise an upscaled image to (H, W, C) uint8 or uint16 samples, alpha last.

    `bit_depth` is 8 or 16. The float pixels are released as they are quantised:
    the canvas's rows go back to the operating system block by block, so the float
    image and the samples never both exist in full. `result.pixels` and
    `result.alpha` are None afterwards, and any other reference to those arrays
    reads undefined values.
    """
    if result.pixels is None:
        raise ValueError("the upscaled image's samples were already taken")
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    pixels, alpha = result.pixels, result.alpha
    result.pixels = result.alpha = None
    height, width, channels = pixels.shape
    samples = np.empty((height, width, channels + (alpha is not None)), dtype=dtype)
    quantize_into(pixels, samples[..., :channels], discard_source=True)
    del pixels
    if alpha is not None:
        quantize_into(alpha, samples[..., channels], discard_source=True)
    return samples


def to_pil(samples: np.ndarray) -> Image.Image:
    """Wrap (H, W, C) uint8 samples as a Pillow image (L, LA, RGB or RGBA).

    Pillow shares the array's memory for RGBA and copies the other modes.
    """
    return Image.fromarray(samples[..., 0] if samples.shape[2] == 1 else samples)


def output_path(source: Path, out_dir: Path, scale: int, fmt: str) -> Path:
    """Return `out_dir/<stem>_x<scale>.<ext>` for an input file."""
    extension = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
    return out_dir / f"{source.stem}_x{scale}.{extension}"


def save_upscaled(
    path: Path,
    result: UpscaledImage,
    bit_depth: int,
    fmt: str,
    icc_profile: bytes | None,
    metadata: dict,
) -> None:
    """Write an upscaled image atomically, keeping the source's ICC profile.

    A 16-bit source written as PNG stays 16-bit; other formats are written with 8
    bits per sample. PNG files also get the run's settings as JSON in a text chunk.
    The float pixels are released while they are quantised (see `take_samples`),
    so `result.pixels` and `result.alpha` are None afterwards, even if the write
    fails.
    """
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(
            f"--format {fmt!r} is unknown; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    if fmt == "jpeg" and result.alpha is not None:
        raise InvalidInputError(
            f"{path.name}: --format jpeg cannot store alpha; use --format png or tiff"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
        if fmt == "png" and bit_depth == 16:
            save_png16(path, take_samples(result, 16), text, icc_profile)
            return
        # Pillow copies L, LA and RGB samples into its own memory (RGB at 4 bytes a
        # pixel), so those samples are freed here, before encoding. RGBA is shared.
        image = to_pil(take_samples(result, 8))
        if fmt == "png":
            save_png(path, image, text=text, icc_profile=icc_profile)
        else:
            options = {"quality": 95} if fmt in {"jpeg", "webp"} else {}
            if icc_profile is not None:
                options["icc_profile"] = icc_profile
            with atomic_path(path) as tmp_path:
                image.save(tmp_path, format=fmt.upper(), **options)
    except OSError as error:
        raise OutputError(f"{path}: cannot write output ({error})") from None
