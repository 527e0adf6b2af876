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
from diffusers import UNet2DConditionModel  # noqa: E402

from renderqa.core.pipeline import load_pipeline  # noqa: E402
from renderqa.core.render import RenderRequest, ThresholdSettings, render_batch  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "build" / "tiny-sdxl-eps"
PROMPT = "a red mug on a white background"


def medium_unet(tiny_config) -> UNet2DConditionModel:
    """An SDXL-layout UNet (three levels, 1/2/4 transformer layers) at 1/10 width.

    It keeps the fixture's text-conditioning sizes so the fixture's encoders feed it.
    """
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=tiny_config.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 4),
        norm_num_groups=16,
        cross_attention_dim=tiny_config.cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=tiny_config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=tiny_config.projection_class_embeddings_input_dim,
        use_linear_projection=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--unet",
        choices=("medium", "tiny"),
        default="medium",
        help="medium: an SDXL-layout UNet about 1/10 of SDXL's width, swapped into the "
        "fixture, so the UNet dominates as on a real model; tiny: the fixture's own",
    )
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
    if args.unet == "medium":
        pipe.unet = medium_unet(pipe.unet.config).to(loaded.device)
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
        f"{args.threads} torch thread(s), {args.unet} UNet"
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
