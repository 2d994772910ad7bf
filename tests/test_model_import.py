"""Model import: conversion to ONNX, parity against the original, quantization, the CLI command."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from typer.testing import CliRunner

from services.inference.cli import app
from services.inference.convert import ImportResult, import_model
from services.inference.manifest import FeatureSpec, NumericProfile
from services.inference.registry import (
    RegistryError,
    list_models,
    load_manifest,
    register,
    validate_version,
)

WIDTH = 20
NAMES = [f"x{i}" for i in range(WIDTH)]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    x = rng.normal(size=(300, WIDTH))
    y = (x[:, 0] + x[:, 1] * x[:, 2] + 0.3 * rng.normal(size=300) > 0).astype(int)
    return x, y


@pytest.fixture(scope="module")
def gbdt(data) -> GradientBoostingClassifier:
    return GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0).fit(*data)


@pytest.fixture(scope="module")
def mlp(data) -> MLPClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier((32, 16), max_iter=200, random_state=0).fit(*data)


def assert_registrable(result: ImportResult, tmp_path: Path) -> None:
    model_path = result.write(tmp_path / "model.onnx")
    folder = register(tmp_path / "models", model_path, result.manifest)
    assert validate_version(folder) == result.manifest


def test_gradient_boosting_import_matches_sklearn_and_prefills_the_manifest(gbdt, data, tmp_path):
    x, _ = data
    result = import_model(
        gbdt, "sklearn", NAMES, x, model="fraud", version="3", metrics={"auc": 0.9}
    )
    assert result.max_abs_diff <= 1e-5
    manifest = result.manifest
    assert (manifest.model, manifest.version, manifest.framework) == ("fraud", "3", "sklearn")
    assert manifest.feature_names == NAMES
    assert {f.source for f in manifest.features} == {"request"}
    assert (manifest.input_name, manifest.score_output, manifest.score_index) == (
        "input",
        "probabilities",
        1,
    )
    assert manifest.sha256 == hashlib.sha256(result.onnx_bytes).hexdigest()
    assert manifest.metrics == {"auc": 0.9}
    assert manifest.reference is not None and manifest.reference.rows == len(x)
    assert set(manifest.reference.features) == set(NAMES)
    prediction = manifest.reference.prediction
    assert prediction.mean == pytest.approx(gbdt.predict_proba(x)[:, 1].mean(), abs=1e-5)
    assert result.rows_per_s > 0 and result.quantization is None
    assert_registrable(result, tmp_path)


def test_mlp_import_matches_sklearn(mlp, data, tmp_path):
    x, _ = data
    result = import_model(mlp, "sklearn", NAMES, x)
    assert result.max_abs_diff <= 1e-5
    assert_registrable(result, tmp_path)


def test_import_reads_a_joblib_file_and_keeps_given_feature_specs(gbdt, data, tmp_path):
    x, _ = data
    path = tmp_path / "gbdt.joblib"
    joblib.dump(gbdt, path)
    online = FeatureSpec(name="x0", source="online", entity="card", feature="txn_count_1h")
    result = import_model(path, "sklearn", [online, *NAMES[1:]], x)
    assert result.manifest.features[0] == online
    assert result.max_abs_diff <= 1e-5


def test_a_parity_failure_is_refused_with_the_difference(mlp, data):
    x, _ = data
    with pytest.raises(RegistryError) as caught:
        import_model(mlp, "sklearn", NAMES, x, tolerance=0.0)
    error = caught.value
    assert error.code == "parity_failed"
    assert error.details["max_abs_diff"] > 0
    assert f"{error.details['max_abs_diff']:.3g}" in error.message


def test_quantize_reports_int8_parity_and_speed(mlp, data, tmp_path):
    x, _ = data
    result = import_model(mlp, "sklearn", NAMES, x, quantize=True)
    report = result.quantization
    assert report is not None
    assert report.quantized_ops > 0
    assert 0 < report.max_abs_diff <= report.tolerance == 0.05
    assert report.fp32_rows_per_s > 0 and report.int8_rows_per_s > 0
    assert result.manifest.sha256 == hashlib.sha256(result.onnx_bytes).hexdigest()
    assert_registrable(result, tmp_path)


def test_a_quantized_model_outside_its_tolerance_is_refused(mlp, data):
    x, _ = data
    with pytest.raises(RegistryError) as caught:
        import_model(mlp, "sklearn", NAMES, x, quantize=True, quantized_tolerance=1e-6)
    assert caught.value.code == "parity_failed" and "int8" in caught.value.message


def test_quantizing_a_tree_ensemble_changes_no_operator(gbdt, data):
    x, _ = data
    report = import_model(gbdt, "sklearn", NAMES, x, quantize=True).quantization
    assert report is not None and report.quantized_ops == 0
    assert report.max_abs_diff <= 1e-5


def test_a_sample_that_does_not_fit_the_features_is_refused(gbdt, data):
    x, _ = data
    with pytest.raises(RegistryError) as caught:
        import_model(gbdt, "sklearn", NAMES[:-1], x)
    assert caught.value.code == "input_mismatch" and "19 features" in caught.value.message


def test_an_unknown_framework_is_refused(gbdt, data):
    with pytest.raises(RegistryError) as caught:
        import_model(gbdt, "catboost", NAMES, data[0])
    assert caught.value.code == "unsupported_model"


def test_a_sample_the_original_model_cannot_score_is_refused(gbdt, data):
    holes = data[0].copy()
    holes[::10, 4] = np.nan
    with pytest.raises(RegistryError) as caught:
        import_model(gbdt, "sklearn", NAMES, holes)
    assert caught.value.code == "input_mismatch" and "contains NaN" in caught.value.message


def test_lightgbm_import_matches_lightgbm(data, tmp_path):
    lightgbm = pytest.importorskip("lightgbm", reason="lightgbm is not installed")
    pytest.importorskip("onnxmltools", reason="onnxmltools is not installed")
    x, y = data
    model = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=8, verbose=-1).fit(x, y)
    result = import_model(model, "lightgbm", NAMES, x)
    assert result.max_abs_diff <= 1e-5
    model.booster_.save_model(tmp_path / "model.txt")
    from_text = import_model(tmp_path / "model.txt", "lightgbm", NAMES, x)
    assert from_text.max_abs_diff <= 1e-5
    assert_registrable(from_text, tmp_path)


def test_xgboost_import_matches_xgboost(data, tmp_path):
    xgboost = pytest.importorskip("xgboost", reason="xgboost (xgboost-cpu) is not installed")
    pytest.importorskip("onnxmltools", reason="onnxmltools is not installed")
    x, y = data
    x = x.copy()
    x[::10, 4] = np.nan  # xgboost learns a direction for missing values; ONNX must follow it
    model = xgboost.XGBClassifier(n_estimators=30, max_depth=3).fit(x, y)
    result = import_model(model, "xgboost", NAMES, x)
    assert result.max_abs_diff <= 1e-5
    profile = result.manifest.reference.features["x4"]
    assert isinstance(profile, NumericProfile) and profile.missing_rate == pytest.approx(0.1)
    model.save_model(tmp_path / "model.json")
    from_json = import_model(tmp_path / "model.json", "xgboost", NAMES, x)
    assert from_json.max_abs_diff <= 1e-5
    assert_registrable(from_json, tmp_path)


def make_net() -> Any:
    """A factory for the `module:factory` import path (seeded, so weights are reproducible)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1), torch.nn.Sigmoid()
    )


