"""The sweep folder on disk: manifest, resumable results.csv, and what --overwrite clears.

results.csv grows by one whole line per image, appended with a single write and an
fsync, so a SIGKILL at any moment leaves whole rows and at most one torn final line.
Opening the store drops that torn line (rewriting the file atomically) and reads
the finished point ids, which the runner then skips.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from renderqa.core.atomic import (
    append_line_durably,
    check_output_folder,
    write_text_atomic,
)
from renderqa.core.errors import InvalidInputError, OutputError
from renderqa.sweeps.definition import SweepDefinition

logger = logging.getLogger(__name__)

MANIFEST_NAME = "sweep.json"
RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.csv"
PLOT_NAME = "saturation_vs_clip.png"
IMAGES_DIR = "images"
SHEETS_DIR = "sheets"

RESULT_COLUMNS = (
    "point_id",
    "prompt_id",
    "prompt",
    "negative_prompt",
    "seed",
    "guidance_scale",
    "guidance_rescale",
    "rescale_space",
    "threshold",
    "guidance_enabled",
    "num_inference_steps",
    "width",
    "height",
    "scheduler",
    "model",
    "model_kind",
    "vae",
    "device",
    "dtype",
    "image",
    "saturation_threshold",
    "saturated_fraction",
    "clip_cosine_raw",
    "clip_model",
    "clip_pretrained",
    "clip_resize",
    "clip_caption_truncated",
    "std_ratio",
    "finite",
    "black",
    "render_seconds",
    "clip_seconds",
    "renderqa_version",
    "torch_version",
    "diffusers_version",
    "open_clip_version",
    "sweep_hash",
)
# Wall-clock columns: they differ between runs of the same sweep.
TIMING_COLUMNS = ("render_seconds", "clip_seconds")


def format_row(row: dict[str, Any]) -> str:
    """Format one results row as a CSV line with a trailing newline."""
    missing = [column for column in RESULT_COLUMNS if column not in row]
    assert not missing, f"results row lacks columns {missing}"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([_cell(row[column]) for column in RESULT_COLUMNS])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def header_line() -> str:
    return ",".join(RESULT_COLUMNS) + "\n"


class SweepStore:
    """A sweep folder: opened once per run, then appended to one row per image."""

    def __init__(self, folder: Path, definition: SweepDefinition):
        self.folder = folder
        self.definition = definition
        self.results_path = folder / RESULTS_NAME
        self.manifest_path = folder / MANIFEST_NAME

    def check(self, overwrite: bool) -> dict[str, dict[str, str]]:
        """Check the folder without changing it; return the finished rows by point id.

        Runs before any model loads, so a bad folder fails fast and an --overwrite
        run that fails to load its models has not cleared anything yet. Raises
        InvalidInputError for a different sweep or foreign files (unless
        `overwrite`), and OutputError for a folder that cannot be written.
        """
        self._check_writable()
        if overwrite:
            return {}
        self._check_same_sweep()
        if not self.results_path.exists():
            return {}
        return self._read_finished_rows(repair=False)

    def open(self, overwrite: bool) -> dict[str, dict[str, str]]:
        """Create or resume the folder; return the finished rows by point id."""
        finished = self.check(overwrite)
        if overwrite:
            self.clear()
        # The manifest comes first: a folder with outputs but no manifest is foreign.
        if not self.manifest_path.exists():
            self._write_manifest()
        if self.results_path.exists():
            finished = self._read_finished_rows(repair=True)
        else:
            write_text_atomic(self.results_path, header_line())
        (self.folder / IMAGES_DIR).mkdir(exist_ok=True)
        return finished

    def append(self, row: dict[str, Any]) -> None:
        """Append one finished image's row durably."""
        try:
            append_line_durably(self.results_path, format_row(row))
        except OSError as error:
            raise OutputError(
                f"cannot append to {self.results_path} ({error.strerror}); finished "
                "rows are kept and a rerun resumes from them"
            ) from None

    def clear(self) -> None:
        """Delete what a sweep writes here (and nothing else) for --overwrite."""
        for name in (MANIFEST_NAME, RESULTS_NAME, SUMMARY_NAME, PLOT_NAME):
            (self.folder / name).unlink(missing_ok=True)
        for name in (IMAGES_DIR, SHEETS_DIR):
            if (self.folder / name).is_dir():
                shutil.rmtree(self.folder / name)

    def _check_writable(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(
                f"--out {self.folder}: cannot create the folder ({error.strerror}); "
                "choose a writable location"
            ) from None
        check_output_folder(self.folder, "--out")

    def _check_same_sweep(self) -> None:
        if not self.manifest_path.exists():
            foreign = sorted(
                path.name
                for path in self.folder.iterdir()
                if not path.name.startswith(".")
            )
            if foreign:
                raise InvalidInputError(
                    f"--out {self.folder} is not empty and contains no {MANIFEST_NAME} "
                    f"(found {', '.join(foreign[:3])}); choose an empty folder or "
                    "pass --overwrite to clear the sweep outputs there"
                )
            return
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidInputError(
                f"{self.manifest_path} is unreadable ({error}); pass --overwrite to "
                "start the sweep afresh"
            ) from None
        expected = self.definition.sweep_hash()
        if manifest.get("sweep_hash") != expected:
            changed = _changed_settings(manifest.get("definition", {}), self.definition)
            raise InvalidInputError(
                f"--out {self.folder} contains a different sweep (hash "
                f"{manifest.get('sweep_hash')}, this one {expected}; changed: "
                f"{', '.join(changed) or 'unknown'}); pass --overwrite to replace it "
                "or choose another --out"
            )

    def _write_manifest(self) -> None:
        manifest = {
            "sweep_hash": self.definition.sweep_hash(),
            "definition": self.definition.identity(),
            "columns": list(RESULT_COLUMNS),
        }
        write_text_atomic(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def _read_finished_rows(self, repair: bool) -> dict[str, dict[str, str]]:
        raw = self.results_path.read_text(encoding="utf-8")
        whole, _, torn = raw.rpartition("\n")
        if torn and repair:
            logger.warning(
                "dropping a torn final line of %s (%d characters); that image is "
                "rendered again",
                self.results_path,
                len(torn),
            )
            write_text_atomic(self.results_path, whole + "\n")
        rows = list(csv.reader(io.StringIO(whole + "\n")))
        if not rows or tuple(rows[0]) != RESULT_COLUMNS:
            raise InvalidInputError(
                f"{self.results_path} has different columns than this version "
                "writes; pass --overwrite to start the sweep afresh"
            )
        finished: dict[str, dict[str, str]] = {}
        for line_number, cells in enumerate(rows[1:], start=2):
            if len(cells) != len(RESULT_COLUMNS):
                raise InvalidInputError(
                    f"{self.results_path} line {line_number} has {len(cells)} fields, "
                    f"expected {len(RESULT_COLUMNS)}; pass --overwrite to start afresh"
                )
            row = dict(zip(RESULT_COLUMNS, cells, strict=True))
            if row["point_id"] in finished:
                logger.warning(
                    "%s lists %s twice; the first row is kept",
                    self.results_path,
                    row["point_id"],
                )
                continue
            finished[row["point_id"]] = row
        return finished


def read_results(path: Path) -> list[dict[str, str]]:
    """Read the whole rows of a results.csv, ignoring a torn final line."""
    raw = path.read_text(encoding="utf-8")
    whole = raw.rpartition("\n")[0]
    return list(csv.DictReader(io.StringIO(whole + "\n")))


def _changed_settings(old: dict[str, Any], definition: SweepDefinition) -> list[str]:
    new = json.loads(json.dumps(definition.identity()))
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
