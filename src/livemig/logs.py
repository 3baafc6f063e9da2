"""Log lines an operator can follow: each line about a migration names it, as text or as JSON.

Why from a context variable and not from each call site: the migration a piece of work is for is
already known to every process. The LMO sets :data:`livemig.faults.registry.CURRENT` around each
controller step, names the migration in a header on every call it makes, and each service's
middleware (``faults/api.py``) sets the same variable for the request; tasks a request starts
(hostd's migration job, a guest's event watcher) inherit it. :class:`ScopeFilter`, on the handler,
copies it into every record as it is emitted, so a line logged three calls deep in hostd carries
the migration and VM without any call site passing them, and a line about nothing in particular
carries nothing.

Why on the handler rather than on loggers: a logger's filter sees only the records logged to that
logger, a handler's sees every record that reaches it (uvicorn's and libraries' included).

Formats: ``text`` (``time logger LEVEL message migration=... vm=...``, for people and grep) and
``json`` (one object per line: ``time``, ``level``, ``logger``, ``message`` and, where known,
``migration``, ``vm``, ``host``, ``service``; for a log shipper). :func:`configure` installs one on
the root logger and makes uvicorn's own loggers follow it (each service's server is started with
``log_config=None`` so uvicorn does not install its own handlers).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from livemig.faults.registry import CURRENT

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
#: uvicorn's loggers: they get their own handlers unless told otherwise; cleared so they propagate
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(scope_text)s"
#: the record attributes the filter sets (a call's ``extra={...}`` naming one of them wins)
SCOPE_FIELDS = ("migration", "vm", "host")


class ScopeFilter(logging.Filter):
    """Adds ``migration``, ``vm`` and ``host`` to every record (None when not known), and
    ``scope_text``: the same as `` migration=... vm=...`` for the text format ("" outside a migration).

    ``host``: this process's host (hostd, vswitch), used when the scope names none.
    ``service``: this process's service, for the JSON format."""

    def __init__(self, host: str | None = None, service: str | None = None) -> None:
        super().__init__()
        self.host = host
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        scope = CURRENT.get()
        fields = record.__dict__
        if "migration" not in fields:
            record.migration = scope.migration if scope is not None else None
        if "vm" not in fields:
            record.vm = scope.vm if scope is not None else None
        if "host" not in fields:
            record.host = (scope.host if scope is not None else None) or self.host
        if "service" not in fields:
            record.service = self.service
        if "scope_text" not in fields:
            parts = [f"{key}={fields[key]}" for key in ("migration", "vm") if fields[key]]
            record.scope_text = (" " + " ".join(parts)) if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields that are not known are left out rather than null."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*SCOPE_FIELDS, "service"):
            value = getattr(record, key, None)
            if value:
                line[key] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``asctime logger LEVEL message`` and, inside a migration, `` migration=... vm=...``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "scope_text"):  # a handler without the filter: nothing to add
            record.scope_text = ""
        return super().format(record)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def handler(fmt: str = "text", *, host: str | None = None, service: str | None = None,
            stream: IO[str] | None = None) -> logging.Handler:  # fmt: skip
    """A stream handler (stderr by default) in format ``fmt`` that knows each record's migration."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.addFilter(ScopeFilter(host, service))
    out.setFormatter(formatter(fmt))
    return out


def configure(level: str = "info", fmt: str = "text", *, host: str | None = None,
              service: str | None = None, stream: IO[str] | None = None) -> logging.Handler:  # fmt: skip
    """Make the root logger write ``level`` and above in ``fmt`` (replacing its handlers), and send
    uvicorn's loggers there too. Returns the handler installed."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    installed = handler(fmt, host=host, service=service, stream=stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(installed)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    return installed
