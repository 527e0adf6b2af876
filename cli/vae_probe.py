"""The `vae-probe` subcommand: replay latents through the VAE with hooks, per dtype."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.atomic import check_output_folder
from renderqa.core.devices import DTYPES, resolve_device
from renderqa.core.errors import ImageReadError, InvalidInputError, OutputError
from renderqa.core.vae_probe import (
    DEFAULT_WARNING_LEVEL,
    check_dtypes_run,
    dtype_support_error,
    parse_dtypes,
    probe_vae,
)
from renderqa.core.vae_probe_hooks import ModuleStats
from renderqa.core.vae_probe_inputs import (
    load_probe_vae,
    read_latents_file,
    replay_render,
)
from renderqa.core.vae_probe_output import write_probe_outputs
from renderqa.core.vae_probe_verdict import (
    ALTERNATE_VAE,
    DEFAULT_MIN_PSNR,
    FIXABLE_VERDICTS,
    FP16_MAX,
    MAIN_VAE,
    DecodeRun,
    ProbeReport,
)

logger = logging.getLogger("renderqa.cli.vae_probe")

LATENTS_SUFFIX = ".safetensors"


def _check_options(
    warning_level: float, min_psnr: float, top: int, tile_size: int | None
) -> None:
    if not math.isfinite(warning_level) or warning_level <= 0:
        raise InvalidInputError(
            f"--warning-level {warning_level} must be a positive number, e.g. 6e4"
        )
    if not math.isfinite(min_psnr) or min_psnr < 0:
        raise InvalidInputError(
            f"--min-psnr {min_psnr} must be a number of dB >= 0, e.g. 25"
        )
    if top < 1:
        raise InvalidInputError(f"--top {top} must be at least 1")
    if tile_size is not None and tile_size < 1:
        raise InvalidInputError(f"--tile-size {tile_size} must be a positive size")


def _choose_dtypes(text: str | None, device: torch.device) -> list[str]:
    """Parse --dtypes; without it, use every dtype this device can decode in."""
    if text is not None:
        names = parse_dtypes(text)
        check_dtypes_run(device, names)  # before any model loads
        return names
    usable = []
    for name in DTYPES:
        reason = dtype_support_error(device, name)
        if reason is None:
            usable.append(name)
        else:
            logger.warning("skipping %s on %s: %s", name, device, reason)
    return usable


def _read_png_record(path: Path) -> dict:
    from renderqa.core.imageio import read_json_chunk

    try:
        record = read_json_chunk(path, "renderqa")
    except (OSError, ValueError) as error:
        raise ImageReadError(
            f"{path}: cannot read the PNG's renderqa metadata ({error})"
        ) from None
    if not isinstance(record, dict):
        raise InvalidInputError(
            f"{path}: the PNG has no renderqa metadata, so there is nothing to "
            "replay; pass a PNG written by renderqa render, its .latents.safetensors "
            "file, or --model, --prompt and --seed"
        )
    return record


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]vae-probe"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr_console,
        transient=True,
    )


def _replay(
    parameters: dict, model: str | None, device: str, dtype: str | None
) -> torch.Tensor:
    """Render the recorded request again, with a progress bar over the steps."""
    with _progress_bar() as progress:
        task = progress.add_task("replaying the render", total=None)

        def report(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        return replay_render(
            parameters, model=model, device=device, dtype=dtype, progress=report
        )


def _load_latents(
    source: Path | None,
    options: dict,
) -> tuple[torch.Tensor, dict]:
    """Return UNet-space latents and the render record they come with."""
    if source is not None and (
        options["prompt"] is not None or options["seed"] is not None
    ):
        raise InvalidInputError(
            f"{source}: --prompt and --seed render new latents, so they cannot be "
            "combined with a latents file or PNG; drop one of them"
        )
    if source is not None and source.suffix.lower() == LATENTS_SUFFIX:
        return read_latents_file(source)
    if source is not None and source.suffix.lower() == ".png":
        if not source.is_file():
            raise ImageReadError(f"{source}: file not found")
        record = _read_png_record(source)
        latents = _replay(record, options["model"], options["device"], options["dtype"])
        return latents, record
    if source is not None:
        raise InvalidInputError(
            f"{source}: unsupported input; pass a .latents.safetensors file from "
            "render --save-latents or a PNG written by renderqa render"
        )
    if options["prompt"] is None or options["seed"] is None or not options["model"]:
        raise InvalidInputError(
            "nothing to probe: pass a .latents.safetensors file or a renderqa PNG, "
            "or --model, --prompt and --seed to render the latents"
        )
    record = {
        key: options[key]
        for key in (
            "model",
            "prompt",
            "negative_prompt",
            "seed",
            "steps",
            "width",
            "height",
            "guidance_scale",
            "guidance_rescale",
            "scheduler",
        )
    }
    latents = _replay(record, options["model"], options["device"], options["dtype"])
    return latents, record


def _scale_factors(record: dict, vae) -> tuple[float, float | None]:
    """Use the scaling the render recorded, warning when the VAE's config differs."""
    config_scaling = float(vae.config.scaling_factor)
    config_shift = vae.config.get("shift_factor")
    scaling = record.get("vae_scaling_factor")
    if scaling is None:
        return config_scaling, config_shift
    if not math.isclose(float(scaling), config_scaling, rel_tol=1e-6):
        logger.warning(
            "the render recorded scaling_factor %s but the VAE's config has %s; "
            "using the recorded value",
            scaling,
            config_scaling,
        )
    return float(scaling), record.get("vae_shift_factor", config_shift)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def _memory_text(run: DecodeRun) -> str:
    if run.peak_memory_bytes is not None:
        return f"{run.peak_memory_bytes / 2**20:.1f} MiB"
    return f"({run.largest_activation_bytes / 2**20:.2f} MiB)"


