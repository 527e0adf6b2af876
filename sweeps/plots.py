"""The sweep's pictures: saturation against CLIP similarity, and labelled contact sheets.

Contact sheets follow the X/Y grid layout of other render tools: one sheet per
prompt, guidance scale and threshold, rows are rescale factors, columns are seeds.
"""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from renderqa.core.atomic import atomic_path  # noqa: E402
from renderqa.core.imageio import save_png  # noqa: E402
from renderqa.sweeps.summary import SettingSummary  # noqa: E402

SHEET_BACKGROUND = (255, 255, 255)
MISSING_CELL = (200, 200, 200)
LABEL_COLOUR = (0, 0, 0)
MAX_CELL = 256
FONT_SIZE = 14


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_saturation_vs_clip(
    summaries: list[SettingSummary], path: Path, title: str = ""
) -> None:
    """Plot one labelled point per setting: mean saturated % against mean CLIP cosine.

    Colour marks the guidance scale and the marker shape the thresholding choice.
    Each point is labelled with its rescale factor. Error bars are the 95%
    intervals where a setting has two or more images, cut off at the plot frame.
    """
    figure, axes = plt.subplots(figsize=(8, 6), dpi=100)
    scales = sorted({s.guidance_scale for s in summaries}, key=Decimal)
    thresholds = list(dict.fromkeys(s.threshold for s in summaries))
    palette = plt.get_cmap("tab10")
    for scale_index, scale in enumerate(scales):
        colour = palette(scale_index % 10)
        for threshold_index, threshold in enumerate(thresholds):
            members = [
                s
                for s in summaries
                if s.guidance_scale == scale and s.threshold == threshold
            ]
            if members:
                label = f"guidance_scale {scale}"
                if len(thresholds) > 1:
                    label += f", threshold {threshold}"
                marker = MARKERS[threshold_index % len(MARKERS)]
                _plot_group(axes, members, colour, marker, label)
    _frame_points(axes, summaries)
    axes.set_xlabel("saturated pixels, % (any channel above the threshold)")
    axes.set_ylabel("CLIP image-text cosine (raw)")
    axes.set_title(title or "guidance rescale sweep (labels: rescale, * recommended)")
    axes.grid(True, alpha=0.3)
    # Below the axes, the legend cannot hide points or their error bars.
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    figure.tight_layout()
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png")
    plt.close(figure)


def _plot_group(axes, members: list[SettingSummary], colour, marker: str, label: str):
    x = [100.0 * s.metrics["saturated_fraction"].mean for s in members]
    y = [s.metrics["clip_cosine_raw"].mean for s in members]
    axes.errorbar(
        x,
        y,
        xerr=[_half_width(s, "saturated_fraction", 100.0) for s in members],
        yerr=[_half_width(s, "clip_cosine_raw", 1.0) for s in members],
        fmt=marker,
        color=colour,
        ecolor=(*colour[:3], 0.35),
        elinewidth=1,
        capsize=2,
        label=label,
    )
    for summary, x_value, y_value in zip(members, x, y, strict=True):
        axes.annotate(
            summary.guidance_rescale + (" *" if summary.recommended else ""),
            (x_value, y_value),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )


def _frame_points(axes, summaries: list[SettingSummary]) -> None:
    """Zoom to the points: intervals pooled over prompts can dwarf the differences."""
    x = [100.0 * s.metrics["saturated_fraction"].mean for s in summaries]
    y = [s.metrics["clip_cosine_raw"].mean for s in summaries]
    for values, set_limits in ((x, axes.set_xlim), (y, axes.set_ylim)):
        finite = [value for value in values if math.isfinite(value)]
        if not finite:
            continue
        low, high = min(finite), max(finite)
        pad = max(0.15 * (high - low), 0.02 * max(abs(low), abs(high)), 1e-4)
        set_limits(low - pad, high + pad)


