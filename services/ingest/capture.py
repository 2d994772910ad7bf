"""Traffic capture: events and labels posted as one JSON object, a JSON array, or NDJSON.

Every line is validated on its own; valid ones are produced and acknowledged by the broker
before the gateway answers, invalid ones are reported by line number with the reason, and one
bad line never stops the others.
"""

from __future__ import annotations

import asyncio

import orjson

from schemas.messages import ErrorBody, Event, Label, Message
from services.common.codec import DecodeError, decode_object, encode
from services.ingest.gateway import GatewayError
from services.ingest.producer import AsyncProducer, DeliveryError


def split_items(body: bytes, max_items: int) -> list[tuple[int, bytes | dict]]:
    """(line number, item) pairs. A body that parses as one JSON object or array is taken
    whole (array items numbered from 1); anything else is NDJSON, blank lines skipped. Lines
    that are not JSON stay bytes, to be reported by `validate_items`."""
    if not body.strip():
        raise GatewayError(422, "empty_body", "no items in the request body")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list):
        items: list[tuple[int, bytes | dict]] = list(enumerate(parsed, start=1))
    elif isinstance(parsed, dict):
        items = [(1, parsed)]
    else:
        items = [(n, line) for n, line in enumerate(body.split(b"\n"), start=1) if line.strip()]
    if len(items) > max_items:
        raise GatewayError(
            413,
            "too_many_items",
            f"{len(items)} items; at most {max_items}",
            {"max_items": max_items},
        )
    return items


def validate_items(
    items: list[tuple[int, bytes | dict]], model: type[Message]
) -> tuple[list[tuple[int, Message]], list[dict]]:
    """Valid messages with their line numbers, and one rejection per invalid line."""
    valid: list[tuple[int, Message]] = []
    rejected: list[dict] = []
    for line, item in items:
        try:
            obj = orjson.loads(item) if isinstance(item, bytes) else item
        except orjson.JSONDecodeError as exc:
            rejected.append(_rejection(line, "malformed_json", f"not valid JSON: {exc}"))
            continue
        try:
            valid.append((line, decode_object(model, obj)))
        except DecodeError as exc:
            rejected.append(_rejection(line, exc.body.code, exc.body.message, exc.body.details))
    return valid, rejected


def message_key(message: Message) -> str:
    """The Kafka key: an event's first (primary) entity id, a label's entity id."""
    if isinstance(message, Event):
        return next(iter(message.entities.values()))
    if isinstance(message, Label):
        return message.entity_id
    raise TypeError(f"no key rule for {type(message).__name__}")


async def capture(
    producer: AsyncProducer,
    topic: str,
    body: bytes,
    model: type[Message],
    max_items: int,
) -> tuple[int, dict]:
    """Validate and produce every item of `body`; (HTTP status, response body).

    202 with `accepted` and `rejected` when at least one item was stored, 422 when none was
    valid, 503 naming the lines the broker refused when delivery failed.
    """
    valid, rejected = validate_items(split_items(body, max_items), model)
    futures = [
        producer.produce_nowait(topic, encode(message), key=message_key(message))
        for _, message in valid
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    failed = [
        line
        for (line, _), outcome in zip(valid, outcomes, strict=True)
        if isinstance(outcome, DeliveryError)
    ]
    accepted = len(valid) - len(failed)
    response = {"accepted": accepted, "rejected": sorted(rejected, key=lambda r: r["line"])}
    if failed:
        return 503, {
            "error": {
                "code": "broker_unavailable",
                "message": f"{len(failed)} valid items were not stored",
                "details": {"failed_lines": failed},
            },
            **response,
        }
    return (202 if accepted or not rejected else 422), response


def _rejection(line: int, code: str, message: str, details=None) -> dict:
    return {
        "line": line,
        "error": ErrorBody(code=code, message=message, details=details).model_dump(),
    }
