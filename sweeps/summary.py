"""Per-setting statistics of a sweep and the recommended rescale factor.

A setting is one (guidance_scale, threshold, guidance_rescale) combination; its
statistics pool every prompt and seed. The 95% interval is Student's t interval of
the mean. The CLIP change compares the setting's mean raw cosine with that of
guidance_rescale 0 at the same guidance scale and threshold.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
from scipy import stats

from renderqa.core.atomic import write_text_atomic

METRICS = ("saturated_fraction", "clip_cosine_raw", "std_ratio", "render_seconds")
DEFAULT_CLIP_TOLERANCE_PERCENT = Decimal("0.5")


@dataclass
class MetricStats:
    """Mean, sample standard deviation and 95% t interval of one metric."""

    count: int
    mean: float
    std: float
    ci95_low: float
    ci95_high: float


@dataclass
class SettingSummary:
    """The pooled statistics of one setting over its prompts and seeds."""

    guidance_scale: str
    threshold: str
    guidance_rescale: str
    images: int
    metrics: dict[str, MetricStats]
    clip_change_percent: float | None = None
    recommended: bool = False

    @property
    def label(self) -> str:
        text = f"gs {self.guidance_scale} / rescale {self.guidance_rescale}"
        return text if self.threshold == "off" else f"{text} / {self.threshold}"


def describe(values: list[float]) -> MetricStats:
    """Return the statistics of `values`; NaN where fewer than two values exist."""
    array = np.asarray(values, dtype=np.float64)
    count = int(array.size)
    if count == 0:
        return MetricStats(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if count < 2:
        return MetricStats(count, mean, math.nan, math.nan, math.nan)
    std = float(array.std(ddof=1))
    half_width = float(stats.t.ppf(0.975, count - 1)) * std / math.sqrt(count)
    return MetricStats(count, mean, std, mean - half_width, mean + half_width)


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def summarise(
    rows: list[dict[str, str]],
    tolerance_percent: Decimal = DEFAULT_CLIP_TOLERANCE_PERCENT,
) -> list[SettingSummary]:
    """Group results rows by setting, compute statistics and mark recommendations.

    Rows whose image did not decode to finite values stay out of the statistics.
    """
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        key = (row["guidance_scale"], row["threshold"], row["guidance_rescale"])
        groups.setdefault(key, []).append(row)

    summaries = []
    for (scale, threshold, rescale), members in groups.items():
        healthy = [row for row in members if row["finite"] == "true"]
        metrics = {}
        for metric in METRICS:
            values = [_float(row[metric]) for row in healthy]
            metrics[metric] = describe([value for value in values if value is not None])
        summaries.append(
            SettingSummary(scale, threshold, rescale, len(members), metrics)
        )
    summaries.sort(
        key=lambda s: (
            Decimal(s.guidance_scale),
            s.threshold != "off",  # thresholding off first, as the baseline
            s.threshold,
            Decimal(s.guidance_rescale),
        )
    )
    _add_clip_change(summaries)
    _mark_recommended(summaries, tolerance_percent)
    return summaries


def _add_clip_change(summaries: list[SettingSummary]) -> None:
    references = {
        (s.guidance_scale, s.threshold): s.metrics["clip_cosine_raw"].mean
        for s in summaries
        if Decimal(s.guidance_rescale) == 0
    }
    for summary in summaries:
        reference = references.get((summary.guidance_scale, summary.threshold))
        mean = summary.metrics["clip_cosine_raw"].mean
        if reference is None or math.isnan(reference) or reference == 0:
            continue
        # Relative to |reference| so a drop reads negative even for a negative cosine.
        summary.clip_change_percent = 100.0 * (mean - reference) / abs(reference)


def _mark_recommended(
    summaries: list[SettingSummary], tolerance_percent: Decimal
) -> None:
    """Mark, per guidance scale and threshold, the least saturated setting in tolerance.

    Candidates are settings whose CLIP change against rescale 0 is above
    -tolerance_percent; rescale 0 itself always qualifies (its change is 0).
    """
    by_group: dict[tuple[str, str], list[SettingSummary]] = {}
    for summary in summaries:
        if summary.clip_change_percent is None:
            continue
        by_group.setdefault((summary.guidance_scale, summary.threshold), []).append(
            summary
        )
    for members in by_group.values():
        candidates = [
            s
            for s in members
            if s.clip_change_percent >= -float(tolerance_percent)
            and not math.isnan(s.metrics["saturated_fraction"].mean)
        ]
        if not candidates:
            continue
        best = min(
            candidates,
            key=lambda s: (
                s.metrics["saturated_fraction"].mean,
                Decimal(s.guidance_rescale),
            ),
        )
        best.recommended = True


def summary_columns() -> list[str]:
    columns = ["guidance_scale", "threshold", "guidance_rescale", "images"]
    for metric in METRICS:
        columns += [
            f"{metric}_mean",
            f"{metric}_std",
            f"{metric}_ci95_low",
            f"{metric}_ci95_high",
        ]
    return [*columns, "clip_change_percent", "recommended"]


def write_summary(path: Path, summaries: list[SettingSummary]) -> None:
    """Write summary.csv atomically, one row per setting."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(summary_columns())
    for summary in summaries:
        cells: list[object] = [
            summary.guidance_scale,
            summary.threshold,
            summary.guidance_rescale,
            summary.images,
        ]
        for metric in METRICS:
            values = summary.metrics[metric]
            cells += [values.mean, values.std, values.ci95_low, values.ci95_high]
        cells += [summary.clip_change_percent, summary.recommended]
        writer.writerow([_format_cell(cell) for cell in cells])
    write_text_atomic(path, buffer.getvalue())


def _format_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)
