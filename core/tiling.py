"""Tile geometry shared by `upscale` (which cuts tiles) and `seam-check` (which
scores the boundaries of a known tile plan).

Convention, per axis of length L with tile size T and overlap O (input pixels):
tiles start at 0, T - O, 2 (T - O), ... and the last tile is moved back to end at L,
so every tile keeps its full size and the last overlap can exceed O. An axis no
longer than T is one tile of length L. Between two neighbouring tiles starting at a
and b, the overlap is [b, a + T); a hard paste (no blend) switches from the first
tile to the second at the middle of that overlap, cut = (b + a + T) // 2.
"""

from __future__ import annotations

from renderqa.core.errors import InvalidInputError


def check_tile_plan(tile: int, overlap: int) -> None:
    """Raise InvalidInputError unless 1 <= tile and 0 <= overlap < tile / 2."""
    if tile < 1:
        raise InvalidInputError(f"--tile {tile} must be at least 1 pixel")
    if overlap < 0:
        raise InvalidInputError(f"--overlap {overlap} must be 0 or more pixels")
    if 2 * overlap >= tile:
        raise InvalidInputError(
            f"--overlap {overlap} must be less than half of --tile {tile}; "
            f"use --overlap {max(0, (tile - 1) // 2)} or less, or a larger tile"
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Return the start offsets of the tiles covering one axis of `length` pixels."""
    check_tile_plan(tile, overlap)
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def hard_cut_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Return where a hard paste switches tiles: the first index owned by the next tile."""
    starts = tile_starts(length, tile, overlap)
    span = min(tile, length)
    return [(b + a + span) // 2 for a, b in zip(starts, starts[1:], strict=False)]


def seam_positions(length: int, tile: int, overlap: int, scale: int = 1) -> list[int]:
    """Return the output-pixel positions of the hard-paste boundaries of a tile plan.

    `length` is the input length; a boundary at input index c lies between output
    indices c * scale - 1 and c * scale, and is reported as c * scale.
    """
    if scale < 1:
        raise InvalidInputError(f"--scale {scale} must be a positive integer")
    return [cut * scale for cut in hard_cut_positions(length, tile, overlap)]
