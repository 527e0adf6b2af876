"""The `upscale` subcommand: tiled, feathered upscaling with any spandrel model."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.atomic import check_output_folder
from renderqa.core.blend import BLEND_WINDOWS, get_ramp
from renderqa.core.devices import DTYPE_CHOICES, dtype_name, resolve_device
from renderqa.core.errors import InvalidInputError, RenderQAError
from renderqa.core.imageio import DEFAULT_MAX_PIXELS, check_max_pixels, load_image
from renderqa.core.tiling import check_tile_plan
from renderqa.core.upscale import TileSettings, check_settings
from renderqa.core.upscale_image import (
    OUTPUT_FORMATS,
    output_path,
    save_upscaled,
    upscale_image,
)
from renderqa.core.upscale_model import Upscaler, load_upscaler


def _check_options(
    tile: int, overlap: int, blend: str, tile_batch: int, dtype: str, fmt: str
) -> None:
    check_tile_plan(tile, overlap)
    get_ramp(blend)
    if tile_batch < 1:
        raise InvalidInputError(f"--tile-batch {tile_batch} must be at least 1 tile")
    if dtype.strip().lower() not in DTYPE_CHOICES:
        raise InvalidInputError(
            f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPE_CHOICES)}"
        )
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(
            f"--format {fmt!r} is unknown; use one of {', '.join(OUTPUT_FORMATS)}"
        )


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB on {device}"
    return f"{_peak_rss_bytes() / 2**20:.0f} MiB process RSS"


def _peak_rss_bytes() -> int:
    # On Linux ru_maxrss also keeps the peak of the image that exec replaced, so a
    # renderqa started from a large process (a Python test harness) would report
    # that process's peak. VmHWM counts this process's own memory only.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _upscale_one(
    path: Path,
    upscaler: Upscaler,
    settings: TileSettings,
    out: Path,
    fmt: str,
    max_pixels: int,
    metadata: dict,
    progress: Progress,
) -> tuple[Path, str]:
    image = load_image(path, max_pixels=max_pixels)
    task = progress.add_task(path.name, total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    def rename(stage: str) -> None:
        progress.update(task, description=f"{path.name} ({stage})", completed=0)

    result = upscale_image(image, upscaler, settings, progress=advance, stage=rename)
    target = output_path(path, out, upscaler.scale, fmt)
    save_upscaled(
        target,
        result,
        image.bit_depth,
        fmt,
        image.icc_profile,
        {**metadata, "source": path.name},
    )
    colour = result.passes[0]
    height, width = image.height * upscaler.scale, image.width * upscaler.scale
    summary = (
        f"{target}: {image.width}x{image.height} -> {width}x{height}, "
        f"{sum(p.tiles for p in result.passes)} tiles of {colour.tile} "
        f"(overlap {colour.overlap}), {sum(p.seconds for p in result.passes):.2f} s, "
        f"{sum(p.fp32_retries for p in result.passes)} redone in fp32"
    )
    return target, summary


@report_errors
def command(
    images: list[Path] = typer.Argument(..., help="Image files to upscale."),
    model: Path = typer.Option(
        ...,
        "--model",
        "-m",
        help="Upscaler checkpoint (.pth, .pt, .ckpt or .safetensors) of an "
        "architecture spandrel recognises (ESRGAN, Real-ESRGAN Compact, SwinIR, HAT...).",
    ),
    out: Path = typer.Option(Path("upscaled"), "--out", "-o", help="Output folder."),
    tile: int = typer.Option(512, help="Tile size in input pixels."),
    overlap: int = typer.Option(
        32, help="Overlap between neighbouring tiles in input pixels (under tile/2)."
    ),
    blend: str = typer.Option(
        "hann",
        help=f"Blend window over the overlap: {', '.join(BLEND_WINDOWS)}. 'none' "
        "cuts at the middle of the overlap with no blending: seam-free when the "
        "overlap is at least the model's receptive field, naive hard tiling with "
        "seams at --overlap 0.",
    ),
    tile_batch: int = typer.Option(
        1, "--tile-batch", help="Tiles sent to the model per call."
    ),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N, mps or cpu."),
    dtype: str = typer.Option(
        "auto",
        help="auto, fp32, fp16 or bf16; auto is fp16 (else bf16) on a GPU when the "
        "architecture supports it, fp32 on the CPU.",
    ),
    channels_last: bool = typer.Option(
        False, "--channels-last", help="Run convolutions in NHWC memory layout."
    ),
    fmt: str = typer.Option(
        "png", "--format", help=f"Output format: {', '.join(OUTPUT_FORMATS)}."
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS,
        "--max-pixels",
        help="Reject input images with more pixels than this (decompression bombs).",
    ),
) -> None:
    """Upscale images in feathered tiles so memory stays bounded at any size."""
    _check_options(tile, overlap, blend, tile_batch, dtype, fmt)
    check_max_pixels(max_pixels)
    check_output_folder(out, "--out")
    settings = TileSettings(
        tile=tile, overlap=overlap, blend=blend, tile_batch=tile_batch
    )
    torch_device = resolve_device(device)
    upscaler = load_upscaler(model, torch_device, dtype, channels_last)
    check_settings(settings, upscaler)
    metadata = {
        "model": model.name,
        "architecture": upscaler.name,
        "scale": upscaler.scale,
        "tile": tile,
        "overlap": overlap,
        "blend": blend,
        "dtype": dtype_name(upscaler.dtype),
        "channels_last": channels_last,
    }

    # The same file named twice (a glob and a path, say) is upscaled once.
    unique = {path.resolve(): path for path in reversed(images)}
    images = [path for path in images if unique.get(path.resolve()) is path]
    failed_codes = []
    written = 0
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
    ) as progress:
        for path in images:
            try:
                _target, summary = _upscale_one(
                    path, upscaler, settings, out, fmt, max_pixels, metadata, progress
                )
            except RenderQAError as error:
                stderr_console.print(
                    f"[bold red]error:[/] {error}",
                    markup=True,
                    highlight=False,
                    soft_wrap=True,
                )
                failed_codes.append(error.exit_code)
                continue
            written += 1
            stdout_console.print(summary, highlight=False, soft_wrap=True)

    stdout_console.print(
        f"{written} of {len(images)} image(s) upscaled x{upscaler.scale} with "
        f"{upscaler.name} into {out}; "
        f"peak memory {_peak_memory(torch_device)}",
        highlight=False,
        soft_wrap=True,
    )
    if failed_codes:
        raise typer.Exit(max(failed_codes))
