"""The Open Inference Protocol (KServe v2 / Triton) on the gateway: its HTTP/REST routes here,
and the domain both they and the gRPC service (`oip_grpc.py`) call.

Endpoints: `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{m}[/versions/{v}]`,
`.../ready`, and `POST .../infer`. Errors use the protocol's body, `{"error": "<message>"}`.

An infer request carries the model's input matrix, either as the single input tensor
(`[rows, features]`) or as one tensor per feature (`[rows]` or `[rows, 1]`, named after the
manifest's features), in any numeric datatype (cast to the model's input). Each row travels the
same Kafka path as a `/v1` prediction (batched, routed, logged, monitored), with every feature
supplied by the request; request values take precedence over the online store, so a model whose
manifest reads online features still scores exactly the tensor it was given. Outputs are the
model's own tensors, concatenated over rows.

Extensions: Triton's binary tensor data (a body of JSON header plus raw tensor bytes, the
header's length in `Inference-Header-Content-Length`, each binary input's size in its
`binary_data_size` parameter; binary outputs when the request's `binary_data_output` or an
output's `binary_data` parameter asks) and classification (an output's `classification`
parameter: the top k values of each row as `"<value>:<index>"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from services.inference.client import (
    Manifest,
    RegistryError,
    TensorSpec,
    load_manifest,
    tensor_specs,
)
from services.ingest.gateway import Gateway, GatewayError, PredictItem, new_request_id
from services.ingest.openapi import json_body
from services.ingest.responses import JSONBody
from services.ingest.tensors import (
    DTYPES,
    Tensor,
    TensorError,
    classification,
    from_json,
    from_raw,
    to_json,
    to_raw,
)

SERVER_NAME = "sluiceway"
SERVER_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"


class OipError(Exception):
    """A protocol error: HTTP status and the message that goes into `{"error": ...}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        None, description="Row-major values; absent when `binary_data_size` is set."
    )


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True, slots=True)
class OutputRequest:
    """An output the caller wants, and whether as the top `classes` values (0 = the tensor)."""

    name: str
    classes: int = 0


@dataclass(frozen=True, slots=True)
class InferAnswer:
    model: str
    version: str
    outputs: list[Tensor]


def resolve(gateway: Gateway, root, model: str, version: str | None) -> tuple[str, Manifest]:
    """The version to serve (the caller's, else the highest) and its manifest; 404 otherwise."""
    versions = gateway.catalog.models().get(model)
    if not versions:
        raise OipError(404, f"Model with name {model} does not exist.")
    version = version or max(versions, key=lambda v: (len(v), v))
    if version not in versions:
        raise OipError(404, f"Model {model} has no version {version}.")
    try:
        return version, load_manifest(root, model, version)
    except RegistryError as exc:
        raise OipError(404, exc.message) from exc


def model_metadata(gateway: Gateway, root, model: str, version: str | None) -> dict:
    """The protocol's model metadata: versions, platform and the ONNX graph's tensors."""
    version, _manifest = resolve(gateway, root, model, version)
    inputs, outputs = tensor_specs(root, model, version)
    return {
        "name": model,
        "versions": gateway.catalog.models()[model],
        "platform": "onnxruntime_onnx",
        "inputs": [_tensor_meta(t) for t in inputs],
        "outputs": [_tensor_meta(t) for t in outputs],
    }


def rows_from_inputs(
    tensors: list[Tensor], feature_names: list[str], input_spec: TensorSpec
) -> list[dict[str, float]]:
    """The feature dict of every row, from one matrix tensor or one tensor per feature; the
    shapes are checked against the model's input."""
    for tensor in tensors:
        if tensor.datatype == "BYTES":
            raise OipError(400, f"input '{tensor.name}': datatype BYTES is not numeric")
    if len(tensors) == 1 and tensors[0].name not in feature_names:
        tensor = tensors[0]
        if tensor.name != input_spec.name:
            raise OipError(
                400,
                f"unexpected input '{tensor.name}'; expected '{input_spec.name}' or "
                f"one input per feature {feature_names}",
            )
        expected = [len(feature_names) if i == 1 else d for i, d in enumerate(input_spec.shape)]
        fits = len(tensor.shape) == len(expected) == 2 and all(
            want < 0 or got == want for got, want in zip(tensor.shape, expected, strict=True)
        )
        if not fits:
            shape = [-1 if d < 0 else d for d in expected]
            raise OipError(
                400, f"input '{tensor.name}' must have shape {shape}, got {tensor.shape}"
            )
        matrix = tensor.values.astype(np.float64)
        return [dict(zip(feature_names, row, strict=True)) for row in matrix.tolist()]
    by_name = {t.name: t for t in tensors}
    missing = [n for n in feature_names if n not in by_name]
    extra = [n for n in by_name if n not in feature_names]
    if missing or extra or len(by_name) != len(tensors):
        raise OipError(
            400,
            f"inputs do not match the model's features: missing {missing}, unexpected {extra}"
            + ("" if len(by_name) == len(tensors) else ", some named twice"),
        )
    columns = {}
    for name in feature_names:
        tensor = by_name[name]
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise OipError(400, f"input '{name}' must have shape [-1] or [-1, 1]")
        columns[name] = tensor.values.astype(np.float64).reshape(-1).tolist()
    sizes = {len(c) for c in columns.values()}
    if len(sizes) != 1:
        raise OipError(400, f"inputs have different row counts {sorted(sizes)}")
    rows = sizes.pop()
    return [{name: columns[name][i] for name in feature_names} for i in range(rows)]


def output_tensors(
    predictions: list[dict], specs: list[TensorSpec], wanted: list[OutputRequest] | None
) -> list[Tensor]:
    """The response tensors: each model output concatenated over the rows, in its datatype
    (or its classification, where asked)."""
    wanted = wanted or [OutputRequest(spec.name) for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    unknown = [w.name for w in wanted if w.name not in by_name]
    if unknown:
        raise OipError(400, f"unknown outputs {unknown}; the model has {list(by_name)}")
    tensors = []
    for request in wanted:
        spec = by_name[request.name]
        per_row = [p["outputs"][request.name] for p in predictions]
        width = len(per_row[0]) if per_row else 0
        shape = [len(per_row), width] if len(spec.shape) > 1 else [len(per_row)]
        dtype = DTYPES.get(spec.datatype, DTYPES["BYTES"])
        flat = [value for row in per_row for value in row]
        if spec.datatype == "BYTES":
            values = np.empty(len(flat), dtype=object)
            values[:] = [str(v).encode() for v in flat]
        else:
            values = np.asarray(flat, dtype=dtype)
        tensor = Tensor(request.name, spec.datatype, values.reshape(shape))
        if request.classes:
            try:
                tensor = classification(tensor, request.classes)
            except TensorError as exc:
                raise OipError(400, str(exc)) from exc
        tensors.append(tensor)
    return tensors


async def infer(
    gateway: Gateway,
    root,
    model: str,
    version: str | None,
    inputs: list[Tensor],
    wanted: list[OutputRequest] | None,
    *,
    request_id: str | None,
    timeout_ms: int | None,
    max_rows: int,
) -> InferAnswer:
    """Score the rows of `inputs` over Kafka, as `/v1` predictions are; OipError on failure.

    `request_id` keys each row (`<id>/<row>`), so a repeated id reads back the remembered
    answers, as `/v1`'s idempotency keys do."""
    version, manifest = resolve(gateway, root, model, version)
    input_specs, output_specs = tensor_specs(root, model, version)
    rows = rows_from_inputs(inputs, manifest.feature_names, _matrix_spec(input_specs, manifest))
    if len(rows) > max_rows:
        raise OipError(413, f"{len(rows)} rows; at most {max_rows} per request")
    if not rows:
        raise OipError(400, "the inputs hold no rows")
    request_id = request_id or new_request_id()
    items = [
        PredictItem(f"{request_id}/{i}", row, f"{request_id}/{i}", version)
        for i, row in enumerate(rows)
    ]
    try:
        results = await gateway.predict(model, items, gateway.timeout_ms(timeout_ms))
    except GatewayError as exc:
        raise OipError(exc.status, exc.message) from exc
    for i, result in enumerate(results):
        if "error" in result:
            raise OipError(result.get("status", 500), f"row {i}: {result['error']['message']}")
    return InferAnswer(model, version, output_tensors(results, output_specs, wanted))


def timeout_parameter(parameters: dict[str, Any]) -> int | None:
    """The deadline in ms: our `timeout_ms`, else the Triton clients' `timeout` (microseconds)."""
    for name, scale in (("timeout_ms", 1), ("timeout", 1000)):
        value = parameters.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OipError(400, f"parameter '{name}' must be a number")
        return max(1, math.ceil(value / scale)) if value > 0 else int(value)
    return None


def classes_parameter(name: str, parameters: dict[str, Any]) -> int:
    value = parameters.get("classification", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OipError(400, f"output '{name}': classification must be a positive integer")
    return value


def decode_http_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list]:
    """The request and its input tensors from an HTTP body: all JSON, or (when the
    `Inference-Header-Content-Length` header is given) a JSON header then the binary inputs
    back to back, in the order of the inputs that carry `binary_data_size`."""
    if header_length is None:
        head, blob = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise OipError(400, f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= length <= len(body):
            raise OipError(400, f"{HEADER_LENGTH} {length} is not within the {len(body)}-byte body")
        head, blob = body[:length], memoryview(body)[length:]
    try:
        request = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise OipError(400, f"invalid inference request: {where}: {first['msg']}") from exc
    tensors, offset = [], 0
    try:
        for tensor in request.inputs:
            size = (tensor.parameters or {}).get("binary_data_size")
            if size is None:
                if tensor.data is None:
                    raise OipError(400, f"input '{tensor.name}' has neither data nor binary data")
                tensors.append(from_json(tensor.name, tensor.datatype, tensor.shape, tensor.data))
                continue
            if tensor.data is not None:
                raise OipError(400, f"input '{tensor.name}' has both data and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise OipError(400, f"input '{tensor.name}': binary_data_size must be >= 0")
            if offset + size > len(blob):
                raise OipError(
                    400,
                    f"input '{tensor.name}': binary_data_size {size} runs past the "
                    f"{len(blob)} bytes of binary data",
                )
            raw = bytes(blob[offset : offset + size])
            tensors.append(from_raw(tensor.name, tensor.datatype, tensor.shape, raw))
            offset += size
    except TensorError as exc:
        raise OipError(400, str(exc)) from exc
    if offset != len(blob):
        raise OipError(
            400, f"{len(blob)} bytes of binary data follow the header; the inputs claim {offset}"
        )
    return request, tensors


def encode_http_response(answer: InferAnswer, request: InferRequest) -> Response:
    """The infer response: JSON, or JSON header plus binary outputs for the outputs asked as
    binary (`binary_data`, else the request's `binary_data_output`)."""
    all_binary = bool((request.parameters or {}).get("binary_data_output", False))
    asked = {o.name: (o.parameters or {}) for o in request.outputs or []}
    outputs, blobs = [], []
    for tensor in answer.outputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if bool(asked.get(tensor.name, {}).get("binary_data", all_binary)):
            raw = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = to_json(tensor)
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": answer.model,
        "model_version": answer.version,
        "outputs": outputs,
    }
    if request.id is not None:
        body["id"] = request.id
    if not blobs:
        return JSONBody(body)
    head = orjson.dumps(body)
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def router(require_predict) -> APIRouter:
    """The v2 routes; `require_predict` guards every model route (metadata and readiness tell
    which models exist, infer scores); the server's health and metadata are open."""
    api = APIRouter(prefix="/v2", tags=["open-inference-protocol"])

    def gateway(request: Request) -> Gateway:
        return request.app.state.gateway

    def root(request: Request):
        return request.app.state.settings.model_repository

    @api.get("")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @api.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @api.get("/health/ready")
    async def ready(request: Request) -> JSONBody:
        is_ready = request.app.state.replies.ready()
        return JSONBody({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def metadata(request: Request, model: str, version: str | None) -> JSONBody:
        try:
            return JSONBody(model_metadata(gateway(request), root(request), model, version))
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)

    async def model_ready(request: Request, model: str, version: str | None) -> JSONBody:
        try:
            resolve(gateway(request), root(request), model, version)
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)
        return JSONBody({"name": model, "ready": True})

    async def infer_route(request: Request, model: str, version: str | None) -> Response:
        try:
            resolve(gateway(request), root(request), model, version)  # 404 before the body
            body, tensors = decode_http_request(
                await request.body(), request.headers.get(HEADER_LENGTH)
            )
            wanted = None
            if body.outputs:
                wanted = [
                    OutputRequest(o.name, classes_parameter(o.name, o.parameters or {}))
                    for o in body.outputs
                ]
            answer = await infer(
                gateway(request),
                root(request),
                model,
                version,
                tensors,
                wanted,
                request_id=body.id,
                timeout_ms=timeout_parameter(body.parameters or {}),
                max_rows=request.app.state.settings.ingest_max_batch_items,
            )
            return encode_http_response(answer, body)
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)
        except GatewayError as exc:  # an invalid deadline
            return JSONBody({"error": exc.message}, status_code=400)

    guarded = [require_predict]
    for suffix in ("", "/versions/{version}"):
        api.add_api_route(
            f"/models/{{model}}{suffix}", _bind(metadata), methods=["GET"], dependencies=guarded
        )
        api.add_api_route(
            f"/models/{{model}}{suffix}/ready",
            _bind(model_ready),
            methods=["GET"],
            dependencies=guarded,
        )
        api.add_api_route(
            f"/models/{{model}}{suffix}/infer",
            _bind(infer_route),
            methods=["POST"],
            dependencies=guarded,
            openapi_extra=json_body(InferRequest),
        )
    return api


def _matrix_spec(inputs: list[TensorSpec], manifest: Manifest) -> TensorSpec:
    for spec in inputs:
        if spec.name == manifest.input_name:
            return spec
    return TensorSpec(manifest.input_name, "FP32", (-1, len(manifest.feature_names)))


def _bind(handler):
    async def endpoint(request: Request, model: str, version: str | None = None):
        return await handler(request, model, version)

    endpoint.__name__ = handler.__name__
    return endpoint


def _tensor_meta(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
