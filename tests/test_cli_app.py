"""The top-level CLI: help lists every subcommand, unbuilt ones exit non-zero."""

import subprocess
import sys

from typer.testing import CliRunner

from renderqa.cli.app import app

SUBCOMMANDS = [
    "render",
    "sweep-rescale",
    "upscale",
    "seam-check",
    "vae-probe",
    "score-vlm",
]


def test_help_lists_all_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


def test_console_script_runs_help():
    completed = subprocess.run(
        [sys.executable, "-m", "renderqa.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "seam-check" in completed.stdout
