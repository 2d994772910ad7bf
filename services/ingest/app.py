"""Wiring of the HTTP gateway: the FastAPI app, its lifespan (producer, reply listener), error
handlers and protections. Routes parse, call one domain function, and return its result."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field, ValidationError

from schemas.messages import Event, Label, Scalar
from schemas.topics import EVENTS, LABELS, REQUESTS
from services.common.apikeys import authorize, parse_keys, presented_key
from services.common.worker import tune_garbage_collector
from services.ingest.capture import capture
from services.ingest.gateway import Gateway, GatewayError, ModelCatalog, PredictItem
from services.ingest.limits import BodySizeLimit, LoopLag
from services.ingest.oip import router as oip_router
from services.ingest.oip_grpc import start_server as start_grpc_server
from services.ingest.openapi import capture_body, document_api_keys, json_body
from services.ingest.producer import AsyncProducer
from services.ingest.replies import ReplyListener
from services.ingest.responses import JSONBody
from services.ingest.settings import IngestSettings

M = TypeVar("M", bound=BaseModel)
ModelName = Annotated[str, Path(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+$")]


class PredictBody(BaseModel):
    """One entity to score. `request_id` is an idempotency key: a repeat returns the same
    answer without scoring again."""

    entity_id: str = Field(min_length=1, max_length=256)
    features: dict[str, Scalar] = Field(default_factory=dict)
    request_id: str | None = Field(None, min_length=1, max_length=256)
    version: str | None = Field(None, description="Pin a version instead of routing.")
    timeout_ms: int | None = Field(None, description="Deadline; default from settings.")


class BatchBody(BaseModel):
    """Many entities scored in one call; each gets its own result, in order."""

    instances: list[PredictBody] = Field(min_length=1)
    timeout_ms: int | None = None


PREDICT_DOCS = {
    **json_body(PredictBody),
    "parameters": [
        {
            "name": "timeout_ms",
            "in": "query",
            "required": False,
            "schema": {"type": "integer"},
            "description": "Deadline in milliseconds (before the header and the body's).",
        },
        {
            "name": "x-timeout-ms",
            "in": "header",
            "required": False,
            "schema": {"type": "integer"},
            "description": "Deadline in milliseconds (before the body's).",
        },
    ],
}
"""OpenAPI of the predict route's body and deadline parameters, which it reads itself."""


