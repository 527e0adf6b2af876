"""score-vlm against a scripted chat completions server on 127.0.0.1.

Every CLI test passes the loopback server's URL; no test contacts any other host.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data
from typer.testing import CliRunner

import renderqa.core.vlm as vlm
from renderqa.cli.app import app
from renderqa.core.errors import InvalidInputError
from renderqa.core.vlm import ScoreSettings, score_images
from renderqa.core.vlm_client import (
    EndpointSettings,
    RateLimiter,
    RetryPolicy,
    retry_after_seconds,
)
from renderqa.core.vlm_redact import REDACTED, Redactor
from renderqa.core.vlm_request import encode_image
from renderqa.core.vlm_rubric import (
    DEFAULT_RUBRIC,
    VerdictError,
    load_rubric,
    parse_verdict,
    verdict_json_schema,
    verdict_model,
)
from tests.vlm_server import (
    VALID_VERDICT,
    Reply,
    ScriptedServer,
    chat_reply,
    error_reply,
    verdict_reply,
)

API_KEY = "sk-test-4f9c2e7a1b8d-do-not-leak"
FAST = ["--backoff", "0.001", "--concurrency", "1"]


@pytest.fixture
def server():
    with ScriptedServer() as scripted:
        yield scripted


@pytest.fixture
def renders(tmp_path: Path) -> list[Path]:
    """Three small distinct PNG renders."""
    paths = []
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        path = tmp_path / f"render{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def invoke(server: ScriptedServer, out: Path, *args: str, env: dict | None = None):
    """Run `renderqa score-vlm` against the scripted server with the test key."""
    environment = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": None}
    environment.update(env or {})
    command = ["score-vlm", "--base-url", server.base_url, "--out", str(out), *args]
    verbose = ["-v"] if "-v" in args else []
    if verbose:
        command.remove("-v")
    return CliRunner().invoke(app, verbose + command, env=environment)


def joined(output: str) -> str:
    """Return CLI output with Rich's line wrapping undone."""
    return " ".join(output.split())


