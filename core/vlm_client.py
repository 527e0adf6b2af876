"""An async chat completions client for OpenAI-compatible endpoints, with one retry layer.

This module is the only retry layer: httpx's transport is built with `retries=0`.
429 and 5xx responses, timeouts and dropped connections are retried with
exponential backoff and jitter, honouring `retry-after-ms` and `retry-after`.
400, 403, 404 and other 4xx responses are not retried. A 401 raises
KeyRejectedError and a connection that cannot be opened after every retry raises
EndpointUnreachableError, both of which stop the whole run.

With `use_async`, requests go to a gateway's async API (Bifrost's layout):
POST `{base}/async/chat/completions` returns 202 and a job `id`, then
GET `{base}/async/chat/completions/{id}` returns 202 while the job is pending or
processing and 200 with `status` "completed" (and `result`) or "failed".
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from renderqa.core.errors import RemoteError
from renderqa.core.vlm_redact import Redactor

logger = logging.getLogger(__name__)

NOT_RETRIED = frozenset({400, 401, 403, 404})
RETRIED_TRANSPORT_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
MAX_ERROR_TEXT = 300
MAX_DUMP_TEXT = 2000


class StopRunError(RemoteError):
    """A failure that every other request would hit too, so the run stops."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class KeyRejectedError(StopRunError):
    """The endpoint returned HTTP 401: the API key is missing, wrong or revoked."""


class EndpointUnreachableError(StopRunError):
    """No connection to the endpoint could be opened, after every retry."""


