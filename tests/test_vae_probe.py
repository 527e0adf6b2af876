"""vae-probe: hooks, overflow diagnosis, latent checks and the CLI, on fixture VAEs."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from fixtures import make_vae_fixtures as vf
from renderqa.cli.app import app
from renderqa.core import vae_probe as vp
from renderqa.core import vae_probe_hooks as vp_hooks
from renderqa.core import vae_probe_inputs as vp_inputs
from renderqa.core import vae_probe_output as vp_output
from renderqa.core import vae_probe_verdict as vp_verdict
from renderqa.core.errors import DeviceError, InvalidInputError

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run these tiny decoders on one CPU thread, restoring the count afterwards.

    Their tensors are too small for threads to help, and on a loaded machine the
    threads of torch's pool wait for each other far longer than the work takes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("vae-fixtures")
    vf.build(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def known_latents(built) -> torch.Tensor:
    latents, _ = vp_inputs.read_latents_file(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS)
    return latents


def load(built: Path, name: str):
    return vp_inputs.load_probe_vae(str(built / name), "--model"), name


def probe(vaes, latents, dtypes, **kwargs) -> vp_verdict.ProbeReport:
    return vp.probe_vae(
        vaes,
        latents,
        scaling_factor=vf.SCALING_FACTOR,
        dtypes=dtypes,
        device=CPU,
        timing=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def overflow_report(built, known_latents) -> vp_verdict.ProbeReport:
    vaes = {
        vp_verdict.MAIN_VAE: load(built, vf.OVERFLOW_DIR),
        vp_verdict.ALTERNATE_VAE: load(built, vf.FIXED_DIR),
    }
    return probe(vaes, known_latents, ["fp16", "bf16", "fp32"])


def run_named(report: vp_verdict.ProbeReport, label: str) -> vp_verdict.DecodeRun:
    return next(run for run in report.runs if run.label == label)


def stats_named(run: vp_verdict.DecodeRun, name: str) -> vp_hooks.ModuleStats:
    return next(stats for stats in run.modules if stats.name == name)


# The fixture and the overflow diagnosis ------------------------------------------


def test_fixture_peak_is_known_module_in_fp32(overflow_report):
    reference = run_named(overflow_report, "fp32")
    first = reference.first_above_fp16_max
    assert first is not None
    assert first.name == vf.OVERFLOW_MODULE
    assert first.max_abs == pytest.approx(vf.OVERFLOW_PEAK, rel=1e-4)
    earlier = [stats for stats in reference.modules if stats.order < first.order]
    assert max(stats.max_abs for stats in earlier) < 100.0


def test_fixture_weights_are_deterministic():
    latents = vf.make_known_latents()
    assert torch.equal(latents, vf.make_known_latents())
    first = vf.make_overflow_vae(latents).state_dict()
    second = vf.make_overflow_vae(latents).state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_fp16_overflow_names_module_inf_and_black(overflow_report):
    fp16 = run_named(overflow_report, "fp16")
    assert fp16.first_above_fp16_max.name == vf.OVERFLOW_MODULE
    assert fp16.first_nonfinite.name == vf.OVERFLOW_MODULE
    assert fp16.first_nonfinite.nonfinite == "inf"
    assert not fp16.finite
    assert fp16.black
    # The inf turns into NaN in the next GroupNorm-fed layers.
    after = [s for s in fp16.modules if s.order > fp16.first_nonfinite.order]
    assert any(stats.nonfinite == "nan" for stats in after)


def test_fp32_and_bf16_decode_overflow_vae_cleanly(overflow_report):
    for label in ("fp32", "bf16"):
        run = run_named(overflow_report, label)
        assert run.finite, label
        assert not run.black, label
    bf16 = run_named(overflow_report, "bf16")
    assert bf16.psnr > 40.0, f"bf16 PSNR {bf16.psnr:.1f} dB"
    assert bf16.ssim > 0.99


def test_verdict_overflow_recommends_bf16_or_fp32(overflow_report):
    verdict = overflow_report.verdict
    assert verdict.kind == "vae-overflow"
    assert verdict.module == vf.OVERFLOW_MODULE
    assert vf.OVERFLOW_MODULE in verdict.summary
    assert "black" in verdict.summary
    assert verdict.baseline == "fp16"
    main_fixes = [o.run.label for o in verdict.options if o.run.vae_label == "model"]
    assert sorted(main_fixes) == ["bf16", "fp32"]
    assert "fp16" not in [option.run.label for option in verdict.options]
    assert verdict.recommendation is verdict.options[0]
    seconds = [option.run.timed_seconds for option in verdict.options]
    assert seconds == sorted(seconds)


def test_fixed_vae_decodes_same_image_in_fp16(overflow_report):
    fixed = run_named(overflow_report, "alternate-fp16")
    assert fixed.finite
    assert fixed.first_above_warning is None
    assert fixed.peak.max_abs < vf.OVERFLOW_PEAK / vf.FIX_DIVISOR * 1.01
    assert fixed.psnr > 60.0, f"PSNR {fixed.psnr:.1f} dB against the fp32 decode"
    assert "alternate-fp16" in [
        option.run.label for option in overflow_report.verdict.options
    ]


def test_overflow_predicted_without_fp16_run(built, known_latents):
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.OVERFLOW_DIR)}, known_latents, ["fp32"]
    )
    verdict = report.verdict
    assert verdict.kind == "vae-overflow"
    assert verdict.module == vf.OVERFLOW_MODULE
    assert "would overflow" in verdict.summary
    assert verdict.recommendation.run.label == "fp32"
    assert verdict.recommendation.time_ratio == 1.0


def test_healthy_vae_gets_clean_verdict(built, known_latents):
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.HEALTHY_DIR)}, known_latents, ["fp16"]
    )
    assert report.verdict.kind == "clean"
    assert report.verdict.recommendation is None
    assert [run.label for run in report.runs] == ["fp32", "fp16"]
    for run in report.runs:
        assert run.finite
        assert run.first_above_warning is None
    assert not report.latents.extreme


def test_extreme_latents_diagnosed_as_latents(built):
    latents, _ = vp_inputs.read_latents_file(
        built / vf.LATENTS_DIR / vf.EXTREME_LATENTS
    )
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.HEALTHY_DIR)}, latents, ["fp16"]
    )
    assert report.verdict.kind == "latents"
    assert report.latents.extreme
    assert report.latents.std == pytest.approx(vf.EXTREME_LATENT_GAIN * 0.994, rel=0.01)
    assert "std" in report.verdict.summary


def test_imprecise_bf16_gives_precision_loss(built, known_latents):
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.HEALTHY_DIR)},
        known_latents,
        ["bf16"],
        min_psnr=70.0,  # bf16 reaches about 55 dB on this fixture
    )
    verdict = report.verdict
    assert verdict.kind == "precision-loss"
    assert "PSNR" in verdict.summary
    assert verdict.recommendation.run.label == "fp32"


@torch.no_grad()
def test_nan_weights_give_vae_nonfinite(built, known_latents):
    vae, name = load(built, vf.HEALTHY_DIR)
    vae.decoder.conv_norm_out.weight[0] = math.nan
    report = probe({vp_verdict.MAIN_VAE: (vae, name)}, known_latents, ["fp16"])
    verdict = report.verdict
    assert verdict.kind == "vae-nonfinite"
    assert verdict.module == "decoder.conv_norm_out"
    assert "even the fp32 decode" in verdict.summary
    assert verdict.recommendation is None  # no probed decode works


def test_lower_warning_level_gives_near_overflow(built, known_latents):
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.FIXED_DIR)},
        known_latents,
        ["fp16"],
        warning_level=5000.0,
    )
    assert report.verdict.kind == "near-overflow"
    assert report.verdict.module == vf.OVERFLOW_MODULE


def test_tiling_hooks_see_every_tile(built, known_latents):
    report = probe(
        {vp_verdict.MAIN_VAE: load(built, vf.OVERFLOW_DIR)},
        known_latents,
        ["fp16"],
        tile_size=16,
    )
    # 16x16 latents, 8x8 latent tiles with a 25% overlap: starts 0, 6 and 12 per axis.
    conv_in = stats_named(report.reference, "decoder.conv_in")
    assert conv_in.calls == 9
    assert report.tiling
    assert report.verdict.kind == "vae-overflow"
    assert report.verdict.module == vf.OVERFLOW_MODULE
    assert run_named(report, "fp16").pixels.shape == (32, 32, 3)


# Hooks --------------------------------------------------------------------------


def hook_count(vae) -> int:
    return sum(len(module._forward_hooks) for module in vae.modules())


def test_hooks_removed_after_decode(built, known_latents):
    vae, name = load(built, vf.HEALTHY_DIR)
    run = vp.probe_decode(
        vae,
        known_latents / vf.SCALING_FACTOR,
        vae_label=vp_verdict.MAIN_VAE,
        vae_source=name,
        dtype_label="fp32",
        timing=False,
    )
    assert hook_count(vae) == 0
    called = [
        name
        for name, module in vp_hooks.probed_modules(vae)
        if not isinstance(module, torch.nn.ModuleList)  # containers are never called
    ]
    assert [stats.name for stats in run.modules] == sorted(
        called, key=[stats.name for stats in run.modules].index
    )
    assert len(run.modules) == len(called)
    assert run.modules[0].name == "post_quant_conv"
    assert run.modules[-1].name == "decoder"


def test_hooks_removed_when_decode_fails(built, known_latents):
    vae, name = load(built, vf.HEALTHY_DIR)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated decoder failure")

    vae.decoder.up_blocks[1].resnets[0].conv1.forward = broken_forward
    with pytest.raises(RuntimeError, match="simulated decoder failure"):
        vp.probe_decode(
            vae,
            known_latents / vf.SCALING_FACTOR,
            vae_label=vp_verdict.MAIN_VAE,
            vae_source=name,
            dtype_label="fp32",
            timing=False,
        )
    assert hook_count(vae) == 0


def test_recorder_reduces_over_calls():
    layer = torch.nn.Identity()
    with vp_hooks.recording_activations(torch.nn.Sequential(layer)) as recorder:
        layer(torch.tensor([1.0, -3.0]))
        layer(torch.tensor([2.0, 0.5]))
    (stats,) = recorder.stats()
    assert stats.calls == 2
    assert stats.min_value == -3.0
    assert stats.max_value == 2.0
    assert stats.max_abs == 3.0
    assert stats.nonfinite is None


def test_module_stats_nonfinite_kinds():
    inf_stats = vp_hooks.ModuleStats("m", "Conv2d", 0, 1, -1.0, math.inf)
    nan_stats = vp_hooks.ModuleStats("m", "Conv2d", 0, 1, math.nan, math.nan)
    assert inf_stats.nonfinite == "inf"
    assert inf_stats.above(vp_verdict.FP16_MAX)
    assert nan_stats.nonfinite == "nan"
    assert nan_stats.above(vp_verdict.FP16_MAX)


# Latents, pixels and metrics ---------------------------------------------------


def test_latent_statistics_hand_computed():
    latents = torch.tensor([1.0, -1.0, 3.0, -3.0, math.nan]).reshape(1, 1, 1, 5)
    stats = vp_verdict.latent_statistics(latents, scaling_factor=0.5)
    assert stats.mean == 0.0
    assert stats.std == pytest.approx(math.sqrt(5.0))  # population std of ±1, ±3
    assert stats.max_abs == 3.0
    assert stats.nonfinite_count == 1
    assert stats.vae_space_std == pytest.approx(2 * math.sqrt(5.0))
    assert stats.problems == ["1 non-finite values"]


def test_latent_statistics_measures_vae_space_std():
    latents = torch.tensor([1.0, -1.0, 3.0, -3.0]).reshape(1, 1, 1, 4)
    unscaled = torch.tensor([7.0, 5.0, 9.0, math.inf]).reshape(1, 1, 1, 4)
    stats = vp_verdict.latent_statistics(latents, 1.0, vae_space_latents=unscaled)
    # Population std of the finite 7, 5, 9: sqrt(8 / 3).
    assert stats.vae_space_std == pytest.approx(math.sqrt(8 / 3))
    assert stats.std == pytest.approx(math.sqrt(5.0))


def test_latent_statistics_flags_collapsed_latents():
    stats = vp_verdict.latent_statistics(
        torch.full((1, 4, 2, 2), 0.01), scaling_factor=0.18
    )
    assert stats.std == pytest.approx(0.0, abs=1e-9)
    assert any("collapsed" in problem for problem in stats.problems)


def test_unscale_latents_three_conventions():
    class Config:
        latents_mean = None
        latents_std = None

    latents = torch.full((1, 2, 1, 1), 2.0)
    plain = vp.unscale_latents(latents, Config(), scaling_factor=0.5)
    assert torch.equal(plain, torch.full((1, 2, 1, 1), 4.0))
    shifted = vp.unscale_latents(latents, Config(), 0.5, shift_factor=0.25)
    assert torch.equal(shifted, torch.full((1, 2, 1, 1), 4.25))
    config = Config()
    config.latents_mean = [1.0, -1.0]
    config.latents_std = [0.5, 2.0]
    per_channel = vp.unscale_latents(latents, config, scaling_factor=0.5)
    # z * std / scaling_factor + mean: 2 * 0.5 / 0.5 + 1 and 2 * 2 / 0.5 - 1.
    assert per_channel.flatten().tolist() == [3.0, 7.0]


def test_black_counts_nan_as_black():
    assert vp_verdict.is_black(np.full((4, 4, 3), np.nan, dtype=np.float32))
    assert vp_verdict.is_black(np.zeros((4, 4, 3), dtype=np.float32))
    grey = np.zeros((4, 4, 3), dtype=np.float32)
    grey[0, 0, 0] = 0.05
    assert not vp_verdict.is_black(grey)


def fake_run(pixels: np.ndarray, dtype: str = "fp16") -> vp_verdict.DecodeRun:
    return vp_verdict.DecodeRun(
        vae_label=vp_verdict.MAIN_VAE,
        vae_source="fake",
        dtype=dtype,
        modules=[],
        pixels=pixels,
        probed_seconds=1.0,
        seconds=None,
        peak_memory_bytes=None,
        largest_activation_bytes=0,
        warning_level=vp.DEFAULT_WARNING_LEVEL,
    )


def test_compare_to_reference_psnr_of_offset():
    reference = fake_run(np.full((16, 16, 3), 0.5, dtype=np.float32), "fp32")
    shifted = fake_run(np.full((16, 16, 3), 0.6, dtype=np.float32))
    vp_verdict.compare_to_reference(shifted, reference)
    # MSE 0.01 with data range 1 is 10 * log10(1 / 0.01) = 20 dB.
    assert shifted.max_diff == pytest.approx(0.1, abs=1e-6)
    assert shifted.psnr == pytest.approx(20.0, abs=1e-3)
    vp_verdict.compare_to_reference(reference, reference)
    assert reference.psnr == math.inf
    assert reference.ssim == pytest.approx(1.0)


def test_parse_dtypes_rejects_unknown():
    assert vp.parse_dtypes("fp16, BF16,fp16") == ["fp16", "bf16"]
    with pytest.raises(InvalidInputError, match="'fp8' is not a dtype"):
        vp.parse_dtypes("fp16,fp8")


def test_unsupported_dtype_raises_device_error(monkeypatch):
    real_conv2d = torch.nn.functional.conv2d

    def conv2d_without_half(input, *args, **kwargs):
        if input.dtype is torch.float16:
            raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
        return real_conv2d(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d_without_half)
    assert vp.dtype_support_error(CPU, "fp32") is None
    with pytest.raises(DeviceError) as caught:
        vp.check_dtypes_run(CPU, ["fp32", "fp16"])
    message = str(caught.value)
    assert "--dtypes fp16" in message
    assert "not implemented for 'Half'" in message
    assert "use fp32 or bf16" in message


def test_latents_of_wrong_shape_rejected(built):
    vae, _ = load(built, vf.HEALTHY_DIR)
    with pytest.raises(
        InvalidInputError, match="have 3 channels but the VAE v expects 4"
    ):
        vp.check_latents_fit(torch.zeros(1, 3, 8, 8), vae, "v", "x.safetensors")
    with pytest.raises(InvalidInputError, match=r"shape \(4, 8, 8\)"):
        vp.check_latents_fit(torch.zeros(4, 8, 8), vae, "v", "x.safetensors")


# Outputs ------------------------------------------------------------------------


def test_outputs_cover_every_module_and_run(overflow_report, tmp_path):
    paths = vp_output.write_probe_outputs(overflow_report, tmp_path)
    frame = pd.read_csv(paths["csv"], dtype={"nonfinite": str}, keep_default_na=False)
    modules = len(overflow_report.reference.modules)
    assert len(frame) == modules * len(overflow_report.runs)
    row = frame[(frame.run == "fp16") & (frame.module == vf.OVERFLOW_MODULE)].iloc[0]
    assert row.nonfinite == "inf"
    assert bool(row.above_fp16_max)
    with Image.open(paths["plot"]) as plot:
        assert plot.format == "PNG"
    with Image.open(tmp_path / "decode-fp16.png") as image:
        assert image.size == (32, 32)
        assert np.asarray(image).max() == 0
    summary = json.loads(paths["summary"].read_text())
    assert summary["verdict"] == "vae-overflow"
    assert summary["module"] == vf.OVERFLOW_MODULE
    fp16 = next(run for run in summary["runs"] if run["run"] == "fp16")
    assert fp16["black"] is True
    assert fp16["first_nonfinite"] == vf.OVERFLOW_MODULE


# CLI ----------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, ["vae-probe", *args])


def printed(text: str, result) -> bool:
    """Return whether the output contains `text`, ignoring Rich's line wrapping."""
    # Rich wraps at the runner's terminal width, even inside long paths.
    return "".join(text.split()) in "".join(result.output.split())