def _runs_table(report: ProbeReport) -> Table:
    table = Table(
        title="decodes (fp32 of the main VAE is the reference)",
        caption="memory: CUDA peak allocation of the plain decode beyond the weights. "
        "In brackets: the largest single activation, where no peak is measured.",
    )
    headers = (
        "run",
        "finite",
        "black",
        "max |act|",
        f"first > {report.warning_level:.3g}",
        "first > 65504",
        "first inf/NaN",
        "decode s",
        "probed s",
        "memory",
        "max diff",
        "PSNR dB",
        "SSIM",
    )
    for header in headers:
        table.add_column(header, overflow="fold", no_wrap=header == "run")
    for run in report.runs:
        first_bad = run.first_nonfinite
        table.add_row(
            run.label,
            "yes" if run.finite else "[red]no[/]",
            "[red]yes[/]" if run.black else "no",
            _number(run.peak.max_abs) if run.peak else "-",
            run.first_above_warning.name if run.first_above_warning else "-",
            run.first_above_fp16_max.name if run.first_above_fp16_max else "-",
            f"{first_bad.nonfinite} {first_bad.name}" if first_bad else "-",
            _number(run.seconds),
            _number(run.probed_seconds),
            _memory_text(run),
            _number(run.max_diff),
            _number(run.psnr, 4),
            _number(run.ssim, 4),
        )
    return table


def _cell(stats: ModuleStats | None, warning_level: float) -> str:
    if stats is None:
        return "-"
    text = _number(stats.max_abs)
    if stats.above(FP16_MAX):
        return f"[bold red]{text}[/]"
    if stats.above(warning_level):
        return f"[yellow]{text}[/]"
    return text


def _worst_modules_table(report: ProbeReport, top: int) -> Table:
    by_run = [{stats.name: stats for stats in run.modules} for run in report.runs]

    def worst(stats: ModuleStats) -> float:
        values = [
            lookup[stats.name].max_abs for lookup in by_run if stats.name in lookup
        ]
        return max(math.inf if math.isnan(value) else value for value in values)

    reference = report.reference.modules
    ranked = sorted(reference, key=lambda stats: (-worst(stats), stats.order))[:top]
    table = Table(title=f"worst {len(ranked)} modules by max |activation|")
    for header in ("order", "module", "kind", "calls"):
        table.add_column(header, overflow="fold")
    for run in report.runs:
        table.add_column(run.label, justify="right")
    for stats in ranked:
        cells = [
            _cell(lookup.get(stats.name), report.warning_level) for lookup in by_run
        ]
        table.add_row(
            str(stats.order), stats.name, stats.kind, str(stats.calls), *cells
        )
    return table


def _print_latents(report: ProbeReport) -> None:
    stats = report.latents
    stdout_console.print(
        f"latents {stats.shape}: mean {_number(stats.mean)}, std {_number(stats.std)}, "
        f"max |z| {_number(stats.max_abs)}, non-finite {stats.nonfinite_count}; "
        f"expected std about {stats.expected_std:g} (scaling_factor "
        f"{stats.scaling_factor:g}, std {_number(stats.vae_space_std)} in the VAE's "
        "space)",
        highlight=False,
        soft_wrap=True,
    )
    for problem in stats.problems:
        stdout_console.print(f"[red]latents: {problem}[/]", highlight=False)


def _print_verdict(report: ProbeReport) -> None:
    verdict = report.verdict
    colour = "green" if verdict.kind == "clean" else "yellow"
    if verdict.kind in (*FIXABLE_VERDICTS, "latents"):
        colour = "red"
    stdout_console.print(
        f"[bold {colour}]verdict: {verdict.kind}[/] - {verdict.summary}",
        highlight=False,
        soft_wrap=True,
    )
    recommendation = verdict.recommendation
    if recommendation is not None:
        stdout_console.print(
            f"[bold]cheapest fix:[/] {recommendation.description}",
            highlight=False,
            soft_wrap=True,
        )
    if verdict.kind in FIXABLE_VERDICTS:
        for option in verdict.options:
            memory = (
                ""
                if option.memory_delta_bytes is None
                else f", {option.memory_delta_bytes / 2**20:+.0f} MiB"
            )
            stdout_console.print(
                f"  {option.run.label}: {option.description}: "
                f"{_number(option.time_ratio)}x the {verdict.baseline} decode time"
                f"{memory}",
                highlight=False,
                soft_wrap=True,
            )


