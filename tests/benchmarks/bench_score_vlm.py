"""Benchmark score-vlm throughput against a local server with a fixed latency.

200 renders go to the scripted server of tests/vlm_server.py, run in a subprocess
on 127.0.0.1. The renders are 256 x 256 PNG crops of scikit-image's astronaut
photo (`--side` changes the size). The server returns a valid verdict to every
request after 200 ms, without blocking other requests. The ideal time at concurrency 16 is 200 x 0.2 / 16 = 2.5 s. With 16
workers and 200 requests, 8 workers serve 13 requests, so no client can finish in
under 13 x 0.2 = 2.6 s (1.04 x ideal).

The baseline, measured in the same run, is a bare httpx.AsyncClient sending
requests of the same size with 16 tasks and no encoding, validation or output.

Run: .venv/bin/python tests/benchmarks/bench_score_vlm.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from skimage import data as skimage_data

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from renderqa.core.vlm import ScoreSettings, score_images  # noqa: E402
from renderqa.core.vlm_client import EndpointSettings, RetryPolicy  # noqa: E402
from renderqa.core.vlm_request import build_chat_body, encode_image  # noqa: E402
from renderqa.core.vlm_rubric import DEFAULT_RUBRIC  # noqa: E402

IMAGES = 200
LATENCY_S = 0.2
CONCURRENCY = 16
TARGET_RATIO = 1.15
API_KEY = "sk-bench-not-a-real-key"


def make_renders(folder: Path, side: int) -> list[Path]:
    """Write IMAGES distinct side x side crops of the astronaut photo as PNG."""
    photo = skimage_data.astronaut()
    paths = []
    for index in range(IMAGES):
        top, left = (index * 7) % (512 - side + 1), (index * 13) % (512 - side + 1)
        path = folder / f"render{index:03d}.png"
        Image.fromarray(photo[top : top + side, left : left + side]).save(path)
        paths.append(path)
    return paths


def start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.vlm_server", "--latency", str(LATENCY_S)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    base_url = process.stdout.readline().strip()
    if not base_url.startswith("http://127.0.0.1:"):
        process.kill()
        raise SystemExit(f"the benchmark server did not start (printed {base_url!r})")
    return process, base_url


def time_score_vlm(paths: list[Path], base_url: str, out_dir: Path) -> float:
    settings = ScoreSettings(
        models=("bench-model",), mode="fallback", rubric=DEFAULT_RUBRIC, out_dir=out_dir
    )
    endpoint = EndpointSettings(
        base_url=base_url, api_key=API_KEY, concurrency=CONCURRENCY
    )
    start = time.perf_counter()
    report = score_images(paths, settings, endpoint, RetryPolicy())
    elapsed = time.perf_counter() - start
    ok = sum(row["status"] == "ok" for row in report.rows)
    if ok != IMAGES:
        raise SystemExit(f"only {ok} of {IMAGES} verdicts came back")
    return elapsed


def time_bare_httpx(paths: list[Path], base_url: str) -> float:
    body = build_chat_body("bench-model", encode_image(paths[0], 2048), DEFAULT_RUBRIC)

    async def run() -> None:
        queue = list(range(IMAGES))
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:

            async def worker() -> None:
                while queue:
                    queue.pop()
                    response = await client.post(
                        f"{base_url}/chat/completions", json=body
                    )
                    response.raise_for_status()

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=256, help="render size, <= 512")
    args = parser.parse_args()
    ideal = IMAGES * LATENCY_S / CONCURRENCY

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_renders(folder, args.side)
        size_kib = statistics.mean(p.stat().st_size for p in paths) / 1024
        process, base_url = start_server()
        try:
            bare = [time_bare_httpx(paths, base_url) for _ in range(args.repeats)]
            ours = [
                time_score_vlm(paths, base_url, folder / f"out{run}")
                for run in range(args.repeats)
            ]
        finally:
            process.terminate()
            process.wait(timeout=10)

    bare_s, ours_s = statistics.median(bare), statistics.median(ours)
    print(
        f"score-vlm: {IMAGES} images ({args.side} px, {size_kib:.0f} KiB PNG each), "
        "server latency "
        f"{LATENCY_S * 1000:.0f} ms, concurrency {CONCURRENCY}, median of "
        f"{args.repeats} runs"
    )
    print(f"  ideal {IMAGES} x {LATENCY_S} / {CONCURRENCY}: {ideal:.3f} s")
    print(f"  bare httpx baseline: {bare_s:.3f} s ({bare_s / ideal:.3f} x ideal)")
    print(
        f"  score-vlm: {ours_s:.3f} s ({ours_s / ideal:.3f} x ideal, "
        f"{ours_s / bare_s:.3f} x bare httpx); runs "
        + ", ".join(f"{t:.3f}" for t in ours)
    )
    verdict = "within" if ours_s / ideal <= TARGET_RATIO else "OUTSIDE"
    print(f"  target <= {TARGET_RATIO:.2f} x ideal: {verdict}")


if __name__ == "__main__":
    main()