def read_jsonl(out: Path) -> list[dict]:
    lines = (out / "verdicts.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_key_absent(out: Path, *texts: str) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(errors="replace"), path
    for text in texts:
        assert API_KEY not in text


# --- Valid verdicts and the request payload -------------------------------------


def test_valid_verdicts_written_per_image(server, renders, tmp_path):
    out = tmp_path / "out"
    result = invoke(server, out, *map(str, renders), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [row["image"] for row in rows] == [str(p) for p in renders]
    for row in rows:
        assert row["status"] == "ok"
        assert row["model"] == "vlm-a"
        assert row["verdict"] == VALID_VERDICT
        assert row["attempts"] == 1
        assert row["prompt_tokens"] == 100
    csv_lines = (out / "verdicts.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(renders)
    assert csv_lines[1].split(",")[3:6] == ["ok", "pass", "5"]
    assert "scored 3, skipped 0" in result.output
    summary_row = next(line for line in result.output.splitlines() if "vlm-a" in line)
    assert "100%" in summary_row
    assert "300" in summary_row  # prompt tokens: 3 x 100


def test_payload_media_type_comes_from_bytes(server, tmp_path):
    # JPEG bytes behind a .png name: the data URI must declare image/jpeg.
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(photo, format="JPEG")
    out = tmp_path / "out"

    result = invoke(server, out, str(photo), "-m", "vlm-a", "--max-side", "200", *FAST)

    assert result.exit_code == 0, result.output
    (request,) = server.chat_requests()
    ((media_type, payload),) = request.images()
    assert media_type == "image/jpeg"
    sent = Image.open(io.BytesIO(payload))
    assert sent.format == "JPEG"
    # chelsea is 451 x 300; the long side goes to 200 and the short side follows.
    assert sent.size == (200, 133)
    row = read_jsonl(out)[0]
    assert (row["sent_width"], row["sent_height"]) == (200, 133)


def test_payload_small_png_sent_unchanged(server, renders, tmp_path):
    result = invoke(server, tmp_path / "out", str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    (request,) = server.chat_requests()
    ((media_type, payload),) = request.images()
    assert media_type == "image/png"
    assert payload == renders[0].read_bytes()


def test_payload_structure_and_headers(server, renders, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(skimage_data.astronaut()).save(source)
    result = invoke(
        server,
        tmp_path / "out",
        str(renders[0]),
        "-m",
        "vlm-a",
        "--source",
        str(source),
        "--dim",
        "team=render-qa",
        "--max-side",
        "256",
        *FAST,
    )

    assert result.exit_code == 0, result.output
    (request,) = server.chat_requests()
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["x-bf-dim-team"] == "render-qa"
    response_format = request.body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"] == verdict_json_schema(
        DEFAULT_RUBRIC
    )
    images = request.images()
    assert len(images) == 2
    source_sent = Image.open(io.BytesIO(images[1][1]))
    assert source_sent.size == (256, 256)
    assert request.body["messages"][0]["role"] == "system"


# --- Faults and retries ----------------------------------------------------------


def test_429_with_retry_after_then_success(server, renders, tmp_path):
    server.script(error_reply(429, "slow down", headers={"retry-after": "0"}))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["attempts"] == 2


def run_core(server, images, out, retry, sleeps, **settings):
    """Run score_images directly with a sleep that records delays and returns."""

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    endpoint = EndpointSettings(
        base_url=server.base_url,
        api_key=API_KEY,
        concurrency=1,
        **settings.pop("endpoint", {}),
    )
    score = ScoreSettings(
        models=settings.pop("models", ("vlm-a",)),
        mode=settings.pop("mode", "fallback"),
        rubric=DEFAULT_RUBRIC,
        out_dir=out,
    )
    return score_images(
        images, score, endpoint, retry, sleep=record_sleep, rng=random.Random(0)
    )


@pytest.mark.parametrize(
    ("headers", "expected_wait"),
    [
        ({"retry-after-ms": "1250"}, 1.25),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "400", "retry-after": "9"}, 0.4),
    ],
)
def test_retry_waits_what_server_asks(
    server, renders, tmp_path, headers, expected_wait
):
    server.script(error_reply(429, "rate limited", headers=headers))
    sleeps: list[float] = []

    report = run_core(server, renders[:1], tmp_path / "out", RetryPolicy(), sleeps)

    assert sleeps == [expected_wait]
    assert report.rows[0]["status"] == "ok"


def test_retry_after_above_limit_fails_without_retry(server, renders, tmp_path):
    server.script(error_reply(429, "quota", headers={"retry-after": "3600"}))
    sleeps: list[float] = []
    retry = RetryPolicy(max_wait=60)

    report = run_core(server, renders[:1], tmp_path / "out", retry, sleeps)

    assert sleeps == []
    assert len(server.chat_requests()) == 1
    row = report.rows[0]
    assert row["status"] == "error"
    assert "3600 s" in row["error"]


def test_backoff_grows_exponentially_with_jitter(server, renders, tmp_path):
    server.default = error_reply(503, "overloaded")
    sleeps: list[float] = []
    retry = RetryPolicy(max_retries=4, backoff=1.0, max_backoff=30.0)

    report = run_core(server, renders[:1], tmp_path / "out", retry, sleeps)

    assert len(server.chat_requests()) == 5
    assert len(sleeps) == 4
    for retry_index, delay in enumerate(sleeps):
        full = 2.0**retry_index
        assert full / 2 <= delay <= full, (retry_index, delay)
    row = report.rows[0]
    assert row["status"] == "error"
    assert row["error_kind"] == "http"
    assert row["attempts"] == 5


def test_500_then_success(server, renders, tmp_path):
    server.script(error_reply(500, "upstream broke"))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["attempts"] == 2


def test_persistent_500_stops_at_retry_limit(server, renders, tmp_path):
    server.default = error_reply(500, "down")
    out = tmp_path / "out"

    result = invoke(
        server, out, str(renders[0]), "-m", "vlm-a", "--max-retries", "2", *FAST
    )

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 3
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["verdict"] is None
    assert row["attempts"] == 3
    assert "HTTP 500" in row["error"]
    assert "no valid verdict" in joined(result.output)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_not_retried(server, renders, tmp_path, status):
    server.default = error_reply(status, "bad request")
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 1
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert f"HTTP {status}" in row["error"]


def test_slow_response_times_out(server, renders, tmp_path):
    server.default = verdict_reply(delay=2.0)
    out = tmp_path / "out"

    result = invoke(
        server,
        out,
        str(renders[0]),
        "-m",
        "vlm-a",
        "--read-timeout",
        "0.2",
        "--max-retries",
        "1",
        *FAST,
    )

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["error_kind"] == "timeout"
    assert row["verdict"] is None


def test_dropped_connection_retried(server, renders, tmp_path):
    server.script(Reply(drop=True))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["attempts"] == 2


def test_dropped_connection_every_time_is_error_row(server, renders, tmp_path):
    server.default = Reply(drop=True)
    out = tmp_path / "out"

    result = invoke(
        server, out, str(renders[0]), "-m", "vlm-a", "--max-retries", "1", *FAST
    )

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["error_kind"] == "dropped"


# --- Replies that are not valid verdicts ---------------------------------------


def test_fenced_json_accepted(server, renders, tmp_path):
    fenced = "Here is my verdict:\n```json\n" + json.dumps(VALID_VERDICT) + "\n```"
    server.script(chat_reply(fenced))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    assert len(server.chat_requests()) == 1
    (row,) = read_jsonl(out)
    assert row["verdict"] == VALID_VERDICT
    assert row["repaired"] is False


def test_prose_reply_repaired_once(server, renders, tmp_path):
    server.script(chat_reply("The render looks fine to me."))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    first, repair = server.chat_requests()
    assert len(repair.body["messages"]) == len(first.body["messages"]) + 2
    assert repair.body["messages"][-2] == {
        "role": "assistant",
        "content": "The render looks fine to me.",
    }
    assert "not JSON" in repair.body["messages"][-1]["content"]
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["repaired"] is True


def test_prose_twice_becomes_error_row(server, renders, tmp_path):
    server.default = chat_reply("Looks good!")
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["error_kind"] == "invalid_verdict"
    assert row["verdict"] is None


@pytest.mark.parametrize(
    ("verdict", "problem"),
    [
        ({**VALID_VERDICT, "score": 7}, "score"),
        ({**VALID_VERDICT, "score": "5"}, "score"),
        ({**VALID_VERDICT, "overall": "maybe"}, "overall"),
        ({k: v for k, v in VALID_VERDICT.items() if k != "notes"}, "notes"),
        ({**VALID_VERDICT, "confidence": 0.9}, "confidence"),
        (
            {**VALID_VERDICT, "clipped_edges": {"found": "no", "detail": ""}},
            "clipped_edges.found",
        ),
    ],
)
def test_schema_violation_becomes_error_row(
    server, renders, tmp_path, verdict, problem
):
    server.default = chat_reply(json.dumps(verdict))
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["error_kind"] == "invalid_verdict"
    assert problem in row["error"]


def test_length_finish_is_truncated_error(server, renders, tmp_path):
    # Even a reply that parses is not trusted when the model hit the token limit.
    server.default = chat_reply(json.dumps(VALID_VERDICT), finish_reason="length")
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", *FAST)

    assert result.exit_code == 3
    assert len(server.chat_requests()) == 2
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["error_kind"] == "truncated"
    assert row["finish_reason"] == "length"


# --- Key rejected, async gateway, modes -----------------------------------------


def test_401_stops_run_without_leaking_key(server, renders, tmp_path):
    server.default = error_reply(401, f"Incorrect API key provided: {API_KEY}")
    out = tmp_path / "out"

    result = invoke(server, out, *map(str, renders), "-m", "vlm-a", "-v", *FAST)

    assert result.exit_code == 3
    assert "rejected the API key" in joined(result.output)
    assert "Traceback" not in result.output
    assert len(server.chat_requests()) == 1
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert row["error_kind"] == "stopped"
    assert row["attempts"] == 1
    assert_key_absent(out, result.output)


def test_rerun_after_401_resumes(server, renders, tmp_path):
    out = tmp_path / "out"
    server.script(error_reply(401, "invalid key"))
    first = invoke(server, out, *map(str, renders), "-m", "vlm-a", *FAST)
    assert first.exit_code == 3

    second = invoke(server, out, *map(str, renders), "-m", "vlm-a", *FAST)

    assert second.exit_code == 0, second.output
    assert len(server.chat_requests()) == 1 + len(renders)
    csv_lines = (out / "verdicts.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(renders)
    assert all(",ok,pass," in line for line in csv_lines[1:])


def test_async_gateway_submit_and_poll(server, renders, tmp_path):
    server.default = Reply(
        body=verdict_reply(overall="fail", score=2).body, pending_polls=2
    )
    out = tmp_path / "out"

    result = invoke(
        server,
        out,
        str(renders[0]),
        "-m",
        "vlm-a",
        "--async",
        "--poll-interval",
        "0",
        *FAST,
    )

    assert result.exit_code == 0, result.output
    methods = [(request.method, request.path) for request in server.requests]
    assert methods == [
        ("POST", "/v1/async/chat/completions"),
        ("GET", "/v1/async/chat/completions/job-1"),
        ("GET", "/v1/async/chat/completions/job-1"),
        ("GET", "/v1/async/chat/completions/job-1"),
    ]
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["attempts"] == 1
    assert row["verdict"]["overall"] == "fail"
    assert row["verdict"]["score"] == 2


def test_fallback_tries_next_model(server, renders, tmp_path):
    server.script(error_reply(404, "model vlm-a not found"), model="vlm-a")
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", "-m", "vlm-b", *FAST)

    assert result.exit_code == 0, result.output
    assert [r.model for r in server.chat_requests()] == ["vlm-a", "vlm-b"]
    (row,) = read_jsonl(out)
    assert row["status"] == "ok"
    assert row["model"] == "vlm-b"
    assert row["models_tried"] == ["vlm-a", "vlm-b"]


def test_fallback_all_fail_is_one_error_row(server, renders, tmp_path):
    server.default = error_reply(404, "no such model")
    out = tmp_path / "out"

    result = invoke(server, out, str(renders[0]), "-m", "vlm-a", "-m", "vlm-b", *FAST)

    assert result.exit_code == 3
    (row,) = read_jsonl(out)
    assert row["status"] == "error"
    assert "vlm-a: HTTP 404" in row["error"]
    assert "vlm-b: HTTP 404" in row["error"]


def read_panel(out: Path) -> dict[str, dict[str, str]]:
    lines = (out / "panel.csv").read_text().splitlines()
    header = lines[0].split(",")
    return {
        line.split(",")[0]: dict(zip(header, line.split(","), strict=True))
        for line in lines[1:]
    }


def test_panel_majority_mean_and_disagreement(server, renders, tmp_path):
    server.default = verdict_reply(overall="pass", score=5)
    server.script(verdict_reply(overall="fail", score=2), model="vlm-b")
    server.script(verdict_reply(overall="pass", score=4), model="vlm-c")
    out = tmp_path / "out"
    models = ["-m", "vlm-a", "-m", "vlm-b", "-m", "vlm-c"]

    result = invoke(server, out, str(renders[0]), *models, "--mode", "panel", *FAST)

    assert result.exit_code == 0, result.output
    panel = read_panel(out)[str(renders[0])]
    assert panel["overall"] == "pass"
    assert panel["pass_votes"] == "2"
    assert panel["fail_votes"] == "1"
    assert float(panel["mean_score"]) == pytest.approx(11 / 3, abs=1e-3)
    assert panel["disagreement"] == "true"
    assert len(read_jsonl(out)) == 3


def test_panel_error_rows_stay_out_of_aggregate(server, renders, tmp_path):
    server.default = verdict_reply(overall="pass", score=4)
    server.script(verdict_reply(overall="fail", score=3), model="vlm-b")
    # vlm-c is cut off twice; its row is an error and gets no vote.
    truncated = chat_reply('{"overall": "pa', finish_reason="length")
    server.script(truncated, truncated, model="vlm-c")
    out = tmp_path / "out"
    models = ["-m", "vlm-a", "-m", "vlm-b", "-m", "vlm-c"]

    result = invoke(server, out, str(renders[0]), *models, "--mode", "panel", *FAST)

    assert result.exit_code == 3
    panel = read_panel(out)[str(renders[0])]
    assert panel["overall"] == "tie"
    assert panel["verdicts"] == "2"
    assert panel["errors"] == "1"
    assert float(panel["mean_score"]) == pytest.approx(3.5)
    assert panel["disagreement"] == "true"


def test_panel_encodes_each_image_once(server, renders, tmp_path, monkeypatch):
    encoded_paths = []

    def counting_encode(path, max_side):
        encoded_paths.append(str(path))
        return encode_image(path, max_side)

    monkeypatch.setattr(vlm, "encode_image", counting_encode)
    models = ("vlm-a", "vlm-b", "vlm-c")

    report = run_core(
        server,
        renders[:2],
        tmp_path / "out",
        RetryPolicy(),
        [],
        models=models,
        mode="panel",
    )

    assert sorted(encoded_paths) == sorted(str(p) for p in renders[:2])
    assert len(server.chat_requests()) == 6
    assert all(row["status"] == "ok" for row in report.rows)


def test_concurrency_bounds_requests_in_flight(server, tmp_path):
    paths = []
    for index in range(6):
        path = tmp_path / f"r{index}.png"
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(path)
        paths.append(path)
    server.default = verdict_reply(delay=0.3)
    out = tmp_path / "out"

    result = invoke(server, out, *map(str, paths), "-m", "vlm-a", "--concurrency", "2")

    assert result.exit_code == 0, result.output
    assert server.max_in_flight == 2
    assert len(read_jsonl(out)) == 6


def test_rpm_limit_delays_request_starts(server, renders, tmp_path):
    sleeps: list[float] = []
    endpoint = {"requests_per_minute": 6}

    run_core(
        server, renders, tmp_path / "out", RetryPolicy(), sleeps, endpoint=endpoint
    )

    # The recording sleep returns at once, so each start waits one 10 s interval
    # more than the one before, less the little real time that passed.
    assert sleeps == pytest.approx([10.0, 20.0], abs=1.0)
    assert len(server.chat_requests()) == 3


def test_rate_limiter_spaces_request_starts():
    now = [100.0]
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    limiter = RateLimiter(600, sleep=fake_sleep, clock=lambda: now[0])

    async def three_requests() -> None:
        await limiter.wait()
        await limiter.wait()
        now[0] += 0.05
        await limiter.wait()

    asyncio.run(three_requests())
    assert sleeps == pytest.approx([0.1, 0.15])


# --- Resume ----------------------------------------------------------------------


def test_rerun_skips_finished_pairs(server, renders, tmp_path):
    out = tmp_path / "out"
    args = [*map(str, renders), "-m", "vlm-a", *FAST]
    assert invoke(server, out, *args).exit_code == 0

    again = invoke(server, out, *args)

    assert again.exit_code == 0, again.output
    assert len(server.chat_requests()) == len(renders)
    assert "scored 0, skipped 3" in again.output
    assert len(read_jsonl(out)) == len(renders)


def test_rerun_rescores_changed_image_and_errors(server, renders, tmp_path):
    out = tmp_path / "out"
    server.script(error_reply(400, "bad"), image_sha256=_sha(renders[1]))
    args = [*map(str, renders), "-m", "vlm-a", *FAST]
    assert invoke(server, out, *args).exit_code == 3
    Image.new("RGB", (20, 20), "white").save(renders[0])

    again = invoke(server, out, *args)

    assert again.exit_code == 0, again.output
    assert len(server.chat_requests()) == len(renders) + 2
    assert "scored 2, skipped 1" in again.output


def test_rerun_ignores_cut_off_last_line(server, renders, tmp_path):
    out = tmp_path / "out"
    args = [str(renders[0]), "-m", "vlm-a", *FAST]
    assert invoke(server, out, *args).exit_code == 0
    with open(out / "verdicts.jsonl", "a") as handle:
        handle.write('{"image": "half a row')

    again = invoke(server, out, str(renders[1]), "-m", "vlm-a", *FAST)

    assert again.exit_code == 0, again.output
    assert len(server.chat_requests()) == 2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Bad input -------------------------------------------------------------------


def test_unreachable_endpoint_one_clear_line(renders, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "score-vlm",
            str(renders[0]),
            "-m",
            "vlm-a",
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--out",
            str(out),
            "--max-retries",
            "1",
            *FAST,
        ],
        env={"OPENAI_API_KEY": API_KEY},
    )

    assert result.exit_code == 3
    assert "cannot connect to http://127.0.0.1" in joined(result.output)
    assert "Traceback" not in result.output
    (row,) = read_jsonl(out)
    assert row["error_kind"] == "stopped"
    assert row["attempts"] == 2
    assert_key_absent(out, result.output)


def test_missing_key_rejected_before_requests(server, renders, tmp_path):
    result = invoke(
        server,
        tmp_path / "out",
        str(renders[0]),
        "-m",
        "vlm-a",
        env={"OPENAI_API_KEY": None},
    )

    assert result.exit_code == 2
    assert "OPENAI_API_KEY is not set" in joined(result.output)
    assert server.requests == []


def test_missing_base_url_contacts_nothing(renders, tmp_path):
    result = CliRunner().invoke(
        app,
        ["score-vlm", str(renders[0]), "-m", "vlm-a", "--out", str(tmp_path)],
        env={"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": None},
    )

    assert result.exit_code == 2
    assert "no endpoint configured" in joined(result.output)


def test_unreadable_image_others_still_scored(server, renders, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"

    result = invoke(
        server, out, str(renders[0]), str(broken), str(renders[1]), "-m", "vlm-a", *FAST
    )

    assert result.exit_code == 2
    assert "1 image(s) could not be read" in joined(result.output)
    assert len(server.chat_requests()) == 2
    rows = {row["image"]: row for row in read_jsonl(out)}
    assert rows[str(broken)]["error_kind"] == "image"
    assert rows[str(renders[0])]["status"] == "ok"
    assert rows[str(renders[1])]["status"] == "ok"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "instructions = [", "invalid TOML"),
        ("bad.json", '{"instructions": "x"}', "'criteria' must be"),
        (
            "bad.json",
            '{"instructions": "x", "criteria": [{"name": "Bad Name", "question": "?"}]}',
            "snake_case",
        ),
        (
            "bad.json",
            '{"instructions": "x", "criteria": [{"name": "score", "question": "?"}]}',
            "reserved",
        ),
    ],
)
def test_malformed_rubric_rejected(server, renders, tmp_path, name, text, message):
    rubric = tmp_path / name
    rubric.write_text(text)

    result = invoke(
        server,
        tmp_path / "out",
        str(renders[0]),
        "-m",
        "vlm-a",
        "--rubric",
        str(rubric),
    )

    assert result.exit_code == 2
    assert f"--rubric {rubric}" in joined(result.output)
    assert message in joined(result.output)
    assert server.requests == []


