"""SIGKILL or Ctrl-C at random points, then a rerun, gives the uninterrupted results.

The interrupted runs are `python -m renderqa.cli sweep-rescale` subprocesses, each
signalled at a random moment after it has appended a new row, and a last run
finishes the sweep. Its results.csv must equal that of one uninterrupted run in
every column but the wall-clock ones, with no torn or duplicated rows, and its
images must be byte-identical.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures import make_tiny_clip
from renderqa.cli.app import app
from renderqa.sweeps.store import RESULT_COLUMNS, TIMING_COLUMNS

BUILD_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "build"
# Ctrl-C (SIGINT) among the SIGKILLs: it must also leave whole rows only.
SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    built = BUILD_DIR / "tiny-sdxl-eps"
    if (built / "model_index.json").is_file():
        return built
    from fixtures.tiny_pipelines import save_fixture_pipeline

    out = tmp_path_factory.mktemp("pipelines")
    path = save_fixture_pipeline("tiny-sdxl-eps", out)
    shutil.rmtree(out / ".tiny-sdxl-eps-tokenizers", ignore_errors=True)
    return path


def sweep_args(model: Path, clip: Path, out: Path) -> list[str]:
    return [
        "sweep-rescale",
        "--model",
        str(model),
        "--prompt",
        "a red mug",
        "--prompt",
        "a blue vase, studio light",
        "--seeds",
        "0-2",
        "--guidance-scale",
        "9",
        "--guidance-rescale",
        "0,0.7",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--batch-size",
        "2",
        "--clip-model",
        str(clip / "tiny-clip.json"),
        "--clip-pretrained",
        str(clip / "tiny-clip.safetensors"),
        "--out",
        str(out),
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def data_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").splitlines(keepends=True)[1:]


def run_and_kill(
    args: list[str],
    results: Path,
    rng: random.Random,
    signal_number: int,
    max_delay: float = 0.5,
) -> int:
    """Start a run, signal it at a random moment after it adds a row; return its code.

    The delay after the row is drawn from [0, max_delay] seconds.
    """
    rows_before = len(data_lines(results))
    process = subprocess.Popen(
        [sys.executable, "-m", "renderqa.cli", "--quiet", *args],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(data_lines(results)) > rows_before:
                break
            time.sleep(0.01)
        # A random extra delay spreads the kill over the image, CLIP and append work.
        time.sleep(rng.uniform(0.0, max_delay))
    finally:
        process.send_signal(signal_number)
        code = process.wait(timeout=120)
    return code


def comparable(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {key: value for key, value in row.items() if key not in TIMING_COLUMNS}
        for row in rows
    ]


@pytest.mark.slow
def test_killed_sweep_resumes_identically(tiny_sdxl, tmp_path):
    clip = make_tiny_clip.built_or_build(BUILD_DIR, tmp_path / "clip")
    rng = random.Random(20261204)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    # The uninterrupted run and the final resuming run go in-process; only the
    # runs that get killed need their own process.
    first = CliRunner().invoke(app, sweep_args(tiny_sdxl, clip, reference))
    assert first.exit_code == 0, first.output

    results = resumed / "results.csv"
    for number, signal_number in enumerate(SIGNALS):
        # The first run is signalled as soon as its first row lands, so it is
        # interrupted mid-sweep even on a machine fast enough to finish the other
        # batches within the random delay.
        code = run_and_kill(
            sweep_args(tiny_sdxl, clip, resumed),
            results,
            rng,
            signal_number,
            max_delay=0.0 if number == 0 else 0.5,
        )
        if number == 0:
            assert 0 < len(data_lines(results)) < 12
        if signal_number == signal.SIGINT:
            assert code in (130, 0), f"Ctrl-C exit code {code}"
    last = CliRunner().invoke(app, sweep_args(tiny_sdxl, clip, resumed))
    assert last.exit_code == 0, last.output

    raw = (resumed / "results.csv").read_text(encoding="utf-8")
    assert raw.endswith("\n")
    with open(resumed / "results.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.reader(handle))
    assert all(len(cells) == len(RESULT_COLUMNS) for cells in records)
    point_ids = [cells[0] for cells in records[1:]]
    assert len(point_ids) == len(set(point_ids)) == 12

    assert comparable(resumed / "results.csv") == comparable(reference / "results.csv")
    for row in comparable(reference / "results.csv"):
        image = row["image"]
        same = (resumed / image).read_bytes() == (reference / image).read_bytes()
        assert same, f"{image} differs after resuming"
    assert (resumed / "summary.csv").read_text().count("\n") == 3
