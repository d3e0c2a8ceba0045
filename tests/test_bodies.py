"""bodies: decoding within a bound, and only the codings clients send."""

import gzip
import zlib

import brotli
import pytest
from hypothesis import given, strategies as st

from sealgate import bodies

try:
    from compression import zstd
except ImportError:
    from backports import zstd

CODECS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress,
          "br": brotli.compress, "zstd": zstd.compress, "identity": lambda b: b}


@given(st.binary(max_size=2000), st.sampled_from(sorted(CODECS)))
def test_round_trip(data, coding):
    assert bodies.decode(CODECS[coding](data), coding, 4096) == data


@pytest.mark.parametrize("coding", sorted(set(CODECS) - {"identity"}))
def test_bound_and_truncation(coding):
    big = CODECS[coding](b"\0" * 100_000)
    with pytest.raises(bodies.BodyError, match="larger than 1000 bytes"):
        bodies.decode(big, coding, 1000)
    with pytest.raises(bodies.BodyError):
        bodies.decode(big[: len(big) // 2], coding, 1_000_000)


def test_stacked_members_raw_deflate_and_refusals():
    assert bodies.decode(gzip.compress(gzip.compress(b"x")), "gzip, gzip", 100) == b"x"
    assert bodies.decode(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", 100) == b"ab"
    assert bodies.decode(zlib.compress(b"raw")[2:-4], "deflate", 100) == b"raw"
    for coding in ("base64", "compress", "gzip, hex"):
        with pytest.raises(bodies.BodyError, match="not supported"):
            bodies.decode(b"abc", coding, 100)
    with pytest.raises(bodies.BodyError, match="not valid gzip"):
        bodies.decode(b"not gzip", "gzip", 100)
