"""Tiled upscaling: exact geometry, blend windows, fallbacks, image types and the CLI."""

from __future__ import annotations

import json
import logging
import mmap
import struct
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fixtures.make_upscaler import (
    TRAINED_WEIGHTS,
    write_nearest_checkpoint,
    write_unshuffle_checkpoint,
)
from renderqa.cli.app import app
from renderqa.core import imageio
from renderqa.core.blend import (
    BLEND_WINDOWS,
    edge_profile,
    hann_ramp,
    hard_ramp,
    linear_ramp,
)
from renderqa.core.canvas import discard_rows, zeros_canvas
from renderqa.core.errors import DeviceError, InvalidInputError, ModelLoadError
from renderqa.core.imageio import load_image, save_png16
from renderqa.core.seams import TilePlan, find_seams
from renderqa.core.tiling import seam_positions, tile_starts
from renderqa.core.upscale import TileSettings, upscale_array
from renderqa.core.upscale_image import (
    METADATA_KEY,
    UpscaledImage,
    save_upscaled,
    take_samples,
    upscale_image,
)
from renderqa.core.upscale_model import (
    Upscaler,
    choose_dtype,
    load_upscaler,
    read_descriptor,
)
from tests.photos import load_photo

CPU = torch.device("cpu")


def nearest(tiles: torch.Tensor, scale: int) -> torch.Tensor:
    return tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def nearest_upscaler(
    scale: int, dtype: torch.dtype = torch.float32, **fields
) -> Upscaler:
    """A model-free upscaler whose forward is the exact nearest-neighbour upscale."""
    values = {
        "name": "nearest",
        "scale": scale,
        "input_channels": 3,
        "output_channels": 3,
        "min_size": 0,
        "multiple_of": 1,
        "device": CPU,
        "dtype": dtype,
        "channels_last": False,
        "forward": lambda tiles: nearest(tiles, scale),
    }
    values.update(fields)
    return Upscaler(**values)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((height, width, 3), dtype=np.float32)


def direct_nearest(pixels: np.ndarray, scale: int) -> np.ndarray:
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def trained() -> Upscaler:
    return load_upscaler(TRAINED_WEIGHTS, CPU)


# --- blend windows ------------------------------------------------------------


def test_hann_ramp_matches_hand_values():
    ramp = hann_ramp(4, 1)
    expected = [np.sin(np.pi / 2 * c) ** 2 for c in (0.125, 0.375, 0.625, 0.875)]
    np.testing.assert_allclose(ramp, expected, rtol=0, atol=1e-15)
    assert ramp[0] == pytest.approx(0.0380602, abs=1e-7)


@pytest.mark.parametrize("name", sorted(BLEND_WINDOWS))
def test_ramp_and_mirror_sum_to_one(name):
    # The earlier tile takes 1 - ramp, so the pair sums to 1 across the overlap.
    ramp = BLEND_WINDOWS[name](24, 2)
    rising = edge_profile(24, 24, 0, BLEND_WINDOWS[name], 2)
    falling = edge_profile(24, 0, 24, BLEND_WINDOWS[name], 2)
    np.testing.assert_allclose(rising + falling, 1.0, rtol=0, atol=1e-15)
    assert ramp.min() >= 0.0
    assert ramp.max() <= 1.0


def test_linear_ramp_is_pixel_centred():
    np.testing.assert_array_equal(linear_ramp(4, 1), [0.125, 0.375, 0.625, 0.875])


