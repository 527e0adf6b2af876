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
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from renderqa.core.atomic import atomic_path, write_text_atomic
from renderqa.core.devices import DTYPES
from renderqa.core.errors import DeviceError, InvalidInputError, ModelLoadError
from renderqa.core.imageio import save_png, to_uint8
from renderqa.core.render import BLACK_LEVEL

logger = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
DEFAULT_WARNING_LEVEL = 6.0e4
DEFAULT_MIN_PSNR = 25.0
REFERENCE_DTYPE = "fp32"
MAIN_VAE = "model"
ALTERNATE_VAE = "alternate"

# Latent checks. A pipeline's scaling_factor is chosen so that latents of real images
# have unit std in the UNet's space, so the limits are in units of that std.
# NOTE: the limits are heuristics, not calibrated on a corpus of real renders.
LATENT_EXPECTED_STD = 1.0
LATENT_STD_RATIO_MAX = 3.0
LATENT_STD_RATIO_MIN = 0.1
LATENT_MAX_ABS = 20.0
LATENT_MEAN_ABS_MAX = 3.0

# Verdicts that a change of dtype or VAE can fix, so they come with a recommendation.
FIXABLE_VERDICTS = ("vae-overflow", "vae-nonfinite", "precision-loss")

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class ModuleStats:
    """Scalar statistics of one module's outputs over every call of one decode."""

    name: str  # dotted path inside the VAE, e.g. decoder.up_blocks.0.resnets.1.conv2
    kind: str  # the module's class name
    order: int  # decoder order: rank of the module's first output in the decode
    calls: int  # outputs seen; more than one with tiling or for a reused module
    min_value: float  # NaN if any output contained NaN
    max_value: float

    @property
    def max_abs(self) -> float:
        """Max |activation|: inf if an output contained inf, NaN if one contained NaN."""
        if math.isnan(self.min_value) or math.isnan(self.max_value):
            return math.nan
        return max(-self.min_value, self.max_value)

    @property
    def nonfinite(self) -> str | None:
        """The kind of non-finite value ("nan" or "inf") in the outputs, else None."""
        peak = self.max_abs
        if math.isnan(peak):
            return "nan"
        if math.isinf(peak):
            return "inf"
        return None

    def above(self, level: float) -> bool:
        """Return whether the max |activation| exceeds `level`, counting NaN as above."""
        peak = self.max_abs
        return math.isnan(peak) or peak > level


@dataclass
class LatentStats:
    """Statistics of the latents in the UNet's space, against what a pipeline expects."""

    shape: tuple[int, ...]
    mean: float  # over finite values
    std: float  # over finite values
    max_abs: float  # over finite values
    nonfinite_count: int
    scaling_factor: float
    expected_std: float = LATENT_EXPECTED_STD
    problems: list[str] = field(default_factory=list)

    @property
    def vae_space_std(self) -> float:
        """Std after the pipeline divides by scaling_factor, as the decoder receives it."""
        return self.std / self.scaling_factor

    @property
    def extreme(self) -> bool:
        return bool(self.problems)


@dataclass
class DecodeRun:
    """One probed decode: a VAE in one dtype, its module statistics and its image."""

    vae_label: str  # MAIN_VAE or ALTERNATE_VAE
    vae_source: str
    dtype: str  # fp32, fp16 or bf16
    modules: list[ModuleStats]
    pixels: np.ndarray  # (H, W, 3) float32, [0, 1] where finite; NaN or inf kept
    probed_seconds: float
    seconds: float | None  # a plain decode without hooks; None when timing is off
    # CUDA only: the plain decode's peak allocation above what was allocated before
    # it (the weights), so it measures activations and workspace.
    peak_memory_bytes: int | None
    largest_activation_bytes: int  # largest single module output seen
    warning_level: float
    max_diff: float | None = None  # against the reference decode, on displayed pixels
    psnr: float | None = None  # dB; inf when identical
    ssim: float | None = None

    @property
    def label(self) -> str:
        if self.vae_label == MAIN_VAE:
            return self.dtype
        return f"{self.vae_label}-{self.dtype}"

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.pixels).all())

    @property
    def black(self) -> bool:
        return is_black(self.pixels)

    @property
    def peak(self) -> ModuleStats | None:
        """The module with the largest max |activation| (inf and NaN rank highest)."""
        if not self.modules:
            return None
        return max(self.modules, key=lambda stats: _rank_value(stats.max_abs))

    def first_above(self, level: float) -> ModuleStats | None:
        """Return the first module in decoder order whose max |activation| > level."""
        return next((stats for stats in self.modules if stats.above(level)), None)

    @property
    def first_above_warning(self) -> ModuleStats | None:
        return self.first_above(self.warning_level)

    @property
    def first_above_fp16_max(self) -> ModuleStats | None:
        return self.first_above(FP16_MAX)

    @property
    def first_nonfinite(self) -> ModuleStats | None:
        return next((stats for stats in self.modules if stats.nonfinite), None)

    @property
    def timed_seconds(self) -> float:
        """The plain decode time when measured, else the probed one."""
        return self.seconds if self.seconds is not None else self.probed_seconds


