"""Per-line seam scores along one axis: the gradient ratio and the tone ratio.

Input is an `AxisProfile` (per-segment statistics, in 8-bit grey levels). Every
array returned has one entry per line position 0..L, where position p is the
boundary between pixels p - 1 and p; positions too near the border to score are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from renderqa.core.seams_profiles import AxisProfile

# Small periods at which images carry regular line structure of their own: the
# phases of an integer upscale (2 to 8; every other column of a 2x bicubic upscale
# has larger gradients) and JPEG and WebP blocks (4, 8, 16). A line is also
# compared with the lines at these distances.
GRID_PERIODS = (2, 3, 4, 5, 6, 7, 8, 16)


# Fraction of the mean |grey step| of nearby lines below which the tone reference
# never falls.
TONE_ACTIVITY = 0.1

# The fraction of a line's segments that must show a term for the line to score.
LINE_QUANTILE = 0.75

# A line scores only if its spike is at least this fraction of its own mean
# |gradient|. A seam is a one-pixel step, so the two are close; a soft object edge
# spread over several pixels has a large gradient but a small spike (about
# 1 / (2 sigma^2) of it for a Gaussian edge of width sigma, so 0.12 at sigma = 2).
MIN_SHARPNESS = 0.25


@dataclass
class AxisScores:
    """The per-line scores of one axis, kept for the decision, plots and reports."""

    orientation: str
    difference: np.ndarray  # mean |grey step| across each line, grey levels
    neighbour_difference: np.ndarray  # median of `difference` over nearby lines
    strength_ratio: np.ndarray  # gradient term over its neighbourhood
    tone_step: np.ndarray  # median over segments of |tone step|, grey levels
    tone_ratio: np.ndarray  # tone term over its neighbourhood

    def line_score(self) -> np.ndarray:
        """Return the larger of the two ratios at each position."""
        return np.maximum(self.strength_ratio, self.tone_ratio)


def score_axis(
    profile: AxisProfile,
    orientation: str,
    window: int,
    spike_floor: float,
    tone_floor: float,
) -> AxisScores:
    """Compute the gradient and tone ratios of every line position along one axis.

    Each term is the median over the line's segments (so it must hold along the
    line), divided by the median of nearby lines, or by the floor (grey levels)
    where nearby lines are flatter than that.
    """
    spike = along_line(profile.mean_spike)
    spike_reference = neighbourhood_median(spike, window, 2, periodic=True)
    strength_ratio = spike / np.maximum(spike_reference, spike_floor)
    gradient = along_line(profile.mean_abs_difference)
    strength_ratio[spike < MIN_SHARPNESS * gradient] = 0.0

    tone_step = np.median(np.abs(tone_steps(profile.band_means)), axis=0)
    tone_reference = neighbourhood_median(tone_step, window, 2, periodic=True)
    # A tone step of one grey level is visible on a flat background and hidden in
    # texture, where the band means of nearby lines step by as much on their own.
    difference = profile.line_mean_abs_difference()
    neighbour_difference = neighbourhood_median(difference, window, 2)
    tone_reference = np.maximum(tone_reference, TONE_ACTIVITY * neighbour_difference)
    tone_ratio = tone_step / np.maximum(tone_reference, tone_floor)
    # The sharpness of the tone step is judged on the whole line's band means, where
    # texture averages out but a soft edge across the whole line does not.
    weights = profile.segment_lengths / profile.segment_lengths.sum()
    band_step = np.zeros_like(tone_step)
    band_step[1:-1] = np.abs(np.diff(weights @ profile.band_means))
    tone_ratio[tone_step < MIN_SHARPNESS * band_step] = 0.0

    # Lines within `window` pixels of the image border are not scored: any model
    # with zero padding leaves artefacts there, tiled or not, and the terms need
    # lines on both sides.
    for ratio in (strength_ratio, tone_ratio):
        ratio[: window + 1] = 0.0
        ratio[-window - 1 :] = 0.0
    return AxisScores(
        orientation=orientation,
        difference=difference,
        neighbour_difference=neighbour_difference,
        strength_ratio=strength_ratio,
        tone_step=tone_step,
        tone_ratio=tone_ratio,
    )


def along_line(per_segment: np.ndarray) -> np.ndarray:
    """Return, per line, the value that LINE_QUANTILE of its segments reach or exceed.

    `per_segment` is (K, L + 1). A seam runs the whole length of the image, but an
    object edge rarely covers three quarters of it, so this is the statistic
    that separates them.
    """
    return np.quantile(per_segment, 1.0 - LINE_QUANTILE, axis=0)


def tone_steps(band_means: np.ndarray) -> np.ndarray:
    """Return (K, L + 1) signed steps of the band means across each line position.

    `band_means` (K, L) holds, per segment, the mean of each one-pixel band (column
    or row) along the segment. The step across position p is m[p] - m[p - 1] where
    it rises above, or falls below, the steps across both neighbouring positions,
    by the smaller of the two margins; elsewhere 0. A tone shift of h grey levels
    between two tiles gives h, a smooth ramp 0.
    """
    segments, length = band_means.shape
    steps = np.zeros((segments, length + 1))
    if length < 4:
        return steps
    differences = np.diff(band_means, axis=1)  # position p at index p - 1
    middle = differences[:, 1:-1]
    rise = middle - differences[:, :-2]
    fall = middle - differences[:, 2:]
    margin = np.minimum(np.abs(rise), np.abs(fall))
    margin[(rise > 0) != (fall > 0)] = 0.0
    steps[:, 2 : length - 1] = np.sign(middle) * margin
    return steps


def neighbourhood_median(
    values: np.ndarray, window: int, exclude: int, periodic: bool = False
) -> np.ndarray:
    """Return, per position, the median of `values` at offsets exclude..window either side.

    With `periodic`, the result is the largest of that median and the medians of the
    lines 1 to 4 periods away, for each period in GRID_PERIODS, so a line of a
    small-period grid is compared with the other lines of its grid.
    """
    near = [k for k in range(exclude, window + 1)]
    reference = median_at_offsets(values, [-k for k in near] + near)
    if periodic:
        for period in GRID_PERIODS:
            far = [k * period for k in range(1, 5)]
            np.maximum(
                reference,
                median_at_offsets(values, [-k for k in far] + far),
                out=reference,
            )
    return reference


def median_at_offsets(values: np.ndarray, offsets: list[int]) -> np.ndarray:
    """Return, per position i, the median of values[i + k] over `offsets` k.

    The axis is mirrored at both ends. NOTE: scipy.ndimage.median_filter is not used
    because in scipy 1.17.1 its 1-D path ignores the holes of a footprint.
    """
    reach = max(abs(k) for k in offsets)
    padded = np.pad(values, reach, mode="symmetric")
    length = len(values)
    stacked = np.stack([padded[reach + k : reach + k + length] for k in offsets])
    return np.median(stacked, axis=0)
