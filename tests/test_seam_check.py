"""seam-check: no seams on untiled photographs, every hard-tile boundary found.

The photographs are scikit-image's bundled ones (tests/photos.py). The tiled
images come from a fixed blur-and-sharpen model with zero padding and a receptive
field of about 11 output pixels, run tile by tile as `renderqa upscale` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from renderqa.cli.app import app
from renderqa.core.errors import InvalidInputError
from renderqa.core.seams import (
    HORIZONTAL,
    VERTICAL,
    SeamSettings,
    TilePlan,
    find_seams,
    find_seams_in_luma,
)
from renderqa.core.tiling import hard_cut_positions, tile_starts
from tests.photos import STRAIGHT_EDGE_PHOTOS, load_photo, photo_names

RESAMPLERS = (
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
    Image.Resampling.BILINEAR,
    Image.Resampling.HAMMING,
)


# --- image helpers -------------------------------------------------------------


def quantise(pixels: np.ndarray) -> np.ndarray:
    """Round [0, 1] floats to 8-bit levels, as saving a PNG would."""
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.float32) / 255.0


def resize(pixels: np.ndarray, width: int, height: int, resample) -> np.ndarray:
    """Resize (H, W, 3) [0, 1] floats through Pillow's 8-bit resampler."""
    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), resample), np.float32) / 255.0


def upscale_photo(name: str, width: int, resample) -> np.ndarray:
    photo = load_photo(name)
    height = round(photo.shape[0] * width / photo.shape[1])
    return quantise(resize(photo, width, height, resample))


def skewed_kernel(sigma: float, shift: float) -> np.ndarray:
    """Return a normalised 1-D Gaussian centred `shift` pixels off the middle."""
    radius = int(np.ceil(3 * sigma + abs(shift)))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * ((taps - shift) / sigma) ** 2)
    return kernel / kernel.sum()


KERNEL = skewed_kernel(sigma=3.0, shift=2.0)


def model(tile: np.ndarray, scale: int, amount: float = 0.03) -> np.ndarray:
    """Upscale a tile by `scale` (bicubic), then sharpen with a zero-padded blur.

    The blur is skewed and sees the tile plus a bias of 0.5 (like a hidden layer's
    activations), so pixels near a tile edge lose part of their neighbourhood and
    come out up to a few grey levels off, differently on the two sides of a cut.
    """
    height, width = tile.shape[:2]
    upscaled = resize(tile, width * scale, height * scale, Image.Resampling.BICUBIC)
    biased = upscaled + 0.5
    blurred = ndimage.correlate1d(biased, KERNEL, axis=0, mode="constant")
    blurred = ndimage.correlate1d(blurred, KERNEL, axis=1, mode="constant")
    return upscaled + amount * (biased - blurred)


