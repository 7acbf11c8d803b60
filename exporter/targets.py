"""Targets: the stats APIs this exporter may read, each with its own access.

Decoded strictly from the config file's `targets:` list (an unknown key is an
error naming its path, `targets[1].tls.ca_fil`); a relative file name is read
from the config file's folder. Secrets come from a file,
re-read at each request so they can rotate, or an environment variable,
never from the config itself; a Target's repr never shows one.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = [
    "DEFAULT_REDIS_PREFIX",
    "TLS",
    "RedisSource",
    "Secret",
    "Target",
    "parse_redis_url",
    "parse_targets",
]

#: A target name: what /probe?target= takes, never a URL.
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: Headers the exporter sets itself, or that auth settings own.
_RESERVED_HEADERS = {"authorization", "host", "content-length", "connection", "user-agent"}
#: BullMQ's own default key prefix.
DEFAULT_REDIS_PREFIX = "bull"
#: Seconds between scans of a Redis source for queues created or removed.
DEFAULT_DISCOVERY_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret read from a file (trailing newline stripped, as Prometheus does) or a variable."""

    source: str  # "file /path" or "variable NAME": safe to show
    file: str | None = None
    value: str | None = field(default=None, repr=False)

    def read(self) -> str:
        """The secret now. OSError when its file is gone, ValueError when it breaks a header."""
        if self.file is None:
            text = self.value or ""
        else:
            text = Path(self.file).read_text(encoding="utf-8").rstrip("\r\n")
        if any(c in text for c in "\r\n\0"):
            # Never in a header (and so never in the error httpx would make of it).
            raise ValueError(f"the secret from {self.source} holds a line break")
        return text

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"


@dataclass(frozen=True, slots=True)
class TLS:
    """How to verify the upstream, and the client certificate to show it."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx takes as `verify`: a context when anything differs from the default."""
        if self.ca_file is None and self.cert_file is None and not self.insecure_skip_verify:
            return True
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass(frozen=True, slots=True)
class RedisSource:
    """A backend's BullMQ Redis: where, under which key prefix, and how to get in.

    The password is a Secret (a file or a variable), read at each connection so it can
    rotate; the URL never holds one.
    """

    url: str
    prefix: str = DEFAULT_REDIS_PREFIX
    username: str | None = None
    password: Secret | None = None
    tls: TLS = field(default_factory=TLS)
    #: BullMQ queue name to the `queue` label the stats API uses for it.
    queue_names: tuple[tuple[str, str], ...] = ()
    #: Seconds between scans for queues created or removed.
    discovery_interval: float = DEFAULT_DISCOVERY_INTERVAL

    def label(self, queue: str) -> str:
        """The `queue` label of the BullMQ queue `queue`."""
        for name, label in self.queue_names:
            if name == queue:
                return label
        return queue


def parse_redis_url(value: str) -> str:
    """A redis:// or rediss:// URL with a host and no password; ValueError otherwise.

    No message repeats the URL as given: it may hold a password.
    """
    parts = urlsplit(value)
    try:
        password, port = parts.password, parts.port
    except ValueError:
        raise ValueError("expected a port from 1 to 65535 after the host") from None
    if password is not None or "@" in parts.netloc:
        # A password in the URL would sit in the config, the command line or the log.
        raise ValueError(
            "the URL holds user info: give the username in `username` and the password"
            " in password_file or password_env"
        )
    if parts.query or parts.fragment:
        raise ValueError("expected no query or fragment in the URL")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected a redis:// or rediss:// URL with a host")
    if port is not None and not 0 < port <= 65535:
        raise ValueError("expected a port from 1 to 65535 after the host")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("expected a database number after the host, such as /0")
    return value


@dataclass(frozen=True, slots=True)
class Target:
    """One backend: its stats API (where, how long to wait, how much to read, how to get
    in), its BullMQ Redis, or both."""

    name: str
    #: The stats API; None for a target read from its Redis source alone.
    url: str | None
    timeout: float
    max_body_size: int
    #: Answer from the last result while it is younger than this; 0 fetches on every scrape.
    min_interval: float = 0.0
    bearer_token: Secret | None = None
    basic_username: str | None = None
    basic_password: Secret | None = None
    headers: tuple[tuple[str, str | Secret], ...] = ()
    tls: TLS = field(default_factory=TLS)
    #: The backend's BullMQ Redis, read beside the API; None when not configured.
    redis: RedisSource | None = None

    def request_headers(self) -> dict[str, str]:
        """The headers of one request, secrets read now. OSError when a secret file is gone."""
        headers = {
            name: value.read() if isinstance(value, Secret) else value
            for name, value in self.headers
        }
        if self.bearer_token is not None:
            headers["Authorization"] = f"Bearer {self.bearer_token.read()}"
        return headers

    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_username is None:
            return None
        password = self.basic_password.read() if self.basic_password else ""
        return self.basic_username, password


