"""A sweep definition: its fixed settings, its axes, its hash and its expansion.

The definition is built from a TOML sweep file, from command-line options, or from
both (an option given on the command line replaces the file's value). Its hash,
taken over every setting that changes an image or a score, identifies the sweep
folder, so a rerun resumes only the same sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from renderqa.core.errors import InvalidInputError
from renderqa.core.ranges import parse_seeds
from renderqa.core.schedulers import check_scheduler_name
from renderqa.sweeps.axes import (
    MAX_AXIS_VALUES,
    ThresholdChoice,
    canonical_decimal,
    check_guidance_values,
    check_rescale_values,
    parse_decimal_list,
    parse_threshold_list,
)

RESIZE_MODES = ("crop", "pad", "squash")
DEFAULT_GUIDANCE_RESCALE = "0,0.3,0.5,0.7,1.0"
DEFAULT_GUIDANCE_SCALE = "7.5"
DEFAULT_SEEDS = "0-3"
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
PROMPT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the sweep; `prompt_id` names its images and rows."""

    prompt_id: str
    text: str


@dataclass(frozen=True)
class SweepPoint:
    """One image of the sweep: a prompt, a seed and one value of every axis."""

    prompt: Prompt
    seed: int
    guidance_scale: str
    guidance_rescale: str
    threshold: ThresholdChoice

    @property
    def point_id(self) -> str:
        return (
            f"{self.prompt.prompt_id}__gs{self.guidance_scale}"
            f"__gr{self.guidance_rescale}__th{_slug(self.threshold.label)}"
            f"__seed{self.seed}"
        )

    @property
    def guidance_enabled(self) -> bool:
        # diffusers turns classifier-free guidance off for guidance_scale <= 1.
        return Decimal(self.guidance_scale) > 1

    @property
    def image_name(self) -> str:
        return f"images/{self.point_id}.png"


def _slug(label: str) -> str:
    return label.replace(":", "-")


