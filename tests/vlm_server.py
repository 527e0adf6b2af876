"""A scripted chat completions server on 127.0.0.1 for the score-vlm tests.

The server records each request and sends the next `Reply` of the script: from
the queue for the request's image or model if one is set, else from the shared
queue, else the default reply. Replies can be delayed (in the handler's own thread, so other
requests are not blocked), drop the connection, or carry any status and headers.
The async API follows Bifrost's layout: POST /v1/async/chat/completions returns
202 with a job id, and GET /v1/async/chat/completions/{id} returns 202 for
`pending_polls` polls, then 200 with the job's result.

Run as a script (`python -m tests.vlm_server --latency 0.2`) it serves valid
verdicts after a fixed latency and prints its base URL, for the benchmark.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ASYNC_PREFIX = "/v1/async/chat/completions"
VALID_VERDICT = {
    "background_artifacts": {"found": False, "detail": "clean white backdrop"},
    "clipped_edges": {"found": False, "detail": "product fully in frame"},
    "colour_drift": {"found": False, "detail": "neutral colours"},
    "overall": "pass",
    "score": 5,
    "notes": "ready to ship",
}


@dataclass
class Reply:
    """The server's response to one request."""

    status: int = 200
    body: Any = None  # JSON-encoded unless bytes or str
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without sending a response
    pending_polls: int = 0  # for async submits: polls that return 202 before the result


def chat_reply(
    content: str | None,
    finish_reason: str = "stop",
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
    **reply_options: Any,
) -> Reply:
    """A 200 chat completion whose first choice has `content`."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return Reply(body=body, **reply_options)


def verdict_reply(**changes: Any) -> Reply:
    """A 200 chat completion whose content is VALID_VERDICT with `changes` applied."""
    delay = changes.pop("delay", 0.0)
    return chat_reply(json.dumps({**VALID_VERDICT, **changes}), delay=delay)


def error_reply(status: int, message: str, **reply_options: Any) -> Reply:
    """An OpenAI-style error body with `status`."""
    body = {"error": {"message": message, "type": "test_error"}}
    return Reply(status=status, body=body, **reply_options)


@dataclass
class RecordedRequest:
    """One request as received: method, path, query, headers and the parsed JSON body."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    received_at: float

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    def images(self) -> list[tuple[str, bytes]]:
        """Return (media type, decoded bytes) of every image_url part, in order."""
        found = []
        for message in self.body.get("messages", []):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                if part.get("type") != "image_url":
                    continue
                match = re.match(r"data:([^;]+);base64,(.*)$", part["image_url"]["url"])
                assert match, "image_url is not a base64 data URI"
                found.append((match.group(1), base64.b64decode(match.group(2))))
        return found

    def image_sha256(self) -> str:
        """Return the SHA-256 of the first image's bytes, to tell renders apart."""
        return hashlib.sha256(self.images()[0][1]).hexdigest()


class ScriptedServer:
    """The server, its script and its request log; use as a context manager."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or verdict_reply()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0  # max requests in progress at the same time
        self._queue: deque[Reply] = deque()
        self._model_queues: dict[str, deque[Reply]] = {}
        self._by_image: dict[str, deque[Reply]] = {}
        self._jobs: dict[str, list] = {}
        self._job_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(
        self, *replies: Reply, model: str | None = None, image_sha256: str | None = None
    ) -> None:
        """Queue replies for any request, for one model, or for one image's bytes."""
        with self._lock:
            if image_sha256 is not None:
                queue = self._by_image.setdefault(image_sha256, deque())
            elif model is not None:
                queue = self._model_queues.setdefault(model, deque())
            else:
                queue = self._queue
            queue.extend(replies)

    def chat_requests(self) -> list[RecordedRequest]:
        """Return the POSTs of chat completions (sync or async), in arrival order."""
        return [r for r in self.requests if r.method == "POST"]

    def count_in_flight(self, change: int) -> None:
        with self._lock:
            self.in_flight += change
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if request.method == "GET":
                return self._poll(request.path)
            queues = []
            if self._by_image and request.images():
                queues.append(self._by_image.get(request.image_sha256()))
            queues += [self._model_queues.get(request.model), self._queue]
            reply = next((q.popleft() for q in queues if q), self.default)
            if request.path == ASYNC_PREFIX and reply.status == 200 and not reply.drop:
                job_id = f"job-{next(self._job_ids)}"
                self._jobs[job_id] = [reply, reply.pending_polls]
                return Reply(status=202, body={"id": job_id, "status": "pending"})
            return reply

    def _poll(self, path: str) -> Reply:
        job_id = path.rsplit("/", 1)[-1]
        if not path.startswith(ASYNC_PREFIX + "/") or job_id not in self._jobs:
            return error_reply(404, f"job {job_id} not found or expired")
        job = self._jobs[job_id]
        if job[1] > 0:
            job[1] -= 1
            return Reply(status=202, body={"id": job_id, "status": "processing"})
        result = job[0].body
        return Reply(
            body={
                "id": job_id,
                "status": "completed",
                "status_code": 200,
                "result": result,
            }
        )


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 resets connections when 16 clients connect
    # at once.
    request_queue_size = 128


def _make_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The headers and the body go out in two writes. With Nagle's algorithm on,
        # the body waits for the client's delayed ACK of the headers on each
        # kept-alive request. asyncio's TCP transports set TCP_NODELAY on every
        # connection, so this stand-in does too.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = RecordedRequest(
                method=self.command,
                path=urllib.parse.urlsplit(self.path).path,
                query=urllib.parse.urlsplit(self.path).query,
                headers=dict(self.headers.items()),
                body=json.loads(raw) if raw else None,
                received_at=time.monotonic(),
            )
            reply = server.next_reply(request)
            server.count_in_flight(+1)
            try:
                self._send_reply(reply)
            finally:
                server.count_in_flight(-1)

        def _send_reply(self, reply: Reply) -> None:
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if isinstance(reply.body, bytes):
                payload = reply.body
            elif isinstance(reply.body, str):
                payload = reply.body.encode()
            else:
                payload = json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                # The client closed the connection after its read timeout.
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve valid verdicts on 127.0.0.1.")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per reply")
    args = parser.parse_args()
    with ScriptedServer(default=verdict_reply(delay=args.latency)) as server:
        print(server.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