def test_cli_reports_overflow_module(built, tmp_path):
    result = invoke(
        str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS),
        "--model",
        str(built / vf.OVERFLOW_DIR),
        "--dtypes",
        "fp16",
        "--no-timing",
        "--out",
        str(tmp_path / "probe"),
    )
    assert result.exit_code == 0, result.output
    assert printed("verdict: vae-overflow", result)
    assert printed(vf.OVERFLOW_MODULE, result)
    assert printed("cheapest fix: upcast the VAE to fp32", result)
    assert (tmp_path / "probe" / "modules.csv").is_file()
    assert (tmp_path / "probe" / "decode-fp16.png").is_file()


def test_cli_tiled_probe_with_second_vae(built, tmp_path):
    out = tmp_path / "probe"
    result = invoke(
        str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS),
        "--model",
        str(built / vf.OVERFLOW_DIR),
        "--vae",
        str(built / vf.FIXED_DIR),
        "--dtypes",
        "fp16",
        "--tile-size",
        "16",
        "--no-timing",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiling"] is True
    assert [run["run"] for run in summary["runs"]] == ["fp32", "fp16", "alternate-fp16"]
    fixes = [fix["run"] for fix in summary["fixes"]]
    assert sorted(fixes) == ["alternate-fp16", "fp32"]
    frame = pd.read_csv(out / "modules.csv")
    conv_in = frame[frame.module == "decoder.conv_in"]
    assert conv_in.calls.tolist() == [9, 9, 9]


