"""Benchmark tiled upscaling: overlap cost, memory growth and seams by blend window.

    .venv/bin/python tests/benchmarks/bench_upscale.py [--quick] [--section NAME]

1. Time: process CPU time of tiled upscaling with the trained fixture (Compact x2) on
   a 512x512 photograph, for several tiles and overlaps, after one warm-up run each.
   The configurations run interleaved in a shuffled order each round, so a slow spell
   on a shared CPU hits them all. Each median is compared with the pixel ratio (the
   sum of tile areas over the image area) twice: against the single pass, and against
   the same tile size with overlap 0, which has the same per-pixel cost in cache.
   The target is a time ratio within 5% of the pixel ratio.
2. Memory: peak process RSS of `upscale_array` for a 4096x4096 output against a
   1024x1024 one (the exact nearest x4 checkpoint, tile 256, overlap 16), each in a
   fresh subprocess. The canvas is the (H, W, 3) float32 array that accumulates the
   tiles and is returned as the result, the only array of output size that
   `upscale_array` makes. The target is peak growth no larger than the 4096x4096
   canvas. The input grows too (by 11 MiB as float32) and is printed separately.
   The same figures for the whole `renderqa upscale` command, PNG in and out, for an
   8-bit RGB, an 8-bit RGBA (alpha not constant) and a 16-bit RGB noise image; each
   run is a fresh process that reports its own VmHWM.
3. Seams: PSNR of the tiled output against the single pass, and the seams that
   `renderqa.core.seams` finds at the tile plan's boundaries, for each blend window
   at overlap 8, for hard tiles (`none`, overlap 0), and for `hann` and `none` at
   overlap 16 on the same photographs.
If CUDA is available, fp16, bf16 and channels-last speed-ups are measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from PIL import Image

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


def interleaved_medians(runs: dict, rounds: int) -> dict:
    """Return each run's median process CPU seconds over `rounds` shuffled rounds.

    Every run goes once before timing starts, so lazy initialisation and first-touch
    page faults are not counted.
    """
    for run in runs.values():
        run()
    times = {key: [] for key in runs}
    order = list(runs)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            start = time.process_time()
            runs[key]()
            times[key].append(time.process_time() - start)
    return {key: float(np.median(values)) for key, values in times.items()}


TIME_PLANS = [(128, 0), (128, 8), (128, 16), (128, 32), (256, 0), (256, 32)]


def bench_time(quick: bool) -> None:
    upscaler = load_upscaler(TRAINED_WEIGHTS, torch.device("cpu"))
    pixels = load_photo("astronaut")[:512, :512]
    height, width = pixels.shape[:2]
    plans = [(1024, 0), *TIME_PLANS]
    runs = {
        plan: lambda s=TileSettings(tile=plan[0], overlap=plan[1]): upscale_array(
            pixels, upscaler, s
        )
        for plan in plans
    }
    rounds = 3 if quick else 11
    medians = interleaved_medians(runs, rounds)
    single = medians[(1024, 0)]
    print(
        f"\n1. CPU time, {width}x{height} -> x2, median of {rounds} interleaved "
        f"rounds; single pass {single:.3f} s"
    )
    print(
        f"{'tile':>5} {'overlap':>8} {'seconds':>8} {'pixel ratio':>12} "
        f"{'vs single':>10} {'excess':>8} {'vs overlap 0':>13} {'excess':>8}"
    )
    for tile, overlap in TIME_PLANS:
        seconds = medians[(tile, overlap)]
        ratio = pixel_ratio(height, width, tile, overlap)
        hard = medians[(tile, 0)] * ratio / pixel_ratio(height, width, tile, 0)
        print(
            f"{tile:>5} {overlap:>8} {seconds:8.3f} {ratio:12.3f} "
            f"{seconds / single:10.3f} {seconds / single / ratio - 1:+8.1%} "
            f"{seconds / medians[(tile, 0)]:13.3f} {seconds / hard - 1:+8.1%}"
        )


_MEMORY_CHILD = """
import json, sys, numpy as np, torch
from renderqa.core.upscale import TileSettings, upscale_array
from renderqa.core.upscale_model import load_upscaler
side = int(sys.argv[2])
upscaler = load_upscaler(sys.argv[1], torch.device("cpu"))
pixels = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
def peak_kib():
    # VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the peak of the benchmark
    # process that started this one.
    with open("/proc/self/status") as status:
        return next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