@report_errors
def command(
    source: Path | None = typer.Argument(
        None,
        help="A .latents.safetensors file from render --save-latents, or a renderqa "
        "PNG to replay. Omit it to render from --model, --prompt and --seed.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Model whose VAE decodes: a diffusers pipeline or VAE folder, a single "
        "file or a repo id (default: the VAE or model the render recorded).",
    ),
    vae: str | None = typer.Option(
        None,
        "--vae",
        help="A second VAE to probe beside the model's, e.g. an fp16-fix checkpoint.",
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt to render."),
    negative_prompt: str = typer.Option(
        "", "--negative-prompt", help="Negative prompt to render."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed to render."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps."),
    width: int | None = typer.Option(
        None, "--width", help="Width in pixels (default the model's native size)."
    ),
    height: int | None = typer.Option(
        None, "--height", help="Height in pixels (default the model's native size)."
    ),
    guidance_scale: float = typer.Option(
        7.5, "--guidance-scale", help="Classifier-free guidance scale."
    ),
    guidance_rescale: float = typer.Option(
        0.0, "--guidance-rescale", help="Guidance rescale factor in [0, 1]."
    ),
    scheduler: str = typer.Option(
        "default", "--scheduler", help="Scheduler name (default the model's own)."
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="UNet dtype for a replay: auto, fp32, fp16 or bf16 (default: the "
        "recorded one).",
    ),
    dtypes: str | None = typer.Option(
        None,
        "--dtypes",
        help="Decode dtypes, comma-separated, e.g. fp16,bf16,fp32 (default: each "
        "one the device can run). fp32 always runs as the reference.",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cuda, cuda:N, mps or cpu."
    ),
    warning_level: float = typer.Option(
        DEFAULT_WARNING_LEVEL,
        "--warning-level",
        help="Max |activation| reported as close to the fp16 limit of 65504.",
    ),
    min_psnr: float = typer.Option(
        DEFAULT_MIN_PSNR,
        "--min-psnr",
        help="PSNR in dB against the fp32 decode below which a fix does not count.",
    ),
    tile_size: int | None = typer.Option(
        None,
        "--tile-size",
        help="Turn on VAE tiling with square tiles of this many output pixels.",
    ),
    timing: bool = typer.Option(
        True,
        "--timing/--no-timing",
        help="Time a plain decode per dtype after the probed one.",
    ),
    top: int = typer.Option(10, "--top", help="Rows in the worst-modules table."),
    out: Path = typer.Option(
        Path("vae-probe-out"),
        "--out",
        "-o",
        help="Folder for the CSV, plot, decoded images and summary.json.",
    ),
) -> None:
    """Replay latents through the VAE with hooks to find overflow, per dtype."""
    _check_options(warning_level, min_psnr, top, tile_size)
    torch_device = resolve_device(device)
    decode_dtypes = _choose_dtypes(dtypes, torch_device)

    options = {
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "width": width,
        "height": height,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "scheduler": scheduler,
        "device": device,
        "dtype": dtype,
    }
    check_output_folder(out, "--out")
    latents, record = _load_latents(source, options)

    vae_source = model or record.get("vae") or record.get("model")
    if not vae_source:
        raise InvalidInputError(
            f"{source}: the file records no model or VAE; pass --model with the "
            "model or VAE that made the latents"
        )
    vaes = {MAIN_VAE: (load_probe_vae(vae_source, "--model"), vae_source)}
    if vae is not None:
        vaes[ALTERNATE_VAE] = (load_probe_vae(vae, "--vae"), vae)
    scaling_factor, shift_factor = _scale_factors(record, vaes[MAIN_VAE][0])

    with _progress_bar() as progress:
        task = progress.add_task("decoding", total=None)

        def report_step(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=label)

        report = probe_vae(
            vaes,
            latents,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            dtypes=decode_dtypes,
            device=torch_device,
            warning_level=warning_level,
            min_psnr=min_psnr,
            tile_size=tile_size,
            timing=timing,
            latents_name=str(source) if source else "replayed latents",
            progress=report_step,
        )
    try:
        paths = write_probe_outputs(report, out)
    except OSError as error:
        raise OutputError(f"--out {out}: cannot write the outputs ({error})") from None

    _print_latents(report)
    stdout_console.print(_runs_table(report))
    stdout_console.print(_worst_modules_table(report, top))
    _print_verdict(report)
    stdout_console.print(
        f"outputs: {paths['csv']}, {paths['plot']}, {paths['summary']} and "
        f"{len(report.runs)} decoded images in {out}",
        highlight=False,
        soft_wrap=True,
    )
