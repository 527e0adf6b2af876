"""Output canvases whose memory can go back to the operating system row by row.

A canvas is a C-contiguous array in its own anonymous memory map. An image can be
converted block by block into a smaller array, for example quantised to 8 or 16
bits for saving. `discard_rows` then returns the pages of the rows already converted,
so the float canvas shrinks while the converted copy grows. The process's peak
memory stays near the canvas's own size.
"""

from __future__ import annotations

import mmap

import numpy as np


def zeros_canvas(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Allocate a zero-filled C-contiguous array in its own anonymous memory map.

    The operating system zero-fills the pages on first touch, as calloc does for the
    large blocks behind `np.zeros`, so an untouched canvas costs no resident memory.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    if hasattr(mmap, "MAP_PRIVATE"):
        # Python maps anonymous memory shared by default, and madvise on shared
        # memory only unmaps the pages from this process without freeing them.
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    else:
        buffer = mmap.mmap(-1, nbytes)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def discard_rows(array: np.ndarray, rows: int) -> None:
    """Return the memory pages of `array`'s first `rows` rows to the operating system.

    The contents of those rows are undefined afterwards (zero on Linux), so call
    this only on a canvas that nothing reads again. Only whole pages are returned,
    so part of the row at the boundary stays resident. Does nothing for an array
    that `zeros_canvas` did not allocate (a slice of one included) and where
    madvise is not available (Windows).
    """
    buffer = _canvas_buffer(array)
    if buffer is None or rows <= 0:
        return
    row_bytes = array.nbytes // len(array)
    end = min(rows, len(array)) * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
    if end > 0:
        buffer.madvise(mmap.MADV_DONTNEED, 0, end)


def _canvas_buffer(array: np.ndarray) -> mmap.mmap | None:
    """Return the memory map behind a whole canvas, or None for any other array."""
    if not hasattr(mmap, "MADV_DONTNEED") or not array.flags.c_contiguous:
        return None
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    # A canvas covers its whole map, so a view of the same size starts at offset 0.
    if not isinstance(base, mmap.mmap) or len(base) != array.nbytes:
        return None
    return base
