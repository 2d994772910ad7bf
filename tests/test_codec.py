"""The JSON codec: round trips, and three distinct, actionable decode failures."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import DeadLetter, ErrorBody, Event, Label
from services.common.codec import DecodeError, decode, encode


def test_round_trip_preserves_every_field():
    event = Event(
        event_id="e1",
        event_type="transaction",
        ts_ms=1,
        entities={"card": "c1"},
        fields={"amount": 12.5, "country": "FR", "online": True, "note": None},
    )
    assert decode(Event, encode(event)) == event


def test_bytes_travel_as_base64():
    letter = DeadLetter(
        source_topic="t",
        partition=0,
        offset=1,
        original=b"\xff\x00raw",
        error=ErrorBody(code="x", message="y"),
        failed_at_ms=0,
    )
    assert orjson.loads(encode(letter))["original"] == "/wByYXc="
    assert decode(DeadLetter, encode(letter)).original == b"\xff\x00raw"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "malformed_json"),
        (None, "malformed_json"),
        (b"[1, 2]", "schema_invalid"),
        (b'{"request_id": "r", "entity_id": "e", "value": "high", "ts_ms": 1}', "schema_invalid"),
        (b'{"schema_version": 7, "request_id": "r"}', "unsupported_schema_version"),
    ],
)
def test_decode_failures_are_classified(payload, code):
    with pytest.raises(DecodeError) as caught:
        decode(Label, payload)
    assert caught.value.body.code == code


def test_schema_errors_name_the_failing_fields():
    with pytest.raises(DecodeError) as caught:
        decode(Label, b'{"request_id": "r", "entity_id": "", "value": "x"}')
    locs = {d["loc"] for d in caught.value.body.details}
    assert locs == {"entity_id", "value", "ts_ms"}


def test_unknown_fields_are_ignored_for_forward_compatibility():
    label = decode(Label, b'{"request_id":"r","entity_id":"e","value":1,"ts_ms":5,"extra":1}')
    assert label.value == 1.0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_either_decode_or_raise_decode_error(data):
    try:
        decode(Event, data)
    except DecodeError as exc:
        assert exc.body.code in {"malformed_json", "schema_invalid", "unsupported_schema_version"}
