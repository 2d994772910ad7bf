"""Train the demo's two fraud model versions from the demo stream, with the same feature
definitions the features service serves, and export them to the model repository layout.

`python -m deploy.demo.train [--out deploy/demo/models] [--days 4]` writes
`fraud/1` (gradient-boosted trees, the champion) and `fraud/2` (a small MLP, the candidate):
`model.onnx` plus a manifest with parity-checked conversion, training metrics and the reference
profile the monitor compares live traffic with. Reproducible from the seed.

Point in time: a transaction's online features are its card's and merchant's values as of just
before the transaction (the serving path reads them before the transaction's own event reaches
the features service), computed by the very window code the stream runs (`values_as_of`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from deploy.demo.generator import CATEGORIES, DAY_MS, DemoConfig, DemoItem, generate
from services.features.definitions import FeatureRegistry
from services.features.offline import values_as_of
from services.features.windows import Observation
from services.inference.convert import import_model
from services.inference.manifest import FeatureSpec
from services.inference.registry import register

HERE = Path(__file__).resolve().parent
DEFINITIONS = HERE / "features.yaml"
HIGH_RISK = {c.name for c in CATEGORIES if c.high_risk}
REQUEST_FEATURES = ("amount", "hour", "card_present", "high_risk_category")
"""Request-time features, derived from the transaction by whoever asks for a prediction."""


def request_features(item_fields: dict) -> dict[str, float]:
    """The numeric request-time features of a transaction (what the demo traffic sends)."""
    return {
        "amount": float(item_fields["amount"]),
        "hour": float(item_fields["hour"]),
        "card_present": 1.0 if item_fields.get("card_present") else 0.0,
        "high_risk_category": 1.0 if item_fields.get("merchant_category") in HIGH_RISK else 0.0,
    }


def online_feature_names(registry: FeatureRegistry) -> list[str]:
    return [f.name for f in registry.features]


def training_set(
    items: list[DemoItem], registry: FeatureRegistry
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(matrix, labels, column names, event times) for every transaction in `items`."""
    observations: dict[tuple[str, str], list[Observation]] = defaultdict(list)
    for item in items:
        event = item.event
        for entity, entity_id in event.entities.items():
            plan = registry.plan(entity)
            values = plan.extract(event.fields, event.entities)
            observations[(entity, entity_id)].append(
                Observation(event.ts_ms, event.event_type, event.event_id, 0, values)
            )
    for series in observations.values():
        series.sort(key=lambda o: (o.ts, o.event_id))
    names = online_feature_names(registry)
    online = {name: np.zeros(len(items)) for name in names}
    asked: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        for entity, entity_id in item.event.entities.items():
            asked[(entity, entity_id)].append(index)
    for (entity, entity_id), indexes in asked.items():
        plan = registry.plan(entity)
        times = [items[i].event.ts_ms - 1 for i in indexes]
        for index, (_clock, values) in zip(
            indexes,
            values_as_of(registry, entity, observations[(entity, entity_id)], times),
            strict=True,
        ):
            for name in plan.names:
                value = values.get(name)
                online[name][index] = plan.defaults[name] if value is None else value
    request = [request_features(item.event.fields) for item in items]
    columns = names + list(REQUEST_FEATURES)
    matrix = np.column_stack(
        [online[n] for n in names] + [[r[n] for r in request] for n in REQUEST_FEATURES]
    ).astype(np.float32)
    labels = np.array([item.label.value for item in items], dtype=int)
    times = np.array([item.event.ts_ms for item in items])
    return matrix, labels, columns, times


def feature_specs(registry: FeatureRegistry) -> list[FeatureSpec]:
    """Manifest columns: online features by entity (declared defaults), then request ones."""
    specs = [
        FeatureSpec(
            name=f.name, source="online", entity=f.entity, feature=f.name, default=float(f.default)
        )
        for f in registry.features
    ]
    return specs + [FeatureSpec(name=n, source="request") for n in REQUEST_FEATURES]


class WeakModel(ValueError):
    """A fitted model not good enough to register."""


def gbdt(seed: int) -> GradientBoostingClassifier:
    """The champion's recipe (also what the retrain hook fits on recent traffic)."""
    return GradientBoostingClassifier(n_estimators=120, max_depth=3, random_state=seed)


def fit_and_register(
    out: Path,
    version: str,
    estimator,
    description: str,
    matrix: np.ndarray,
    labels: np.ndarray,
    train_rows: np.ndarray,
    publish=None,
    min_auc: float = 0.0,
) -> float:
    """Fit on `train_rows`, score the rest, convert with a parity check, register `version`
    (with the holdout rows as the reference profile); returns the holdout AUC. Raises
    `WeakModel` (registering nothing) when that AUC is below `min_auc`."""
    registry = FeatureRegistry.load(DEFINITIONS)
    test_rows = ~train_rows
    estimator.fit(matrix[train_rows], labels[train_rows])
    scores = estimator.predict_proba(matrix[test_rows])[:, 1]
    auc = float(roc_auc_score(labels[test_rows], scores))
    if auc < min_auc:
        raise WeakModel(f"holdout AUC {auc:.3f} is below {min_auc}")
    result = import_model(
        estimator,
        "sklearn",
        feature_specs(registry),
        matrix[test_rows][:2000],
        model="fraud",
        version=version,
        metrics={
            "auc_holdout": auc,
            "fraud_rate": float(labels.mean()),
            "train_rows": float(train_rows.sum()),
        },
        description=description,
    )
    with tempfile.TemporaryDirectory() as scratch:
        shutil.rmtree(out / "fraud" / version, ignore_errors=True)
        register(out, result.write(Path(scratch) / "model.onnx"), result.manifest, publish=publish)
    return auc


def train(out: Path, days: float = 4.0, seed: int = 7) -> dict[str, float]:
    """Train, convert and write both versions; returns their holdout AUCs."""
    registry = FeatureRegistry.load(DEFINITIONS)
    config = DemoConfig(seed=seed)
    items = list(generate(config, until_ms=config.start_ms + int(days * DAY_MS)))
    matrix, labels, columns, times = training_set(items, registry)
    cutoff = config.start_ms + int(days * 0.75 * DAY_MS)
    candidates = {
        "1": (
            gbdt(seed),
            "Gradient-boosted trees over card/merchant velocity and amount features.",
        ),
        "2": (
            make_pipeline(
                StandardScaler(),
                MLPClassifier(
                    hidden_layer_sizes=(32, 16),
                    max_iter=400,
                    early_stopping=True,
                    random_state=seed,
                ),
            ),
            "A small MLP on standardised features (the candidate).",
        ),
    }
    return {
        version: fit_and_register(
            out, version, estimator, description, matrix, labels, times < cutoff
        )
        for version, (estimator, description) in candidates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--days", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for version, auc in train(args.out, args.days, args.seed).items():
        print(f"fraud/{version}: holdout AUC {auc:.4f}")


if __name__ == "__main__":
    main()
