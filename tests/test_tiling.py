"""Tile geometry: starts cover the axis with full-size tiles, cuts sit mid-overlap."""

import pytest

from renderqa.core.errors import InvalidInputError
from renderqa.core.tiling import hard_cut_positions, seam_positions, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (100, 128, 16, [0]),
        (128, 128, 16, [0]),
        (200, 128, 16, [0, 72]),
        (300, 128, 16, [0, 112, 172]),
        (256, 64, 0, [0, 64, 128, 192]),
    ],
)
def test_tile_starts_cover_axis(length, tile, overlap, expected):
    starts = tile_starts(length, tile, overlap)
    assert starts == expected
    assert starts[-1] + min(tile, length) == length


def test_hard_cuts_sit_mid_overlap():
    assert hard_cut_positions(300, 128, 16) == [120, 206]
    assert hard_cut_positions(256, 64, 0) == [64, 128, 192]
    assert hard_cut_positions(100, 128, 16) == []


def test_seam_positions_scale_with_output():
    assert seam_positions(256, 64, 0, scale=4) == [256, 512, 768]


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (64, -1), (64, 32), (64, 40)])
def test_tile_plan_rejects_bad_values(tile, overlap):
    with pytest.raises(InvalidInputError):
        tile_starts(500, tile, overlap)
