"""TLS and basic auth for the exporter's own endpoints, from a web config file.

The file has the format of the Prometheus exporter-toolkit's
`--web.config.file`, so one file can serve this exporter and Go exporters
alike. Passwords are bcrypt hashes; a verified pair is remembered (by a
SHA-256 of the password, never the password) so bcrypt's deliberate
slowness is paid once per client, not once per scrape.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["WebConfig", "load_web_config"]

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
_CLIENT_AUTH = {"NoClientCert", "RequireAndVerifyClientCert"}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
#: A bcrypt hash (cost 10) of no password anyone sends, to check unknown users against.
_UNKNOWN_USER_HASH = b"$2b$10$StxjP7PtYZuGvzW6R4l0zeRN/mQgEJp../i1idZjaVhpEc3S9pS.2"
#: bcrypt reads this many bytes of a password at most.
_BCRYPT_MAX_BYTES = 72
#: The shape of a bcrypt hash: $2a$, $2b$ or $2y$, a two-digit cost, 53 characters of salt+hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
#: Verified credentials remembered at most; past that the cache starts over.
_MAX_REMEMBERED = 256


@dataclass(frozen=True, slots=True)
class WebConfig:
    """How clients reach /metrics: TLS settings and users with bcrypt password hashes."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    _verified: dict[tuple[str, bytes], bool] = field(
        default_factory=dict, repr=False, compare=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[self.min_version]
        context.load_cert_chain(str(self.cert_file), self.key_file)
        if self.client_auth_type == "RequireAndVerifyClientCert":
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca_file)
        return context

    def same_tls(self, other: WebConfig) -> bool:
        return (
            self.cert_file,
            self.key_file,
            self.client_ca_file,
            self.client_auth_type,
            self.min_version,
        ) == (
            other.cert_file,
            other.key_file,
            other.client_ca_file,
            other.client_auth_type,
            other.min_version,
        )

    def with_users(self, users: Mapping[str, bytes]) -> WebConfig:
        """These TLS settings with other users (and nothing remembered of the old ones)."""
        return WebConfig(
            self.cert_file,
            self.key_file,
            self.client_ca_file,
            self.client_auth_type,
            self.min_version,
            users,
        )

    def remembered(self, header: str | None) -> bool | None:
        """What `authorized(header)` answers, when that takes no bcrypt check; else None."""
        if not self.users:
            return True
        parsed = _basic_credentials(header)
        if parsed is None:
            return False
        user, password = parsed
        if user not in self.users:
            return None  # refused, but only after as long as a known user's check takes
        key = (user, hashlib.sha256(password.encode()).digest())
        with self._lock:
            return self._verified.get(key)

    def authorized(self, header: str | None) -> bool:
        """True when no user is configured, or `header` is Basic with a known user's password.

        It may take a bcrypt check (tens of milliseconds): call it off the event loop.
        """
        if not self.users:
            return True
        parsed = _basic_credentials(header)
        if parsed is None:
            return False
        user, password = parsed
        hashed = self.users.get(user)
        secret = password.encode()
        if len(secret) > _BCRYPT_MAX_BYTES:
            # bcrypt reads 72 bytes at most (and bcrypt 5 refuses more): no such password is set.
            secret = secret[:_BCRYPT_MAX_BYTES]
            hashed = None
        import bcrypt  # here, not at the top: only basic auth needs it (0.5 MiB)

        if hashed is None:
            # As slow as a known user's check, so that timing does not tell which users exist.
            bcrypt.checkpw(secret, _UNKNOWN_USER_HASH)
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        with self._lock:
            known = self._verified.get(key)
        if known is not None:
            return known
        ok = bcrypt.checkpw(secret, hashed)
        with self._lock:
            if len(self._verified) >= _MAX_REMEMBERED:
                self._verified.clear()
            self._verified[key] = ok
        return ok


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The user and password of a Basic `Authorization` header; None when it is not one."""
    scheme, _, credentials = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def load_web_config(path: str) -> WebConfig:
    """Read and check the web config file; ConfigError names the key."""
    from . import yamlfile  # here, not at the top: only a web config file needs PyYAML

    try:
        document = yamlfile.load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"web.config_file: cannot read {path}: {error.strerror}") from None
    except yamlfile.DuplicateKeyError as error:
        raise ConfigError(f"{error.key}: given twice in {path}") from None
    except (yamlfile.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"web.config_file: {path} is not valid YAML") from None
    document = document or {}
    _only(document, "", {"tls_server_config", "basic_auth_users"}, path)
    tls = document.get("tls_server_config") or {}
    _only(tls, "tls_server_config.", _TLS_KEYS, path)
    values: dict[str, Any] = {key: _text(tls[key], f"tls_server_config.{key}", path) for key in tls}
    if ("cert_file" in values) != ("key_file" in values):
        raise ConfigError("tls_server_config: cert_file and key_file go together")
    if values.get("client_auth_type", "NoClientCert") not in _CLIENT_AUTH:
        raise ConfigError(
            f"tls_server_config.client_auth_type: expected one of {', '.join(sorted(_CLIENT_AUTH))}"
        )
    if (
        values.get("client_auth_type") == "RequireAndVerifyClientCert"
        and "client_ca_file" not in values
    ):
        raise ConfigError("tls_server_config.client_ca_file: needed to verify client certificates")
    if values.get("min_version", "TLS12") not in _VERSIONS:
        raise ConfigError("tls_server_config.min_version: expected TLS12 or TLS13")
    if values and "cert_file" not in values:
        raise ConfigError("tls_server_config.cert_file: missing")
    users = document.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ConfigError("basic_auth_users: expected a mapping of user names to bcrypt hashes")
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        text = _text(hashed, f"basic_auth_users.{user}", path)
        if not _BCRYPT_HASH.match(text):
            # Never echo the value: it may be a password written where a hash belongs.
            raise ConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$10$...)")
        hashes[str(user)] = text.encode()
    config = WebConfig(users=hashes, **values)
    if config.tls:
        try:
            config.ssl_context()
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"tls_server_config: cannot load the certificate: {error}") from None
    return config


def _only(node: Any, prefix: str, allowed: set[str], path: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'web.config_file'}: expected a mapping in {path}"
        )
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: unknown key in {path}")


def _text(raw: Any, where: str, path: str) -> str:
    if raw is None or isinstance(raw, dict | list | bool):
        raise ConfigError(f"{where}: expected a single value in {path}")
    return str(raw)