before = peak_kib()
upscale_array(pixels, upscaler, TileSettings(tile=256, overlap=16))
after = peak_kib()
print(json.dumps({"before_kib": before, "after_kib": after}))
"""

SIDES = (256, 1024)


def canvas_mib(side: int) -> float:
    """Return the MiB of the (H, W, 3) float32 canvas for a side x side output."""
    return side * side * 3 * 4 / 2**20


def core_peak_mib(model: Path, side: int, env: dict | None = None) -> float:
    """Return the peak RSS of a subprocess that upscales a side x side array."""
    completed = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(model), str(side)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    peaks = json.loads(completed.stdout.strip().splitlines()[-1])
    return peaks["after_kib"] / 1024


def write_noise_png(folder: Path, side: int, kind: str) -> Path:
    """Write a side x side noise PNG: `rgb` and `rgba` 8-bit, `rgb16` 16-bit."""
    rng = np.random.default_rng(side)
    path = folder / f"noise-{kind}-{side}.png"
    if kind == "rgb16":
        samples = rng.integers(0, 65536, (side, side, 3), dtype=np.uint16)
        path.write_bytes(imagecodecs.png_encode(samples))
    else:
        channels = 4 if kind == "rgba" else 3
        samples = rng.integers(0, 256, (side, side, channels), dtype=np.uint8)
        Image.fromarray(samples).save(path)
    return path


def command_peak_mib(
    model: Path, image: Path, folder: Path, env: dict | None = None
) -> float:
    """Run `renderqa upscale` on `image` in a fresh process; return its peak RSS.

    The command reports VmHWM, its own peak resident memory, on Linux.
    """
    completed = subprocess.run(
        [sys.executable, "-m", "renderqa.cli", "upscale", str(image)]
        + ["--model", str(model), "--tile", "256", "--overlap", "16"]
        + ["--out", str(folder / "out"), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    found = re.search(r"peak memory (\d+) MiB process RSS", completed.stdout)
    if found is None:
        raise RuntimeError(f"no peak memory in the output:\n{completed.stdout}")
    return float(found.group(1))


# glibc raises its mmap threshold after a large block is freed, so later tile
# buffers come from a heap that fragments, and the peak of identical runs varies by
# tens of MiB. A fixed threshold returns every tile buffer to the OS on free.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def bench_memory(quick: bool) -> None:
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        model = write_nearest_checkpoint(folder / "nearest-x4.safetensors", 4)
        core, fixed = {}, {}
        for side in SIDES:
            core[side] = [core_peak_mib(model, side) for _ in range(repeats)]
            fixed[side] = core_peak_mib(model, side, FIXED_MMAP_THRESHOLD)

    def median(values: list[float]) -> float:
        return float(np.median(values))

    small, large = (side * 4 for side in SIDES)
    print(f"\n2. peak RSS (nearest x4, tile 256, overlap 16), MiB, median of {repeats}")
    for side in SIDES:
        out = side * 4
        print(
            f"output {out}x{out}: upscale_array {median(core[side]):.0f} "
            f"({min(core[side]):.0f} to {max(core[side]):.0f}; "
            f"{fixed[side]:.0f} with a fixed mmap threshold), "
            f"canvas {canvas_mib(out):.0f}"
        )
    inputs = (SIDES[1] ** 2 - SIDES[0] ** 2) * 3 * 4 / 2**20
    print(
        f"growth {small} -> {large} output: upscale_array "
        f"{median(core[SIDES[1]]) - median(core[SIDES[0]]):.0f} "
        f"({fixed[SIDES[1]] - fixed[SIDES[0]]:.0f} with a fixed mmap threshold); "
        f"{large}x{large} canvas {canvas_mib(large):.0f}, canvas growth "
        f"{canvas_mib(large) - canvas_mib(small):.0f}, float32 input growth "
        f"{inputs:.0f}"
    )


COMMAND_KINDS = ("rgb", "rgba", "rgb16")


def bench_command_memory(quick: bool) -> None:
    repeats = 1 if quick else 3
    peaks = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        model = write_nearest_checkpoint(folder / "nearest-x4.safetensors", 4)
        for kind in COMMAND_KINDS:
            for side in SIDES:
                image = write_noise_png(folder, side, kind)
                peaks[kind, side] = [
                    command_peak_mib(model, image, folder) for _ in range(repeats)
                ]
                fixed = command_peak_mib(model, image, folder, FIXED_MMAP_THRESHOLD)
                peaks[f"{kind}, fixed mmap threshold", side] = [fixed]

    small, large = (side * 4 for side in SIDES)
    print(
        f"\n2b. renderqa upscale peak RSS (VmHWM; nearest x4, tile 256, overlap 16, "
        f"PNG in and out), MiB, median of {repeats} fresh processes"
    )
    print(
        f"{'input':>29} {f'{small}x{small}':>12} {f'{large}x{large}':>12} "
        f"{'growth':>7}   runs at {large}x{large}"
    )
    for kind in dict.fromkeys(key for key, _ in peaks):
        low, high = (float(np.median(peaks[kind, side])) for side in SIDES)
        runs = ", ".join(f"{value:.0f}" for value in peaks[kind, SIDES[1]])
        print(f"{kind:>29} {low:12.0f} {high:12.0f} {high - low:7.0f}   {runs}")
    inputs = (SIDES[1] ** 2 - SIDES[0] ** 2) * 3 * 4 / 2**20
    print(
        f"{large}x{large} canvas {canvas_mib(large):.0f} MiB; float32 input growth "
        f"{inputs:.0f} MiB (RGB; RGBA adds a third for alpha)"
    )


def bench_seams(quick: bool) -> None:
    try:
        from renderqa.core.seams import TilePlan, find_seams
    except ImportError:
        print("\n3. seams: renderqa.core.seams is not available; PSNR only")
        find_seams = None
    upscaler = load_upscaler(TRAINED_WEIGHTS, torch.device("cpu"))
    tile = 64
    # Overlap 16 is past the fixture's receptive field of 13 input pixels, where
    # `none` should match the single pass.
    runs = [("none", 0), *((blend, 8) for blend in BLEND_WINDOWS)]
    runs += [("hann", 16), ("none", 16)]
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


SECTIONS = {
    "time": bench_time,
    "memory": bench_memory,
    "command-memory": bench_command_memory,
    "seams": bench_seams,
    "gpu": lambda quick: bench_gpu(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and photos")
    parser.add_argument(
        "--section",
        action="append",
        choices=list(SECTIONS),
        help="run only this section (repeatable); default: all",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    for section in args.section or SECTIONS:
        SECTIONS[section](args.quick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nbenchmark process peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
