"""The `sweep-rescale` subcommand: guidance rescale sweeps scored by saturation and CLIP."""

from __future__ import annotations

import logging
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.errors import InvalidInputError
from renderqa.sweeps.definition import (
    SweepDefinition,
    build_definition,
    load_sweep_file,
)
from renderqa.sweeps.runner import SweepOutcome, run_sweep

logger = logging.getLogger("renderqa.cli.sweep_rescale")


class _RateColumn(ProgressColumn):
    """Images per second over Rich's recent samples (resumed images excluded)."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("-- img/s" if speed is None else f"{speed:.2f} img/s")


def _merge_settings(file_settings: dict[str, Any], options: dict[str, Any]):
    """Overlay the options given on the command line onto the sweep file's settings."""
    settings = dict(file_settings)
    if options.get("prompts") or options.get("prompts_file"):
        settings.pop("prompts", None)
        settings.pop("prompts_file", None)
    for key, value in options.items():
        if value is not None and value != []:
            settings[key] = value
    return settings


def _parse_tolerance(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidInputError(
            f"--tolerance {text!r} is not a number; give a percentage such as 0.5"
        ) from None
    if not value.is_finite() or value < 0:
        raise InvalidInputError(
            f"--tolerance {text} must be a percentage of 0 or more, e.g. 0.5"
        )
    return value


def _warn_about_axes(definition: SweepDefinition) -> None:
    unguided = [s for s in definition.guidance_scales if Decimal(s) <= 1]
    if unguided:
        logger.warning(
            "guidance_scale %s turns classifier-free guidance off (diffusers skips "
            "CFG at 1 or less), so rescale, thresholding and the negative prompt have "
            "no effect there",
            ", ".join(unguided),
        )
    if not any(Decimal(r) == 0 for r in definition.guidance_rescales):
        logger.warning(
            "--guidance-rescale lacks 0, so the CLIP change and the recommended "
            "setting cannot be computed; add 0 to the list"
        )


def _results_table(outcome: SweepOutcome, tolerance: Decimal) -> Table:
    table = Table(
        title=f"sweep-rescale: {outcome.folder}",
        caption=f"* least saturated setting whose CLIP cosine is within {tolerance}% "
        "of rescale 0 at the same guidance scale and thresholding; "
        "sat = saturated pixels, "
        "CI = 95% t interval, CLIP = raw cosine",
    )
    show_threshold = any(s.threshold != "off" for s in outcome.summaries)
    headers = ["", "scale", "rescale", "n", "sat %", "sat % CI", "CLIP", "CLIP chg %"]
    headers += ["std ratio"]
    if show_threshold:
        headers.insert(2, "threshold")
    for name in headers:
        table.add_column(name, justify="left" if name == "threshold" else "right")
    for summary in outcome.summaries:
        saturation = summary.metrics["saturated_fraction"]
        change = summary.clip_change_percent
        cells = [
            "*" if summary.recommended else "",
            summary.guidance_scale,
            summary.guidance_rescale,
            str(summary.images),
            _number(100 * saturation.mean, 3),
            _interval(100 * saturation.ci95_low, 100 * saturation.ci95_high),
            _number(summary.metrics["clip_cosine_raw"].mean, 4),
            "" if change is None else f"{change:+.2f}",
            _number(summary.metrics["std_ratio"].mean, 3),
        ]
        if show_threshold:
            cells.insert(2, summary.threshold)
        table.add_row(*cells, style="bold green" if summary.recommended else None)
    return table


def _number(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _interval(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"{low:.2f}..{high:.2f}"


@report_errors
def command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Sweep folder; rerunning the same sweep resumes it."
    ),
    sweep: Path | None = typer.Option(
        None, "--sweep", help="TOML sweep file; options given here replace its values."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Hugging Face id, diffusers folder or single file."
    ),
    vae: str | None = typer.Option(None, "--vae", help="Separate VAE (id or path)."),
    prompt: list[str] = typer.Option(
        [], "--prompt", help="A prompt; repeat for several (ids p00, p01, ...)."
    ),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="Prompts file: text (one per line) or CSV with id and prompt columns.",
    ),
    negative_prompt: str | None = typer.Option(
        None, "--negative-prompt", help="Negative prompt for every image."
    ),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Seeds, e.g. 0-3 or 1,5,9 (default 0-3)."
    ),
    guidance_scale: str | None = typer.Option(
        None,
        "--guidance-scale",
        help="Guidance scales, e.g. 5,9 or 5-9:2 (default 7.5).",
    ),
    guidance_rescale: str | None = typer.Option(
        None,
        "--guidance-rescale",
        help="Rescale factors in [0, 1], e.g. 0,0.3,0.5,0.7,1.0 (the default) or 0-1:0.25.",
    ),
    threshold: str | None = typer.Option(
        None,
        "--threshold",
        help="Thresholding choices: off, pixel:PERCENTILE, "
        "latent:PERCENTILE:MIMIC_SCALE[:per-channel] "
        "(default off).",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Denoising steps (default 30)."
    ),
    width: int | None = typer.Option(
        None, "--width", help="Width in pixels (default the model's native size)."
    ),
    height: int | None = typer.Option(
        None, "--height", help="Height in pixels (default the model's native size)."
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Scheduler name (default the model's own)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto, cuda, cuda:N, mps or cpu (default auto)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto, fp32, fp16 or bf16 (default auto)."
    ),
    clip_model: str | None = typer.Option(
        None,
        "--clip-model",
        help="open_clip model name, local-dir:FOLDER, or config .json (default ViT-B-32).",
    ),
    clip_pretrained: str | None = typer.Option(
        None,
        "--clip-pretrained",
        help="Pretrained tag (from the HF cache) or local checkpoint file "
        "(default laion2b_s34b_b79k with the default model).",
    ),
    clip_resize: str | None = typer.Option(
        None,
        "--clip-resize",
        help="pad (whole image, padded), crop (centre crop, open_clip's default) or "
        "squash (default pad).",
    ),
    saturation_threshold: str | None = typer.Option(
        None,
        "--saturation-threshold",
        help="A pixel is saturated when any channel is above this (default 0.97).",
    ),
    batch_size: int = typer.Option(
        4, "--batch-size", min=1, help="Images per UNet batch."
    ),
    clip_batch_size: int = typer.Option(
        32, "--clip-batch-size", min=1, help="Images per CLIP batch."
    ),
    tolerance: str = typer.Option(
        "0.5",
        "--tolerance",
        help="Allowed CLIP drop, in percent of rescale 0 at the same guidance scale and "
        "thresholding, for the recommended setting.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Clear the folder's sweep outputs and start afresh."
    ),
) -> None:
    """Sweep guidance rescale and scale over prompts and seeds; score each image."""
    file_settings = load_sweep_file(sweep) if sweep else {}
    options = {
        "model": model,
        "vae": vae,
        "prompts": list(prompt),
        "prompts_file": prompts_file,
        "negative_prompt": negative_prompt,
        "seeds": seeds,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "threshold": threshold,
        "steps": steps,
        "width": width,
        "height": height,
        "scheduler": scheduler,
        "device": device,
        "dtype": dtype,
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "clip_resize": clip_resize,
        "saturation_threshold": saturation_threshold,
    }
    definition = build_definition(_merge_settings(file_settings, options))
    tolerance_percent = _parse_tolerance(tolerance)
    _warn_about_axes(definition)

    progress = Progress(
        TextColumn("[bold]sweep-rescale"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=stderr_console,
    )
    task = progress.add_task("sweep", total=None)

    def report(done: int, total: int) -> None:
        # The bar starts with the first report, after the folder checks and model
        # loads, so an early error is not printed under an empty bar. The first
        # report carries the resumed count: a reset keeps it out of the rate.
        if progress.tasks[0].total is None:
            progress.start()
            progress.reset(task, total=total, completed=done)
        else:
            progress.update(task, completed=done)

    try:
        outcome = run_sweep(
            definition,
            out,
            batch_size=batch_size,
            clip_batch_size=clip_batch_size,
            overwrite=overwrite,
            tolerance_percent=tolerance_percent,
            progress=report,
        )
    finally:
        progress.stop()

    stdout_console.print(_results_table(outcome, tolerance_percent))
    stdout_console.print(
        f"{outcome.rendered} rendered, {outcome.skipped} already done; "
        f"results: {outcome.results_path}, summary: {outcome.summary_path}, "
        f"plot: {outcome.plot_path}, sheets: {len(outcome.sheets)} in "
        f"{outcome.folder / 'sheets'}",
        highlight=False,
        soft_wrap=True,
    )
