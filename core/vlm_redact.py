"""Keeping API keys out of logs, error messages, request dumps and output files.

Headers and URLs are redacted by name: `Authorization`, `x-api-key`, `api-key`
and a `key` query parameter. Every string that leaves the client is also scrubbed
of the literal secret values, because servers sometimes echo the key back in an
error body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

REDACTED = "[redacted]"
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})
# The value stops at quotes and backslashes too, so redacting JSON text keeps it valid.
_KEY_QUERY = re.compile(r"([?&](?:api[-_]?)?key=)[^&#\s\"'\\]*", re.IGNORECASE)
# Keys shorter than this are too likely to occur inside ordinary words.
MIN_SECRET_LENGTH = 4


class Redactor:
    """Replaces the given secret values and key-shaped fields with a marker."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted(
            {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH},
            key=len,
            reverse=True,
        )

    def text(self, text: str) -> str:
        """Return `text` with each secret value and `?key=` value replaced."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return _KEY_QUERY.sub(rf"\g<1>{REDACTED}", text)

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Return a copy of `headers` with secret headers and values redacted."""
        return {
            name: REDACTED if name.lower() in SECRET_HEADERS else self.text(value)
            for name, value in headers.items()
        }


class RedactingFilter(logging.Filter):
    """Logging filter that scrubs secrets from each record's rendered message.

    Attach it to handlers (not loggers), so records from every library logger that
    reach the handler pass through it.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redactor.text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
