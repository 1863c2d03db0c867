"""Fetch one image URL with every bound the download stage promises.

img2dataset 1.47.0 fetches with ``urllib.request.urlopen`` and ``r.read()``: its timeout
applies to each socket read (a server dripping a byte every few seconds holds a thread
for hours), nothing caps the body, urllib resolves the host again after any check made
before it (DNS rebinding), and a URL with a space or a non-ASCII character fails where a
browser would percent-encode it. ``fetch`` is what the stage uses instead, one URL at a
time, redirects included:

* the URL is parsed with ``urllib.parse``; control characters (CR, LF, NUL, tab ...) are
  refused, the host is IDNA-encoded and path and query are percent-encoded like a
  browser does (existing ``%XX`` and reserved characters kept); the stored url is not
  changed, only what is sent;
* the host is resolved once and every address checked (``netguard``); the socket is
  connected to one of those very addresses, in order, with Host header, TLS SNI and
  certificate check on the host name;
* one deadline bounds the whole request (connect, TLS handshake, headers, body, every
  redirect): each socket operation waits at most ``min(timeout, time left)``;
* the body is read in chunks into memory bounded by ``max_body_bytes``: a larger
  ``Content-Length`` is refused before reading, a body without length is cut when it
  passes the bound; either way the connection is closed.

``installed(limits)`` puts ``fetch`` in place of img2dataset's module-level
``download_image`` (same arguments, same ``(key, BytesIO | None, error)`` result;
User-Agent and X-Robots-Tag handling kept) while a shard downloads.
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import io
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, urljoin, urlsplit

from . import netguard

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's
OPT_OUT_MESSAGE = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 256 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[a-z0-9_.-]+")
# what a browser leaves alone in a path / query: unreserved and reserved characters, and
# '%' so that existing escapes are not encoded twice (a lone '%' is sent as is, as browsers do)
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


class FetchError(Exception):
    """The URL ended without an image; ``refused`` says it was the address guard."""

    def __init__(self, reason: str, refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.refused = refused

    @property
    def message(self) -> str:
        """The error text the stage records (``refused: ...`` becomes status ``refused``)."""
        return f"{netguard.REFUSED_PREFIX} {self.reason}" if self.refused else self.reason


class Limits(NamedTuple):
    timeout: float  # seconds any one socket operation may wait
    deadline: float  # seconds for the whole request, redirects included
    max_body_bytes: int
    allow_private: bool = False
    max_redirects: int = 10  # urllib's


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # ASCII: IDNA-encoded name, or an IP literal without brackets
    port: int
    target: str  # percent-encoded path and query, what goes on the request line


def parse_url(url: str) -> Target:
    """What to connect to and what to ask for; raises ``FetchError`` for a URL no request can carry."""
    if m := _CONTROL.search(url):
        raise FetchError(f"URL contains a control character ({m.group()!r} at {m.start()}); not sent")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise FetchError(f"URL does not parse ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"URL scheme {scheme or '(none)'!r} is not http or https")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise FetchError(f"URL has a bad port ({e})") from None
    name = parts.hostname
    if not name:
        raise FetchError("URL has no host")
    if "[" in parts.netloc:  # IPv6 literal
        try:
            host = str(ipaddress.IPv6Address(name))
        except ValueError:
            raise FetchError(f"URL does not parse (bad IPv6 literal {name!r})") from None
    else:
        try:
            host = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise FetchError(f"host {name!r} is not a valid domain name ({e})") from None
        if not _HOSTNAME.fullmatch(host):
            raise FetchError(f"host {name!r} has characters a domain name cannot have")
    try:
        target = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    except UnicodeError as e:
        raise FetchError(f"URL path is not valid text ({e})") from None
    return Target(scheme, host, port, target)


class DeadlineExceeded(TimeoutError):
    pass


class _Clock:
    """The request's deadline; ``arm`` gives a socket the time it may wait next."""

    __slots__ = ("end", "step")

    def __init__(self, limits: Limits):
        self.end = time.monotonic() + limits.deadline
        self.step = limits.timeout

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded()
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(min(self.step, self.check()))


class _Armed:
    """Every blocking call (``BLOCKING``) first sets the socket's timeout to ``min(timeout,
    time left)``."""

    BLOCKING = ("recv", "recv_into", "send", "sendall")
    _clock: _Clock


def _armed(name: str):
    def call(self, *a, **k):
        self._clock.arm(self)
        return getattr(super(_Armed, self), name)(*a, **k)

    call.__name__ = call.__qualname__ = name
    return call


for _name in _Armed.BLOCKING:
    setattr(_Armed, _name, _armed(_name))


class _Socket(_Armed, socket.socket):
    pass


class _TLSSocket(_Armed, ssl.SSLSocket):
    def do_handshake(self, *a, **k):
        self._clock.arm(self)  # the handshake as a whole waits at most this long
        return super().do_handshake(*a, **k)


_tls_context: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _tls_context
    if _tls_context is None:
        ctx = ssl.create_default_context()  # what urllib uses: system CAs, hostname check
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sslsocket_class = _TLSSocket
        _tls_context = ctx
    return _tls_context