def test_unknown_mode_lists_modes(server, renders, tmp_path):
    result = invoke(
        server, tmp_path / "out", str(renders[0]), "-m", "vlm-a", "--mode", "vote"
    )

    assert result.exit_code == 2
    assert "--mode 'vote' is not a mode" in joined(result.output)
    assert "fallback, panel" in joined(result.output)
    assert server.requests == []


def test_unreadable_source_stops_before_requests(server, renders, tmp_path):
    source = tmp_path / "source.png"
    source.write_bytes(b"")

    result = invoke(
        server,
        tmp_path / "out",
        str(renders[0]),
        "-m",
        "vlm-a",
        "--source",
        str(source),
    )

    assert result.exit_code == 2
    assert f"--source {source}: file is empty" in joined(result.output)
    assert server.requests == []


def test_folder_argument_scores_its_images(server, renders, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    result = invoke(server, out, str(tmp_path), "-m", "vlm-a", *FAST)

    assert result.exit_code == 0, result.output
    assert sorted(row["image"] for row in read_jsonl(out)) == [str(p) for p in renders]


def test_custom_rubric_sets_schema_and_columns(server, renders, tmp_path):
    rubric = tmp_path / "rubric.toml"
    rubric.write_text(
        'instructions = "Judge the label."\n'
        '[[criteria]]\nname = "label_text"\nquestion = "Is the label text garbled?"\n'
    )
    reply = {
        "label_text": {"found": True, "detail": "letters melt"},
        "overall": "fail",
        "score": 2,
        "notes": "",
    }
    server.default = chat_reply(json.dumps(reply))
    out = tmp_path / "out"

    result = invoke(
        server, out, str(renders[0]), "-m", "vlm-a", "--rubric", str(rubric), *FAST
    )

    assert result.exit_code == 0, result.output
    schema = server.chat_requests()[0].body["response_format"]["json_schema"]
    assert schema["schema"]["required"] == ["label_text", "overall", "score", "notes"]
    header, line = (out / "verdicts.csv").read_text().splitlines()
    assert "label_text,label_text_detail" in header
    assert ",fail,2,true,letters melt," in line


# --- Redaction --------------------------------------------------------------------


def test_key_absent_from_every_output_and_log(server, renders, tmp_path):
    # The server echoes the key in an error body and in a verdict's notes.
    server.script(error_reply(500, f"key {API_KEY} overloaded"))
    server.script(verdict_reply(notes=f"saw {API_KEY}"))
    server.default = error_reply(400, f"bad request for key {API_KEY}")
    out = tmp_path / "out"

    result = invoke(
        server,
        out,
        *map(str, renders),
        "-m",
        "vlm-a",
        "-v",
        "--base-url",
        server.base_url + f"?key={API_KEY}",
        *FAST,
    )

    assert result.exit_code == 3
    assert "request POST" in result.output
    assert "base64 characters>" in result.output
    assert REDACTED in result.output
    # The query parameter still reaches the server; only what is written is redacted.
    assert server.chat_requests()[0].path == "/v1/chat/completions"
    assert server.chat_requests()[0].query == f"key={API_KEY}"
    assert_key_absent(out, result.output)


def test_redactor_keeps_json_valid():
    redactor = Redactor([])
    text = json.dumps({"error": "GET /v1?key=abc", "next": "kept"})
    assert json.loads(redactor.text(text)) == {
        "error": f"GET /v1?key={REDACTED}",
        "next": "kept",
    }


def test_redactor_headers_and_query():
    redactor = Redactor([API_KEY])
    headers = redactor.headers(
        {"Authorization": "Bearer x", "x-api-key": "y", "API-Key": "z", "Accept": "a"}
    )
    assert headers == {
        "Authorization": REDACTED,
        "x-api-key": REDACTED,
        "API-Key": REDACTED,
        "Accept": "a",
    }
    url = redactor.text("http://127.0.0.1/v1?key=abc123&x=1")
    assert url == f"http://127.0.0.1/v1?key={REDACTED}&x=1"
    assert redactor.text(f"echo {API_KEY}!") == f"echo {REDACTED}!"


# --- Units -----------------------------------------------------------------------


def test_retry_after_parses_seconds_ms_and_date():
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(httpx.Headers({"retry-after": "7"})) == 7.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({})) is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    wait = retry_after_seconds(
        httpx.Headers({"retry-after": format_datetime(later, usegmt=True)})
    )
    assert 25 <= wait <= 30


