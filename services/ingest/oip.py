"""The Open Inference Protocol (KServe v2 / Triton HTTP/REST) on the gateway.

Endpoints: `GET /v2`, `/v2/health/live`, `/v2/health/ready`, `/v2/models/{m}[/versions/{v}]`,
`.../ready`, and `POST .../infer`. Errors use the protocol's body, `{"error": "<message>"}`.

An infer request carries the model's input matrix, either as the single input tensor
(`[rows, features]`) or as one tensor per feature (`[rows]` or `[rows, 1]`, named after the
manifest's features). Each row travels the same Kafka path as a `/v1` prediction (batched,
routed, logged, monitored), with every feature supplied by the request; request values take
precedence over the online store, so a model whose manifest reads online features still scores
exactly the tensor it was given. Outputs are the model's own tensors, concatenated over rows.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from services.inference.client import RegistryError, TensorSpec, load_manifest, tensor_specs
from services.ingest.gateway import Gateway, GatewayError, PredictItem, new_request_id
from services.ingest.openapi import json_body
from services.ingest.responses import JSONBody

NUMERIC_TYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
}


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
    data: list[Any]


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested lists (the protocol allows both forms)."""
    while data and isinstance(data[0], list):
        data = list(chain.from_iterable(data))
    return data


def rows_from_inputs(
    tensors: list[InferTensor], feature_names: list[str], input_name: str
) -> list[dict[str, float]]:
    """The feature dict of every row, from one matrix tensor or one tensor per feature."""
    for tensor in tensors:
        if tensor.datatype not in NUMERIC_TYPES:
            raise OipError(400, f"input '{tensor.name}': datatype {tensor.datatype} is not numeric")
        count = int(np.prod(tensor.shape)) if tensor.shape else 0
        if count != len(flatten(tensor.data)):
            raise OipError(
                400,
                f"input '{tensor.name}': shape {tensor.shape} holds {count} "
                f"values, data has {len(flatten(tensor.data))}",
            )
    if len(tensors) == 1 and tensors[0].name not in feature_names:
        tensor = tensors[0]
        if tensor.name != input_name:
            raise OipError(
                400,
                f"unexpected input '{tensor.name}'; expected '{input_name}' or "
                f"one input per feature {feature_names}",
            )
        if len(tensor.shape) != 2 or tensor.shape[1] != len(feature_names):
            raise OipError(
                400,
                f"input '{tensor.name}' must have shape [-1, "
                f"{len(feature_names)}], got {tensor.shape}",
            )
        matrix = np.asarray(flatten(tensor.data), dtype=np.float64).reshape(tensor.shape)
        return [dict(zip(feature_names, row, strict=True)) for row in matrix.tolist()]
    by_name = {t.name: t for t in tensors}
    missing = [n for n in feature_names if n not in by_name]
    extra = [n for n in by_name if n not in feature_names]
    if missing or extra:
        raise OipError(
            400, f"inputs do not match the model's features: missing {missing}, unexpected {extra}"
        )
    columns = {}
    for name in feature_names:
        tensor = by_name[name]
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise OipError(400, f"input '{name}' must have shape [-1] or [-1, 1]")
        columns[name] = [float(v) for v in flatten(tensor.data)]
    sizes = {len(c) for c in columns.values()}
    if len(sizes) != 1:
        raise OipError(400, f"inputs have different row counts {sorted(sizes)}")
    rows = sizes.pop()
    return [{name: columns[name][i] for name in feature_names} for i in range(rows)]


