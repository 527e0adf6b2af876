"""Real photographs bundled in scikit-image's wheel, for tests that need natural images.

    from tests.photos import photo_names, load_photo

    for name in photo_names():
        rgb = load_photo(name)  # (H, W, 3) float32 in [0, 1]

Only images whose file ships inside the installed `skimage/data` folder are listed,
so nothing is fetched through pooch and the tests run offline. Greyscale photographs
are replicated to three channels. Synthetic images (chessboard, colour wheel, logo,
phantom, horse silhouette) are left out because they are not photographs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import skimage.data


def _left_view() -> np.ndarray:
    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


# Photograph name -> (file shipped in skimage/data, loader).
_PHOTOS: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "astronaut": ("astronaut.png", skimage.data.astronaut),
    "brick": ("brick.png", skimage.data.brick),
    "camera": ("camera.png", skimage.data.camera),
    "cell": ("cell.png", skimage.data.cell),
    "chelsea": ("chelsea.png", skimage.data.chelsea),
    "clock": ("clock_motion.png", skimage.data.clock),
    "coffee": ("coffee.png", skimage.data.coffee),
    "coins": ("coins.png", skimage.data.coins),
    "grass": ("grass.png", skimage.data.grass),
    "gravel": ("gravel.png", skimage.data.gravel),
    "hubble_deep_field": ("hubble_deep_field.jpg", skimage.data.hubble_deep_field),
    "immunohistochemistry": ("ihc.png", skimage.data.immunohistochemistry),
    "moon": ("moon.png", skimage.data.moon),
    "motorcycle": ("motorcycle_left.png", _left_view),
    "page": ("page.png", skimage.data.page),
    "retina": ("retina.jpg", skimage.data.retina),
    "rocket": ("rocket.jpg", skimage.data.rocket),
    "text": ("text.png", skimage.data.text),
}

# Photographs with long straight edges (mortar lines, text lines, page margins,
# buildings, a tripod, a garage), the hard case for a seam detector.
STRAIGHT_EDGE_PHOTOS = ("brick", "camera", "motorcycle", "page", "rocket", "text")


def _data_dir() -> Path:
    return Path(skimage.data.__file__).parent


def photo_names() -> list[str]:
    """Return the names of the bundled photographs, sorted."""
    data_dir = _data_dir()
    return sorted(
        name
        for name, (file_name, _) in _PHOTOS.items()
        if (data_dir / file_name).is_file()
    )


@cache
def _load_uint8(name: str) -> np.ndarray:
    if name not in _PHOTOS:
        raise KeyError(f"unknown photograph {name!r}; available: {photo_names()}")
    file_name, loader = _PHOTOS[name]
    if not (_data_dir() / file_name).is_file():
        raise FileNotFoundError(
            f"photograph {name!r} is not bundled with this scikit-image "
            f"({file_name} missing); it would need a download"
        )
    return loader()


def load_photo(name: str) -> np.ndarray:
    """Load photograph `name` as (H, W, 3) float32 RGB in [0, 1].

    Greyscale photographs are replicated to three channels. Each call returns a new
    array, so callers may modify it. Raises KeyError for an unknown name.
    """
    samples = _load_uint8(name)
    if samples.ndim == 2:
        samples = np.repeat(samples[..., None], 3, axis=2)
    return samples[..., :3].astype(np.float32) / 255.0
