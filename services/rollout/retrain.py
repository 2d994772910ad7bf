"""Alert-triggered retraining: the closed loop drift -> alert -> retrain -> shadow -> canary.

Off unless `SLUICE_ROLLOUT_RETRAIN_HOOK` names a command. Then, every evaluation interval, the
controller looks at the alerts firing for each model's *champion* (what the follower read from
`sluice.alerts`), and `retrain_due` picks one that should start a run:

- its kind is one of `SLUICE_ROLLOUT_RETRAIN_ON` (default drift, prediction drift, quality);
- the model has no rollout in progress and no retrain run in progress;
- the model's last run started at least `SLUICE_ROLLOUT_RETRAIN_COOLDOWN_S` ago (runs are read
  back from the `retrains` table at start-up, so a restarted controller keeps the cooldown).

A run executes the hook (no shell) with the controller's environment plus
`SLUICE_RETRAIN_MODEL`, `SLUICE_RETRAIN_CHAMPION`, `SLUICE_RETRAIN_RUN_ID` and
`SLUICE_RETRAIN_ALERT` (the triggering alert as JSON). The hook trains and **registers** a new
version (publishing `sluice.models`, as `sluice models register` does) and prints, as the last
line of its standard output, a JSON object with at least `"version"` (e.g.
`{"version": "3", "metrics": {"auc_holdout": 0.93}}`). The controller then checks the version's
manifest in the model repository and starts a rollout of it from the plan template
`SLUICE_ROLLOUT_RETRAIN_PLAN` (its `candidate` is replaced by the new version; its champion is
the one in force).

Every step is a row of `retrains`: `triggered`, `trained`, `registered`, `rollout_started`, or
`failed` with the reason (hook exit status and the tail of its standard error, timeout, a
missing or unreadable version, a plan the controller refused). A failed run waits out the
cooldown like a successful one: a hook that keeps failing is not retried in a tight loop.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from prometheus_client import Counter
from pydantic import SecretStr

from schemas.clickhouse import TABLES
from services.common.metrics import metric
from services.common.routing import champion_of
from services.common.settings import SluiceSettings
from services.inference.client import load_manifest
from services.rollout.machine import FiringAlert
from services.rollout.plan import PlanError, RolloutPlan, plan_from_dict
from services.rollout.service import RolloutError, RolloutService
from services.rollout.settings import RolloutSettings
from services.rollout.store import ClickHouse, StoreUnavailable

log = logging.getLogger(__name__)

TABLE = "retrains"
COLUMNS = (
    "run_id", "model", "seq", "step", "status", "alert_id", "alert_kind", "alert_metric",
    "feature", "version", "rollout_id", "detail", "at", "at_ms",
)  # fmt: skip
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class RetrainPolicy:
    """When and how to retrain (from the `rollout_retrain_*` settings)."""

    command: tuple[str, ...]
    plan_template: dict
    kinds: frozenset[str]
    cooldown_ms: int
    timeout_s: float
    nice: int = 0

    @classmethod
    def from_settings(cls, settings: RolloutSettings) -> RetrainPolicy | None:
        """The policy, or None when no hook is configured. Raises `PlanError` for a plan
        template that cannot be read or is not a mapping."""
        command = tuple(shlex.split(settings.rollout_retrain_hook))
        if not command:
            return None
        path = settings.rollout_retrain_plan
        if path is None:
            raise PlanError("SLUICE_ROLLOUT_RETRAIN_PLAN is required with a retrain hook")
        try:
            template = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PlanError(f"{path}: cannot read the retrain plan template: {exc}") from None
        if not isinstance(template, dict):
            raise PlanError(f"{path}: the retrain plan template must be a mapping")
        return cls(
            command=command,
            plan_template=template,
            kinds=frozenset(settings.rollout_retrain_on),
            cooldown_ms=int(settings.rollout_retrain_cooldown_s * 1000),
            timeout_s=settings.rollout_retrain_timeout_s,
            nice=settings.rollout_retrain_nice,
        )


def retrain_due(
    policy: RetrainPolicy,
    firing: Sequence[FiringAlert],
    rollout_active: bool,
    running: bool,
    last_started_ms: int | None,
    now_ms: int,
) -> FiringAlert | None:
    """The champion's firing alert that starts a retrain run now, or None (see the module
    docstring). Among several, the most severe, then the furthest past its threshold."""
    if rollout_active or running:
        return None
    if last_started_ms is not None and now_ms - last_started_ms < policy.cooldown_ms:
        return None
    eligible = [a for a in firing if a.kind in policy.kinds]
    if not eligible:
        return None
    severity = {"critical": 2, "warning": 1, "info": 0}
    return max(
        eligible,
        key=lambda a: (severity.get(a.severity, 0), abs(a.value - a.threshold), a.feature),
    )


def candidate_plan(
    template: dict, model: str, version: str, description: str, source: str
) -> RolloutPlan:
    """The template with `model`, the new `candidate` and `description`; the champion is left
    to the controller (the one in force). Raises `PlanError`."""
    data = {**template, "model": model, "candidate": version, "description": description}
    data.pop("champion", None)
    return plan_from_dict(data, source)


@dataclass(frozen=True)
class HookResult:
    """What a hook reported on its last line of standard output."""

    version: str
    metrics: dict[str, float]


class HookFailed(Exception):
    """The hook did not produce a usable version; the message says why."""


def parse_hook_output(stdout: str) -> HookResult:
    """The hook's last non-empty stdout line as a `HookResult`; raises `HookFailed`."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise HookFailed("the hook printed nothing; its last line must be JSON with a version")
    try:
        report = json.loads(lines[-1])
    except ValueError:
        raise HookFailed(f"the hook's last line is not JSON: {lines[-1][:200]!r}") from None
    version = report.get("version") if isinstance(report, dict) else None
    if isinstance(version, int):
        version = str(version)
    if not isinstance(version, str) or not version.isdigit():
        raise HookFailed(f"the hook's last line has no version of digits: {lines[-1][:200]!r}")
    metrics = report.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise HookFailed("the hook's `metrics` must be an object")
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return HookResult(version, numeric)


