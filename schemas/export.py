"""JSON Schema export of every message model, and the compatibility rule that guards it.

`make schemas` (`python -m schemas.export`) writes `schemas/json/<Model>.v<version>.json`; the
files are committed so that producers in other languages can validate against them, and a test
fails when a model changes in a way that breaks readers of the committed schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from schemas.messages import MESSAGE_MODELS, Message

SCHEMA_DIR = Path(__file__).parent / "json"


def schema_version(model: type[Message]) -> int:
    """The schema version a model writes (the default of its `schema_version` field)."""
    return model.model_fields["schema_version"].default


def schema_path(model: type[Message], directory: Path = SCHEMA_DIR) -> Path:
    """Where the committed JSON Schema of `model` lives."""
    return directory / f"{model.__name__}.v{schema_version(model)}.json"


def json_schema(model: type[Message]) -> dict:
    """The JSON Schema of `model` as a reader validates it (serialisation mode)."""
    return model.model_json_schema(mode="serialization")


def render(schema: dict) -> bytes:
    """Stable bytes for a schema: sorted keys, indented, trailing newline."""
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        return root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    return schema


def _type_of(schema: dict, root: dict) -> object:
    """A comparable description of a property's type (refs resolved one level, by name)."""
    if "$ref" in schema:
        return ("ref", schema["$ref"])
    if "anyOf" in schema:
        return ("anyOf", sorted(str(_type_of(s, root)) for s in schema["anyOf"]))
    return (schema.get("type"), schema.get("format"), str(schema.get("items", {}).get("type")))


def incompatible_changes(old: dict, new: dict, path: str = "") -> list[str]:
    """Why `new` breaks readers of `old`: each required field that was removed, made optional
    or retyped, recursively through nested objects. Added fields are compatible."""
    problems: list[str] = []
    old_root, new_root = old, new
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name in old.get("required", []):
        where = f"{path}{name}"
        if name not in new_props:
            problems.append(f"required field {where!r} was removed")
            continue
        if name not in new.get("required", []):
            problems.append(f"required field {where!r} is no longer required")
        old_type = _type_of(old_props[name], old_root)
        new_type = _type_of(new_props[name], new_root)
        if old_type != new_type:
            problems.append(f"required field {where!r} changed type {old_type} -> {new_type}")
            continue
        old_sub, new_sub = _resolve(old_props[name], old_root), _resolve(new_props[name], new_root)
        if old_sub.get("properties") and new_sub.get("properties"):
            nested_old = {**old_sub, "$defs": old_root.get("$defs", {})}
            nested_new = {**new_sub, "$defs": new_root.get("$defs", {})}
            problems += incompatible_changes(nested_old, nested_new, f"{where}.")
    return problems


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every model's JSON Schema into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in MESSAGE_MODELS.values():
        path = schema_path(model, directory)
        path.write_bytes(render(json_schema(model)))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in export(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(written_path)
