"""The services' JSON log lines."""

from __future__ import annotations

import logging

import orjson

from services.common.logging import JsonFormatter


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("svc.test", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.__dict__.update(extra)
    return record


def test_a_line_carries_the_message_and_the_extra_fields():
    line = orjson.loads(JsonFormatter("ingest").format(_record(model="fraud", rows=3)))
    assert (line["service"], line["logger"], line["level"]) == ("ingest", "svc.test", "info")
    assert line["msg"] == "hello you"
    assert (line["model"], line["rows"]) == ("fraud", 3)
    assert line["ts"].endswith("Z")


def test_extra_mappings_keyed_by_numbers_are_logged_not_dropped():
    """The gateway logs the start offset per reply partition (`{partition: offset}`): such a
    line used to fail in the formatter ("Dict key must be str") and never reached the log."""
    line = orjson.loads(JsonFormatter("ingest").format(_record(starts={0: 17, 3: 5})))
    assert line["starts"] == {"0": 17, "3": 5}
