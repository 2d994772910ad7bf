"""The rollout controller's public face: an HTTP client of its operator API.

    client = RolloutClient("http://127.0.0.1:8082", api_key="...")
    started = client.start(Path("plan.yaml").read_text(), source="plan.yaml")
    client.status("fraud").weights

Every non-2xx answer raises `RolloutApiError` with the server's error code, message and details
(for an invalid plan: every problem with its path). Connection failures raise it too, with code
`unreachable`.
"""

from __future__ import annotations

from typing import Any

import httpx

from services.rollout.views import CommandResult, DecisionView, RolloutView

DEFAULT_URL = "http://127.0.0.1:8082"


class RolloutApiError(Exception):
    """The API refused a request, or could not be reached (`status` 0, code `unreachable`)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class RolloutClient:
    """Calls `/v1/rollouts...` (see `services/rollout/api.py`)."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = 30.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def start(self, plan_yaml: str, source: str = "plan", actor: str = "operator") -> CommandResult:
        """Start the plan given as YAML text."""
        body = {"plan_yaml": plan_yaml, "source": source, "actor": actor}
        return CommandResult.model_validate(self._call("POST", "/v1/rollouts", json=body))

    def list(self) -> list[RolloutView]:
        """The newest rollout of every model."""
        return [RolloutView.model_validate(r) for r in self._call("GET", "/v1/rollouts")]

    def status(self, model: str) -> RolloutView:
        return RolloutView.model_validate(self._call("GET", f"/v1/rollouts/{model}"))

    def command(
        self, model: str, order: str, actor: str = "operator", reason: str = ""
    ) -> CommandResult:
        """`order` is pause, resume, promote or abort."""
        body = {"actor": actor, "reason": reason}
        return CommandResult.model_validate(
            self._call("POST", f"/v1/rollouts/{model}/{order}", json=body)
        )

    def history(
        self, model: str, rollout_id: str | None = None, limit: int = 50
    ) -> list[DecisionView]:
        params: dict[str, Any] = {"limit": limit}
        if rollout_id:
            params["rollout_id"] = rollout_id
        rows = self._call("GET", f"/v1/rollouts/{model}/history", params=params)
        return [DecisionView.model_validate(r) for r in rows]

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RolloutApiError(0, "unreachable", f"{self.http.base_url}: {exc}") from exc
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": response.text[:500]}
        raise RolloutApiError(
            response.status_code, error.get("code", "http_error"), error.get("message", ""),
            error.get("details"),
        )  # fmt: skip
