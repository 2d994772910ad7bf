"""The demo's retrain hook: a new fraud version from recent traffic, with no hand in between.

The rollout controller runs `python -m deploy.demo.retrain` when the champion's drift or
quality alert fires (`SLUICE_ROLLOUT_RETRAIN_HOOK`, see services/rollout/retrain.py). It:

1. takes the newest labelled transactions from ClickHouse (`events` joined with `labels` on the
   transaction id, in their dedup form);
2. builds the point-in-time training set with the same feature definitions the stream serves,
   offline (`services.features.offline`): each transaction's card and merchant features as of
   just before it, plus its request-time features;
3. fits the champion's recipe (gradient-boosted trees) on the older 75% by event time, checks it
   on the newest 25%, and refuses to register a model that does not beat chance;
4. converts it with a parity check, registers it as the next version of `fraud` in
   `SLUICE_MODEL_REPOSITORY`, publishes `sluice.models`, and prints
   `{"version": ..., "metrics": ...}` as its last line for the controller.

Run by hand with `--dry-run` to see the training set it would use without registering.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from deploy.demo.train import (
    DEFINITIONS,
    REQUEST_FEATURES,
    WeakModel,
    fit_and_register,
    gbdt,
    online_feature_names,
    request_features,
)
from services.common.settings import SluiceSettings
from services.features.definitions import FeatureRegistry
from services.features.offline import EventLog, SpineRow, build_training_set, connect_clickhouse
from services.inference.registry import kafka_publisher, versions

MODEL = "fraud"


class NotEnoughData(Exception):
    """Too few labelled transactions (or frauds) to train on."""


def labelled_transactions(client, database: str, limit: int) -> list[tuple]:
    """The newest `limit` transactions that have a label, oldest first: `(event_id, ts_ms,
    entities, fields, label)`."""
    rows = client.execute(
        f"""
        SELECT event_id, ts_ms, entity_names, entity_ids, num_names, num_values,
               str_names, str_values, label
        FROM (
            SELECT event_id, ts_ms, entity_names, entity_ids, num_names, num_values,
                   str_names, str_values
            FROM {database}.events FINAL
            WHERE event_type = 'transaction'
        )
        ANY INNER JOIN (
            SELECT request_id AS event_id, value AS label
            FROM {database}.labels FINAL
            WHERE model = %(model)s OR model = ''
        ) USING event_id
        ORDER BY ts_ms DESC, event_id
        LIMIT %(limit)s
        """,
        {"model": MODEL, "limit": limit},
    )
    result = []
    for event_id, ts, en, eid, nn, nv, sn, sv, label in reversed(rows):
        fields: dict = dict(zip(nn, nv, strict=True))
        fields.update(zip(sn, sv, strict=True))
        result.append((event_id, ts, dict(zip(en, eid, strict=True)), fields, label))
    return result


def training_matrix(
    settings: SluiceSettings, limit: int, min_rows: int, min_positives: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix, labels, event times) in the manifest's column order; raises `NotEnoughData`."""
    client = connect_clickhouse(settings)
    rows = labelled_transactions(client, settings.clickhouse_database, limit)
    labels = np.array([int(row[4] >= 0.5) for row in rows], dtype=int)
    if len(rows) < min_rows or labels.sum() < min_positives:
        raise NotEnoughData(
            f"{len(rows)} labelled transactions with {labels.sum()} frauds; need at least "
            f"{min_rows} and {min_positives}"
        )
    registry = FeatureRegistry.load(DEFINITIONS)
    names = online_feature_names(registry)
    spine = [
        SpineRow(ids=entities, at_ms=ts - 1, passthrough={})
        for _event_id, ts, entities, _fields, _label in rows
    ]
    log = EventLog(client, settings.clickhouse_database)
    online = list(build_training_set(registry, log, spine, names))
    request = [request_features(fields) for _e, _t, _en, fields, _l in rows]
    matrix = np.array(
        [
            [o[n] for n in names] + [r[n] for n in REQUEST_FEATURES]
            for o, r in zip(online, request, strict=True)
        ],
        dtype=np.float32,
    )
    times = np.array([row[1] for row in rows], dtype=np.int64)
    return matrix, labels, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="newest labelled rows to use")
    parser.add_argument("--min-rows", type=int, default=2_000)
    parser.add_argument("--min-positives", type=int, default=20)
    parser.add_argument("--min-auc", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dry-run", action="store_true", help="report, register nothing")
    args = parser.parse_args()
    settings = SluiceSettings()
    try:
        matrix, labels, times = training_matrix(
            settings, args.rows, args.min_rows, args.min_positives
        )
    except NotEnoughData as exc:
        print(f"not retraining: {exc}", file=sys.stderr)
        return 3
    cutoff = np.quantile(times, 0.75)
    train_rows = times < cutoff
    root = settings.model_repository
    version = str(max((int(v) for v in versions(root, MODEL)), default=0) + 1)
    print(
        f"training set: {len(labels)} rows, {int(labels.sum())} frauds, "
        f"{int(train_rows.sum())} for training; next version {version}",
        file=sys.stderr,
    )
    if args.dry_run:
        return 0
    try:
        auc = fit_and_register(
            root, version, gbdt(args.seed),
            "Gradient-boosted trees retrained on recent labelled traffic (alert-triggered).",
            matrix, labels, train_rows, publish=kafka_publisher(settings), min_auc=args.min_auc,
        )  # fmt: skip
    except WeakModel as exc:
        print(f"not registering: {exc}", file=sys.stderr)
        return 4
    print(
        json.dumps(
            {
                "version": version,
                "metrics": {
                    "auc_holdout": auc,
                    "train_rows": int(train_rows.sum()),
                    "frauds": int(labels.sum()),
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
