"""Resumable execution of a sweep: render in batches, score, save, append rows.

The pipeline and the CLIP model load once per run. Points are grouped into fixed
UNet batches (see SweepDefinition.batches). A batch with any unfinished point is
rendered whole, but only its unfinished points are saved and appended. Each row is
appended after its image file is written, so a row never names a missing image.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from renderqa.core.clip_score import ClipScorer, load_clip_scorer
from renderqa.core.guidance import saturated_fraction
from renderqa.sweeps.definition import SweepDefinition, SweepPoint
from renderqa.sweeps.plots import plot_saturation_vs_clip, write_contact_sheets
from renderqa.sweeps.store import (
    PLOT_NAME,
    RESULTS_NAME,
    SHEETS_DIR,
    SUMMARY_NAME,
    SweepStore,
    read_results,
)
from renderqa.sweeps.summary import (
    DEFAULT_CLIP_TOLERANCE_PERCENT,
    SettingSummary,
    summarise,
    write_summary,
)

logger = logging.getLogger(__name__)

# progress(images_done, images_total)
ProgressCallback = Callable[[int, int], None]


@dataclass
class SweepOutcome:
    """Counts and output paths of one run."""

    folder: Path
    total: int
    skipped: int
    rendered: int
    summaries: list[SettingSummary] = field(default_factory=list)
    sheets: list[Path] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        return self.folder / RESULTS_NAME

    @property
    def summary_path(self) -> Path:
        return self.folder / SUMMARY_NAME

    @property
    def plot_path(self) -> Path:
        return self.folder / PLOT_NAME


def library_versions() -> dict[str, str]:
    """Return the versions recorded in every row."""
    import diffusers
    import open_clip
    import torch

    try:
        renderqa_version = importlib.metadata.version("renderqa")
    except importlib.metadata.PackageNotFoundError:
        renderqa_version = "unknown"
    return {
        "renderqa_version": renderqa_version,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "open_clip_version": open_clip.__version__,
    }


def make_request(definition: SweepDefinition, point: SweepPoint, default_size: int):
    """Build the render core's request for one point of the sweep."""
    from renderqa.core.render import RenderRequest, ThresholdSettings

    threshold = None
    if not point.threshold.is_off:
        threshold = ThresholdSettings(
            mode=point.threshold.mode,
            percentile=float(point.threshold.percentile),
            mimic_scale=(
                float(point.threshold.mimic_scale)
                if point.threshold.mimic_scale is not None
                else None
            ),
            per_channel=point.threshold.per_channel,
        )
    return RenderRequest(
        prompt=point.prompt.text,
        negative_prompt=definition.negative_prompt,
        seed=point.seed,
        steps=definition.steps,
        width=definition.width or default_size,
        height=definition.height or default_size,
        guidance_scale=float(point.guidance_scale),
        guidance_rescale=float(point.guidance_rescale),
        threshold=threshold,
    )


def load_models(definition: SweepDefinition, clip_batch_size: int):
    """Load the CLIP scorer, then the pipeline: CLIP errors surface before the long load."""
    from renderqa.core.devices import resolve_device
    from renderqa.core.pipeline import load_pipeline

    device = resolve_device(definition.device)
    scorer = load_clip_scorer(
        definition.clip_model,
        definition.clip_pretrained,
        resize_mode=definition.clip_resize,
        device=device,
        batch_size=clip_batch_size,
    )
    loaded = load_pipeline(
        definition.model,
        vae=definition.vae,
        device=definition.device,
        dtype=definition.dtype,
        scheduler=definition.scheduler,
    )
    return loaded, scorer