def test_schema_is_strict_compatible():
    schema = verdict_json_schema(DEFAULT_RUBRIC)
    objects = [schema, *(schema["properties"][c.name] for c in DEFAULT_RUBRIC.criteria)]
    for node in objects:
        assert node["additionalProperties"] is False
        assert node["required"] == list(node["properties"])
    assert schema["properties"]["score"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 5,
    }


def test_parse_verdict_accepts_bare_and_fenced():
    model = verdict_model(DEFAULT_RUBRIC)
    bare = json.dumps(VALID_VERDICT)
    assert parse_verdict(bare, model) == VALID_VERDICT
    assert parse_verdict(f"```\n{bare}\n```", model) == VALID_VERDICT
    with pytest.raises(VerdictError, match="empty"):
        parse_verdict("", model)
    with pytest.raises(VerdictError, match="score"):
        parse_verdict(json.dumps({**VALID_VERDICT, "score": 0}), model)
    with pytest.raises(VerdictError, match="score"):
        parse_verdict(json.dumps({**VALID_VERDICT, "score": True}), model)


def test_load_rubric_reads_json(tmp_path):
    path = tmp_path / "rubric.json"
    path.write_text(
        json.dumps(
            {
                "instructions": "Judge.",
                "criteria": [{"name": "halo", "question": "Is there a halo?"}],
            }
        )
    )
    rubric = load_rubric(path)
    assert [c.name for c in rubric.criteria] == ["halo"]
    assert rubric.sha256 != DEFAULT_RUBRIC.sha256
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_rubric(tmp_path / "missing.json")


def test_encode_image_reencodes_16_bit_and_bmp(tmp_path):
    camera = skimage_data.camera().astype(np.uint16) * 257
    path16 = tmp_path / "camera16.png"
    Image.fromarray(camera).save(path16)
    encoded = encode_image(path16, max_side=256)
    sent = np.asarray(Image.open(io.BytesIO(encoded.data)))
    assert encoded.media_type == "image/png"
    assert sent.shape == (256, 256)
    # Scaled down from 16 bits, not clipped at 255: the mean stays that of the photo.
    assert abs(sent.mean() - skimage_data.camera()[::2, ::2].mean()) < 3

    bmp = tmp_path / "coins.bmp"
    Image.fromarray(skimage_data.coins()).save(bmp)
    encoded = encode_image(bmp, max_side=2048)
    assert encoded.media_type == "image/png"
    assert base64.b64decode(encoded.data_uri.split(",", 1)[1])[:4] == b"\x89PNG"
