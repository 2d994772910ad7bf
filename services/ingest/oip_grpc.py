"""The Open Inference Protocol over gRPC: the KServe v2 / Triton `GRPCInferenceService`
(schemas/proto/open_inference_grpc.proto), served by the gateway process on its own port
(`SLUICE_INGEST_GRPC_PORT`) beside HTTP.

Every call goes through the same domain as the REST routes (`oip.py`): the same model
resolution, input checks and Kafka request path (batching, routing, capture). API keys are read
from the call's metadata as from HTTP headers (`authorization: Bearer <key>` or `x-api-key`);
like REST, the server's health and metadata are open and every model call needs `predict`.
Outputs always travel as `raw_output_contents`; inputs may be raw or typed `contents`. An
error is the call's status, mapped from the protocol's HTTP status (400 -> INVALID_ARGUMENT,
404 -> NOT_FOUND, 504 -> DEADLINE_EXCEEDED, ...), with the same message as the REST error body.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from grpc import aio

from schemas.proto import open_inference_grpc_pb2 as pb
from schemas.proto import open_inference_grpc_pb2_grpc as pb_grpc
from services.common.apikeys import ApiKey, authorize, presented_key
from services.ingest import oip
from services.ingest.gateway import GatewayError
from services.ingest.tensors import DTYPES, Tensor, TensorError, element_count, from_raw, to_raw

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""The protocol's HTTP status of an error -> the gRPC status of the call (else INTERNAL)."""

CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Which field of `InferTensorContents` holds a datatype's values (FP16 travels raw only)."""


def parameters_of(parameters) -> dict[str, Any]:
    """A protobuf map of `InferParameter` as plain values."""
    return {
        name: getattr(value, value.WhichOneof("parameter_choice"))
        for name, value in parameters.items()
        if value.WhichOneof("parameter_choice")
    }


def input_tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    """The request's inputs as tensors, from `raw_input_contents` or each input's `contents`;
    OipError 400 when their sizes do not fit the shapes."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise oip.OipError(
            400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; one each"
        )
    tensors = []
    try:
        for i, tensor in enumerate(request.inputs):
            shape = list(tensor.shape)
            if raw:
                tensors.append(from_raw(tensor.name, tensor.datatype, shape, raw[i]))
                continue
            field = CONTENTS_FIELDS.get(tensor.datatype)
            if field is None:
                raise TensorError(
                    f"input '{tensor.name}': datatype {tensor.datatype} must travel in "
                    "raw_input_contents"
                )
            values = list(getattr(tensor.contents, field))
            count = element_count(tensor.name, shape)
            if len(values) != count:
                raise TensorError(
                    f"input '{tensor.name}': shape {shape} holds {count} values, "
                    f"contents has {len(values)}"
                )
            array = np.empty(count, dtype=object)
            if tensor.datatype == "BYTES":
                array[:] = values
            else:
                array = np.asarray(values, dtype=DTYPES[tensor.datatype])
            tensors.append(Tensor(tensor.name, tensor.datatype, array.reshape(shape)))
    except TensorError as exc:
        raise oip.OipError(400, str(exc)) from exc
    return tensors


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service's handlers over the gateway app's state (gateway, replies, settings)."""

    def __init__(self, state, keys: list[ApiKey]) -> None:
        self.state = state
        self.keys = keys

    @property
    def root(self):
        return self.state.settings.model_repository

    async def _require_predict(self, context: aio.ServicerContext) -> None:
        if not self.keys:
            return
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        presented = presented_key(metadata.get("authorization"), metadata.get("x-api-key"))
        denied = authorize(self.keys, presented, "predict")
        if denied is not None:
            await context.abort(STATUS_CODES[denied[0]], denied[1])

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.replies.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=oip.SERVER_NAME, version=oip.SERVER_VERSION, extensions=oip.EXTENSIONS
        )

    async def ModelReady(self, request, context):
        await self._require_predict(context)
        try:
            oip.resolve(self.state.gateway, self.root, request.name, request.version or None)
        except oip.OipError as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        await self._require_predict(context)
        try:
            meta = oip.model_metadata(
                self.state.gateway, self.root, request.name, request.version or None
            )
        except oip.OipError as exc:
            await _abort(context, exc)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request, context):
        await self._require_predict(context)
        try:
            timeout_ms = oip.timeout_parameter(parameters_of(request.parameters))
            remaining = context.time_remaining()
            if timeout_ms is None and remaining is not None:
                timeout_ms = max(1, int(remaining * 1000))
            wanted = [
                oip.OutputRequest(
                    o.name, oip.classes_parameter(o.name, parameters_of(o.parameters))
                )
                for o in request.outputs
            ]
            answer = await oip.infer(
                self.state.gateway,
                self.root,
                request.model_name,
                request.model_version or None,
                input_tensors(request),
                wanted or None,
                request_id=request.id or None,
                timeout_ms=timeout_ms,
                max_rows=self.state.settings.ingest_max_batch_items,
            )
        except oip.OipError as exc:
            await _abort(context, exc)
        except GatewayError as exc:  # an invalid deadline
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        response = pb.ModelInferResponse(
            model_name=answer.model, model_version=answer.version, id=request.id
        )
        for tensor in answer.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(to_raw(tensor))
        return response


async def _abort(context: aio.ServicerContext, exc: oip.OipError) -> None:
    await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)


async def start_server(state, keys: list[ApiKey], host: str, port: int) -> aio.Server:
    """Serve the service on `host:port` in the running event loop. The port is opened with
    SO_REUSEPORT, so that the gateway's worker processes (`SLUICE_INGEST_WORKERS`) share it as
    they share the HTTP port; RuntimeError if it cannot be bound."""
    max_bytes = state.settings.ingest_max_body_bytes
    server = aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state, keys), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"the gRPC port {address} could not be bound")
    await server.start()
    return server
