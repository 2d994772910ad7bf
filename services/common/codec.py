"""The one JSON codec for topic messages: orjson on the wire, pydantic for validation.

Decoding tells apart four failures, because operators act on them differently:
`message_too_large` (over the consumer's size limit, `kafka_max_message_bytes`),
`malformed_json` (not JSON at all), `unsupported_schema_version` (a newer producer), and
`schema_invalid` (JSON of the wrong shape, with the failing field paths in `details`). Nothing
else escapes `decode`, and whatever it accepts `encode` can write back.
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import from_json

from schemas.messages import ErrorBody, Message
from services.common.settings import DEFAULT_MAX_MESSAGE_BYTES

M = TypeVar("M", bound=Message)


class DecodeError(ValueError):
    """A message that cannot become a schema object; carries the error body for the DLQ."""

    def __init__(self, code: str, message: str, details: dict | list | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.body = ErrorBody(code=code, message=message, details=details)


def encode(message: BaseModel) -> bytes:
    """Serialise a schema object to compact JSON bytes (bytes fields as base64; non-finite
    floats as null)."""
    try:
        return orjson.dumps(message.model_dump(mode="json"))
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits: valid JSON that the schemas accept, but orjson cannot
        # write it. Without this, one such message would stop whichever worker re-encodes it.
        return message.model_dump_json().encode()


def encode_obj(obj: Any) -> bytes:
    """Serialise plain JSON-able data (dicts, lists, numbers, enums); for hot paths."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def validation_details(error: ValidationError) -> list[dict[str, str]]:
    """Field paths and messages of a pydantic error, as `[{"loc": "a.b", "msg": ...}]`."""
    return [
        {"loc": ".".join(str(part) for part in item["loc"]), "msg": item["msg"]}
        for item in error.errors(include_url=False, include_input=False)
    ]


def decode(
    model: type[M], data: bytes | None, max_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES
) -> M:
    """Parse and validate one message of type `model`.

    Raises `DecodeError` with code `message_too_large` (more than `max_bytes`; None = no
    limit), `malformed_json`, `unsupported_schema_version` or `schema_invalid`, and nothing
    else. Fields unknown to `model` are ignored (forward compatibility). A `schema_version`
    newer than `model`'s is refused however it is spelt (`2`, `"2"`, `2.0`).
    """
    if data is None:
        raise DecodeError("malformed_json", "message has no value (tombstone)")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(
            "message_too_large",
            f"{len(data)} bytes, over the limit of {max_bytes}",
            {"bytes": len(data), "max_bytes": max_bytes},
        )
    try:  # fast path: parse and validate in one pass (pydantic-core, called directly: what
        # `model_validate_json` calls, without its ~1 us of keyword handling per message)
        message = model.__pydantic_validator__.validate_json(data)
    except ValidationError as exc:
        raise _classify(model, data, exc) from None
    if message.schema_version > _supported(model):
        raise _newer(model, message.schema_version)
    return message


_VERSION = TypeAdapter(int)


@cache
def _supported(model: type[Message]) -> int:
    """The newest `schema_version` `model` reads (its field default); cached, since pydantic's
    `model_fields` lookup costs ~1 us and `decode` asks for every message."""
    return model.model_fields["schema_version"].default


def _newer(model: type[Message], version: int) -> DecodeError:
    supported = _supported(model)
    return DecodeError(
        "unsupported_schema_version",
        f"{model.__name__} schema_version {version} is newer than supported {supported}",
        {"received": version, "supported": supported},
    )


def _classify(model: type[Message], data: bytes, error: ValidationError) -> DecodeError:
    """The slow path: why `data` is not a valid `model`. It parses with pydantic-core's own
    JSON parser, so "not JSON" means the same here as on the fast path."""
    try:
        obj = from_json(data)
    except ValueError as exc:
        return DecodeError("malformed_json", f"not valid JSON: {exc}")
    return _classify_object(model, obj, error)


def decode_object(model: type[M], obj: object) -> M:
    """Validate an already parsed JSON value as `model`, classified as `decode` classifies
    bytes (`schema_invalid`, `unsupported_schema_version`); for callers that split a body
    into items themselves."""
    try:
        message = model.model_validate(obj)
    except ValidationError as exc:
        raise _classify_object(model, obj, exc) from None
    if message.schema_version > _supported(model):
        raise _newer(model, message.schema_version)
    return message


def _classify_object(model: type[Message], obj: object, error: ValidationError) -> DecodeError:
    if not isinstance(obj, dict):
        return DecodeError("schema_invalid", f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version", 1)
    if not isinstance(version, bool):
        try:
            version = _VERSION.validate_python(version)
        except ValidationError:
            version = None
        if version is not None and version > _supported(model):
            return _newer(model, version)
    return DecodeError(
        "schema_invalid",
        f"{model.__name__} failed validation ({error.error_count()} errors)",
        validation_details(error),
    )
