"""OpenAPI for what routes read themselves: request bodies (capture's JSON or NDJSON, the Open
Inference Protocol's infer, predict) and the API-key headers, so that clients and schemathesis
see what the gateway accepts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute

API_KEY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "bearer": {"type": "http", "scheme": "bearer"},
}
"""The two ways a request presents its key (docs/security.md)."""


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


def document_api_keys(
    app: FastAPI, guards: set[Callable[..., Any]], routes: Sequence[BaseRoute]
) -> None:
    """State the API-key schemes in `app`'s OpenAPI document, on each operation of `routes`
    (the app's own and its routers') that depends on one of `guards` (dependencies that read
    the key headers themselves)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = API_KEY_SCHEMES
        for route in routes:
            if not isinstance(route, APIRoute):
                continue
            if not any(d.call in guards for d in route.dependant.dependencies):
                continue
            for method in route.methods:
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    operation["security"] = [{name: []} for name in API_KEY_SCHEMES]
        return schema

    app.openapi = openapi
