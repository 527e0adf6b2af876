"""Benchmark tiled upscaling: overlap cost, memory growth and seams by blend window.

    .venv/bin/python tests/benchmarks/bench_upscale.py [--quick]

1. Time: tiled against single-pass time with the trained fixture (Compact x2) on a
   photograph that fits in one pass, for several overlaps, next to the pixel
   overhead the overlap implies (the sum of tile areas over the image area). The
   target is a time ratio within 5% of that pixel ratio.
2. Memory: peak process RSS for a 4096x4096 output against a 1024x1024 one (the
   exact nearest x4 checkpoint, tile 256), each in a fresh subprocess. The growth is
   compared with that of the float64 canvas and the float32 result, and the target
   is growth no larger than theirs.
3. Seams: PSNR of the tiled output against the single pass, and the seams that
   `renderqa.core.seams` finds at the tile plan's boundaries, for each blend window
   (overlap 8) and for hard tiles (overlap 0) on the same photographs.
If CUDA is available, fp16, bf16 and channels-last speed-ups are measured too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Run as a script from anywhere: `fixtures` and `tests` live at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixtures.make_upscaler import (  # noqa: E402
    TRAINED_WEIGHTS,
    write_nearest_checkpoint,
)
from renderqa.core.blend import BLEND_WINDOWS  # noqa: E402
from renderqa.core.tiling import tile_starts  # noqa: E402
from renderqa.core.upscale import TileSettings, upscale_array  # noqa: E402
from renderqa.core.upscale_model import load_upscaler  # noqa: E402
from tests.photos import load_photo  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def pixel_ratio(height: int, width: int, tile: int, overlap: int) -> float:
    """Return the pixels the model processes over the image's pixels."""
    rows = len(tile_starts(height, tile, overlap)) * min(tile, height)
    cols = len(tile_starts(width, tile, overlap)) * min(tile, width)
    return rows * cols / (height * width)


def median_time(run, repeats: int, clock=time.process_time) -> float:
    """Return the median seconds of `run` on `clock`.

    The CPU benchmarks use process CPU time with one thread, because wall time on
    a CPU shared with other jobs, and the spin-waits of idle worker threads, vary
    by more than the overheads measured here.
    """
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return float(np.median(times))


def bench_time(quick: bool) -> None:
    upscaler = load_upscaler(TRAINED_WEIGHTS, torch.device("cpu"))
    pixels = load_photo("astronaut")[:384, :384]
    height, width = pixels.shape[:2]
    repeats = 3 if quick else 5
    single = median_time(
        lambda: upscale_array(pixels, upscaler, TileSettings(tile=1024, overlap=0)),
        repeats,
    )
    print(f"\n1. CPU time, {width}x{height} -> x2, single pass {single:.3f} s (median)")
    print(
        f"{'tile':>5} {'overlap':>8} {'time ratio':>11} {'pixel ratio':>12} {'excess':>8}"
    )
    for tile, overlap in [(128, 0), (128, 8), (128, 16), (128, 32), (192, 32)]:
        settings = TileSettings(tile=tile, overlap=overlap)
        tiled = median_time(
            lambda s=settings: upscale_array(pixels, upscaler, s), repeats
        )
        ratio = pixel_ratio(height, width, tile, overlap)
        excess = (tiled / single) / ratio - 1
        print(
            f"{tile:>5} {overlap:>8} {tiled / single:11.3f} {ratio:12.3f} {excess:+8.1%}"
        )


_MEMORY_CHILD = """
import json, resource, sys, numpy as np, torch
from renderqa.core.upscale import TileSettings, upscale_array
from renderqa.core.upscale_model import load_upscaler
side = int(sys.argv[2])
upscaler = load_upscaler(sys.argv[1], torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
upscale_array(pixels, upscaler, TileSettings(tile=256, overlap=16))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def bench_memory() -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = write_nearest_checkpoint(Path(folder) / "nearest-x4.safetensors", 4)
        peaks = {}
        for side in (256, 1024):
            completed = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, str(model), str(side)],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[side] = json.loads(completed.stdout.strip().splitlines()[-1])
    growth = (peaks[1024]["after_kib"] - peaks[256]["after_kib"]) / 1024
    # The (H, W, 3) float64 canvas plus the float32 result.
    canvas = lambda out: out * out * (3 * 8 + 3 * 4) / 2**20  # noqa: E731
    print("\n2. peak RSS (nearest x4, tile 256, overlap 16), MiB")
    for side in (256, 1024):
        out = side * 4
        print(
            f"output {out}x{out}: peak {peaks[side]['after_kib'] / 1024:.0f}, "
            f"model loaded {peaks[side]['before_kib'] / 1024:.0f}, "
            f"canvas+result {canvas(out):.0f}"
        )
    extra = canvas(4096) - canvas(1024)
    print(
        f"growth 1024 -> 4096 output: {growth:.0f} MiB; canvas growth {extra:.0f} MiB"
    )


def bench_seams(quick: bool) -> None:
    try:
        from renderqa.core.seams import TilePlan, find_seams
    except ImportError:
        print("\n3. seams: renderqa.core.seams is not available; PSNR only")
        find_seams = None
    upscaler = load_upscaler(TRAINED_WEIGHTS, torch.device("cpu"))
    tile = 64
    runs = [("none", 0)] + [(blend, 8) for blend in BLEND_WINDOWS]
    photos = PHOTOS[:2] if quick else PHOTOS
    print(f"\n3. seams, trained Compact x2, 256x192 crops, tile {tile}")
    print(f"{'blend':>8} {'overlap':>8} {'photo':>10} {'PSNR dB':>8} {'seams':>6}")
    for name in photos:
        pixels = load_photo(name)[:192, :256]
        single = upscale_array(pixels, upscaler, TileSettings(tile=1024, overlap=0))
        for blend, overlap in runs:
            settings = TileSettings(tile=tile, overlap=overlap, blend=blend)
            tiled = upscale_array(pixels, upscaler, settings).pixels
            seams = "-"
            if find_seams is not None:
                plan = TilePlan(tile=tile, overlap=overlap, scale=2)
                seams = str(len(find_seams(tiled, plan).seams))
            print(
                f"{blend:>8} {overlap:>8} {name:>10} "
                f"{psnr(tiled, single.pixels):8.2f} {seams:>6}"
            )


def bench_gpu() -> None:
    if not torch.cuda.is_available():
        print("\n4. GPU: CUDA not available; fp16, bf16 and channels-last not measured")
        return
    device = torch.device("cuda")
    pixels = np.tile(load_photo("astronaut"), (2, 2, 1))
    settings = TileSettings(tile=512, overlap=32, tile_batch=4)
    baseline = None
    print(f"\n4. GPU {torch.cuda.get_device_name(device)}, 1024x1024 -> x2")
    for dtype in ("fp32", "fp16", "bf16"):
        for channels_last in (False, True):
            upscaler = load_upscaler(TRAINED_WEIGHTS, device, dtype, channels_last)
            upscale_array(pixels, upscaler, settings)  # warm-up
            torch.cuda.synchronize()
            seconds = median_time(
                lambda u=upscaler: upscale_array(pixels, u, settings),
                5,
                clock=lambda: torch.cuda.synchronize() or time.perf_counter(),
            )
            baseline = baseline or seconds
            print(
                f"{dtype} channels_last={channels_last}: {seconds:.3f} s, "
                f"speed-up {baseline / seconds:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and photos")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    bench_time(args.quick)
    bench_memory()
    bench_seams(args.quick)
    bench_gpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nbenchmark process peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
