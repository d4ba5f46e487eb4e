"""The webhook SSRF guard: a table of concrete attack inputs, and properties over every encoding
of non-global IPv4 addresses, their IPv6 embeddings, global addresses and arbitrary text.

No DNS is needed: IP literals and numeric forms are judged without a lookup, and the only names
used are ``localhost`` (hosts file) and ``.invalid`` (never resolves).
"""

from __future__ import annotations

import ipaddress
import socket

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from app.notify.urls import (
    UnsafeUrl,
    WebhookTarget,
    check_webhook_url,
    is_public_address,
    redact_url,
    resolve_webhook_target,
)
from app.notify.webhooks import pinned_request

NON_PUBLIC = "non-public address"
CANONICAL = "canonical IP address"
SCHEME = "http or https"
CREDENTIALS = "credentials"
ASCII = "printable ASCII"
PLAIN_HOST = "plain host name"

ATTACKS = [
    ("http://127.0.0.1/", NON_PUBLIC),
    ("http://127.255.255.254:8080/x", NON_PUBLIC),
    ("http://localhost/", NON_PUBLIC),
    ("http://LOCALHOST:8080/", NON_PUBLIC),
    ("http://[::1]/", NON_PUBLIC),
    ("http://10.0.0.1/", NON_PUBLIC),
    ("http://172.16.0.1/", NON_PUBLIC),
    ("http://192.168.1.1/", NON_PUBLIC),
    ("http://169.254.169.254/latest/meta-data/", NON_PUBLIC),
    ("http://[fd00:ec2::254]/latest/meta-data/", NON_PUBLIC),
    ("http://100.64.0.1/", NON_PUBLIC),
    ("http://100.127.255.254/", NON_PUBLIC),
    ("http://0.0.0.0/", NON_PUBLIC),
    ("http://0.0.0.0:8000/", NON_PUBLIC),
    ("http://[::]/", NON_PUBLIC),
    ("http://224.0.0.1/", NON_PUBLIC),
    ("http://239.255.255.250:1900/", NON_PUBLIC),
    ("http://[ff02::1]/", NON_PUBLIC),
    ("http://[ff0e::1]/", NON_PUBLIC),
    ("http://240.0.0.1/", NON_PUBLIC),
    ("http://255.255.255.255/", NON_PUBLIC),
    ("http://192.0.2.1/", NON_PUBLIC),
    ("http://198.18.0.1/", NON_PUBLIC),
    ("http://[fe80::1]/", NON_PUBLIC),
    ("http://[fe80::1%25eth0]/", NON_PUBLIC),
    ("http://[fec0::1]/", NON_PUBLIC),
    ("http://[fc00::1]/", NON_PUBLIC),
    ("http://[2001:db8::1]/", NON_PUBLIC),
    ("http://[3fff::1]/", NON_PUBLIC),
    ("http://[5f00::1]/", NON_PUBLIC),
    ("http://[2001::1]/", NON_PUBLIC),  # Teredo
    # IPv4-mapped, -translated and -compatible IPv6
    ("http://[::ffff:127.0.0.1]/", NON_PUBLIC),
    ("http://[::ffff:7f00:1]/", NON_PUBLIC),
    ("http://[::FFFF:7F00:1]/", NON_PUBLIC),
    ("http://[0:0:0:0:0:ffff:7f00:1]/", NON_PUBLIC),
    ("http://[::ffff:169.254.169.254]/", NON_PUBLIC),
    ("http://[::ffff:10.0.0.1]/", NON_PUBLIC),
    ("http://[::ffff:0:7f00:1]/", NON_PUBLIC),
    ("http://[::127.0.0.1]/", NON_PUBLIC),
    ("http://[::7f00:1]/", NON_PUBLIC),
    ("http://[::8.8.8.8]/", NON_PUBLIC),  # IPv4-compatible is deprecated: never
    # NAT64 and 6to4 embeddings
    ("http://[64:ff9b::127.0.0.1]/", NON_PUBLIC),
    ("http://[64:ff9b::7f00:1]/", NON_PUBLIC),
    ("http://[64:ff9b::a9fe:a9fe]/", NON_PUBLIC),
    ("http://[64:ff9b::a00:1]/", NON_PUBLIC),
    ("http://[64:ff9b:1::a00:1]/", NON_PUBLIC),
    ("http://[2002:7f00:1::1]/", NON_PUBLIC),
    ("http://[2002:a9fe:a9fe::]/", NON_PUBLIC),
    ("http://[2002:c0a8:101::1]/", NON_PUBLIC),
    # numeric host forms that resolvers decode to 127.0.0.1 / 192.168.1.1
    ("http://2130706433/", CANONICAL),
    ("http://0177.0.0.1/", CANONICAL),
    ("http://0x7f.0.0.1/", CANONICAL),
    ("http://0X7F.0.0.1/", CANONICAL),
    ("http://0x7f000001/", CANONICAL),
    ("http://017700000001/", CANONICAL),
    ("http://127.1/", CANONICAL),
    ("http://127.0.1/", CANONICAL),
    ("http://127.000.000.001/", CANONICAL),
    ("http://127.0.0.1./", CANONICAL),
    ("http://0/", CANONICAL),
    ("http://3232235777/", CANONICAL),
    ("http://0xc0.0xa8.1.1/", CANONICAL),
    ("http://evil.example.0x7f/", CANONICAL),
    # scheme, credentials, fragment, syntax
    ("ftp://example.com/", SCHEME),
    ("file:///etc/passwd", SCHEME),
    ("gopher://127.0.0.1:6379/_INFO", SCHEME),
    ("javascript:alert(1)", SCHEME),
    ("//example.com/hook", SCHEME),
    ("http://user:pw@example.com/", CREDENTIALS),
    ("http://user@example.com/", CREDENTIALS),
    ("http://@example.com/", CREDENTIALS),
    ("http://evil.com\\@127.0.0.1/", CREDENTIALS),
    ("http://example.com@127.0.0.1/", CREDENTIALS),
    ("http://example.com/#frag", "fragment"),
    ("http://exa mple.com/", ASCII),
    ("http://127.0.0.1:9/hook\x01", ASCII),
    ("http://ex\u00e4mple.com/", ASCII),
    ("http://example.com\t/", ASCII),
    ("http://%31%32%37.0.0.1/", CANONICAL),
    ("http://%6c%6f%63%61%6c%68%6f%73%74/", PLAIN_HOST),
    ("http:///path", PLAIN_HOST),
    ("http://:80/", PLAIN_HOST),
    ("http://example.com:99999/", "malformed"),
    ("http://[::1/", "malformed"),
    ("http://nonexistent.invalid/", "does not resolve"),
]


