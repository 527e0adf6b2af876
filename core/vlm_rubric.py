"""The rubric a vision LLM judges renders by, its JSON schema and verdict validation.

A rubric is a system instruction plus named criteria. The verdict a model returns
contains, for each criterion, whether the defect was found and a short detail, then
an overall "pass" or "fail", an integer score from 1 (unusable) to 5 (flawless) and
free-text notes. The same rubric yields the JSON schema sent in `response_format`
and the pydantic model that validates every reply, because some servers accept
`strict: true` and then ignore it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

from renderqa.core.errors import InvalidInputError

SCORE_MIN = 1
SCORE_MAX = 5
RESERVED_KEYS = frozenset({"overall", "score", "notes"})
CRITERION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
SCHEMA_NAME = "render_verdict"


@dataclass(frozen=True)
class Criterion:
    """One defect the model checks for: a snake_case key and the question asked."""

    name: str
    question: str


@dataclass(frozen=True)
class Rubric:
    """System instruction and criteria; `sha256` identifies it in output rows."""

    instructions: str
    criteria: tuple[Criterion, ...]

    @property
    def sha256(self) -> str:
        canonical = json.dumps(
            {
                "instructions": self.instructions,
                "criteria": [[c.name, c.question] for c in self.criteria],
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


DEFAULT_RUBRIC = Rubric(
    instructions=(
        "You are a quality inspector for product photos made by an image generator. "
        "Judge only what is visible in the render. A render passes when a customer "
        "could receive it without edits. Score 5 for flawless, 4 for minor issues "
        "nobody would notice, 3 for noticeable issues, 2 for clear defects and 1 "
        "for unusable. Keep each detail under 30 words."
    ),
    criteria=(
        Criterion(
            "background_artifacts",
            "Does the background contain artifacts: blotches, banding, stray "
            "objects, texture noise or smeared patterns?",
        ),
        Criterion(
            "clipped_edges",
            "Is the product cut off by the frame, or are its edges clipped, "
            "jagged or fused with the background?",
        ),
        Criterion(
            "colour_drift",
            "Do the colours drift: a cast, blown highlights or oversaturation, or, "
            "when a source image is given, colours that differ from the source?",
        ),
    ),
)


def load_rubric(path: str | os.PathLike[str]) -> Rubric:
    """Read a rubric from a TOML or JSON file (chosen by suffix) and check it.

    The file contains `instructions` (a string) and `criteria`, a list of tables
    with `name` (snake_case) and `question`. Raises InvalidInputError naming the
    file and the broken rule.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(
            f"--rubric {path}: cannot read file ({error})"
        ) from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise InvalidInputError(
            f"--rubric {path}: invalid {kind} ({error}); fix the file or omit "
            "--rubric to use the default rubric"
        ) from None
    return _rubric_from_data(data, path)


def _rubric_from_data(data: Any, path: Path) -> Rubric:
    def invalid(rule: str) -> InvalidInputError:
        return InvalidInputError(f"--rubric {path}: {rule}")

    if not isinstance(data, dict):
        raise invalid("the top level must be a table with instructions and criteria")
    instructions = data.get("instructions")
    if not isinstance(instructions, str) or not instructions.strip():
        raise invalid("'instructions' must be a non-empty string")
    entries = data.get("criteria")
    if not isinstance(entries, list) or not entries:
        raise invalid("'criteria' must be a non-empty list of {name, question}")

    criteria = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", "question"}:
            raise invalid(f"criteria[{index}] must have exactly 'name' and 'question'")
        name, question = entry["name"], entry["question"]
        if not isinstance(name, str) or not CRITERION_NAME.match(name):
            raise invalid(
                f"criteria[{index}].name {name!r} must be snake_case "
                "(a-z, 0-9, _; at most 40 characters)"
            )
        if name in RESERVED_KEYS or name in {c.name for c in criteria}:
            raise invalid(f"criteria[{index}].name {name!r} is reserved or repeated")
        if not isinstance(question, str) or not question.strip():
            raise invalid(f"criteria[{index}].question must be a non-empty string")
        criteria.append(Criterion(name, question.strip()))
    return Rubric(instructions=instructions.strip(), criteria=tuple(criteria))


def verdict_json_schema(rubric: Rubric) -> dict[str, Any]:
    """Build the JSON schema of a verdict in the subset strict structured output takes.

    Strict mode needs every property listed in `required` and
    `additionalProperties: false` on every object.
    """
    properties: dict[str, Any] = {}
    for criterion in rubric.criteria:
        properties[criterion.name] = {
            "type": "object",
            "description": criterion.question,
            "properties": {
                "found": {
                    "type": "boolean",
                    "description": "true if the defect is present",
                },
                "detail": {"type": "string"},
            },
            "required": ["found", "detail"],
            "additionalProperties": False,
        }
    properties["overall"] = {"type": "string", "enum": ["pass", "fail"]}
    properties["score"] = {
        "type": "integer",
        "minimum": SCORE_MIN,
        "maximum": SCORE_MAX,
    }
    properties["notes"] = {"type": "string"}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


class CriterionResult(BaseModel):
    """The model's finding for one criterion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    found: StrictBool
    detail: StrictStr


def verdict_model(rubric: Rubric) -> type[BaseModel]:
    """Build the pydantic model that validates a verdict for `rubric`, strictly."""
    fields: dict[str, Any] = {c.name: (CriterionResult, ...) for c in rubric.criteria}
    fields["overall"] = (Literal["pass", "fail"], ...)
    fields["score"] = (StrictInt, Field(ge=SCORE_MIN, le=SCORE_MAX))
    fields["notes"] = (StrictStr, ...)
    return create_model(
        "Verdict",
        __config__=ConfigDict(extra="forbid", strict=True),
        **fields,
    )


class VerdictError(ValueError):
    """A reply that is not a valid verdict; the message names the problem."""


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)\n?\s*```", re.DOTALL)


def extract_json_text(content: str) -> str:
    """Return the JSON object text of a reply, unwrapping a Markdown code fence.

    Models often wrap requested JSON in ```json fences, sometimes with a sentence
    around them. The first fenced block is used, else the whole text.
    """
    match = _FENCE.search(content)
    return (match.group(1) if match else content).strip()


def parse_verdict(content: str | None, model: type[BaseModel]) -> dict[str, Any]:
    """Validate a reply against the verdict model and return the verdict as a dict.

    Raises VerdictError for an empty reply, text that is not JSON, or JSON that
    breaks the schema (missing or extra keys, wrong types, score out of range).
    """
    if content is None or not content.strip():
        raise VerdictError("the reply is empty")
    text = extract_json_text(content)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise VerdictError(
            f"the reply is not JSON ({error.msg} at char {error.pos})"
        ) from None
    try:
        return model.model_validate(data).model_dump()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'verdict'}: {item['msg']}"
            for item in error.errors()[:5]
        )
        raise VerdictError(
            f"the reply breaks the verdict schema ({problems})"
        ) from None
