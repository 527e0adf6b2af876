"""Probe a VAE decode for fp16 overflow: hooks on every decoder module, per dtype.

The SDXL decoder can produce activations above 65504, the fp16 maximum. fp16 stores
them as inf, the next GroupNorm turns inf into NaN, and the image decodes black with
no error. Extreme latents (a broken LoRA or UNet) can make the same black image from
a healthy VAE, so the latents are checked before the VAE is blamed.

The probe decodes the same latents with each requested (VAE, dtype) pair. Forward
hooks on every decoder module record scalars only: the min and max of each output,
reduced over every call (tiles included). No activation tensor is kept. The fp32
decode of the main VAE is the reference that every other decode is measured against.

Latents everywhere in this module are (1, C, h, w) in the UNet's latent space, as a
pipeline produces them before it undoes the VAE scaling. `unscale_latents` maps them
into the VAE's space the way diffusers' SD and SDXL pipelines do.

This module checks the inputs, decodes and runs the probe. `vae_probe_hooks`
records the activations, `vae_probe_verdict` judges the decodes, `vae_probe_output`
writes the report's files and `vae_probe_inputs` loads latents and VAEs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch

from renderqa.core.devices import DTYPES
from renderqa.core.errors import DeviceError, InvalidInputError
from renderqa.core.vae_probe_hooks import recording_activations
from renderqa.core.vae_probe_verdict import (
    ALTERNATE_VAE,
    DEFAULT_MIN_PSNR,
    MAIN_VAE,
    REFERENCE_DTYPE,
    DecodeRun,
    ProbeReport,
    compare_to_reference,
    diagnose,
    latent_statistics,
)

logger = logging.getLogger(__name__)

DEFAULT_WARNING_LEVEL = 6.0e4

ProgressCallback = Callable[[int, int, str], None]


# Latents ------------------------------------------------------------------------


def check_latents_fit(
    latents: torch.Tensor, vae, vae_source: str, latents_name: str = "latents"
) -> None:
    """Raise InvalidInputError unless `latents` are (1, C, h, w) with the VAE's C."""
    channels = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise InvalidInputError(
            f"{latents_name}: latents of shape {tuple(latents.shape)} do not fit the "
            f"VAE {vae_source}, which expects (1, {channels}, h, w); pass the "
            ".latents.safetensors file that render --save-latents wrote for one image"
        )
    if latents.shape[1] != channels:
        raise InvalidInputError(
            f"{latents_name}: latents have {latents.shape[1]} channels but the VAE "
            f"{vae_source} expects {channels}; pass the VAE of the model that made them"
        )
    if not latents.is_floating_point():
        raise InvalidInputError(
            f"{latents_name}: latents are {latents.dtype}, not floating point"
        )


