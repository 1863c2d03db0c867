"""Refuse URLs that resolve to private, loopback or link-local addresses.

A crawler run inside a cluster must not be usable to reach internal services (SSRF).
img2dataset fetches with ``urllib.request.urlopen``; installing an opener with this
handler makes every request, the first one and every redirect, pass the check first.
Tests and the demo serve images from 127.0.0.1 and pass ``--allow-private-addresses``.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request

REFUSED_PREFIX = "refused:"


def private_address(host: str) -> str | None:
    """The first non-public address ``host`` resolves to, or None."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return None  # unresolvable: the download itself reports the DNS failure
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast or addr.is_unspecified:
            return str(addr)
    return None


class PrivateAddressGuard(urllib.request.BaseHandler):
    """urllib pre-processor: raise before connecting to a non-public address."""

    handler_order = 100  # before the default handlers

    def _check(self, req):
        host = req.host.rsplit(":", 1)[0].strip("[]") if req.host else ""
        if addr := private_address(host):
            raise urllib.error.URLError(f"{REFUSED_PREFIX} {host} resolves to non-public address {addr} (use --allow-private-addresses)")
        return req

    http_request = _check
    https_request = _check


def install(allow_private: bool) -> None:
    """Install (or remove) the guard for this worker process's urllib."""
    handlers = [] if allow_private else [PrivateAddressGuard()]
    urllib.request.install_opener(urllib.request.build_opener(*handlers))
