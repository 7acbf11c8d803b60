"""Fetch the stats API: one GET, one deadline, a capped body.

The caller's timeout covers the whole exchange, body included, so an upstream
that trickles bytes still times out. Requests run on one event loop in a
background thread, which lets a deadline cancel a read cleanly and keeps one
keep-alive pool for all scrapes. Bodies are returned raw, never parsed or logged here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from . import __version__
from .errors import FetchError, ParseError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "StatsClient", "redact_url"]

DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024

_T = TypeVar("_T")


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: safe for logs and pages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class StatsClient:
    """Reads the stats API at `url`; thread-safe, one keep-alive pool.

    `fetch()` blocks the calling thread; `close()` releases the pool and the
    loop thread. `transport` is for tests (`httpx.MockTransport`, respx).
    """

    def __init__(
        self,
        url: str,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.max_body_bytes = max_body_bytes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jobstats-client", daemon=True
        )
        self._thread.start()
        self._client = self._call(self._make_client(transport))

    async def _make_client(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        # Built on the loop thread, where it will be used.
        return httpx.AsyncClient(
            transport=transport,
            headers={
                "Accept": "application/json",
                "User-Agent": f"jobstats-exporter/{__version__}",
            },
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    def fetch(self, timeout: float) -> bytes:
        """The raw body of one 2xx answer; FetchError (or ParseError for an undecodable body)."""
        return self._call(self._fetch(timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _fetch(self, timeout: float) -> bytes:
        where = redact_url(self.url)
        try:
            async with asyncio.timeout(timeout):
                async with self._client.stream(
                    "GET", self.url, timeout=httpx.Timeout(timeout)
                ) as response:
                    if not 200 <= response.status_code < 300:
                        raise FetchError(
                            "http_status", f"GET {where}: HTTP status {response.status_code}"
                        )
                    try:
                        return await self._read_capped(response, where)
                    except httpx.TimeoutException:
                        raise
                    except httpx.TransportError as error:
                        # A 2xx whose body broke off: the answer is not JSON, the network was fine.
                        raise ParseError(
                            "invalid_json",
                            "",
                            f"GET {where}: answer cut short ({type(error).__name__})",
                        ) from None
        except (TimeoutError, httpx.TimeoutException):
            raise FetchError(
                "timeout", f"GET {where}: no complete answer within {timeout:g}s"
            ) from None
        except httpx.DecodingError:
            raise ParseError("invalid_json", "", "body could not be decompressed") from None
        except (httpx.InvalidURL, UnicodeError) as error:
            # The config check reads URLs as httpx does; this is a net under it.
            raise FetchError("connect", f"GET {where}: invalid URL: {error}") from None
        except httpx.TransportError as error:
            raise FetchError("connect", f"GET {where}: {type(error).__name__}: {error}") from None

    async def _read_capped(self, response: httpx.Response, where: str) -> bytes:
        too_large = FetchError(
            "too_large", f"GET {where}: answer larger than {self.max_body_bytes} bytes"
        )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        # Decoded bytes are counted, so a compressed bomb stops at the cap too.
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        return bytes(body)