def test_hard_ramp_cuts_at_tiling_midpoint():
    # Overlap of 5 input pixels at scale 2: the cut is 5 // 2 = 2 input pixels in.
    np.testing.assert_array_equal(hard_ramp(10, 2), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_profile_keeps_full_weight_at_image_border():
    profile = edge_profile(16, 0, 6, hann_ramp, 1)
    np.testing.assert_array_equal(profile[:10], 1.0)
    assert profile[-1] < 0.02
    assert profile[-1] > 0.0


# --- exact geometry with a nearest-neighbour model -------------------------------

SIZES = [
    (1, 1),
    (7, 5),
    (33, 513),
    (543, 337),
    pytest.param(1000, 700, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("height,width", SIZES)
def test_tiled_nearest_equals_direct(height, width, scale):
    pixels = random_image(height, width, seed=height * 7 + width)
    expected = direct_nearest(pixels, scale)
    upscaler = nearest_upscaler(scale)
    for tile in (64, 512):
        for overlap in (0, 8, 32):
            if 2 * overlap >= tile:
                continue  # rejected: see test_overlap_of_half_tile_rejected
            settings = TileSettings(tile=tile, overlap=overlap, tile_batch=8)
            result = upscale_array(pixels, upscaler, settings)
            assert result.pixels.shape == expected.shape
            mismatched = int((result.pixels != expected).sum())
            assert mismatched == 0, (tile, overlap, mismatched)


def test_every_blend_gives_every_pixel_weight():
    # 17 px with tile 10 and overlap 4 puts some pixels under three tiles.
    pixels = random_image(17, 23, seed=3)
    for blend in BLEND_WINDOWS:
        settings = TileSettings(tile=10, overlap=4, blend=blend, tile_batch=3)
        result = upscale_array(pixels, nearest_upscaler(2), settings)
        assert np.array_equal(result.pixels, direct_nearest(pixels, 2)), blend


def reference_blend(tile_values, height, width, tile, overlap, scale, blend):
    """Sum of window * value over the sum of windows, in float64, for tiles that
    each output a constant, listed in row-major plan order."""
    ramp = BLEND_WINDOWS[blend]

    def profiles(length):
        starts = tile_starts(length, tile, overlap)
        span = min(tile, length)
        for i, begin in enumerate(starts):
            rise = starts[i - 1] + span - begin if i > 0 else 0
            fall = begin + span - starts[i + 1] if i + 1 < len(starts) else 0
            profile = edge_profile(
                span * scale, rise * scale, fall * scale, ramp, scale
            )
            yield begin * scale, profile

    weighted = np.zeros((height * scale, width * scale))
    weight = np.zeros_like(weighted)
    windows = [
        (y, x, np.outer(py, px))
        for y, py in profiles(height)
        for x, px in profiles(width)
    ]
    for (y, x, window), value in zip(windows, tile_values, strict=True):
        region = np.s_[y : y + window.shape[0], x : x + window.shape[1]]
        weighted[region] += window * value
        weight[region] += window
    return weighted / weight


@pytest.mark.parametrize("blend", sorted(BLEND_WINDOWS))
def test_running_mean_matches_weighted_sum(blend):
    # Neighbouring tiles output different constants, so overlapped pixels mix
    # them. 17 px with tile 10 and overlap 4 puts some pixels under three tiles.
    values = []

    def constant_tiles(tiles: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(nearest(tiles, 2))
        for index in range(len(tiles)):
            values.append((len(values) * 37 % 11) / 10)
            out[index] = values[-1]
        return out

    upscaler = nearest_upscaler(2, forward=constant_tiles)
    settings = TileSettings(tile=10, overlap=4, blend=blend, tile_batch=3)
    result = upscale_array(random_image(17, 23, seed=2), upscaler, settings)
    expected = reference_blend(values, 17, 23, 10, 4, 2, blend)
    error = np.abs(result.pixels - expected[..., None]).max()
    assert error < 1e-6, error


def test_nearest_checkpoint_through_spandrel_is_exact(tmp_path):
    pixels = random_image(33, 70, seed=5)
    for scale in (1, 3):
        path = write_nearest_checkpoint(tmp_path / f"n{scale}.safetensors", scale)
        upscaler = load_upscaler(path, CPU)
        assert upscaler.scale == scale
        settings = TileSettings(tile=24, overlap=8, tile_batch=2)
        result = upscale_array(pixels, upscaler, settings)
        assert np.array_equal(result.pixels, direct_nearest(pixels, scale))


def test_none_blend_switches_tiles_at_plan_cuts():
    # Each call returns a constant equal to its call number, so the output shows
    # which tile every pixel came from.
    calls = []

    def tile_number(tiles: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.full_like(nearest(tiles, 2), len(calls) / 100)

    upscaler = nearest_upscaler(2, forward=tile_number)
    pixels = random_image(30, 100, seed=1)
    result = upscale_array(
        pixels, upscaler, TileSettings(tile=32, overlap=8, blend="none")
    )
    row = result.pixels[0, :, 0]
    changes = [int(i) for i in np.flatnonzero(np.diff(row)) + 1]
    assert changes == seam_positions(100, 32, 8, scale=2)


# --- size requirements, odd sizes --------------------------------------------


def test_unshuffle_model_odd_size_padded_then_cropped(tmp_path):
    upscaler = load_upscaler(
        write_unshuffle_checkpoint(tmp_path / "u.safetensors"), CPU
    )
    assert upscaler.multiple_of == 4
    assert upscaler.scale == 2
    for height, width in [(1, 1), (7, 5), (13, 18)]:
        pixels = random_image(height, width, seed=width)
        result = upscale_array(pixels, upscaler, TileSettings(tile=16, overlap=4))
        assert result.pixels.shape == (height * 2, width * 2, 3)
        assert np.isfinite(result.pixels).all()


def test_tile_below_model_minimum_rejected(tmp_path):
    upscaler = load_upscaler(
        write_unshuffle_checkpoint(tmp_path / "u.safetensors"), CPU
    )
    with pytest.raises(InvalidInputError, match="minimum input size of 4"):
        upscale_array(random_image(8, 8), upscaler, TileSettings(tile=3, overlap=0))


@pytest.mark.parametrize("overlap", [32, 40])
def test_overlap_of_half_tile_rejected(overlap):
    with pytest.raises(InvalidInputError, match="less than half of --tile 64"):
        upscale_array(
            random_image(8, 8), nearest_upscaler(2), TileSettings(64, overlap)
        )


def test_unknown_blend_lists_choices():
    with pytest.raises(InvalidInputError, match="hann, linear, none, context"):
        upscale_array(
            random_image(8, 8), nearest_upscaler(2), TileSettings(blend="cosine")
        )


# --- fallbacks ---------------------------------------------------------------


def test_oom_halves_tile_and_restarts(caplog):
    def small_tiles_only(tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[-1] > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return nearest(tiles, 2)

    pixels = random_image(150, 200, seed=2)
    upscaler = nearest_upscaler(2, forward=small_tiles_only)
    with caplog.at_level(logging.WARNING, logger="renderqa"):
        result = upscale_array(pixels, upscaler, TileSettings(tile=256, overlap=32))
    assert result.tile == 64
    assert result.overlap == 8
    assert result.oom_restarts == 2
    restarts = [r for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(restarts) == 2
    assert "--tile 128" in restarts[0].getMessage()
    assert np.array_equal(result.pixels, direct_nearest(pixels, 2))


def test_oom_below_floor_raises_device_error():
    def always_oom(tiles: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    upscaler = nearest_upscaler(2, forward=always_oom)
    with pytest.raises(DeviceError, match="out of GPU memory with --tile 32"):
        upscale_array(random_image(100, 100), upscaler, TileSettings(tile=128))


def test_failed_tile_raises_instead_of_reusing_output():
    calls = []

    def fail_third(tiles: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kernel failure on tile 3")
        return nearest(tiles, 2)

    upscaler = nearest_upscaler(2, forward=fail_third)
    with pytest.raises(RuntimeError, match="tile 3"):
        upscale_array(
            random_image(100, 100), upscaler, TileSettings(tile=40, overlap=8)
        )


def test_wrong_output_shape_rejected():
    upscaler = nearest_upscaler(2, forward=lambda tiles: nearest(tiles, 3))
    with pytest.raises(InvalidInputError, match="expected"):
        upscale_array(random_image(20, 20), upscaler, TileSettings(tile=16, overlap=4))


@pytest.mark.parametrize("failure", ["nan", "black"])
def test_fp16_failed_tile_redone_in_fp32(failure, caplog):
    # The fp16 forward fails on tiles whose top-left input is above 0.5; the fp32
    # forward is exact, so the result must equal the direct upscale.
    def flaky_half(tiles: torch.Tensor) -> torch.Tensor:
        output = nearest(tiles, 2)
        bad = tiles[:, 0, 0, 0] > 0.5
        output[bad] = float("nan") if failure == "nan" else 0.0
        return output

    fp32_calls = []

    def exact_fp32(tiles: torch.Tensor) -> torch.Tensor:
        assert tiles.dtype == torch.float32
        fp32_calls.append(tiles.shape[0])
        return nearest(tiles, 2)

    # Samples representable in fp16, so the tiles that pass in fp16 are exact too.
    pixels = random_image(60, 90, seed=9).astype(np.float16).astype(np.float32)
    upscaler = nearest_upscaler(
        2, dtype=torch.float16, forward=flaky_half, forward_fp32=exact_fp32
    )
    settings = TileSettings(tile=32, overlap=8, tile_batch=4)
    with caplog.at_level(logging.WARNING, logger="renderqa"):
        result = upscale_array(pixels, upscaler, settings)
    assert result.fp32_retries == sum(fp32_calls)
    assert result.fp32_retries > 0
    assert any("redoing them in fp32" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(result.pixels, direct_nearest(pixels, 2))


def test_nonfinite_fp32_output_raises():
    upscaler = nearest_upscaler(
        2, forward=lambda tiles: torch.full_like(nearest(tiles, 2), float("nan"))
    )
    with pytest.raises(DeviceError, match="non-finite"):
        upscale_array(random_image(20, 20), upscaler, TileSettings(tile=16, overlap=4))


def test_spandrel_forward_flags_overflow_as_nan(tmp_path):
    # spandrel clamps outputs to [0, 1]; an inf must still reach the tiler as NaN.
    upscaler = load_upscaler(
        write_nearest_checkpoint(tmp_path / "n.safetensors", 2), CPU
    )
    tiles = torch.rand(2, 3, 8, 8)
    tiles[1, 0, 0, 0] = float("inf")
    output = upscaler.forward(tiles)
    assert torch.isfinite(output[0]).all()
    assert torch.isnan(output[1]).all()


# --- dtype and layout ----------------------------------------------------------


def test_channels_last_matches_contiguous(trained):
    pixels = load_photo("astronaut")[100:196, 200:328]
    settings = TileSettings(tile=48, overlap=8)
    contiguous = upscale_array(pixels, trained, settings).pixels
    channels_last = load_upscaler(TRAINED_WEIGHTS, CPU, channels_last=True)
    nhwc = upscale_array(pixels, channels_last, settings).pixels
    np.testing.assert_allclose(nhwc, contiguous, rtol=0, atol=1e-5)


def test_unsupported_dtype_rejected(tmp_path):
    # spandrel reports fp16 support per architecture (False for DAT, DRCT, GRL...).
    descriptor = read_descriptor(
        write_nearest_checkpoint(tmp_path / "n.safetensors", 2)
    )
    descriptor.supports_half = False
    with pytest.raises(
        InvalidInputError, match="does not support it; use fp32 or bf16"
    ):
        choose_dtype(descriptor, "fp16", CPU)
    assert choose_dtype(descriptor, "bf16", CPU) is torch.bfloat16
    assert choose_dtype(descriptor, "auto", CPU) is torch.float32


def test_fp16_load_keeps_fp32_fallback(tmp_path):
    path = write_nearest_checkpoint(tmp_path / "n.safetensors", 2)
    upscaler = load_upscaler(path, CPU, dtype="fp16")
    assert upscaler.dtype == torch.float16
    tiles = torch.rand(1, 3, 6, 6)
    np.testing.assert_array_equal(upscaler.forward_fp32(tiles), nearest(tiles, 2))


# --- checkpoints -------------------------------------------------------------


def test_unrecognised_checkpoint_lists_architectures(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelLoadError, match="does not recognise") as error:
        load_upscaler(path, CPU)
    assert "ESRGAN" in str(error.value)
    assert "SwinIR" in str(error.value)


def test_corrupt_checkpoint_rejected(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        load_upscaler(path, CPU)


# --- the trained fixture on real photographs ----------------------------------


def test_trained_fixture_beats_bicubic(trained):
    hr = torch.from_numpy(load_photo("chelsea")[:200, :300]).permute(2, 0, 1)[None]
    lr = torch.nn.functional.interpolate(
        hr, scale_factor=0.5, mode="bicubic", antialias=True
    ).clamp(0, 1)
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic")
    model = upscale_array(
        lr[0].permute(1, 2, 0).numpy(), trained, TileSettings(tile=512)
    ).pixels
    reference = hr[0].permute(1, 2, 0).numpy()
    bicubic_np = bicubic.clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert psnr(model, reference) > psnr(bicubic_np, reference) + 0.3


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_hann_tiles_match_single_pass(trained, name):
    pixels = load_photo(name)[:160, :200]
    single = upscale_array(pixels, trained, TileSettings(tile=512, overlap=0)).pixels
    tiled = upscale_array(pixels, trained, TileSettings(tile=64, overlap=16)).pixels
    assert psnr(tiled, single) >= 45.0


SEAM_PHOTOS = ("astronaut", "chelsea", "rocket", "coffee")


@pytest.mark.parametrize("name", SEAM_PHOTOS)
def test_hann_tiles_have_no_seams(trained, name):
    pixels = load_photo(name)[:192, :256]
    single = upscale_array(pixels, trained, TileSettings(tile=1024)).pixels
    tiled = upscale_array(pixels, trained, TileSettings(tile=64, overlap=8)).pixels
    plan = TilePlan(tile=64, overlap=8, scale=2)
    assert find_seams(single, plan).seams == []
    found = find_seams(tiled, plan).seams
    assert found == [], [(s.orientation, s.position, s.strength_ratio) for s in found]
    assert psnr(tiled, single) >= 45.0


def test_none_blend_wide_overlap_matches_single_pass(trained):
    # The fixture's six 3x3 convolutions see 6 input pixels each way (a receptive
    # field of 13), so with overlap 14 every pixel kept by the hard cut lies at
    # least 7 pixels inside its tile and saw no zero padding.
    pixels = load_photo("chelsea")[:192, :256]
    single = upscale_array(pixels, trained, TileSettings(tile=1024)).pixels
    settings = TileSettings(tile=64, overlap=14, blend="none")
    tiled = upscale_array(pixels, trained, settings).pixels
    error = float(np.abs(tiled - single).max())
    assert error < 1e-5, error
    assert find_seams(tiled, TilePlan(tile=64, overlap=14, scale=2)).seams == []


def test_hard_tiles_show_seams(trained):
    # With no overlap the `none` blend pastes hard tile edges, whose pixels saw
    # zero padding; seam-check finds them where the tile plan says.
    pixels = load_photo("chelsea")[:192, :256]
    settings = TileSettings(tile=64, overlap=0, blend="none")
    tiled = upscale_array(pixels, trained, settings).pixels
    found = find_seams(tiled, TilePlan(tile=64, overlap=0, scale=2)).seams
    assert len(found) >= 2
    boundaries = set(seam_positions(192, 64, 0, 2)) | set(seam_positions(256, 64, 0, 2))
    assert {seam.position for seam in found} <= boundaries


# --- image types -------------------------------------------------------------


def test_constant_alpha_stays_constant(tmp_path):
    rgba = np.dstack([random_image(9, 11)[..., :3] * 255, np.full((9, 11), 128)])
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba.astype(np.uint8)).save(path)
    result = upscale_image(
        load_image(path), nearest_upscaler(2), TileSettings(tile=8, overlap=2)
    )
    assert result.alpha.shape == (18, 22)
    assert np.all(result.alpha == np.float32(128 / 255))
    assert len(result.passes) == 1


def test_varying_alpha_upscaled_separately(tmp_path):
    alpha = (np.arange(99).reshape(9, 11) * 2).astype(np.uint8)
    rgba = np.dstack([np.zeros((9, 11, 3), np.uint8), alpha])
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    result = upscale_image(
        load_image(path), nearest_upscaler(2), TileSettings(tile=8, overlap=2)
    )
    np.testing.assert_array_equal(
        result.alpha, direct_nearest(alpha.astype(np.float32) / 255.0, 2)
    )
    assert len(result.passes) == 2


def test_save_releases_float_pixels(tmp_path):
    alpha = (np.arange(99).reshape(9, 11) * 2).astype(np.uint8)
    rgb = (random_image(9, 11) * 255).astype(np.uint8)
    source = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(source)
    result = upscale_image(
        load_image(source), nearest_upscaler(2), TileSettings(tile=8, overlap=2)
    )
    target = tmp_path / "out" / "rgba_x2.png"
    save_upscaled(target, result, 8, "png", None, {})
    assert result.pixels is None
    assert result.alpha is None
    assert [p.pixels for p in result.passes] == [None, None]
    written = np.asarray(Image.open(target))
    np.testing.assert_array_equal(written[..., :3], direct_nearest(rgb, 2))
    np.testing.assert_array_equal(written[..., 3], direct_nearest(alpha, 2))
    with pytest.raises(ValueError, match="already taken"):
        take_samples(result, 8)


def test_grey_image_keeps_no_rgb_canvas(tmp_path):
    grey = (random_image(9, 11)[..., 0] * 255).astype(np.uint8)
    source = tmp_path / "grey.png"
    Image.fromarray(grey).save(source)
    result = upscale_image(
        load_image(source), nearest_upscaler(2), TileSettings(tile=8, overlap=2)
    )
    assert result.pixels.shape == (18, 22, 1)
    assert result.passes[0].pixels is None
    np.testing.assert_array_equal(
        result.pixels[..., 0], direct_nearest(grey.astype(np.float32) / 255.0, 2)
    )


def test_discard_rows_zeroes_whole_pages_only():
    canvas = zeros_canvas((400, 5, 3), np.float32)  # 60-byte rows
    canvas[:] = 1.0
    discard_rows(canvas, 300)
    boundary = 300 * 60 // mmap.PAGESIZE * mmap.PAGESIZE
    assert np.all(canvas[-(-boundary // 60) :] == 1.0)
    if sys.platform == "linux":
        # Linux zero-fills discarded pages; elsewhere they are undefined.
        assert not canvas[: boundary // 60].any()


def test_discard_rows_ignores_other_arrays():
    plain = np.ones((64, 1024, 4), np.float32)
    discard_rows(plain, 64)
    assert np.all(plain == 1.0)
    canvas = zeros_canvas((64, 1024, 4), np.float32)
    canvas[:] = 1.0
    discard_rows(canvas[8:], 32)
    assert np.all(canvas == 1.0)


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(x.split()[1]) for x in status if x.startswith(field))


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM; return False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    sys.platform != "linux" or not _reset_peak_rss(),
    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS",
)
def test_take_samples_peak_memory():
    # A 48 MiB float canvas is quantised to 12 MiB of uint8 samples. With the
    # canvas's rows discarded as they are read, the peak grew by about 6 MiB: one
    # 4 MiB float block and page slack. Without it, the growth was about 20 MiB.
    canvas = zeros_canvas((2048, 2048, 3), np.float32)
    canvas[:] = 0.5
    result = UpscaledImage(pixels=canvas, alpha=None, passes=[])
    del canvas
    before = _memory_kib("VmRSS:")
    _reset_peak_rss()
    samples = take_samples(result, 8)
    growth_mib = (_memory_kib("VmHWM:") - before) / 1024
    assert growth_mib < 12, f"peak grew by {growth_mib:.1f} MiB"
    assert np.all(samples == 128)


def test_png16_stream_matches_one_shot_zlib(tmp_path, monkeypatch):
    # 139-byte scanlines in 1000-byte blocks: six compress() calls.
    monkeypatch.setattr(imageio, "QUANTIZE_BLOCK", 1000)
    rng = np.random.default_rng(4)
    samples = np.zeros((37, 23, 3), dtype=np.uint16)
    samples[:20] = rng.integers(0, 65536, size=(20, 23, 3))
    samples[20:] = np.arange(23 * 3).reshape(23, 3) * 900
    path = tmp_path / "stream16.png"
    save_png16(path, samples, {"key": "value"})
    rows = samples.astype(">u2").reshape(37, -1).view(np.uint8)
    scanlines = np.concatenate([np.zeros((37, 1), np.uint8), rows], axis=1)
    stream = zlib.compress(scanlines.tobytes(), 6)
    data = path.read_bytes()
    assert data[data.index(b"IDAT") - 4 : data.index(b"IDAT")] == struct.pack(
        ">I", len(stream)
    )
    assert stream in data
    np.testing.assert_array_equal(imagecodecs.png_decode(data), samples)
    assert Image.open(path).text == {"key": "value"}


def test_greyscale_16bit_precision_kept(tmp_path):
    samples = (np.arange(48).reshape(6, 8) * 1361 + 3).astype(np.uint16)
    source = tmp_path / "grey16.png"
    Image.fromarray(samples).save(source)
    assert Image.open(source).mode == "I;16"
    code = (
        CliRunner()
        .invoke(
            app,
            [
                "upscale",
                str(source),
                "--model",
                str(nearest_path(tmp_path, 2)),
                "--out",
                str(tmp_path / "o"),
            ],
        )
        .exit_code
    )
    assert code == 0
    written = np.asarray(Image.open(tmp_path / "o" / "grey16_x2.png"))
    np.testing.assert_array_equal(written, direct_nearest(samples, 2))


def test_rgba_16bit_precision_kept(tmp_path):
    rng = np.random.default_rng(4)
    samples = rng.integers(0, 65536, size=(6, 9, 4), dtype=np.uint16)
    source = tmp_path / "rgba16.png"
    source.write_bytes(imagecodecs.png_encode(samples))
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(source),
            "--model",
            str(nearest_path(tmp_path, 2)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = imagecodecs.png_decode((tmp_path / "o" / "rgba16_x2.png").read_bytes())
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, direct_nearest(samples, 2))


def test_palette_png_upscaled_as_rgb(tmp_path):
    rgb = (random_image(10, 12) * 255).astype(np.uint8)
    source = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(source)
    expected = np.asarray(Image.open(source).convert("RGB"))
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(source),
            "--model",
            str(nearest_path(tmp_path, 2)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(tmp_path / "o" / "palette_x2.png"))
    np.testing.assert_array_equal(written, direct_nearest(expected, 2))


def test_exif_orientation_applied_and_icc_kept(tmp_path):
    rgb = (random_image(10, 16) * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    icc = b"\x00fake-icc-profile-bytes"
    source = tmp_path / "rotated.png"
    image.save(source, exif=exif, icc_profile=icc)
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(source),
            "--model",
            str(nearest_path(tmp_path, 2)),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    written = Image.open(tmp_path / "o" / "rotated_x2.png")
    assert written.size == (20, 32)
    assert written.info.get("icc_profile") == icc
    rotated = np.rot90(rgb, k=-1)
    np.testing.assert_array_equal(np.asarray(written), direct_nearest(rotated, 2))


# --- CLI ---------------------------------------------------------------------


def nearest_path(tmp_path: Path, scale: int) -> Path:
    path = tmp_path / f"nearest-x{scale}.safetensors"
    return path if path.exists() else write_nearest_checkpoint(path, scale)


def test_cli_writes_output_and_metadata(tmp_path):
    rgb = (random_image(20, 30) * 255).astype(np.uint8)
    source = tmp_path / "render.png"
    Image.fromarray(rgb).save(source)
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(source),
            "--model",
            str(nearest_path(tmp_path, 3)),
            "--tile",
            "16",
            "--overlap",
            "4",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    target = tmp_path / "o" / "render_x3.png"
    assert "render_x3.png: 30x20 -> 90x60" in result.stdout
    assert "1 of 1 image(s) upscaled x3" in result.stdout
    metadata = json.loads(Image.open(target).text[METADATA_KEY])
    assert metadata["tile"] == 16
    assert metadata["architecture"] == "RealESRGAN Compact"
    np.testing.assert_array_equal(
        np.asarray(Image.open(target)), direct_nearest(rgb, 3)
    )


def test_cli_bad_images_reported_and_batch_continues(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((random_image(8, 8) * 255).astype(np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    missing = tmp_path / "missing.png"
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            *map(str, (truncated, text, missing, big, good)),
            "--model",
            str(nearest_path(tmp_path, 2)),
            "--max-pixels",
            "1000",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "truncated.png: cannot decode image" in result.stderr
    assert "notes.png: not an image file" in result.stderr
    assert "missing.png: file not found" in result.stderr
    assert "decompression bomb" in result.stderr
    assert "Traceback" not in result.output
    assert (tmp_path / "o" / "good_x2.png").is_file()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good_x2.png"]


def test_cli_unrecognised_checkpoint_exits_2(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    result = CliRunner().invoke(app, ["upscale", str(image), "--model", str(path)])
    assert result.exit_code == 2
    assert "does not recognise" in result.stderr
    assert "SwinIR" in result.stderr


@pytest.mark.parametrize(
    "options,message",
    [
        (["--tile", "64", "--overlap", "32"], "--overlap 32 must be less than half"),
        (["--blend", "cosine"], "--blend 'cosine' is unknown"),
        (["--dtype", "fp8"], "--dtype 'fp8' is unknown"),
        (["--format", "gif"], "--format 'gif' is unknown"),
        (["--tile-batch", "0"], "--tile-batch 0 must be at least 1"),
    ],
)
def test_cli_bad_options_exit_2(tmp_path, options, message):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    result = CliRunner().invoke(
        app,
        ["upscale", str(image), "--model", str(nearest_path(tmp_path, 2)), *options],
    )
    assert result.exit_code == 2
    assert message in result.stderr


def test_cli_tile_below_minimum_exits_2(tmp_path):
    model = write_unshuffle_checkpoint(tmp_path / "u.safetensors")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    result = CliRunner().invoke(
        app,
        ["upscale", str(image), "--model", str(model), "--tile", "3", "--overlap", "0"],
    )
    assert result.exit_code == 2
    assert "--tile 3 is below the minimum input size of 4" in result.stderr


def test_cli_rejects_bad_out_and_max_pixels_before_loading(tmp_path):
    from typer.testing import CliRunner

    from renderqa.cli.app import app

    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    runner = CliRunner()
    missing_model = str(tmp_path / "no-model.pth")
    result = runner.invoke(
        app, ["upscale", str(image), "--model", missing_model, "--out", str(blocker)]
    )
    assert result.exit_code == 2
    assert "--out" in result.output
    assert "is a file" in result.output
    result = runner.invoke(
        app, ["upscale", str(image), "--model", missing_model, "--max-pixels", "0"]
    )
    assert result.exit_code == 2
    assert "--max-pixels 0 must be at least 1" in result.output
    assert blocker.read_text() == "keep"


def test_cli_upscales_repeated_image_once(tmp_path):
    from typer.testing import CliRunner

    from renderqa.cli.app import app

    model = (
        Path(__file__).resolve().parents[1]
        / "fixtures"
        / "upscaler"
        / "compact-x2.safetensors"
    )
    image = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (200, 40, 40)).save(image)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(image),
            str(tmp_path / "." / "in.png"),
            "--model",
            str(model),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["in_x2.png"]