def test_cli_rejects_tile_size_off_the_grid(built):
    result = invoke(
        str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS),
        "--model",
        str(built / vf.HEALTHY_DIR),
        "--tile-size",
        "7",
    )
    assert result.exit_code == 2
    assert printed("--tile-size 7: must be a positive multiple of 2", result)


def test_cli_rejects_wrong_channel_count(built, tmp_path):
    path = tmp_path / "three.latents.safetensors"
    save_file({"latents": torch.zeros(1, 3, 8, 8)}, str(path))
    result = invoke(str(path), "--model", str(built / vf.HEALTHY_DIR))
    assert result.exit_code == 2
    assert printed(f"{path}: latents have 3 channels but the VAE", result)
    assert printed("expects 4", result)
    assert "Traceback" not in result.output


def test_cli_rejects_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    result = invoke(str(path))
    assert result.exit_code == 2
    assert printed("has no renderqa metadata", result)


def test_cli_rejects_unknown_dtype(built):
    result = invoke(
        str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS),
        "--model",
        str(built / vf.HEALTHY_DIR),
        "--dtypes",
        "fp8",
    )
    assert result.exit_code == 2
    assert printed("'fp8' is not a dtype", result)


def test_cli_rejects_unrunnable_dtype(built, monkeypatch):
    monkeypatch.setattr(
        vp,
        "dtype_support_error",
        lambda device, name: "no bf16 kernels" if name == "bf16" else None,
    )
    result = invoke(
        str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS),
        "--model",
        str(built / vf.HEALTHY_DIR),
        "--dtypes",
        "bf16",
    )
    assert result.exit_code == 2
    assert printed(
        "--dtypes bf16: cannot decode in bf16 on cpu (no bf16 kernels)", result
    )