def unscale_latents(
    latents: torch.Tensor,
    config,
    scaling_factor: float,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """Map UNet-space latents into the VAE's space as diffusers' pipelines do.

    SD and SDXL divide by scaling_factor. A VAE config with latents_mean and
    latents_std (some SDXL fine-tunes) uses z * std / scaling_factor + mean instead.
    A shift_factor (SD3-style VAEs) is added after the division.
    """
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_tensor = torch.tensor(mean, dtype=latents.dtype).reshape(shape)
        std_tensor = torch.tensor(std, dtype=latents.dtype).reshape(shape)
        return latents * std_tensor / scaling_factor + mean_tensor
    unscaled = latents / scaling_factor
    if shift_factor is not None:
        unscaled = unscaled + shift_factor
    return unscaled


# Devices and dtypes -------------------------------------------------------------


def parse_dtypes(text: str, option: str = "--dtypes") -> list[str]:
    """Split "fp16,bf16,fp32" into known dtype names, in order, without repeats."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in DTYPES:
            raise InvalidInputError(
                f"{option}: {name!r} is not a dtype; use a comma-separated list of "
                f"{', '.join(DTYPES)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidInputError(f"{option} is empty; use e.g. fp16,bf16,fp32")
    return names


def dtype_support_error(device: torch.device, dtype_label: str) -> str | None:
    """Return why `device` cannot decode in this dtype, or None when it can.

    Runs the decoder's operations (convolution, GroupNorm, SiLU, nearest upsampling,
    attention) on a tiny tensor, because support differs by device and torch build:
    torch 2.14 runs fp16 and bf16 convolutions on the CPU, older builds did not.
    """
    dtype = DTYPES[dtype_label]
    if (
        device.type == "cuda"
        and dtype is torch.bfloat16
        and not torch.cuda.is_bf16_supported()
    ):
        return "bf16 needs an Ampere or newer GPU"
    try:
        _run_decoder_ops(device, dtype)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return str(error).splitlines()[0]
    return None


@torch.no_grad()
def _run_decoder_ops(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.ones(1, 8, 4, 4, device=device, dtype=dtype)
    weight = torch.ones(8, 8, 3, 3, device=device, dtype=dtype)
    x = torch.nn.functional.conv2d(x, weight, padding=1)
    x = torch.nn.functional.group_norm(x, 2)
    x = torch.nn.functional.silu(x)
    x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    tokens = x.flatten(2).transpose(1, 2).unsqueeze(1)
    torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)


def check_dtypes_run(device: torch.device, dtypes: list[str]) -> None:
    """Raise DeviceError naming the first dtype this device cannot decode in."""
    for name in dtypes:
        reason = dtype_support_error(device, name)
        if reason is not None:
            usable = [
                other
                for other in DTYPES
                if other != name and dtype_support_error(device, other) is None
            ]
            raise DeviceError(
                f"--dtypes {name}: cannot decode in {name} on {device} ({reason}); "
                f"use {' or '.join(usable) or 'another device'}"
            )


# Decoding -----------------------------------------------------------------------


def prepare_vae(
    base_vae, dtype_label: str, device: torch.device, tile_size: int | None
):
    """Return a copy of the fp32 `base_vae` cast to the dtype on the device.

    Each run gets its own copy from the fp32 weights, because casting fp16 weights
    back to fp32 would not restore what rounding lost. `tile_size` (output pixels)
    turns on diffusers' VAE tiling with square tiles of that size.
    """
    vae = copy.deepcopy(base_vae)
    # torch's Module.to: diffusers' override logs a warning for every dtype cast.
    torch.nn.Module.to(vae, device=device, dtype=DTYPES[dtype_label])
    vae.eval()
    if tile_size is not None:
        set_vae_tiling(vae, tile_size)
    return vae


def set_vae_tiling(vae, tile_size: int) -> None:
    """Turn on diffusers' tiled decode with tiles of `tile_size` output pixels."""
    if not hasattr(vae, "tile_sample_min_size"):
        raise InvalidInputError(
            f"--tile-size: {type(vae).__name__} has no tiled decode in this diffusers"
        )
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    if tile_size < downscale or tile_size % downscale:
        raise InvalidInputError(
            f"--tile-size {tile_size}: must be a positive multiple of {downscale}, the "
            "VAE's downscale factor"
        )
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_size
    vae.tile_latent_min_size = tile_size // downscale


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def decode_to_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode VAE-space latents (1, C, h, w) to (H, W, 3) float32 in [0, 1].

    Autocast is turned off: an enclosing autocast would run the decoder's layers in
    its own dtype and bring back the overflow the probe is measuring. Non-finite
    values are kept, not clamped away.
    """
    device = latents.device
    with torch.autocast(device_type=device.type, enabled=False):
        sample = vae.decode(latents).sample
    image = (sample[0].float() / 2 + 0.5).clamp(0, 1)
    # clamp keeps NaN, so a NaN decode stays visible to the checks.
    return image.permute(1, 2, 0)


def timed_decode(vae, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Decode and return the pixels with the wall-clock seconds, device synchronised."""
    _synchronize(latents.device)
    start = time.perf_counter()
    pixels = decode_to_pixels(vae, latents)
    _synchronize(latents.device)
    return pixels, time.perf_counter() - start


