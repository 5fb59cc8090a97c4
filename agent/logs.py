"""Structured logging: JSON lines in the DaemonSet, readable text under `make run`.

Call sites pass context as `extra={"fields": {...}}`; the request id comes from a context variable
set by the HTTP middleware, so every line logged while serving a request carries it.
"""

import contextvars
import itertools
import json
import logging
import os
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_REQUEST_IDS = itertools.count()
_ID_PREFIX = os.urandom(4).hex()  # ids from agents and restarts do not collide


def new_request_id() -> str:
    """An id for a request that came without an X-Request-Id."""
    return f"{_ID_PREFIX}{next(_REQUEST_IDS):08x}"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out = dict(getattr(record, "fields", {}) or {})
    rid = request_id.get()
    if rid:
        out.setdefault("request_id", rid)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = (f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
                f"{record.levelname:<7} {record.name}: {record.getMessage()}"
                + (f"  {ctx}" if ctx else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates our per-request debug line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