def output_tensors(
    predictions: list[dict], specs: list[TensorSpec], wanted: list[str] | None
) -> list[dict]:
    """The response tensors: each model output concatenated over the rows, in its datatype."""
    names = wanted or [spec.name for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise OipError(400, f"unknown outputs {unknown}; the model has {list(by_name)}")
    tensors = []
    for name in names:
        per_row = [p["outputs"][name] for p in predictions]
        width = len(per_row[0]) if per_row else 0
        spec = by_name[name]
        shape = [len(per_row), width] if len(spec.shape) > 1 else [len(per_row)]
        data = list(chain.from_iterable(per_row))
        if spec.datatype.startswith(("INT", "UINT")):
            data = [int(v) for v in data]
        elif spec.datatype == "BOOL":
            data = [bool(v) for v in data]
        tensors.append({"name": name, "datatype": spec.datatype, "shape": shape, "data": data})
    return tensors


def router(require_predict) -> APIRouter:
    """The v2 routes; `require_predict` guards every model route (metadata and readiness tell
    which models exist, infer scores); the server's health and metadata are open."""
    api = APIRouter(prefix="/v2", tags=["open-inference-protocol"])

    def gateway(request: Request) -> Gateway:
        return request.app.state.gateway

    def resolve(request: Request, model: str, version: str | None) -> tuple[str, Any]:
        versions = gateway(request).catalog.models().get(model)
        if not versions:
            raise OipError(404, f"Model with name {model} does not exist.")
        version = version or max(versions, key=lambda v: (len(v), v))
        if version not in versions:
            raise OipError(404, f"Model {model} has no version {version}.")
        root = request.app.state.settings.model_repository
        try:
            return version, load_manifest(root, model, version)
        except RegistryError as exc:
            raise OipError(404, exc.message) from exc

    @api.get("")
    async def server_metadata() -> dict:
        return {"name": "sluiceway", "version": "1", "extensions": []}

    @api.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @api.get("/health/ready")
    async def ready(request: Request) -> JSONBody:
        is_ready = request.app.state.replies.ready()
        return JSONBody({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def metadata(request: Request, model: str, version: str | None) -> JSONBody:
        try:
            version, _manifest = resolve(request, model, version)
            root = request.app.state.settings.model_repository
            inputs, outputs = tensor_specs(root, model, version)
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)
        versions = gateway(request).catalog.models()[model]
        return JSONBody(
            {
                "name": model,
                "versions": versions,
                "platform": "onnxruntime_onnx",
                "inputs": [_tensor_meta(t) for t in inputs],
                "outputs": [_tensor_meta(t) for t in outputs],
            }
        )

    async def model_ready(request: Request, model: str, version: str | None) -> JSONBody:
        try:
            resolve(request, model, version)
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)
        return JSONBody({"name": model, "ready": True})

    async def infer(request: Request, model: str, version: str | None) -> JSONBody:
        try:
            version, manifest = resolve(request, model, version)
            try:
                body = InferRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise OipError(400, f"invalid inference request: {where}: {first['msg']}") from exc
            rows = rows_from_inputs(body.inputs, manifest.feature_names, manifest.input_name)
            limit = request.app.state.settings.ingest_max_batch_items
            if len(rows) > limit:
                raise OipError(413, f"{len(rows)} rows; at most {limit} per request")
            request_id = body.id or new_request_id()
            items = [
                PredictItem(f"{request_id}/{i}", row, f"{request_id}/{i}", version)
                for i, row in enumerate(rows)
            ]
            gw = gateway(request)
            timeout = gw.timeout_ms((body.parameters or {}).get("timeout_ms"))
            try:
                results = await gw.predict(model, items, timeout)
            except GatewayError as exc:
                raise OipError(exc.status, exc.message) from exc
            for i, result in enumerate(results):
                if "error" in result:
                    raise OipError(
                        result.get("status", 500), f"row {i}: {result['error']['message']}"
                    )
            wanted = [o.name for o in body.outputs] if body.outputs else None
            _inputs, outputs = tensor_specs(
                request.app.state.settings.model_repository, model, version
            )
            response = {
                "model_name": model,
                "model_version": version,
                "outputs": output_tensors(results, outputs, wanted),
            }
            if body.id is not None:
                response["id"] = body.id
            return JSONBody(response)
        except OipError as exc:
            return JSONBody({"error": exc.message}, status_code=exc.status)

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
            _bind(infer),
            methods=["POST"],
            dependencies=guarded,
            openapi_extra=json_body(InferRequest),
        )
    return api


def _bind(handler):
    async def endpoint(request: Request, model: str, version: str | None = None):
        return await handler(request, model, version)

    endpoint.__name__ = handler.__name__
    return endpoint


def _tensor_meta(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
