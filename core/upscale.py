"""Tiled upscaling with feathered blending and bounded device memory.

The input and the output canvas stay on the CPU; only batches of tiles move to the
model's device. Tiles follow the plan of `renderqa.core.tiling` (every tile full
size, the last one moved back to end at the border). The canvas contains the
weighted mean of the tiles added so far, each tile weighted by its blend window (the
outer product of 1-D row and column profiles), so the finished canvas is the result.

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

from renderqa.core.blend import edge_profile, get_ramp
from renderqa.core.canvas import zeros_canvas
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

# Output rows blended at a time where a tile overlaps earlier tiles.
BLOCK_ROWS = 64


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

    # (H * scale, W * scale, C) float32 in [0, 1], allocated by zeros_canvas. None
    # in UpscaledImage.passes, whose pixels are in UpscaledImage.pixels and .alpha.
    pixels: np.ndarray | None
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


@dataclass(frozen=True)
class _AxisPlan:
    """Tiles along one axis and their blend weights, in output pixels.

    `profiles[i]` is tile i's 1-D weight profile, `earlier[i]` the sum of the
    profiles of tiles 0 to i - 1 over tile i's span, and `rise[i]` how many of tile
    i's leading pixels an earlier tile also covers.
    """

    starts: list[int]  # input pixels
    profiles: list[np.ndarray]
    earlier: list[np.ndarray]
    rise: list[int]
    total: np.ndarray  # summed profile of every output pixel on the axis


def _plan_axis(
    length: int, tile: int, overlap: int, scale: int, blend: str
) -> _AxisPlan:
    starts = tile_starts(length, tile, overlap)
    span = min(tile, length)
    ramp = get_ramp(blend)
    profiles, earlier, rises = [], [], []
    total = np.zeros(length * scale, dtype=np.float64)
    for index, begin in enumerate(starts):
        rise = starts[index - 1] + span - begin if index > 0 else 0
        fall = begin + span - starts[index + 1] if index + 1 < len(starts) else 0
        region = slice(begin * scale, (begin + span) * scale)
        profile = edge_profile(span * scale, rise * scale, fall * scale, ramp, scale)
        earlier.append(total[region].astype(np.float32))
        profiles.append(profile.astype(np.float32))
        rises.append(rise * scale)
        total[region] += profile
    return _AxisPlan(starts, profiles, earlier, rises, total.astype(np.float32))


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
    scale = upscaler.scale
    rows = _plan_axis(height, tile, overlap, scale, settings.blend)
    cols = _plan_axis(width, tile, overlap, scale, settings.blend)
    assert rows.total.min() > 0, "a blend window left an output row without weight"
    assert cols.total.min() > 0, "a blend window left an output column without weight"
    tile_h, tile_w = min(tile, height), min(tile, width)
    plan = [(r, c) for r in range(len(rows.starts)) for c in range(len(cols.starts))]

    # 2. The canvas contains the weighted mean of the tiles added so far, so it is
    # also the result and there is no final division. See _add_tile for why float32
    # is enough. It is a memory-mapped canvas so that saving can return its rows to
    # the operating system as they are quantised.
    canvas = zeros_canvas(
        (height * scale, width * scale, upscaler.output_channels), np.float32
    )
    source = torch.from_numpy(pixels).permute(2, 0, 1)
    retries = 0

    # 3. Run batches of tiles, in plan order, and blend each one into the canvas.
    for first in range(0, len(plan), settings.tile_batch):
        batch = plan[first : first + settings.tile_batch]
        retries += _run_batch(
            canvas, source, batch, rows, cols, (tile_h, tile_w), upscaler
        )
        if progress is not None:
            progress(first + len(batch), len(plan))
    return canvas, len(plan), retries


def _run_batch(
    canvas: np.ndarray,
    source: torch.Tensor,
    batch: list[tuple[int, int]],
    rows: _AxisPlan,
    cols: _AxisPlan,
    size: tuple[int, int],
    upscaler: Upscaler,
) -> int:
    """Upscale the tiles (r, c) of one batch and blend them into the canvas.

    `source` is the (C, H, W) input. Returns the number of tiles redone in fp32. The
    batch's input and output tensors are freed on return, before the next batch
    runs, so at most one batch of tile outputs is alive at a time.
    """
    tile_h, tile_w = size
    tiles = torch.stack(
        [
            source[
                :,
                rows.starts[r] : rows.starts[r] + tile_h,
                cols.starts[c] : cols.starts[c] + tile_w,
            ]
            for r, c in batch
        ]
    )
    upscaled, redone = run_tiles(tiles, upscaler)
    # One copy to (B, h, w, C) makes every later read of a tile contiguous, like the
    # canvas. Blending straight from the (C, h, w) layout took twice as long.
    upscaled = upscaled.permute(0, 2, 3, 1).contiguous()
    for (r, c), output in zip(batch, upscaled.numpy(), strict=True):
        _add_tile(canvas, output, rows, r, cols, c, upscaler.scale)
    return redone


def _add_tile(
    canvas: np.ndarray,
    output: np.ndarray,
    rows: _AxisPlan,
    r: int,
    cols: _AxisPlan,
    c: int,
    scale: int,
) -> None:
    """Blend tile (r, c)'s (h, w, C) output into the canvas's running weighted mean.

    With the tile's weight w and the weight W that earlier tiles put on a pixel, the
    mean moves w / (W + w) of the way to the tile's value: mean + f * (tile - mean).
    Where every tile gives the same value the step is exactly zero, so equal tile
    outputs come back bit for bit in float32. Otherwise each tile adds a few float32
    roundings: against a float64 weighted sum the trained fixture's tiled outputs on
    four photographs differ by at most 6e-8, far below a 16-bit step (1.5e-5), which
    is why the canvas does not need float64 and its twice-as-large memory.
    """
    top, left = rows.starts[r] * scale, cols.starts[c] * scale
    height, width = output.shape[:2]
    target = canvas[top : top + height, left : left + width]
    rise_y, rise_x = rows.rise[r], cols.rise[c]

    # No earlier tile covers the rows below the top band and the columns right of
    # the left band, so the tile's value is the mean there whatever its weight.
    target[rise_y:, rise_x:] = output[rise_y:, rise_x:]

    # The bands are blended in blocks of BLOCK_ROWS rows so that the 2-D weight
    # temporaries stay small however far the last tile was moved back.
    blocks = [
        (y, min(y + BLOCK_ROWS, rise_y), 0, width) for y in range(0, rise_y, BLOCK_ROWS)
    ]
    if rise_x > 0:
        blocks += [
            (y, min(y + BLOCK_ROWS, height), 0, rise_x)
            for y in range(rise_y, height, BLOCK_ROWS)
        ]
    col_total = cols.total[left : left + width]
    for y0, y1, x0, x1 in blocks:
        # Tiles arrive in row-major order: earlier tile rows contributed their row
        # profiles times the whole column total, and earlier tiles in this row the
        # tile's own row profile times their column profiles.
        row_weight = rows.profiles[r][y0:y1, None]
        weight = row_weight * cols.profiles[c][None, x0:x1]
        earlier = rows.earlier[r][y0:y1, None] * col_total[None, x0:x1]
        earlier += row_weight * cols.earlier[c][None, x0:x1]
        total = earlier + weight
        fraction = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
        mean = target[y0:y1, x0:x1]
        tile_value = output[y0:y1, x0:x1]
        step = tile_value - mean
        step *= fraction[..., None]
        mean += step
        # Where earlier tiles gave no weight, take the tile's value exactly rather
        # than mean + 1 * (tile - mean), which can round.
        if not earlier.all():
            np.copyto(mean, tile_value, where=(earlier == 0)[..., None])


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
