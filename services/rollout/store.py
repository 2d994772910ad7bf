"""The decision log: every controller and operator decision, with its evidence, in ClickHouse
`rollout_decisions` — and the record a restarted controller resumes from.

Each row carries the numbers that drove the decision (parallel arrays: `evidence_names[i]` has
value `evidence_values[i]`, threshold `thresholds[i]` (NaN when none), samples
`evidence_samples[i]`, status `gate_status[i]` in pass/fail/insufficient/skipped/info, and
`passed[i]` = 1 for pass), the routing weights and revision in force after it, and the full plan
and state as JSON. The newest row of a model (by `decided_at_ms`, then `seq`) is its current
rollout state: no second store of state exists to disagree with it.

Written for ClickHouse 18.16: rows travel as parameters of a columnar insert, never inline;
`ADD COLUMN IF NOT EXISTS` does not exist there, so `ensure_table` adds missing columns one by
one after comparing with `system.columns`. A `clickhouse_driver.Client` is not thread-safe: the
connection is shared behind a lock (decisions are rare; gate evidence goes through the monitor
client's own connection, only A/B outcome queries share this one).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from clickhouse_driver import Client
from clickhouse_driver.errors import Error as DriverError

from schemas.clickhouse import TABLES
from schemas.messages import RoutingEntry
from services.common.clickhouse import clickhouse_client
from services.common.settings import SluiceSettings
from services.rollout.machine import Decision, RolloutState
from services.rollout.plan import RolloutPlan, plan_from_dict

TABLE = "rollout_decisions"

COLUMNS = (
    "rollout_id", "model", "candidate", "step_index", "state_before", "state_after", "action",
    "reason", "actor", "evidence_names", "evidence_values", "thresholds", "passed",
    "weight_versions", "weights", "decided_at", "decided_at_ms", "seq", "revision",
    "evidence_samples", "gate_status", "plan_json", "state_json",
)  # fmt: skip


class StoreUnavailable(Exception):
    """ClickHouse could not be reached or refused the statement; nothing was changed."""


class ClickHouse:
    """One lazily connected ClickHouse session, shared by threads behind a lock."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.db = database
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: SluiceSettings, timeout_s: float = 10.0) -> ClickHouse:
        """A session on the ClickHouse named by the shared `clickhouse_*` settings."""
        client = clickhouse_client(settings, timeout_s)
        return cls(client, settings.clickhouse_database)

    def execute(self, sql: str, params: Any = None, **kwargs: Any) -> list[tuple]:
        """Run one statement; `{db}` in `sql` is our database. Raises `StoreUnavailable`."""
        with self._lock:
            try:
                return self.client.execute(sql.format(db=self.db), params, **kwargs)
            except (DriverError, OSError, EOFError) as exc:
                self.client.disconnect()
                first = (str(exc).strip().splitlines() or [""])[0]
                raise StoreUnavailable(f"{type(exc).__name__}: {first}") from exc


@dataclass(frozen=True)
class RecordedRollout:
    """The newest recorded state of a model's rollout, with its plan."""

    plan: RolloutPlan
    state: RolloutState


@dataclass(frozen=True)
class EvidenceItem:
    """One evidence entry of a recorded decision; `status` is a gate status or `info`."""

    name: str
    value: float | None
    threshold: float | None
    samples: int
    status: str


@dataclass(frozen=True)
class DecisionRecord:
    """One row of the decision log, as the history API shows it."""

    rollout_id: str
    model: str
    candidate: str
    seq: int
    decided_at_ms: int
    action: str
    state_before: str
    state_after: str
    step_index: int
    reason: str
    actor: str
    evidence: list[EvidenceItem]
    weights: dict[str, float]
    revision: int


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def evidence_columns(decision: Decision) -> dict[str, list]:
    """The evidence arrays of a decision: its gates, then A/B figures with status `info`."""
    names, values, thresholds, samples, statuses = [], [], [], [], []
    for gate in decision.gates:
        names.append(gate.label)
        values.append(_nan(gate.value))
        thresholds.append(_nan(gate.threshold))
        samples.append(gate.samples)
        statuses.append(gate.status.value)
    ab = decision.ab
    if ab is not None:
        figures = {
            "ab_champion_mean": (ab.mean_a, ab.n_a),
            "ab_candidate_mean": (ab.mean_b, ab.n_b),
            "ab_difference": (ab.difference, min(ab.n_a, ab.n_b)),
            "ab_ci_low": (ab.ci_low, 0),
            "ab_ci_high": (ab.ci_high, 0),
            "ab_statistic": (ab.statistic, 0),
            "ab_p_value": (ab.p_value, 0),
        }
        if ab.effect is not None:
            figures["ab_effect"] = (ab.effect, 0)
            figures["ab_effect_ci_low"] = (_nan(ab.effect_ci_low), 0)
            figures["ab_effect_ci_high"] = (_nan(ab.effect_ci_high), 0)
        for name, (value, n) in figures.items():
            names.append(name)
            values.append(float(value))
            thresholds.append(math.nan)
            samples.append(n)
            statuses.append("info")
    return {
        "evidence_names": names,
        "evidence_values": values,
        "thresholds": thresholds,
        "evidence_samples": samples,
        "gate_status": statuses,
        "passed": [int(status == "pass") for status in statuses],
    }


