"""The Open Inference Protocol's tensor encodings, without a server: JSON data, raw bytes as
Triton's clients write them (HTTP binary tensor data, gRPC raw contents), and the HTTP body of
JSON header plus binary inputs."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from services.ingest.oip import (
    InferAnswer,
    OipError,
    decode_http_request,
    encode_http_response,
)
from services.ingest.tensors import Tensor, TensorError, from_json, from_raw, to_json, to_raw

ARRAYS = {
    "FP32": np.array([[0.5, -1.25, 3e-8], [1e30, 0.0, -0.0]], dtype=np.float32),
    "FP64": np.array([[0.1, 2.0**-40, -7.5]], dtype=np.float64),
    "INT64": np.array([[2**62, -3], [0, 7]], dtype=np.int64),
    "INT32": np.array([[2**31 - 1, -(2**31)]], dtype=np.int32),
    "BOOL": np.array([[True, False, True]], dtype=np.bool_),
}


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_raw_bytes_are_the_row_major_little_endian_array(datatype):
    array = ARRAYS[datatype]
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
    tensor = from_raw("x", datatype, list(array.shape), raw)
    np.testing.assert_array_equal(tensor.values, array)
    assert tensor.shape == list(array.shape)
    assert to_raw(tensor) == raw
    assert from_json("x", datatype, list(array.shape), to_json(tensor)).values.tolist() == (
        array.tolist()
    )


def test_bytes_tensors_are_length_prefixed_elements():
    raw = b"".join(struct.pack("<I", len(v)) + v for v in (b"ab", b"", "é".encode()))
    tensor = from_raw("s", "BYTES", [3], raw)
    assert tensor.values.tolist() == [b"ab", b"", "é".encode()]
    assert to_raw(tensor) == raw
    assert to_json(tensor) == ["ab", "", "é"]
    assert from_json("s", "BYTES", [1, 3], ["ab", "", "é"]).values.tolist() == [
        [b"ab", b"", "é".encode()]
    ]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", [2, 2], b"\0" * 15, "takes 16 bytes, got 15"),
        ("INT64", [1, 2], b"\0" * 24, "takes 16 bytes, got 24"),
        ("FP32", [-1, 2], b"", "negative dimension"),
        ("BOOL", [2], b"\x01\x02", "0 or 1"),
        ("BYTES", [2], struct.pack("<I", 1) + b"a" * 4, "ends before element 1"),
        ("BYTES", [10**12, 10**6], b"\0" * 8, "cannot hold 1000000000000000000"),
        ("BYTES", [1], struct.pack("<I", 5) + b"a", "runs past the data"),
        ("BYTES", [1], struct.pack("<I", 1) + b"ab", "1 bytes left"),
        ("FP8", [1], b"\0", "unknown datatype"),
    ],
)
def test_raw_data_that_does_not_fit_the_shape_is_refused(datatype, shape, raw, message):
    with pytest.raises(TensorError, match=message):
        from_raw("x", datatype, shape, raw)


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("FP32", [1, "2"]), ("INT64", [1, 2.5]), ("BOOL", [1, 0]), ("BYTES", [1, 2])],
)
def test_json_data_of_the_wrong_kind_is_refused(datatype, data):
    with pytest.raises(TensorError):
        from_json("x", datatype, [2], data)


def binary_body(inputs: list[tuple[str, str, np.ndarray]], **request) -> tuple[bytes, str]:
    """A body as tritonclient.http writes it: JSON header, then every input's raw bytes."""
    header = {
        **request,
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, datatype, array in inputs
        ],
    }
    head = orjson.dumps(header)
    return head + b"".join(a.tobytes() for _, _, a in inputs), str(len(head))


def test_a_binary_request_body_splits_into_its_tensors():
    a, b = ARRAYS["FP32"], ARRAYS["INT64"]
    body, length = binary_body([("a", "FP32", a), ("b", "INT64", b)], id="r1")
    request, tensors = decode_http_request(body, length)
    assert request.id == "r1" and [t.name for t in tensors] == ["a", "b"]
    np.testing.assert_array_equal(tensors[0].values, a)
    np.testing.assert_array_equal(tensors[1].values, b)


def test_json_and_binary_inputs_mix_in_one_request():
    a = ARRAYS["FP64"]
    body, length = binary_body(
        [("a", "FP64", a)], **{"outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    )
    header = orjson.loads(body[: int(length)])
    header["inputs"].append({"name": "j", "shape": [2], "datatype": "INT32", "data": [4, 5]})
    head = orjson.dumps(header)
    _request, tensors = decode_http_request(head + body[int(length) :], str(len(head)))
    assert tensors[1].values.tolist() == [4, 5] and tensors[0].values.tolist() == a.tolist()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda body, n: (body + b"\0\0\0\0", n), "the inputs claim 24"),
        (lambda body, n: (body[:-4], n), "runs past"),
        (lambda body, n: (body, "x"), "must be an integer"),
        (lambda body, n: (body, str(len(body) + 1)), "is not within"),
        (lambda body, n: (body, str(int(n) - 1)), "invalid inference request"),
    ],
)
def test_binary_bodies_whose_sizes_disagree_are_400(mutate, message):
    body, length = binary_body([("a", "FP32", ARRAYS["FP32"])])
    with pytest.raises(OipError, match=message) as caught:
        decode_http_request(*mutate(body, length))
    assert caught.value.status == 400


def test_an_input_without_data_is_400():
    body = orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]})
    with pytest.raises(OipError, match="neither data nor binary data"):
        decode_http_request(body, None)


def test_binary_outputs_follow_the_json_header_when_asked():
    probabilities = Tensor("p", "FP32", np.array([[0.25, 0.75]], dtype=np.float32))
    label = Tensor("label", "INT64", np.array([1], dtype=np.int64))
    answer = InferAnswer("m", "2", [label, probabilities])
    body, length = binary_body(
        [("a", "FP32", ARRAYS["FP32"])],
        outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "p"}],
        parameters={"binary_data_output": True},
    )
    request, _ = decode_http_request(body, length)
    response = encode_http_response(answer, request)
    n = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.body[:n])
    assert header["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
    ]
    assert np.frombuffer(response.body[n:], dtype="<f4").tolist() == [0.25, 0.75]

    plain = decode_http_request(
        orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}),
        None,
    )[0]
    response = encode_http_response(answer, plain)
    assert "inference-header-content-length" not in response.headers
    assert orjson.loads(response.body)["outputs"][1]["data"] == [0.25, 0.75]
