"""Structured logging: one JSON object per line, with the request id.

Design
------
Every module logs through the standard `logging` package under the `pylb` logger. `serve`
installs `JsonFormatter` on one stderr handler (`configure_logging`); tests and library users
keep whatever logging they set up. The request being served is held in a context variable
(`request_id_var`), set by the proxy's request handler, so that any log record emitted while
serving it (router, fleet, proxy) carries its `request_id` without passing it around. Extra
fields given as `logger.info("msg", extra={...})` become keys of the JSON object.

A line looks like:
    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "pylb.access", "msg": "request",
     "request_id": "3f2a...", "method": "POST", "path": "/v1/chat/completions", "status": 200, ...}
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("pylb_request_id", default=None)
"""The id of the request being served in the current task (None outside requests)."""

ACCESS_LOGGER = "pylb.access"
"""Logger of the one-line-per-request access log."""

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ct = record.created
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ct)) + f".{int(ct % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the request id and extras appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None) or request_id_var.get()
        extras = [f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and k != "request_id" and not k.startswith("_")]
        if rid is not None:
            extras.insert(0, f"request_id={rid}")
        return line + (" " + " ".join(extras) if extras else "")


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> logging.Handler:
    """Send the `pylb` loggers (and aiohttp's) to one stderr handler in `fmt` ("json"/"text").

    Returns the handler (remove it from the `pylb` and `aiohttp` loggers to undo)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pylb", "aiohttp"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper() if name == "pylb" else max(logging.WARNING, logging.getLevelName(level.upper())))
        lg.propagate = False
    return handler
