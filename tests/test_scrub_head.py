"""A response head is scrubbed in one scan of its fields joined (the common case: nothing found); only when
that finds something is each field scrubbed on its own. Whatever the fields hold, the result must be what
scrubbing each name and value on its own gives: a value in any form, in any field, at a field's edges."""

from __future__ import annotations

import base64
import random
import secrets
import urllib.parse

from mitmproxy.test import tflow, tutils

from sealgate.scrub import Scrubber
from sealgate.scrubbing import _each, scrub_fields, scrub_head


def forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode(),
            raw.hex().upper().encode(), urllib.parse.quote(value, safe="").encode(),
            "".join(f"&#{ord(c)};" for c in value).encode(), "".join(f"\\u{ord(c):04x}" for c in value).encode(),
            b"%" + b"%".join(b"%02X" % b for b in raw)]


def test_fields_scrubbed_in_one_scan_are_as_each_scrubbed_alone():
    rng = random.Random(7)
    values = [f"sk-{secrets.token_urlsafe(rng.randint(12, 30))}" for _ in range(3)]
    scrubber = Scrubber()
    scrubber.add_values([(v, f"sg.s.K{i}.mac") for i, v in enumerate(values)])
    fillers = [b"", b"x", b"%", b"\\", b"&", b"+", b"a1", b"==", b"application/json", b"Bearer "]
    for _ in range(400):
        fields = []
        for _ in range(rng.randint(0, 6)):
            parts = []
            for _ in range(2):
                piece = rng.choice(fillers)
                if rng.random() < 0.3:
                    form = rng.choice(forms(rng.choice(values)))
                    cut = rng.choice([None, 0, len(form) // 2])  # whole, or split over two fields
                    piece += form if cut is None else form[cut:]
                parts.append(piece + rng.choice(fillers))
            fields.append(tuple(parts))
        fields = tuple(fields)
        got = scrub_fields(scrubber, fields)
        assert got == _each(scrubber, fields)
        for k, v in got:
            for value in values:
                assert value.encode() not in k + v


def test_a_head_with_a_value_in_its_reason_or_a_field_is_scrubbed_and_one_without_is_left_as_it_is():
    value = f"sk-{secrets.token_urlsafe(20)}"
    scrubber = Scrubber()
    scrubber.add_values([(value, "sg.s.K.mac")])
    flow = tflow.tflow(resp=tutils.tresp())
    fields = flow.response.headers.fields
    scrub_head(scrubber, flow.response)
    assert flow.response.headers.fields is fields  # nothing found: not rebuilt
    flow.response.reason = f"no {value}"
    flow.response.headers[f"x-{value}"] = base64.b64encode(value.encode()).decode()
    scrub_head(scrubber, flow.response)
    head = flow.response.reason.encode() + b"".join(k + v for k, v in flow.response.headers.fields)
    assert value.encode() not in head and base64.b64encode(value.encode()) not in head
    assert flow.response.reason == "no sg.s.K.mac"
