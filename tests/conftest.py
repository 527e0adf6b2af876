"""Shared test setup: offline hub, and the tiny fixture pipelines built once."""

import os

# Set before anything imports huggingface_hub, which reads it once at import: no test
# may reach the hub, and repo ids must resolve from the cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURE_BUILD = Path(__file__).resolve().parent.parent / "fixtures" / "build"


@pytest.fixture(scope="session")
def tiny_pipelines() -> Path:
    """The folder holding tiny-sdxl-eps, tiny-sdxl-v, tiny-sd15-eps, tiny-sd15-v."""
    from fixtures.tiny_pipelines import FIXTURE_PIPELINES, save_fixture_pipeline

    for name in FIXTURE_PIPELINES:
        if not (FIXTURE_BUILD / name / "model_index.json").is_file():
            FIXTURE_BUILD.mkdir(parents=True, exist_ok=True)
            save_fixture_pipeline(name, FIXTURE_BUILD)
    return FIXTURE_BUILD
