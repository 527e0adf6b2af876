"""Tile-seam detection from the image alone, with or without a known tile plan.

Entry point: `find_seams(pixels, plan=None, settings=None)` takes (H, W, C) float
pixels in [0, 1] and returns a `SeamReport`. Its `seams` list the lines found, each
with position, orientation, strength ratio and grey-level difference.

    report = find_seams(rgb)                               # estimate the grid
    report = find_seams(rgb, TilePlan(tile=256, overlap=32, scale=4))
    if not report.clean: ...

How a line is scored, per axis (column boundaries for vertical seams, row
boundaries for horizontal ones), in 8-bit grey levels of Rec. 601 luma:

1. Gradient term. Per row, the gradient d[p] = I[p] - I[p - 1] counts only by how
   far it rises above (or falls below) both neighbouring gradients. A one-pixel
   step of h levels counts h, while smooth content and the slope changes of
   bilinear or bicubic upscales count 0. Each line is cut into segments of about
   128 pixels, and the value that three quarters of the segments reach is kept, so
   one object edge crossing part of the line does not lift it. The strength ratio
   divides that by the median of the lines 2 to `window` pixels away, or by the
   median of the lines 1 to 4 periods away for small periods (2 to 8 and 16), if
   larger. Integer upscales and JPEG blocks are thereby compared with themselves.
2. Tone term. The same step test on the mean of each one-pixel column within a
   segment (the median over segments), so that a step of one grey level between
   separately decoded tiles stands out once ~128 rows of texture are averaged.
3. A line is a seam when either ratio reaches `factor` (default 3). With a tile
   plan, its boundaries are scored one by one (the best line within `tolerance`
   pixels). Without one, every line is scored and the tile period and offset are
   estimated from the ratio profile. On a grid whose median line reaches `factor`,
   the other grid lines need only `grid_factor`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from renderqa.core.errors import InvalidInputError
from renderqa.core.seams_grid import TileGrid, estimate_grid
from renderqa.core.seams_profiles import column_profile, luma_levels, row_profile
from renderqa.core.seams_scores import AxisScores, score_axis
from renderqa.core.tiling import check_tile_plan, seam_positions

logger = logging.getLogger(__name__)

VERTICAL = "vertical"  # a column boundary: the line runs top to bottom
HORIZONTAL = "horizontal"  # a row boundary: the line runs left to right


@dataclass(frozen=True)
class TilePlan:
    """A tile plan in input pixels, as `renderqa upscale` cuts it (see core.tiling)."""

    tile: int
    overlap: int = 0
    scale: int = 1


@dataclass(frozen=True)
class SeamSettings:
    """Detection thresholds. Ratios are unitless; floors are in 8-bit grey levels."""

    factor: float = 3.0  # a line is a seam at this ratio over nearby lines
    grid_factor: float = 2.0  # the ratio needed on a grid that its lines confirm
    window: int = 8  # nearby lines: 2 to `window` pixels away on either side
    tolerance: int = 2  # pixels a plan boundary may be off (resamplers shift cuts)
    # 8-bit rounding alone gives gradient spikes of about 0.4 levels on smooth
    # content, so the reference never drops below these floors; a flat region cannot
    # turn a fraction of a grey level into a large ratio.
    spike_floor: float = 0.5
    tone_floor: float = 0.25
    min_period: int = 16  # the shortest tile period (output pixels) estimated

    def __post_init__(self) -> None:
        if not self.factor > 1.0:
            raise InvalidInputError(
                f"--factor {self.factor} must be greater than 1; 3 is the default"
            )
        if not 1.0 < self.grid_factor <= self.factor:
            raise InvalidInputError(
                f"grid_factor {self.grid_factor} must be above 1 and at most "
                f"factor {self.factor}"
            )
        if self.window < 3 or self.tolerance < 0 or self.min_period < 4:
            raise InvalidInputError(
                "window must be >= 3, tolerance >= 0 and min_period >= 4 pixels; got "
                f"{self.window}, {self.tolerance}, {self.min_period}"
            )


@dataclass(frozen=True)
class Seam:
    """One line found to be a seam."""

    position: int  # boundary between pixels position - 1 and position (output pixels)
    orientation: str  # VERTICAL (a column boundary) or HORIZONTAL (a row boundary)
    strength_ratio: float  # gradient term over nearby lines
    tone_ratio: float  # tone term over nearby lines
    difference: float  # mean |grey step| across this line, 8-bit grey levels
    neighbour_difference: float  # the same for nearby lines (median)
    tone_step: float  # median over segments of |tone step|, grey levels
    detected_by: str  # "gradient", "tone" or "gradient+tone"
    on_grid: bool  # on the plan given, or on the estimated tile grid


@dataclass
class SeamReport:
    """The seams of one image, the tile grid per axis, and the line scores."""

    height: int
    width: int
    seams: list[Seam]
    grids: dict[str, TileGrid | None] = field(default_factory=dict)
    scores: dict[str, AxisScores] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.seams


def find_seams(
    pixels: np.ndarray,
    plan: TilePlan | None = None,
    settings: SeamSettings | None = None,
) -> SeamReport:
    """Find tile seams in an (H, W, C) image of floats in [0, 1].

    C is 1 (grey), 3 (RGB) or 4 (RGBA, alpha ignored: seams are judged on the colour
    the model produced). The image is not modified; the luma plane is float32.
    With `plan`, only its boundaries are scored; a plan that does not fit the image
    raises InvalidInputError.
    """
    return find_seams_in_luma(luma_levels(pixels), plan, settings)


def find_seams_in_luma(
    luma: np.ndarray,
    plan: TilePlan | None = None,
    settings: SeamSettings | None = None,
) -> SeamReport:
    """Find tile seams in an (H, W) luma plane in 8-bit grey levels (0 to 255).

    `luma` may be uint8 (the fast path: Pillow's "L" conversion of an 8-bit image
    gives exactly this) or float. Raises InvalidInputError for a plan that does not
    fit the image.
    """
    settings = settings or SeamSettings()
    if luma.ndim != 2:
        raise InvalidInputError(
            f"expected an (H, W) luma plane, got shape {luma.shape}"
        )
    height, width = luma.shape
    if min(height, width) < 2 * settings.window + 4:
        raise InvalidInputError(
            f"the image is {width}x{height}; seam-check needs at least "
            f"{2 * settings.window + 4} pixels on each side"
        )
    plan_positions = _plan_positions(plan, height, width) if plan else None

    report = SeamReport(height=height, width=width, seams=[])
    for orientation, profile_axis in (
        (VERTICAL, column_profile),
        (HORIZONTAL, row_profile),
    ):
        scores = score_axis(
            profile_axis(luma),
            orientation,
            window=settings.window,
            spike_floor=settings.spike_floor,
            tone_floor=settings.tone_floor,
        )
        if plan_positions is None:
            grid = estimate_grid(
                scores.line_score(), settings.factor, settings.min_period
            )
            seams = _select_anywhere(scores, grid, settings)
        else:
            grid = _plan_grid(scores, plan_positions[orientation], settings)
            seams = _select_at(scores, grid, settings)
        report.grids[orientation] = grid
        report.scores[orientation] = scores
        report.seams.extend(seams)
        logger.debug(
            "%s lines: %d seams, grid %s", orientation, len(seams), grid and grid.period
        )
    return report


def _plan_positions(plan: TilePlan, height: int, width: int) -> dict[str, list[int]]:
    """Return the output positions of a plan's boundaries, or raise if it cannot fit."""
    check_tile_plan(plan.tile, plan.overlap)
    if plan.scale < 1:
        raise InvalidInputError(f"--scale {plan.scale} must be a positive integer")
    if width % plan.scale or height % plan.scale:
        raise InvalidInputError(
            f"the image is {width}x{height}, which is not a multiple of --scale "
            f"{plan.scale}; pass the scale the tiles were upscaled by, or omit the plan"
        )
    in_width, in_height = width // plan.scale, height // plan.scale
    positions = {
        VERTICAL: seam_positions(in_width, plan.tile, plan.overlap, plan.scale),
        HORIZONTAL: seam_positions(in_height, plan.tile, plan.overlap, plan.scale),
    }
    if not positions[VERTICAL] and not positions[HORIZONTAL]:
        raise InvalidInputError(
            f"--tile {plan.tile} covers the whole {in_width}x{in_height} input "
            f"(image size / --scale {plan.scale}), so the plan has no boundaries to "
            "check; pass the tile size the image was processed with"
        )
    return positions


