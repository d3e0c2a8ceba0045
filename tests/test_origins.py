"""origins: parsing, normalisation and matching, as tables; and properties under hypothesis."""

import pytest
from hypothesis import given, strategies as st

from sealgate import origins
from sealgate.origins import Origin, OriginError


@pytest.mark.parametrize("text, expected", [
    ("https://api.example.com", "https://api.example.com"),
    ("HTTPS://API.Example.COM", "https://api.example.com"),
    ("https://api.example.com.", "https://api.example.com"),
    ("https://api.example.com:443", "https://api.example.com"),
    ("https://api.example.com/", "https://api.example.com"),
    ("https://api.example.com:8443", "https://api.example.com:8443"),
    ("  https://api.example.com  ", "https://api.example.com"),
    ("https://bücher.example", "https://xn--bcher-kva.example"),
    ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("https://[0:0:0:0:0:0:0:1]", "https://[::1]"),
    ("https://*.example.com", "https://*.example.com"),
    ("https://my_service.internal", "https://my_service.internal"),
])
def test_parse_normalises(text, expected):
    assert str(origins.parse(text)) == expected


def test_http_needs_opt_in():
    with pytest.raises(OriginError, match="--allow-http"):
        origins.parse("http://api.example.com")
    assert str(origins.parse("http://api.example.com:80", allow_http=True)) == "http://api.example.com"


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("api.example.com", "no scheme"),
    ("ftp://api.example.com", "scheme 'ftp'"),
    ("https://api.example.com/v1", "a path"),
    ("https://api.example.com?x=1", "a query"),
    ("https://api.example.com#frag", "a fragment"),
    ("https://user:pw@api.example.com", "userinfo"),
    ("https://api.example.com:0", "invalid port"),
    ("https://api.example.com:65536", "invalid port"),
    ("https://api.example.com:http", "invalid port"),
    ("https://", "empty"),
    ("https://::1", "brackets"),
    ("https://[::1", "unclosed"),
    ("https://[nope]", "IPv6"),
    ("https://2130706433", "dotted quad"),
    ("https://0x7f.0.0.1", "dotted quad"),
    ("https://127.1", "dotted quad"),
    ("https://*.com", "wildcard"),
    ("https://a.*.example.com", "wildcard"),
    ("https://*", "wildcard"),
    ("https://exa mple.com", "not a valid host"),
    ("https://-bad-.example.com", "not a valid host"),
    ("https://example.123", "numeric label"),
    ("https://xn--zz.example", "punycode"),
])
def test_parse_refuses_with_reason(text, says):
    with pytest.raises(OriginError) as e:
        origins.parse(text)
    assert says in str(e.value)


def test_parse_list():
    got = origins.parse_list("https://a.example, https://b.example,https://a.example")
    assert [str(o) for o in got] == ["https://a.example", "https://b.example"]
    with pytest.raises(OriginError, match="at least one"):
        origins.parse_list(" , ")
    with pytest.raises(OriginError, match="a path"):
        origins.parse_list("https://a.example,https://b.example/x")


@pytest.mark.parametrize("origin, scheme, host, port, ok", [
    ("https://api.example.com", "https", "api.example.com", 443, True),
    ("https://api.example.com", "http", "api.example.com", 80, False),
    ("https://api.example.com", "https", "api.example.com", 8443, False),
    ("https://api.example.com", "https", "evil.example.com", 443, False),
    ("https://api.example.com", "https", "api.example.com.evil.test", 443, False),
    ("https://api.example.com", "https", "xapi.example.com", 443, False),
    ("https://*.example.com", "https", "a.example.com", 443, True),
    ("https://*.example.com", "https", "a.b.example.com", 443, True),
    ("https://*.example.com", "https", "example.com", 443, False),
    ("https://*.example.com", "https", "evilexample.com", 443, False),
    ("https://127.0.0.1:8443", "https", "127.0.0.1", 8443, True),
])
def test_matches(origin, scheme, host, port, ok):
    assert origins.parse(origin, allow_http=True).matches(scheme, host, port) is ok


@given(st.text(max_size=80))
def test_parse_never_crashes(text):
    try:
        o = origins.parse(text, allow_http=True)
    except OriginError:
        return
    assert isinstance(o, Origin)


hosts = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,10}(\.[a-zA-Z][a-zA-Z0-9-]{0,10}){0,3}\.?", fullmatch=True)


@given(st.sampled_from(["http", "https", "HTTPS"]), hosts | st.text(min_size=1, max_size=20),
       st.none() | st.integers(1, 65535))
def test_normalisation_is_idempotent(scheme, host, port):
    text = f"{scheme}://{host}" + (f":{port}" if port else "")
    try:
        o = origins.parse(text, allow_http=True)
    except OriginError:
        return
    assert origins.parse(str(o), allow_http=True) == o