def test_pytorch_import_from_a_module_torchscript_and_factory(data, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x, _ = data
    net = make_net().eval()
    result = import_model(net, "pytorch", NAMES, x, quantize=True)
    assert result.max_abs_diff <= 1e-5
    assert result.quantization is not None and result.quantization.quantized_ops > 0
    assert (result.manifest.score_output, result.manifest.score_index) == ("score", 0)
    assert_registrable(result, tmp_path)

    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    assert import_model(tmp_path / "net.pt", "pytorch", NAMES, x).max_abs_diff <= 1e-5

    torch.save(net.state_dict(), tmp_path / "net.state")
    spec = f"{__name__}:make_net"
    from_factory = import_model(spec, "pytorch", NAMES, x, state_dict=tmp_path / "net.state")
    assert from_factory.max_abs_diff <= 1e-5


runner = CliRunner()


def test_cli_import_registers_a_model_from_a_pickle_and_a_csv_sample(gbdt, data, tmp_path):
    x, _ = data
    joblib.dump(gbdt, tmp_path / "gbdt.joblib")
    sample = tmp_path / "rows.csv"
    np.savetxt(sample, x[:, ::-1], delimiter=",", header=",".join(NAMES[::-1]), comments="")
    root = tmp_path / "models"
    result = runner.invoke(
        app,
        [
            "import",
            str(tmp_path / "gbdt.joblib"),
            "--framework",
            "sklearn",
            "--model",
            "fraud",
            "--version",
            "1",
            "--features",
            ",".join(NAMES),
            "--sample",
            str(sample),
            "--root",
            str(root),
            "--no-publish",
            "--quantize",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity: max |onnx - original|" in result.output and "rows/s" in result.output
    assert list_models(root) == {"fraud": ["1"]}
    assert load_manifest(root, "fraud", "1").feature_names == NAMES


def test_cli_import_parity_failure_exits_2(mlp, data, tmp_path):
    x, _ = data
    joblib.dump(mlp, tmp_path / "mlp.joblib")
    np.save(tmp_path / "rows.npy", x)
    result = runner.invoke(
        app,
        [
            "import",
            str(tmp_path / "mlp.joblib"),
            "--framework",
            "sklearn",
            "--model",
            "m",
            "--version",
            "1",
            "--features",
            ",".join(NAMES),
            "--sample",
            str(tmp_path / "rows.npy"),
            "--tolerance",
            "0",
            "--root",
            str(tmp_path / "models"),
            "--no-publish",
        ],
    )
    assert result.exit_code == 2
    assert "error [parity_failed]" in result.output and "Traceback" not in result.output
    assert list_models(tmp_path / "models") == {}
