"""The renderqa Typer application: one subcommand per module of this package."""

from __future__ import annotations

import typer

from renderqa.cli import (
    render,
    score_vlm,
    seam_check,
    sweep_rescale,
    upscale,
    vae_probe,
)
from renderqa.cli.common import configure_logging

app = typer.Typer(
    name="renderqa",
    help="Diffusion render QA and tuning: guidance, sweeps, upscaling, seams, VAE "
    "overflow and vision-LLM scoring.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in tracebacks could show API keys, so Typer's pretty tracebacks stay off.
    pretty_exceptions_enable=False,
)


@app.callback()
def configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings only."),
) -> None:
    """Set up logging before any subcommand runs."""
    configure_logging(verbose=verbose, quiet=quiet)


app.command(
    "render", help="Render prompts with CFG, guidance rescale and thresholding."
)(render.command)
app.command(
    "sweep-rescale",
    help="Sweep guidance rescale and scale over prompts and seeds; score each image.",
)(sweep_rescale.command)
app.command("upscale", help="Upscale images in feathered tiles with any upscaler.")(
    upscale.command
)
app.command("seam-check", help="Find tile seams in images; exit 1 when found.")(
    seam_check.command
)
app.command(
    "vae-probe", help="Replay latents through the VAE with hooks to find overflow."
)(vae_probe.command)
app.command("score-vlm", help="Ask vision LLMs for a validated verdict on each image.")(
    score_vlm.command
)


def main() -> None:
    """Entry point of the `renderqa` console script."""
    app()