@dataclass
class FixOption:
    """A decode that works, with its measured cost against the failing baseline."""

    run: DecodeRun
    description: str
    time_ratio: float | None  # decode time over the baseline's
    memory_delta_bytes: int | None  # peak memory minus the baseline's (CUDA only)


@dataclass
class Verdict:
    """The failure the probe found, the module where it starts, and the fixes."""

    kind: str  # one of FIXABLE_VERDICTS, or clean, near-overflow, latents
    summary: str
    module: str | None = None
    baseline: str | None = None  # label of the run the costs are measured against
    options: list[FixOption] = field(default_factory=list)  # cheapest first

    @property
    def recommendation(self) -> FixOption | None:
        if self.kind in FIXABLE_VERDICTS and self.options:
            return self.options[0]
        return None


@dataclass
class ProbeReport:
    """Everything one probe measured, ready to print or write."""

    latents: LatentStats
    runs: list[DecodeRun]
    verdict: Verdict
    device: str
    tiling: bool
    warning_level: float

    @property
    def reference(self) -> DecodeRun:
        return next(
            run
            for run in self.runs
            if run.vae_label == MAIN_VAE and run.dtype == REFERENCE_DTYPE
        )


def _rank_value(value: float) -> float:
    return math.inf if math.isnan(value) else value


def is_black(pixels: np.ndarray) -> bool:
    """True when the brightest value is below render's black level, NaN shown as 0."""
    return bool(displayed_pixels(pixels).max(initial=0.0) < BLACK_LEVEL)


def displayed_pixels(pixels: np.ndarray) -> np.ndarray:
    """Map decoded pixels to what a saved image shows: NaN as 0, clipped to [0, 1]."""
    shown = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(shown, 0.0, 1.0).astype(np.float32)


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


def latent_statistics(latents: torch.Tensor, scaling_factor: float) -> LatentStats:
    """Measure UNet-space latents and list what is extreme about them."""
    values = latents.detach().to(torch.float64).flatten()
    finite = values[torch.isfinite(values)]
    nonfinite_count = values.numel() - finite.numel()
    if finite.numel() == 0:
        mean = std = max_abs = math.nan
    else:
        mean = finite.mean().item()
        std = finite.std(correction=0).item()
        max_abs = finite.abs().max().item()
    stats = LatentStats(
        shape=tuple(latents.shape),
        mean=mean,
        std=std,
        max_abs=max_abs,
        nonfinite_count=nonfinite_count,
        scaling_factor=scaling_factor,
    )
    stats.problems = _latent_problems(stats)
    return stats


def _latent_problems(stats: LatentStats) -> list[str]:
    problems = []
    expected = stats.expected_std
    if stats.nonfinite_count:
        problems.append(f"{stats.nonfinite_count} non-finite values")
    if math.isnan(stats.std):
        return problems
    if stats.std > LATENT_STD_RATIO_MAX * expected:
        problems.append(
            f"std {stats.std:.3g} is above {LATENT_STD_RATIO_MAX:g}x the expected "
            f"{expected:g}"
        )
    if stats.std < LATENT_STD_RATIO_MIN * expected:
        problems.append(
            f"std {stats.std:.3g} is below {LATENT_STD_RATIO_MIN:g}x the expected "
            f"{expected:g} (collapsed latents)"
        )
    if stats.max_abs > LATENT_MAX_ABS * expected:
        problems.append(
            f"max |latent| {stats.max_abs:.3g} is above {LATENT_MAX_ABS:g}x the "
            "expected std"
        )
    if abs(stats.mean) > LATENT_MEAN_ABS_MAX * expected:
        problems.append(f"mean {stats.mean:.3g} is far from 0")
    return problems


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