def test_cli_rejects_source_with_prompt(built):
    result = invoke(str(built / vf.LATENTS_DIR / vf.KNOWN_LATENTS), "--seed", "3")
    assert result.exit_code == 2
    assert printed("cannot be combined with a latents file or PNG", result)


def test_cli_requires_an_input():
    result = invoke("--dtypes", "fp16")
    assert result.exit_code == 2
    assert printed("nothing to probe", result)


# Replaying renders on the tiny SDXL pipeline --------------------------------------

REPLAY_REQUEST = {
    "prompt": "a red mug",
    "seed": 3,
    "steps": 3,
    "width": 64,
    "height": 64,
    "guidance_scale": 9.0,
}


@pytest.fixture(scope="module")
def rendered(tiny_pipelines, tmp_path_factory):
    """Render one image with the tiny SDXL fixture; save the PNG and its latents."""
    from renderqa.core.pipeline import load_pipeline
    from renderqa.core.render import (
        RenderRequest,
        render_batch,
        save_latents,
        save_render,
    )

    folder = tmp_path_factory.mktemp("rendered")
    model = str(tiny_pipelines / "tiny-sdxl-eps")
    loaded = load_pipeline(model, device="cpu", dtype="fp32")
    result = render_batch(loaded, [RenderRequest(**REPLAY_REQUEST)])[0]
    save_render(result, folder / "render.png")
    save_latents(result, folder / "render.latents.safetensors")
    return folder, result