async def _parsed_body(request: Request, model: type[M]) -> M:
    """The request body as `model`; a 422 naming the failing fields otherwise, as FastAPI's."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _int_param(value: str | None, loc: tuple[str, str]) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        error = {"loc": loc, "msg": "Input should be a valid integer", "type": "int_parsing"}
        raise RequestValidationError([error]) from None


def _timeout(gateway: Gateway, *candidates: int | None) -> int:
    return gateway.timeout_ms(next((c for c in candidates if c is not None), None))


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    """Build the gateway app; Kafka clients start with the app's lifespan."""
    settings = settings or IngestSettings()
    keys = parse_keys(settings.ingest_api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        producer = AsyncProducer(settings, **{"linger.ms": settings.ingest_linger_ms})
        replies = ReplyListener(
            settings,
            settings.ingest_reply_group,
            resume_window_s=settings.ingest_max_timeout_ms / 1000,
            partition_slice_ms=settings.ingest_partition_slice_ms,
        )
        producer.start(loop)
        replies.start(loop)
        loop_lag = LoopLag()
        loop_lag.start()
        app.state.producer = producer
        app.state.replies = replies
        app.state.gateway = Gateway(
            producer,
            replies,
            ModelCatalog(settings.model_repository),
            default_timeout_ms=settings.ingest_default_timeout_ms,
            max_timeout_ms=settings.ingest_max_timeout_ms,
            max_in_flight=settings.ingest_max_in_flight,
            loop_lag=loop_lag,
            max_loop_lag_ms=settings.ingest_max_loop_lag_ms,
            idempotency_ttl_s=settings.ingest_idempotency_ttl_s,
            request_partitions=await loop.run_in_executor(None, producer.partitions, REQUESTS.name),
            partition_slice_ms=settings.ingest_partition_slice_ms,
        )
        # Collections of the young generation were the gateway's latency tail: p99 at 16
        # connections 71-96 ms without this, 33-37 ms with it (gateway bench, 2-core VM).
        tune_garbage_collector()
        grpc_server = None
        if settings.ingest_grpc_port:
            grpc_server = await start_grpc_server(
                app.state, keys, settings.ingest_host, settings.ingest_grpc_port
            )
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1)
            loop_lag.stop()
            replies.close()
            producer.close()

    app = FastAPI(
        title="Sluiceway gateway",
        version="1",
        default_response_class=JSONBody,
        lifespan=lifespan,
        description="Synchronous predictions over Kafka, traffic capture, and the Open "
        "Inference Protocol (v2).",
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.ingest_max_body_bytes)

    guarded_by: set = set()

    def role(name: str):
        # Reads the headers itself: declared as two Header parameters, FastAPI validated both on
        # every request (~5% of the gateway's CPU). The OpenAPI document states the scheme
        # (`document_api_keys`). `async`: a plain `def` dependency costs a thread-pool hop.
        async def check(request: Request) -> None:
            if not keys:
                return
            headers = request.headers
            presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
            denied = authorize(keys, presented, name)
            if denied is not None:
                code = "unauthorized" if denied[0] == 401 else "forbidden"
                raise GatewayError(denied[0], code, denied[1])

        guarded_by.add(check)
        return Depends(check)

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> JSONBody:
        return JSONBody(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONBody:
        details = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        body = {
            "error": {"code": "validation_error", "message": "invalid request", "details": details}
        }
        return JSONBody(body, status_code=422)

    def gateway_of(request: Request) -> Gateway:
        return request.app.state.gateway

    @app.post(
        "/v1/models/{model}/predict",
        dependencies=[role("predict")],
        openapi_extra=PREDICT_DOCS,
    )
    async def predict(model: ModelName, request: Request) -> JSONBody:
        # The body and the deadline parameters are read here rather than declared: FastAPI's
        # per-parameter solving was a fifth of the gateway's CPU on this, its busiest route.
        body = await _parsed_body(request, PredictBody)
        gateway = gateway_of(request)
        deadline = _timeout(
            gateway,
            _int_param(request.query_params.get("timeout_ms"), ("query", "timeout_ms")),
            _int_param(request.headers.get("x-timeout-ms"), ("header", "x-timeout-ms")),
            body.timeout_ms,
        )
        item = PredictItem(body.entity_id, body.features, body.request_id, body.version)
        (result,) = await gateway.predict(model, [item], deadline)
        if "status" not in result:
            return JSONBody(result)
        # an error result: its status is the HTTP status, not part of the body (and the result
        # is remembered for a repeat of the request id, so it is copied, not changed)
        body = {key: value for key, value in result.items() if key != "status"}
        return JSONBody(body, status_code=result["status"])

    @app.post("/v1/models/{model}/predict:batch", dependencies=[role("predict")])
    async def predict_batch(
        model: ModelName,
        body: BatchBody,
        request: Request,
        timeout_ms: Annotated[int | None, Query()] = None,
    ) -> dict:
        gateway = gateway_of(request)
        if len(body.instances) > settings.ingest_max_batch_items:
            raise GatewayError(
                413,
                "too_many_items",
                f"{len(body.instances)} instances; at most {settings.ingest_max_batch_items}",
            )
        deadline = _timeout(gateway, timeout_ms, body.timeout_ms)
        items = [
            PredictItem(i.entity_id, i.features, i.request_id, i.version) for i in body.instances
        ]
        return {"predictions": await gateway.predict(model, items, deadline)}

    @app.post(
        "/v1/events",
        dependencies=[role("ingest")],
        status_code=202,
        openapi_extra=capture_body(Event),
    )
    async def post_events(request: Request) -> JSONBody:
        status, body = await capture(
            request.app.state.producer,
            EVENTS.name,
            await request.body(),
            Event,
            settings.ingest_max_batch_items,
        )
        return JSONBody(body, status_code=status)

    @app.post(
        "/v1/labels",
        dependencies=[role("ingest")],
        status_code=202,
        openapi_extra=capture_body(Label),
    )
    async def post_labels(request: Request) -> JSONBody:
        status, body = await capture(
            request.app.state.producer,
            LABELS.name,
            await request.body(),
            Label,
            settings.ingest_max_batch_items,
        )
        return JSONBody(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONBody:
        replies: ReplyListener = request.app.state.replies
        ready = replies.ready()
        body = {"status": "ready" if ready else "not_ready", "reply_partitions": replies.partitions}
        return JSONBody(body, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.state.require_predict = role("predict")
    oip = oip_router(role("predict"))
    app.include_router(oip)
    document_api_keys(app, guarded_by, [*app.routes, *oip.routes])
    return app