@pytest.mark.parametrize(("url", "message"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_check_webhook_url__attack_input_is_refused(url: str, message: str) -> None:
    with pytest.raises(UnsafeUrl) as refused:
        check_webhook_url(url, [])
    assert message in str(refused.value)
    # the message goes back to the client: it names no resolved address
    assert "127.0.0.1" not in str(refused.value) or "127.0.0.1" in url


ACCEPTED = [
    "http://8.8.8.8/",
    "https://1.1.1.1:8443/hook?x=1",
    "http://[2606:4700:4700::1111]/hook",
    "http://[::ffff:8.8.8.8]/",
    "http://[64:ff9b::808:808]/",
    "http://[2002:808:808::1]/",
    "HTTPS://8.8.4.4/",
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_check_webhook_url__public_address_is_accepted(url: str) -> None:
    assert check_webhook_url(url, []) == url


@pytest.mark.parametrize(("url", "allow_hosts"), [
    ("http://127.0.0.1:9/hook", ["127.0.0.1"]),
    ("http://localhost:8080/", ["localhost"]),
    ("http://LOCALHOST:8080/", ["localhost"]),
    ("http://[::1]/", ["::1"]),
    ("http://[::1]/", ["[::1]"]),
    ("http://10.0.0.5/", ["10.0.0.5"]),
])
def test_check_webhook_url__allow_listed_host_is_accepted(url: str, allow_hosts: list[str]) -> None:
    assert check_webhook_url(url, allow_hosts) == url
    assert resolve_webhook_target(url, allow_hosts).addresses == ()  # not pinned


@pytest.mark.parametrize(("url", "allow_hosts"), [
    ("http://2130706433/", ["127.0.0.1"]),
    ("http://127.1/", ["127.0.0.1"]),
    ("http://[::ffff:127.0.0.1]/", ["127.0.0.1"]),
    ("http://127.0.0.1/", ["localhost"]),
    ("http://user@127.0.0.1/", ["127.0.0.1"]),
    ("ftp://127.0.0.1/", ["127.0.0.1"]),
])
def test_check_webhook_url__allow_list_matches_the_host_exactly(url: str,
                                                               allow_hosts: list[str]) -> None:
    with pytest.raises(UnsafeUrl):
        check_webhook_url(url, allow_hosts)


def test_check_webhook_url__without_resolve_still_checks_literals() -> None:
    assert check_webhook_url("http://hooks.example/", [], resolve=False) == "http://hooks.example/"
    with pytest.raises(UnsafeUrl, match=NON_PUBLIC):
        check_webhook_url("http://[::ffff:10.0.0.1]/", [], resolve=False)
    with pytest.raises(UnsafeUrl, match=CANONICAL):
        check_webhook_url("http://0x0a.1/", [], resolve=False)


def test_is_public_address__closes_the_gaps_of_is_global() -> None:
    """Addresses Python 3.11's ``is_global`` calls global that the guard must refuse."""
    gaps = ["224.0.0.1", "::7f00:1", "64:ff9b::7f00:1", "64:ff9b:1::a00:1", "2002:7f00:1::",
            "fec0::1", "3fff::1", "5f00::1", "::ffff:0:7f00:1", "ff0e::1"]
    for text in gaps:
        ip = ipaddress.ip_address(text)
        assert not is_public_address(ip), text


# -- properties -----------------------------------------------------------------------------------

NON_GLOBAL_V4 = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/29", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
)]


@st.composite
def non_global_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    network = draw(st.sampled_from(NON_GLOBAL_V4))
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network[offset]


global_ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address).filter(
    lambda ip: ip.is_global and not ip.is_multicast)


