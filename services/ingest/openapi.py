"""OpenAPI request bodies for routes that read their body themselves (capture's JSON or NDJSON,
the Open Inference Protocol's infer), so that clients and schemathesis see what they accept."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with its `$defs` inlined (route bodies cannot add components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a required JSON body of `model`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(model)}},
        }
    }


def capture_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a capture route: one `model`, a JSON array of them, or NDJSON."""
    one = inline_schema(model)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"anyOf": [one, {"type": "array", "items": one}]}},
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": f"one {model.__name__} per line"}
                },
            },
        }
    }
