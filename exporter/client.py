"""Fetch a stats API: one GET, one deadline, a capped body, shared by concurrent scrapes.

The caller's timeout covers the whole exchange, body included, so an upstream
that trickles bytes still times out. Requests run on the caller's event loop
(the server's own: no thread hand-off per scrape), which lets a deadline
cancel a read cleanly and keeps one keep-alive pool per target. Scrapes of a
target that arrive while its request is in flight share that request; with a
`min_interval` they share its result while it is younger. Bodies are returned raw, never parsed or
logged here, and no credential is ever part of a message.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from . import __version__
from .errors import FetchError, ParseError
from .targets import Target
from .transport import StreamsTransport

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Fetched", "StatsClient", "redact_url"]

DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024
#: Sent with every request; a target's own headers may not replace these (targets.py).
_HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "User-Agent": f"jobstats-exporter/{__version__}",
}


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


@dataclass(frozen=True, slots=True)
class Fetched:
    """One upstream answer's body, and how many seconds ago the upstream gave it."""

    body: bytes
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class _Outcome:
    at: float
    body: bytes | None
    error: FetchError | ParseError | None


class StatsClient:
    """Reads one target's stats API, on one event loop at a time.

    `fetch()` and `close()` are coroutines of the loop that uses the client.
    `transport` is for tests (`httpx.MockTransport`, respx).
    """

    def __init__(self, target: Target, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.target = target
        if target.url is None:
            raise ValueError(f"target {target.name} has no stats API to read")
        self._url: str = target.url
        self._where = redact_url(target.url)
        # Touched on the loop only, so they need no lock.
        self._inflight: asyncio.Future[bytes] | None = None
        #: The loop time at which the request in flight gives up.
        self._inflight_until = 0.0
        self._last: _Outcome | None = None
        self._transport = self._make_transport(transport)
        self._request_url = httpx.URL(target.url)

    @property
    def url(self) -> str:
        return self._url

    def _make_transport(
        self, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncBaseTransport:
        # A transport itself, not an AsyncClient over it: a client's request building,
        # cookies, auth flow and redirect handling cost more than the rest of a small
        # scrape, and none of them is wanted (redirects are failures, auth is a header).
        # Proxies from the environment are not read: the API is reached directly.
        if transport is not None:
            return transport
        verify = self._verify()
        context = (
            verify
            if isinstance(verify, ssl.SSLContext)
            else httpx.create_ssl_context()
            if verify
            else None
        )
        return StreamsTransport(context, max_connections=32, max_keepalive=8)

    def _verify(self) -> ssl.SSLContext | bool:
        # A plain-HTTP target never makes a TLS connection (redirects are not followed), so
        # it need not load the system's CA bundle: about 3 MiB per client.
        if httpx.URL(self._url).scheme == "http":
            return False
        return self.target.tls.verify()

    async def fetch(self, timeout: float) -> Fetched:
        """One 2xx answer's body; FetchError, or ParseError for a body that is not JSON."""
        now = time.monotonic()
        last = self._last
        if last is not None and now - last.at < self.target.min_interval:
            return self._replay(last, now - last.at)
        loop_now = asyncio.get_running_loop().time()
        if self._inflight is None or loop_now >= self._inflight_until:
            # A request past its own deadline is ending: a new scrape does not share it.
            self._inflight_until = loop_now + timeout
            self._inflight = asyncio.ensure_future(self._fetch(timeout, self._inflight_until))
            self._inflight.add_done_callback(self._settle)
        try:
            # A later scrape with a shorter deadline stops waiting without cancelling the
            # request the others share.
            async with asyncio.timeout(timeout):
                body = await asyncio.shield(self._inflight)
        except TimeoutError:
            raise self._timeout(timeout) from None
        except (FetchError, ParseError) as error:
            # The same error reaches every scrape that shared the request: give each its own.
            raise copy.copy(error) from None
        return Fetched(body)

    def _settle(self, request: asyncio.Future[bytes]) -> None:
        if self._inflight is request:
            self._inflight = None
        if request.cancelled():
            return
        # Retrieved here, always: a scrape that stopped waiting would leave it unread.
        error = request.exception()
        if self.target.min_interval <= 0:
            return
        if error is None:
            self._last = _Outcome(time.monotonic(), request.result(), None)
        elif isinstance(error, FetchError | ParseError):
            self._last = _Outcome(time.monotonic(), None, error)

    def _replay(self, outcome: _Outcome, age: float) -> Fetched:
        if outcome.error is not None:
            raise copy.copy(outcome.error)
        assert outcome.body is not None
        return Fetched(outcome.body, age)

    async def close(self) -> None:
        """Release the keep-alive pool; a request still in flight is cancelled."""
        if self._inflight is not None:
            self._inflight.cancel()
        await self._transport.aclose()

    async def retire(self) -> None:
        """Close once the request in flight, shared by scrapes that wait for it, has ended
        (by its own deadline at the latest): what a reload does to a replaced target."""
        inflight = self._inflight
        if inflight is not None:
            await asyncio.wait([inflight])
        await self._transport.aclose()

    def _timeout(self, timeout: float) -> FetchError:
        return FetchError("timeout", f"GET {self._where}: no complete answer within {timeout:g}s")

    async def _fetch(self, timeout: float, deadline: float) -> bytes:
        where = self._where
        try:
            headers = {**_HEADERS, **self.target.request_headers()}
            auth = self.target.basic_auth()
            if auth is not None:
                pair = ":".join(auth).encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            request = httpx.Request(
                "GET",
                self._request_url,
                headers=headers,
                extensions={"timeout": httpx.Timeout(timeout).as_dict()},
            )
        except (OSError, ValueError) as error:
            problem = str(error) if isinstance(error, ValueError) else "cannot read a credential"
            raise FetchError("connect", f"GET {where}: {problem}") from None
        try:
            # The request's own deadline: it ends even when no scrape waits for it any more.
            async with asyncio.timeout_at(deadline):
                response = await self._transport.handle_async_request(request)
                try:
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
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            raise self._timeout(timeout) from None
        except httpx.DecodingError:
            raise ParseError(
                "invalid_json", "", f"GET {where}: body could not be decompressed"
            ) from None
        except (httpx.InvalidURL, UnicodeError) as error:
            # The config check reads URLs as httpx does; this is a net under it.
            raise FetchError("connect", f"GET {where}: invalid URL: {error}") from None
        except httpx.ProtocolError as error:
            # Its text may quote what was sent, credentials included: name the kind only.
            raise FetchError("connect", f"GET {where}: {type(error).__name__}") from None
        except httpx.TransportError as error:
            raise FetchError("connect", f"GET {where}: {type(error).__name__}: {error}") from None

    async def _read_capped(self, response: httpx.Response, where: str) -> bytes:
        limit = self.target.max_body_size
        too_large = FetchError("too_large", f"GET {where}: answer larger than {limit} bytes")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        # Decoded bytes are counted, so a compressed bomb stops at the cap too.
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)
