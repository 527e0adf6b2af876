"""Sweep axes, definitions, the resumable store, statistics, plot and contact sheets.

These run on synthetic rows and images, without a pipeline or a CLIP model.
"""

from __future__ import annotations

import csv
import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from renderqa.core.errors import InvalidInputError, OutputError
from renderqa.sweeps.axes import parse_decimal_list, parse_threshold_list
from renderqa.sweeps.definition import (
    Prompt,
    build_definition,
    load_sweep_file,
    read_prompts_file,
)
from renderqa.sweeps.plots import (
    MISSING_CELL,
    _saturation_note,
    contact_sheet,
    plot_saturation_vs_clip,
)
from renderqa.sweeps.store import (
    RESULT_COLUMNS,
    RESULTS_NAME,
    SweepStore,
    format_row,
    read_results,
)
from renderqa.sweeps.summary import describe, summarise

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"


def minimal_settings(**overrides):
    settings = {
        "model": "some/model",
        "prompts": ["a red mug"],
        "seeds": "0-1",
        "guidance_scale": "9",
        "guidance_rescale": "0,0.7",
    }
    settings.update(overrides)
    return settings


# --- axes -------------------------------------------------------------------------


def test_decimal_list_keeps_exact_strings():
    assert parse_decimal_list("0,0.3,0.5,0.7,1.0", "--x") == (
        "0",
        "0.3",
        "0.5",
        "0.7",
        "1.0",
    )


def test_decimal_range_has_no_float_drift():
    values = parse_decimal_list("0-1:0.1", "--x")
    assert len(values) == 11
    assert values[3] == "0.3"
    assert values[-1] == "1.0"
    # A float arange gives 0.30000000000000004 at index 3.
    assert float(values[3]) == 0.3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0.7-0.3", "runs backwards"),
        ("a,b", "'a' is not a number"),
        ("0-1", "has no step"),
        ("0-1:0", "step must be positive"),
        ("0.3,0.30", "listed twice"),
        ("0,,1", "empty value"),
        ("", "no values given"),
        ("nan", "not a finite number"),
    ],
)
def test_decimal_list_rejects_malformed_input(text, fragment):
    with pytest.raises(InvalidInputError) as error:
        parse_decimal_list(text, "--guidance-rescale")
    assert fragment in str(error.value)
    assert "--guidance-rescale" in str(error.value)


def test_threshold_labels_are_canonical():
    choices = parse_threshold_list(
        "off,latent:0.9950:3.0,latent:0.99:2:per-channel,pixel:0.995"
    )
    assert [c.label for c in choices] == [
        "off",
        "latent:0.9950:3.0",
        "latent:0.99:2:per-channel",
        "pixel:0.995",
    ]
    assert choices[0].is_off
    assert choices[2].per_channel


@pytest.mark.parametrize(
    "text",
    ["pixel:0.99:3", "latent:0.99", "latent:1.5:3", "latent:0.99:0.5", "clip:0.9"],
)
def test_threshold_rejects_invalid_choice(text):
    with pytest.raises(InvalidInputError):
        parse_threshold_list(text)


# --- definition -------------------------------------------------------------------


def test_definition_rejects_rescale_outside_unit_interval():
    with pytest.raises(InvalidInputError) as error:
        build_definition(minimal_settings(guidance_rescale="0,1.2"))
    assert "1.2 is outside [0, 1]" in str(error.value)


