"""render against diffusers' own pipelines, on the tiny SDXL and SD 1.5 fixtures."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

from renderqa.cli.app import app
from renderqa.core.imageio import read_json_chunk, read_png_text
from renderqa.core.pipeline import load_pipeline
from renderqa.core.render import RenderRequest, ThresholdSettings, render_batch
from renderqa.core.schedulers import SCHEDULERS, build_scheduler

PROMPT = "a red mug on a white background"
FIXTURES = ["tiny-sdxl-eps", "tiny-sdxl-v", "tiny-sd15-eps", "tiny-sd15-v"]
SAMPLERS = [name for name in SCHEDULERS if name != "default"]
MAX_PIXEL_ERROR = 1 / 255


def diffusers_render(pipe, scheduler, request):
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler)
    return pipe(
        request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=request.steps,
        width=request.width,
        height=request.height,
        guidance_scale=request.guidance_scale,
        guidance_rescale=request.guidance_rescale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    ).images[0]


@pytest.fixture(scope="module")
def reference_pipes(tiny_pipelines):
    pipes = {}
    for name in FIXTURES:
        pipe = DiffusionPipeline.from_pretrained(tiny_pipelines / name)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.mark.parametrize("name", FIXTURES)
def test_render_matches_diffusers_for_each_scheduler(
    tiny_pipelines, reference_pipes, name
):
    base_scheduler = reference_pipes[name].scheduler
    errors = {}
    for scheduler in SAMPLERS:
        loaded = load_pipeline(str(tiny_pipelines / name), scheduler=scheduler)
        for rescale in (0.0, 0.7):
            request = RenderRequest(
                prompt=PROMPT,
                seed=11,
                steps=4,
                width=64,
                height=64,
                guidance_scale=7.5,
                guidance_rescale=rescale,
            )
            ours = render_batch(loaded, [request])[0].pixels
            reference_pipes[name].scheduler = base_scheduler
            theirs = diffusers_render(reference_pipes[name], scheduler, request)
            errors[(scheduler, rescale)] = float(np.abs(ours - theirs).max())
    worst = max(errors.values())
    assert worst <= MAX_PIXEL_ERROR, (
        f"max pixel error per (scheduler, rescale): {errors}"
    )


def test_render_matches_diffusers_without_cfg(tiny_pipelines, reference_pipes):
    request = RenderRequest(
        prompt=PROMPT,
        seed=5,
        steps=4,
        width=64,
        height=64,
        guidance_scale=1.0,
        guidance_rescale=0.7,
    )
    loaded = load_pipeline(str(tiny_pipelines / "tiny-sdxl-eps"), scheduler="euler")
    result = render_batch(loaded, [request])[0]
    theirs = diffusers_render(reference_pipes["tiny-sdxl-eps"], "euler", request)
    assert np.abs(result.pixels - theirs).max() <= MAX_PIXEL_ERROR
    assert result.std_ratio is None


def test_batched_seeds_match_single_renders(tiny_pipelines):
    loaded = load_pipeline(str(tiny_pipelines / "tiny-sd15-v"), scheduler="dpm++-2m")
    requests = [
        RenderRequest(
            prompt=PROMPT,
            seed=seed,
            steps=4,
            width=64,
            height=64,
            guidance_scale=9.0,
            guidance_rescale=rescale,
        )
        for seed, rescale in ((1, 0.0), (2, 0.7), (3, 1.0))
    ]
    batched = render_batch(loaded, requests)
    for request, result in zip(requests, batched, strict=True):
        alone = render_batch(loaded, [request])[0]
        error = np.abs(alone.pixels - result.pixels).max()
        assert error <= MAX_PIXEL_ERROR, f"seed {request.seed}: max error {error}"


@pytest.mark.parametrize("name", ["tiny-sdxl-eps", "tiny-sd15-v"])
def test_mimic_scale_equal_to_guidance_changes_nothing(tiny_pipelines, name):
    loaded = load_pipeline(str(tiny_pipelines / name), scheduler="euler")
    plain = RenderRequest(
        prompt=PROMPT,
        seed=7,
        steps=4,
        width=64,
        height=64,
        guidance_scale=9.0,
        guidance_rescale=0.5,
    )
    mimic = RenderRequest(
        **{
            **plain.__dict__,
            "threshold": ThresholdSettings(
                mode="latent", percentile=0.995, mimic_scale=9.0
            ),
        }
    )
    first = render_batch(loaded, [plain])[0]
    second = render_batch(loaded, [mimic])[0]
    assert np.array_equal(first.pixels, second.pixels)


def test_lower_mimic_scale_changes_render(tiny_pipelines):
    loaded = load_pipeline(str(tiny_pipelines / "tiny-sdxl-v"), scheduler="ddim")
    base = {
        "prompt": PROMPT,
        "seed": 7,
        "steps": 4,
        "width": 64,
        "height": 64,
        "guidance_scale": 12.0,
    }
    plain = render_batch(loaded, [RenderRequest(**base)])[0]
    settings = ThresholdSettings(mode="latent", percentile=0.9, mimic_scale=2.0)
    bounded = render_batch(loaded, [RenderRequest(**base, threshold=settings)])[0]
    assert np.abs(plain.pixels - bounded.pixels).max() > 1 / 255
    assert bounded.std_ratio < plain.std_ratio


def render_cli(args):
    return CliRunner().invoke(app, ["render", *args])


def test_cli_writes_png_with_parameters(tiny_pipelines, tmp_path):
    out = tmp_path / "out"
    model = str(tiny_pipelines / "tiny-sdxl-eps")
    common = [
        PROMPT,
        "--model",
        model,
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
    ]
    args = [*common, "--seeds", "0-1", "-g", "9", "-r", "0.7", "--out", str(out)]
    result = render_cli(args)
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [
        "a-red-mug-on-a-white-background-seed0.png",
        "a-red-mug-on-a-white-background-seed1.png",
    ]
    text = read_png_text(files[1])
    assert text["parameters"].startswith(PROMPT + "\n")
    assert "Seed: 1" in text["parameters"]
    assert "CFG Rescale phi: 0.7" in text["parameters"]
    record = read_json_chunk(files[1], "renderqa")
    assert record["seed"] == 1
    assert record["guidance_rescale"] == 0.7
    assert record["model"] == model
    assert record["status"] == "ok"
    assert "saturated" in result.output


def test_cli_same_seed_gives_identical_png_bytes(tiny_pipelines, tmp_path):
    model = str(tiny_pipelines / "tiny-sd15-eps")
    args = [PROMPT, "--model", model, "--steps", "3", "--width", "64", "--height", "64"]
    for folder in ("a", "b"):
        result = render_cli([*args, "--seeds", "4", "--out", str(tmp_path / folder)])
        assert result.exit_code == 0, result.output
    name = "a-red-mug-on-a-white-background-seed4.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_png_metadata_reproduces_render(tiny_pipelines, tmp_path):
    model = str(tiny_pipelines / "tiny-sdxl-v")
    args = [PROMPT, "--model", model, "--steps", "3", "--width", "64", "--height", "64"]
    extra = [
        "--scheduler",
        "unipc",
        "-g",
        "6",
        "--threshold-mode",
        "latent",
        "--mimic-scale",
        "3",
    ]
    result = render_cli([*args, *extra, "--seeds", "9", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    png = next(tmp_path.glob("*.png"))
    record = read_json_chunk(png, "renderqa")
    loaded = load_pipeline(record["model"], scheduler=record["scheduler"])
    request = RenderRequest(
        prompt=record["prompt"],
        seed=record["seed"],
        negative_prompt=record["negative_prompt"],
        steps=record["steps"],
        width=record["width"],
        height=record["height"],
        guidance_scale=record["guidance_scale"],
        guidance_rescale=record["guidance_rescale"],
        threshold=ThresholdSettings(**record["threshold"]),
    )
    again = render_batch(loaded, [request])[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(again.image))


def test_cli_guidance_off_says_rescale_ignored(tiny_pipelines, tmp_path):
    model = str(tiny_pipelines / "tiny-sd15-v")
    args = [PROMPT, "--model", model, "--steps", "2", "--width", "64", "--height", "64"]
    result = render_cli([*args, "-g", "1", "-r", "0.7", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "turns classifier-free guidance off" in result.output
    assert "--guidance-rescale will have no effect" in result.output


def test_cli_save_latents_writes_metadata(tiny_pipelines, tmp_path):
    from safetensors import safe_open

    model = str(tiny_pipelines / "tiny-sdxl-eps")
    args = [PROMPT, "--model", model, "--steps", "2", "--width", "64", "--height", "64"]
    result = render_cli([*args, "--save-latents", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    latents_file = next(tmp_path.glob("*.latents.safetensors"))
    with safe_open(str(latents_file), framework="pt") as handle:
        assert handle.get_tensor("latents").shape == (1, 4, 8, 8)
        record = json.loads(handle.metadata()["renderqa"])
    assert record["vae_scaling_factor"] == pytest.approx(0.13025)


def broken_vae_pipeline(tiny_pipelines, tmp_path, bias):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipelines / "tiny-sd15-eps")
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(bias)
    folder = tmp_path / "broken"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("bias", "status"), [(float("nan"), "non-finite"), (-10.0, "black")]
)
def test_cli_reports_broken_decode(tiny_pipelines, tmp_path, bias, status):
    folder = broken_vae_pipeline(tiny_pipelines, tmp_path, bias)
    out = tmp_path / "out"
    args = [
        PROMPT,
        "--model",
        str(folder),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
    ]
    result = render_cli([*args, "--out", str(out)])
    assert result.exit_code == 1
    assert status in result.output
    assert [p.name for p in out.glob("*.png")] == [
        f"a-red-mug-on-a-white-background-seed0-failed-{status}.png"
    ]


BAD_INPUTS = [
    (["--model", "/nonexistent/model"], "no such file or folder"),
    (["--model", "someone/not-a-cached-model"], "not in the Hugging Face cache"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5 must be in [0, 1]"),
    (["--guidance-rescale", "-0.1"], "must be in [0, 1]"),
    (
        [
            "--threshold-mode",
            "latent",
            "--mimic-scale",
            "3",
            "--threshold-percentile",
            "0",
        ],
        "(0, 1]",
    ),
    (["--threshold-mode", "pixel", "--threshold-percentile", "1.5"], "(0, 1]"),
    (["--threshold-mode", "latent"], "--mimic-scale None must be a positive number"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--width", "65"], "--width 65 must be a positive multiple of 8"),
    (["--height", "100"], "multiple of 8"),
    (["--scheduler", "heun2"], "euler, euler-ancestral, dpm++-2m"),
    (["--seeds", "3-1"], "runs backwards"),
    (["--seeds", "a"], "is not a seed or range"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_cli_rejects_bad_input(tiny_pipelines, tmp_path, extra, message):
    out = tmp_path / "out"
    model = ["--model", str(tiny_pipelines / "tiny-sd15-eps")]
    args = [PROMPT, *model, "--steps", "2", "--width", "64", "--height", "64"]
    result = render_cli([*args, *extra, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() or not any(out.iterdir())


def test_cli_rejects_out_that_is_a_file(tiny_pipelines, tmp_path):
    target = tmp_path / "taken.png"
    target.write_bytes(b"keep me")
    model = str(tiny_pipelines / "tiny-sd15-eps")
    result = render_cli([PROMPT, "--model", model, "--out", str(target)])
    assert result.exit_code == 2
    assert "is a file" in result.output
    assert target.read_bytes() == b"keep me"


def test_cli_rejects_unsupported_checkpoint(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(checkpoint))
    result = render_cli(
        [PROMPT, "--model", str(checkpoint), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "unsupported checkpoint" in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.fixture(scope="module")
def single_file_checkpoint(tiny_pipelines):
    path = tiny_pipelines / "tiny-sd15-eps.safetensors"
    if not path.is_file():
        from fixtures.make_single_file import build

        build(tiny_pipelines)
    return path


def test_single_file_renders_like_folder(tiny_pipelines, single_file_checkpoint):
    folder = str(tiny_pipelines / "tiny-sd15-eps")
    request = RenderRequest(
        prompt=PROMPT,
        seed=2,
        steps=3,
        width=64,
        height=64,
        guidance_scale=8.0,
        guidance_rescale=0.7,
    )
    from_file = load_pipeline(
        str(single_file_checkpoint), config=folder, scheduler="euler"
    )
    from_folder = load_pipeline(folder, scheduler="euler")
    assert from_file.kind == "sd"
    pixels_file = render_batch(from_file, [request])[0].pixels
    pixels_folder = render_batch(from_folder, [request])[0].pixels
    assert np.array_equal(pixels_file, pixels_folder)


def test_single_file_offline_needs_config(single_file_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = render_cli(
        [PROMPT, "--model", str(single_file_checkpoint), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "pass --config with a local diffusers folder" in result.output
    assert not out.exists()


def test_repo_id_loads_from_hub_cache(tiny_pipelines, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "hub"
    snapshot = cache / "models--studio--tiny-sd15" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_pipelines / "tiny-sd15-eps", snapshot)
    (cache / "models--studio--tiny-sd15" / "refs").mkdir()
    (cache / "models--studio--tiny-sd15" / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = [
        "--model",
        "studio/tiny-sd15",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
    ]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "renderqa.cli",
            "render",
            PROMPT,
            *args,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    record = read_json_chunk(next(out.glob("*.png")), "renderqa")
    assert record["model"] == "studio/tiny-sd15"
    assert record["model_kind"] == "sd"


def test_separate_vae_option_loads_folder(tiny_pipelines):
    model = str(tiny_pipelines / "tiny-sdxl-eps")
    request = RenderRequest(prompt=PROMPT, seed=1, steps=2, width=64, height=64)
    own = render_batch(load_pipeline(model), [request])[0]
    swapped = load_pipeline(model, vae=str(tiny_pipelines / "tiny-sdxl-eps" / "vae"))
    again = render_batch(swapped, [request])[0]
    assert swapped.vae_id.endswith("vae")
    assert np.array_equal(own.pixels, again.pixels)


def test_channels_last_matches_contiguous(tiny_pipelines):
    model = str(tiny_pipelines / "tiny-sd15-v")
    request = RenderRequest(prompt=PROMPT, seed=1, steps=3, width=64, height=64)
    contiguous = render_batch(load_pipeline(model), [request])[0]
    nhwc = render_batch(load_pipeline(model, channels_last=True), [request])[0]
    assert np.abs(contiguous.pixels - nhwc.pixels).max() <= MAX_PIXEL_ERROR


def test_bf16_vae_decode_is_recorded(tiny_pipelines):
    loaded = load_pipeline(str(tiny_pipelines / "tiny-sd15-eps"), vae_dtype="bf16")
    request = RenderRequest(prompt=PROMPT, seed=1, steps=2, width=64, height=64)
    result = render_batch(loaded, [request])[0]
    assert result.parameters["vae_dtype"] == "bf16"
    assert result.finite


def test_cli_rejects_out_below_a_file_before_loading(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    out = blocker / "renders"
    result = render_cli([PROMPT, "--model", "/nonexistent/model", "--out", str(out)])
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output
    assert blocker.read_text() == "keep"


def test_cli_rejects_huge_seed_range(tmp_path):
    result = render_cli([PROMPT, "--model", "x/y", "--seeds", "0-100000000"])
    assert result.exit_code == 2
    assert "above the limit of 100000" in result.output


def test_cli_checks_percentile_with_thresholding_off(tmp_path):
    result = render_cli([PROMPT, "--model", "x/y", "--threshold-percentile", "nan"])
    assert result.exit_code == 2
    assert "--threshold-percentile nan must be in (0, 1]" in result.output


def test_file_names_keep_non_latin_prompt_words():
    from renderqa.cli.render import _slug

    assert _slug("日本語 マグ 🎨 /../etc") == "日本語-マグ-etc"
    assert _slug(PROMPT) == "a-red-mug-on-a-white-background"
    assert _slug("🎨 / ..") == "render"
