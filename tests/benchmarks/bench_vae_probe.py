"""Benchmark: a decode with the probe's hooks on every module against a plain decode.

The target is a probed decode under 1.3x the plain one. Two decoders are timed in
fp32 on the chosen device. One is the tiny fixture VAE. The other has random weights
in the SDXL VAE's layout (blocks of 128, 256, 512 and 512 channels, 3 resnets per
up block, as in the stabilityai/sdxl-vae config), so it runs the same modules on the
same tensor shapes.

    .venv/bin/python tests/benchmarks/bench_vae_probe.py [--latent-size 32]
        [--repeats 5] [--threads N] [--device cpu|cuda]

Plain and probed decodes alternate, after one warm-up each, and the medians are
compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

# The fixture builders live in the repository's `fixtures` package, which is not
# installed. Python adds only the script's own folder to the path, so add the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fixtures.make_vae_fixtures import (  # noqa: E402
    make_healthy_vae,
    make_known_latents,
)
from renderqa.core.vae_probe import decode_to_pixels  # noqa: E402
from renderqa.core.vae_probe_hooks import recording_activations  # noqa: E402


def make_sdxl_layout_vae() -> AutoencoderKL:
    """Return a seeded random-weight AutoencoderKL shaped like the SDXL VAE."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.13025,
    ).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(vae, latents: torch.Tensor, probed: bool) -> tuple[float, float]:
    """Return the wall-clock and process CPU seconds of one decode.

    The CPU time of this process is less disturbed than wall time when other
    programs share the cores; on a GPU only the wall time means anything.
    """
    synchronize(latents.device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if probed:
        with recording_activations(vae) as recorder:
            decode_to_pixels(vae, latents)
        recorder.stats()  # the one device-to-host copy belongs to the probe's cost
    else:
        decode_to_pixels(vae, latents)
    synchronize(latents.device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def measure(name: str, vae, latents: torch.Tensor, repeats: int) -> None:
    time_decode(vae, latents, probed=False)
    time_decode(vae, latents, probed=True)
    plain, probed = [], []
    for _ in range(repeats):
        plain.append(time_decode(vae, latents, probed=False))
        probed.append(time_decode(vae, latents, probed=True))
    modules = len(list(vae.decoder.modules()))
    print(f"{name}: latents {tuple(latents.shape)}, {modules} decoder modules")
    for index, clock in enumerate(("wall", "cpu")):
        plain_median = statistics.median(times[index] for times in plain)
        probed_median = statistics.median(times[index] for times in probed)
        print(
            f"  {clock}: plain {plain_median * 1000:.1f} ms, probed "
            f"{probed_median * 1000:.1f} ms, ratio {probed_median / plain_median:.3f}x "
            f"(target < 1.3x; medians of {repeats})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own choice)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"device {device}, {torch.get_num_threads()} CPU threads")

    tiny = make_healthy_vae().to(device)
    tiny_latents = make_known_latents().to(device) / tiny.config.scaling_factor
    # A fixture decode takes milliseconds, so more repeats steady its medians.
    measure("fixture VAE", tiny, tiny_latents, args.repeats * 10)

    sdxl = make_sdxl_layout_vae().to(device)
    generator = torch.Generator().manual_seed(0)
    size = args.latent_size
    latents = torch.randn(1, 4, size, size, generator=generator).to(device)
    measure("SDXL-layout VAE", sdxl, latents / sdxl.config.scaling_factor, args.repeats)


if __name__ == "__main__":
    with torch.no_grad():
        main()