def test_definition_rejects_empty_prompt_list(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(InvalidInputError) as error:
        build_definition(minimal_settings(prompts=[], prompts_file=empty))
    assert "no prompts given" in str(error.value)


def test_definition_rejects_malformed_seed_range():
    with pytest.raises(InvalidInputError) as error:
        build_definition(minimal_settings(seeds="3-1"))
    assert "runs backwards" in str(error.value)


def test_points_expand_in_fixed_order():
    definition = build_definition(
        minimal_settings(guidance_scale="5,9", prompts=["a", "b"])
    )
    points = definition.points()
    assert len(points) == 2 * 2 * 2 * 2
    assert points[0].point_id == "p00__gs5__gr0__thoff__seed0"
    assert points[1].point_id == "p00__gs5__gr0__thoff__seed1"
    assert points[-1].point_id == "p01__gs9__gr0.7__thoff__seed1"


def test_batches_share_prompt_and_guidance_mode():
    definition = build_definition(
        minimal_settings(guidance_scale="1,9", prompts=["a", "b"], seeds="0-2")
    )
    batches = definition.batches(4)
    for batch in batches:
        assert len(batch) <= 4
        assert len({point.prompt for point in batch}) == 1
        assert len({point.guidance_enabled for point in batch}) == 1
    flattened = [point for batch in batches for point in batch]
    assert flattened == definition.points()


def test_hash_tracks_axes_not_key_order():
    first = build_definition(minimal_settings())
    same = build_definition(dict(reversed(list(minimal_settings().items()))))
    other = build_definition(minimal_settings(guidance_rescale="0,0.5"))
    assert first.sweep_hash() == same.sweep_hash()
    assert first.sweep_hash() != other.sweep_hash()


def test_prompts_csv_needs_id_column(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('id,prompt\nmug,"a red mug, studio light"\nvase,a vase\n')
    assert read_prompts_file(good) == (
        Prompt("mug", "a red mug, studio light"),
        Prompt("vase", "a vase"),
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("name,prompt\nmug,a mug\n")
    with pytest.raises(InvalidInputError) as error:
        read_prompts_file(bad)
    assert "id column" in str(error.value)


def test_prompt_ids_must_suit_file_names():
    with pytest.raises(InvalidInputError) as error:
        build_definition(minimal_settings(prompts=[{"id": "../x", "text": "a"}]))
    assert "not usable in file names" in str(error.value)


def test_sweep_file_values_stay_exact(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        '[model]\nid = "some/model"\n'
        '[axes]\nprompts = ["a red mug"]\nseeds = "0-1"\n'
        "guidance_scale = [5, 7.5]\nguidance_rescale = [0, 0.1, 0.3, 1.0]\n"
    )
    definition = build_definition(load_sweep_file(sweep))
    assert definition.guidance_scales == ("5", "7.5")
    assert definition.guidance_rescales == ("0", "0.1", "0.3", "1.0")


def test_sweep_file_rejects_unknown_key(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[axes]\nguidance_rescales = "0,1"\n')
    with pytest.raises(InvalidInputError) as error:
        load_sweep_file(sweep)
    assert "unknown key 'guidance_rescales'" in str(error.value)


@pytest.mark.parametrize(
    "path", sorted(SWEEPS_DIR.glob("*.toml")), ids=lambda p: p.name
)
def test_example_sweep_files_are_valid(path):
    definition = build_definition(load_sweep_file(path))
    assert definition.points()


# --- store ------------------------------------------------------------------------


def fake_row(point, **values):
    row = dict.fromkeys(RESULT_COLUMNS, "")
    row.update(
        point_id=point.point_id,
        prompt_id=point.prompt.prompt_id,
        prompt=point.prompt.text,
        seed=point.seed,
        guidance_scale=point.guidance_scale,
        guidance_rescale=point.guidance_rescale,
        threshold=point.threshold.label,
        image=point.image_name,
        finite=True,
    )
    row.update(values)
    return row


def test_store_drops_torn_final_line_and_resumes(tmp_path):
    definition = build_definition(minimal_settings())
    points = definition.points()
    store = SweepStore(tmp_path, definition)
    assert store.open(overwrite=False) == {}
    store.append(fake_row(points[0], saturated_fraction=0.25))
    store.append(fake_row(points[1], saturated_fraction=0.5))
    whole = (tmp_path / RESULTS_NAME).read_text()
    torn = format_row(fake_row(points[2]))[:30]
    (tmp_path / RESULTS_NAME).write_text(whole + torn)

    finished = SweepStore(tmp_path, definition).open(overwrite=False)
    assert sorted(finished) == sorted([points[0].point_id, points[1].point_id])
    assert (tmp_path / RESULTS_NAME).read_text() == whole
    assert finished[points[1].point_id]["saturated_fraction"] == "0.5"


def test_store_rejects_a_different_sweep(tmp_path):
    SweepStore(tmp_path, build_definition(minimal_settings())).open(overwrite=False)
    other = build_definition(minimal_settings(guidance_rescale="0,0.5"))
    with pytest.raises(InvalidInputError) as error:
        SweepStore(tmp_path, other).check(overwrite=False)
    assert "contains a different sweep" in str(error.value)
    assert "guidance_rescales" in str(error.value)
    assert SweepStore(tmp_path, other).open(overwrite=True) == {}


def test_store_rejects_folder_with_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    definition = build_definition(minimal_settings())
    with pytest.raises(InvalidInputError) as error:
        SweepStore(tmp_path, definition).check(overwrite=False)
    assert "contains no sweep.json" in str(error.value)
    SweepStore(tmp_path, definition).open(overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_store_reports_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as error:
        SweepStore(blocker / "sub", build_definition(minimal_settings())).check(False)
    assert "cannot create the folder" in str(error.value)


def test_rows_with_commas_and_quotes_round_trip(tmp_path):
    definition = build_definition(minimal_settings(prompts=['a "red" mug, on a table']))
    store = SweepStore(tmp_path, definition)
    store.open(overwrite=False)
    store.append(fake_row(definition.points()[0]))
    rows = read_results(tmp_path / RESULTS_NAME)
    assert rows[0]["prompt"] == 'a "red" mug, on a table'


# --- summary ----------------------------------------------------------------------


def test_describe_matches_hand_computed_t_interval():
    stats = describe([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == 2.5
    assert stats.std == pytest.approx(math.sqrt(5 / 3))
    # t(0.975, 3) = 3.182446305284263
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert stats.ci95_low == pytest.approx(2.5 - half, rel=1e-12)
    assert stats.ci95_high == pytest.approx(2.5 + half, rel=1e-12)
    single = describe([7.0])
    assert single.mean == 7.0
    assert math.isnan(single.ci95_low)


def summary_rows():
    # (scale, rescale, saturated, clip) per image, two seeds each.
    table = [
        ("9", "0", 0.10, 0.300),
        ("9", "0", 0.12, 0.302),
        ("9", "0.5", 0.05, 0.2995),
        ("9", "0.5", 0.05, 0.2995),
        ("9", "1.0", 0.01, 0.280),
        ("9", "1.0", 0.01, 0.282),
        ("5", "0", 0.02, 0.250),
        ("5", "0", 0.02, 0.250),
        ("5", "0.5", 0.01, 0.240),
        ("5", "0.5", 0.01, 0.240),
    ]
    return [
        {
            "guidance_scale": scale,
            "threshold": "off",
            "guidance_rescale": rescale,
            "saturated_fraction": repr(saturated),
            "clip_cosine_raw": repr(clip),
            "std_ratio": "1.2",
            "render_seconds": "0.5",
            "finite": "true",
        }
        for scale, rescale, saturated, clip in table
    ]


def test_summary_clip_change_and_recommendation():
    summaries = {
        (s.guidance_scale, s.guidance_rescale): s for s in summarise(summary_rows())
    }
    # rescale 0.5 at gs 9: (0.2995 - 0.301) / 0.301 = -0.498%, inside 0.5%.
    assert summaries[("9", "0.5")].clip_change_percent == pytest.approx(
        100 * (0.2995 - 0.301) / 0.301
    )
    assert summaries[("9", "0.5")].recommended
    assert not summaries[("9", "1.0")].recommended  # -6.5%: too much CLIP lost
    assert not summaries[("9", "0")].recommended
    # At gs 5 the 0.5 setting loses 4%, so rescale 0 stays the pick.
    assert summaries[("5", "0")].recommended
    assert summaries[("9", "0")].clip_change_percent == 0.0


def test_summary_keeps_non_finite_images_out_of_statistics():
    rows = summary_rows()
    rows[0]["finite"] = "false"
    rows[0]["saturated_fraction"] = "1.0"
    summaries = {(s.guidance_scale, s.guidance_rescale): s for s in summarise(rows)}
    assert summaries[("9", "0")].images == 2
    assert summaries[("9", "0")].metrics["saturated_fraction"].count == 1
    assert summaries[("9", "0")].metrics["saturated_fraction"].mean == 0.12


# --- plot and contact sheets ------------------------------------------------------


def test_plot_is_written_as_png(tmp_path):
    path = tmp_path / "plot.png"
    plot_saturation_vs_clip(summarise(summary_rows()), path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (800, 600)


def test_contact_sheet_places_cells_by_rescale_and_seed(tmp_path):
    colours = {("0", 0): (255, 0, 0), ("0", 1): (0, 255, 0), ("0.7", 0): (0, 0, 255)}
    cells = {}
    for key, colour in colours.items():
        path = tmp_path / f"{key[0]}_{key[1]}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        cells[key] = path
    sheet = np.asarray(contact_sheet(cells, ["0", "0.7"], [0, 1], "title"))
    found = {}
    for name, colour in {**colours, ("0.7", 1): MISSING_CELL}.items():
        mask = np.all(sheet == colour, axis=-1)
        ys, xs = np.nonzero(mask)
        assert mask.sum() == 32 * 32, f"{name}: {mask.sum()} pixels of {colour}"
        found[name] = (ys.min(), xs.min())
    assert found[("0", 0)][0] == found[("0", 1)][0]  # same row
    assert found[("0", 0)][1] == found[("0.7", 0)][1]  # same column
    assert found[("0.7", 0)][0] > found[("0", 0)][0]  # rescale 0.7 below 0
    assert found[("0", 1)][1] > found[("0", 0)][1]  # seed 1 right of seed 0


def test_contact_sheet_writes_note_under_each_cell(tmp_path):
    path = tmp_path / "cell.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)
    cells = {("0", 0): path, ("0.7", 0): path}
    plain = np.asarray(contact_sheet(cells, ["0", "0.7"], [0], "title"))
    notes = {("0", 0): "sat 12.5%", ("0.7", 0): ""}
    noted = np.asarray(contact_sheet(cells, ["0", "0.7"], [0], "title", notes))
    assert noted.shape[0] > plain.shape[0]

    red = np.all(noted == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    first_bottom = ys[ys < ys.min() + 32].max()
    below_first = noted[first_bottom + 1 : first_bottom + 16, xs.min() : xs.max() + 1]
    second_top = ys[ys > first_bottom + 1].min()
    below_second = noted[second_top + 32 : second_top + 46, xs.min() : xs.max() + 1]
    # Dark label pixels under the noted cell only.
    assert (below_first.max(axis=-1) < 100).sum() > 10
    assert (below_second.max(axis=-1) < 100).sum() == 0


def test_saturation_note_formats_percent():
    assert _saturation_note({"saturated_fraction": "0.1234"}) == "sat 12.3%"
    assert _saturation_note({"saturated_fraction": "0"}) == "sat 0.0%"
    assert _saturation_note({"saturated_fraction": "nan"}) == ""
    assert _saturation_note({"saturated_fraction": ""}) == ""


def test_results_csv_rows_parse_with_csv_module(tmp_path):
    definition = build_definition(minimal_settings())
    store = SweepStore(tmp_path, definition)
    store.open(overwrite=False)
    for point in definition.points():
        store.append(fake_row(point, saturated_fraction=0.1, clip_cosine_raw=0.3))
    with open(tmp_path / RESULTS_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(definition.points())
    assert Decimal(rows[0]["saturated_fraction"]) == Decimal("0.1")


def test_default_clip_tag_only_with_default_model():
    assert build_definition(minimal_settings()).clip_pretrained == "laion2b_s34b_b79k"
    local = build_definition(minimal_settings(clip_model="local-dir:/models/clip"))
    assert local.clip_pretrained is None
    given = build_definition(
        minimal_settings(clip_model="ViT-L-14", clip_pretrained="openai")
    )
    assert given.clip_pretrained == "openai"
