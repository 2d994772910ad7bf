"""Pure parts of the worker loop: lag from statistics and dead-letter construction."""

from __future__ import annotations

from schemas.messages import DeadLetter, ErrorBody
from schemas.topics import DLQ
from services.common.worker import MAX_DLQ_ORIGINAL_BYTES, dead_letter, lag_from_statistics


def test_lag_is_read_from_fetch_high_watermarks_of_active_partitions():
    stats = {
        "topics": {
            "sluice.requests": {
                "partitions": {
                    "0": {"consumer_lag": 12, "fetch_state": "active"},
                    "1": {"consumer_lag": -1, "fetch_state": "active"},
                    "2": {"consumer_lag": 40, "fetch_state": "none"},
                    "-1": {"consumer_lag": 0, "fetch_state": "none"},
                }
            }
        }
    }
    assert lag_from_statistics(stats) == {("sluice.requests", 0): 12}


def test_dead_letter_keeps_original_bytes_and_reason():
    output = dead_letter(
        "sluice.events", 3, 42, b"key", b"\x00raw", ErrorBody(code="c", message="m"), "g"
    )
    letter = output.value
    assert output.topic == DLQ.name and output.key == b"key"
    assert isinstance(letter, DeadLetter)
    assert (letter.partition, letter.offset, letter.original) == (3, 42, b"\x00raw")
    assert letter.error.code == "c" and letter.consumer_group == "g"


def test_huge_originals_are_cut_and_the_cut_is_stated():
    huge = b"x" * (MAX_DLQ_ORIGINAL_BYTES * 4)
    letter = dead_letter("t", 0, 0, None, huge, ErrorBody(code="c", message="m"), "g").value
    assert len(letter.original) == MAX_DLQ_ORIGINAL_BYTES
    assert letter.error.details == {"errors": None, "original_truncated_from_bytes": len(huge)}