# Hooks --------------------------------------------------------------------------


def probed_modules(vae: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Return every module that takes part in decoding, in registration order.

    For an AutoencoderKL that is post_quant_conv and the decoder with all its
    submodules; the encoder and quant_conv are left out.
    """
    skipped = ("encoder", "quant_conv")
    return [
        (name, module)
        for name, module in vae.named_modules()
        if name and not (name == skipped[1] or name.split(".")[0] == skipped[0])
    ]


class ActivationRecorder:
    """Forward hooks that keep the min and max of every probed module's output.

    The per-call minima and maxima stay on the device as 0-dim tensors, so the hooks
    add no device synchronisation. `stats()` copies them to the CPU once, after the
    decode. NOTE: the overhead was measured on the CPU only, not on a GPU.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self._modules = probed_modules(vae)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._first_seen: dict[str, int] = {}
        self._records: dict[str, list[torch.Tensor]] = {}
        self.largest_activation_bytes = 0

    def attach(self) -> None:
        for name, module in self._modules:
            hook = self._make_hook(name)
            self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(_module, _args, output) -> None:
            for tensor in _output_tensors(output):
                self._record(name, tensor)

        return hook

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        extrema = torch.aminmax(tensor)  # one pass; NaN propagates into both
        self._first_seen.setdefault(name, len(self._first_seen))
        self._records.setdefault(name, []).extend(extrema)
        size = tensor.numel() * tensor.element_size()
        self.largest_activation_bytes = max(self.largest_activation_bytes, size)

    def stats(self) -> list[ModuleStats]:
        """Return one ModuleStats per module that produced output, in decoder order."""
        kinds = {name: type(module).__name__ for name, module in self._modules}
        names = sorted(self._first_seen, key=self._first_seen.__getitem__)
        if not names:
            return []
        # One copy to the host for every call of every module: rows of (min, max).
        flat = [value.float() for name in names for value in self._records[name]]
        pairs = torch.stack(flat).cpu().numpy().reshape(-1, 2)
        ends = np.cumsum([len(self._records[name]) // 2 for name in names])
        results = []
        for name, rows in zip(names, np.split(pairs, ends[:-1]), strict=True):
            has_nan = bool(np.isnan(rows).any())
            results.append(
                ModuleStats(
                    name=name,
                    kind=kinds[name],
                    order=self._first_seen[name],
                    calls=rows.shape[0],
                    min_value=math.nan if has_nan else float(rows[:, 0].min()),
                    max_value=math.nan if has_nan else float(rows[:, 1].max()),
                )
            )
        return results


def _output_tensors(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _output_tensors(item)


@contextmanager
def recording_activations(vae: torch.nn.Module) -> Iterator[ActivationRecorder]:
    """Attach an ActivationRecorder for the body and remove its hooks even if it raises."""
    recorder = ActivationRecorder(vae)
    try:
        recorder.attach()
        yield recorder
    finally:
        recorder.detach()


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


# Comparison ---------------------------------------------------------------------


def compare_to_reference(run: DecodeRun, reference: DecodeRun) -> None:
    """Fill in max diff, PSNR and SSIM against the reference, on displayed pixels.

    Both images are taken as a saved PNG would show them (NaN as black), so a black
    decode scores as black rather than as undefined. PSNR and SSIM come from
    scikit-image with data_range 1; SSIM needs at least 3x3 pixels.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    shown = displayed_pixels(run.pixels)
    target = displayed_pixels(reference.pixels)
    if shown.shape != target.shape:
        return
    run.max_diff = float(np.abs(shown - target).max())
    run.psnr = (
        math.inf
        if run.max_diff == 0.0
        else float(peak_signal_noise_ratio(target, shown, data_range=1.0))
    )
    window = min(7, *target.shape[:2])
    window -= 1 - window % 2  # SSIM windows are odd
    if window >= 3:
        run.ssim = float(
            structural_similarity(
                target, shown, data_range=1.0, channel_axis=-1, win_size=window
            )
        )


# Verdict ------------------------------------------------------------------------


def run_works(run: DecodeRun, reference: DecodeRun, min_psnr: float) -> bool:
    """Return whether a decode is usable: finite, not black, close to the reference.

    A black decode only counts as a failure when the reference is not black too.
    """
    if not run.finite:
        return False
    if run.dtype == "fp16" and run.first_above_fp16_max is not None:
        return False
    if run.black and not reference.black:
        return False
    return run is reference or run.psnr is None or run.psnr >= min_psnr


def describe_fix(run: DecodeRun) -> str:
    """Return how a user applies this decode as a fix, in render's terms."""
    if run.vae_label == ALTERNATE_VAE:
        return f"use the VAE {run.vae_source} in {run.dtype}"
    if run.dtype == "fp32":
        return "upcast the VAE to fp32 (render --vae-dtype fp32)"
    return f"decode the VAE in {run.dtype} (render --vae-dtype {run.dtype})"


def rank_fixes(
    runs: list[DecodeRun], baseline: DecodeRun, reference: DecodeRun, min_psnr: float
) -> list[FixOption]:
    """List the runs that work, cheapest first, with costs against the baseline.

    The main VAE in fp16 is the setting being fixed, so it is never listed. Without
    an fp16 decode the baseline is the fp32 reference, which is then a fix itself.
    """
    options = []
    for run in runs:
        if run.vae_label == MAIN_VAE and run.dtype == "fp16":
            continue
        if not run_works(run, reference, min_psnr):
            continue
        time_ratio = run.timed_seconds / baseline.timed_seconds
        memory_delta = None
        if run.peak_memory_bytes is not None and baseline.peak_memory_bytes is not None:
            memory_delta = run.peak_memory_bytes - baseline.peak_memory_bytes
        options.append(FixOption(run, describe_fix(run), time_ratio, memory_delta))
    options.sort(key=lambda option: option.run.timed_seconds)
    return options


def _format_peak(stats: ModuleStats) -> str:
    return f"{stats.max_abs:.3g}" if stats.nonfinite is None else stats.nonfinite


def diagnose(
    latents: LatentStats,
    runs: list[DecodeRun],
    min_psnr: float = DEFAULT_MIN_PSNR,
) -> Verdict:
    """Name the failure (latents, VAE overflow, non-finite VAE, near miss or none).

    The latents are checked first, because extreme latents make any VAE fail. The
    baseline for costs is the main VAE's fp16 decode, or the reference without one.
    """
    main_runs = [run for run in runs if run.vae_label == MAIN_VAE]
    reference = next(run for run in main_runs if run.dtype == REFERENCE_DTYPE)
    baseline = next((run for run in main_runs if run.dtype == "fp16"), reference)
    options = rank_fixes(runs, baseline, reference, min_psnr)
    verdict = Verdict(
        kind="clean", summary="", baseline=baseline.label, options=options
    )

    if latents.extreme:
        return _latents_verdict(verdict, latents, baseline)
    if not reference.finite:
        return _nonfinite_reference_verdict(verdict, reference)
    overflow = baseline.first_above_fp16_max or reference.first_above_fp16_max
    failing = [run for run in main_runs if not run_works(run, reference, min_psnr)]
    if overflow is not None:
        return _overflow_verdict(verdict, baseline, reference, overflow)
    if failing:
        return _failing_run_verdict(verdict, failing[0], min_psnr)
    near = reference.first_above_warning or baseline.first_above_warning
    if near is not None:
        verdict.kind = "near-overflow"
        verdict.module = near.name
        verdict.summary = (
            f"no overflow, but {near.name} reaches {_format_peak(near)}, above the "
            f"warning level {reference.warning_level:.3g} and close to the fp16 "
            f"maximum {FP16_MAX:.0f}; brighter scenes may overflow"
        )
        return verdict
    peak = reference.peak
    verdict.summary = (
        f"no overflow: the largest activation is {_format_peak(peak)} at {peak.name}, "
        f"below the warning level {reference.warning_level:.3g}"
        if peak
        else "no overflow"
    )
    return verdict


def _latents_verdict(
    verdict: Verdict, latents: LatentStats, baseline: DecodeRun
) -> Verdict:
    verdict.kind = "latents"
    consequence = ""
    if baseline.first_above_fp16_max is not None:
        consequence = (
            f"; the {baseline.label} decode also exceeds the fp16 maximum at "
            f"{baseline.first_above_fp16_max.name} as a consequence"
        )
    verdict.summary = (
        f"the latents are extreme ({'; '.join(latents.problems)}), so the VAE is not "
        "the cause: check the UNet, LoRA weights, guidance and sampler settings"
        + consequence
    )
    return verdict


def _failing_run_verdict(verdict: Verdict, run: DecodeRun, min_psnr: float) -> Verdict:
    first = run.first_nonfinite
    verdict.module = first.name if first else None
    if not run.finite or run.black:
        verdict.kind = "vae-nonfinite"
        where = f"{first.nonfinite} first appears at {first.name}" if first else ""
        outcome = "decodes black" if run.finite else "is non-finite"
        verdict.summary = (
            f"the {run.label} decode {outcome} without exceeding the fp16 maximum"
            + (f"; {where}" if where else "")
        )
        return verdict
    verdict.kind = "precision-loss"
    verdict.summary = (
        f"the {run.label} decode is finite but differs from the fp32 decode "
        f"(PSNR {run.psnr:.1f} dB, below {min_psnr:g} dB)"
    )
    return verdict


def _nonfinite_reference_verdict(verdict: Verdict, reference: DecodeRun) -> Verdict:
    first = reference.first_nonfinite
    verdict.kind = "vae-nonfinite"
    verdict.module = first.name if first else None
    verdict.summary = (
        "even the fp32 decode is non-finite"
        + (f" (first {first.nonfinite} at {first.name})" if first else "")
        + ", so the VAE weights themselves are broken; use another VAE"
    )
    return verdict


def _overflow_verdict(
    verdict: Verdict, baseline: DecodeRun, reference: DecodeRun, overflow: ModuleStats
) -> Verdict:
    verdict.kind = "vae-overflow"
    verdict.module = overflow.name
    reference_stats = next(
        (stats for stats in reference.modules if stats.name == overflow.name), None
    )
    peak_text = (
        f"{_format_peak(reference_stats)} in fp32" if reference_stats else "unknown"
    )
    if baseline.dtype == "fp16":
        first_bad = baseline.first_nonfinite
        outcome = (
            f"{first_bad.nonfinite} first appears at {first_bad.name}"
            if first_bad
            else "no inf or NaN appears"
        )
        image = "black" if baseline.black else "not black"
        verdict.summary = (
            f"the fp16 decode overflows at {overflow.name} (max |activation| "
            f"{peak_text}, above the fp16 maximum {FP16_MAX:.0f}); {outcome} and the "
            f"image decodes {image}"
        )
    else:
        verdict.summary = (
            f"an fp16 decode would overflow at {overflow.name} (max |activation| "
            f"{peak_text}, above the fp16 maximum {FP16_MAX:.0f}); fp16 was not probed"
        )
    if not verdict.options:
        verdict.summary += "; no probed decode works"
    return verdict


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

    latent_stats = latent_statistics(latents, scaling_factor)

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


# Loading ------------------------------------------------------------------------


def read_latents_file(path: Path) -> tuple[torch.Tensor, dict]:
    """Read `render --save-latents` output: the "latents" tensor and its metadata.

    Returns the tensor as stored and the parsed "renderqa" metadata ({} when absent).
    Raises InvalidInputError for a missing, unreadable or tensor-less file.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InvalidInputError(f"{path}: latents file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "latents" not in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                raise InvalidInputError(
                    f"{path}: no tensor named 'latents' (found: "
                    f"{', '.join(handle.keys()) or 'none'}); pass a file written by "
                    "render --save-latents"
                )
            latents = handle.get_tensor("latents")
    except SafetensorError as error:
        raise InvalidInputError(
            f"{path}: not a readable safetensors file ({error})"
        ) from None
    try:
        parameters = json.loads(metadata.get("renderqa", "{}"))
    except ValueError:
        raise InvalidInputError(
            f"{path}: the 'renderqa' metadata is not valid JSON"
        ) from None
    return latents, parameters if isinstance(parameters, dict) else {}


def replay_render(
    parameters: dict,
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Render again from a renderqa parameters record; return the final latents.

    `parameters` is the JSON that render stores in a PNG (prompt, seed, steps, size,
    guidance, threshold, model, vae, scheduler, dtype). `model` and `dtype` replace
    the recorded ones. Latents come back (1, C, h, w) in the UNet's space, on the CPU.
    """
    from renderqa.core.pipeline import load_pipeline
    from renderqa.core.render import (
        RenderRequest,
        ThresholdSettings,
        check_request,
        render_batch,
    )

    model = model or parameters.get("model")
    missing = [key for key in ("prompt", "seed") if key not in parameters]
    if not model:
        missing.append("model")
    if missing:
        raise InvalidInputError(
            f"the render record lacks {', '.join(missing)}, so it cannot be replayed; "
            "pass the .latents.safetensors file instead"
        )
    threshold = parameters.get("threshold")
    request = RenderRequest(
        prompt=parameters["prompt"],
        seed=int(parameters["seed"]),
        negative_prompt=parameters.get("negative_prompt") or "",
        steps=int(parameters.get("steps", 30)),
        width=parameters.get("width"),
        height=parameters.get("height"),
        guidance_scale=float(parameters.get("guidance_scale", 7.5)),
        guidance_rescale=float(parameters.get("guidance_rescale", 0.0)),
        threshold=ThresholdSettings(**threshold) if threshold else None,
    )
    check_request(request)
    loaded = load_pipeline(
        model,
        vae=parameters.get("vae"),
        device=device,
        dtype=dtype or parameters.get("dtype") or "auto",
        scheduler=parameters.get("scheduler") or "default",
    )
    result = render_batch(loaded, [request], progress=progress)[0]
    return result.latents


def load_probe_vae(source: str, option: str):
    """Load the AutoencoderKL of `source` in fp32 on the CPU.

    `source` is a diffusers pipeline folder (its vae/ subfolder is used), a VAE
    folder, a VAE or full single-file checkpoint, or a Hugging Face repo id of
    either kind.
    """
    from diffusers import AutoencoderKL

    from renderqa.core.pipeline import load_pipeline, load_vae

    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            return AutoencoderKL.from_pretrained(
                path, subfolder="vae", torch_dtype=torch.float32
            ).eval()
        if path.is_file() and _is_full_checkpoint(path):
            return load_pipeline(source, device="cpu", dtype="fp32").pipe.vae.eval()
        if not path.exists() and _cached_pipeline(source):
            return AutoencoderKL.from_pretrained(
                source,
                subfolder="vae",
                torch_dtype=torch.float32,
                local_files_only=True,
            ).eval()
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{option} {source}: cannot load its VAE ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from None
    return load_vae(source, torch.float32).eval()


def _is_full_checkpoint(path: Path) -> bool:
    from renderqa.core.pipeline import detect_checkpoint_kind

    try:
        detect_checkpoint_kind(path)
    except ModelLoadError:
        return False
    return True


def _cached_pipeline(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except HFValidationError:
        return False


# Outputs ------------------------------------------------------------------------

CSV_COLUMNS = (
    "run",
    "vae",
    "dtype",
    "order",
    "module",
    "kind",
    "calls",
    "min",
    "max",
    "max_abs",
    "nonfinite",
    "above_warning",
    "above_fp16_max",
)


def module_rows(report: ProbeReport) -> list[dict]:
    """Return one row per (run, module) with every statistic, in decoder order."""
    rows = []
    for run in report.runs:
        for stats in run.modules:
            rows.append(
                {
                    "run": run.label,
                    "vae": run.vae_source,
                    "dtype": run.dtype,
                    "order": stats.order,
                    "module": stats.name,
                    "kind": stats.kind,
                    "calls": stats.calls,
                    "min": stats.min_value,
                    "max": stats.max_value,
                    "max_abs": stats.max_abs,
                    "nonfinite": stats.nonfinite or "",
                    "above_warning": stats.above(run.warning_level),
                    "above_fp16_max": stats.above(FP16_MAX),
                }
            )
    return rows


def write_module_csv(report: ProbeReport, path: Path) -> None:
    """Write every module's statistics for every run as CSV, atomically."""
    import pandas as pd

    frame = pd.DataFrame(module_rows(report), columns=list(CSV_COLUMNS))
    with atomic_path(path) as tmp_path:
        frame.to_csv(tmp_path, index=False)


def plot_activations(report: ProbeReport, path: Path) -> None:
    """Plot max |activation| per module in decoder order, one line per run.

    The y axis is logarithmic. The fp16 maximum and the warning level are drawn as
    horizontal lines, and inf or NaN outputs as crosses at the top of the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [stats.name for stats in report.reference.modules]
    figure, axes = plt.subplots(figsize=(max(8.0, len(order) * 0.12), 4.5))
    ceiling = FP16_MAX * 10
    for run in report.runs:
        values = {stats.name: stats.max_abs for stats in run.modules}
        xs = [i for i, name in enumerate(order) if name in values]
        ys = [values[order[i]] for i in xs]
        finite = [
            (x, max(y, 1e-6)) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)
        ]
        ceiling = max([ceiling, *(y * 2 for _, y in finite)])
        style = "--" if run.vae_label == ALTERNATE_VAE else "-"
        line = axes.plot(
            *zip(*finite, strict=True), style, label=run.label, linewidth=1.2
        )
        bad = [x for x, y in zip(xs, ys, strict=True) if not math.isfinite(y)]
        if bad:
            color = line[0].get_color()
            axes.scatter(bad, [ceiling] * len(bad), marker="x", color=color)
    axes.axhline(FP16_MAX, color="red", linestyle="-", label="fp16 max (65504)")
    axes.axhline(
        report.warning_level,
        color="grey",
        linestyle=":",
        label=f"warning level ({report.warning_level:.3g})",
    )
    axes.set_yscale("log")
    axes.set_xlabel("module in decoder order (x: inf or NaN)")
    axes.set_ylabel("max |activation|")
    axes.set_title("VAE decoder activations per module")
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)
    plt.close(figure)


def save_decoded_images(report: ProbeReport, out_dir: Path) -> list[Path]:
    """Save each run's decode as `decode-<run>.png`, NaN shown as black."""
    paths = []
    for run in report.runs:
        path = out_dir / f"decode-{run.label}.png"
        image = Image.fromarray(to_uint8(displayed_pixels(run.pixels)), mode="RGB")
        save_png(path, image, {"renderqa-vae-probe": run.label})
        paths.append(path)
    return paths


def summary_dict(report: ProbeReport) -> dict:
    """Return the report without module tables or pixels, for JSON."""
    verdict = report.verdict
    recommendation = verdict.recommendation
    return {
        "verdict": verdict.kind,
        "summary": verdict.summary,
        "module": verdict.module,
        "recommendation": recommendation.description if recommendation else None,
        "baseline": verdict.baseline,
        "device": report.device,
        "tiling": report.tiling,
        "warning_level": report.warning_level,
        "latents": {
            "shape": list(report.latents.shape),
            "mean": report.latents.mean,
            "std": report.latents.std,
            "max_abs": report.latents.max_abs,
            "nonfinite_count": report.latents.nonfinite_count,
            "scaling_factor": report.latents.scaling_factor,
            "vae_space_std": report.latents.vae_space_std,
            "problems": report.latents.problems,
        },
        "runs": [_run_summary(run) for run in report.runs],
        "fixes": [
            {
                "run": option.run.label,
                "fix": option.description,
                "time_ratio": option.time_ratio,
                "memory_delta_bytes": option.memory_delta_bytes,
            }
            for option in verdict.options
        ],
    }


def _run_summary(run: DecodeRun) -> dict:
    def name(stats: ModuleStats | None) -> str | None:
        return stats.name if stats else None

    peak = run.peak
    return {
        "run": run.label,
        "vae": run.vae_source,
        "dtype": run.dtype,
        "finite": run.finite,
        "black": run.black,
        "max_activation": _json_float(peak.max_abs) if peak else None,
        "max_activation_module": name(peak),
        "first_above_warning": name(run.first_above_warning),
        "first_above_fp16_max": name(run.first_above_fp16_max),
        "first_nonfinite": name(run.first_nonfinite),
        "probed_seconds": run.probed_seconds,
        "seconds": run.seconds,
        "peak_memory_bytes": run.peak_memory_bytes,
        "largest_activation_bytes": run.largest_activation_bytes,
        "max_diff": run.max_diff,
        "psnr": _json_float(run.psnr),
        "ssim": run.ssim,
    }


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)


def write_probe_outputs(report: ProbeReport, out_dir: Path) -> dict[str, Path]:
    """Write the CSV, plot, decoded images and summary JSON into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "modules.csv",
        "plot": out_dir / "activations.png",
        "summary": out_dir / "summary.json",
    }
    write_module_csv(report, paths["csv"])
    plot_activations(report, paths["plot"])
    for index, path in enumerate(save_decoded_images(report, out_dir)):
        paths[f"image{index}"] = path
    write_text_atomic(paths["summary"], json.dumps(summary_dict(report), indent=2))
    return paths