def run_hook(
    command: Sequence[str], env: dict[str, str], timeout_s: float, nice: int = 0
) -> HookResult:
    """Run the hook to completion, `nice` steps below this process's CPU priority (what it
    starts inherits that); raises `HookFailed` with the reason.

    Training is batch work: on a machine that also serves (the local cluster, the demo) a hook
    at the same priority competes with the consumers for the cores; lowered, it takes what
    serving leaves. The priority is lowered from here, right after the start, because
    `preexec_fn` is unsafe in a process with threads (the controller runs hooks from one)."""
    try:
        process = subprocess.Popen(
            list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        raise HookFailed(f"the hook could not start: {exc}") from None
    if nice:
        _lower_priority(process.pid, nice)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise HookFailed(f"the hook ran past {timeout_s:.0f}s and was killed") from None
    finally:  # as `subprocess.run` did: a hook is never left running, whatever interrupted
        if process.poll() is None:
            process.kill()
            process.communicate()
    if process.returncode != 0:
        tail = stderr.strip()[-_STDERR_TAIL + 100 :]
        raise HookFailed(f"the hook exited with status {process.returncode}: {tail}")
    return parse_hook_output(stdout)


def _lower_priority(pid: int, steps: int) -> None:
    """Set `pid`'s niceness `steps` above ours (at most 19); a process that already ended, or
    a platform without priorities, is left as it is."""
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(19, ours + steps))
    except (OSError, AttributeError) as exc:
        log.warning("retrain hook priority not lowered", extra={"error": str(exc)})


@dataclass
class Step:
    """One row of `retrains`."""

    run_id: str
    model: str
    seq: int
    step: str
    status: str
    alert_kind: str = ""
    alert_metric: str = ""
    feature: str = ""
    version: str = ""
    rollout_id: str = ""
    detail: str = ""
    at_ms: int = 0