@dataclass(frozen=True)
class SweepDefinition:
    """Everything that decides the images and scores of a sweep."""

    model: str
    prompts: tuple[Prompt, ...]
    seeds: tuple[int, ...]
    guidance_scales: tuple[str, ...]
    guidance_rescales: tuple[str, ...]
    thresholds: tuple[ThresholdChoice, ...]
    negative_prompt: str = ""
    steps: int = 30
    width: int | None = None  # None: the model's native size
    height: int | None = None
    scheduler: str = "default"
    vae: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    clip_resize: str = "pad"
    saturation_threshold: str = "0.97"

    def identity(self) -> dict[str, Any]:
        """Return the settings the hash covers, as JSON-ready values."""
        data = dataclasses.asdict(self)
        data["thresholds"] = [choice.label for choice in self.thresholds]
        return data

    def sweep_hash(self) -> str:
        """Return a short SHA-256 of the canonical JSON of `identity()`."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def points(self) -> list[SweepPoint]:
        """Expand the axes in a fixed order: prompt, guidance, threshold, rescale, seed."""
        return [
            SweepPoint(prompt, seed, scale, rescale, threshold)
            for prompt in self.prompts
            for scale in self.guidance_scales
            for threshold in self.thresholds
            for rescale in self.guidance_rescales
            for seed in self.seeds
        ]

    def batches(self, batch_size: int) -> list[list[SweepPoint]]:
        """Group the points into UNet batches that render_batch accepts.

        A batch shares its prompt and is all guided or all unguided. The grouping
        depends only on the definition and `batch_size`, so a resumed run renders
        each unfinished image in the same batch as an uninterrupted run would.
        """
        batches: list[list[SweepPoint]] = []
        for point in self.points():
            current = batches[-1] if batches else None
            if (
                current is not None
                and len(current) < batch_size
                and current[0].prompt == point.prompt
                and current[0].guidance_enabled == point.guidance_enabled
            ):
                current.append(point)
            else:
                batches.append([point])
        return batches


def read_prompts_file(path: Path, first_index: int = 0) -> tuple[Prompt, ...]:
    """Read prompts from a text file (one per line) or a CSV with id and prompt columns.

    Lines of a text file get the ids p00, p01, ... counted from `first_index`.
    """
    if not path.is_file():
        raise InvalidInputError(f"--prompts: file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"--prompts: cannot read {path} ({error})") from None
    if path.suffix.lower() == ".csv":
        return _prompts_from_csv(text, path)
    lines = [line.strip() for line in text.splitlines()]
    return tuple(
        Prompt(f"p{index:02d}", line)
        for index, line in enumerate((line for line in lines if line), first_index)
    )


def _prompts_from_csv(text: str, path: Path) -> tuple[Prompt, ...]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [name.strip().lower() for name in reader.fieldnames or []]
    text_column = next((c for c in ("prompt", "text") if c in columns), None)
    if "id" not in columns or text_column is None:
        raise InvalidInputError(
            f"--prompts: {path} needs a header with an id column and a prompt (or "
            f"text) column; found {', '.join(columns) or 'no header'}"
        )
    prompts = []
    for row in reader:
        row = {key.strip().lower(): (value or "") for key, value in row.items() if key}
        if not row.get(text_column, "").strip():
            continue
        prompts.append(Prompt(row["id"].strip(), row[text_column].strip()))
    return tuple(prompts)


def check_prompts(prompts: tuple[Prompt, ...]) -> None:
    """Reject an empty list, ids unfit for file names, duplicate ids and line breaks."""
    if not prompts:
        raise InvalidInputError(
            "no prompts given; pass --prompt TEXT, --prompts FILE (text, one per "
            "line, or CSV with id,prompt) or a prompts list in the sweep file"
        )
    seen: set[str] = set()
    for prompt in prompts:
        if not PROMPT_ID_PATTERN.match(prompt.prompt_id):
            raise InvalidInputError(
                f"prompt id {prompt.prompt_id!r} is not usable in file names; use up "
                "to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if "__" in prompt.prompt_id:
            raise InvalidInputError(
                f"prompt id {prompt.prompt_id!r} contains '__', which separates the "
                "settings in image names; use single underscores"
            )
        if prompt.prompt_id in seen:
            raise InvalidInputError(f"prompt id {prompt.prompt_id!r} is used twice")
        seen.add(prompt.prompt_id)
        if "\n" in prompt.text or "\r" in prompt.text:
            raise InvalidInputError(
                f"prompt {prompt.prompt_id!r} contains a line break; write each prompt "
                "on one line"
            )


def load_sweep_file(path: Path) -> dict[str, Any]:
    """Read a TOML sweep file into flat settings; floats stay exact decimals."""
    if not path.is_file():
        raise InvalidInputError(f"--sweep: file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(
            f"--sweep: {path} is not valid TOML ({error})"
        ) from None
    settings: dict[str, Any] = {}
    for section, keys in SWEEP_FILE_KEYS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise InvalidInputError(f"--sweep: [{section}] in {path} must be a table")
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise InvalidInputError(
                f"--sweep: unknown key {unknown[0]!r} in [{section}] of {path}; "
                f"known keys: {', '.join(keys)}"
            )
        for key, setting in keys.items():
            if key in table:
                settings[setting] = table[key]
    unknown_sections = sorted(set(data) - set(SWEEP_FILE_KEYS))
    if unknown_sections:
        raise InvalidInputError(
            f"--sweep: unknown section [{unknown_sections[0]}] in {path}; known "
            f"sections: {', '.join(SWEEP_FILE_KEYS)}"
        )
    if "prompts_file" in settings:
        settings["prompts_file"] = path.parent / str(settings["prompts_file"])
    return settings


# TOML section -> {key in the file: setting name}
SWEEP_FILE_KEYS: dict[str, dict[str, str]] = {
    "model": {
        "id": "model",
        "vae": "vae",
        "scheduler": "scheduler",
        "device": "device",
        "dtype": "dtype",
    },
    "render": {
        "steps": "steps",
        "width": "width",
        "height": "height",
        "negative_prompt": "negative_prompt",
    },
    "axes": {
        "prompts": "prompts",
        "prompts_file": "prompts_file",
        "seeds": "seeds",
        "guidance_scale": "guidance_scale",
        "guidance_rescale": "guidance_rescale",
        "threshold": "threshold",
    },
    "clip": {
        "model": "clip_model",
        "pretrained": "clip_pretrained",
        "resize": "clip_resize",
    },
    "score": {"saturation_threshold": "saturation_threshold"},
}


def _as_list_text(value: Any) -> str:
    """Join a TOML list (of Decimals, ints or strings) into the option's text form."""
    if isinstance(value, list):
        return ",".join(
            canonical_decimal(item) if isinstance(item, Decimal) else str(item)
            for item in value
        )
    if isinstance(value, Decimal):
        return canonical_decimal(value)
    return str(value)