def decision_row(
    plan: RolloutPlan, decision: Decision, entries: Sequence[RoutingEntry]
) -> dict[str, Any]:
    """One `rollout_decisions` row for `decision` (whose `after` carries seq and revision)."""
    after = decision.after
    return {
        "rollout_id": after.rollout_id,
        "model": after.model,
        "candidate": after.candidate,
        "step_index": after.step_index,
        "state_before": decision.before.label(),
        "state_after": after.label(),
        "action": decision.action.value,
        "reason": decision.reason,
        "actor": decision.actor,
        **evidence_columns(decision),
        "weight_versions": [entry.version for entry in entries],
        "weights": [entry.weight for entry in entries],
        "decided_at": after.updated_ms // 1000,
        "decided_at_ms": after.updated_ms,
        "seq": after.seq,
        "revision": after.revision,
        "plan_json": plan.model_dump_json(),
        "state_json": after.model_dump_json(),
    }


_COLUMN_LINE = re.compile(r"^\s+([a-z_]+) ([A-Za-z0-9(), ]+?),?$")


def _declared_columns() -> list[tuple[str, str]]:
    """(name, type) of every column in the table's DDL, in order."""
    ddl = TABLES[TABLE]
    body = ddl[ddl.index("(") + 1 : ddl.index(") ENGINE")]
    return [m.groups() for line in body.splitlines() if (m := _COLUMN_LINE.match(line))]


class DecisionLog:
    """Reads and writes `rollout_decisions`."""

    def __init__(self, clickhouse: ClickHouse) -> None:
        self.ch = clickhouse

    def ensure_table(self) -> list[str]:
        """Create the table if missing and add columns an older version of it lacks; returns
        the names of the columns added."""
        self.ch.execute("CREATE DATABASE IF NOT EXISTS {db}")
        self.ch.execute(TABLES[TABLE].strip())
        present = {
            name
            for (name,) in self.ch.execute(
                "SELECT name FROM system.columns WHERE database = %(db)s AND table = %(table)s",
                {"db": self.ch.db, "table": TABLE},
            )
        }
        added = []
        for name, kind in _declared_columns():
            if name not in present:
                self.ch.execute(f"ALTER TABLE {{db}}.{TABLE} ADD COLUMN {name} {kind}")
                added.append(name)
        return added

    def record(self, row: Mapping[str, Any]) -> None:
        """Insert one decision row; raises `StoreUnavailable` when it was not stored."""
        self.ch.execute(
            f"INSERT INTO {{db}}.{TABLE} ({', '.join(COLUMNS)}) VALUES",
            [[row[name]] for name in COLUMNS],
            columnar=True,
        )

    def latest(self) -> list[RecordedRollout]:
        """The newest recorded state of every model that ever had a rollout."""
        rows = self.ch.execute(
            f"""
SELECT model, argMax(plan_json, (decided_at_ms, seq)), argMax(state_json, (decided_at_ms, seq))
FROM {{db}}.{TABLE}
WHERE state_json != ''
GROUP BY model
"""
        )
        return [
            RecordedRollout(
                plan_from_dict(orjson.loads(plan_json), f"recorded plan of {model}"),
                RolloutState.model_validate_json(state_json),
            )
            for model, plan_json, state_json in rows
        ]

    def max_revision(self, model: str) -> int:
        """The highest routing revision any decision of `model` was published with."""
        rows = self.ch.execute(
            f"SELECT max(revision) FROM {{db}}.{TABLE} WHERE model = %(model)s", {"model": model}
        )
        return int(rows[0][0]) if rows else 0

    def history(
        self, model: str, rollout_id: str | None = None, limit: int = 50
    ) -> list[DecisionRecord]:
        """Decisions of `model` (of one rollout, or of all), newest first."""
        rows = self.ch.execute(
            f"""
SELECT rollout_id, model, candidate, seq, decided_at_ms, action, state_before, state_after,
       step_index, reason, actor, evidence_names, evidence_values, thresholds,
       evidence_samples, gate_status, weight_versions, weights, revision
FROM {{db}}.{TABLE}
WHERE model = %(model)s AND (%(any_rollout)s OR rollout_id = %(rollout_id)s)
ORDER BY decided_at_ms DESC, seq DESC
LIMIT %(limit)s
""",
            {
                "model": model,
                "any_rollout": int(rollout_id is None),
                "rollout_id": rollout_id or "",
                "limit": limit,
            },
        )
        return [_record(row) for row in rows]


def _record(row: tuple) -> DecisionRecord:
    (rollout_id, model, candidate, seq, decided_at_ms, action, before, after, step_index,
     reason, actor, names, values, thresholds, samples, statuses, versions, weights,
     revision) = row  # fmt: skip
    evidence = [
        EvidenceItem(
            name=name,
            value=None if math.isnan(value) else float(value),
            threshold=None if math.isnan(threshold) else float(threshold),
            samples=int(n),
            status=status,
        )
        for name, value, threshold, n, status in zip(
            names, values, thresholds, samples, statuses, strict=False
        )
    ]
    return DecisionRecord(
        rollout_id=rollout_id,
        model=model,
        candidate=candidate,
        seq=int(seq),
        decided_at_ms=int(decided_at_ms),
        action=action,
        state_before=before,
        state_after=after,
        step_index=int(step_index),
        reason=reason,
        actor=actor,
        evidence=evidence,
        weights=dict(zip(versions, (float(w) for w in weights), strict=False)),
        revision=int(revision),
    )
