"""The Open Inference Protocol as stock clients speak it: the official Triton HTTP and gRPC
clients, with their defaults (binary tensors over HTTP, raw contents over gRPC) and with JSON,
against a real gateway, broker and inference worker, on both committed demo model versions.

The gRPC client runs in a process of its own (tests/helpers/triton_grpc.py): tritonclient.grpc
and the gateway's generated code (schemas/proto) register the same protobuf message names, so no
process of the suite may import both. Calls that the client cannot make (typed contents,
malformed requests) go through the gateway's own stubs, which put the same bytes on the wire.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from schemas.proto import open_inference_grpc_pb2 as pb
from schemas.proto import open_inference_grpc_pb2_grpc as pb_grpc
from services.common.apikeys import hash_key
from services.inference.manifest import Manifest
from tests.helpers.gateway import GatewayProcess, secured_gateway, serving
from tests.support import unique

pytestmark = pytest.mark.integration

DEMO_MODELS = Path(__file__).resolve().parent.parent / "deploy" / "demo" / "models" / "fraud"
VERSIONS = ["1", "2"]
TIMEOUT = {"timeout_ms": 10_000}


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """The demo's two fraud versions under a fresh model name, an inference worker, a gateway."""
    root = tmp_path_factory.mktemp("oip-models")
    model = unique("demo-fraud").replace(".", "-")
    for version in VERSIONS:
        folder = root / model / version
        folder.mkdir(parents=True)
        shutil.copy(DEMO_MODELS / version / "model.onnx", folder / "model.onnx")
        manifest = Manifest.model_validate_json(
            (DEMO_MODELS / version / "manifest.json").read_text()
        )
        manifest.model_copy(update={"model": model}).save(folder / "manifest.json")
    manifest = Manifest.model_validate_json((root / model / "1" / "manifest.json").read_text())
    width = len(manifest.feature_names)

    def warm_up(gateway: GatewayProcess) -> None:
        request = {
            "inputs": [
                {
                    "name": manifest.input_name,
                    "shape": [1, width],
                    "datatype": "FP32",
                    "data": [0.0] * width,
                }
            ],
            "parameters": {"timeout_ms": 30_000},
        }
        response = httpx.post(f"{gateway.url}/v2/models/{model}/infer", json=request, timeout=40)
        assert response.status_code == 200, response.text

    with serving(cluster, root, warm_up) as stack:
        yield {"model": model, "root": root, "manifest": manifest, **stack}


def rows(served, count: int = 6, seed: int = 3) -> np.ndarray:
    """Rows of plausible magnitude for the demo's features (counts, amounts, ratios)."""
    width = len(served["manifest"].feature_names)
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(loc=2.0, scale=1.5, size=(count, width))).astype(np.float32)


def direct(served, version: str, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, probabilities) of ONNX Runtime on the version's model file itself."""
    session = ort.InferenceSession(str(served["root"] / served["model"] / version / "model.onnx"))
    feeds = {session.get_inputs()[0].name: matrix}
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
    )
    return outputs["label"], outputs["probabilities"]


def v1_scores(served, version: str, matrix: np.ndarray) -> list[float]:
    """The `/v1` predict score of each row, every feature given in the request."""
    names = served["manifest"].feature_names
    instances = [
        {
            "entity_id": f"oip-{i}",
            "features": dict(zip(names, row.tolist(), strict=True)),
            "version": version,
        }
        for i, row in enumerate(matrix)
    ]
    response = httpx.post(
        f"{served['gateway'].url}/v1/models/{served['model']}/predict:batch",
        json={"instances": instances, **TIMEOUT},
        timeout=20,
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["version"] for p in predictions] == [version] * len(matrix)
    return [p["score"] for p in predictions]


