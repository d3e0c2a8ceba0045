"""signing: AWS's SigV4 test suite, AWS's S3 examples and RFC 4231 pin every rule.

The vectors under tests/data/aws-sigv4/ are AWS's own (see the README there); the key
values in them and below are AWS's documented example credentials, not secrets.
"""

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sealgate.signing import (
    SigV4Key,
    canonical_request,
    hmac_sha256_hex,
    parse_sigv4_value,
    payload_hash,
    signed_header_names,
    sigv4_authorization,
    string_to_sign,
)

DATA = Path(__file__).parent / "data" / "aws-sigv4"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

SUITE_KEY = SigV4Key("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_DATE = "20150830T123600Z"
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"
# botocore's copy: <name>/<name>.req|.creq|.sts|.authz, signed with service "service".
SUITE = sorted(p.parent.name for p in DATA.glob("*/*.req"))
# aws-c-auth's "normalize": false vectors: the path rules S3 follows (no normalising).
UNNORMALIZED = sorted(p.parent.name for p in DATA.glob("*/request.txt"))


def read_request(text: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """Split a raw test-suite request into method, target, headers and body.

    The target keeps its spaces and raw UTF-8, as the suite sends it. A folded header line
    stays in the value, line break and all, as mitmproxy hands it over.
    """
    head, _, body = text.partition("\n\n")
    request_line, *lines = head.split("\n")
    method, rest = request_line.split(" ", 1)
    target = rest.rsplit(" ", 1)[0]
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        elif line:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, target, headers, body.encode()


def read(name: str, file: str) -> str:
    return (DATA / name / file).read_text(encoding="utf-8")


def test_the_vectors_are_all_there():
    """A lost data folder must fail here, not shrink the tables below to nothing."""
    assert len(SUITE) == 33
    assert len(UNNORMALIZED) == 7


@pytest.mark.parametrize("name", SUITE)
def test_aws_sigv4_suite(name):
    """Canonical request, string to sign and Authorization, byte for byte."""
    method, target, headers, body = read_request(read(name, f"{name}.req"))
    expected_authz = read(name, f"{name}.authz")
    signed = expected_authz.split("SignedHeaders=")[1].split(",")[0].split(";")

    creq = canonical_request(
        method, target, headers, signed, payload_hash(body), service="service"
    )
    assert creq == read(name, f"{name}.creq")
    assert string_to_sign(SUITE_DATE, SUITE_SCOPE, creq) == read(name, f"{name}.sts")
    authorization, signature = sigv4_authorization(
        SUITE_KEY,
        method=method,
        target=target,
        headers=headers,
        payload_hash=payload_hash(body),
        region="us-east-1",
        service="service",
        amz_date=SUITE_DATE,
        signed_headers=signed,
    )
    assert authorization == expected_authz
    assert expected_authz.endswith(f"Signature={signature}")


@pytest.mark.parametrize("name", UNNORMALIZED)
def test_s3_paths_are_not_normalised(name):
    """aws-c-auth's unnormalised vectors: '//', '.' and '..' are part of an S3 key."""
    method, target, headers, _ = read_request(read(name, "request.txt"))
    headers.append(("X-Amz-Date", SUITE_DATE))  # aws-c-auth's signer adds it itself
    creq = canonical_request(
        method, target, headers, ["host", "x-amz-date"], EMPTY_SHA256, service="s3"
    )
    assert creq == read(name, "header-canonical-request.txt")
    assert string_to_sign(SUITE_DATE, SUITE_SCOPE, creq) == read(name, "header-string-to-sign.txt")


# AWS S3 API Reference, "Signature Calculations for the Authorization Header: Transferring
# Payload in a Single Chunk", examples. Signed headers None means sealgate's default set.
S3_KEY = SigV4Key("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_HOST = ("Host", "examplebucket.s3.amazonaws.com")
S3_DATE = ("x-amz-date", "20130524T000000Z")
PUT_BODY_SHA256 = payload_hash(b"Welcome to Amazon S3.")
PUT_HEADERS = [
    S3_HOST,
    ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
    S3_DATE,
    ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
    ("x-amz-content-sha256", PUT_BODY_SHA256),
]
PUT_SIGNED = ["date", "host", "x-amz-content-sha256", "x-amz-date", "x-amz-storage-class"]
S3_EXAMPLES = {
    "get-object": (
        "GET", "/test.txt",
        [S3_HOST, ("Range", "bytes=0-9"), ("x-amz-content-sha256", EMPTY_SHA256), S3_DATE],
        ["host", "range", "x-amz-content-sha256", "x-amz-date"], EMPTY_SHA256,
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    "put-object": (
        "PUT", "/test$file.text", PUT_HEADERS, PUT_SIGNED, PUT_BODY_SHA256,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "put-object-encoded-key": (
        "PUT", "/test%24file.text", PUT_HEADERS, PUT_SIGNED, PUT_BODY_SHA256,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "get-bucket-lifecycle": (
        "GET", "/?lifecycle", [S3_HOST, ("x-amz-content-sha256", EMPTY_SHA256), S3_DATE],
        None, EMPTY_SHA256,
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    "list-objects": (
        "GET", "/?max-keys=2&prefix=J", [S3_HOST, ("x-amz-content-sha256", EMPTY_SHA256), S3_DATE],
        None, EMPTY_SHA256,
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
}


@pytest.mark.parametrize(
    ("method", "target", "headers", "signed", "body_hash", "signature"),
    list(S3_EXAMPLES.values()),
    ids=list(S3_EXAMPLES),
)
def test_s3_documentation_examples(method, target, headers, signed, body_hash, signature):
    """S3 encodes the key once: '$' and '%24' both sign as '%24', never '%2524'."""
    authorization, got = sigv4_authorization(
        S3_KEY,
        method=method,
        target=target,
        headers=headers,
        payload_hash=body_hash,
        region="us-east-1",
        service="s3",
        amz_date="20130524T000000Z",
        signed_headers=signed,
    )
    assert got == signature
    assert authorization.startswith(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
    )


def test_s3_get_object_intermediate_steps():
    """The documentation also prints the canonical request and string to sign."""
    method, target, headers, signed, body_hash, _ = S3_EXAMPLES["get-object"]
    creq = canonical_request(method, target, headers, signed, body_hash, service="s3")
    assert creq == (
        "GET\n/test.txt\n\n"
        "host:examplebucket.s3.amazonaws.com\n"
        "range:bytes=0-9\n"
        f"x-amz-content-sha256:{EMPTY_SHA256}\n"
        "x-amz-date:20130524T000000Z\n\n"
        "host;range;x-amz-content-sha256;x-amz-date\n"
        f"{EMPTY_SHA256}"
    )
    assert string_to_sign("20130524T000000Z", "20130524/us-east-1/s3/aws4_request", creq) == (
        "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )


def canonical_uri(target: str, service: str) -> str:
    creq = canonical_request("GET", target, [("Host", "h")], ["host"], "", service=service)
    return creq.split("\n")[1]


@pytest.mark.parametrize(
    ("target", "s3", "other"),
    [
        ("/test$file.text", "/test%24file.text", "/test%24file.text"),
        ("/test%24file.text", "/test%24file.text", "/test%2524file.text"),
        ("/example%20space/", "/example%20space/", "/example%2520space/"),
        ("/my-object//example//photo.user",
         "/my-object//example//photo.user",
         "/my-object/example/photo.user"),
        ("/a/./b/../c/", "/a/./b/../c/", "/a/c/"),
        ("/a/b/..", "/a/b/..", "/a"),
        ("/../a", "/../a", "/a"),
        ("/\u1234 x", "/%E1%88%B4%20x", "/%E1%88%B4%20x"),
        ("/%e1%88%b4", "/%E1%88%B4", "/%25e1%2588%25b4"),
        ("/a+b~c", "/a%2Bb~c", "/a%2Bb~c"),
    ],
)
def test_canonical_uri(target, s3, other):
    """S3 decodes then encodes once, unnormalised; other services normalise and encode as sent."""
    assert canonical_uri(target, "s3") == s3
    assert canonical_uri(target, "service") == other


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("", ""),
        ("b=2&a=1", "a=1&b=2"),
        ("a=1&&b=2&", "a=1&b=2"),
        ("lifecycle", "lifecycle="),
        ("a=2&a=1&a=", "a=&a=1&a=2"),
        ("k=v=w", "k=v%3Dw"),
        ("q=a+b", "q=a%2Bb"),
        ("q=a b&r=a%20b", "q=a%20b&r=a%20b"),
        ("t=%7e&t=~", "t=~&t=~"),
        ("%e1%88%b4=%2F", "%E1%88%B4=%2F"),
        ("a/b=c/d", "a%2Fb=c%2Fd"),
    ],
)
def test_canonical_query(query, canonical):
    """Decoded first, so any spelling of a parameter signs the same; '+' is a literal plus."""
    for service in ("s3", "service"):
        creq = canonical_request(
            "GET", f"/?{query}", [("Host", "h")], ["host"], "", service=service
        )
        assert creq.split("\n")[2] == canonical


@pytest.mark.parametrize(
    ("values", "canonical"),
    [
        (["a"], "a"),
        (["  a \t b  "], "a b"),
        (["a\r\n b"], "a b"),
        (["b", " a "], "b,a"),
        (["", "x"], ",x"),
    ],
)
def test_canonical_header_values(values, canonical):
    headers = [("Host", "h")] + [("X-Amz-Meta", v) for v in values]
    creq = canonical_request("GET", "/", headers, ["Host", "X-Amz-Meta"], "", service="service")
    assert creq.split("\n")[4] == f"x-amz-meta:{canonical}"


def test_bytes_that_are_not_utf8_are_signed_as_sent():
    """mitmproxy hands such bytes over as surrogate escapes; they sign as the raw byte."""
    assert canonical_uri("/a\udcff", "s3") == canonical_uri("/a\udcff", "service") == "/a%FF"
    creq = canonical_request(
        "GET", "/", [("Host", "h\udcff")], ["host"], EMPTY_SHA256, service="service"
    )
    assert string_to_sign(SUITE_DATE, SUITE_SCOPE, creq).endswith(
        payload_hash(f"GET\n/\n\nhost:h\xff\n\nhost\n{EMPTY_SHA256}".encode("latin-1"))
    )


def test_a_signed_header_must_be_present():
    with pytest.raises(ValueError, match="missing from the request: range"):
        canonical_request("GET", "/", [("Host", "h")], ["host", "range"], "", service="s3")


@pytest.mark.parametrize(
    ("headers", "names"),
    [
        ([], ["host"]),
        ([("Host", "h"), ("X-Amz-Date", "d")], ["host", "x-amz-date"]),
        (
            [("X-AMZ-Content-SHA256", "x"), ("x-amz-date", "d"), ("X-Amz-Date", "d"),
             ("Content-Type", "t")],
            ["host", "x-amz-content-sha256", "x-amz-date"],
        ),
        (
            [("x-amzn-trace-id", "t"), ("my-x-amz-header", "m"), ("X-Amz-Security-Token", "s"),
             ("Authorization", "a")],
            ["host", "x-amz-security-token"],
        ),
    ],
)
def test_signed_header_names(headers, names):
    assert signed_header_names(headers) == names


@pytest.mark.parametrize(
    ("key", "data", "mac"),
    [
        # RFC 4231 test cases 1, 2 and 4. Case 3's key is twenty 0xaa bytes, which no str
        # encodes to in UTF-8, so it cannot be put to a str-keyed function.
        ("\x0b" * 20, b"Hi There",
         "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        ("Jefe", b"what do ya want for nothing?",
         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        ("".join(map(chr, range(1, 26))), b"\xcd" * 50,
         "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    ],
    ids=["rfc4231-1", "rfc4231-2", "rfc4231-4"],
)
def test_hmac_sha256_hex(key, data, mac):
    assert hmac_sha256_hex(key, data) == mac


def test_payload_hash():
    assert payload_hash(b"") == EMPTY_SHA256
    assert payload_hash(b"Welcome to Amazon S3.") == (
        "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    )


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
         SigV4Key("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")),
        ("AKIAIOSFODNN7EXA:se:cret+/=", SigV4Key("AKIAIOSFODNN7EXA", "se:cret+/=")),
        ("A" * 128 + ":s", SigV4Key("A" * 128, "s")),
    ],
)
def test_parse_sigv4_value(value, key):
    assert parse_sigv4_value(value) == key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "no colon"),
        (":wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "empty"),
        ("AKIAIOSFODNN7EXAMPLE:", "empty"),
        ("AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "got 11 characters"),
        ("A" * 129 + ":wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "got 129 characters"),
        ("akiaiosfodnn7example:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "A-Z and 0-9"),
        ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY:AKIAIOSFODNN7EXAMPLE", "A-Z and 0-9"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG bPxRfiCYEXAMPLEKEY", "whitespace"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", "whitespace"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG\tbPxRfiCYEXAMPLEKEY", "whitespace"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG\x00bPxRfiCYEXAMPLEKEY", "control"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG\x7fbPxRfiCYEXAMPLEKEY", "control"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG\u200bbPxRfiCYEXAMPLEKEY", "control"),
        ("AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG\xa0bPxRfiCYEXAMPLEKEY", "whitespace"),
    ],
)
def test_parse_sigv4_value_rejects(value, message):
    """Errors explain the problem but quote neither part: either may be the secret."""
    with pytest.raises(ValueError, match=message) as error:
        parse_sigv4_value(value)
    for part in value.split(":"):
        assert not part or part not in str(error.value)


def test_repr_hides_the_secret():
    key = SigV4Key("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert repr(key) == "SigV4Key(access_key_id='AKIAIOSFODNN7EXAMPLE')"
    assert "bPxRfiCY" not in str(key)


def test_default_signed_headers():
    """Without signed_headers, host and the x-amz-* headers are signed, nothing else."""
    headers = [("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE), ("User-Agent", "ua")]
    authorization, _ = sigv4_authorization(
        SUITE_KEY, method="GET", target="/", headers=headers, payload_hash=EMPTY_SHA256,
        region="us-east-1", service="service", amz_date=SUITE_DATE,
    )
    assert authorization == read("get-vanilla", "get-vanilla.authz")


TOKEN = st.text(string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=8)


@st.composite
def requests(draw):
    """A request as sigv4_authorization takes it; header values hold no whitespace, so any
    change to one is a change to the canonical request."""
    names = draw(st.lists(TOKEN.map(lambda t: "x-amz-" + t.lower()), unique=True, max_size=4))
    query = draw(st.lists(st.tuples(TOKEN, TOKEN), max_size=3))
    return {
        "method": draw(st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE"])),
        "path": "/" + "/".join(draw(st.lists(TOKEN, max_size=4))),
        "query": "&".join(f"{k}={v}" for k, v in query),
        "headers": [("Host", draw(TOKEN))] + [(name, draw(TOKEN)) for name in names],
        "payload_hash": payload_hash(draw(st.binary(max_size=8))),
        "service": draw(st.sampled_from(["s3", "service"])),
    }


def sign(request) -> str:
    return sigv4_authorization(
        SUITE_KEY,
        method=request["method"],
        target=f"{request['path']}?{request['query']}",
        headers=request["headers"],
        payload_hash=request["payload_hash"],
        region="us-east-1",
        service=request["service"],
        amz_date=SUITE_DATE,
    )[1]


@given(requests(), st.data())
def test_signature_is_deterministic_and_covers_every_signed_part(req, data):
    signature = sign(req)
    assert sign(req) == signature

    headers = req["headers"]
    i = data.draw(st.integers(0, len(headers) - 1))
    changed_header = headers[:i] + [(headers[i][0], headers[i][1] + "z")] + headers[i + 1:]
    other_method = data.draw(st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE"]).filter(
        lambda m: m != req["method"]))
    other_hash = payload_hash(req["payload_hash"].encode())
    for change in (
        {"headers": changed_header},
        {"method": other_method},
        {"path": req["path"] + "/z"},
        {"query": req["query"] + "&z=1"},
        {"payload_hash": other_hash},
    ):
        assert sign(req | change) != signature, change
