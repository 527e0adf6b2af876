"""Reading images into float arrays and writing PNGs atomically with metadata.

Arrays are (H, W, C) float32 in [0, 1], sRGB as stored in the file (no colour
management); C is 3 for colour and 1 for greyscale. Alpha is kept apart because
models see three channels.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from renderqa.core.atomic import atomic_path
from renderqa.core.canvas import discard_rows
from renderqa.core.errors import ImageReadError, InvalidInputError

# Pillow's own default limit (about 89.5 megapixels) warns rather than fails below
# twice that; renderqa fails at the limit so a decompression bomb never decodes.
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclass
class LoadedImage:
    """An image file decoded to float arrays, with what is needed to write it back."""

    path: Path
    pixels: np.ndarray  # (H, W, 3) or (H, W, 1) float32 in [0, 1]
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1], or None
    bit_depth: int  # 8 or 16: the precision of the source samples
    mode: str  # Pillow mode of the file before conversion
    icc_profile: bytes | None
    info: dict

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def check_max_pixels(max_pixels: int) -> None:
    """Raise InvalidInputError unless the --max-pixels value is at least 1."""
    if max_pixels < 1:
        raise InvalidInputError(f"--max-pixels {max_pixels} must be at least 1 pixel")


@contextmanager
def open_image(
    path: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Image.Image]:
    """Open an image file for reading, with the checks every reader of user files needs.

    Raises ImageReadError for a missing or zero-byte file, for an image above
    `max_pixels` (checked from the header, before decoding), and for any Pillow or
    imagecodecs decode failure inside the `with` block. The file is closed on exit.
    """
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"{path}: {width}x{height} is above the limit of {max_pixels} "
                        "pixels (a possible decompression bomb); raise --max-pixels "
                        "if the file is trusted"
                    )
                yield image
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file Pillow can read") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        imagecodecs.PngError,
    ) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None
    except Image.DecompressionBombWarning as error:
        raise ImageReadError(
            f"{path}: rejected as a decompression bomb ({error})"
        ) from None


def load_image(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Decode an image file, apply its EXIF orientation and split off alpha.

    Raises ImageReadError for a missing, zero-byte, truncated or non-image file, and
    for an image above `max_pixels` (checked from the header, before decoding).
    """
    path = Path(path)
    with open_image(path, max_pixels) as image:
        wide_colour = is_16bit_colour_png(image)
        image.load()
        if wide_colour:
            return _load_16bit_colour_png(path, image)
        return _to_loaded_image(path, image)


def is_16bit_colour_png(image: Image.Image) -> bool:
    """Tell whether Pillow would truncate this PNG's 16-bit RGB(A) samples to 8 bits."""
    if image.format != "PNG" or image.mode not in {"RGB", "RGBA"} or not image.tile:
        return False
    rawmode = image.tile[0].args
    return isinstance(rawmode, str) and rawmode.endswith(";16B")


# EXIF orientation tag value -> the numpy transform that displays the image upright,
# matching Pillow's ImageOps.exif_transpose.
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _load_16bit_colour_png(path: Path, image: Image.Image) -> LoadedImage:
    """Decode a 16-bit RGB(A) PNG at full precision with imagecodecs.

    Pillow has no 16-bit colour mode, so it keeps only the high byte; Pillow still
    supplies the ICC profile, text chunks and EXIF orientation.
    """
    samples = imagecodecs.png_decode(path.read_bytes())
    orientation = image.getexif().get(0x0112, 1)
    samples = _ORIENTATIONS.get(orientation, lambda a: a)(samples)
    values = samples.astype(np.float32) / 65535.0
    alpha = values[..., 3] if values.shape[2] == 4 else None
    return LoadedImage(
        path=path,
        pixels=np.ascontiguousarray(values[..., :3]),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        bit_depth=16,
        mode=f"{image.mode};16",
        icc_profile=image.info.get("icc_profile"),
        info=dict(image.info),
    )


