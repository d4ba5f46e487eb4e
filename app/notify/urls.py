"""Webhook target validation: no loopback, private, link-local, metadata, multicast or reserved
addresses (IPv4-mapped IPv6 and numeric host forms included, since the resolved addresses are
what is checked), unless the host is on the operator's allow-list."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import httpx


class UnsafeUrl(ValueError):
    """The URL must not be used as a webhook target; the message is safe to show."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_webhook_url(url: str, allow_hosts: list[str], *, resolve: bool = True) -> str:
    """Return the URL if it may be called; raise UnsafeUrl otherwise."""
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise UnsafeUrl("webhook URL must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UnsafeUrl(f"malformed URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("webhook URL must be http(s) with a host")
    if parts.username or parts.password:
        raise UnsafeUrl("webhook URL must not carry credentials")
    host = parts.hostname.lower()
    if host in allow_hosts:
        return url
    if not resolve:
        return url
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"webhook host {host!r} does not resolve") from exc
    addresses = {str(info[4][0]) for info in infos}
    blocked = sorted(a for a in addresses if not _is_public(a))
    if blocked:
        raise UnsafeUrl(
            f"webhook host {host!r} resolves to a non-public address ({', '.join(blocked)}); "
            "allow it explicitly with LAKESAGA_WEBHOOK_ALLOW_HOSTS"
        )
    return url
