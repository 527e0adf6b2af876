"""The `seam-check` subcommand: find tile seams in images, exit 1 when found."""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.atomic import check_output_file, write_text_atomic
from renderqa.core.errors import InvalidInputError, OutputError, RenderQAError
from renderqa.core.imageio import DEFAULT_MAX_PIXELS, check_max_pixels
from renderqa.core.seams import (
    HORIZONTAL,
    VERTICAL,
    SeamReport,
    SeamSettings,
    TilePlan,
    find_seams_in_luma,
)
from renderqa.core.seams_io import (
    read_luma,
    read_rgb8,
    write_profile_plot,
    write_seam_overlay,
)
from renderqa.core.tiling import check_tile_plan

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
CSV_COLUMNS = [
    "path",
    "status",
    "width",
    "height",
    "orientation",
    "position",
    "strength_ratio",
    "tone_ratio",
    "difference",
    "neighbour_difference",
    "tone_step",
    "detected_by",
    "on_grid",
    "error",
]


@dataclass
class FileResult:
    """The outcome for one input: a report, or the error that stopped it."""

    path: Path
    report: SeamReport | None = None
    error: str | None = None
    bit_depth: int | None = None
    has_alpha: bool = False

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        return "clean" if self.report.clean else "seams"


@report_errors
def command(
    paths: list[str] = typer.Argument(
        ..., help="Image files, folders (their images, not recursive) or glob patterns."
    ),
    tile: int | None = typer.Option(
        None, "--tile", help="Tile size of the plan, in input pixels; omit to estimate."
    ),
    overlap: int = typer.Option(
        0, "--overlap", help="Overlap between tiles of the plan, in input pixels."
    ),
    scale: int = typer.Option(
        1,
        "--scale",
        help="Upscale factor applied to the tiles (output / input pixels).",
    ),
    factor: float = typer.Option(
        3.0, "--factor", help="Ratio over nearby lines at which a line is a seam."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Write every result, seam and tile grid to this JSON file."
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Write one row per seam (or per clean / failed file) here."
    ),
    overlay: Path | None = typer.Option(
        None,
        "--overlay",
        help="Folder for a copy of each image with seams marked and a profile plot.",
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Images checked in parallel."),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS,
        "--max-pixels",
        help="Reject images with more pixels than this (decompression bombs).",
    ),
) -> None:
    """Find tile seams; exit 0 when clean, 1 when seams are found, 2 on bad input."""
    settings, plan = _check_options(tile, overlap, scale, factor, jobs)
    check_max_pixels(max_pixels)
    for option, target in (("--json", json_path), ("--csv", csv_path)):
        if target is not None:
            check_output_file(target, option)
    files = expand_paths(paths)
    if overlay is not None:
        _make_folder(overlay)

    results = _check_files(files, plan, settings, overlay, jobs, max_pixels)
    _print_results(results)
    try:
        if json_path is not None:
            report = results_to_json(results, plan, settings)
            write_text_atomic(json_path, json.dumps(report, indent=2))
        if csv_path is not None:
            write_text_atomic(csv_path, results_to_csv(results))
    except OSError as error:
        raise OutputError(
            f"cannot write the report ({error}); check --json/--csv"
        ) from None

    statuses = {result.status for result in results}
    if "error" in statuses:
        raise typer.Exit(2)
    if "seams" in statuses:
        raise typer.Exit(1)


def _check_options(
    tile: int | None, overlap: int, scale: int, factor: float, jobs: int
) -> tuple[SeamSettings, TilePlan | None]:
    if jobs < 1:
        raise InvalidInputError(f"--jobs {jobs} must be 1 or more")
    if not math.isfinite(factor):
        raise InvalidInputError(f"--factor {factor} must be a finite number, e.g. 3")
    settings = SeamSettings(factor=factor, grid_factor=min(2.0, factor))
    if tile is None:
        if overlap or scale != 1:
            raise InvalidInputError(
                "--overlap and --scale describe a tile plan; pass --tile as well, or "
                "omit them to estimate the tile grid from the image"
            )
        return settings, None
    check_tile_plan(tile, overlap)
    if scale < 1:
        raise InvalidInputError(f"--scale {scale} must be a positive integer")
    return settings, TilePlan(tile=tile, overlap=overlap, scale=scale)


def expand_paths(paths: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a list of files, in order given.

    A path that matches nothing is kept, so it is reported as not found.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            )
        elif not path.exists() and glob.has_magic(raw):
            matches = sorted(Path(match) for match in glob.glob(raw))
            files.extend(matches if matches else [path])
        else:
            files.append(path)
    if not files:
        raise InvalidInputError("no image files found in the paths given")
    return list(dict.fromkeys(files))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"--overlay {folder}: cannot create the folder ({error})"
        ) from None


