"""Refuse hosts that resolve to private, loopback, link-local or otherwise non-public addresses.

A crawler run inside a cluster must not be usable to reach internal services (SSRF). The
rules, applied by ``mmloom.curate.fetch`` to the first request and every redirect:

* the host comes from ``urllib.parse`` (brackets and port already removed) and is resolved
  once, with ``getaddrinfo``; IP literals in any spelling the C library accepts (decimal
  ``2130706433``, octal ``0177.0.0.1``, hex, ``127.1``) resolve to what they mean;
* every address of the answer must be public (``non_public``), or the URL is refused; an
  IPv6 address that carries an IPv4 one (IPv4-mapped, IPv4-compatible, SIIT, 6to4, NAT64)
  is judged by the IPv4 address inside;
* a host that does not resolve is refused: its address cannot be checked;
* the connection goes to the checked addresses themselves, never to a second lookup that
  DNS rebinding could answer differently.

Tests and the demo serve images from 127.0.0.1 and pass ``--allow-private-addresses``.
"""

from __future__ import annotations

import ipaddress
import socket

REFUSED_PREFIX = "refused:"

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix, IPv4 in the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use: the IPv4 can sit anywhere
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated
_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible


class Refused(Exception):
    """The host is not public (or cannot be checked); ``str`` is the reason."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the embedding forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _SIIT or ip in _COMPAT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _not_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or (ip.version == 6 and ip.is_site_local))


def non_public(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address (it names the address), or None."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip.version == 6 and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])  # scoped: link-local or site-local
    if ip.version == 6 and not (ip.is_loopback or ip.is_unspecified):
        if ip in _NAT64_LOCAL:
            return f"{ip} (local-use NAT64)"
        if (v4 := embedded_ipv4(ip)) is not None:  # judged by the IPv4 it reaches
            return f"{ip} (embeds {v4})" if _not_global(v4) else None
    return str(ip) if _not_global(ip) else None


def resolve(host: str, port: int, allow_private: bool) -> list[tuple]:
    """``getaddrinfo`` answers (family, type, proto, canonname, sockaddr) for a TCP
    connection to ``host``, every one checked; raises ``Refused`` (non-public or
    unresolvable, when the guard is on) or ``OSError`` (unresolvable, guard off)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        if allow_private:
            raise OSError(f"{host} does not resolve ({why})") from None
        raise Refused(f"{host} does not resolve ({why}); refused since its address cannot be checked") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise (OSError if allow_private else Refused)(f"{host} has no IPv4 or IPv6 address")
    if not allow_private:
        for info in infos:
            if why := non_public(info[4][0]):
                raise Refused(f"{host} resolves to non-public address {why} (use --allow-private-addresses)")
    return infos
