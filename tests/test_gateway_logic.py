"""Pure parts of the gateway: API keys, capture parsing, Open Inference Protocol tensors."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.messages import Event
from services.common.apikeys import authorize, hash_key, parse_keys, presented_key
from services.common.kafka import sticky_partition
from services.inference.client import TensorSpec
from services.ingest.capture import split_items, validate_items
from services.ingest.gateway import GatewayError
from services.ingest.oip import OipError, OutputRequest, output_tensors, rows_from_inputs
from services.ingest.replies import start_offsets
from services.ingest.tensors import from_json, to_json


def test_keys_are_configured_as_hashes_and_checked_by_role():
    keys = parse_keys(f"a:{hash_key('s1')}:predict, b:{hash_key('s2')}:admin")
    assert [k.name for k in keys] == ["a", "b"] and all(len(k.sha256) == 64 for k in keys)
    assert authorize(keys, "s1", "predict") is None
    assert authorize(keys, "s1", "ingest") == (403, "key 'a' lacks the 'ingest' role")
    assert authorize(keys, "s2", "ingest") is None, "admin may do everything"
    assert authorize(keys, None, "predict")[0] == 401
    assert authorize(keys, "nope", "predict") == (401, "unknown API key")
    assert authorize([], None, "admin") is None, "no keys configured: open (local dev)"


def test_the_presented_key_is_the_bearer_token_else_the_x_api_key_header():
    assert presented_key("Bearer  s1 ", "s2") == "s1", "bearer wins, trimmed"
    assert presented_key("bearer s1", None) == "s1"
    assert presented_key("Basic czE=", "s2") == "s2", "another scheme is not a key"
    assert presented_key(None, "s2") == "s2"
    assert presented_key(None, None) is None


@pytest.mark.parametrize("entry", ["a:short:predict", "a:" + "0" * 64 + ":root", "only-name"])
def test_malformed_key_entries_are_refused(entry):
    with pytest.raises(ValueError):
        parse_keys(entry)


def test_capture_accepts_an_object_an_array_or_ndjson():
    assert split_items(b'{"a": 1}', 10) == [(1, {"a": 1})]
    assert split_items(b'[{"a": 1}, {"a": 2}]', 10) == [(1, {"a": 1}), (2, {"a": 2})]
    assert split_items(b'{"a": 1}\n\n{"a": 2}\n', 10) == [(1, b'{"a": 1}'), (3, b'{"a": 2}')]
    with pytest.raises(GatewayError) as too_many:
        split_items(b"{}\n" * 11, 10)
    assert too_many.value.status == 413
    with pytest.raises(GatewayError) as empty:
        split_items(b"  \n", 10)
    assert empty.value.status == 422


def test_each_invalid_line_is_reported_with_its_reason():
    items = [
        (1, {"event_id": "e", "event_type": "t", "ts_ms": 1, "entities": {"card": "c"}}),
        (2, b"not json"),
        (3, [1, 2]),
        (4, {"event_id": "e"}),
        (5, {"schema_version": "2", "event_id": "e", "event_type": "t", "ts_ms": 1}),
    ]
    valid, rejected = validate_items(items, Event)
    assert [line for line, _ in valid] == [1]
    assert [(r["line"], r["error"]["code"]) for r in rejected] == [
        (2, "malformed_json"),
        (3, "schema_invalid"),
        (4, "schema_invalid"),
        (5, "unsupported_schema_version"),
    ]
    assert rejected[2]["error"]["details"][0]["loc"], "field paths of the invalid line"


def json_tensor(name, shape, datatype, data):
    return from_json(name, datatype, shape, data)


MATRIX = TensorSpec("input", "FP32", (-1, 2))


def test_oip_matrix_and_per_feature_inputs_give_the_same_rows():
    names = ["a", "b"]
    matrix = json_tensor("input", [2, 2], "FP32", [[1, 2], [3, 4]])
    columns = [
        json_tensor("a", [2], "FP32", [1, 3]),
        json_tensor("b", [2, 1], "INT32", [[2], [4]]),
    ]
    expected = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]
    assert rows_from_inputs([matrix], names, MATRIX) == expected
    assert rows_from_inputs(columns, names, MATRIX) == expected


@pytest.mark.parametrize(
    "tensor",
    [
        json_tensor("input", [2, 3], "FP32", [0] * 6),
        json_tensor("input", [2], "FP32", [0] * 2),
        json_tensor("input", [1, 2], "BYTES", ["x", "y"]),
        json_tensor("other", [1, 2], "FP32", [0, 0]),
    ],
)
def test_oip_bad_inputs_are_400(tensor):
    with pytest.raises(OipError) as caught:
        rows_from_inputs([tensor], ["a", "b"], MATRIX)
    assert caught.value.status == 400


def test_oip_outputs_keep_the_model_datatypes_and_shapes():
    specs = [TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))]
    predictions = [
        {"outputs": {"label": [1.0], "probabilities": [0.2, 0.8]}},
        {"outputs": {"label": [0.0], "probabilities": [0.9, 0.1]}},
    ]
    label, probabilities = output_tensors(predictions, specs, None)
    assert (label.name, label.datatype, label.shape, to_json(label)) == (
        "label",
        "INT64",
        [2],
        [1, 0],
    )
    assert (probabilities.datatype, probabilities.shape) == ("FP32", [2, 2])
    np.testing.assert_array_equal(
        probabilities.values, np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
    )
    (top,) = output_tensors(predictions, specs, [OutputRequest("probabilities", classes=1)])
    assert (top.datatype, top.shape) == ("BYTES", [2, 1])
    assert to_json(top) == ["0.800000011920929:1", "0.8999999761581421:0"]
    with pytest.raises(OipError):
        output_tensors(predictions, specs, [OutputRequest("logits")])


def test_cli_prints_a_hashed_key_entry():
    from typer.testing import CliRunner

    from services.cli import app

    result = CliRunner().invoke(
        app, ["gateway", "hash-key", "svc", "--roles", "predict+ingest", "--key", "s3cret"]
    )
    assert result.exit_code == 0
    assert result.output.strip() == f"svc:{hash_key('s3cret')}:predict+ingest"
    assert parse_keys(result.output.strip())[0].roles == {"predict", "ingest"}


def test_reply_partitions_lost_briefly_resume_where_the_listener_stopped():
    starts = start_offsets(
        partitions=[0, 1, 2, 3],
        next_offsets={0: 120, 1: 80, 2: 40},
        revoked_at={0: 100.0, 1: 60.0, 2: 100.0},
        log_ends={0: 130, 1: 95, 2: 30, 3: 7},
        now=110.0,
        window_s=30.0,
    )
    assert starts == {
        0: 120,  # lost 10 s ago: replies produced meanwhile are read
        1: 95,  # lost 50 s ago, past every deadline: the log end
        2: 30,  # the log is shorter than where we stopped (broker lost its data): its end
        3: 7,  # never read here: the log end at assignment
    }


def test_reply_partitions_with_an_unknown_end_resume_or_fall_back_to_the_reset_policy():
    starts = start_offsets([0, 1], {0: 5}, {0: 9.0}, log_ends={}, now=10.0, window_s=30.0)
    assert starts == {0: 5}


def test_sticky_partitions_hold_for_a_slice_and_take_turns():
    partitions = [1, 4, 6]
    slice_of = [sticky_partition(partitions, ms, 20) for ms in range(0, 20)]
    assert set(slice_of) == {1}, "one partition for the whole first slice"
    turns = [sticky_partition(partitions, ms, 20) for ms in range(0, 120, 20)]
    assert turns == [1, 4, 6, 1, 4, 6], "then each partition in turn, one slice each"
    assert [sticky_partition(partitions, ms, 20, salt=2) for ms in (0, 20)] == [6, 1]
    assert sticky_partition([3], 123_456, 7, salt=99) == 3


def test_openapi_states_the_api_key_schemes_on_exactly_the_guarded_operations():
    from services.ingest.app import create_app

    document = create_app().openapi()
    assert set(document["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    secured = {
        (method, path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "security" in operation
    }
    assert ("post", "/v1/models/{model}/predict") in secured
    assert ("post", "/v2/models/{model}/versions/{version}/infer") in secured
    assert ("post", "/v1/labels") in secured
    assert not {p for _, p in secured} & {"/healthz", "/readyz", "/v2/health/live"}
    assert len(secured) == 10, "the 4 /v1 routes and the 6 /v2 model routes"


def test_generated_request_ids_are_32_hex_digits_distinct_and_not_repeated_by_a_forked_child():
    import os
    import re

    from services.ingest.gateway import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child writes its next id and leaves at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    from_child = os.read(read, 64).decode()
    assert from_child not in {*ids, new_request_id()}, "a fork must not repeat the parent's ids"