def _best_near(line_score: np.ndarray, position: int, tolerance: int) -> int:
    """Return the position within `tolerance` of `position` with the highest score."""
    low = max(position - tolerance, 0)
    high = min(position + tolerance + 1, len(line_score))
    return low + int(np.argmax(line_score[low:high]))


def _plan_grid(
    scores: AxisScores, positions: Sequence[int], settings: SeamSettings
) -> TileGrid:
    line_score = scores.line_score()
    best = [
        line_score[_best_near(line_score, p, settings.tolerance)] for p in positions
    ]
    confirmed = bool(best) and float(np.median(best)) >= settings.factor
    return TileGrid(source="plan", positions=tuple(positions), confirmed=confirmed)


def _select_at(
    scores: AxisScores, grid: TileGrid, settings: SeamSettings
) -> list[Seam]:
    """Score each plan boundary: the best line within the tolerance."""
    threshold = settings.grid_factor if grid.confirmed else settings.factor
    line_score = scores.line_score()
    seams = []
    for position in grid.positions:
        best = _best_near(line_score, position, settings.tolerance)
        if line_score[best] >= threshold:
            seams.append(_make_seam(scores, best, True, threshold))
    return seams


def _select_anywhere(
    scores: AxisScores, grid: TileGrid | None, settings: SeamSettings
) -> list[Seam]:
    """Report lines at the factor anywhere, plus lines of a confirmed estimated grid.

    Of lines closer than `window` pixels, only the strongest is kept, because the
    error band of one seam can lift the lines beside it as well.
    """
    line_score = scores.line_score()
    candidates = {
        int(p): settings.factor for p in np.flatnonzero(line_score >= settings.factor)
    }
    if grid is not None and grid.confirmed:
        for position in grid.positions:
            best = _best_near(line_score, position, settings.tolerance)
            if line_score[best] >= settings.grid_factor:
                candidates.setdefault(best, settings.grid_factor)

    taken: list[int] = []
    for position in sorted(candidates, key=lambda p: -line_score[p]):
        if all(abs(position - other) > settings.window for other in taken):
            taken.append(position)
    return [
        _make_seam(scores, p, _near(p, grid, settings.tolerance), candidates[p])
        for p in sorted(taken)
    ]


def _near(position: int, grid: TileGrid | None, tolerance: int) -> bool:
    if grid is None:
        return False
    return any(abs(position - p) <= tolerance for p in grid.positions)


def _make_seam(
    scores: AxisScores, position: int, on_grid: bool, threshold: float
) -> Seam:
    strength = float(scores.strength_ratio[position])
    tone = float(scores.tone_ratio[position])
    terms = [
        name
        for name, ratio in (("gradient", strength), ("tone", tone))
        if ratio >= threshold
    ]
    return Seam(
        position=int(position),
        orientation=scores.orientation,
        strength_ratio=round(strength, 3),
        tone_ratio=round(tone, 3),
        difference=round(float(scores.difference[position]), 3),
        neighbour_difference=round(float(scores.neighbour_difference[position]), 3),
        tone_step=round(float(scores.tone_step[position]), 3),
        detected_by="+".join(terms),
        on_grid=on_grid,
    )
