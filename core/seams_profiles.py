"""Line profiles of an image for seam detection: gradients, gradient spikes, tone.

Everything here works on a luma plane `luma` of shape (H, W), float32, in 8-bit grey
levels (0 to 255). A line position `p` on an axis of length L names the boundary
between pixels p - 1 and p, the convention of `renderqa.core.tiling.seam_positions`.
Column positions (vertical lines) come from horizontal differences, row positions
(horizontal lines) from vertical differences.

Each line is split into segments along its length, so later steps can test whether
a line is raised along its whole length or only where one object edge crosses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rec. 601 luma weights, the ones Pillow uses to convert RGB to "L".
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Rows processed per block when accumulating column statistics, so temporaries stay
# a few megabytes even on 8192-pixel-wide images.
BLOCK_ROWS = 128


@dataclass
class AxisProfile:
    """Per-segment statistics of every line position along one axis of length L.

    Arrays are float64 with one row per segment, and column p is line position p.
    Positions 0 and L are the image borders, never lines, so their columns stay zero.
    """

    length: int  # L: the number of pixels along the axis
    segment_starts: np.ndarray  # (K,) start of each segment along the line
    segment_lengths: np.ndarray  # (K,) pixels per segment
    mean_abs_difference: np.ndarray  # (K, L + 1) mean |I[p] - I[p - 1]|
    mean_spike: np.ndarray  # (K, L + 1) mean gradient spike at p (see _spike)
    band_means: np.ndarray  # (K, L) mean of each pixel line within the segment

    def line_mean_abs_difference(self) -> np.ndarray:
        """Return (L + 1,) mean |I[p] - I[p - 1]| over the whole length of each line."""
        weights = self.segment_lengths / self.segment_lengths.sum()
        return weights @ self.mean_abs_difference


def luma_levels(pixels: np.ndarray) -> np.ndarray:
    """Convert (H, W, C) [0, 1] pixels to an (H, W) float32 luma plane in grey levels.

    C is 1 (grey) or 3 (RGB, Rec. 601 weights); any channel past the third is
    ignored, so callers drop alpha before or rely on this.
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"expected (H, W, C) pixels with C in 1, 3, 4; got {pixels.shape}"
        )
    if pixels.shape[2] == 1:
        return np.asarray(pixels[..., 0], dtype=np.float32) * np.float32(255.0)
    weights = LUMA_WEIGHTS * np.float32(255.0)
    return np.einsum(
        "hwc,c->hw", pixels[..., :3].astype(np.float32, copy=False), weights
    )


def segment_bounds(
    length: int, target: int = 128, max_segments: int = 64
) -> np.ndarray:
    """Return the starts of about `target`-pixel segments covering `length` pixels."""
    count = int(np.clip(round(length / target), 1, max_segments))
    return np.linspace(0, length, count + 1).round().astype(np.int64)[:-1]


def _slice(axis: int, start: int, stop: int | None) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def _spike(differences: np.ndarray, axis: int) -> np.ndarray:
    """Return how far d[p] rises above (or falls below) both d[p - 1] and d[p + 1].

    The value is min(|d[p] - d[p - 1]|, |d[p] - d[p + 1]|) where both have the same
    sign, else 0, along `axis`, two entries shorter. A one-pixel step of height h in
    the image gives h; smooth content, and the slope changes of a linear or cubic
    upscale (d moves to a new level and stays there), give 0.
    """
    middle = differences[_slice(axis, 1, -1)]
    rise = middle - differences[_slice(axis, 0, -2)]
    fall = middle - differences[_slice(axis, 2, None)]
    same_sign = (
        (rise ^ fall) >= 0 if rise.dtype.kind == "i" else (rise > 0) == (fall > 0)
    )
    spike = np.minimum(np.abs(rise), np.abs(fall))
    spike *= same_sign
    return spike


def _working(block: np.ndarray) -> np.ndarray:
    """Return `block` in a signed dtype wide enough for third differences."""
    if block.dtype == np.uint8:
        return block.astype(np.int16)
    if block.dtype.kind in "ui":
        return block.astype(np.int32)
    return block.astype(np.float32, copy=False)


def _accumulator(block: np.ndarray) -> type:
    return np.int64 if block.dtype.kind == "i" else np.float64


def column_profile(luma: np.ndarray) -> AxisProfile:
    """Profile the vertical lines (column boundaries) of an (H, W) luma plane."""
    height, width = luma.shape
    starts = segment_bounds(height)
    ends = np.append(starts[1:], height)
    abs_difference = np.zeros((len(starts), width + 1))
    spike_sum = np.zeros((len(starts), width + 1))
    band_means = np.zeros((len(starts), width))

    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        for row in range(start, end, BLOCK_ROWS):
            block = _working(luma[row : min(row + BLOCK_ROWS, end)])
            total = _accumulator(block)
            differences = block[:, 1:] - block[:, :-1]
            abs_difference[k, 1:width] += np.abs(differences).sum(axis=0, dtype=total)
            if width >= 4:
                spikes = _spike(differences, 1)
                spike_sum[k, 2 : width - 1] += spikes.sum(axis=0, dtype=total)
            band_means[k] += block.sum(axis=0, dtype=total)
    lengths = (ends - starts).astype(np.float64)[:, None]
    return AxisProfile(
        length=width,
        segment_starts=starts,
        segment_lengths=lengths[:, 0],
        mean_abs_difference=abs_difference / lengths,
        mean_spike=spike_sum / lengths,
        band_means=band_means / lengths,
    )


def row_profile(luma: np.ndarray) -> AxisProfile:
    """Profile the horizontal lines (row boundaries) of an (H, W) luma plane."""
    height, width = luma.shape
    starts = segment_bounds(width)
    lengths = np.diff(np.append(starts, width)).astype(np.float64)
    abs_difference = np.zeros((len(starts), height + 1))
    spike_sum = np.zeros((len(starts), height + 1))
    band_means = np.zeros((len(starts), height))

    for row in range(0, height, BLOCK_ROWS):
        end = min(row + BLOCK_ROWS, height)
        # Rows row - 2 .. end cover the differences and spikes of positions up to end.
        top = max(row - 2, 0)
        block = _working(luma[top : min(end + 1, height)])
        total = _accumulator(block)
        band_means[:, row:end] = np.add.reduceat(
            block[row - top : end - top], starts, axis=1, dtype=total
        ).T
        # Differences at positions row + 1 .. end need rows row .. end.
        differences = block[1:] - block[:-1]  # position top + 1 + index
        pairs = np.abs(differences[row - top :])
        if pairs.shape[0]:
            sums = np.add.reduceat(pairs, starts, axis=1, dtype=total).T
            abs_difference[:, row + 1 : row + 1 + sums.shape[1]] = sums
        # The spike at position p needs rows p - 2 .. p + 1, so p runs over 2 .. H - 2.
        first = max(row, 2)
        last = min(end, height - 1)
        if last > first:
            # differences index i is position top + 1 + i; spike index j is position
            # top + 2 + j, so position first is spike index first - top - 2.
            spikes = _spike(differences, 0)[first - top - 2 : last - top - 2]
            spike_sum[:, first:last] = np.add.reduceat(
                spikes, starts, axis=1, dtype=total
            ).T
    return AxisProfile(
        length=height,
        segment_starts=starts,
        segment_lengths=lengths,
        mean_abs_difference=abs_difference / lengths[:, None],
        mean_spike=spike_sum / lengths[:, None],
        band_means=band_means / lengths[:, None],
    )
