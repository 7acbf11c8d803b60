"""The exporter's own errors, one small tree.

    ExporterError
    ├── ConfigError   bad flag, variable or file; the CLI exits with status 2
    ├── FetchError    the upstream could not be read (reason: timeout, connect, ...)
    └── ParseError    the upstream answer is not what the API promises

Only these are caught by the collector; anything else is a bug and surfaces.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ExporterError", "FetchError", "ParseError"]


class ExporterError(Exception):
    """Base of every error the exporter raises on purpose."""


class ConfigError(ExporterError):
    """A configuration value is wrong; the message names the key."""


class FetchError(ExporterError):
    """The stats API could not be read.

    `reason` is one of the `jobstats_scrape_errors_total` reasons:
    timeout, connect, http_status, too_large.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[FetchError], tuple[str, str]]:
        # copy and pickle rebuild from these, not from Exception.args alone.
        return type(self), (self.reason, self.message)


class ParseError(ExporterError):
    """The answer is not a valid stats document.

    `reason` is invalid_json, api_failure or invalid_payload; `path` is the
    JSON path of the offending value (`stats.inventory.failed`), or "" for
    the whole document.
    """

    def __init__(self, reason: str, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.reason = reason
        self.path = path
        self.message = message

    def __reduce__(self) -> tuple[type[ParseError], tuple[str, str, str]]:
        return type(self), (self.reason, self.path, self.message)
