"""Verdict rows on disk, panel aggregates and the per-model summary.

`verdicts.jsonl` is the durable log: one JSON row per finished image and model,
appended a whole line at a time, so a rerun reads it to skip finished work.
`verdicts.csv` and `panel.csv` are views of the latest row per key, rewritten
atomically. Error rows carry no verdict and never count in a pass rate, a mean
score or a vote.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from renderqa.core.errors import OutputError
from renderqa.core.vlm_rubric import Rubric

logger = logging.getLogger(__name__)

# In fallback mode one row covers the whole model list, so rows are keyed by image
# alone. In panel mode each model has its own row.
FALLBACK_KEY = "(fallback)"
# A spread of two points or more on the 1 to 5 scale counts as disagreement even
# when the pass/fail votes agree.
DISAGREEMENT_SCORE_SPREAD = 2


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """Return the (image, model slot) key of a row."""
    return row["image"], row["model"] if row["mode"] == "panel" else FALLBACK_KEY


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read the rows of a verdicts.jsonl, skipping a final line cut off by a crash."""
    if not path.exists():
        return []
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OutputError(
            f"{path}: cannot read the earlier rows ({error}); fix or move the file"
        ) from None
    lines = text.split("\n")
    # A last element that is not empty has no newline: a write cut short.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipped a line that is not JSON", path, number)
            continue
        if isinstance(row, dict) and {"image", "model", "mode", "status"} <= set(row):
            rows.append(row)
        else:
            logger.warning(
                "%s:%d: skipped a row without image/model/mode", path, number
            )
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Map each row key to its latest row, in file order."""
    latest: dict[tuple[str, str], dict] = {}
    for row in rows:
        latest[row_key(row)] = row
    return latest


def csv_columns(rubric: Rubric) -> list[str]:
    criteria = [c.name for c in rubric.criteria]
    return [
        "image",
        "model",
        "mode",
        "status",
        "overall",
        "score",
        *criteria,
        *(f"{name}_detail" for name in criteria),
        "notes",
        "error_kind",
        "error",
        "attempts",
        "repaired",
        "finish_reason",
        "latency_s",
        "prompt_tokens",
        "completion_tokens",
        "models_tried",
        "media_type",
        "sent_width",
        "sent_height",
        "image_sha256",
        "source_sha256",
        "rubric_sha256",
        "finished_at",
    ]


def verdicts_csv(rows: Iterable[dict[str, Any]], rubric: Rubric) -> str:
    """Render rows as CSV text: verdict fields flattened, criteria as found/detail."""
    columns = csv_columns(rubric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=row_key):
        flat = {k: v for k, v in row.items() if k != "verdict"}
        flat["models_tried"] = ",".join(row.get("models_tried") or [])
        verdict = row.get("verdict") or {}
        for column in ("overall", "score", "notes"):
            flat[column] = verdict.get(column, "")
        for criterion in rubric.criteria:
            found = verdict.get(criterion.name)
            if isinstance(found, dict):
                flat[criterion.name] = str(found.get("found")).lower()
                flat[f"{criterion.name}_detail"] = found.get("detail", "")
        writer.writerow({k: _csv_value(v) for k, v in flat.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    """Write None as an empty cell and booleans as JSON does (true/false)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return value


@dataclass
class PanelAggregate:
    """One image's panel result over the models that returned a valid verdict."""

    image: str
    verdicts: int
    errors: int
    overall: str  # "pass", "fail", "tie", or "" when no model returned a verdict
    pass_votes: int
    fail_votes: int
    mean_score: float | None
    score_min: int | None
    score_max: int | None
    disagreement: bool


def aggregate_panel(image: str, rows: list[dict[str, Any]]) -> PanelAggregate:
    """Majority pass/fail, mean score and a disagreement flag over the ok rows.

    A tie is reported as "tie", which is not a pass. Error rows are only counted.
    """
    verdicts = [row["verdict"] for row in rows if row["status"] == "ok"]
    passes = sum(v["overall"] == "pass" for v in verdicts)
    fails = len(verdicts) - passes
    scores = [v["score"] for v in verdicts]
    if not verdicts:
        overall = ""
    elif passes == fails:
        overall = "tie"
    else:
        overall = "pass" if passes > fails else "fail"
    spread = max(scores) - min(scores) if scores else 0
    return PanelAggregate(
        image=image,
        verdicts=len(verdicts),
        errors=len(rows) - len(verdicts),
        overall=overall,
        pass_votes=passes,
        fail_votes=fails,
        mean_score=float(np.mean(scores)) if scores else None,
        score_min=min(scores) if scores else None,
        score_max=max(scores) if scores else None,
        disagreement=(passes > 0 and fails > 0) or spread >= DISAGREEMENT_SCORE_SPREAD,
    )


def panel_csv(aggregates: Iterable[PanelAggregate]) -> str:
    buffer = io.StringIO()
    columns = list(PanelAggregate.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for aggregate in aggregates:
        values = {k: getattr(aggregate, k) for k in columns}
        if values["mean_score"] is not None:
            values["mean_score"] = round(values["mean_score"], 3)
        writer.writerow({k: _csv_value(v) for k, v in values.items()})
    return buffer.getvalue()


@dataclass
class ModelSummary:
    """Per-model totals over the current rows. Latencies are of ok rows, in seconds."""

    model: str
    rows: int
    verdicts: int
    passes: int
    errors: int
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def pass_rate(self) -> float | None:
        return self.passes / self.verdicts if self.verdicts else None


def summarize(rows: Iterable[dict[str, Any]]) -> list[ModelSummary]:
    """Summarise rows per model; tokens include those spent on rejected replies."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    summaries = []
    for model, model_rows in sorted(by_model.items()):
        ok = [row for row in model_rows if row["status"] == "ok"]
        latencies = [row["latency_s"] for row in ok if row.get("latency_s") is not None]
        p50, p90, p99 = (
            np.percentile(latencies, [50, 90, 99]).tolist()
            if latencies
            else (None, None, None)
        )
        summaries.append(
            ModelSummary(
                model=model,
                rows=len(model_rows),
                verdicts=len(ok),
                passes=sum(row["verdict"]["overall"] == "pass" for row in ok),
                errors=len(model_rows) - len(ok),
                latency_p50=p50,
                latency_p90=p90,
                latency_p99=p99,
                prompt_tokens=sum(row.get("prompt_tokens") or 0 for row in model_rows),
                completion_tokens=sum(
                    row.get("completion_tokens") or 0 for row in model_rows
                ),
            )
        )
    return summaries


def ensure_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder; raise OutputError naming it if that fails."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"--out {out_dir}: cannot create folder ({error.strerror})"
        ) from None
    return out_dir
