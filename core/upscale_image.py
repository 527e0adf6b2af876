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
from renderqa.core.errors import InvalidInputError, OutputError
from renderqa.core.imageio import (
    LoadedImage,
    save_png,
    save_png16,
    to_uint8,
    to_uint16,
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
    """An upscaled image: (H, W, C) float32 [0, 1] pixels and optional alpha."""

    pixels: np.ndarray
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    passes: list[TiledResult]


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


def _from_model_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.shape[2] == channels:
        return pixels
    # Averaging in float64 returns a grey sample exactly when all three agree. The
    # dtype argument sums in float64 without a float64 copy of all three channels.
    grey = pixels.mean(axis=2, keepdims=True, dtype=np.float64)
    return grey.astype(np.float32)


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
    if stage is not None:
        stage("colour")
    colour = _upscale_array(
        _to_model_channels(image.pixels, upscaler.input_channels),
        upscaler,
        settings,
        progress,
    )
    passes = [colour]
    pixels = _from_model_channels(colour.pixels, image.pixels.shape[2])

    alpha = None
    if image.alpha is not None:
        alpha_min, alpha_max = image.alpha.min(), image.alpha.max()
        if alpha_min == alpha_max:
            alpha = np.full(pixels.shape[:2], alpha_min, dtype=np.float32)
        else:
            if stage is not None:
                stage("alpha")
            alpha_pass = _upscale_array(
                _to_model_channels(image.alpha[..., None], upscaler.input_channels),
                upscaler,
                settings,
                progress,
            )
            passes.append(alpha_pass)
            alpha = _from_model_channels(alpha_pass.pixels, 1)[..., 0]
    return UpscaledImage(pixels=pixels, alpha=alpha, passes=passes)


def to_pil(result: UpscaledImage) -> Image.Image:
    """Quantise an upscaled image to an 8-bit Pillow image (L, LA, RGB or RGBA)."""
    colour = to_uint8(result.pixels)
    if result.alpha is not None:
        colour = np.concatenate([colour, to_uint8(result.alpha)[..., None]], axis=2)
    return Image.fromarray(colour[..., 0] if colour.shape[2] == 1 else colour)


def to_uint16_samples(result: UpscaledImage) -> np.ndarray:
    """Quantise an upscaled image to (H, W, C) uint16 samples, alpha last."""
    samples = to_uint16(result.pixels)
    if result.alpha is not None:
        samples = np.concatenate([samples, to_uint16(result.alpha)[..., None]], axis=2)
    return samples


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
            save_png16(path, to_uint16_samples(result), text, icc_profile)
        elif fmt == "png":
            save_png(path, to_pil(result), text=text, icc_profile=icc_profile)
        else:
            options = {"quality": 95} if fmt in {"jpeg", "webp"} else {}
            if icc_profile is not None:
                options["icc_profile"] = icc_profile
            with atomic_path(path) as tmp_path:
                to_pil(result).save(tmp_path, format=fmt.upper(), **options)
    except OSError as error:
        raise OutputError(f"{path}: cannot write output ({error})") from None