def test_replay_reproduces_render_latents(rendered):
    _, result = rendered
    latents = vp_inputs.replay_render(result.parameters, device="cpu")
    assert torch.equal(latents, result.latents)


def test_cli_probes_renderqa_png(rendered, tmp_path):
    folder, result = rendered
    out = tmp_path / "probe"
    args = [str(folder / "render.png"), "--dtypes", "fp16", "--no-timing"]
    result_cli = invoke(*args, "--out", str(out))
    assert result_cli.exit_code == 0, result_cli.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latents"]["shape"] == [1, 4, 8, 8]
    expected_std = result.latents.double().std(correction=0).item()
    assert summary["latents"]["std"] == pytest.approx(expected_std, rel=1e-6)
    assert summary["latents"]["scaling_factor"] == pytest.approx(0.13025)
    assert [run["run"] for run in summary["runs"]] == ["fp32", "fp16"]


def test_cli_probes_saved_latents_with_recorded_model(rendered, tmp_path):
    folder, result = rendered
    out = tmp_path / "probe"
    latents_file = str(folder / "render.latents.safetensors")
    cli = invoke(latents_file, "--dtypes", "bf16", "--no-timing", "--out", str(out))
    assert cli.exit_code == 0, cli.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["vae"] == result.parameters["model"]
    expected_std = result.latents.double().std(correction=0).item()
    assert summary["latents"]["std"] == pytest.approx(expected_std, rel=1e-6)


