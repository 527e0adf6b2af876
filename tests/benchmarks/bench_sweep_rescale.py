"""Sweep throughput against plain diffusers calls making the same images.

Runs on the tiny SDXL fixture (fixtures/build/tiny-sdxl-eps) and the tiny CLIP.
Three ways to make and score N images at one guidance scale and rescale factor:

- sweep: `run_sweep` with one UNet batch of N, which also saves PNGs, appends
  CSV rows and writes the summary, the plot and the contact sheets;
- batched: one diffusers pipeline call with N images (per-image generators),
  then one batched CLIP scoring call;
- loop: N pipeline calls of one image each, each image scored by CLIP alone.

Prints images per second from the fastest and the median of the repeats, and the
ratios of the sweep to each baseline. Background load only adds time, so on a
shared machine the fastest repeat is the steadier figure.
Usage: .venv/bin/python tests/benchmarks/bench_sweep_rescale.py [--images 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make bench` runs this file as a script; the fixtures package lives at the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixtures import make_tiny_clip  # noqa: E402
from renderqa.core.clip_score import load_clip_scorer  # noqa: E402
from renderqa.core.pipeline import load_pipeline  # noqa: E402
from renderqa.sweeps import runner  # noqa: E402
from renderqa.sweeps.definition import build_definition  # noqa: E402

BUILD = Path(__file__).resolve().parents[2] / "fixtures" / "build"
PROMPT = "a red mug on a white background"
GUIDANCE_SCALE, GUIDANCE_RESCALE, STEPS, SIZE = 9.0, 0.7, 4, 64


OUTPUT_SECONDS: list[float] = []


def timed_write_outputs(*args, **kwargs):
    """Wrap runner.write_outputs to record the summary, plot and sheet time."""
    start = time.perf_counter()
    original_write_outputs(*args, **kwargs)
    OUTPUT_SECONDS.append(time.perf_counter() - start)


original_write_outputs = runner.write_outputs
runner.write_outputs = timed_write_outputs


def time_sweep(loaded, scorer, clip: Path, count: int, folder: Path) -> float:
    definition = build_definition(
        {
            "model": str(BUILD / "tiny-sdxl-eps"),
            "prompts": [PROMPT],
            "seeds": f"0-{count - 1}",
            "guidance_scale": "9",
            "guidance_rescale": "0.7",
            "steps": STEPS,
            "width": SIZE,
            "height": SIZE,
            "clip_model": str(clip / "tiny-clip.json"),
            "clip_pretrained": str(clip / "tiny-clip.safetensors"),
            "device": "cpu",
        }
    )
    start = time.perf_counter()
    runner.run_sweep(
        definition, folder, batch_size=count, overwrite=True, models=(loaded, scorer)
    )
    return time.perf_counter() - start


def pipe_call(loaded, seeds: list[int]):
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return loaded.pipe(
        prompt=PROMPT,
        num_images_per_prompt=len(seeds),
        generator=generators,
        guidance_scale=GUIDANCE_SCALE,
        guidance_rescale=GUIDANCE_RESCALE,
        num_inference_steps=STEPS,
        width=SIZE,
        height=SIZE,
    ).images


def time_batched(loaded, scorer, count: int) -> float:
    scorer._text_cache.clear()
    start = time.perf_counter()
    images = pipe_call(loaded, list(range(count)))
    scorer.score(images, [PROMPT] * count)
    return time.perf_counter() - start


def time_loop(loaded, scorer, count: int) -> float:
    start = time.perf_counter()
    for seed in range(count):
        scorer._text_cache.clear()
        image = pipe_call(loaded, [seed])[0]
        scorer.score([image], [PROMPT])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    clip = make_tiny_clip.built_or_build(BUILD, Path(tempfile.mkdtemp()))
    loaded = load_pipeline(str(BUILD / "tiny-sdxl-eps"), device="cpu")
    loaded.pipe.set_progress_bar_config(disable=True)
    scorer = load_clip_scorer(
        str(clip / "tiny-clip.json"), str(clip / "tiny-clip.safetensors"), "pad"
    )
    count = args.images
    timings: dict[str, list[float]] = {"sweep": [], "batched": [], "loop": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "sweep"
        time_sweep(loaded, scorer, clip, count, folder)  # warm-up
        time_batched(loaded, scorer, count)
        for _ in range(args.repeats):
            timings["sweep"].append(time_sweep(loaded, scorer, clip, count, folder))
            timings["batched"].append(time_batched(loaded, scorer, count))
            timings["loop"].append(time_loop(loaded, scorer, count))

    outputs = OUTPUT_SECONDS[1:]  # without the warm-up
    timings["sweep w/o outputs"] = [
        total - extra for total, extra in zip(timings["sweep"], outputs, strict=True)
    ]
    print(
        f"images per run: {count}, repeats: {args.repeats}, "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(f"summary, plot and sheets: {statistics.median(outputs):.2f} s per run")
    for label, pick in (("fastest", min), ("median", statistics.median)):
        rate = {name: count / pick(values) for name, values in timings.items()}
        print(f"-- {label} of {args.repeats} repeats, images/s")
        for name in ("sweep", "sweep w/o outputs", "batched", "loop"):
            print(f"{name:18s} {rate[name]:7.2f}")
        print(
            f"sweep / batched diffusers + CLIP: {rate['sweep'] / rate['batched']:.3f}"
        )
        print(f"sweep / loop of single calls:     {rate['sweep'] / rate['loop']:.3f}")


if __name__ == "__main__":
    main()
