"""Scoring renders with vision LLMs: one validated verdict per image and model.

`score_images` runs the whole job. It reads finished rows from `verdicts.jsonl`
and sends the remaining images to the models with bounded concurrency. Each reply
is validated against the rubric, with one repair request for an invalid or
truncated reply. Each result is appended as a row, and `verdicts.csv` and
`panel.csv` are kept current.

Modes (see MODES): "fallback" sends to the models in order until one returns a
valid verdict. "panel" sends to every model and aggregates the verdicts per image.

A failed call, an invalid verdict and an unreadable image each become an error
row with no verdict. Such rows are never a pass, a zero or a default, and a rerun
tries them again. A rejected key (401) or an endpoint that cannot be reached stops
the run after writing the row that hit it. Unfinished pairs then have no row, so a
rerun resumes from there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from renderqa.core.atomic import append_line_durably, write_text_atomic
from renderqa.core.errors import (
    ImageReadError,
    InvalidInputError,
    OutputError,
    RemoteError,
)
from renderqa.core.vlm_client import (
    CallError,
    ChatClient,
    ChatResult,
    EndpointSettings,
    RetryPolicy,
    StopRunError,
)
from renderqa.core.vlm_output import (
    FALLBACK_KEY,
    ModelSummary,
    PanelAggregate,
    aggregate_panel,
    ensure_out_dir,
    latest_rows,
    panel_csv,
    read_rows,
    row_key,
    summarize,
    verdicts_csv,
)
from renderqa.core.vlm_redact import Redactor
from renderqa.core.vlm_request import (
    EncodedImage,
    build_chat_body,
    build_repair_body,
    encode_image,
)
from renderqa.core.vlm_rubric import Rubric, VerdictError, parse_verdict, verdict_model

logger = logging.getLogger(__name__)

MODES = {
    "fallback": "ask the models in order until one returns a valid verdict",
    "panel": "ask every model; majority pass/fail, mean score, disagreement flag",
}
# verdicts.csv is a view of verdicts.jsonl, so rewriting it more often than this
# only costs time; it is always rewritten when the run ends.
CSV_REWRITE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ScoreSettings:
    """Request settings: models, mode, rubric, optional source image, payload limits."""

    models: tuple[str, ...]
    mode: str
    rubric: Rubric
    out_dir: Path
    source: Path | None = None
    max_side: int = 2048
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass
class ScoreReport:
    """Rows of this job's images (latest per key), aggregates and the run's counts."""

    rows: list[dict[str, Any]]
    summaries: list[ModelSummary]
    panel: list[PanelAggregate]
    scored: int  # units finished in this run
    skipped: int  # units already finished by an earlier run
    stopped: RemoteError | None  # the error that stopped the run, if any


ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def check_settings(settings: ScoreSettings, endpoint: EndpointSettings) -> None:
    """Validate options before any request; raise InvalidInputError naming the fix."""
    if settings.mode not in MODES:
        raise InvalidInputError(
            f"--mode {settings.mode!r} is not a mode; choose one of {', '.join(MODES)}"
        )
    if not settings.models:
        raise InvalidInputError("no --model given; pass at least one model name")
    if len(set(settings.models)) != len(settings.models):
        raise InvalidInputError(f"--model values repeat: {', '.join(settings.models)}")
    if settings.max_side < 64:
        raise InvalidInputError(
            f"--max-side must be >= 64 pixels, got {settings.max_side}"
        )
    if endpoint.concurrency < 1:
        raise InvalidInputError(
            f"--concurrency must be >= 1, got {endpoint.concurrency}"
        )
    if not endpoint.base_url.startswith(("http://", "https://")):
        raise InvalidInputError(
            f"base URL {endpoint.base_url!r} must start with http:// or https://"
        )


def score_images(
    images: Sequence[Path],
    settings: ScoreSettings,
    endpoint: EndpointSettings,
    retry: RetryPolicy,
    progress: ProgressCallback | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> ScoreReport:
    """Score every image with the models and write the outputs under `out_dir`.

    Returns the report even when a rejected key or unreachable endpoint stopped the
    run; `report.stopped` then contains that error.
    """
    check_settings(settings, endpoint)
    ensure_out_dir(settings.out_dir)
    redactor = Redactor([endpoint.api_key])
    job = _Job(images, settings, redactor, progress)
    return asyncio.run(job.run(endpoint, retry, sleep, rng))


class _Job:
    """State of one score_images call: finished rows, pending units, output files."""

    def __init__(
        self,
        images: Sequence[Path],
        settings: ScoreSettings,
        redactor: Redactor,
        progress: ProgressCallback | None,
    ) -> None:
        self.images = [str(path) for path in dict.fromkeys(images)]
        self.settings = settings
        self.redactor = redactor
        self.progress = progress
        self.verdict_model = verdict_model(settings.rubric)
        self.jsonl_path = settings.out_dir / "verdicts.jsonl"
        self.rows = read_rows(self.jsonl_path)
        self.latest = latest_rows(self.rows)
        self.last_csv_write = 0.0
        # One writer thread keeps fsync off the event loop, where it would stall
        # every request in flight, and keeps the file writes in call order.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdicts")
        self.writes: list[Future] = []
        self.done = 0
        self.total = 0
        self.encodings: dict[str, asyncio.Future[EncodedImage]] = {}
        self.pending_units: Counter[str] = Counter()
        self.source: EncodedImage | None = None
        self.source_sha256: str | None = None

    async def run(
        self,
        endpoint: EndpointSettings,
        retry: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random | None,
    ) -> ScoreReport:
        # 1. The source image is shared by every request, so a bad one stops here.
        if self.settings.source is not None:
            try:
                self.source = encode_image(self.settings.source, self.settings.max_side)
            except ImageReadError as error:
                raise ImageReadError(f"--source {error}") from None
            self.source_sha256 = self.source.sha256

        # 2. Skip the units an earlier run finished with the same inputs.
        units = [unit for unit in self._units() if not self._is_finished(*unit)]
        self.total = len(units)
        self.pending_units = Counter(image for image, _ in units)
        skipped = len(self._units()) - len(units)
        if skipped:
            logger.info("skipping %d finished of %d", skipped, len(self._units()))

        # 3. Workers take units from a queue, so at most `concurrency` images are
        # encoded and in flight at once.
        queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        for unit in units:
            queue.put_nowait(unit)
        stopped = None
        try:
            async with ChatClient(endpoint, retry, self.redactor, sleep, rng) as client:
                try:
                    async with asyncio.TaskGroup() as group:
                        for _ in range(min(endpoint.concurrency, len(units))):
                            group.create_task(self._worker(queue, client))
                except* StopRunError as errors:
                    stopped = errors.exceptions[0]
        finally:
            # 4. Final views of the rows, whatever ended the run.
            self._write_views(force=True)
            self.writer.shutdown(wait=True)
            self._check_writes()

        report = self._report(skipped, stopped)
        if stopped is not None:
            unfinished = sum(1 for unit in units if not self._is_finished(*unit))
            logger.error("run stopped; %d unit(s) left for a rerun", unfinished)
        return report

    def _units(self) -> list[tuple[str, str | None]]:
        if self.settings.mode == "panel":
            return [(i, m) for i in self.images for m in self.settings.models]
        return [(image, None) for image in self.images]

    def _is_finished(self, image: str, model: str | None) -> bool:
        row = self.latest.get((image, model or FALLBACK_KEY))
        if row is None or row["status"] != "ok" or row["mode"] != self.settings.mode:
            return False
        if model is None and row["model"] not in self.settings.models:
            return False
        try:
            sha256 = _file_sha256(Path(image))
        except OSError:
            return False
        return (
            row.get("image_sha256") == sha256
            and row.get("rubric_sha256") == self.settings.rubric.sha256
            and row.get("source_sha256") == self.source_sha256
        )

    async def _worker(self, queue: asyncio.Queue, client: ChatClient) -> None:
        while not queue.empty():
            image, model = queue.get_nowait()
            started = time.perf_counter()
            try:
                encoded = await self._encode(image)
            except ImageReadError as error:
                models = [model] if model else list(self.settings.models[:1])
                row = self._error_row(image, models, "image", str(error), 0)
                self._record(row, None)
                continue
            if model is not None:
                row = await self._ask_model(client, encoded, model, started)
            else:
                row = await self._ask_fallback(client, encoded, started)
            self._record(row, encoded)

    async def _encode(self, image: str) -> EncodedImage:
        """Encode an image in a thread, once for all of its pending units.

        In panel mode the units of one image sit next to each other in the queue,
        so the cached payload is dropped as soon as its last unit has taken it.
        """
        encoding = self.encodings.get(image)
        if encoding is None:
            encoding = asyncio.ensure_future(
                asyncio.to_thread(encode_image, image, self.settings.max_side)
            )
            self.encodings[image] = encoding
        self.pending_units[image] -= 1
        if self.pending_units[image] == 0:
            del self.encodings[image]
        return await encoding

    async def _ask_fallback(
        self, client: ChatClient, encoded: EncodedImage, started: float
    ) -> dict[str, Any]:
        failures = []
        attempts = 0
        for model in self.settings.models:
            row = await self._ask_model(client, encoded, model, started)
            attempts += row["attempts"]
            if row["status"] == "ok":
                row["attempts"] = attempts
                row["models_tried"] = self.settings.models[: len(failures) + 1]
                return row
            failures.append(f"{model}: {row['error']}")
            if model != self.settings.models[-1]:
                logger.warning(
                    "%s: %s failed (%s); trying the next model",
                    encoded.path,
                    model,
                    row["error"],
                )
        row["error"] = "every model failed; " + "; ".join(failures)
        row["attempts"] = attempts
        row["models_tried"] = list(self.settings.models)
        return row

    async def _ask_model(
        self, client: ChatClient, encoded: EncodedImage, model: str, started: float
    ) -> dict[str, Any]:
        """Request a verdict from one model, with one repair turn; return its row."""
        body = build_chat_body(
            model,
            encoded,
            self.settings.rubric,
            self.source,
            self.settings.temperature,
            self.settings.max_tokens,
        )
        image = str(encoded.path)
        attempts = 0
        tokens = [0, 0]
        repaired = False
        try:
            result = await client.complete(body)
            attempts += result.attempts
            _add_tokens(tokens, result)
            verdict, problem = self._check_reply(result)
            if problem is not None:
                repaired = True
                logger.info(
                    "%s: %s: %s; sending one repair request", image, model, problem
                )
                body = build_repair_body(body, result.content, problem)
                result = await client.complete(body)
                attempts += result.attempts
                _add_tokens(tokens, result)
                verdict, problem = self._check_reply(result)
        except CallError as error:
            attempts += error.attempts
            row = self._error_row(image, [model], error.kind, str(error), attempts)
            row["repaired"] = repaired
            return self._finish_row(row, encoded, started, tokens)
        except StopRunError as error:
            # The request that hit the stop gets its row before the run ends.
            attempts += error.attempts
            row = self._error_row(image, [model], "stopped", str(error), attempts)
            self._record(self._finish_row(row, encoded, started, tokens), encoded)
            raise

        if problem is not None:
            kind = (
                "truncated" if result.finish_reason == "length" else "invalid_verdict"
            )
            row = self._error_row(image, [model], kind, problem, attempts)
        else:
            row = self._base_row(image, model, "ok")
            row["verdict"] = verdict
            row["attempts"] = attempts
        row["repaired"] = repaired
        row["finish_reason"] = result.finish_reason
        return self._finish_row(row, encoded, started, tokens)

    def _check_reply(self, result: ChatResult) -> tuple[dict | None, str | None]:
        """Return (verdict, None) for a valid reply, else (None, the problem)."""
        if result.refusal:
            return None, f"the model refused: {result.refusal[:200]}"
        if result.finish_reason == "length":
            return (
                None,
                "the reply was cut off at the token limit (finish_reason length)",
            )
        try:
            return parse_verdict(result.content, self.verdict_model), None
        except VerdictError as error:
            return None, str(error)

    def _base_row(self, image: str, model: str, status: str) -> dict[str, Any]:
        return {
            "image": image,
            "model": model,
            "mode": self.settings.mode,
            "status": status,
            "verdict": None,
            "error_kind": None,
            "error": None,
            "attempts": 0,
            "repaired": False,
            "finish_reason": None,
            "models_tried": [model] if self.settings.mode == "fallback" else None,
            "rubric_sha256": self.settings.rubric.sha256,
            "source_sha256": self.source_sha256,
        }

    def _error_row(
        self, image: str, models: list[str], kind: str, message: str, attempts: int
    ) -> dict[str, Any]:
        row = self._base_row(image, models[-1], "error")
        row.update(error_kind=kind, error=message, attempts=attempts)
        return row

    def _finish_row(
        self,
        row: dict[str, Any],
        encoded: EncodedImage,
        started: float,
        tokens: list[int],
    ) -> dict[str, Any]:
        row["latency_s"] = round(time.perf_counter() - started, 4)
        row["prompt_tokens"], row["completion_tokens"] = tokens
        row["media_type"] = encoded.media_type
        row["sent_width"], row["sent_height"] = encoded.width, encoded.height
        row["image_sha256"] = encoded.sha256
        return row

    def _record(self, row: dict[str, Any], encoded: EncodedImage | None) -> None:
        """Append a finished row to the log, refresh the views and report progress."""
        public = dict(row)
        public.setdefault("image_sha256", encoded.sha256 if encoded else None)
        public["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        line = self.redactor.text(json.dumps(public, ensure_ascii=False))
        self._check_writes()
        self.writes.append(
            self.writer.submit(append_line_durably, self.jsonl_path, line)
        )
        public = json.loads(line)
        self.rows.append(public)
        self.latest[row_key(public)] = public
        if public["status"] == "error":
            logger.warning(
                "%s: %s: %s", public["image"], public["model"], public["error"]
            )
        self.done += 1
        self._write_views(force=False)
        if self.progress is not None:
            self.progress(self.done, self.total, public)

    def _write_views(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last_csv_write < CSV_REWRITE_INTERVAL_S:
            return
        self.last_csv_write = now
        out_dir = self.settings.out_dir
        views = {
            out_dir / "verdicts.csv": verdicts_csv(
                self.latest.values(), self.settings.rubric
            )
        }
        if self.settings.mode == "panel":
            views[out_dir / "panel.csv"] = panel_csv(self._panel())
        for path, text in views.items():
            self.writes.append(self.writer.submit(write_text_atomic, path, text))

    def _check_writes(self) -> None:
        """Raise OutputError for the first failed file write, dropping finished ones."""
        pending = []
        for write in self.writes:
            if not write.done():
                pending.append(write)
                continue
            try:
                write.result()
            except OSError as error:
                raise OutputError(
                    f"cannot write to {self.settings.out_dir} ({error}); rerun after "
                    "fixing it to resume"
                ) from None
        self.writes = pending

    def _job_rows(self) -> list[dict[str, Any]]:
        keys = [(image, model or FALLBACK_KEY) for image, model in self._units()]
        return [self.latest[key] for key in keys if key in self.latest]

    def _panel(self) -> list[PanelAggregate]:
        by_image: dict[str, list[dict[str, Any]]] = {}
        for row in self._job_rows():
            by_image.setdefault(row["image"], []).append(row)
        return [aggregate_panel(image, rows) for image, rows in by_image.items()]

    def _report(self, skipped: int, stopped: RemoteError | None) -> ScoreReport:
        rows = self._job_rows()
        panel = self._panel() if self.settings.mode == "panel" else []
        return ScoreReport(rows, summarize(rows), panel, self.done, skipped, stopped)


def _add_tokens(tokens: list[int], result: ChatResult) -> None:
    tokens[0] += result.prompt_tokens or 0
    tokens[1] += result.completion_tokens or 0


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