@pytest.mark.parametrize("version", VERSIONS)
def test_http_client_with_its_binary_defaults_gets_the_onnx_and_v1_predictions(served, version):
    client = httpclient.InferenceServerClient(url=served["gateway"].url.removeprefix("http://"))
    model, matrix = served["model"], rows(served, seed=int(version))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model, version)
    meta = client.get_model_metadata(model, version)
    assert meta["versions"] == VERSIONS and meta["platform"] == "onnxruntime_onnx"
    (spec,) = meta["inputs"]
    assert spec["datatype"] == "FP32" and spec["shape"] == [-1, matrix.shape[1]]

    tensor = httpclient.InferInput(spec["name"], list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix)  # binary_data=True: the client's default
    result = client.infer(model, [tensor], model_version=version, parameters=TIMEOUT)
    assert result.get_response()["model_version"] == version
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    label, probabilities = direct(served, version, matrix)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.as_numpy("label").dtype == np.int64

    score_index = served["manifest"].score_index
    np.testing.assert_allclose(
        v1_scores(served, version, matrix), probabilities[:, score_index], atol=1e-6
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_http_client_with_json_tensors_gets_the_onnx_predictions(served, version):
    client = httpclient.InferenceServerClient(url=served["gateway"].url.removeprefix("http://"))
    matrix = rows(served, seed=10 + int(version))
    tensor = httpclient.InferInput(served["manifest"].input_name, list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer(
        served["model"], [tensor], model_version=version, outputs=outputs, parameters=TIMEOUT
    )
    assert all("data" in o for o in result.get_response()["outputs"])
    label, probabilities = direct(served, version, matrix)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_http_client_classification_returns_the_top_class_of_each_row(served):
    client = httpclient.InferenceServerClient(url=served["gateway"].url.removeprefix("http://"))
    matrix = rows(served, seed=21)
    tensor = httpclient.InferInput(served["manifest"].input_name, list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix)
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    result = client.infer(served["model"], [tensor], outputs=outputs, parameters=TIMEOUT)
    top = result.as_numpy("probabilities")
    assert top.shape == (len(matrix), 2)
    _label, probabilities = direct(served, VERSIONS[-1], matrix)
    for row, classes in zip(probabilities, top, strict=True):
        value, index = classes[0].decode().split(":")
        assert int(index) == int(np.argmax(row))
        assert float(value) == pytest.approx(float(row.max()), abs=1e-6)


def test_http_client_gets_protocol_errors_for_bad_shapes(served):
    client = httpclient.InferenceServerClient(url=served["gateway"].url.removeprefix("http://"))
    width = len(served["manifest"].feature_names)
    narrow = httpclient.InferInput(served["manifest"].input_name, [2, width - 1], "FP32")
    narrow.set_data_from_numpy(np.zeros((2, width - 1), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(served["model"], [narrow])
    assert caught.value.status() == "400" and "must have shape [-1, " in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no-such-model")
    assert caught.value.status() == "404"


def binary_request(served, matrix: np.ndarray, size: int) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": served["manifest"].input_name,
                    "shape": list(matrix.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    return header + matrix.tobytes(), len(header)


@pytest.mark.parametrize(
    ("size_change", "length_change", "message"),
    [
        (-4, 0, "takes 48 bytes, got 44"),
        (4, 0, "runs past"),
        (0, 10_000, "is not within"),
        (0, -3, "invalid inference request"),
    ],
)
def test_binary_bodies_whose_sizes_disagree_get_400_with_the_protocol_error_body(
    served, size_change, length_change, message
):
    matrix = np.zeros((2, 6), dtype=np.float32)
    body, length = binary_request(served, matrix, matrix.nbytes + size_change)
    if size_change < 0:
        body = body[:size_change]
    response = httpx.post(
        f"{served['gateway'].url}/v2/models/{served['model']}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length + length_change)},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def triton_grpc(address: str, **job) -> dict:
    """One call of tritonclient.grpc in its own process (tests/helpers/triton_grpc.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_grpc"],
        input=json.dumps({"address": address, **job}),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("version", VERSIONS)
def test_grpc_client_with_its_raw_defaults_gets_the_onnx_predictions(served, version):
    address, model = served["gateway"].grpc_address, served["model"]
    matrix = rows(served, seed=30 + int(version))
    health = triton_grpc(address, action="health", model=model, version=version)
    assert health["live"] and health["ready"] and health["model_ready"]
    assert health["server"]["name"] == "sluiceway"
    assert "binary_tensor_data" in health["server"]["extensions"]
    meta = triton_grpc(address, action="metadata", model=model, version=version)
    assert meta["versions"] == VERSIONS
    (spec,) = meta["inputs"]
    assert spec["datatype"] == "FP32" and spec["shape"] == ["-1", str(matrix.shape[1])]

    job = {"action": "infer", "model": model, "version": version, "input": spec["name"]}
    result = triton_grpc(address, **job, rows=matrix.tolist())
    assert result["model_version"] == version and result["raw_outputs"] == 2
    assert result["dtypes"] == {"label": "int64", "probabilities": "float32"}
    label, probabilities = direct(served, version, matrix)
    got = np.asarray(result["outputs"]["probabilities"], dtype=np.float32)
    np.testing.assert_allclose(got, probabilities, atol=1e-6)
    np.testing.assert_array_equal(result["outputs"]["label"], label)

    result = triton_grpc(address, **job, rows=matrix.tolist(), outputs=["probabilities"])
    assert list(result["outputs"]) == ["probabilities"]
    got = np.asarray(result["outputs"]["probabilities"], dtype=np.float32)
    np.testing.assert_allclose(got, probabilities, atol=1e-6)


def test_grpc_typed_contents_score_as_raw_contents_do(served):
    matrix = rows(served, count=3, seed=40)
    request = pb.ModelInferRequest(model_name=served["model"], model_version="2")
    tensor = request.inputs.add(
        name=served["manifest"].input_name, datatype="FP32", shape=list(matrix.shape)
    )
    tensor.contents.fp32_contents.extend(matrix.ravel().tolist())
    with grpc.insecure_channel(served["gateway"].grpc_address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("probabilities")]
    _label, probabilities = direct(served, "2", matrix)
    np.testing.assert_allclose(
        np.frombuffer(raw, dtype="<f4").reshape(3, 2), probabilities, atol=1e-6
    )


def narrow(request: pb.ModelInferRequest) -> None:
    request.inputs[0].shape[1] = 5
    request.raw_input_contents[0] = np.zeros(5, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), "INVALID_ARGUMENT", "got 7"),
        (lambda r: r.raw_input_contents.append(b""), "INVALID_ARGUMENT", "one each"),
        (narrow, "INVALID_ARGUMENT", "must have shape [-1, 19], got [1, 5]"),
        (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "no version 9"),
        (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "does not exist"),
    ],
)
def test_grpc_bad_inputs_get_the_protocols_status(served, change, code, message):
    width = len(served["manifest"].feature_names)
    request = pb.ModelInferRequest(model_name=served["model"])
    request.inputs.add(name=served["manifest"].input_name, datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.zeros(width, dtype=np.float32).tobytes())
    change(request)
    with grpc.insecure_channel(served["gateway"].grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
    assert caught.value.code().name == code and message in caught.value.details()


def test_grpc_api_keys_are_read_from_the_call_metadata(served):
    keys = f"svc:{hash_key('s3cret')}:predict,feed:{hash_key('f33d')}:ingest"
    model, name = served["model"], served["manifest"].input_name
    with secured_gateway(served["env"], keys) as secured:
        address = secured.grpc_address
        health = triton_grpc(address, action="health", model=model, headers={"x-api-key": "s3cret"})
        assert health["live"] and health["model_ready"]
        for headers, status in (
            (None, "StatusCode.UNAUTHENTICATED"),
            ({"x-api-key": "wrong"}, "StatusCode.UNAUTHENTICATED"),
            ({"authorization": "Bearer f33d"}, "StatusCode.PERMISSION_DENIED"),
        ):
            denied = triton_grpc(address, action="metadata", model=model, headers=headers)
            assert denied["error"]["status"] == status
        matrix = rows(served, count=2, seed=50)
        result = triton_grpc(
            address,
            action="infer",
            model=model,
            input=name,
            rows=matrix.tolist(),
            headers={"x-api-key": "s3cret"},
        )
        _label, probabilities = direct(served, VERSIONS[-1], matrix)
        got = np.asarray(result["outputs"]["probabilities"], dtype=np.float32)
        np.testing.assert_allclose(got, probabilities, atol=1e-6)


def test_bytes_inputs_are_refused_as_not_numeric_over_both_transports(served):
    width = len(served["manifest"].feature_names)
    values = np.array([[b"x"] * width], dtype=np.object_)
    http = httpclient.InferenceServerClient(url=served["gateway"].url.removeprefix("http://"))
    tensor = httpclient.InferInput(served["manifest"].input_name, [1, width], "BYTES")
    tensor.set_data_from_numpy(values)
    with pytest.raises(InferenceServerException) as caught:
        http.infer(served["model"], [tensor])
    assert caught.value.status() == "400" and "not numeric" in caught.value.message()
    raw = b"".join(struct.pack("<I", 1) + b"x" for _ in range(width))
    request = pb.ModelInferRequest(model_name=served["model"], raw_input_contents=[raw])
    request.inputs.add(name=served["manifest"].input_name, datatype="BYTES", shape=[1, width])
    with (
        grpc.insecure_channel(served["gateway"].grpc_address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