def _to_loaded_image(path: Path, image: Image.Image) -> LoadedImage:
    mode = image.mode
    icc_profile = image.info.get("icc_profile")
    info = dict(image.info)
    image = ImageOps.exif_transpose(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in {"1", "CMYK", "YCbCr", "LAB", "HSV"}:
        image = image.convert("RGB")
    elif mode == "PA":
        image = image.convert("RGBA")

    alpha = None
    bit_depth = 8
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        samples = np.asarray(image, dtype=np.float64)
        pixels = (np.clip(samples, 0, 65535) / 65535.0)[..., None]
        bit_depth = 16
    elif image.mode == "F":
        pixels = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
        bit_depth = 16
    else:
        if image.mode in {"RGBA", "LA"}:
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
            image = image.convert("RGB" if image.mode == "RGBA" else "L")
        samples = np.asarray(image, dtype=np.float32) / 255.0
        pixels = samples[..., None] if samples.ndim == 2 else samples
    return LoadedImage(
        path=path,
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        alpha=alpha,
        bit_depth=bit_depth,
        mode=mode,
        icc_profile=icc_profile,
        info=info,
    )


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Quantise [0, 1] floats to uint8 with round-half-to-even, clipping out-of-range."""
    return _quantize(pixels, np.uint8)


# Elements quantised at a time, so that quantising a large image allocates no
# float temporaries of the image's size.
QUANTIZE_BLOCK = 2**20


def _quantize(pixels: np.ndarray, dtype: type) -> np.ndarray:
    """Map [0, 1] to the full range of the unsigned integer `dtype`."""
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float64)
    if pixels.ndim == 0 or pixels.size == 0:
        peak = float(np.iinfo(dtype).max)
        return np.round(np.clip(pixels, 0.0, 1.0) * peak).astype(dtype)
    samples = np.empty(pixels.shape, dtype=dtype)
    quantize_into(pixels, samples)
    return samples


def quantize_into(
    pixels: np.ndarray, out: np.ndarray, discard_source: bool = False
) -> None:
    """Quantise float `pixels` in [0, 1] into `out`, a uint8 or uint16 array.

    `out` has the shape of `pixels` and may be a strided view (one channel of a
    larger array). Values are clipped to [0, 1], scaled to the dtype's maximum and
    rounded half to even, a block of rows (first axis) at a time. With
    `discard_source`, each block's rows go back to the operating system once read
    (see `renderqa.core.canvas.discard_rows`), so `pixels` must not be read again.
    """
    if pixels.size == 0:
        return
    peak = float(np.iinfo(out.dtype).max)
    rows = max(1, QUANTIZE_BLOCK // (pixels.size // len(pixels)))
    for top in range(0, len(pixels), rows):
        block = np.clip(pixels[top : top + rows], 0.0, 1.0)
        block *= peak
        out[top : top + rows] = np.round(block, out=block)
        if discard_source:
            discard_rows(pixels, top + rows)


def save_png(
    path: str | os.PathLike[str],
    image: Image.Image,
    text: dict[str, str] | None = None,
    icc_profile: bytes | None = None,
) -> None:
    """Write `image` as a PNG atomically, with tEXt/iTXt chunks from `text`.

    Pillow writes no timestamp chunk, so the same pixels and text give the same bytes.
    """
    metadata = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        if value.isascii():
            metadata.add_text(key, value)
        else:
            metadata.add_itxt(key, value)
    with atomic_path(path) as tmp_path:
        image.save(tmp_path, format="PNG", pnginfo=metadata, icc_profile=icc_profile)


def to_uint16(pixels: np.ndarray) -> np.ndarray:
    """Quantise [0, 1] floats to uint16 with round-half-to-even, clipping out-of-range."""
    return _quantize(pixels, np.uint16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    checksum = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def save_png16(
    path: str | os.PathLike[str],
    samples: np.ndarray,
    text: dict[str, str] | None = None,
    icc_profile: bytes | None = None,
) -> None:
    """Write (H, W, C) uint16 samples as a 16-bit PNG atomically, C in 1 to 4.

    Pillow cannot write 16-bit colour, so the chunks are written here: IHDR, iCCP,
    tEXt/iTXt, one IDAT with filter type 0 on every row, IEND. The image data is
    converted and compressed a block of rows at a time, so no full-size copy of
    the samples or of the compressed stream is made.
    """
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if icc_profile is not None:
        chunks.append(
            _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc_profile))
        )
    for key, value in (text or {}).items():
        if value.isascii():
            chunks.append(_png_chunk(b"tEXt", f"{key}\0{value}".encode("latin-1")))
        else:
            chunks.append(
                _png_chunk(
                    b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode()
                )
            )
    with atomic_path(path) as tmp_path, open(tmp_path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
        _write_idat(handle, samples)
        handle.write(_png_chunk(b"IEND", b""))


def _write_idat(handle: BinaryIO, samples: np.ndarray) -> None:
    """Write one IDAT chunk of big-endian scanlines with filter type 0.

    The chunk's length comes before its data, so a placeholder is written first
    and replaced once the compressed size is known.
    """
    start = handle.tell()
    handle.write(b"\0\0\0\0IDAT")
    checksum = zlib.crc32(b"IDAT")
    length = 0
    for data in _compressed_scanlines(samples):
        handle.write(data)
        checksum = zlib.crc32(data, checksum)
        length += len(data)
    handle.write(struct.pack(">I", checksum))
    end = handle.tell()
    handle.seek(start)
    handle.write(struct.pack(">I", length))
    handle.seek(end)


def _compressed_scanlines(samples: np.ndarray) -> Iterator[bytes]:
    """Yield the zlib stream (level 6) of the samples' scanlines, a block at a time.

    With no flush between compress() calls, zlib 1.2.13 gives the same stream as
    one zlib.compress(scanlines, 6) call on the whole image, as earlier versions of
    this function made. zlib does not promise that, so a test compares the two.
    """
    height, width, channels = samples.shape
    row_bytes = 1 + width * channels * 2
    rows = max(1, QUANTIZE_BLOCK // row_bytes)  # about 1 MiB of scanlines a block
    compressor = zlib.compressobj(6)
    for top in range(0, height, rows):
        block = samples[top : top + rows].astype(">u2")
        block = block.reshape(len(block), width * channels)
        scanlines = np.zeros((len(block), row_bytes), dtype=np.uint8)
        scanlines[:, 1:] = block.view(np.uint8)
        yield compressor.compress(scanlines)
    yield compressor.flush()


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the tEXt/iTXt chunks of a PNG as a dict."""
    with Image.open(path) as image:
        return dict(getattr(image, "text", {}))


def read_json_chunk(path: str | os.PathLike[str], key: str) -> dict | None:
    """Return the JSON object stored in PNG text chunk `key`, or None if absent."""
    raw = read_png_text(path).get(key)
    return None if raw is None else json.loads(raw)
