"""Chat completions request bodies: images as data URIs, the rubric, the repair turn.

Images travel as `data:<media type>;base64,...` URIs inside `image_url` content
parts. The media type is the format Pillow detects from the bytes, never the file
suffix. PNG, JPEG and WebP files within the size limit are sent byte for byte, and
anything else (other formats, a larger long side, an EXIF rotation) is decoded and
re-encoded first, JPEG as JPEG and everything else as PNG.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from renderqa.core.errors import ImageReadError
from renderqa.core.imageio import DEFAULT_MAX_PIXELS
from renderqa.core.vlm_rubric import SCHEMA_NAME, Rubric, verdict_json_schema

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXIF_ORIENTATION_TAG = 0x0112
JPEG_QUALITY = 92


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to send: media type, payload bytes and sizes before and after."""

    path: Path
    sha256: str  # of the file as read, so a changed file is scored again
    media_type: str
    data: bytes
    width: int  # of the payload
    height: int
    original_width: int
    original_height: int

    @property
    def data_uri(self) -> str:
        return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode()}"


def encode_image(path: str | os.PathLike[str], max_side: int) -> EncodedImage:
    """Read an image file and return it as a payload whose long side is <= `max_side`.

    Raises ImageReadError for a missing, empty or undecodable file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read file ({error.strerror})") from None
    if not raw:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise ImageReadError(f"{path}: {width}x{height} is above the pixel limit")
        image.load()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None

    sha256 = hashlib.sha256(raw).hexdigest()
    rotated = image.getexif().get(EXIF_ORIENTATION_TAG, 1) not in (1, None)
    if image.format in MEDIA_TYPES and max(width, height) <= max_side and not rotated:
        return EncodedImage(
            path, sha256, MEDIA_TYPES[image.format], raw, width, height, width, height
        )
    media_type, data, size = _reencode(image, max_side)
    return EncodedImage(path, sha256, media_type, data, *size, width, height)


def _reencode(image: Image.Image, max_side: int) -> tuple[str, bytes, tuple[int, int]]:
    """Rotate upright, shrink so the long side fits `max_side` (Lanczos) and encode."""
    as_jpeg = image.format == "JPEG"
    image = ImageOps.exif_transpose(image)
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        # Pillow's convert() clips 16-bit samples at 255 instead of scaling them.
        samples = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(samples), 0, 255).astype(np.uint8))
    if image.mode not in {"RGB", "RGBA", "L", "LA"}:
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha and not as_jpeg else "RGB")
    if as_jpeg and image.mode != "RGB":
        image = image.convert("RGB")

    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)

    buffer = io.BytesIO()
    if as_jpeg:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    media_type = MEDIA_TYPES["JPEG" if as_jpeg else "PNG"]
    return media_type, buffer.getvalue(), image.size


def build_chat_body(
    model: str,
    render: EncodedImage,
    rubric: Rubric,
    source: EncodedImage | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Build a chat completions body asking `model` for a verdict on `render`."""
    criteria = "\n".join(f"- {c.name}: {c.question}" for c in rubric.criteria)
    content: list[dict[str, Any]] = [
        {
            "type": "text",
            "text": "Judge the render against these criteria and reply with the "
            f"verdict as JSON only.\n{criteria}\nThe first image is the render.",
        },
        {"type": "image_url", "image_url": {"url": render.data_uri}},
    ]
    if source is not None:
        content.append(
            {
                "type": "text",
                "text": "The next image is the source the render must match; judge "
                "colour drift of the render against it.",
            }
        )
        content.append({"type": "image_url", "image_url": {"url": source.data_uri}})

    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": rubric.instructions},
            {"role": "user", "content": content},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": SCHEMA_NAME,
                "strict": True,
                "schema": verdict_json_schema(rubric),
            },
        },
    }
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        # NOTE: this is the older field. OpenAI's reasoning models expect
        # `max_completion_tokens` instead, so leave --max-tokens unset for them.
        body["max_tokens"] = max_tokens
    return body


def build_repair_body(
    body: dict[str, Any], reply: str | None, problem: str
) -> dict[str, Any]:
    """Extend a request with the invalid reply and one request to correct it."""
    repaired = dict(body)
    repaired["messages"] = [
        *body["messages"],
        {"role": "assistant", "content": reply or ""},
        {
            "role": "user",
            "content": f"That reply is not a valid verdict: {problem}. Reply again "
            "with only the complete JSON object that matches the schema.",
        },
    ]
    return repaired
