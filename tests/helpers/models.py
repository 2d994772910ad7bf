"""Small real models for tests and benchmarks: a 20-feature fraud-style classifier exported to
ONNX with a manifest, half of its inputs read from the online store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.neural_network import MLPClassifier

from services.inference.manifest import FeatureSpec, Manifest, OutputSpec, build_profile

CARD_FEATURES = [f"card_f{i}" for i in range(8)]
MERCHANT_FEATURES = [f"merchant_f{i}" for i in range(4)]
REQUEST_FEATURES = [f"req_f{i}" for i in range(8)]
FEATURES = CARD_FEATURES + MERCHANT_FEATURES + REQUEST_FEATURES


def feature_specs() -> list[FeatureSpec]:
    """Card and merchant features come from the online store; the rest from the request."""
    specs = [FeatureSpec(name=n, source="online", entity="card", feature=n) for n in CARD_FEATURES]
    specs += [
        FeatureSpec(name=n, source="online", entity="merchant", feature=n, default=0.0)
        for n in MERCHANT_FEATURES
    ]
    specs += [FeatureSpec(name=n, source="request") for n in REQUEST_FEATURES]
    return specs


def training_data(seed: int = 7, rows: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES))).astype(np.float32)
    logit = x[:, 0] * 1.5 - x[:, 9] + 0.8 * x[:, 14] + rng.normal(scale=0.5, size=rows)
    return x, (logit > 0.5).astype(int)


def write_version(
    root: Path,
    model: str,
    version: str,
    kind: str = "gbdt",
    seed: int = 7,
    trees: int = 30,
    depth: int = 3,
) -> Path:
    """Train, export and write `<root>/<model>/<version>/{model.onnx,manifest.json}`."""
    x, y = training_data(seed, rows=max(600, trees * 20))
    if kind == "gbdt":
        estimator = GradientBoostingClassifier(
            n_estimators=trees, max_depth=depth, random_state=seed
        )
    else:
        estimator = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=seed)
    estimator.fit(x, y)
    onnx_model = to_onnx(
        estimator, x[:1], options={id(estimator): {"zipmap": False}}, target_opset=15
    )
    folder = root / model / version
    folder.mkdir(parents=True, exist_ok=True)
    payload = onnx_model.SerializeToString()
    (folder / "model.onnx").write_bytes(payload)
    input_name = onnx_model.graph.input[0].name
    scores = estimator.predict_proba(x)[:, 1]
    Manifest(
        model=model,
        version=version,
        framework="sklearn",
        input_name=input_name,
        features=feature_specs(),
        outputs=[
            OutputSpec(name="label", meaning="predicted class", shape=[None]),
            OutputSpec(name="probabilities", meaning="P(class)", shape=[None, 2]),
        ],
        score_output="probabilities",
        score_index=1,
        sha256=hashlib.sha256(payload).hexdigest(),
        reference=build_profile(x, FEATURES, scores),
        created_at_ms=int(time.time() * 1000),
    ).save(folder / "manifest.json")
    return folder
