"""The operator HTTP API (FastAPI): thin routes over `RolloutService`.

| method and path                          | role   | does                                        |
|------------------------------------------|--------|---------------------------------------------|
| `POST /v1/rollouts`                      | admin  | start a plan (YAML text or JSON object)     |
| `GET /v1/rollouts`                       | viewer | the newest rollout of every model           |
| `GET /v1/rollouts/{model}`               | viewer | step, weights, gate values vs thresholds    |
| `POST /v1/rollouts/{model}/pause`        | admin  | hold the current traffic split              |
| `POST /v1/rollouts/{model}/resume`       | admin  | continue the step (its clock restarts)      |
| `POST /v1/rollouts/{model}/promote`      | admin  | make the candidate champion now             |
| `POST /v1/rollouts/{model}/abort`        | admin  | everyone back to the champion               |
| `GET /v1/rollouts/{model}/history`       | viewer | recorded decisions, newest first            |
| `GET /v1/status`                         | viewer | models the status page can show             |
| `GET /v1/status/{model}?minutes=60`      | viewer | the status page's data (`status.py`)        |
| `GET /status`                            | —      | the status page (static; reads the above)   |

Errors are `{"error": {"code", "message", "details"}}`: 401/403 keys, 404 `no_rollout`, 409
`rollout_active`, `no_champion`, `candidate_is_champion` or the state machine's `not_paused`,
`already_paused`, `rollout_finished`; 422
`invalid_plan` (details: every problem with its path) or `invalid_request`, 503
`store_unavailable` (ClickHouse refused: nothing was changed). Also `/healthz`, `/readyz`,
`/metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.rollout import status as status_data
from services.rollout.auth import ApiKeys, AuthError
from services.rollout.machine import Command, TransitionError
from services.rollout.plan import PlanError, parse_plan, plan_from_dict
from services.rollout.service import RolloutError, RolloutService
from services.rollout.store import ClickHouse, StoreUnavailable
from services.rollout.views import (
    CommandRequest,
    CommandResult,
    DecisionView,
    RolloutView,
    StartRequest,
    command_result,
    decision_view,
    rollout_view,
)

STATIC = Path(__file__).resolve().parent / "static"
"""The status page's files (shipped as package data)."""


def _error(status: int, code: str, message: str, details: object = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(status_code=status, content=body)


def create_api(
    service: RolloutService,
    keys: ApiKeys,
    ready: Callable[[], bool],
    status_store: ClickHouse,
) -> FastAPI:
    """The operator API over `service`; `ready` answers `/readyz`; the status page reads
    ClickHouse through `status_store` (a session of its own, so page loads never wait on the
    decision log's connection)."""
    api = FastAPI(title="Sluiceway rollout controller", version="1")
    viewer = Depends(keys.require("viewer"))
    admin = Depends(keys.require("admin"))

    @api.exception_handler(RolloutError)
    async def _rollout_error(_request: Request, exc: RolloutError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @api.exception_handler(TransitionError)
    async def _transition_error(_request: Request, exc: TransitionError) -> JSONResponse:
        return _error(409, exc.code, exc.message)

    @api.exception_handler(PlanError)
    async def _plan_error(_request: Request, exc: PlanError) -> JSONResponse:
        return _error(422, "invalid_plan", str(exc).splitlines()[0], exc.problems)

    @api.exception_handler(StoreUnavailable)
    async def _store_error(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, "store_unavailable", f"decision log unavailable: {exc}")

    @api.exception_handler(AuthError)
    async def _auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        return _error(422, "invalid_request", "request failed validation", details)

    @api.post("/v1/rollouts", status_code=201, dependencies=[admin])
    def start(body: StartRequest) -> CommandResult:
        """Start a rollout; its first step's routing is published when this returns."""
        if body.plan_yaml is not None:
            plan = parse_plan(body.plan_yaml, body.source)
        else:
            plan = plan_from_dict(body.plan or {}, body.source)
        decision = service.start(plan, actor=body.actor)
        return command_result(decision, service.get(plan.model))

    @api.get("/v1/rollouts", dependencies=[viewer])
    def list_rollouts() -> list[RolloutView]:
        return [rollout_view(r) for r in service.overview()]

    @api.get("/v1/rollouts/{model}", dependencies=[viewer])
    def status(model: str) -> RolloutView:
        return rollout_view(service.get(model))

    def _override(order: Command):
        def route(model: str, body: CommandRequest | None = None) -> CommandResult:
            body = body or CommandRequest()
            decision = service.command(model, order, actor=body.actor, note=body.reason)
            return command_result(decision, service.get(model))

        route.__name__ = order.value
        route.__doc__ = f"{order.value.capitalize()} the model's rollout (operator override)."
        return route

    for order in Command:
        api.post(f"/v1/rollouts/{{model}}/{order.value}", dependencies=[admin])(_override(order))

    @api.get("/v1/rollouts/{model}/history", dependencies=[viewer])
    def history(
        model: str,
        rollout_id: str | None = None,
        limit: int = Query(50, ge=1, le=10_000),
    ) -> list[DecisionView]:
        return [decision_view(r) for r in service.history(model, rollout_id, limit)]

    @api.get("/v1/status", dependencies=[viewer])
    def status_models(minutes: int = Query(1440, ge=1, le=43_200)) -> dict[str, list[str]]:
        """Models with predictions in the last `minutes` or any recorded rollout."""
        since_s = int(time.time()) - minutes * 60
        return {"models": status_data.models(status_store, since_s)}

    @api.get("/v1/status/{model}", dependencies=[viewer])
    def model_status(
        model: str, minutes: int = Query(60, ge=1, le=43_200)
    ) -> status_data.ModelStatus:
        """Traffic split, latency, drift and the rollout timeline of the last `minutes`."""
        until_s = int(time.time()) + 1
        return status_data.model_status(status_store, model, until_s, minutes)

    @api.get("/status", include_in_schema=False)
    def status_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    api.mount("/status/static", StaticFiles(directory=STATIC), name="status-static")

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz() -> JSONResponse:
        is_ready = ready()
        return JSONResponse(
            status_code=200 if is_ready else 503,
            content={"status": "ready" if is_ready else "not_ready"},
        )

    @api.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return api
