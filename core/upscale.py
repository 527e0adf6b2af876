"""Tiled upscaling with feathered blending and bounded device memory.

The input and the output canvas stay on the CPU; only batches of tiles move to the
model's device. Tiles follow the plan of `renderqa.core.tiling` (every tile full
size, the last one moved back to end at the border). Each upscaled tile is
multiplied by its blend window and added to the canvas. At the end the canvas is
divided by the summed weights, which are the outer product of the per-row and
per-column sums of the tiles' 1-D profiles.

Arrays are (H, W, C) float32 in [0, 1], C equal to the model's input channels;
the output is (H * scale, W * scale, C) float32 in [0, 1].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from renderqa.core.blend import edge_profile, get_ramp, quantize_window
from renderqa.core.devices import dtype_name
from renderqa.core.errors import DeviceError, InvalidInputError
from renderqa.core.tiling import check_tile_plan, tile_starts
from renderqa.core.upscale_model import Upscaler

logger = logging.getLogger(__name__)

# Progress(tiles done, tiles in the current plan); the total changes when an
# out-of-memory error restarts the image with smaller tiles.
ProgressCallback = Callable[[int, int], None]

# Smallest tile the out-of-memory fallback halves down to, in input pixels.
MIN_TILE_ON_OOM = 32

# A tile whose output peak stays below BLACK_OUTPUT while its input peaks above
# DARK_INPUT is treated as an fp16 failure (a black tile) and redone in fp32.
BLACK_OUTPUT = 0.5 / 255
DARK_INPUT = 2 / 255


@dataclass(frozen=True)
class TileSettings:
    """How to cut and blend tiles: sizes in input pixels."""

    tile: int = 512
    overlap: int = 32
    blend: str = "hann"
    tile_batch: int = 1


@dataclass
class TiledResult:
    """An upscaled image and what it took to make it."""

    pixels: np.ndarray  # (H * scale, W * scale, C) float32 in [0, 1]
    tiles: int  # tiles run in the final, successful plan
    tile: int  # tile size used in the end (smaller after out-of-memory restarts)
    overlap: int
    fp32_retries: int  # tiles redone in fp32 after a non-finite or black output
    oom_restarts: int
    seconds: float


def check_settings(settings: TileSettings, upscaler: Upscaler) -> None:
    """Raise InvalidInputError for a tile plan this model cannot run."""
    check_tile_plan(settings.tile, settings.overlap)
    get_ramp(settings.blend)
    if settings.tile_batch < 1:
        raise InvalidInputError(
            f"--tile-batch {settings.tile_batch} must be at least 1 tile"
        )
    if settings.tile < upscaler.min_size:
        raise InvalidInputError(
            f"--tile {settings.tile} is below the minimum input size of "
            f"{upscaler.min_size} pixels that spandrel reports for {upscaler.name}; "
            f"use --tile {upscaler.min_size} or more"
        )


def upscale_array(
    pixels: np.ndarray,
    upscaler: Upscaler,
    settings: TileSettings,
    progress: ProgressCallback | None = None,
) -> TiledResult:
    """Upscale an (H, W, C) float32 [0, 1] array in blended tiles.

    On a CUDA out-of-memory error the tile size and overlap halve and the image
    restarts from an empty canvas, down to MIN_TILE_ON_OOM (or the model's minimum
    size); below that a DeviceError is raised.
    """
    check_settings(settings, upscaler)
    if pixels.ndim != 3 or pixels.shape[2] != upscaler.input_channels:
        raise InvalidInputError(
            f"image of shape {pixels.shape} does not match the model's "
            f"{upscaler.input_channels} input channels"
        )
    start = time.perf_counter()
    tile, overlap, restarts = settings.tile, settings.overlap, 0
    floor = max(MIN_TILE_ON_OOM, upscaler.min_size)
    while True:
        try:
            canvas, tiles, retries = _run_plan(
                pixels, upscaler, tile, overlap, settings, progress
            )
            break
        except torch.cuda.OutOfMemoryError:
            if tile // 2 < floor:
                raise DeviceError(
                    f"out of GPU memory with --tile {tile}, and the fallback does not "
                    f"go below {floor} pixels; use --device cpu or a smaller model"
                ) from None
            tile, overlap, restarts = tile // 2, overlap // 2, restarts + 1
            logger.warning(
                "out of GPU memory: restarting the image with --tile %d --overlap %d",
                tile,
                overlap,
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return TiledResult(
        pixels=canvas,
        tiles=tiles,
        tile=tile,
        overlap=overlap,
        fp32_retries=retries,
        oom_restarts=restarts,
        seconds=time.perf_counter() - start,
    )


def _axis_profiles(
    length: int, tile: int, overlap: int, scale: int, blend: str
) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """Return tile starts (input pixels), each tile's quantised 1-D weight profile,
    and the sum of the profiles over the whole axis (output pixels)."""
    starts = tile_starts(length, tile, overlap)
    span = min(tile, length)
    ramp = get_ramp(blend)
    profiles = []
    total = np.zeros(length * scale, dtype=np.float64)
    for index, begin in enumerate(starts):
        rise = starts[index - 1] + span - begin if index > 0 else 0
        fall = begin + span - starts[index + 1] if index + 1 < len(starts) else 0
        profile = edge_profile(span * scale, rise * scale, fall * scale, ramp, scale)
        profiles.append(quantize_window(profile))
        total[begin * scale : (begin + span) * scale] += profiles[-1]
    return starts, profiles, total


def _run_plan(
    pixels: np.ndarray,
    upscaler: Upscaler,
    tile: int,
    overlap: int,
    settings: TileSettings,
    progress: ProgressCallback | None,
) -> tuple[np.ndarray, int, int]:
    """Run every tile of one plan; return (canvas, tiles run, fp32 retries)."""
    # 1. Plan: tile positions and the weight profile of each row and column of
    # tiles. A tile's window is the outer product of its row and column profiles.
    height, width, _ = pixels.shape
    channels = upscaler.output_channels
    scale = upscaler.scale
    rows, row_profiles, row_total = _axis_profiles(
        height, tile, overlap, scale, settings.blend
    )
    cols, col_profiles, col_total = _axis_profiles(
        width, tile, overlap, scale, settings.blend
    )
    assert row_total.min() > 0, "a blend window left an output row without weight"
    assert col_total.min() > 0, "a blend window left an output column without weight"
    tile_h, tile_w = min(tile, height), min(tile, width)
    plan = [(r, c) for r in range(len(rows)) for c in range(len(cols))]

    # 2. Accumulate in float64 so that equal tile outputs divide back exactly.
    canvas = np.zeros((height * scale, width * scale, channels), dtype=np.float64)
    source = torch.from_numpy(pixels).permute(2, 0, 1)
    retries = 0

    # 3. Run batches of tiles and add each one, weighted, to the canvas.
    for first in range(0, len(plan), settings.tile_batch):
        batch = plan[first : first + settings.tile_batch]
        tiles = torch.stack(
            [
                source[:, rows[r] : rows[r] + tile_h, cols[c] : cols[c] + tile_w]
                for r, c in batch
            ]
        )
        upscaled, redone = run_tiles(tiles, upscaler)
        retries += redone
        for (r, c), output in zip(batch, upscaled.numpy(), strict=True):
            top, left = rows[r] * scale, cols[c] * scale
            region = np.s_[top : top + tile_h * scale, left : left + tile_w * scale]
            weighted = output.transpose(1, 2, 0) * row_profiles[r][:, None, None]
            weighted *= col_profiles[c][None, :, None]
            canvas[region] += weighted
        if progress is not None:
            progress(first + len(batch), len(plan))

    # 4. Normalise. Every tile row meets every tile column, so the summed weight
    # at (y, x) is row_total[y] * col_total[x]. Bands keep the temporary small.
    result = np.empty(canvas.shape, dtype=np.float32)
    band = 256
    for top in range(0, canvas.shape[0], band):
        weights = np.outer(row_total[top : top + band], col_total)
        result[top : top + band] = canvas[top : top + band] / weights[..., None]
    return result, len(plan), retries


@torch.inference_mode()
def run_tiles(tiles: torch.Tensor, upscaler: Upscaler) -> tuple[torch.Tensor, int]:
    """Upscale a (B, C, h, w) float32 CPU batch on the model's device.

    Returns the (B, C, h * scale, w * scale) float32 CPU output and the number of
    tiles redone in fp32 because the fp16/bf16 output was non-finite or black.
    """
    device_tiles = tiles.to(device=upscaler.device, dtype=upscaler.dtype)
    output = upscaler.forward(device_tiles).float()
    expected = (
        tiles.shape[0],
        upscaler.output_channels,
        tiles.shape[2] * upscaler.scale,
        tiles.shape[3] * upscaler.scale,
    )
    if tuple(output.shape) != expected:
        raise InvalidInputError(
            f"{upscaler.name} returned tiles of shape {tuple(output.shape)} for input "
            f"{tuple(tiles.shape)}; expected {expected} at scale {upscaler.scale}"
        )

    failed = _failed_tiles(device_tiles.float(), output)
    redone = 0
    if failed.any() and upscaler.forward_fp32 is not None:
        indices = failed.nonzero().flatten()
        logger.warning(
            "%d tile(s) came out non-finite or black in %s; redoing them in fp32",
            len(indices),
            dtype_name(upscaler.dtype),
        )
        precise = tiles[indices.cpu()].to(device=upscaler.device, dtype=torch.float32)
        output[indices] = upscaler.forward_fp32(precise).float()
        redone = len(indices)
    if (~torch.isfinite(output)).any():
        raise DeviceError(
            f"{upscaler.name} produced non-finite values even in fp32; the "
            "checkpoint or the input is broken"
        )
    return output.cpu(), redone


def _failed_tiles(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Flag tiles whose output is non-finite, or black while the input is not."""
    nonfinite = ~torch.isfinite(outputs).flatten(1).all(dim=1)
    black = outputs.nan_to_num(1.0).flatten(1).amax(dim=1) < BLACK_OUTPUT
    lit = inputs.flatten(1).amax(dim=1) > DARK_INPUT
    return nonfinite | (black & lit)
