"""Write a probe report to disk: module CSV, activation plot, decoded PNGs, summary.

Each file is written to a temporary path and renamed into place, so no
half-written file appears under its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from renderqa.core.atomic import atomic_path, write_text_atomic
from renderqa.core.imageio import save_png, to_uint8
from renderqa.core.vae_probe_hooks import ModuleStats
from renderqa.core.vae_probe_verdict import (
    ALTERNATE_VAE,
    FP16_MAX,
    DecodeRun,
    ProbeReport,
    displayed_pixels,
)

CSV_COLUMNS = (
    "run",
    "vae",
    "dtype",
    "order",
    "module",
    "kind",
    "calls",
    "min",
    "max",
    "max_abs",
    "nonfinite",
    "above_warning",
    "above_fp16_max",
)


def module_rows(report: ProbeReport) -> list[dict]:
    """Return one row per (run, module) with every statistic, in decoder order."""
    rows = []
    for run in report.runs:
        for stats in run.modules:
            rows.append(
                {
                    "run": run.label,
                    "vae": run.vae_source,
                    "dtype": run.dtype,
                    "order": stats.order,
                    "module": stats.name,
                    "kind": stats.kind,
                    "calls": stats.calls,
                    "min": stats.min_value,
                    "max": stats.max_value,
                    "max_abs": stats.max_abs,
                    "nonfinite": stats.nonfinite or "",
                    "above_warning": stats.above(run.warning_level),
                    "above_fp16_max": stats.above(FP16_MAX),
                }
            )
    return rows


def write_module_csv(report: ProbeReport, path: Path) -> None:
    """Write every module's statistics for every run as CSV, atomically."""
    import pandas as pd

    frame = pd.DataFrame(module_rows(report), columns=list(CSV_COLUMNS))
    with atomic_path(path) as tmp_path:
        frame.to_csv(tmp_path, index=False)


def plot_activations(report: ProbeReport, path: Path) -> None:
    """Plot max |activation| per module in decoder order, one line per run.

    The y axis is logarithmic. The fp16 maximum and the warning level are drawn as
    horizontal lines, and inf or NaN outputs as crosses at the top of the plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [stats.name for stats in report.reference.modules]
    figure, axes = plt.subplots(figsize=(max(8.0, len(order) * 0.12), 4.5))
    ceiling = FP16_MAX * 10
    for run in report.runs:
        values = {stats.name: stats.max_abs for stats in run.modules}
        xs = [i for i, name in enumerate(order) if name in values]
        ys = [values[order[i]] for i in xs]
        finite = [
            (x, max(y, 1e-6)) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)
        ]
        ceiling = max([ceiling, *(y * 2 for _, y in finite)])
        style = "--" if run.vae_label == ALTERNATE_VAE else "-"
        line = axes.plot(
            *zip(*finite, strict=True), style, label=run.label, linewidth=1.2
        )
        bad = [x for x, y in zip(xs, ys, strict=True) if not math.isfinite(y)]
        if bad:
            color = line[0].get_color()
            axes.scatter(bad, [ceiling] * len(bad), marker="x", color=color)
    axes.axhline(FP16_MAX, color="red", linestyle="-", label="fp16 max (65504)")
    axes.axhline(
        report.warning_level,
        color="grey",
        linestyle=":",
        label=f"warning level ({report.warning_level:.3g})",
    )
    axes.set_yscale("log")
    axes.set_xlabel("module in decoder order (x: inf or NaN)")
    axes.set_ylabel("max |activation|")
    axes.set_title("VAE decoder activations per module")
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=100)
    plt.close(figure)


def save_decoded_images(report: ProbeReport, out_dir: Path) -> list[Path]:
    """Save each run's decode as `decode-<run>.png`, NaN shown as black."""
    paths = []
    for run in report.runs:
        path = out_dir / f"decode-{run.label}.png"
        image = Image.fromarray(to_uint8(displayed_pixels(run.pixels)), mode="RGB")
        save_png(path, image, {"renderqa-vae-probe": run.label})
        paths.append(path)
    return paths


def summary_dict(report: ProbeReport) -> dict:
    """Return the report without module tables or pixels, for JSON."""
    verdict = report.verdict
    recommendation = verdict.recommendation
    return {
        "verdict": verdict.kind,
        "summary": verdict.summary,
        "module": verdict.module,
        "recommendation": recommendation.description if recommendation else None,
        "baseline": verdict.baseline,
        "device": report.device,
        "tiling": report.tiling,
        "warning_level": report.warning_level,
        "latents": {
            "shape": list(report.latents.shape),
            "mean": report.latents.mean,
            "std": report.latents.std,
            "max_abs": report.latents.max_abs,
            "nonfinite_count": report.latents.nonfinite_count,
            "scaling_factor": report.latents.scaling_factor,
            "vae_space_std": report.latents.vae_space_std,
            "problems": report.latents.problems,
        },
        "runs": [_run_summary(run) for run in report.runs],
        "fixes": [
            {
                "run": option.run.label,
                "fix": option.description,
                "time_ratio": option.time_ratio,
                "memory_delta_bytes": option.memory_delta_bytes,
            }
            for option in verdict.options
        ],
    }


def _run_summary(run: DecodeRun) -> dict:
    def name(stats: ModuleStats | None) -> str | None:
        return stats.name if stats else None

    peak = run.peak
    return {
        "run": run.label,
        "vae": run.vae_source,
        "dtype": run.dtype,
        "finite": run.finite,
        "black": run.black,
        "max_activation": _json_float(peak.max_abs) if peak else None,
        "max_activation_module": name(peak),
        "first_above_warning": name(run.first_above_warning),
        "first_above_fp16_max": name(run.first_above_fp16_max),
        "first_nonfinite": name(run.first_nonfinite),
        "probed_seconds": run.probed_seconds,
        "seconds": run.seconds,
        "peak_memory_bytes": run.peak_memory_bytes,
        "largest_activation_bytes": run.largest_activation_bytes,
        "max_diff": run.max_diff,
        "psnr": _json_float(run.psnr),
        "ssim": run.ssim,
    }


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)


def write_probe_outputs(report: ProbeReport, out_dir: Path) -> dict[str, Path]:
    """Write the CSV, plot, decoded images and summary JSON into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "modules.csv",
        "plot": out_dir / "activations.png",
        "summary": out_dir / "summary.json",
    }
    write_module_csv(report, paths["csv"])
    plot_activations(report, paths["plot"])
    for index, path in enumerate(save_decoded_images(report, out_dir)):
        paths[f"image{index}"] = path
    write_text_atomic(paths["summary"], json.dumps(summary_dict(report), indent=2))
    return paths
