"""The demo's training script: both versions train, convert with parity and register."""

from __future__ import annotations

from deploy.demo.train import train
from services.inference.registry import list_models, load_manifest


def test_training_registers_both_demo_versions_with_features_and_metrics(tmp_path):
    aucs = train(tmp_path, days=1.0)
    assert set(aucs) == {"1", "2"} and min(aucs.values()) > 0.9
    assert list_models(tmp_path) == {"fraud": ["1", "2"]}
    manifest = load_manifest(tmp_path, "fraud", "2")
    online = [f for f in manifest.features if f.source == "online"]
    assert {f.entity for f in online} == {"card", "merchant"}
    assert all(f.default is not None for f in online), "online features declare defaults"
    assert manifest.metrics["auc_holdout"] == aucs["2"]
    assert manifest.reference is not None
