"""Blend windows for tiled upscaling: how neighbouring tiles share an overlap.

A window is a rising ramp over one overlap of `length` output pixels: the weight
of the later tile at each pixel of the overlap. The earlier tile gets 1 minus the
ramp, so two tiles sharing an overlap always have weights summing to 1 there. A
tile's 2-D window is the product of its four edge profiles. An edge on the image
border does not fall, so border pixels keep full weight.

Registered windows (`BLEND_WINDOWS`, which the CLI's --blend choices come from):

- hann: raised cosine, sin^2 over the whole overlap, sampled at pixel centres, so
  the outermost pixel of a tile gets sin^2(pi / (4 n)) and the weight reaches zero
  on the tile's border line.
- linear: a straight ramp over the whole overlap, sampled at pixel centres.
- none: a hard paste that switches tiles at the cut of `renderqa.core.tiling`
  (the middle of the overlap, in input pixels), so seam-check's plan matches. Each
  kept pixel is at least overlap // 2 input pixels inside its tile. So with an
  overlap of at least the model's receptive field the output equals a single pass up
  to float rounding, and with overlap 0 it is naive hard tiling, which leaves seams.
- context: zero weight on the outer quarter of the overlap on each side and a
  raised cosine over the middle half, so the band whose pixels saw zero padding
  past the tile edge only serves as context for its neighbour.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from renderqa.core.errors import InvalidInputError

# Ramp(length in output pixels, scale) -> (length,) float64 weights in [0, 1].
RampFunction = Callable[[int, int], np.ndarray]


def hann_ramp(length: int, scale: int) -> np.ndarray:
    """Raised-cosine (Hann half-window) ramp over the whole overlap."""
    centres = (np.arange(length, dtype=np.float64) + 0.5) / length
    return np.sin(0.5 * np.pi * centres) ** 2


def linear_ramp(length: int, scale: int) -> np.ndarray:
    """Linear ramp over the whole overlap, as ComfyUI's tiled upscaler feathers."""
    return (np.arange(length, dtype=np.float64) + 0.5) / length


def hard_ramp(length: int, scale: int) -> np.ndarray:
    """Step from 0 to 1 at the middle of the overlap, in whole input pixels."""
    cut = (length // scale) // 2 * scale
    ramp = np.zeros(length, dtype=np.float64)
    ramp[cut:] = 1.0
    return ramp


def context_ramp(length: int, scale: int) -> np.ndarray:
    """Zero on the outer quarter, raised cosine over the middle half, then one."""
    band = length // 4
    middle = length - 2 * band
    ramp = np.zeros(length, dtype=np.float64)
    ramp[band : band + middle] = hann_ramp(middle, scale)
    ramp[band + middle :] = 1.0
    return ramp


BLEND_WINDOWS: dict[str, RampFunction] = {
    "hann": hann_ramp,
    "linear": linear_ramp,
    "none": hard_ramp,
    "context": context_ramp,
}


def get_ramp(name: str) -> RampFunction:
    """Look up a blend window by name; raise InvalidInputError listing the choices."""
    try:
        return BLEND_WINDOWS[name]
    except KeyError:
        raise InvalidInputError(
            f"--blend {name!r} is unknown; use one of {', '.join(BLEND_WINDOWS)}"
        ) from None


def edge_profile(
    size: int,
    rise: int,
    fall: int,
    ramp: RampFunction,
    scale: int,
) -> np.ndarray:
    """Return a tile's 1-D weight profile of `size` output pixels.

    `rise` is the overlap (output pixels) shared with the previous tile, `fall` the
    one shared with the next; 0 means that side is the image border and keeps
    weight 1. The earlier tile takes 1 - ramp over a shared overlap, so the two
    weights sum to 1 there.
    """
    profile = np.ones(size, dtype=np.float64)
    if rise > 0:
        profile[:rise] *= ramp(rise, scale)
    if fall > 0:
        profile[size - fall :] *= 1.0 - ramp(fall, scale)
    return profile