class CallError(Exception):
    """A request that failed for one image and model; the run goes on.

    `kind` is one of "http", "timeout", "dropped", "bad_response", "job_failed".
    """

    def __init__(
        self, kind: str, message: str, attempts: int, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.attempts = attempts


@dataclass(frozen=True)
class EndpointSettings:
    """Endpoint URL, key, timeouts, limits and gateway options (times in seconds)."""

    base_url: str
    api_key: str
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    concurrency: int = 4
    requests_per_minute: float | None = None
    dims: dict[str, str] = field(default_factory=dict)
    use_async: bool = False
    poll_interval: float = 2.0
    async_timeout: float = 1800.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter; server hints above `max_wait` fail."""

    max_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_wait: float = 60.0

    def backoff_delay(self, retry: int, rng: random.Random) -> float:
        """Return the delay before retry number `retry` (0-based): d/2 + U(0, d/2)."""
        delay = min(self.max_backoff, self.backoff * 2**retry)
        return delay / 2 + rng.uniform(0, delay / 2)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Return the wait a server requests in `retry-after-ms` or `retry-after`.

    `retry-after` is either seconds or an HTTP date. Returns None without a
    readable hint.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class ChatResult:
    """The first choice of a chat completion, with usage and the attempts it took."""

    content: str | None
    finish_reason: str | None
    refusal: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int


class RateLimiter:
    """Spaces request starts at least 60 / `requests_per_minute` seconds apart."""

    def __init__(
        self,
        requests_per_minute: float | None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.sleep = sleep
        self.clock = clock
        self._next = 0.0

    async def wait(self) -> None:
        """Wait for this request's start slot; slots are handed out in call order."""
        if not self.interval:
            return
        # No await between reading and advancing `_next`, so concurrent callers
        # on one event loop each reserve their own slot.
        now = self.clock()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await self.sleep(start - now)


class ChatClient:
    """Sends chat completions requests; use as `async with ChatClient(...) as client`."""

    def __init__(
        self,
        settings: EndpointSettings,
        retry: RetryPolicy,
        redactor: Redactor,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.retry = retry
        self.redactor = redactor
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.rate_limiter = RateLimiter(settings.requests_per_minute, sleep)
        self.base_url = httpx.URL(settings.base_url)
        headers = {"Authorization": f"Bearer {settings.api_key}"}
        headers.update({f"x-bf-dim-{k}": v for k, v in settings.dims.items()})
        limits = httpx.Limits(
            max_connections=settings.concurrency,
            max_keepalive_connections=settings.concurrency,
        )
        timeout = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.read_timeout,
            # The caller bounds concurrency, so waiting for a pooled connection
            # is never what times out.
            pool=None,
        )
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=timeout,
            transport=transport or httpx.AsyncHTTPTransport(retries=0, limits=limits),
            follow_redirects=False,
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def complete(self, body: dict[str, Any]) -> ChatResult:
        """Send one chat completions request and return its first choice.

        Raises CallError for a failure of this request, KeyRejectedError and
        EndpointUnreachableError for failures that stop the run.
        """
        if self.settings.use_async:
            payload, attempts = await self._complete_async(body)
        else:
            url = self._url("chat/completions")
            response, attempts = await self._send("POST", url, body)
            payload = self._json(response, attempts)
        return _chat_result(payload, attempts, self.redactor)

    def _url(self, path: str) -> httpx.URL:
        """Append `path` to the base URL's path, keeping its query parameters."""
        return self.base_url.copy_with(path=f"{self.base_url.path.rstrip('/')}/{path}")

    async def _complete_async(self, body: dict[str, Any]) -> tuple[Any, int]:
        """Submit a job and poll it; return (chat completion, submit attempts)."""
        response, attempts = await self._send(
            "POST", self._url("async/chat/completions"), body
        )
        job = self._json(response, attempts)
        if response.status_code == 200 and isinstance(job, dict) and "choices" in job:
            # The server returned the completion synchronously; use it as is.
            return job, attempts
        job_id = job.get("id") if isinstance(job, dict) else None
        if response.status_code != 202 or not isinstance(job_id, str) or not job_id:
            raise CallError(
                "bad_response",
                f"async submit returned HTTP {response.status_code} without a job id; "
                "check that the gateway supports async requests",
                attempts,
                response.status_code,
            )

        # Polls have their own retries but are not counted as attempts, which
        # count submitted requests.
        poll_url = self._url(f"async/chat/completions/{job_id}")
        deadline = time.monotonic() + self.settings.async_timeout
        while True:
            await self.sleep(self.settings.poll_interval)
            response, _ = await self._send("GET", poll_url, None)
            job = self._json(response, attempts)
            if response.status_code == 200:
                result = _finished_job_result(job, job_id, attempts, self.redactor)
                return result, attempts
            if time.monotonic() > deadline:
                raise CallError(
                    "timeout",
                    f"async job {job_id} still not done after "
                    f"{self.settings.async_timeout:g} s",
                    attempts,
                )

    async def _send(
        self, method: str, url: httpx.URL, body: dict[str, Any] | None
    ) -> tuple[httpx.Response, int]:
        """Send one request with retries; return the 2xx response and attempts made."""
        for retry in range(self.retry.max_retries + 1):
            attempts = retry + 1
            if method == "POST":
                await self.rate_limiter.wait()
            self._dump_request(method, url, body)
            try:
                response = await self._http.request(method, url, json=body)
            except RETRIED_TRANSPORT_ERRORS as error:
                failure = self._transport_failure(error, url, attempts)
                delay = self.retry.backoff_delay(retry, self.rng)
            else:
                self._dump_response(response)
                if response.is_success:
                    return response, attempts
                failure = self._status_failure(response, attempts)
                delay = self._retry_delay(response, retry, failure)
            if delay is None or retry == self.retry.max_retries:
                raise failure
            logger.warning(
                "%s %s: %s; retry %d of %d in %.2f s",
                method,
                self.redactor.text(str(url)),
                failure,
                attempts,
                self.retry.max_retries,
                delay,
            )
            await self.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _transport_failure(
        self, error: Exception, url: httpx.URL, attempts: int
    ) -> Exception:
        detail = self.redactor.text(str(error) or type(error).__name__)
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            return EndpointUnreachableError(
                f"cannot connect to {self.redactor.text(str(url))} ({detail}) after "
                f"{attempts} attempt(s); check --base-url or OPENAI_BASE_URL",
                attempts,
            )
        if isinstance(error, httpx.TimeoutException):
            return CallError(
                "timeout",
                f"timed out after {self.settings.read_timeout:g} s read timeout "
                f"({attempts} attempt(s))",
                attempts,
            )
        return CallError(
            "dropped",
            f"connection dropped before a response ({detail}; {attempts} attempt(s))",
            attempts,
        )

    def _status_failure(self, response: httpx.Response, attempts: int) -> Exception:
        status = response.status_code
        detail = self.redactor.text(_error_text(response))
        if status == 401:
            return KeyRejectedError(
                f"the endpoint rejected the API key (HTTP 401: {detail}); check the "
                "key in the environment variable named by --api-key-env",
                attempts,
            )
        return CallError(
            "http", f"HTTP {status}: {detail} ({attempts} attempt(s))", attempts, status
        )

    def _retry_delay(
        self, response: httpx.Response, retry: int, failure: Exception
    ) -> float | None:
        status = response.status_code
        if status in NOT_RETRIED or not (status == 429 or status >= 500):
            return None
        hint = retry_after_seconds(response.headers)
        if hint is None:
            return self.retry.backoff_delay(retry, self.rng)
        if hint > self.retry.max_wait:
            if isinstance(failure, CallError):
                failure.args = (
                    f"{failure}; the server asked to retry after {hint:g} s, above "
                    f"the {self.retry.max_wait:g} s --max-retry-wait",
                )
            return None
        return hint

    def _json(self, response: httpx.Response, attempts: int) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CallError(
                "bad_response",
                f"HTTP {response.status_code} response body is not JSON",
                attempts,
                response.status_code,
            ) from None

    def _dump_request(
        self, method: str, url: httpx.URL, body: dict[str, Any] | None
    ) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        headers = self.redactor.headers(dict(self._http.headers))
        text = "" if body is None else json.dumps(_shorten_data_uris(body))
        logger.debug(
            "request %s %s headers=%s body=%s",
            method,
            self.redactor.text(str(url)),
            headers,
            self.redactor.text(text[:MAX_DUMP_TEXT]),
        )

    def _dump_response(self, response: httpx.Response) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        logger.debug(
            "response HTTP %d headers=%s body=%s",
            response.status_code,
            self.redactor.headers(dict(response.headers)),
            self.redactor.text(response.text[:MAX_DUMP_TEXT]),
        )


def _shorten_data_uris(value: Any) -> Any:
    """Replace base64 image payloads with their length, for readable request dumps."""
    if isinstance(value, dict):
        return {k: _shorten_data_uris(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten_data_uris(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value:
        head, payload = value.split(",", 1)
        return f"{head},<{len(payload)} base64 characters>"
    return value


def _error_text(response: httpx.Response) -> str:
    """Return the server's error message, from an OpenAI-style body if there is one."""
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:MAX_ERROR_TEXT].strip() or response.reason_phrase
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:MAX_ERROR_TEXT]
    if isinstance(error, str):
        return error[:MAX_ERROR_TEXT]
    return json.dumps(payload)[:MAX_ERROR_TEXT]


def _finished_job_result(
    job: Any, job_id: str, attempts: int, redactor: Redactor
) -> Any:
    status = job.get("status") if isinstance(job, dict) else None
    if status == "completed" and isinstance(job.get("result"), dict):
        return job["result"]
    error = job.get("error") if isinstance(job, dict) else None
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"].get("message", error)
    code = job.get("status_code") if isinstance(job, dict) else None
    raise CallError(
        "job_failed",
        redactor.text(
            f"async job {job_id} ended with status {status!r} "
            f"(HTTP {code}): {str(error)[:MAX_ERROR_TEXT]}"
        ),
        attempts,
        code if isinstance(code, int) else None,
    )


def _chat_result(payload: Any, attempts: int, redactor: Redactor) -> ChatResult:
    """Read the first choice of a chat completion; raise CallError if it has none."""
    try:
        choice = payload["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        text = redactor.text(json.dumps(payload)[:MAX_ERROR_TEXT])
        raise CallError(
            "bad_response", f"response has no choices[0].message: {text}", attempts
        ) from None
    content = message.get("content")
    if isinstance(content, list):
        # Some servers return content as parts, like the request's.
        content = "".join(
            part.get("text", "") for part in content if isinstance(part, dict)
        )
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return ChatResult(
        content=content if isinstance(content, str) else None,
        finish_reason=choice.get("finish_reason"),
        refusal=message.get("refusal"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        attempts=attempts,
    )
