"""Benchmark: per-step cost of renderqa's guidance against a plain diffusers call.

Both sides run the same tiny SDXL fixture pipeline object at 256x256 (32x32
latents, where the UNet dominates the step); renderqa adds guidance rescale 0.7,
latent dynamic thresholding (mimic scale 5) and the std-ratio measurement. Runs are
interleaved so machine load affects both alike; the ratio of medians is reported.

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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

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
            output_type="latent",
        )

    def ours() -> None:
        render_batch(loaded, [request])

    def timed(function) -> float:
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain()
    ours()
    plain_times, our_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain))
        our_times.append(timed(ours))

    plain_step = statistics.median(plain_times) / args.steps
    our_step = statistics.median(our_times) / args.steps
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, device {loaded.device}"
    )
    print(
        f"{args.size}x{args.size}, {args.steps} steps, {args.repeats} interleaved repeats"
    )
    print(f"plain diffusers: {1000 * plain_step:.1f} ms/step (median)")
    print(
        f"renderqa (rescale + latent threshold + std ratio, incl. decode): {1000 * our_step:.1f} ms/step"
    )
    print(f"ratio renderqa / plain: {our_step / plain_step:.3f}")


if __name__ == "__main__":
    main()