def _half_width(summary: SettingSummary, metric: str, scale: float) -> float:
    values = summary.metrics[metric]
    if math.isnan(values.ci95_high):
        return 0.0
    return scale * (values.ci95_high - values.mean)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def contact_sheet(
    cells: dict[tuple[str, int], Path | None],
    rescales: list[str],
    seeds: list[int],
    title: str,
    notes: dict[tuple[str, int], str] | None = None,
) -> Image.Image:
    """Build one labelled grid image: rows are rescale factors, columns are seeds.

    `cells` maps (guidance_rescale, seed) to an image path. A cell without an image
    stays grey, so the sheet of an unfinished sweep still shows its full grid.
    `notes` maps the same keys to a short text drawn under each cell.
    """
    images = {
        key: Image.open(path).convert("RGB") for key, path in cells.items() if path
    }
    sample = next(iter(images.values()), None)
    width, height = sample.size if sample else (MAX_CELL, MAX_CELL)
    factor = min(1.0, MAX_CELL / max(width, height))
    cell_w, cell_h = max(1, round(width * factor)), max(1, round(height * factor))

    font = _font()
    row_label_w = 12 + max(_text_width(f"rescale {r}", font) for r in rescales)
    title_h, header_h, gap = FONT_SIZE + 14, FONT_SIZE + 8, 4
    notes = notes or {}
    note_h = FONT_SIZE + 4 if notes else 0
    note_font = _font(FONT_SIZE - 2)
    note_widths = [_text_width(note, note_font) for note in notes.values()]
    widest_note = max(note_widths, default=0)
    column_w = max(cell_w, widest_note)
    row_h = cell_h + note_h
    sheet_w = row_label_w + len(seeds) * (column_w + gap) + gap
    sheet_w = max(sheet_w, _text_width(title, font) + 16)
    sheet_h = title_h + header_h + len(rescales) * (row_h + gap) + gap
    sheet = Image.new("RGB", (sheet_w, sheet_h), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill=LABEL_COLOUR, font=font)

    for column, seed in enumerate(seeds):
        x = row_label_w + gap + column * (column_w + gap)
        draw.text((x, title_h), f"seed {seed}", fill=LABEL_COLOUR, font=font)
    for row, rescale in enumerate(rescales):
        y = title_h + header_h + row * (row_h + gap)
        draw.text(
            (6, y + cell_h // 2 - FONT_SIZE // 2),
            f"rescale {rescale}",
            fill=LABEL_COLOUR,
            font=font,
        )
        for column, seed in enumerate(seeds):
            x = row_label_w + gap + column * (column_w + gap)
            note = notes.get((rescale, seed))
            if note:
                draw.text((x, y + cell_h + 1), note, fill=LABEL_COLOUR, font=note_font)
            image = images.get((rescale, seed))
            if image is None:
                draw.rectangle(
                    (x, y, x + cell_w - 1, y + cell_h - 1), fill=MISSING_CELL
                )
                continue
            if image.size != (cell_w, cell_h):
                image = image.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
            sheet.paste(image, (x, y))
    return sheet


def _text_width(text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def write_contact_sheets(
    rows: list[dict[str, str]],
    folder: Path,
    sheets_folder: Path,
    rescales: list[str],
    seeds: list[int],
) -> list[Path]:
    """Write one sheet per prompt, guidance scale and threshold; return their paths.

    Each cell is labelled with its image's saturated-pixel percentage.
    """
    sheets_folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str, str], dict[tuple[str, int], Path | None]] = {}
    notes: dict[tuple[str, str, str], dict[tuple[str, int], str]] = {}
    prompts: dict[str, str] = {}
    for row in rows:
        key = (row["prompt_id"], row["guidance_scale"], row["threshold"])
        image_path = folder / row["image"]
        cell = image_path if image_path.is_file() else None
        cell_key = (row["guidance_rescale"], int(row["seed"]))
        groups.setdefault(key, {})[cell_key] = cell
        notes.setdefault(key, {})[cell_key] = _saturation_note(row)
        prompts[row["prompt_id"]] = row["prompt"]
    written = []
    for (prompt_id, scale, threshold), cells in sorted(groups.items()):
        prompt = prompts[prompt_id]
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        title = f"{prompt_id}: {short} | guidance_scale {scale} | threshold {threshold}"
        key = (prompt_id, scale, threshold)
        sheet = contact_sheet(cells, rescales, seeds, title, notes[key])
        name = f"{prompt_id}__gs{scale}__th{threshold.replace(':', '-')}.png"
        path = sheets_folder / name
        save_png(path, sheet, text={"title": title})
        written.append(path)
    return written


def _saturation_note(row: dict[str, str]) -> str:
    """Return "sat 12.3%" for a results row, or "" when its fraction is not a number."""
    try:
        fraction = float(row["saturated_fraction"])
    except (KeyError, ValueError):
        return ""
    if not math.isfinite(fraction):
        return ""
    return f"sat {100 * fraction:.1f}%"
