"""The sweep-rescale command end to end on the tiny SDXL pipeline and tiny CLIP.

One sweep (1 prompt x 2 seeds x 2 rescale factors at guidance 9) runs once per
module. The tests read its outputs and rerun it, and others check bad input.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fixtures import make_tiny_clip
from renderqa.cli.app import app
from renderqa.core.guidance import saturated_fraction
from renderqa.core.imageio import read_json_chunk
from renderqa.sweeps.store import RESULT_COLUMNS

BUILD_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "build"
PROMPT = "a red mug on a white background"
STEPS = 3
SIZE = 64


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    built = BUILD_DIR / "tiny-sdxl-eps"
    if (built / "model_index.json").is_file():
        return built
    from fixtures.tiny_pipelines import save_fixture_pipeline

    out = tmp_path_factory.mktemp("pipelines")
    path = save_fixture_pipeline("tiny-sdxl-eps", out)
    shutil.rmtree(out / ".tiny-sdxl-eps-tokenizers", ignore_errors=True)
    return path


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> Path:
    return make_tiny_clip.built_or_build(BUILD_DIR, tmp_path_factory.mktemp("clip"))


def sweep_args(
    model: Path,
    clip: Path,
    out: Path,
    *extra: str,
    seeds: str = "0-1",
    guidance_scale: str = "9",
    guidance_rescale: str = "0,0.7",
) -> list[str]:
    return [
        "sweep-rescale",
        "--model",
        str(model),
        "--prompt",
        PROMPT,
        "--seeds",
        seeds,
        "--guidance-scale",
        guidance_scale,
        "--guidance-rescale",
        guidance_rescale,
        "--steps",
        str(STEPS),
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--batch-size",
        "3",
        "--clip-model",
        str(clip / "tiny-clip.json"),
        "--clip-pretrained",
        str(clip / "tiny-clip.safetensors"),
        "--out",
        str(out),
        *extra,
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def sweep(tiny_sdxl, clip_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    args = sweep_args(tiny_sdxl, clip_files, out)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "args": args, "output": result.output}


def test_sweep_writes_every_output(sweep):
    out = sweep["out"]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert {row["guidance_rescale"] for row in rows} == {"0", "0.7"}
    assert all((out / row["image"]).is_file() for row in rows)
    summary = read_csv(out / "summary.csv")
    assert [row["guidance_rescale"] for row in summary] == ["0", "0.7"]
    assert summary[0]["clip_change_percent"] == "0.0"
    assert sum(row["recommended"] == "true" for row in summary) == 1
    assert (out / "saturation_vs_clip.png").is_file()
    sheets = sorted((out / "sheets").glob("*.png"))
    assert [sheet.name for sheet in sheets] == ["p00__gs9__thoff.png"]
    assert "4 rendered, 0 already done" in sweep["output"]


def test_rows_record_settings_models_and_versions(sweep, tiny_sdxl):
    rows = read_csv(sweep["out"] / "results.csv")
    row = rows[0]
    assert row["model"] == str(tiny_sdxl)
    assert row["model_kind"] == "sdxl"
    assert row["rescale_space"] == "model output (epsilon)"
    assert row["clip_model"].endswith("tiny-clip.json")
    assert row["clip_resize"] == "pad"
    assert row["clip_caption_truncated"] == "false"
    assert row["torch_version"] == torch.__version__
    assert row["open_clip_version"] == open_clip.__version__
    assert row["num_inference_steps"] == str(STEPS)
    assert row["saturation_threshold"] == "0.97"
    assert float(row["std_ratio"]) > 0


def test_sweep_image_equals_render_command(sweep, tiny_sdxl, tmp_path):
    rows = read_csv(sweep["out"] / "results.csv")
    row = next(r for r in rows if r["guidance_rescale"] == "0.7" and r["seed"] == "1")
    args = ["render", PROMPT, "--model", str(tiny_sdxl), "--seeds", "1"]
    args += ["--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE)]
    args += [
        "--guidance-scale",
        "9",
        "--guidance-rescale",
        "0.7",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [alone_path] = list(tmp_path.glob("*.png"))

    swept = np.asarray(Image.open(sweep["out"] / row["image"]).convert("RGB"))
    alone = np.asarray(Image.open(alone_path).convert("RGB"))
    difference = np.abs(swept.astype(int) - alone.astype(int))
    assert difference.max() == 0, f"max difference {difference.max()} levels"
    swept_record = read_json_chunk(sweep["out"] / row["image"], "renderqa")
    alone_record = read_json_chunk(alone_path, "renderqa")
    assert swept_record == alone_record


def test_saturation_column_matches_hand_count(sweep, tiny_sdxl):
    from renderqa.core.pipeline import load_pipeline
    from renderqa.core.render import RenderRequest, render_batch

    rows = read_csv(sweep["out"] / "results.csv")
    row = next(r for r in rows if r["guidance_rescale"] == "0" and r["seed"] == "0")
    loaded = load_pipeline(str(tiny_sdxl), device="cpu")
    request = RenderRequest(
        prompt=PROMPT,
        seed=0,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        guidance_scale=9.0,
        guidance_rescale=0.0,
    )
    pixels = render_batch(loaded, [request])[0].pixels
    # Counted here by hand from the decoded float pixels, before quantising.
    by_hand = float((pixels > 0.97).any(axis=-1).sum()) / (SIZE * SIZE)
    assert float(row["saturated_fraction"]) == pytest.approx(by_hand, abs=1e-12)


def test_saturation_metric_matches_hand_count():
    pixels = np.zeros((4, 4, 3), dtype=np.float32)
    pixels[0, 0] = (0.98, 0.1, 0.1)  # one channel above 0.97
    pixels[1, 1] = (0.2, 0.2, 0.99)
    pixels[2, 2] = (0.97, 0.97, 0.97)  # at the threshold: not saturated
    pixels[3, 3] = (1.0, 1.0, 1.0)
    pixels[0, 1] = (0.3, 0.1, 0.1)
    assert saturated_fraction(pixels, 0.97) == 3 / 16
    assert saturated_fraction(pixels, 0.5) == 4 / 16
    assert saturated_fraction(pixels, 0.25) == 5 / 16


def test_clip_column_matches_open_clip_on_saved_image(sweep, clip_files):
    rows = read_csv(sweep["out"] / "results.csv")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip",
        pretrained=str(clip_files / "tiny-clip.safetensors"),
        image_resize_mode="longest",
    )
    model.eval()
    tokens = open_clip.get_tokenizer("tiny-clip")([PROMPT])
    with torch.no_grad():
        text = model.encode_text(tokens)
        text = text / text.norm(dim=-1, keepdim=True)
        for row in rows:
            image = Image.open(sweep["out"] / row["image"]).convert("RGB")
            features = model.encode_image(preprocess(image)[None])
            features = features / features.norm(dim=-1, keepdim=True)
            expected = float((features * text).sum())
            difference = abs(float(row["clip_cosine_raw"]) - expected)
            assert difference < 1e-5, f"{row['point_id']}: off by {difference:.2e}"


def test_rerun_skips_finished_rows(sweep):
    before = (sweep["out"] / "results.csv").read_bytes()
    result = CliRunner().invoke(app, sweep["args"])
    assert result.exit_code == 0, result.output
    assert "0 rendered, 4 already done" in result.output
    assert (sweep["out"] / "results.csv").read_bytes() == before


def test_different_sweep_in_same_folder_is_rejected(sweep):
    before = (sweep["out"] / "results.csv").read_bytes()
    args = [arg if arg != "0,0.7" else "0,0.5" for arg in sweep["args"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "contains a different sweep" in " ".join(result.output.split())
    assert "--overwrite" in result.output
    assert (sweep["out"] / "results.csv").read_bytes() == before


def test_load_failure_with_overwrite_keeps_old_results(sweep):
    before = (sweep["out"] / "results.csv").read_bytes()
    args = ["sweep-rescale", "--model", "no/such-model", "--prompt", PROMPT]
    args += ["--clip-model", "ViT-B-99", "--out", str(sweep["out"])]
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 2
    assert "'ViT-B-99' is not an open_clip model" in " ".join(result.output.split())
    assert (sweep["out"] / "results.csv").read_bytes() == before


def test_overwrite_starts_afresh(tiny_sdxl, clip_files, tmp_path):
    out = tmp_path / "run"
    first = sweep_args(tiny_sdxl, clip_files, out, seeds="0", guidance_rescale="0")
    assert CliRunner().invoke(app, first).exit_code == 0
    assert (out / "images" / "p00__gs9__gr0__thoff__seed0.png").exists()
    second = sweep_args(
        tiny_sdxl, clip_files, out, seeds="0", guidance_scale="5", guidance_rescale="0"
    )
    result = CliRunner().invoke(app, [*second, "--overwrite"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert [row["guidance_scale"] for row in rows] == ["5"]
    assert not (out / "images" / "p00__gs9__gr0__thoff__seed0.png").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--guidance-rescale", "0.7-0.3"], "runs backwards"),
        (["--guidance-rescale", "a,b"], "'a' is not a number"),
        (["--guidance-rescale", "0,1.5"], "1.5 is outside [0, 1]"),
        (["--guidance-scale", "9-5:1"], "runs backwards"),
        (["--seeds", "3-1"], "runs backwards"),
        (["--clip-model", "ViT-B-99"], "known models include ViT-B-32"),
        (
            ["--clip-model", "ViT-B-32", "--clip-pretrained", "laion2b_s34b_b79k"],
            "hf download",
        ),
        (["--clip-resize", "stretch"], "--clip-resize 'stretch' is unknown"),
        (["--threshold", "latent:0.995"], "is not valid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, options, fragment):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    args = ["sweep-rescale", "--model", "some/model", "--prompt", "a mug"]
    args += ["--out", str(tmp_path / "out"), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    # NOTE: Rich wraps the error line at the console width (80 without a
    # terminal), so the text is compared with line breaks folded to spaces.
    text = " ".join(result.output.split())
    assert fragment in text
    assert text.startswith("error:"), text
    assert text.count("error:") == 1, text
    assert "Traceback" not in text


def test_empty_prompt_file_is_rejected(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    args = ["sweep-rescale", "--model", "m/m", "--prompts", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no prompts given" in " ".join(result.output.split())


def test_unwritable_output_folder_is_rejected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["sweep-rescale", "--model", "m/m", "--prompt", "a mug"]
    result = CliRunner().invoke(app, [*args, "--out", str(blocker / "run")])
    assert result.exit_code == 2
    assert "cannot create the folder" in " ".join(result.output.split())
    assert blocker.read_text() == "not a folder"


def test_option_replaces_sweep_file_value(tmp_path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        '[model]\nid = "m/m"\n[axes]\nprompts = ["a mug"]\nguidance_rescale = [0, 0.7]\n'
    )
    args = ["sweep-rescale", "--sweep", str(sweep_file), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--guidance-rescale", "0,1.5"])
    assert result.exit_code == 2
    assert "1.5 is outside [0, 1]" in " ".join(result.output.split())


def test_sweep_file_reads_prompts_beside_it(tmp_path):
    (tmp_path / "prompts.csv").write_text("id,prompt\nmug,a mug\n")
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        '[model]\nid = "m/m"\n[axes]\nprompts_file = "prompts.csv"\n'
        '[clip]\nmodel = "ViT-B-99"\n'
    )
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app, ["sweep-rescale", "--sweep", str(sweep_file), "--out", str(out)]
    )
    # The prompts were read (no "no prompts given"), so the run got as far as CLIP.
    assert result.exit_code == 2
    assert "'ViT-B-99' is not an open_clip model" in " ".join(result.output.split())
