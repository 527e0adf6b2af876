"""The `score-vlm` subcommand: validated verdicts from vision LLMs on each render."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from renderqa.cli.common import report_errors, stderr_console, stdout_console
from renderqa.core.errors import ImageReadError, InvalidInputError, RemoteError
from renderqa.core.vlm import (
    MODES,
    ScoreReport,
    ScoreSettings,
    check_settings,
    score_images,
)
from renderqa.core.vlm_client import EndpointSettings, RetryPolicy
from renderqa.core.vlm_redact import RedactingFilter, Redactor
from renderqa.core.vlm_rubric import DEFAULT_RUBRIC, load_rubric

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
DIM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@report_errors
def command(
    images: list[Path] = typer.Argument(
        ..., help="Image files, or folders whose images are all scored."
    ),
    model: list[str] = typer.Option(
        ..., "--model", "-m", help="Model name as the endpoint lists it; repeatable."
    ),
    mode: str = typer.Option(
        "fallback",
        help="How several models are used. "
        + " ".join(f"{name}: {text}." for name, text in MODES.items()),
    ),
    out: Path = typer.Option(
        Path("score-vlm-out"),
        help="Folder for verdicts.jsonl, verdicts.csv, panel.csv.",
    ),
    base_url: str | None = typer.Option(
        None, help="Endpoint base URL ending in /v1; default: $OPENAI_BASE_URL."
    ),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", help="Name of the environment variable that contains the key."
    ),
    rubric: Path | None = typer.Option(
        None, help="Rubric file (.toml or .json); default: the built-in rubric."
    ),
    source: Path | None = typer.Option(
        None, help="Source image sent with every render to judge colour drift."
    ),
    max_side: int = typer.Option(
        2048, help="Downscale images whose long side exceeds this, in pixels."
    ),
    concurrency: int = typer.Option(4, help="Requests in flight at once."),
    max_retries: int = typer.Option(
        3,
        help="Retries of a request after 429, 5xx, a timeout or a dropped connection.",
    ),
    backoff: float = typer.Option(
        1.0, help="First retry delay in seconds; doubles each retry, with jitter."
    ),
    max_retry_wait: float = typer.Option(
        60.0, help="Longest Retry-After in seconds that is honoured; longer fails."
    ),
    connect_timeout: float = typer.Option(10.0, help="Connect timeout in seconds."),
    read_timeout: float = typer.Option(120.0, help="Read timeout in seconds."),
    rpm: float | None = typer.Option(
        None, help="Maximum requests started per minute; default: no limit."
    ),
    dim: list[str] = typer.Option(
        [], help="NAME=VALUE sent as header x-bf-dim-NAME (Bifrost); repeatable."
    ),
    use_async: bool = typer.Option(
        False, "--async", help="Submit to the gateway's async API and poll for results."
    ),
    poll_interval: float = typer.Option(2.0, help="Seconds between async polls."),
    async_timeout: float = typer.Option(
        1800.0, help="Seconds to wait for an async job before giving up."
    ),
    temperature: float | None = typer.Option(
        None, help="Sampling temperature; default: the model's own."
    ),
    max_tokens: int | None = typer.Option(
        None, help="Maximum tokens per reply (max_tokens); default: the server's."
    ),
) -> None:
    """Ask vision LLMs for a validated verdict on each image, through any
    OpenAI-compatible endpoint."""
    endpoint = EndpointSettings(
        base_url=_base_url(base_url),
        api_key=_api_key(api_key_env),
        connect_timeout=_positive("--connect-timeout", connect_timeout),
        read_timeout=_positive("--read-timeout", read_timeout),
        concurrency=concurrency,
        requests_per_minute=None if rpm is None else _positive("--rpm", rpm),
        dims=_parse_dims(dim),
        use_async=use_async,
        poll_interval=_positive("--poll-interval", poll_interval, allow_zero=True),
        async_timeout=_positive("--async-timeout", async_timeout),
    )
    retry = RetryPolicy(
        max_retries=_non_negative_int("--max-retries", max_retries),
        backoff=_positive("--backoff", backoff, allow_zero=True),
        max_wait=_positive("--max-retry-wait", max_retry_wait, allow_zero=True),
    )
    settings = ScoreSettings(
        models=tuple(model),
        mode=mode,
        rubric=DEFAULT_RUBRIC if rubric is None else load_rubric(rubric),
        out_dir=out,
        source=source,
        max_side=max_side,
        temperature=temperature,
        max_tokens=None
        if max_tokens is None
        else _non_negative_int("--max-tokens", max_tokens),
    )
    paths = _expand_images(images)
    # Checked here as well as in core, so a bad option fails before the progress
    # bar starts and the error stays on one line.
    check_settings(settings, endpoint)

    # Every handler scrubs the key, including those of libraries' loggers.
    key_filter = RedactingFilter(Redactor([endpoint.api_key]))
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(key_filter)
    try:
        report = _run_with_progress(paths, settings, endpoint, retry)
    finally:
        for handler in handlers:
            handler.removeFilter(key_filter)

    _print_summary(report, settings)
    _raise_for_failures(report)


def _run_with_progress(
    paths: list[Path],
    settings: ScoreSettings,
    endpoint: EndpointSettings,
    retry: RetryPolicy,
) -> ScoreReport:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
    ) as bar:
        task = bar.add_task("scoring", total=None)

        def advance(done: int, total: int, row: dict) -> None:
            bar.update(task, completed=done, total=total)

        return score_images(paths, settings, endpoint, retry, progress=advance)


def _base_url(option: str | None) -> str:
    url = option or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise InvalidInputError(
            "no endpoint configured: pass --base-url or set OPENAI_BASE_URL to the "
            "server's base URL (the part before /chat/completions)"
        )
    return url


def _api_key(variable: str) -> str:
    key = os.environ.get(variable, "").strip()
    if not key:
        raise InvalidInputError(
            f"environment variable {variable} is not set or empty; export the API key "
            "there or name another variable with --api-key-env (for a local server "
            "without keys, any placeholder works)"
        )
    return key


def _positive(option: str, value: float, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise InvalidInputError(f"{option} must be {rule}, got {value:g}")
    return value


def _non_negative_int(option: str, value: int) -> int:
    if value < 0:
        raise InvalidInputError(f"{option} must be >= 0, got {value}")
    return value


def _parse_dims(values: list[str]) -> dict[str, str]:
    dims = {}
    for value in values:
        name, sep, dim_value = value.partition("=")
        if not sep or not DIM_NAME.match(name) or not dim_value:
            raise InvalidInputError(
                f"--dim {value!r} must be NAME=VALUE with NAME of letters, digits, "
                "'-' or '_' and a non-empty VALUE"
            )
        if not dim_value.isascii() or not dim_value.isprintable():
            raise InvalidInputError(f"--dim {name}: the value must be printable ASCII")
        dims[name] = dim_value
    return dims


def _expand_images(images: list[Path]) -> list[Path]:
    """Expand folders to their image files; keep files, even missing ones, as given.

    A missing or unreadable file becomes an error row, so the others are scored.
    """
    paths: list[Path] = []
    for path in images:
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InvalidInputError(f"{path}: folder contains no image files")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def _print_summary(report: ScoreReport, settings: ScoreSettings) -> None:
    table = Table(title=f"score-vlm ({settings.mode})")
    for column in ("model", "verdicts", "pass rate", "errors"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for column in ("p50 s", "p90 s", "p99 s", "prompt tok", "completion tok"):
        table.add_column(column, justify="right")

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for summary in report.summaries:
        rate = summary.pass_rate
        table.add_row(
            summary.model,
            str(summary.verdicts),
            "-" if rate is None else f"{rate:.0%}",
            str(summary.errors),
            seconds(summary.latency_p50),
            seconds(summary.latency_p90),
            seconds(summary.latency_p99),
            str(summary.prompt_tokens),
            str(summary.completion_tokens),
        )
    stdout_console.print(table)
    if report.panel:
        counts = {k: 0 for k in ("pass", "fail", "tie", "")}
        for aggregate in report.panel:
            counts[aggregate.overall] += 1
        disagreements = sum(a.disagreement for a in report.panel)
        stdout_console.print(
            f"panel: {len(report.panel)} images; pass {counts['pass']}, fail "
            f"{counts['fail']}, tie {counts['tie']}, no verdict {counts['']}; "
            f"{disagreements} with disagreement"
        )
    stdout_console.print(
        f"scored {report.scored}, skipped {report.skipped} already done; outputs in "
        f"{settings.out_dir}",
        highlight=False,
    )


def _raise_for_failures(report: ScoreReport) -> None:
    """Exit non-zero when the run stopped or any image or request failed."""
    if report.stopped is not None:
        raise report.stopped
    errors = [row for row in report.rows if row["status"] == "error"]
    if not errors:
        return
    image_errors = [row for row in errors if row["error_kind"] == "image"]
    if image_errors:
        unreadable = len({row["image"] for row in image_errors})
        first = image_errors[0]["error"]
        raise ImageReadError(
            f"{unreadable} image(s) could not be read (first: {first}); the others "
            "were scored"
        )
    first = errors[0]
    raise RemoteError(
        f"{len(errors)} of {len(report.rows)} request(s) got no valid verdict (first: "
        f"{first['image']}: {first['model']}: {first['error']}); see the error column "
        "of verdicts.csv, and rerun to retry them"
    )
