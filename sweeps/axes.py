"""Parsing of sweep axis values: exact decimals and thresholding choices.

Decimal values are parsed with `decimal.Decimal` and kept as their canonical string,
so `0.3` is stored and reported as `0.3`, never as 0.30000000000000004. A range
`START-STOP:STEP` is expanded by exact decimal addition, so it cannot drift the way
a floating-point `arange` does.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from renderqa.core.errors import InvalidInputError

# A range of more values than this is almost certainly a typo in the step.
MAX_AXIS_VALUES = 1000

_DECIMAL_RANGE = re.compile(
    r"^(?P<start>[^-:]+)-(?P<stop>[^-:]+)(?::(?P<step>[^-:]+))?$"
)


def _parse_decimal(text: str, option: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except decimal.InvalidOperation:
        raise InvalidInputError(
            f"{option}: {text.strip()!r} is not a number; write values like 0,0.3,0.7 "
            "or a range like 0-1:0.25"
        ) from None
    if not value.is_finite():
        raise InvalidInputError(f"{option}: {text.strip()!r} is not a finite number")
    return value


def canonical_decimal(value: Decimal) -> str:
    """Return the plain decimal string of `value` ("0.3", "1.0", "9"), never exponent form."""
    return format(value, "f")


def _expand_decimal_range(
    start: Decimal, stop: Decimal, step: Decimal, option: str, item: str
) -> list[Decimal]:
    if step <= 0:
        raise InvalidInputError(
            f"{option}: range {item!r} has step {step}; the step must be positive"
        )
    count = int((stop - start) / step) + 1
    if count > MAX_AXIS_VALUES:
        raise InvalidInputError(
            f"{option}: range {item!r} gives {count} values, above the limit of "
            f"{MAX_AXIS_VALUES}; use a larger step"
        )
    # Exact decimal multiples, so 0-1:0.1 ends at exactly 1.0.
    return [start + step * index for index in range(count)]


def parse_decimal_list(text: str, option: str) -> tuple[str, ...]:
    """Parse "0,0.3,0.7" or "0-1:0.25" (or a mix) into canonical decimal strings.

    Raises InvalidInputError for an empty list, a non-number, a range that runs
    backwards or lacks a step, and a value listed twice.
    """
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise InvalidInputError(f"{option}: no values given; write e.g. 0,0.3,0.7")
    values: list[Decimal] = []
    for item in items:
        if not item:
            raise InvalidInputError(
                f"{option}: empty value in {text!r}; separate values with single commas"
            )
        match = _DECIMAL_RANGE.match(item)
        if match is None:
            values.append(_parse_decimal(item, option))
            continue
        start = _parse_decimal(match["start"], option)
        stop = _parse_decimal(match["stop"], option)
        if stop < start:
            raise InvalidInputError(
                f"{option}: range {item!r} runs backwards; write the smaller value "
                f"first, e.g. {match['stop']}-{match['start']}:STEP"
            )
        if match["step"] is None:
            raise InvalidInputError(
                f"{option}: range {item!r} has no step; write START-STOP:STEP, "
                f"e.g. {match['start']}-{match['stop']}:0.1, or list the values"
            )
        step = _parse_decimal(match["step"], option)
        values.extend(_expand_decimal_range(start, stop, step, option, item))
    return _unique_strings((canonical_decimal(value) for value in values), option)


def _unique_strings(values: Iterable[str], option: str) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        if any(Decimal(value) == Decimal(earlier) for earlier in seen):
            raise InvalidInputError(f"{option}: value {value} is listed twice")
        seen.append(value)
    return tuple(seen)


def check_rescale_values(values: Iterable[str], option: str = "--guidance-rescale"):
    """Reject guidance rescale factors outside [0, 1], the interpolation range."""
    for value in values:
        if not Decimal(0) <= Decimal(value) <= Decimal(1):
            raise InvalidInputError(
                f"{option}: {value} is outside [0, 1]; the rescale factor blends the "
                "rescaled and plain CFG outputs, so 0 is off and 1 is fully rescaled"
            )


def check_guidance_values(values: Iterable[str], option: str = "--guidance-scale"):
    """Reject negative guidance scales; values up to 1 turn guidance off."""
    for value in values:
        if Decimal(value) < 0:
            raise InvalidInputError(
                f"{option}: {value} is negative; use 0 or more (1 or less turns "
                "classifier-free guidance off)"
            )


@dataclass(frozen=True)
class ThresholdChoice:
    """One value of the thresholding axis.

    Text forms: `off`; `pixel:PERCENTILE` (Imagen's rule on a [-1, 1] x0 estimate);
    `latent:PERCENTILE:MIMIC_SCALE[:per-channel]`, for example `latent:0.995:3`,
    which renormalises the guided x0 to the range that the lower mimic guidance
    scale would give.
    """

    label: str
    mode: str | None
    percentile: str | None = None
    mimic_scale: str | None = None
    per_channel: bool = False

    @property
    def is_off(self) -> bool:
        return self.mode is None


THRESHOLD_USAGE = (
    "write off, pixel:PERCENTILE or latent:PERCENTILE:MIMIC_SCALE[:per-channel], "
    "e.g. latent:0.995:3"
)


def parse_threshold(text: str, option: str = "--threshold") -> ThresholdChoice:
    """Parse one thresholding choice; see ThresholdChoice for the text forms."""
    item = text.strip().lower()
    if item in {"off", "none"}:
        return ThresholdChoice(label="off", mode=None)
    parts = item.split(":")
    valid_shape = (parts[0] == "pixel" and len(parts) == 2) or (
        parts[0] == "latent" and len(parts) in (3, 4)
    )
    if not valid_shape:
        raise InvalidInputError(
            f"{option}: {text.strip()!r} is not valid; {THRESHOLD_USAGE}"
        )
    per_channel = len(parts) == 4
    if per_channel and parts[3] != "per-channel":
        raise InvalidInputError(
            f"{option}: {text.strip()!r} ends in {parts[3]!r}; the only flag is "
            f"per-channel; {THRESHOLD_USAGE}"
        )
    percentile = _parse_decimal(parts[1], option)
    if not Decimal(0) < percentile <= Decimal(1):
        raise InvalidInputError(
            f"{option}: percentile {parts[1]} in {text.strip()!r} must be in (0, 1], "
            "e.g. 0.995"
        )
    percentile_text = canonical_decimal(percentile)
    if parts[0] == "pixel":
        return ThresholdChoice(
            label=f"pixel:{percentile_text}", mode="pixel", percentile=percentile_text
        )
    mimic_scale = _parse_decimal(parts[2], option)
    if mimic_scale < 1:
        raise InvalidInputError(
            f"{option}: mimic scale {parts[2]} in {text.strip()!r} must be 1 or more"
        )
    mimic_text = canonical_decimal(mimic_scale)
    label = f"latent:{percentile_text}:{mimic_text}"
    if per_channel:
        label += ":per-channel"
    return ThresholdChoice(
        label=label,
        mode="latent",
        percentile=percentile_text,
        mimic_scale=mimic_text,
        per_channel=per_channel,
    )


def parse_threshold_list(
    text: str | Iterable[str], option: str = "--threshold"
) -> tuple[ThresholdChoice, ...]:
    """Parse a comma-separated list (or a list) of thresholding choices."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if not any(str(item).strip() for item in items):
        raise InvalidInputError(f"{option}: no values given; {THRESHOLD_USAGE}")
    choices = tuple(parse_threshold(str(item), option) for item in items)
    labels = [choice.label for choice in choices]
    for label in labels:
        if labels.count(label) > 1:
            raise InvalidInputError(f"{option}: {label} is listed twice")
    return choices
