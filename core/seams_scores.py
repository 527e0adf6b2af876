"""Per-line seam scores along one axis: the gradient ratio and the tone ratio.

Input is an `AxisProfile` (per-segment statistics, in 8-bit grey levels). Every
array returned has one entry per line position 0..L, where position p is the
boundary between pixels p - 1 and p; positions too near the border to score are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from renderqa.core.seams_profiles import AxisProfile

# Small periods at which images carry regular line structure of their own: JPEG
# and WebP blocks (8, 16; 4 for WebP's sub-blocks) and nearest-neighbour upscales
# by those factors. A line is also compared with the lines at these distances.
GRID_PERIODS = (4, 8, 16)


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
    spike = np.median(profile.mean_spike, axis=0)
    spike_reference = neighbourhood_median(spike, window, 2, periodic=True)
    strength_ratio = spike / np.maximum(spike_reference, spike_floor)

    tone_step = np.median(np.abs(tone_steps(profile.band_means)), axis=0)
    tone_reference = neighbourhood_median(tone_step, window, 2, periodic=True)
    tone_ratio = tone_step / np.maximum(tone_reference, tone_floor)

    # Lines within `window` pixels of the image border are not scored: any model
    # with zero padding leaves artefacts there, tiled or not, and the terms need
    # lines on both sides.
    for ratio in (strength_ratio, tone_ratio):
        ratio[: window + 1] = 0.0
        ratio[-window - 1 :] = 0.0
    difference = profile.line_mean_abs_difference()
    return AxisScores(
        orientation=orientation,
        difference=difference,
        neighbour_difference=neighbourhood_median(difference, window, 2),
        strength_ratio=strength_ratio,
        tone_step=tone_step,
        tone_ratio=tone_ratio,
    )


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
    footprint = np.zeros(2 * window + 1, dtype=bool)
    footprint[: window - exclude + 1] = True
    footprint[window + exclude :] = True
    reference = ndimage.median_filter(values, footprint=footprint, mode="reflect")
    if periodic:
        for period in GRID_PERIODS:
            phase_footprint = np.zeros(8 * period + 1, dtype=bool)
            phase_footprint[::period] = True
            phase_footprint[4 * period] = False
            phase_reference = ndimage.median_filter(
                values, footprint=phase_footprint, mode="reflect"
            )
            np.maximum(reference, phase_reference, out=reference)
    return reference