def _connect(infos: list[tuple], clock: _Clock) -> _Socket:
    """A TCP connection to the first of the checked addresses that answers."""
    err: OSError | None = None
    for family, type_, proto, _canon, sockaddr in infos:
        sock = _Socket(family, type_, proto)
        sock._clock = clock
        try:
            clock.arm(sock)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except DeadlineExceeded:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            err = e
    raise err or OSError("no address to connect to")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, infos: list[tuple], clock: _Clock):
        super().__init__(host, port, timeout=clock.step)
        self._infos, self._clock = infos, clock

    def connect(self):
        self.sock = _connect(self._infos, self._clock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, infos: list[tuple], clock: _Clock):
        super().__init__(host, port, timeout=clock.step, context=_tls())
        self._infos, self._clock = infos, clock

    def connect(self):
        raw = _connect(self._infos, self._clock)
        try:
            tls = self._context.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        tls._clock = self._clock
        try:
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        self.sock = tls


def user_agent(token: str | None) -> str:
    if token:
        return f"{USER_AGENT} (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return USER_AGENT


def fetch(url: str, limits: Limits, user_agent_token: str | None,
          disallowed_header_directives=None) -> tuple[io.BytesIO, http.client.HTTPMessage]:
    """GET ``url`` following redirects; the body and the final response's headers, or
    ``FetchError`` naming what went wrong."""
    clock = _Clock(limits)
    headers = {"User-Agent": user_agent(user_agent_token), "Connection": "close"}
    current = url
    for _hop in range(limits.max_redirects + 1):
        t = parse_url(current)
        try:
            infos = netguard.resolve(t.host, t.port, limits.allow_private)
        except netguard.Refused as e:
            raise FetchError(str(e), refused=True) from None
        except OSError as e:
            raise FetchError(str(e)) from None
        cls = _HTTPSConnection if t.scheme == "https" else _HTTPConnection
        conn = cls(t.host, t.port, infos, clock)
        resp = None
        try:
            conn.request("GET", t.target, headers=headers)
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"HTTP Error {resp.status}: redirect without a Location")
                current = urljoin(current, location)
                continue
            if not 200 <= resp.status < 300:
                raise FetchError(f"HTTP Error {resp.status}: {resp.reason[:200]}")
            if disallowed_header_directives:
                from img2dataset.downloader import is_disallowed

                if is_disallowed(resp.headers, user_agent_token, disallowed_header_directives):
                    raise FetchError(OPT_OUT_MESSAGE)
            return _read_body(resp, clock, limits), resp.headers
        except TimeoutError:
            if clock.expired():
                raise FetchError(f"deadline of {limits.deadline:g} s exceeded ({t.host} port {t.port})") from None
            raise FetchError(f"timed out after {limits.timeout:g} s waiting for {t.host} port {t.port}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FetchError(f"{t.host} port {t.port}: {type(e).__name__}: {e}") from None
        finally:
            if resp is not None:
                resp.close()
            conn.close()
    raise FetchError(f"more than {limits.max_redirects} redirects")


def _read_body(resp: http.client.HTTPResponse, clock: _Clock, limits: Limits) -> io.BytesIO:
    cap = limits.max_body_bytes
    declared = resp.length  # None: chunked or until the connection closes
    if declared is not None and declared > cap:
        raise FetchError(f"Content-Length {declared} is above max_body_bytes {cap}")
    body = io.BytesIO()
    total = 0
    while True:
        clock.check()
        chunk = resp.read1(CHUNK)  # at most one socket read, armed with the time left
        if not chunk:
            break
        total += len(chunk)
        if total > cap:
            raise FetchError(f"body is above max_body_bytes {cap} (cut after {total} bytes)")
        body.write(chunk)
    if declared is not None and total < declared:
        raise FetchError(f"incomplete body: {total} of {declared} bytes")
    body.seek(0)
    return body


def img2dataset_download_image(limits: Limits):
    """A stand-in for ``img2dataset.downloader.download_image`` bound to ``limits``."""

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        try:
            body, _headers = fetch(url, limits._replace(timeout=timeout), user_agent_token, disallowed_header_directives)
        except FetchError as e:
            return key, None, e.message
        except Exception as e:  # noqa: BLE001  (img2dataset records any error per sample)
            return key, None, f"{type(e).__name__}: {e}"
        return key, body, None

    return download_image


_I2D_SIGNATURE = ["row", "timeout", "user_agent_token", "disallowed_header_directives"]


@contextlib.contextmanager
def installed(limits: Limits):
    """img2dataset's ``Downloader`` fetches through ``fetch`` inside this block (one shard
    at a time per process, which is how the stage runs it)."""
    from .download import img2dataset_modules

    img2dataset_modules()
    import img2dataset.downloader as i2d

    original = i2d.download_image
    if list(inspect.signature(original).parameters) != _I2D_SIGNATURE:
        raise RuntimeError(f"img2dataset.downloader.download_image{inspect.signature(original)} is not the "
                           f"function mmloom replaces ({', '.join(_I2D_SIGNATURE)}); check the img2dataset version")
    i2d.download_image = img2dataset_download_image(limits)
    try:
        yield
    finally:
        i2d.download_image = original
