"""Webhook target validation (the SSRF guard): a webhook may only reach public addresses.

The host is resolved once and every address is checked; delivery then connects to a checked
address (``WebhookTarget.addresses``) instead of letting the HTTP client resolve the name again,
so a DNS answer that changes between check and connect (rebinding) cannot reach inside. Hosts on
the operator's allow-list skip the check and the pinning. Error messages are shown to API
clients: they never include resolved addresses.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import urlsplit

import httpx

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Addresses that ``is_global`` (Python 3.11) calls global, or that embed an IPv4 address, but
#: that a webhook must never reach. IPv4 multicast and the IPv6 blocks outside 2000::/3 are
#: covered by ``is_multicast`` and ``is_reserved``.
_NEVER_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "::/96",             # IPv4-compatible (deprecated), also :: and ::1
    "::ffff:0:0:0/96",   # IPv4-translated (SIIT)
    "64:ff9b:1::/48",    # NAT64 local use
    "fec0::/10",         # site-local (deprecated)
    "3fff::/20",         # documentation (RFC 9637)
    "5f00::/16",         # SRv6 SIDs
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: A host whose last label is a number is an IPv4 address to URL parsers and inet_aton, which
#: accept decimal, octal (0177) and hex (0x7f) parts and fewer than four of them (127.1); only
#: the canonical dotted quad is accepted.
_NUMERIC_HOST = re.compile(r"(^|\.)(0x[0-9a-f]*|[0-9]+)\.?$", re.IGNORECASE)
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")


class UnsafeUrl(ValueError):
    """The URL must not be used as a webhook target; the message is safe to show."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL: connect to one of ``addresses`` (empty: allow-listed, not pinned)."""

    url: str
    host: str
    addresses: tuple[str, ...]


def is_public_address(ip: IPAddress) -> bool:
    """Whether a webhook may connect to ``ip``; embedded IPv4 addresses are judged themselves."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if ip.scope_id or ip.is_site_local:
            return False
    if any(ip in network for network in _NEVER_PUBLIC if network.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private)


def _parse(url: str) -> tuple[str, int, IPAddress | None]:
    """(host, port, the host if it is an IP literal) of a syntactically acceptable webhook URL."""
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise UnsafeUrl("webhook URL must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        split_port = parts.port
    except ValueError as exc:
        raise UnsafeUrl("webhook URL is malformed") from exc
    hostname = parts.hostname or ""
    if ":" not in hostname and _NUMERIC_HOST.search(hostname):
        try:
            ipaddress.IPv4Address(hostname)
        except ValueError:
            raise UnsafeUrl("webhook host must be a name or a canonical IP address") from None
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeUrl("webhook URL is malformed") from exc
    if parsed.scheme not in ("http", "https") or parts.scheme.lower() != parsed.scheme:
        raise UnsafeUrl("webhook URL must use http or https")
    if "@" in parts.netloc or parsed.userinfo:
        raise UnsafeUrl("webhook URL must not carry credentials")
    if "#" in url:
        raise UnsafeUrl("webhook URL must not have a fragment")
    host = parsed.raw_host.decode("ascii").lower()
    default_port = 443 if parsed.scheme == "https" else 80
    port = parsed.port or default_port
    # Both parsers must see the same host and port: the check and the request use one answer.
    if not host or host != (parts.hostname or "") or port != (split_port or default_port):
        raise UnsafeUrl("webhook URL must have a plain host name")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host) or len(host) > 253:
            raise UnsafeUrl("webhook URL must have a plain host name") from None
        return host, port, None
    if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
        raise UnsafeUrl(_not_public(host))
    return host, port, literal


def _allowed(host: str, allow_hosts: list[str]) -> bool:
    return host in allow_hosts or f"[{host}]" in allow_hosts


def resolve_webhook_target(url: str, allow_hosts: list[str]) -> WebhookTarget:
    """Check ``url`` and resolve its host once; raise UnsafeUrl if any address is not public."""
    host, port, literal = _parse(url)
    if _allowed(host, allow_hosts):
        return WebhookTarget(url=url, host=host, addresses=())
    if literal is not None:
        if not is_public_address(literal):
            raise UnsafeUrl(_not_public(host))
        return WebhookTarget(url=url, host=host, addresses=(str(literal),))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl(f"webhook host {host!r} does not resolve") from exc
    addresses: list[str] = []
    for info in infos:
        try:
            ip = ipaddress.ip_address(info[4][0])
        except ValueError:
            raise UnsafeUrl(_not_public(host)) from None
        if not is_public_address(ip):
            raise UnsafeUrl(_not_public(host))
        if str(ip) not in addresses:
            addresses.append(str(ip))
    if not addresses:
        raise UnsafeUrl(f"webhook host {host!r} does not resolve")
    return WebhookTarget(url=url, host=host, addresses=tuple(addresses))


def check_webhook_url(url: str, allow_hosts: list[str], *, resolve: bool = True) -> str:
    """Return the URL if it may be called; raise UnsafeUrl otherwise. Without ``resolve`` a host
    name is not looked up (an IP literal is still checked)."""
    if resolve:
        resolve_webhook_target(url, allow_hosts)
        return url
    host, _, literal = _parse(url)
    if literal is not None and not _allowed(host, allow_hosts) and not is_public_address(literal):
        raise UnsafeUrl(_not_public(host))
    return url


def _not_public(host: str) -> str:
    return (f"webhook host {host!r} is or resolves to a non-public address; "
            "an operator can allow it with LAKESAGA_WEBHOOK_ALLOW_HOSTS")


def redact_url(url: str) -> str:
    """The URL as shown to callers that may not see it in full: scheme, host and port; its
    path and query replaced by ``…``; they may carry a token."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    hidden = parts.path.strip("/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "") + ("/…" if hidden else "/")