def _prompts_from_setting(value: Any) -> tuple[Prompt, ...]:
    if isinstance(value, str):
        value = [value]
    prompts = []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            prompts.append(Prompt(str(item.get("id", "")), str(item.get("text", ""))))
        else:
            prompts.append(Prompt(f"p{index:02d}", str(item)))
    return tuple(prompt for prompt in prompts if prompt.text.strip())


def _positive_int(value: Any, option: str, multiple_of: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{option}: {value!r} is not an integer") from None
    if number <= 0 or number % multiple_of:
        rule = (
            f"a positive multiple of {multiple_of}" if multiple_of > 1 else "positive"
        )
        raise InvalidInputError(f"{option}: {number} must be {rule}")
    return number


def _optional_size(value: Any, option: str) -> int | None:
    return None if value is None else _positive_int(value, option, 8)


def build_definition(settings: dict[str, Any]) -> SweepDefinition:
    """Validate merged settings (file values replaced by given options) into a definition."""
    if not settings.get("model"):
        raise InvalidInputError(
            "--model is missing; pass a Hugging Face id, a diffusers folder or a "
            "single-file checkpoint (or set id in [model] of the sweep file)"
        )
    prompts = _collect_prompts(settings)
    check_prompts(prompts)

    scales = parse_decimal_list(
        _as_list_text(settings.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)),
        "--guidance-scale",
    )
    check_guidance_values(scales)
    rescales = parse_decimal_list(
        _as_list_text(settings.get("guidance_rescale", DEFAULT_GUIDANCE_RESCALE)),
        "--guidance-rescale",
    )
    check_rescale_values(rescales)
    seeds = tuple(parse_seeds(_as_list_text(settings.get("seeds", DEFAULT_SEEDS))))
    if len(seeds) > MAX_AXIS_VALUES:
        raise InvalidInputError(
            f"--seeds: {len(seeds)} seeds is above the limit of {MAX_AXIS_VALUES}"
        )
    scheduler = str(settings.get("scheduler") or "default")
    check_scheduler_name(scheduler)
    thresholds = parse_threshold_list(settings.get("threshold") or "off")

    resize = str(settings.get("clip_resize") or "pad").lower()
    if resize not in RESIZE_MODES:
        raise InvalidInputError(
            f"--clip-resize {resize!r} is unknown; use one of {', '.join(RESIZE_MODES)}"
        )
    saturation = parse_decimal_list(
        _as_list_text(settings.get("saturation_threshold", "0.97")),
        "--saturation-threshold",
    )
    if len(saturation) != 1 or not 0 <= Decimal(saturation[0]) < 1:
        raise InvalidInputError(
            "--saturation-threshold must be one value in [0, 1), e.g. 0.97"
        )
    clip_model = str(settings.get("clip_model") or DEFAULT_CLIP_MODEL)
    # The default tag belongs to the default model; another model names its own
    # weights (or, as a local-dir folder, contains them).
    default_pretrained = (
        DEFAULT_CLIP_PRETRAINED if clip_model == DEFAULT_CLIP_MODEL else None
    )
    pretrained = settings.get("clip_pretrained") or default_pretrained
    return SweepDefinition(
        model=str(settings["model"]),
        prompts=prompts,
        seeds=seeds,
        guidance_scales=scales,
        guidance_rescales=rescales,
        thresholds=thresholds,
        negative_prompt=str(settings.get("negative_prompt") or ""),
        steps=_positive_int(settings.get("steps", 30), "--steps"),
        width=_optional_size(settings.get("width"), "--width"),
        height=_optional_size(settings.get("height"), "--height"),
        scheduler=scheduler,
        vae=str(settings["vae"]) if settings.get("vae") else None,
        device=str(settings.get("device") or "auto"),
        dtype=str(settings.get("dtype") or "auto"),
        clip_model=clip_model,
        clip_pretrained=str(pretrained) if pretrained else None,
        clip_resize=resize,
        saturation_threshold=saturation[0],
    )


def _collect_prompts(settings: dict[str, Any]) -> tuple[Prompt, ...]:
    prompts: tuple[Prompt, ...] = ()
    if settings.get("prompts"):
        prompts += _prompts_from_setting(settings["prompts"])
    if settings.get("prompts_file"):
        prompts += read_prompts_file(Path(settings["prompts_file"]), len(prompts))
    return prompts
