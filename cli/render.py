"""The `render` subcommand: render prompts with renderqa's guidance and report
the guided/conditional std ratio and the saturated-pixel fraction per image."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.atomic import check_output_folder
from renderqa.core.devices import DEVICE_CHOICES, DTYPE_CHOICES
from renderqa.core.errors import InvalidInputError, OutputError
from renderqa.core.ranges import parse_seeds
from renderqa.core.render import (
    RenderRequest,
    RenderResult,
    ThresholdSettings,
    check_request,
    render_batch,
    save_latents,
    save_render,
)
from renderqa.core.schedulers import SCHEDULERS, check_scheduler_name

logger = logging.getLogger("renderqa.cli.render")


def _slug(text: str, limit: int = 40) -> str:
    # \w keeps letters of every script, so non-Latin prompts still name their files.
    slug = re.sub(r"[\W_]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "render"


def _threshold_settings(
    mode: str, percentile: float, mimic_scale: float | None, per_channel: bool
):
    if mode == "off":
        if mimic_scale is not None:
            raise InvalidInputError(
                "--mimic-scale needs --threshold-mode latent; add it or drop --mimic-scale"
            )
        return None
    return ThresholdSettings(
        mode=mode,
        percentile=percentile,
        mimic_scale=mimic_scale,
        per_channel=per_channel,
    )


def _create_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"--out {out}: cannot create the folder ({error.strerror})"
        ) from None


def _summary_table(rows: list[tuple[RenderResult, Path]]) -> Table:
    table = Table(title="render summary")
    table.add_column("seed", justify="right")
    table.add_column("file", overflow="fold")
    table.add_column("std ratio (cfg)", justify="right")
    table.add_column("std ratio (final)", justify="right")
    table.add_column("saturated %", justify="right")
    table.add_column("status")
    for result, path in rows:
        cfg = "-" if result.std_ratio_cfg is None else f"{result.std_ratio_cfg:.3f}"
        final = "-" if result.std_ratio is None else f"{result.std_ratio:.3f}"
        status = result.status
        if result.vae_fallback:
            status += f" (VAE redone in {result.vae_fallback})"
        style = "green" if result.status == "ok" else "bold red"
        table.add_row(
            str(result.request.seed),
            path.name,
            cfg,
            final,
            f"{100 * result.saturated_fraction:.3f}",
            f"[{style}]{status}[/]",
        )
    return table


@report_errors
def command(
    prompt: str = typer.Argument(..., help="Text prompt to render."),
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Hugging Face repo id, local diffusers folder, or single-file "
        ".safetensors/.ckpt checkpoint (SD 1.x, 2.x or SDXL).",
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="For single-file checkpoints: a local diffusers folder (or cached repo id) "
        "of the same architecture that supplies the component configs.",
    ),
    vae: str | None = typer.Option(
        None, "--vae", help="Separate VAE: folder, file or repo id."
    ),
    negative_prompt: str = typer.Option(
        "", "--negative-prompt", "-n", help="Negative prompt."
    ),
    seeds: str = typer.Option("0", "--seeds", "-s", help="Seeds: 3, 0-3 or 1,5,9."),
    steps: int = typer.Option(30, "--steps", help="Number of denoising steps."),
    width: int | None = typer.Option(
        None, "--width", help="Width in pixels, a multiple of 8 (default: the model's)."
    ),
    height: int | None = typer.Option(
        None,
        "--height",
        help="Height in pixels, a multiple of 8 (default: the model's).",
    ),
    scheduler: str = typer.Option(
        "default",
        "--scheduler",
        help=f"Sampler: {', '.join(SCHEDULERS)} (default keeps the model's own).",
    ),
    guidance_scale: float = typer.Option(
        7.5, "--guidance-scale", "-g", help="CFG scale w; w <= 1 turns CFG off."
    ),
    guidance_rescale: float = typer.Option(
        0.0,
        "--guidance-rescale",
        "-r",
        help="Rescale factor phi in [0, 1]; 0.7 is common.",
    ),
    threshold_mode: str = typer.Option(
        "off",
        "--threshold-mode",
        help="Dynamic thresholding: off; latent (relative to --mimic-scale, for latent "
        "models); pixel (Imagen's rule for [-1, 1] pixel-space x0).",
    ),
    threshold_percentile: float = typer.Option(
        0.995, "--threshold-percentile", help="Percentile p of |x0|, in (0, 1]."
    ),
    mimic_scale: float | None = typer.Option(
        None,
        "--mimic-scale",
        help="Guidance scale whose x0 range is the reference (latent mode).",
    ),
    threshold_per_channel: bool = typer.Option(
        False,
        "--threshold-per-channel",
        help="Latent mode: take the statistic per channel.",
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Seeds per UNet batch."),
    device: str = typer.Option(
        "auto", "--device", help=f"One of {', '.join(DEVICE_CHOICES)}."
    ),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help=f"Model dtype: {', '.join(DTYPE_CHOICES)} (auto: fp16 on GPU).",
    ),
    vae_dtype: str = typer.Option(
        "auto",
        "--vae-dtype",
        help=f"VAE decode dtype: {', '.join(DTYPE_CHOICES)} (auto follows diffusers).",
    ),
    channels_last: bool = typer.Option(
        False,
        "--channels-last",
        help="Run UNet and VAE in channels-last memory format.",
    ),
    save_latents_flag: bool = typer.Option(
        False, "--save-latents", help="Also write <png stem>.latents.safetensors."
    ),
    out: Path = typer.Option(Path("renders"), "--out", "-o", help="Output folder."),
) -> None:
    """Render PROMPT for each seed and report std ratio and saturation per image."""
    # 1. Validate every option before any model loads.
    seed_list = parse_seeds(seeds)
    check_scheduler_name(scheduler)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size {batch_size} must be at least 1")
    if threshold_mode not in ("off", "latent", "pixel"):
        raise InvalidInputError(
            f"--threshold-mode {threshold_mode!r} is unknown; use off, latent or pixel"
        )
    if not 0.0 < threshold_percentile <= 1.0:
        raise InvalidInputError(
            f"--threshold-percentile {threshold_percentile} must be in (0, 1], e.g. 0.995"
        )
    threshold = _threshold_settings(
        threshold_mode, threshold_percentile, mimic_scale, threshold_per_channel
    )
    requests = [
        RenderRequest(
            prompt=prompt,
            seed=seed,
            negative_prompt=negative_prompt,
            steps=steps,
            width=width,
            height=height,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            threshold=threshold,
        )
        for seed in seed_list
    ]
    for request in requests:
        check_request(request)
    if guidance_scale <= 1:
        ignored = [
            name
            for name, active in (
                ("--negative-prompt", bool(negative_prompt)),
                ("--guidance-rescale", guidance_rescale > 0),
                ("--threshold-mode", threshold is not None),
            )
            if active
        ]
        logger.warning(
            "--guidance-scale %s <= 1 turns classifier-free guidance off, as in diffusers%s",
            guidance_scale,
            f": {', '.join(ignored)} will have no effect" if ignored else "",
        )
    check_output_folder(out, "--out")

    # 2. Load the pipeline once.
    from renderqa.core.pipeline import load_pipeline

    with stderr_console.status(f"loading {model}"):
        loaded = load_pipeline(
            model,
            vae=vae,
            config=config,
            device=device,
            dtype=dtype,
            vae_dtype=vae_dtype,
            scheduler=scheduler,
            channels_last=channels_last,
        )

    # 3. Render in batches, writing each image as soon as it is decoded.
    _create_out_dir(out)
    rows: list[tuple[RenderResult, Path]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    total_steps = steps * len(requests)
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task("denoising steps", total=total_steps)
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            done_before = start * steps

            def advance(
                step: int,
                total: int,
                batch_len: int = len(batch),
                base: int = done_before,
            ) -> None:
                bar.update(task, completed=base + step * batch_len)

            for result in render_batch(loaded, batch, progress=advance):
                rows.append(
                    (result, _write_result(result, out, prompt, save_latents_flag))
                )

    # 4. Report.
    stdout_console.print(_summary_table(rows))
    failed = [result for result, _ in rows if result.status != "ok"]
    if failed:
        stderr_console.print(
            f"[bold red]{len(failed)} render(s) decoded non-finite or black[/]; they were "
            "written with a -failed suffix; try --vae-dtype fp32 or renderqa vae-probe"
        )
        raise typer.Exit(1)


def _write_result(
    result: RenderResult, out: Path, prompt: str, with_latents: bool
) -> Path:
    stem = f"{_slug(prompt)}-seed{result.request.seed}"
    if result.status != "ok":
        # A broken decode is never written under the name a good render would get.
        stem += f"-failed-{result.status}"
    path = out / f"{stem}.png"
    try:
        save_render(result, path)
        if with_latents:
            save_latents(result, out / f"{stem}.latents.safetensors")
    except OSError as error:
        raise OutputError(
            f"--out {out}: cannot write {path.name} ({error.strerror})"
        ) from None
    return path
