"""The verdict on a VAE probe: latent statistics, decode comparison and fix ranking.

The records a probe returns (`LatentStats`, `DecodeRun`, `FixOption`, `Verdict` and
`ProbeReport`) are defined here too, because the verdict reads them and the probe
and the output writers both use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from renderqa.core.render import BLACK_LEVEL
from renderqa.core.vae_probe_hooks import ModuleStats

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
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
    # Std of the latents the decoder receives, measured after the pipeline's unscale.
    measured_vae_space_std: float | None = None

    @property
    def vae_space_std(self) -> float:
        """Std of the latents as the decoder receives them, after the pipeline's unscale.

        Without a measured value, this is std / scaling_factor, which is exact for
        pipelines that only divide by scaling_factor (and add a shift_factor).
        """
        if self.measured_vae_space_std is not None:
            return self.measured_vae_space_std
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


def latent_statistics(
    latents: torch.Tensor,
    scaling_factor: float,
    vae_space_latents: torch.Tensor | None = None,
) -> LatentStats:
    """Measure UNet-space latents and list what is extreme about them.

    Pass `vae_space_latents` (the same latents after the pipeline's unscale) to
    measure their std. Without them it is derived as std / scaling_factor, which is
    wrong for VAE configs with per-channel latents_mean and latents_std.
    """
    finite = _finite_values(latents)
    nonfinite_count = latents.numel() - finite.numel()
    if finite.numel() == 0:
        mean = std = max_abs = math.nan
    else:
        mean = finite.mean().item()
        std = finite.std(correction=0).item()
        max_abs = finite.abs().max().item()
    measured = None
    if vae_space_latents is not None:
        unscaled = _finite_values(vae_space_latents)
        measured = unscaled.std(correction=0).item() if unscaled.numel() else math.nan
    stats = LatentStats(
        shape=tuple(latents.shape),
        mean=mean,
        std=std,
        max_abs=max_abs,
        nonfinite_count=nonfinite_count,
        scaling_factor=scaling_factor,
        measured_vae_space_std=measured,
    )
    stats.problems = _latent_problems(stats)
    return stats


def _finite_values(tensor: torch.Tensor) -> torch.Tensor:
    values = tensor.detach().to(torch.float64).flatten()
    return values[torch.isfinite(values)]


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