def check_file(
    path: Path,
    plan: TilePlan | None,
    settings: SeamSettings,
    overlay: Path | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FileResult:
    """Check one file; an unreadable file or a plan that does not fit is an error row."""
    try:
        image = read_luma(path, max_pixels)
        report = find_seams_in_luma(image.luma, plan, settings)
        if overlay is not None:
            _write_overlays(path, report, settings, overlay)
    except RenderQAError as error:
        message = str(error)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        return FileResult(path=path, error=message)
    return FileResult(
        path=path, report=report, bit_depth=image.bit_depth, has_alpha=image.has_alpha
    )


def _write_overlays(
    path: Path, report: SeamReport, settings: SeamSettings, folder: Path
) -> None:
    positions = {
        orientation: [s.position for s in report.seams if s.orientation == orientation]
        for orientation in (VERTICAL, HORIZONTAL)
    }
    stem = _overlay_stem(path)
    try:
        write_seam_overlay(
            folder / f"{stem}.seams.png",
            read_rgb8(path),
            positions[VERTICAL],
            positions[HORIZONTAL],
        )
        profiles = {
            "column": (
                report.scores[VERTICAL].difference,
                report.scores[VERTICAL].line_score(),
                positions[VERTICAL],
            ),
            "row": (
                report.scores[HORIZONTAL].difference,
                report.scores[HORIZONTAL].line_score(),
                positions[HORIZONTAL],
            ),
        }
        write_profile_plot(
            folder / f"{stem}.profiles.png", path.name, profiles, settings.factor
        )
    except OSError as error:
        raise OutputError(
            f"--overlay {folder}: cannot write for {path} ({error})"
        ) from None


def _overlay_stem(path: Path) -> str:
    """Return an overlay file stem unique to `path`: its name plus a short path hash."""
    import hashlib

    digest = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:8]
    return f"{path.stem}-{digest}"


def _check_files(
    files: list[Path],
    plan: TilePlan | None,
    settings: SeamSettings,
    overlay: Path | None,
    jobs: int,
    max_pixels: int,
) -> list[FileResult]:
    """Check every file, `jobs` at a time, with a progress bar on stderr.

    Threads, not processes: decoding and the numpy passes release the GIL, and
    threads avoid copying 4K planes between processes (measured in
    tests/benchmarks/bench_seam_check.py).
    """
    progress = Progress(
        TextColumn("seam-check"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr_console,
        transient=True,
    )
    with progress, ThreadPoolExecutor(max_workers=jobs) as executor:
        task = progress.add_task("files", total=len(files))
        futures = [
            executor.submit(check_file, path, plan, settings, overlay, max_pixels)
            for path in files
        ]
        results = []
        for future in futures:
            results.append(future.result())
            progress.advance(task)
    return results


def _print_results(results: list[FileResult]) -> None:
    table = Table(title="seam-check", show_lines=False)
    for column in (
        "file",
        "status",
        "size",
        "vertical seams",
        "horizontal seams",
        "max ratio",
    ):
        table.add_column(column, overflow="fold")
    for result in results:
        if result.error is not None:
            table.add_row(str(result.path), "[red]error[/]", "", "", "", "")
            continue
        report = result.report
        found = {
            orientation: [s for s in report.seams if s.orientation == orientation]
            for orientation in (VERTICAL, HORIZONTAL)
        }
        max_ratio = max(
            (max(s.strength_ratio, s.tone_ratio) for s in report.seams), default=None
        )
        table.add_row(
            str(result.path),
            "[green]clean[/]" if report.clean else "[yellow]seams[/]",
            f"{report.width}x{report.height}",
            _positions_text(found[VERTICAL]),
            _positions_text(found[HORIZONTAL]),
            "" if max_ratio is None else f"{max_ratio:.1f}",
        )
    stdout_console.print(table)
    for result in results:
        if result.error is not None:
            stderr_console.print(f"[bold red]error:[/] {result.error}", highlight=False)


def _positions_text(seams: list) -> str:
    if not seams:
        return "-"
    shown = ", ".join(str(s.position) for s in seams[:8])
    return shown if len(seams) <= 8 else f"{shown}, ... ({len(seams)})"


def results_to_json(
    results: list[FileResult], plan: TilePlan | None, settings: SeamSettings
) -> dict:
    """Return the JSON document of a run: settings, plan, and one entry per file."""
    files = []
    for result in results:
        entry: dict = {"path": str(result.path), "status": result.status}
        if result.error is not None:
            entry["error"] = result.error
        else:
            report = result.report
            entry.update(
                width=report.width,
                height=report.height,
                bit_depth=result.bit_depth,
                alpha_ignored=result.has_alpha,
                seams=[asdict(seam) for seam in report.seams],
                grids={
                    orientation: None if grid is None else asdict(grid)
                    for orientation, grid in report.grids.items()
                },
            )
        files.append(entry)
    return {
        "settings": asdict(settings),
        "plan": None if plan is None else asdict(plan),
        "files": files,
    }


def results_to_csv(results: list[FileResult]) -> str:
    """Return CSV text: one row per seam, and one row per clean or failed file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        base = {"path": str(result.path), "status": result.status}
        if result.error is not None:
            writer.writerow({**base, "error": result.error})
            continue
        base.update(width=result.report.width, height=result.report.height)
        if result.report.clean:
            writer.writerow(base)
        for seam in result.report.seams:
            writer.writerow({**base, **asdict(seam)})
    return buffer.getvalue()
