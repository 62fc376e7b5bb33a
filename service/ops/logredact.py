"""Secrets out of request logs: query parameters whose *decoded* name says they hold a credential.

The dashboard accepts its token as `?token=` (a browser cannot send a header on a plain link), so an access
log line would record it. Matching the literal text `token=` is not enough: the web framework decodes
parameter names, so `?tok%65n=…` is the same parameter and authenticates all the same while a literal
match lets it through in clear. Names are therefore percent-decoded (repeatedly, so a double encoding
cannot hide one either) and compared case-insensitively before the value is replaced by `***`.
"""
from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

#: Decoded parameter names (lower case) whose values are never logged.
SECRET_PARAMETERS = frozenset({"token", "access_token", "id_token", "refresh_token", "api_key", "apikey",
                               "password", "passwd", "secret", "client_secret"})

_PAIR = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s?]*)=(?P<value>[^&;#\s]*)")


def _decoded(name: str) -> str:
    """`name` percent- and plus-decoded until it no longer changes (at most 5 rounds), stripped, lower case."""
    for _ in range(5):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower()


def redact_query_secrets(text: str) -> str:
    """`text` (a request line, a URL, a log message) with the values of secret query parameters as `***`."""
    if "=" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        if _decoded(m.group("name")) in SECRET_PARAMETERS:
            return f"{m.group('sep')}{m.group('name')}=***"
        return m.group(0)

    return _PAIR.sub(sub, text)


class RedactQuerySecrets(logging.Filter):
    """A logging filter that applies `redact_query_secrets` to a record's string arguments and message
    (uvicorn's access log passes the request path, query included, as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query_secrets(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query_secrets(v) if isinstance(v, str) else v for k, v in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = redact_query_secrets(record.msg)
        return True


__all__ = ["SECRET_PARAMETERS", "RedactQuerySecrets", "redact_query_secrets"]