Check = Callable[[str], Any]


def parse_targets(
    raw: Any,
    path: str,
    environ: Mapping[str, str],
    defaults: Mapping[str, Any],
    checks: Mapping[str, Check],
) -> tuple[Target, ...]:
    """The `targets:` list of the file at `path`, checked; ConfigError names the bad key.

    `defaults` holds timeout, max_body_size and min_interval for targets that omit them;
    `checks` the parsers of url, timeout, max_body_size and min_interval (from config.py).
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"targets: expected a non-empty list in {path}")
    targets = []
    for index, entry in enumerate(raw):
        where = f"targets[{index}]"
        targets.append(_target(entry, where, path, environ, defaults, checks))
    names = [t.name for t in targets]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"targets[{index}].name: {name!r} is given twice in {path}")
    return tuple(targets)


_TARGET_KEYS = {
    "name",
    "url",
    "timeout",
    "max_body_size",
    "min_interval",
    "bearer_token_file",
    "bearer_token_env",
    "basic_auth",
    "headers",
    "tls",
    "redis",
}
_REDIS_KEYS = {
    "url",
    "prefix",
    "username",
    "password_file",
    "password_env",
    "tls",
    "queue_names",
    "discovery_interval",
}
#: What BullMQ accepts as a prefix and what we can put in a SCAN pattern unescaped.
_REDIS_PREFIX = re.compile(r"[^\s*?\[\]\\]{1,128}\Z")


def _target(
    entry: Any,
    where: str,
    path: str,
    environ: Mapping[str, str],
    defaults: Mapping[str, Any],
    checks: Mapping[str, Check],
) -> Target:
    fields = _mapping(entry, where, path, _TARGET_KEYS)
    name = _text(fields.get("name"), f"{where}.name", path)
    if not TARGET_NAME.match(name):
        raise ConfigError(
            f"{where}.name: expected letters, digits, '_', '.' or '-' (64 at most), got {name!r}"
        )
    if "url" not in fields and "redis" not in fields:
        raise ConfigError(f"{where}.url: missing in {path} (or give a redis section)")
    values: dict[str, Any] = {}
    for key in ("url", "timeout", "max_body_size", "min_interval"):
        if key not in fields:
            values[key] = defaults[key]
            continue
        try:
            values[key] = checks[key](_text(fields[key], f"{where}.{key}", path))
        except ValueError as error:
            raise ConfigError(f"{where}.{key} (from {path}): {error}") from None
    if "bearer_token_file" in fields and "bearer_token_env" in fields:
        raise ConfigError(f"{where}.bearer_token_env: give bearer_token_file or _env, not both")
    bearer = _secret(fields, "bearer_token", where, path, environ)
    username, password = None, None
    if "basic_auth" in fields:
        if bearer is not None:
            raise ConfigError(f"{where}.basic_auth: give basic_auth or a bearer token, not both")
        basic = _mapping(
            fields["basic_auth"],
            f"{where}.basic_auth",
            path,
            {"username", "password_file", "password_env"},
        )
        username = _text(basic.get("username"), f"{where}.basic_auth.username", path)
        password = _secret(basic, "password", f"{where}.basic_auth", path, environ)
    return Target(
        name=name,
        bearer_token=bearer,
        basic_username=username,
        basic_password=password,
        headers=_headers(fields.get("headers", {}), f"{where}.headers", path, environ),
        tls=_tls(fields.get("tls", {}), f"{where}.tls", path),
        redis=_redis(fields["redis"], f"{where}.redis", path, environ, checks)
        if "redis" in fields
        else None,
        **values,
    )


def _redis(
    raw: Any, where: str, path: str, environ: Mapping[str, str], checks: Mapping[str, Check]
) -> RedisSource:
    fields = _mapping(raw, where, path, _REDIS_KEYS)
    url = _text(fields.get("url"), f"{where}.url", path)
    try:
        parse_redis_url(url)
    except ValueError as error:
        raise ConfigError(f"{where}.url (from {path}): {error}") from None
    prefix = _text(fields.get("prefix", DEFAULT_REDIS_PREFIX), f"{where}.prefix", path)
    if not _REDIS_PREFIX.match(prefix):
        raise ConfigError(
            f"{where}.prefix: expected a BullMQ key prefix such as bull, got {prefix!r}"
        )
    username = (
        _text(fields["username"], f"{where}.username", path) if "username" in fields else None
    )
    names = fields.get("queue_names", {})
    if not isinstance(names, dict):
        raise ConfigError(f"{where}.queue_names: expected a mapping of BullMQ names to labels")
    queue_names: list[tuple[str, str]] = []
    for name, label in names.items():
        key = f"{where}.queue_names.{_shown(name)}"
        text = _text(label, key, path)
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigError(f"{key}: expected a BullMQ queue name (no ':')")
        if not text:
            raise ConfigError(f"{key}: expected a non-empty queue label")
        if any(text == label for _, label in queue_names):
            raise ConfigError(f"{key}: the label {text!r} is given to another queue too")
        queue_names.append((name, text))
    interval = DEFAULT_DISCOVERY_INTERVAL
    if "discovery_interval" in fields:
        key = f"{where}.discovery_interval"
        try:
            interval = checks["timeout"](_text(fields["discovery_interval"], key, path))
        except ValueError as error:
            raise ConfigError(f"{key} (from {path}): {error}") from None
    return RedisSource(
        discovery_interval=interval,
        url=url,
        prefix=prefix,
        username=username,
        password=_secret(fields, "password", where, path, environ),
        tls=_tls(fields.get("tls", {}), f"{where}.tls", path),
        queue_names=tuple(queue_names),
    )


def _secret(
    fields: Mapping[str, Any],
    stem: str,
    where: str,
    path: str,
    environ: Mapping[str, str],
    keys: tuple[str, str] | None = None,
) -> Secret | None:
    """The secret of `<stem>_file` or `<stem>_env` (or of the two `keys` given), checked."""
    file_key, env_key = keys or (f"{stem}_file", f"{stem}_env")
    if file_key in fields and env_key in fields:
        raise ConfigError(f"{where}.{env_key}: give {file_key} or {env_key}, not both")
    if file_key in fields:
        file = _relative_to(path, _text(fields[file_key], f"{where}.{file_key}", path))
        secret = Secret(f"file {file}", file=file)
        try:
            secret.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{where}.{file_key}: cannot read {file}: {reason}") from None
        except ValueError as error:
            raise ConfigError(f"{where}.{file_key}: {error}") from None
        return secret
    if env_key in fields:
        variable = _text(fields[env_key], f"{where}.{env_key}", path)
        if variable not in environ:
            raise ConfigError(f"{where}.{env_key}: the variable {variable} is not set")
        secret = Secret(f"variable {variable}", value=environ[variable])
        try:
            secret.read()
        except ValueError as error:
            raise ConfigError(f"{where}.{env_key}: {error}") from None
        return secret
    return None


def _headers(
    raw: Any, where: str, path: str, environ: Mapping[str, str]
) -> tuple[tuple[str, str | Secret], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of header names to values in {path}")
    headers: list[tuple[str, str | Secret]] = []
    for name, value in raw.items():
        key = f"{where}.{_shown(name)}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ConfigError(f"{key}: not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"{key}: set by the exporter or by the auth settings, not here")
        if isinstance(value, dict):
            source = _mapping(value, key, path, {"file", "env"})
            secret = _secret(source, "value", key, path, environ, keys=("file", "env"))
            if secret is None:
                raise ConfigError(f"{key}: expected a value, or file: or env:")
            headers.append((name, secret))
        else:
            text = _text(value, key, path)
            if any(c in text for c in "\r\n\0"):
                raise ConfigError(f"{key}: a header value cannot hold a line break")
            headers.append((name, text))
    return tuple(headers)


def _tls(raw: Any, where: str, path: str) -> TLS:
    fields = _mapping(
        raw, where, path, {"ca_file", "cert_file", "key_file", "insecure_skip_verify"}
    )
    files = {
        key: _relative_to(path, _text(fields[key], f"{where}.{key}", path))
        for key in fields
        if key != "insecure_skip_verify"
    }
    for key, file in files.items():
        if not os.access(file, os.R_OK):
            raise ConfigError(f"{where}.{key}: cannot read {file}")
    if ("cert_file" in files) != ("key_file" in files):
        raise ConfigError(f"{where}: cert_file and key_file go together")
    skip = fields.get("insecure_skip_verify", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}.insecure_skip_verify: expected true or false")
    tls = TLS(insecure_skip_verify=skip, **files)
    try:
        tls.verify()
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"{where}: cannot load the certificates: {error}") from None
    return tls


def _relative_to(config_path: str, file: str) -> str:
    """A relative file name is read from the config file's folder, as Prometheus does."""
    return str(Path(config_path).parent / file) if not Path(file).is_absolute() else file


def _mapping(raw: Any, where: str, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping in {path}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{_shown(key)}: unknown key in {path}")
    return raw


def _shown(key: Any) -> str:
    """A key as an error message shows it: on one line, whatever it holds."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _text(raw: Any, where: str, path: str) -> str:
    if raw is None:
        raise ConfigError(f"{where}: missing in {path}")
    if isinstance(raw, dict | list | bool):
        raise ConfigError(f"{where}: expected a single value in {path}, got {raw!r}")
    return str(raw)
