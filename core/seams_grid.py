"""Tile grids along one axis, and the estimate of a periodic grid from line scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Ratios above this add nothing to a grid's score: one very strong object edge must
# not outweigh several lines of moderate strength.
MAX_RATIO = 10.0


@dataclass(frozen=True)
class TileGrid:
    """Tile boundaries along one axis: from a plan, or estimated as a periodic grid."""

    source: str  # "plan" or "estimated"
    positions: tuple[int, ...]
    period: int | None = None  # output pixels between boundaries (estimated grids)
    offset: int | None = None  # first boundary of an estimated grid
    confirmed: bool = False  # the median line of the grid reaches the factor


def estimate_grid(
    line_score: np.ndarray, factor: float, min_period: int
) -> TileGrid | None:
    """Estimate a periodic tile grid (period, offset) from the line scores of an axis.

    `line_score` has one ratio per line position 0..L. Every period from `min_period`
    to L / 2 and every offset is tried, allowing each line one pixel of jitter; the
    comb with the highest mean log-ratio wins, preferring the shortest period within
    80% of the best, because multiples of the true period score as high. Returns
    None unless at least two lines of the grid reach `factor`.

    NOTE: hard tiling moves the last tile back to the image edge, so the last
    boundary is off the period; it is found by its own ratio, not by the grid.
    """
    length = len(line_score) - 1
    if np.count_nonzero(line_score >= factor) < 2:
        return None  # no grid can have two lines at the factor; skip the search
    log_score = np.log(np.clip(line_score, 1.0, MAX_RATIO))
    jittered = ndimage.maximum_filter1d(log_score, size=3)
    candidates = []
    for period in range(min_period, length // 2 + 1):
        comb = _comb_means(jittered, period)
        best = int(np.argmax(comb))
        candidates.append((float(comb[best]), period, best + 1))
    if not candidates:
        return None
    top = max(score for score, _, _ in candidates)
    if top <= 0.0:
        return None
    _, period, offset = min(
        (entry for entry in candidates if entry[0] >= 0.8 * top),
        key=lambda entry: entry[1],
    )
    # The jittered comb cannot tell P from P + 1 over a few lines; the exact one can.
    exact = [
        (float(comb.max()), candidate, int(np.argmax(comb)) + 1)
        for candidate in (period - 1, period, period + 1)
        if min_period <= candidate <= length // 2
        for comb in [_comb_means(log_score, candidate)]
    ]
    _, period, offset = max(exact, key=lambda entry: (entry[0], -entry[1]))

    period, offset = _shortest_divisor(line_score, period, offset, factor, min_period)

    positions = tuple(range(offset, length, period))
    best = np.array([line_score[max(p - 1, 0) : p + 2].max() for p in positions])
    if np.count_nonzero(best >= factor) < 2:
        return None
    return TileGrid(
        source="estimated",
        positions=positions,
        period=period,
        offset=offset,
        confirmed=bool(np.median(best) >= factor),
    )


def _comb_means(values: np.ndarray, period: int) -> np.ndarray:
    """Return, for each offset o in 1..period, the mean of values[o::period].

    Index i of the result is offset i + 1. Positions 0 and L are the image borders,
    never boundaries, so they must not drag down any comb.
    """
    count = (len(values) - 2) // period  # positions 1 .. L - 1; L is the border
    return values[1 : 1 + count * period].reshape(count, period).mean(axis=0)


def _shortest_divisor(
    line_score: np.ndarray, period: int, offset: int, factor: float, min_period: int
) -> tuple[int, int]:
    """Return the shortest period P / m whose comb through `offset` is mostly seams.

    A grid whose every other boundary is weaker scores best at twice its period;
    this recovers the true period when at least half of the lines that the finer
    comb adds (within one pixel) reach `factor`.
    """
    length = len(line_score) - 1
    for divisor in range(period // min_period, 1, -1):
        candidate = round(period / divisor)
        start = offset % candidate or candidate
        added = [
            p
            for p in range(start, length - 1, candidate)
            if abs((p - offset + 1) % period - 1) > 1
        ]
        best = [line_score[max(p - 1, 0) : p + 2].max() for p in added]
        if best and np.mean(np.array(best) >= factor) >= 0.5:
            return candidate, start
    return period, offset