def test_cli_renders_from_prompt_and_seed(rendered, tiny_pipelines, tmp_path):
    _, result = rendered
    out = tmp_path / "probe"
    options = []
    for key, value in REPLAY_REQUEST.items():
        options += [f"--{key.replace('_', '-')}", str(value)]
    model = str(tiny_pipelines / "tiny-sdxl-eps")
    cli = invoke(
        "--model", model, *options, "--dtypes", "fp16", "--no-timing", "--out", str(out)
    )
    assert cli.exit_code == 0, cli.output
    summary = json.loads((out / "summary.json").read_text())
    expected_std = result.latents.double().std(correction=0).item()
    assert summary["latents"]["std"] == pytest.approx(expected_std, rel=1e-6)


def test_render_falls_back_on_overflow_vae(tiny_pipelines, built):
    from renderqa.core.pipeline import load_pipeline
    from renderqa.core.render import RenderRequest, render_batch

    loaded = load_pipeline(
        str(tiny_pipelines / "tiny-sdxl-eps"),
        vae=str(built / vf.OVERFLOW_DIR),
        device="cpu",
        dtype="fp32",
        vae_dtype="fp16",
    )
    result = render_batch(loaded, [RenderRequest(**REPLAY_REQUEST)])[0]
    assert result.vae_fallback == "fp32"
    assert result.finite
    assert result.parameters["vae_fallback"] == "fp32"
