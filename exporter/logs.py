"""Log lines in logfmt or JSON, one event per line, as Prometheus' own tools write them.

Fields come from `extra=`; values are escaped so that no upstream text can
break a line or forge a field.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["configure_logging"]

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": _LEVEL_NAMES.get(record.levelno, "error"),
        "msg": record.getMessage(),
    }
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=False)


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


def configure_logging(level: str, fmt: str, stream: TextIO = sys.stderr) -> None:
    """Send the exporter's logs to `stream` in `fmt` (logfmt or json) from `level` up."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    logger = logging.getLogger("jobstats_exporter")
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS[level])
    logger.propagate = False