class RetrainLog:
    """Reads and writes `retrains`."""

    def __init__(self, clickhouse: ClickHouse) -> None:
        self.ch = clickhouse

    def ensure_table(self) -> None:
        self.ch.execute("CREATE DATABASE IF NOT EXISTS {db}")
        self.ch.execute(TABLES[TABLE].strip())

    def record(self, step: Step) -> None:
        """Insert one step; raises `StoreUnavailable`."""
        row = {**asdict(step), "alert_id": "", "at": step.at_ms // 1000}
        self.ch.execute(
            f"INSERT INTO {{db}}.{TABLE} ({', '.join(COLUMNS)}) VALUES",
            [[row[name]] for name in COLUMNS],
            columnar=True,
        )

    def last_started(self) -> dict[str, int]:
        """When each model's newest run was triggered (epoch ms)."""
        rows = self.ch.execute(
            f"SELECT model, max(at_ms) FROM {{db}}.{TABLE} WHERE step = 'triggered' GROUP BY model"
        )
        return {model: int(at_ms) for model, at_ms in rows}


class _Metrics:
    def __init__(self) -> None:
        self.runs = metric(
            Counter,
            "sluice_rollout_retrains_total",
            "Alert-triggered retrain runs by how they ended",
            ["model", "outcome"],
        )


class Retrainer:
    """Checks each interval whether a champion's alerts call for a retrain, and runs one run
    at a time per model in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        settings: RolloutSettings,
        policy: RetrainPolicy,
        service: RolloutService,
        firing: Callable[[str, str, int], tuple[FiringAlert, ...]],
        models: Callable[[], dict[str, str]],
        retrains: RetrainLog,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.service = service
        self.firing = firing
        self.models = models
        self.retrains = retrains
        self.metrics = _Metrics()
        self.last_started: dict[str, int] = {}
        self.running: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-loop", daemon=True)

    def start(self) -> None:
        """Ensure the table, read the cooldowns back, start checking."""
        self.retrains.ensure_table()
        self.last_started = self.retrains.last_started()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def check(self, now_ms: int) -> list[str]:
        """Start the runs due now; returns the models a run was started for."""
        started = []
        for model, champion in sorted(self.models().items()):
            thread = self.running.get(model)
            running = thread is not None and thread.is_alive()
            alert = retrain_due(
                self.policy,
                self.firing(model, champion, 0),
                self._rollout_active(model),
                running,
                self.last_started.get(model),
                now_ms,
            )
            if alert is None:
                continue
            self.last_started[model] = now_ms
            thread = threading.Thread(
                target=self.run, args=(model, champion, alert), name=f"retrain-{model}",
                daemon=True,
            )  # fmt: skip
            self.running[model] = thread
            thread.start()
            started.append(model)
        return started

    def run(self, model: str, champion: str, alert: FiringAlert) -> str:
        """One run, start to end; returns how it ended (`rollout_started` or `failed`)."""
        run_id = uuid.uuid4().hex[:12]
        seq = iter(range(1_000_000))

        def record(step: str, status: str = "ok", **fields: str) -> None:
            row = Step(
                run_id, model, next(seq), step, status, alert.kind, alert.metric, alert.feature,
                at_ms=_now_ms(), **fields,
            )  # fmt: skip
            try:
                self.retrains.record(row)
            except StoreUnavailable as exc:
                log.warning("retrain step not recorded", extra={"step": step, "error": str(exc)})
            log.info(
                "retrain step",
                extra={"model": model, "run_id": run_id, "step": step, "status": status, **fields},
            )  # fmt: skip

        summary = (
            f"{alert.kind} {alert.metric}{'(' + alert.feature + ')' if alert.feature else ''} "
            f"= {alert.value:.4g} vs {alert.threshold:.4g} on champion {champion}"
        )
        record("triggered", detail=summary)
        env = {
            **os.environ,
            **shared_env(self.settings),
            "SLUICE_RETRAIN_MODEL": model,
            "SLUICE_RETRAIN_CHAMPION": champion,
            "SLUICE_RETRAIN_RUN_ID": run_id,
            "SLUICE_RETRAIN_ALERT": json.dumps(asdict(alert)),
        }
        version = ""
        try:
            result = run_hook(self.policy.command, env, self.policy.timeout_s, self.policy.nice)
            version = result.version
            record("trained", version=version, detail=json.dumps(result.metrics))
            try:
                manifest = load_manifest(self.settings.model_repository, model, version)
            except Exception as exc:  # noqa: BLE001 - any unreadable manifest fails the run
                raise HookFailed(f"version {version} is not in the repository: {exc}") from None
            record("registered", version=version, detail=manifest.sha256)
            plan = candidate_plan(
                self.policy.plan_template, model, version, f"retrain {run_id}: {summary}",
                str(self.settings.rollout_retrain_plan),
            )  # fmt: skip
            decision = self.service.start(plan, actor="retrain")
            record("rollout_started", version=version, rollout_id=decision.after.rollout_id)
            outcome = "rollout_started"
        except (HookFailed, PlanError, RolloutError, StoreUnavailable) as exc:
            message = getattr(exc, "message", None) or str(exc)
            record("failed", "failed", version=version, detail=message[:_STDERR_TAIL])
            outcome = "failed"
        self.metrics.runs.labels(model, outcome).inc()
        return outcome

    def _rollout_active(self, model: str) -> bool:
        try:
            return not self.service.get(model).state.finished
        except RolloutError:
            return False

    def _loop(self) -> None:
        interval = self.settings.rollout_eval_interval_s
        while not self._stopping.wait(interval):
            try:
                self.check(_now_ms())
            except Exception:  # noqa: BLE001 - the loop must outlive one bad check
                log.exception("retrain check failed")


def champions(tables: Callable[[], dict]) -> Callable[[], dict[str, str]]:
    """`models()` for `Retrainer`: the champion in force of every model with a routing table."""

    def current() -> dict[str, str]:
        return {model: champion_of(table) for model, table in tables().items()}

    return current


def shared_env(settings: SluiceSettings) -> dict[str, str]:
    """`SLUICE_*` variables for every shared setting, as `settings` holds them, so that a hook
    talks to the same Kafka, Redis, ClickHouse and model repository as the controller."""
    env = {}
    for name in SluiceSettings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"SLUICE_{name.upper()}"] = str(value)
    return env


def _now_ms() -> int:
    return int(time.time() * 1000)
