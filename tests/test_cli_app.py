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


def test_atomic_write_uses_umask_permissions(tmp_path):
    import os

    from renderqa.core.atomic import write_text_atomic

    target = tmp_path / "out.txt"
    umask = os.umask(0o022)
    try:
        write_text_atomic(target, "ok")
    finally:
        os.umask(umask)
    assert target.read_text() == "ok"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
