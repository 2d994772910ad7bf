"""The one JSON codec for topic messages: orjson on the wire, pydantic for validation.

Decoding tells apart three failures, because operators act on them differently:
`malformed_json` (not JSON at all), `unsupported_schema_version` (a newer producer), and
`schema_invalid` (JSON of the wrong shape, with the failing field paths in `details`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.messages import ErrorBody, Message

M = TypeVar("M", bound=Message)


class DecodeError(ValueError):
    """A message that cannot become a schema object; carries the error body for the DLQ."""

    def __init__(self, code: str, message: str, details: dict | list | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.body = ErrorBody(code=code, message=message, details=details)


def encode(message: BaseModel) -> bytes:
    """Serialise a schema object to compact JSON bytes (bytes fields as base64)."""
    return orjson.dumps(message.model_dump(mode="json"))


def encode_obj(obj: Any) -> bytes:
    """Serialise plain JSON-able data (dicts, lists, numbers, enums); for hot paths."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def validation_details(error: ValidationError) -> list[dict[str, str]]:
    """Field paths and messages of a pydantic error, as `[{"loc": "a.b", "msg": ...}]`."""
    return [
        {"loc": ".".join(str(part) for part in item["loc"]), "msg": item["msg"]}
        for item in error.errors(include_url=False, include_input=False)
    ]


def decode(model: type[M], data: bytes | None) -> M:
    """Parse and validate one message of type `model`.

    Raises `DecodeError` with code `malformed_json`, `unsupported_schema_version` or
    `schema_invalid`. Fields unknown to `model` are ignored (forward compatibility).
    """
    if data is None:
        raise DecodeError("malformed_json", "message has no value (tombstone)")
    try:  # fast path: parse and validate in one pass (pydantic-core)
        message = model.model_validate_json(data)
    except ValidationError:
        return _decode_classified(model, data)
    supported = model.model_fields["schema_version"].default
    if message.schema_version > supported:
        return _decode_classified(model, data)
    return message


def _decode_classified(model: type[M], data: bytes) -> M:
    """The slow path: find out why `data` is not a valid `model` and say so."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("malformed_json", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("schema_invalid", f"expected a JSON object, got {type(obj).__name__}")
    supported = model.model_fields["schema_version"].default
    version = obj.get("schema_version", 1)
    if isinstance(version, int) and version > supported:
        raise DecodeError(
            "unsupported_schema_version",
            f"{model.__name__} schema_version {version} is newer than supported {supported}",
            {"received": version, "supported": supported},
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise DecodeError(
            "schema_invalid",
            f"{model.__name__} failed validation ({exc.error_count()} errors)",
            validation_details(exc),
        ) from None