def run_tiled(image: np.ndarray, tile: int, scale: int, overlap: int = 0) -> np.ndarray:
    """Run `model` on hard tiles and paste them at the plan's cuts (no blend)."""
    height, width = image.shape[:2]
    rows, columns = (
        tile_starts(height, tile, overlap),
        tile_starts(width, tile, overlap),
    )
    row_cuts = [0, *hard_cut_positions(height, tile, overlap), height]
    column_cuts = [0, *hard_cut_positions(width, tile, overlap), width]
    output = np.zeros((height * scale, width * scale, 3), np.float32)
    for i, top in enumerate(rows):
        for j, left in enumerate(columns):
            result = model(image[top : top + tile, left : left + tile], scale)
            y0, y1 = row_cuts[i], row_cuts[i + 1]
            x0, x1 = column_cuts[j], column_cuts[j + 1]
            output[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = result[
                (y0 - top) * scale : (y1 - top) * scale,
                (x0 - left) * scale : (x1 - left) * scale,
            ]
    return quantise(output)


def hann_ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Weights along one tile axis: a raised cosine over each interior overlap."""
    weights = np.ones(length, np.float64)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
    if at_start:
        weights[:overlap] = ramp
    if at_end:
        weights[length - overlap :] = ramp[::-1]
    return weights


def run_blended(image: np.ndarray, tile: int, overlap: int, scale: int) -> np.ndarray:
    """Run `model` on overlapping tiles and blend them with Hann weights."""
    height, width = image.shape[:2]
    rows, columns = (
        tile_starts(height, tile, overlap),
        tile_starts(width, tile, overlap),
    )
    total = np.zeros((height * scale, width * scale, 3), np.float64)
    weight = np.zeros((height * scale, width * scale, 1), np.float64)
    for i, top in enumerate(rows):
        for j, left in enumerate(columns):
            result = model(image[top : top + tile, left : left + tile], scale)
            # The overlap of the last tile can exceed `overlap`; ramp over the
            # overlap actually shared with the neighbour.
            before_y = rows[i - 1] + tile - top if i else 0
            after_y = top + tile - rows[i + 1] if i + 1 < len(rows) else 0
            before_x = columns[j - 1] + tile - left if j else 0
            after_x = left + tile - columns[j + 1] if j + 1 < len(columns) else 0
            wy = _two_sided(tile * scale, before_y * scale, after_y * scale)
            wx = _two_sided(tile * scale, before_x * scale, after_x * scale)
            window = (wy[:, None] * wx[None, :])[..., None]
            y0, x0 = top * scale, left * scale
            total[y0 : y0 + tile * scale, x0 : x0 + tile * scale] += result * window
            weight[y0 : y0 + tile * scale, x0 : x0 + tile * scale] += window
    return quantise((total / weight).astype(np.float32))


def _two_sided(length: int, before: int, after: int) -> np.ndarray:
    weights = np.ones(length)
    if before:
        weights *= hann_ramp(length, before, True, False)
    if after:
        weights *= hann_ramp(length, after, False, True)
    return weights


def positions(report, orientation: str) -> list[int]:
    return [seam.position for seam in report.seams if seam.orientation == orientation]


def missing(expected: list[int], found: list[int], tolerance: int = 2) -> list[int]:
    return [e for e in expected if not any(abs(e - f) <= tolerance for f in found)]


# --- hand-computed cases -------------------------------------------------------


def test_step_of_three_levels_scores_by_floor():
    pixels = np.full((64, 96, 3), 128 / 255, np.float32)
    pixels[:, 40:] += 3 / 255
    report = find_seams(pixels)
    assert len(report.seams) == 1
    seam = report.seams[0]
    assert seam.orientation == VERTICAL
    assert seam.position == 40
    # Flat neighbours: the references fall to the floors, 0.5 and 0.25 levels.
    assert seam.strength_ratio == pytest.approx(3 / 0.5)
    assert seam.tone_ratio == pytest.approx(3 / 0.25)
    assert seam.difference == pytest.approx(3.0)
    assert seam.neighbour_difference == pytest.approx(0.0)
    assert seam.tone_step == pytest.approx(3.0)
    assert seam.detected_by == "gradient+tone"


def test_one_level_step_found_by_tone_term_only():
    pixels = np.full((80, 80, 1), 100 / 255, np.float32)
    pixels[50:] += 1 / 255
    report = find_seams(pixels)
    assert [(s.orientation, s.position) for s in report.seams] == [(HORIZONTAL, 50)]
    assert report.seams[0].detected_by == "tone"
    assert report.seams[0].strength_ratio == pytest.approx(1 / 0.5)
    assert report.seams[0].tone_ratio == pytest.approx(1 / 0.25)


def test_ramps_and_blurred_edges_are_not_seams():
    x = np.linspace(0, 1, 256, dtype=np.float32)
    ramp = np.broadcast_to(x[None, :, None], (128, 256, 3))
    edge = ndimage.gaussian_filter1d((x > 0.5).astype(np.float32), 2.0)
    blurred_edge = np.broadcast_to(edge[None, :, None], (128, 256, 3))
    assert find_seams(quantise(ramp)).clean
    assert find_seams(quantise(blurred_edge)).clean


def test_uint8_and_float_luma_agree():
    photo = upscale_photo("brick", 512, Image.Resampling.BICUBIC)
    luma_u8 = np.asarray(
        Image.fromarray(np.round(photo * 255).astype(np.uint8)).convert("L")
    )
    from_u8 = find_seams_in_luma(luma_u8)
    from_float = find_seams_in_luma(luma_u8.astype(np.float32))
    assert from_u8.seams == from_float.seams
    np.testing.assert_allclose(
        from_u8.scores[VERTICAL].strength_ratio,
        from_float.scores[VERTICAL].strength_ratio,
        atol=1e-6,
    )


def test_rgba_alpha_is_ignored():
    rgb = run_tiled(upscale_photo("coffee", 256, Image.Resampling.BICUBIC), 64, 2)
    alpha = np.random.default_rng(0).random(rgb.shape[:2] + (1,), dtype=np.float32)
    rgba = np.concatenate([rgb, alpha], axis=2)
    assert find_seams(rgba).seams == find_seams(rgb).seams


# --- tile plans ----------------------------------------------------------------


def test_plan_with_wrong_scale_is_rejected():
    pixels = np.zeros((250, 250, 3), np.float32)
    with pytest.raises(InvalidInputError, match="not a multiple of --scale 4"):
        find_seams(pixels, TilePlan(tile=32, scale=4))


def test_plan_larger_than_image_is_rejected():
    pixels = np.zeros((256, 256, 3), np.float32)
    with pytest.raises(InvalidInputError, match="covers the whole 128x128 input"):
        find_seams(pixels, TilePlan(tile=128, scale=2))


def test_plan_with_bad_overlap_is_rejected():
    pixels = np.zeros((256, 256, 3), np.float32)
    with pytest.raises(InvalidInputError, match="--overlap 40"):
        find_seams(pixels, TilePlan(tile=64, overlap=40))


def test_factor_of_one_is_rejected():
    with pytest.raises(InvalidInputError, match="--factor 1.0"):
        SeamSettings(factor=1.0)


# --- photographs -----------------------------------------------------------------


def test_photo_set_is_large_enough():
    names = photo_names()
    assert len(names) >= 10
    assert set(STRAIGHT_EDGE_PHOTOS) <= set(names)


@pytest.mark.slow
@pytest.mark.parametrize("index_and_name", list(enumerate(photo_names())), ids=str)
def test_untiled_4k_photo_has_no_seams(index_and_name):
    index, name = index_and_name
    resample = RESAMPLERS[index % len(RESAMPLERS)]
    report = find_seams(upscale_photo(name, 3840, resample))
    found = [
        (s.orientation, s.position, s.strength_ratio, s.tone_ratio)
        for s in report.seams
    ]
    assert found == [], f"{name} ({resample.name}): false seams {found}"


@pytest.mark.parametrize("name", STRAIGHT_EDGE_PHOTOS)
def test_untiled_4k_straight_edges_have_no_seams(name):
    report = find_seams(upscale_photo(name, 3840, Image.Resampling.BICUBIC))
    found = [
        (s.orientation, s.position, s.strength_ratio, s.tone_ratio)
        for s in report.seams
    ]
    assert found == [], f"{name}: false seams {found}"


# (photo, scale, tile in input pixels, crop offset in input pixels)
TILED_CASES = [
    ("brick", 2, 64, 0),
    ("text", 4, 48, 5),
    ("chelsea", 2, 96, 17),
    ("camera", 4, 64, 40),
    ("rocket", 2, 128, 3),
    ("coffee", 4, 96, 11),
    ("astronaut", 2, 80, 29),
    ("gravel", 4, 64, 7),
]


def tiled_photo(name: str, scale: int, tile: int, crop: int):
    """Return (tiled model output, input) for a photo cut to whole tiles.

    The input is a whole number of tiles, so every cut lies on a tile edge.
    """
    photo = upscale_photo(name, 1024 // scale + crop, Image.Resampling.BICUBIC)
    rows = (photo.shape[0] - crop) // tile * tile
    columns = (photo.shape[1] - crop) // tile * tile
    image = photo[crop : crop + rows, crop : crop + columns]
    return run_tiled(image, tile, scale), image


@pytest.mark.parametrize(("name", "scale", "tile", "crop"), TILED_CASES)
def test_hard_tile_boundaries_all_found(name, scale, tile, crop):
    output, image = tiled_photo(name, scale, tile, crop)
    expected = {
        VERTICAL: [c * scale for c in hard_cut_positions(image.shape[1], tile, 0)],
        HORIZONTAL: [c * scale for c in hard_cut_positions(image.shape[0], tile, 0)],
    }
    with_plan = find_seams(output, TilePlan(tile=tile, overlap=0, scale=scale))
    without_plan = find_seams(output)
    for orientation in (VERTICAL, HORIZONTAL):
        assert missing(expected[orientation], positions(with_plan, orientation)) == []
        assert (
            missing(expected[orientation], positions(without_plan, orientation)) == []
        )
        grid = without_plan.grids[orientation]
        if len(expected[orientation]) >= 3:
            assert grid is not None
            assert grid.period == tile * scale
            assert grid.offset == tile * scale


@pytest.mark.parametrize(("name", "scale", "tile", "crop"), TILED_CASES[:4])
def test_hann_blend_scores_like_untiled(name, scale, tile, crop):
    _, image = tiled_photo(name, scale, tile, crop)
    overlap = tile // 4
    blended = find_seams(run_blended(image, tile, overlap, scale))
    untiled = find_seams(quantise(model(image, scale)))
    assert blended.seams == []
    assert untiled.seams == []
    for orientation in (VERTICAL, HORIZONTAL):
        blended_max = blended.scores[orientation].line_score().max()
        untiled_max = untiled.scores[orientation].line_score().max()
        assert blended_max < untiled_max + 0.5, (orientation, blended_max, untiled_max)


# Dense texture (gravel, grass) steps by more than a grey level between any two
# columns, so a one-level tone shift there is neither visible nor claimed.
TONE_PHOTOS = ["astronaut", "cell", "coffee", "moon", "retina", "chelsea"]


@pytest.mark.parametrize(("index", "name"), list(enumerate(TONE_PHOTOS)))
def test_tone_shift_of_one_level_per_tile_found(index, name):
    tile = (384, 448, 512)[index % 3]
    image = resize(load_photo(name), 3840, 2160, RESAMPLERS[index % len(RESAMPLERS)])
    rows, columns = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    shift = (rows // tile + columns // tile).astype(np.float32) / 255.0
    report = find_seams(quantise(image + shift[..., None]))
    for orientation, length in ((VERTICAL, 3840), (HORIZONTAL, 2160)):
        expected = list(range(tile, length - 8, tile))
        assert missing(expected, positions(report, orientation)) == []
        found_by_tone = [s for s in report.seams if s.orientation == orientation]
        assert all("tone" in s.detected_by for s in found_by_tone)
    assert len(report.seams) == len(range(tile, 3840 - 8, tile)) + len(
        range(tile, 2160 - 8, tile)
    )


def test_jpeg_block_grid_is_not_a_seam(tmp_path):
    photo = upscale_photo("camera", 2048, Image.Resampling.BICUBIC)
    path = tmp_path / "camera.jpg"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path, quality=75)
    result = CliRunner().invoke(app, ["seam-check", str(path)])
    assert result.exit_code == 0, result.output


# --- CLI -------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """A folder with one clean PNG, one seamy 16-bit PNG, one RGBA WebP and one TIFF."""
    clean = upscale_photo("chelsea", 1600, Image.Resampling.LANCZOS)
    seamy = run_tiled(upscale_photo("coffee", 256, Image.Resampling.BICUBIC), 64, 2)
    folder = tmp_path / "renders"
    folder.mkdir()
    Image.fromarray(np.round(clean * 255).astype(np.uint8)).save(folder / "clean.png")
    grey16 = np.round(seamy.mean(axis=2) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "seamy16.png")
    rgba = np.concatenate(
        [
            np.round(clean * 255).astype(np.uint8),
            np.full(clean.shape[:2] + (1,), 200, np.uint8),
        ],
        axis=2,
    )
    Image.fromarray(rgba, mode="RGBA").save(folder / "clean.webp", lossless=True)
    Image.fromarray(np.round(seamy * 255).astype(np.uint8)).save(folder / "seamy.tif")
    return folder


def test_cli_exit_1_when_seams_found(image_folder, tmp_path):
    json_path = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["seam-check", str(image_folder), "--json", str(json_path), "--jobs", "2"]
    )
    assert result.exit_code == 1, result.output
    files = {
        Path(f["path"]).name: f for f in json.loads(json_path.read_text())["files"]
    }
    assert files["clean.png"]["status"] == "clean"
    assert files["clean.webp"]["status"] == "clean"
    assert files["clean.webp"]["alpha_ignored"] is True
    assert files["seamy16.png"]["status"] == "seams"
    assert files["seamy16.png"]["bit_depth"] == 16
    assert files["seamy.tif"]["status"] == "seams"
    assert {s["position"] for s in files["seamy.tif"]["seams"]} >= {128, 256}


def test_cli_exit_0_when_clean(image_folder, tmp_path):
    json_path = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["seam-check", str(image_folder / "clean*"), "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    files = json.loads(json_path.read_text())["files"]
    assert sorted(Path(f["path"]).name for f in files) == ["clean.png", "clean.webp"]
    assert {f["status"] for f in files} == {"clean"}


def test_cli_bad_files_exit_2_others_checked(image_folder, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    png = (image_folder / "clean.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    csv_path = tmp_path / "out.csv"
    result = CliRunner().invoke(
        app,
        [
            "seam-check",
            str(tmp_path / "empty.png"),
            str(tmp_path / "notes.png"),
            str(tmp_path / "truncated.png"),
            str(tmp_path / "missing.png"),
            str(image_folder / "seamy.tif"),
            "--csv",
            str(csv_path),
        ],
    )
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "empty.png: file is empty" in output
    assert "notes.png: not an image file" in output
    assert "truncated.png: cannot decode image" in output
    assert "missing.png: file not found" in output
    rows = csv_path.read_text().splitlines()
    statuses = {
        line.split(",")[0].rsplit("/", 1)[-1]: line.split(",")[1] for line in rows[1:]
    }
    assert statuses["empty.png"] == "error"
    assert statuses["truncated.png"] == "error"
    assert statuses["seamy.tif"] == "seams"


def test_cli_max_pixels_limits_both_readers(image_folder, tmp_path):
    # clean.png takes the 8-bit path and seamy16.png the 16-bit one.
    paths = [str(image_folder / "clean.png"), str(image_folder / "seamy16.png")]
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.width * image.height)
    limit = min(sizes) - 1
    json_path = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        ["seam-check", *paths, "--max-pixels", str(limit), "--json", str(json_path)],
    )
    assert result.exit_code == 2, result.output
    errors = [f["error"] for f in json.loads(json_path.read_text())["files"]]
    assert len(errors) == 2
    for error in errors:
        assert f"is above the limit of {limit} pixels" in error
        assert error.endswith("raise --max-pixels if the file is trusted")

    raised = CliRunner().invoke(
        app, ["seam-check", *paths, "--max-pixels", str(max(sizes))]
    )
    assert raised.exit_code == 1, raised.output


def test_cli_rejects_zero_max_pixels(image_folder):
    result = CliRunner().invoke(
        app, ["seam-check", str(image_folder), "--max-pixels", "0"]
    )
    assert result.exit_code == 2
    assert "--max-pixels 0 must be at least 1 pixel" in result.output


def test_cli_plan_that_cannot_fit_exits_2(image_folder):
    result = CliRunner().invoke(
        app,
        ["seam-check", str(image_folder / "seamy.tif"), "--tile", "64", "--scale", "3"],
    )
    assert result.exit_code == 2
    assert "not a multiple of --scale 3" in result.output


def test_cli_plan_options_need_tile(image_folder):
    result = CliRunner().invoke(app, ["seam-check", str(image_folder), "--scale", "2"])
    assert result.exit_code == 2
    assert "pass --tile as well" in result.output


def test_cli_plan_finds_boundaries(image_folder):
    result = CliRunner().invoke(
        app,
        ["seam-check", str(image_folder / "seamy.tif"), "--tile", "64", "--scale", "2"],
    )
    assert result.exit_code == 1, result.output
    assert "128, 256, 384" in result.output


def test_cli_overlay_writes_marked_copy_and_plot(image_folder, tmp_path):
    overlay = tmp_path / "overlay"
    result = CliRunner().invoke(
        app, ["seam-check", str(image_folder / "seamy.tif"), "--overlay", str(overlay)]
    )
    assert result.exit_code == 1, result.output
    marked = sorted(overlay.glob("seamy-*.seams.png"))
    plots = sorted(overlay.glob("seamy-*.profiles.png"))
    assert len(marked) == 1
    assert len(plots) == 1
    pixels = np.asarray(Image.open(marked[0]))
    assert tuple(pixels[10, 128]) == (255, 0, 64)
    assert tuple(pixels[128, 10]) == (255, 0, 64)
    assert list(overlay.glob(".*.tmp")) == []


def test_16bit_rgb_png_keeps_precision(tmp_path):
    import imagecodecs

    from renderqa.core.seams_io import read_luma

    samples = np.full((16, 16, 3), 32768, dtype=np.uint16)
    samples[:, 8:] += 64  # a quarter of one 8-bit grey level, lost at 8 bits
    path = tmp_path / "rgb16.png"
    path.write_bytes(imagecodecs.png_encode(samples))
    image = read_luma(path)
    assert image.bit_depth == 16
    assert image.luma[:, 8:].mean() > image.luma[:, :8].mean()


def test_cli_rejects_json_in_missing_folder(tmp_path):
    image = tmp_path / "clean.png"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(image)
    target = tmp_path / "missing" / "report.json"
    result = CliRunner().invoke(app, ["seam-check", str(image), "--json", str(target)])
    assert result.exit_code == 2
    assert "--json" in result.output
    assert "does not exist" in result.output
    assert not target.exists()
