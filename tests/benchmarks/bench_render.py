"""Benchmark: per-step cost of renderqa's guidance against a plain diffusers call.

Both sides run the same tiny SDXL fixture pipeline object at 256x256 (32x32
latents, where the UNet dominates the step) and decode to pixels; renderqa adds
guidance rescale 0.7, latent dynamic thresholding (mimic scale 5) and the std-ratio
measurement. Runs are interleaved so machine load affects both alike; the ratios of
median wall time and of median process CPU time are reported.

    .venv/bin/python tests/benchmarks/bench_render.py [--repeats 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from renderqa.core.pipeline import load_pipeline  # noqa: E402
from renderqa.core.render import RenderRequest, ThresholdSettings, render_batch  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "build" / "tiny-sdxl-eps"
PROMPT = "a red mug on a white background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 makes process CPU time a fair measure on a busy machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_pipeline(str(FIXTURE), scheduler="euler", device=args.device)
    pipe = loaded.pipe
    request = RenderRequest(
        prompt=PROMPT,
        seed=0,
        steps=args.steps,
        width=args.size,
        height=args.size,
        guidance_scale=9.0,
        guidance_rescale=0.7,
        threshold=ThresholdSettings(mode="latent", percentile=0.995, mimic_scale=5.0),
    )

    def plain() -> None:
        pipe(
            PROMPT,
            num_inference_steps=args.steps,
            width=args.size,
            height=args.size,
            guidance_scale=9.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        )

    def ours() -> None:
        render_batch(loaded, [request])

    def timed(function) -> tuple[float, float]:
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    plain()
    ours()
    plain_times, our_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain))
        our_times.append(timed(ours))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, device {loaded.device}, "
        f"{args.threads} torch thread(s)"
    )
    print(
        f"{args.size}x{args.size}, {args.steps} steps, {args.repeats} interleaved repeats"
    )
    for label, column in (("wall", 0), ("process CPU", 1)):
        plain_step = statistics.median(t[column] for t in plain_times) / args.steps
        our_step = statistics.median(t[column] for t in our_times) / args.steps
        print(
            f"{label}: plain diffusers {1000 * plain_step:.1f} ms/step, renderqa "
            f"{1000 * our_step:.1f} ms/step (median, both decoding), "
            f"ratio {our_step / plain_step:.3f}"
        )


if __name__ == "__main__":
    main()
