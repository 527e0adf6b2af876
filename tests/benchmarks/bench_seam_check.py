"""Benchmark seam-check: analysis time against PNG decode, --jobs, and detection counts.

    .venv/bin/python tests/benchmarks/bench_seam_check.py [--quick]

1. Per size (1024, 4096, 8192 square, a photograph upscaled with bicubic): the
   median time to decode the PNG with Pillow, and to analyse it the way the CLI
   does (Pillow "L" conversion plus `find_seams_in_luma`); the ratio is the target
   (analysis at most half the decode time at 4096). The float API `find_seams` on
   (H, W, 3) pixels is timed too.
2. Throughput of `check_file` over 8 PNGs of 2048 x 2048 with 1 and 2 threads and
   2 processes (images per second).
3. Detection counts on the bundled photographs: false seams on untiled 4K upscales
   (and on 2x upscales, the harder case), hard-tile boundaries found with and
   without the plan, and tone shifts found.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from renderqa.cli.seam_check import check_file  # noqa: E402
from renderqa.core.seams import (  # noqa: E402
    HORIZONTAL,
    VERTICAL,
    SeamSettings,
    TilePlan,
    find_seams,
    find_seams_in_luma,
)
from renderqa.core.tiling import hard_cut_positions  # noqa: E402
from tests.photos import load_photo, photo_names  # noqa: E402
from tests.test_seam_check import (  # noqa: E402
    RESAMPLERS,
    TILED_CASES,
    TONE_PHOTOS,
    missing,
    positions,
    quantise,
    resize,
    tiled_photo,
    upscale_photo,
)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sizes(sizes: list[int]) -> None:
    print("size   decode_s  analysis_s  ratio  float_api_s")
    photo = load_photo("astronaut")
    for size in sizes:
        rgb = np.round(resize(photo, size, size, RESAMPLERS[0]) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        data = buffer.getvalue()
        repeats = 3 if size <= 4096 else 1

        def decode(data=data) -> Image.Image:
            image = Image.open(io.BytesIO(data))
            image.load()
            return image

        image = decode()

        def analyse(image=image) -> None:
            find_seams_in_luma(np.asarray(image.convert("L")))

        pixels = rgb.astype(np.float32) / 255.0
        decode_s = median_seconds(decode, repeats)
        analysis_s = median_seconds(analyse, repeats)
        float_s = median_seconds(lambda pixels=pixels: find_seams(pixels), repeats)
        print(
            f"{size:5d}  {decode_s:8.3f}  {analysis_s:10.3f}  "
            f"{analysis_s / decode_s:5.2f}  {float_s:11.3f}"
        )


def _check(path: Path) -> str:
    return check_file(path, None, SeamSettings(), None).status


def bench_jobs(count: int, size: int) -> None:
    print(f"\n--jobs over {count} PNGs of {size}x{size}: images/s")
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, name in enumerate(photo_names()[:count]):
            resample = RESAMPLERS[index % len(RESAMPLERS)]
            rgb = resize(load_photo(name), size, size, resample)
            path = Path(folder) / f"{name}.png"
            Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(path)
            paths.append(path)
        baseline = None
        for label, executor_type, workers in (
            ("threads 1", ThreadPoolExecutor, 1),
            ("threads 2", ThreadPoolExecutor, 2),
            ("processes 2", ProcessPoolExecutor, 2),
        ):
            start = time.perf_counter()
            with executor_type(max_workers=workers) as executor:
                statuses = list(executor.map(_check, paths))
            rate = len(paths) / (time.perf_counter() - start)
            baseline = baseline or rate
            print(
                f"{label:12s} {rate:6.2f} images/s  x{rate / baseline:4.2f}  {statuses.count('clean')} clean"
            )


def bench_detection(quick: bool) -> None:
    names = photo_names()[:6] if quick else photo_names()
    print(f"\nfalse seams on untiled upscales ({len(names)} photographs)")
    for label, width_of in (
        ("4K (3840 wide)", lambda name: 3840),
        ("2x", lambda name: 2 * load_photo(name).shape[1]),
    ):
        false_seams, images_with = 0, []
        for index, name in enumerate(names):
            resample = RESAMPLERS[index % len(RESAMPLERS)]
            report = find_seams(upscale_photo(name, width_of(name), resample))
            false_seams += len(report.seams)
            if report.seams:
                images_with.append(f"{name}:{len(report.seams)}")
        print(
            f"  {label:15s} {false_seams} false seams; images: {images_with or 'none'}"
        )

    print("\nhard tiles (cases of tests/test_seam_check.py)")
    totals = {"expected": 0, "with plan": 0, "without plan": 0, "extra without plan": 0}
    for name, scale, tile, crop in TILED_CASES:
        output, image = tiled_photo(name, scale, tile, crop)
        with_plan = find_seams(output, TilePlan(tile=tile, scale=scale))
        without_plan = find_seams(output)
        for orientation, length in (
            (VERTICAL, image.shape[1]),
            (HORIZONTAL, image.shape[0]),
        ):
            expected = [c * scale for c in hard_cut_positions(length, tile, 0)]
            totals["expected"] += len(expected)
            found = positions(with_plan, orientation)
            totals["with plan"] += len(expected) - len(missing(expected, found))
            found = positions(without_plan, orientation)
            totals["without plan"] += len(expected) - len(missing(expected, found))
            totals["extra without plan"] += len(missing(found, expected))
    print("  " + ", ".join(f"{key}: {value}" for key, value in totals.items()))

    print("\ntone shift of one grey level per tile, 3840x2160")
    expected_total, found_total = 0, 0
    for index, name in enumerate(TONE_PHOTOS):
        tile = (384, 448, 512)[index % 3]
        image = resize(
            load_photo(name), 3840, 2160, RESAMPLERS[index % len(RESAMPLERS)]
        )
        rows, columns = np.mgrid[0:2160, 0:3840]
        shift = (rows // tile + columns // tile).astype(np.float32) / 255.0
        report = find_seams(quantise(image + shift[..., None]))
        for orientation, length in ((VERTICAL, 3840), (HORIZONTAL, 2160)):
            expected = list(range(tile, length - 8, tile))
            expected_total += len(expected)
            found_total += len(expected) - len(
                missing(expected, positions(report, orientation))
            )
    print(f"  found {found_total} of {expected_total} boundaries")


def bench_fixture_upscaler() -> None:
    """Count boundaries found in hard tiles from the trained Compact x2 fixture."""
    import torch

    from renderqa.core.tiling import seam_positions
    from renderqa.core.upscale import TileSettings, upscale_array
    from renderqa.core.upscale_model import load_upscaler

    weights = (
        Path(__file__).resolve().parents[2] / "fixtures/upscaler/compact-x2.safetensors"
    )
    if not weights.is_file():
        print(f"\nfixture upscaler: {weights} not found, skipped")
        return
    upscaler = load_upscaler(weights, torch.device("cpu"))
    cases = [
        ("chelsea", 0),
        ("brick", 7),
        ("text", 3),
        ("rocket", 11),
        ("astronaut", 20),
    ]
    cases.append(("camera", 5))
    settings = TileSettings(tile=64, overlap=0, blend="none")
    expected = {
        VERTICAL: seam_positions(256, 64, 0, 2),
        HORIZONTAL: seam_positions(192, 64, 0, 2),
    }
    counts = {"expected": 0, "with plan": 0, "without plan": 0, "extra without plan": 0}
    for name, crop in cases:
        pixels = load_photo(name)[crop : crop + 192, crop : crop + 256]
        output = quantise(upscale_array(pixels, upscaler, settings).pixels)
        with_plan = find_seams(output, TilePlan(tile=64, overlap=0, scale=2))
        without_plan = find_seams(output)
        for orientation, cuts in expected.items():
            counts["expected"] += len(cuts)
            counts["with plan"] += len(cuts) - len(
                missing(cuts, positions(with_plan, orientation))
            )
            found = positions(without_plan, orientation)
            counts["without plan"] += len(cuts) - len(missing(cuts, found))
            counts["extra without plan"] += len(missing(found, cuts))
    print(
        "\nfixture upscaler (Compact x2, native photo crops 256x192, tile 64, no blend)"
    )
    print("  " + ", ".join(f"{key}: {value}" for key, value in counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1024 and 4096 only")
    args = parser.parse_args()
    bench_sizes([1024, 4096] if args.quick else [1024, 4096, 8192])
    bench_jobs(8, 2048)
    bench_detection(args.quick)
    bench_fixture_upscaler()


if __name__ == "__main__":
    main()