def _number(draw: st.DrawFn, value: int) -> str:
    form = draw(st.sampled_from(["dec", "oct", "hex", "HEX", "zeros"]))
    if form == "dec":
        return str(value)
    if form == "oct":
        return "0" + format(value, "o")
    if form == "hex":
        return "0x" + format(value, "x")
    if form == "HEX":
        return "0X" + format(value, "X")
    return "0" * draw(st.integers(1, 3)) + str(value) if value < 8 else "0" + format(value, "o")


@st.composite
def numeric_forms(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    """A non-canonical spelling of ``ip`` that inet_aton decodes to it: 1 to 4 parts, each in
    decimal, octal or hex (the last part holds the remaining bytes), maybe a trailing dot."""
    value = int(ip)
    parts = draw(st.integers(1, 4))
    octets = [(value >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    last = value & ((1 << (8 * (5 - parts))) - 1)
    numbers = [*octets[: parts - 1], last]
    text = ".".join(_number(draw, n) for n in numbers)
    if text == str(ip) or draw(st.booleans()):
        text += "."
    return text


@given(data=st.data(), ip=non_global_ipv4())
def test_property__non_global_ipv4_in_any_numeric_encoding_is_refused(
        data: st.DataObject, ip: ipaddress.IPv4Address) -> None:
    host = data.draw(numeric_forms(ip))
    if not host.endswith("."):
        assert socket.inet_aton(host) == ip.packed  # the encoding means what it should
    with pytest.raises(UnsafeUrl, match=CANONICAL):
        check_webhook_url(f"http://{host}/", [])
    with pytest.raises(UnsafeUrl, match=NON_PUBLIC):
        check_webhook_url(f"http://{ip}/", [])


@given(ip=non_global_ipv4(), form=st.sampled_from(["mapped", "mapped_hex", "compatible", "nat64",
                                                     "6to4", "siit"]))
def test_property__ipv6_embedding_of_non_global_ipv4_is_refused(
        ip: ipaddress.IPv4Address, form: str) -> None:
    url = f"http://[{_embed(ip, form)}]:8080/hook"
    with pytest.raises(UnsafeUrl, match=NON_PUBLIC):
        check_webhook_url(url, [])


@given(ip=global_ipv4, form=st.sampled_from(["plain", "mapped", "mapped_hex", "nat64", "6to4"]))
@example(ip=ipaddress.IPv4Address("8.8.8.8"), form="plain")
def test_property__global_ipv4_is_accepted_plain_and_embedded(
        ip: ipaddress.IPv4Address, form: str) -> None:
    host = str(ip) if form == "plain" else f"[{_embed(ip, form)}]"
    url = f"https://{host}/hook"
    assert check_webhook_url(url, []) == url
    (address,) = resolve_webhook_target(url, []).addresses
    assert ipaddress.ip_address(address) == ipaddress.ip_address(host.strip("[]"))


@given(ip=global_ipv4)
def test_property__ipv4_compatible_form_is_refused_even_for_global(
        ip: ipaddress.IPv4Address) -> None:
    with pytest.raises(UnsafeUrl, match=NON_PUBLIC):
        check_webhook_url(f"http://[::{ip}]/", [])


ALWAYS_REFUSED_V6 = [ipaddress.IPv6Network(n) for n in (
    "::/96", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "2001:db8::/32", "2001::/32",
    "3fff::/20", "100::/64", "64:ff9b:1::/48",
)]
MAYBE_PUBLIC_V6 = [ipaddress.IPv6Network(n) for n in ("2000::/3", "64:ff9b::/96", "::ffff:0:0/96")]


@given(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
@example(ipaddress.IPv6Address("2606:4700::1111"))
def test_property__ipv6_accepted_only_in_global_unicast(ip: ipaddress.IPv6Address) -> None:
    url = f"http://[{ip}]/"
    try:
        check_webhook_url(url, [])
    except UnsafeUrl:
        return
    assert any(ip in n for n in MAYBE_PUBLIC_V6), ip
    assert not any(ip in n for n in ALWAYS_REFUSED_V6), ip
    embedded = ip.ipv4_mapped or ip.sixtofour
    if ip in MAYBE_PUBLIC_V6[1]:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    assert embedded is None or (embedded.is_global and not embedded.is_multicast), ip


@given(st.text())
def test_property__arbitrary_text_raises_only_unsafe_url(text: str) -> None:
    try:
        check_webhook_url(text, ["allowed.example"], resolve=False)
    except UnsafeUrl as exc:
        assert str(exc)


url_like = st.builds(
    lambda scheme, userinfo, host, port, rest: f"{scheme}{userinfo}{host}{port}{rest}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:/", "http:", ""]),
    st.sampled_from(["", "user@", "u:p@", "@", "a@b@"]),
    st.one_of(st.from_regex(r"[0-9a-fA-FxX.]{1,20}", fullmatch=True),
              st.from_regex(r"\[[0-9a-fA-F:.%]{0,40}\]", fullmatch=True),
              st.text(max_size=20)),
    st.one_of(st.just(""), st.integers(-1, 70000).map(lambda p: f":{p}"), st.text(max_size=4)),
    st.text(max_size=20),
)


@given(url_like)
def test_property__url_shaped_text_raises_only_unsafe_url(url: str) -> None:
    try:
        result = check_webhook_url(url, [], resolve=False)
    except UnsafeUrl as exc:
        assert str(exc)
        return
    parsed = httpx.URL(result)
    assert parsed.scheme in ("http", "https") and not parsed.userinfo and not parsed.fragment
    try:
        ip = ipaddress.ip_address(parsed.host)
    except ValueError:
        return
    assert is_public_address(ip)


def _embed(ip: ipaddress.IPv4Address, form: str) -> str:
    value = int(ip)
    hi, lo = f"{value >> 16:x}", f"{value & 0xFFFF:x}"
    return {
        "mapped": f"::ffff:{ip}",
        "mapped_hex": f"::ffff:{hi}:{lo}",
        "compatible": f"::{ip}",
        "nat64": f"64:ff9b::{ip}",
        "6to4": f"2002:{hi}:{lo}::1",
        "siit": f"::ffff:0:{ip}",
    }[form]


# -- the pinned request ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "address", "expected_url", "host_header", "sni"), [
    ("https://hooks.example/a?b=1", "93.184.215.14", "https://93.184.215.14/a?b=1",
     "hooks.example", "hooks.example"),
    ("https://hooks.example:8443/a", "2606:4700::1111", "https://[2606:4700::1111]:8443/a",
     "hooks.example:8443", "hooks.example"),
    ("http://hooks.example:8080/a", "93.184.215.14", "http://93.184.215.14:8080/a",
     "hooks.example:8080", None),
])
def test_pinned_request__goes_to_the_address_as_the_host(
        url: str, address: str, expected_url: str, host_header: str, sni: str | None) -> None:
    with httpx.Client() as client:
        request = pinned_request(client, WebhookTarget(url=url, host="hooks.example",
                                                       addresses=(address,)),
                                 address, b"{}", {"webhook-id": "k"})
    assert str(request.url) == expected_url
    assert request.headers["host"] == host_header
    assert request.headers["webhook-id"] == "k"
    assert request.extensions.get("sni_hostname") == sni


def test_pinned_request__unpinned_target_keeps_the_url() -> None:
    with httpx.Client() as client:
        request = pinned_request(client, WebhookTarget(url="http://127.0.0.1:9/x", host="127.0.0.1",
                                                       addresses=()), None, b"{}", {})
    assert str(request.url) == "http://127.0.0.1:9/x"
    assert request.headers["host"] == "127.0.0.1:9"
    assert "sni_hostname" not in request.extensions


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.example.com/lake?token=abc", "https://hooks.example.com/…"),
    ("https://hooks.example.com/a/b/c", "https://hooks.example.com/…"),
    ("https://hooks.example.com?token=abc", "https://hooks.example.com/…"),
    ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/…"),
    ("http://[2001:db8::1]:8080/x", "http://[2001:db8::1]:8080/…"),
    ("https://hooks.example.com/", "https://hooks.example.com/"),
    ("https://hooks.example.com", "https://hooks.example.com/"),
])
def test_redact_url__keeps_scheme_host_and_port_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown

