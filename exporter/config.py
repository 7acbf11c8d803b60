"""Settings from flags, environment variables and a strict YAML file.

A flag wins over its variable, a variable over the file, the file over the
default. Every value is checked here, before anything is served; a bad one is
a ConfigError whose one-line message names the key and where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from .client import DEFAULT_MAX_BODY_BYTES, redact_url
from .errors import ConfigError
from .model import Limits
from .targets import (
    DEFAULT_REDIS_PREFIX,
    RedisSource,
    Secret,
    Target,
    parse_redis_url,
    parse_targets,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_PORT",
    "SETTINGS",
    "Config",
    "Setting",
    "load_config",
    "parse_listen_address",
]

#: Not taken by a well-known service nor, when chosen, by Prometheus' port allocations list.
DEFAULT_PORT = 9787
#: The stats API read when none is given, unless a Redis source is given instead.
DEFAULT_API_URL = "http://localhost:3001/api/jobs/stats"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the exporter needs to run, already validated."""

    #: None: DEFAULT_API_URL, unless redis_url is set (a target read from Redis alone).
    api_url: str | None = None
    api_timeout: float = 10.0
    api_max_body_size: int = DEFAULT_MAX_BODY_BYTES
    api_min_interval: float = 0.0
    api_bearer_token_file: str | None = None
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    redis_password_file: str | None = None
    web_listen_address: str = f":{DEFAULT_PORT}"
    web_config_file: str | None = None
    cron_timezone: str = "UTC"
    log_level: str = "info"
    log_format: str = "logfmt"
    limits: Limits = field(default_factory=Limits)
    config_file: str | None = None
    #: The file's `targets:`; empty means one target, "default", made of the api.* settings.
    configured_targets: tuple[Target, ...] = ()

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every target; the first is the one /metrics serves."""
        if self.configured_targets:
            return self.configured_targets
        bearer = self.api_bearer_token_file
        redis = None
        if self.redis_url:
            password = self.redis_password_file
            redis = RedisSource(
                url=self.redis_url,
                prefix=self.redis_prefix,
                password=Secret(f"file {password}", file=password) if password else None,
            )
        url = self.api_url or (None if self.redis_url else DEFAULT_API_URL)
        return (
            Target(
                name="default",
                url=url,
                timeout=self.api_timeout,
                max_body_size=self.api_max_body_size,
                min_interval=self.api_min_interval,
                bearer_token=Secret(f"file {bearer}", file=bearer) if bearer else None,
                redis=redis,
            ),
        )


def _url(value: str) -> str:
    # User info and a query may hold credentials: a message shows the URL without them.
    shown = redact_url(value) if "@" in value or "?" in value else value
    problem = f"expected an http:// or https:// URL with a host, got {shown!r}"
    try:
        # Read as the client will read it, so that no URL passes here and fails at a scrape.
        url = httpx.URL(value)
        port = url.port
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise ValueError(problem) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(problem)
    if port is not None and not 0 < port <= 65535:
        raise ValueError(f"expected a port from 1 to 65535 in {shown!r}")
    return value


_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(value: str) -> float:
    match = _DURATION.match(value.strip())
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]] if match else 0.0
    if not match or not 0 < seconds <= 3600:
        raise ValueError(f"expected a duration from 1ms to 1h such as 10s or 500ms, got {value!r}")
    return seconds


_SIZE = re.compile(r"(?P<number>\d+)(?P<unit>B|KiB|MiB|GiB)?\Z")
_UNIT_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, None: 1}


def _interval(value: str) -> float:
    """A duration that may be zero: 0 turns the feature off."""
    return 0.0 if value.strip() in ("0", "0s") else _duration(value)


def _count(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _redis_prefix(value: str) -> str:
    if not value or len(value) > 128 or any(c in value for c in " \t*?[]\\"):
        raise ValueError(f"expected a BullMQ key prefix such as bull, got {value!r}")
    return value


def _readable_file(value: str) -> str:
    if not os.access(value, os.R_OK):
        raise ValueError(f"cannot read {value}")
    return value


def _size(value: str) -> int:
    match = _SIZE.match(value.strip())
    size = int(match["number"]) * _UNIT_BYTES[match["unit"]] if match else 0
    if not match or size < 1:
        raise ValueError(f"expected a size such as 5MiB, 512KiB or 1000000, got {value!r}")
    return size


def parse_listen_address(value: str) -> tuple[str, int]:
    """`host:port`, `:port` (every interface) or `[::1]:port` to (host, port)."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if bracketed:
        host = host[1:-1]
    if (
        not sep
        or not port.isdigit()
        or int(port) > 65535
        or any(c in host for c in "[]/ ")
        or (":" in host and not bracketed)
    ):
        raise ValueError(
            f"expected host:port such as :{DEFAULT_PORT}, 127.0.0.1:9787 or [::1]:9787,"
            f" got {value!r}"
        )
    return host, int(port)


def _listen_address(value: str) -> str:
    parse_listen_address(value)
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"expected an IANA time zone such as UTC or Europe/Berlin, got {value!r}"
        ) from None
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return check


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its flag, variable, YAML path, Config field and check."""

    key: str  # the YAML path, `api.timeout`; the flag is `--api.timeout`
    field: str
    check: Callable[[str], Any]
    help: str
    #: A flag spelled otherwise than the key says, to match a Prometheus tool's.
    flag_name: str | None = None

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "JOBSTATS_" + re.sub(r"[.-]", "_", self.key).upper()


SETTINGS = (
    Setting("api.url", "api_url", _url, "URL of the job stats API"),
    Setting(
        "api.timeout",
        "api_timeout",
        _duration,
        "deadline for one whole upstream exchange; bounded by Prometheus' scrape timeout",
    ),
    Setting("api.max_body_size", "api_max_body_size", _size, "largest upstream answer read"),
    Setting(
        "api.min_interval",
        "api_min_interval",
        _interval,
        "answer from the last result while younger than this (default 0: fetch every scrape)",
    ),
    Setting(
        "api.bearer_token_file",
        "api_bearer_token_file",
        _readable_file,
        "file holding the bearer token sent to the API",
    ),
    Setting(
        "redis.url",
        "redis_url",
        parse_redis_url,
        "the backend's BullMQ Redis, read for exact job counters (redis:// or rediss://)",
    ),
    Setting("redis.prefix", "redis_prefix", _redis_prefix, "BullMQ's key prefix (default bull)"),
    Setting(
        "redis.password_file",
        "redis_password_file",
        _readable_file,
        "file holding the Redis password",
    ),
    Setting(
        "web.listen_address", "web_listen_address", _listen_address, "address to serve /metrics on"
    ),
    Setting(
        "web.config_file",
        "web_config_file",
        _readable_file,
        "TLS and basic auth of the exporter's own endpoints (exporter-toolkit format)",
        # The exporter-toolkit's own spelling, so a Go exporter's unit file carries over.
        flag_name="--web.config.file",
    ),
    Setting("cron.timezone", "cron_timezone", _timezone, "time zone the cron patterns are read in"),
    Setting("limits.max_queues", "max_queues", _count, "queues exported at most; the rest dropped"),
    Setting(
        "limits.max_extra_states",
        "max_extra_states",
        _count,
        "states beyond the five exported per queue at most",
    ),
    Setting(
        "limits.max_queue_name_length",
        "max_queue_name_length",
        _count,
        "longest queue name exported; longer ones dropped, never cut",
    ),
    Setting("log.level", "log_level", _choice("debug", "info", "warn", "error"), "log level"),
    Setting("log.format", "log_format", _choice("logfmt", "json"), "log line format"),
)


def load_config(flags: Mapping[str, str], environ: Mapping[str, str]) -> Config:
    """Build the Config. `flags` maps setting keys (`api.url`) to the flags given.

    `config.file` is itself a flag (`--config.file`) or JOBSTATS_CONFIG_FILE.
    """
    config_file = flags.get("config.file") or environ.get("JOBSTATS_CONFIG_FILE") or None
    from_file, raw_targets = _read_file(config_file) if config_file else ({}, None)
    values: dict[str, Any] = {"config_file": config_file}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if setting.key in flags:
            raw, source = flags[setting.key], setting.flag
        elif setting.env in environ:
            raw, source = environ[setting.env], setting.env
        elif setting.key in from_file:
            raw, source = from_file[setting.key], f"{config_file}"
            if setting.check is _readable_file and config_file:
                # As for targets' files: a relative name is read from the config file's folder.
                raw = str(Path(config_file).parent / str(raw))
        else:
            continue
        try:
            values[setting.field] = setting.check(str(raw))
        except ValueError as error:
            raise ConfigError(f"{setting.key} (from {source}): {error}") from None
        sources[setting.key] = source
    limits = {
        name: values.pop(name)
        for name in ("max_queues", "max_extra_states", "max_queue_name_length")
        if name in values
    }
    values["limits"] = Limits(**limits)
    if raw_targets is not None:
        for key in (
            "api.url",
            "api.bearer_token_file",
            "redis.url",
            "redis.prefix",
            "redis.password_file",
        ):
            if key in sources:
                raise ConfigError(
                    f"{key} (from {sources[key]}): the config file lists targets; set it there"
                )
        assert config_file is not None
        base = Config()
        defaults = {
            "url": None,
            "timeout": values.get("api_timeout", base.api_timeout),
            "max_body_size": values.get("api_max_body_size", base.api_max_body_size),
            "min_interval": values.get("api_min_interval", base.api_min_interval),
        }
        checks = {
            "url": _url,
            "timeout": _duration,
            "max_body_size": _size,
            "min_interval": _interval,
        }
        values["configured_targets"] = parse_targets(
            raw_targets, config_file, environ, defaults, checks
        )
    return Config(**values)


def _read_file(path: str) -> tuple[dict[str, Any], Any]:
    """The file's settings flattened to their keys, and its `targets:` list (None if absent)."""
    from . import yamlfile  # here, not at the top: only a config file needs PyYAML

    try:
        document = yamlfile.load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"config.file: cannot read {path}: {error.strerror}") from None
    except yamlfile.DuplicateKeyError as error:
        raise ConfigError(f"{error.key}: given twice in {path}") from None
    except (yamlfile.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config.file: {path}{line} is not valid YAML") from None
    if document is None:
        return {}, None
    if not isinstance(document, dict):
        raise ConfigError(f"config.file: expected a mapping in {path}")
    document = dict(document)
    if "targets" in document and document["targets"] is None:
        raise ConfigError(f"targets: expected a non-empty list in {path}")
    raw_targets = document.pop("targets", None)
    if raw_targets is not None and not isinstance(raw_targets, list):
        raise ConfigError(f"targets: expected a list in {path}")
    known = {setting.key for setting in SETTINGS}
    flat: dict[str, Any] = {}
    _flatten(document, "", flat, path)
    for key, value in flat.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown key in {path}")
        if value is None or isinstance(value, dict | list | bool):
            raise ConfigError(f"{key} (from {path}): expected a single value, got {value!r}")
    return flat, raw_targets


def _flatten(node: Any, prefix: str, into: dict[str, Any], path: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config.file'}: expected a mapping in {path}")
    for name, value in node.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or "." in name:
            # `api.url: x` is not `api: {url: x}`; a key never holds a dot.
            raise ConfigError(f"{key}: unknown key in {path}")
        if isinstance(value, dict):
            _flatten(value, f"{key}.", into, path)
        else:
            into[key] = value