def run_sweep(
    definition: SweepDefinition,
    folder: Path,
    *,
    batch_size: int = 4,
    clip_batch_size: int = 32,
    overwrite: bool = False,
    tolerance_percent: Decimal = DEFAULT_CLIP_TOLERANCE_PERCENT,
    progress: ProgressCallback | None = None,
    models: tuple[Any, ClipScorer] | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep into `folder` and write its summary, plot and sheets.

    Steps: check the folder, load the models if anything is left to render, open
    the store, render the unfinished batches, then write the outputs. `models`
    takes an already loaded (pipeline, scorer) pair, as benchmarks pass.
    """
    store = SweepStore(folder, definition)
    finished = store.check(overwrite)
    batches = definition.batches(batch_size)
    total = sum(len(batch) for batch in batches)
    pending = [
        batch
        for batch in batches
        if any(point.point_id not in finished for point in batch)
    ]

    if pending and models is None:
        models = load_models(definition, clip_batch_size)

    finished = store.open(overwrite)
    done = sum(1 for batch in batches for p in batch if p.point_id in finished)
    outcome = SweepOutcome(folder, total, skipped=done, rendered=0)
    if progress:
        progress(done, total)

    if pending:
        loaded, scorer = models
        constants = _constant_columns(definition, loaded, scorer)
        for batch in pending:
            rows = _render_batch(definition, folder, batch, finished, loaded, scorer)
            for row in rows:
                store.append({**constants, **row})
                done += 1
                outcome.rendered += 1
                if progress:
                    progress(done, total)

    write_outputs(definition, folder, tolerance_percent, outcome)
    return outcome


def _render_batch(
    definition: SweepDefinition,
    folder: Path,
    batch: list[SweepPoint],
    finished: dict[str, dict[str, str]],
    loaded,
    scorer: ClipScorer,
) -> list[dict[str, Any]]:
    """Render one fixed batch, score it with CLIP and save its unfinished images."""
    from renderqa.core.render import render_batch, save_render

    size = loaded.default_size
    results = render_batch(loaded, [make_request(definition, p, size) for p in batch])
    todo = [
        (point, result)
        for point, result in zip(batch, results, strict=True)
        if point.point_id not in finished
    ]
    images = [result.image for _, result in todo]
    cosines, clip_seconds = scorer.timed_score(images, [p.prompt.text for p, _ in todo])
    threshold = float(definition.saturation_threshold)

    rows = []
    for (point, result), cosine in zip(todo, cosines, strict=True):
        save_render(result, folder / point.image_name)
        rows.append(
            {
                "point_id": point.point_id,
                "prompt_id": point.prompt.prompt_id,
                "prompt": point.prompt.text,
                "seed": point.seed,
                "guidance_scale": point.guidance_scale,
                "guidance_rescale": point.guidance_rescale,
                "threshold": point.threshold.label,
                "guidance_enabled": point.guidance_enabled,
                "image": point.image_name,
                "saturated_fraction": saturated_fraction(result.pixels, threshold),
                "clip_cosine_raw": cosine,
                "clip_caption_truncated": scorer.caption_truncated(point.prompt.text),
                "std_ratio": result.std_ratio,
                "finite": bool(result.finite),
                "black": bool(result.black),
                "render_seconds": round(result.seconds, 4),
                "clip_seconds": round(clip_seconds / len(todo), 4),
            }
        )
    return rows


def _constant_columns(
    definition: SweepDefinition, loaded, scorer: ClipScorer
) -> dict[str, Any]:
    from renderqa.core.devices import dtype_name

    return {
        "negative_prompt": definition.negative_prompt,
        # diffusers' rescale (and renderqa's) acts on the raw model output, so the
        # space is the model's prediction type: epsilon or v_prediction.
        "rescale_space": f"model output ({loaded.prediction_type})",
        "num_inference_steps": definition.steps,
        "width": definition.width or loaded.default_size,
        "height": definition.height or loaded.default_size,
        "scheduler": definition.scheduler,
        "model": loaded.model_id,
        "model_kind": loaded.kind,
        "vae": loaded.vae_id or "",
        "device": str(loaded.device),
        "dtype": dtype_name(loaded.dtype),
        "saturation_threshold": definition.saturation_threshold,
        "clip_model": scorer.model_name,
        "clip_pretrained": scorer.pretrained,
        "clip_resize": scorer.resize_mode,
        "sweep_hash": definition.sweep_hash(),
        **library_versions(),
    }


def write_outputs(
    definition: SweepDefinition,
    folder: Path,
    tolerance_percent: Decimal,
    outcome: SweepOutcome,
) -> None:
    """Write summary.csv, the saturation/CLIP plot and the contact sheets."""
    rows = read_results(folder / RESULTS_NAME)
    outcome.summaries = summarise(rows, tolerance_percent)
    write_summary(folder / SUMMARY_NAME, outcome.summaries)
    if outcome.summaries:
        plot_saturation_vs_clip(outcome.summaries, folder / PLOT_NAME)
    outcome.sheets = write_contact_sheets(
        rows,
        folder,
        folder / SHEETS_DIR,
        list(definition.guidance_rescales),
        list(definition.seeds),
    )
    logger.info(
        "sweep %s: %d of %d images rendered this run",
        definition.sweep_hash(),
        outcome.rendered,
        outcome.total,
    )