def probe_decode(
    vae,
    latents: torch.Tensor,
    *,
    vae_label: str,
    vae_source: str,
    dtype_label: str,
    warning_level: float = DEFAULT_WARNING_LEVEL,
    timing: bool = True,
) -> DecodeRun:
    """Decode VAE-space latents with hooks on every decoder module, then time a
    plain decode.

    `vae` is already on the device in the run's dtype; `latents` are cast to it.
    The hooked decode doubles as the warm-up, so the plain decode's time and peak
    memory (CUDA only) are the cost a renderer would pay.
    """
    device = next(vae.parameters()).device
    latents = latents.to(device=device, dtype=DTYPES[dtype_label])

    with recording_activations(vae) as recorder:
        pixels, probed_seconds = timed_decode(vae, latents)
    modules = recorder.stats()

    seconds = peak_memory = None
    if timing:
        seconds, peak_memory = _plain_decode_cost(vae, latents)

    return DecodeRun(
        vae_label=vae_label,
        vae_source=vae_source,
        dtype=dtype_label,
        modules=modules,
        pixels=pixels.cpu().numpy(),
        probed_seconds=probed_seconds,
        seconds=seconds,
        peak_memory_bytes=peak_memory,
        largest_activation_bytes=recorder.largest_activation_bytes,
        warning_level=warning_level,
    )


def _plain_decode_cost(vae, latents: torch.Tensor) -> tuple[float, int | None]:
    device = latents.device
    if device.type != "cuda":
        return timed_decode(vae, latents)[1], None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds = timed_decode(vae, latents)[1]
    return seconds, torch.cuda.max_memory_allocated(device) - before


# Orchestration ------------------------------------------------------------------


def plan_runs(dtypes: list[str], has_alternate: bool) -> list[tuple[str, str]]:
    """Return the (vae_label, dtype) pairs to decode, the fp32 reference first."""
    main = [REFERENCE_DTYPE, *(name for name in dtypes if name != REFERENCE_DTYPE)]
    plan = [(MAIN_VAE, name) for name in main]
    if has_alternate:
        plan += [(ALTERNATE_VAE, name) for name in dtypes]
    return plan


def probe_vae(
    vaes: dict[str, tuple[object, str]],
    latents: torch.Tensor,
    *,
    scaling_factor: float,
    shift_factor: float | None = None,
    dtypes: list[str],
    device: torch.device,
    warning_level: float = DEFAULT_WARNING_LEVEL,
    min_psnr: float = DEFAULT_MIN_PSNR,
    tile_size: int | None = None,
    timing: bool = True,
    latents_name: str = "latents",
    progress: ProgressCallback | None = None,
) -> ProbeReport:
    """Probe every (VAE, dtype) pair on `latents` and diagnose the result.

    `vaes` maps MAIN_VAE (and optionally ALTERNATE_VAE) to (fp32 AutoencoderKL on
    the CPU, source text). The main VAE's fp32 decode always runs as the reference,
    even when `dtypes` leaves fp32 out. Steps: check the inputs, measure the
    latents, decode each pair, compare against the reference, diagnose.
    """
    for vae, source in vaes.values():
        check_latents_fit(latents, vae, source, latents_name)
    check_dtypes_run(device, dtypes)

    # Measured after the main VAE's own unscale, which may be per channel.
    vae_space = unscale_latents(
        latents.float(), vaes[MAIN_VAE][0].config, scaling_factor, shift_factor
    )
    latent_stats = latent_statistics(latents, scaling_factor, vae_space)

    plan = plan_runs(dtypes, ALTERNATE_VAE in vaes)
    runs = []
    for index, (vae_label, dtype_label) in enumerate(plan):
        if progress is not None:
            progress(index, len(plan), f"{vae_label} {dtype_label}")
        base_vae, source = vaes[vae_label]
        vae_latents = unscale_latents(
            latents.float(), base_vae.config, scaling_factor, shift_factor
        )
        vae = prepare_vae(base_vae, dtype_label, device, tile_size)
        runs.append(
            probe_decode(
                vae,
                vae_latents,
                vae_label=vae_label,
                vae_source=source,
                dtype_label=dtype_label,
                warning_level=warning_level,
                timing=timing,
            )
        )
        del vae
    if progress is not None:
        progress(len(plan), len(plan), "done")

    reference = runs[0]
    for run in runs:
        compare_to_reference(run, reference)
    verdict = diagnose(latent_stats, runs, min_psnr)
    return ProbeReport(
        latents=latent_stats,
        runs=runs,
        verdict=verdict,
        device=str(device),
        tiling=tile_size is not None,
        warning_level=warning_level,
    )
