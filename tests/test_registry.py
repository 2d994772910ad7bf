"""The model registry: validation, registration, listing, derived manifests, profiles, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from schemas.messages import ModelRegistered
from schemas.topics import MODELS
from services.common.codec import decode
from services.common.settings import SluiceSettings
from services.inference.cli import app
from services.inference.manifest import (
    CategoricalProfile,
    FeatureSpec,
    Manifest,
    NumericProfile,
    bin_index,
    build_profile,
)
from services.inference.registry import (
    RegistryError,
    kafka_publisher,
    latest_version,
    list_models,
    load_manifest,
    manifest_from_onnx,
    register,
    validate_version,
    versions,
)
from tests.support import read_topic, unique

WIDTH = 20


def _onnx_bytes(batch: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, WIDTH)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    estimator = LogisticRegression().fit(x, y)
    onnx_model = convert_sklearn(
        estimator,
        initial_types=[("input", FloatTensorType([batch, WIDTH]))],
        options={id(estimator): {"zipmap": False}},
    )
    return onnx_model.SerializeToString()


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return _onnx_bytes()


@pytest.fixture
def model_file(tmp_path: Path, model_bytes: bytes) -> Path:
    path = tmp_path / "upload" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model_bytes)
    return path


def make_manifest(model: str = "fraud", version: str = "1", **changes: object) -> Manifest:
    fields: dict[str, object] = {
        "model": model,
        "version": version,
        "framework": "sklearn",
        "input_name": "input",
        "features": [FeatureSpec(name=f"x{i}") for i in range(WIDTH)],
        "outputs": [
            {"name": "label", "meaning": "predicted class", "shape": [None]},
            {"name": "probabilities", "meaning": "P(class)", "shape": [None, 2]},
        ],
        "score_output": "probabilities",
        "score_index": 1,
        "metrics": {"auc": 0.91},
        "created_at_ms": 1_700_000_000_000,
    }
    fields.update(changes)
    return Manifest.model_validate(fields)


def write_version(folder: Path, model_bytes: bytes, manifest: Manifest | dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model_bytes)
    body = manifest.model_dump(mode="json") if isinstance(manifest, Manifest) else manifest
    (folder / "manifest.json").write_text(json.dumps(body))
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rejection(folder: Path) -> RegistryError:
    with pytest.raises(RegistryError) as caught:
        validate_version(folder)
    return caught.value


# --- validation ------------------------------------------------------------------------------


def test_validation_accepts_a_model_that_matches_its_manifest(tmp_path, model_bytes):
    manifest = make_manifest(sha256=sha(model_bytes))
    folder = write_version(tmp_path / "fraud" / "1", model_bytes, manifest)
    assert validate_version(folder) == manifest


def test_validation_rejects_a_sha256_mismatch(tmp_path, model_bytes):
    wrong = sha(b"another model")
    folder = write_version(tmp_path / "v", model_bytes, make_manifest(sha256=wrong))
    error = rejection(folder)
    assert error.code == "sha256_mismatch"
    assert wrong in error.message and sha(model_bytes) in error.message


def test_validation_rejects_a_feature_count_that_differs_from_the_input_width(
    tmp_path, model_bytes
):
    features = [FeatureSpec(name=f"x{i}") for i in range(WIDTH - 1)]
    manifest = make_manifest(sha256=sha(model_bytes), features=features)
    error = rejection(write_version(tmp_path / "v", model_bytes, manifest))
    assert error.code == "input_mismatch"
    assert f"{WIDTH} columns" in error.message and f"{WIDTH - 1} features" in error.message


def test_validation_rejects_a_missing_score_output(tmp_path, model_bytes):
    manifest = make_manifest(
        sha256=sha(model_bytes),
        outputs=[{"name": "proba", "shape": [None, 2]}],
        score_output="proba",
    )
    error = rejection(write_version(tmp_path / "v", model_bytes, manifest))
    assert error.code == "output_mismatch"
    assert "'proba'" in error.message and "probabilities" in error.message


def test_validation_rejects_a_score_index_outside_the_score_output(tmp_path, model_bytes):
    manifest = make_manifest(sha256=sha(model_bytes), score_index=2)
    error = rejection(write_version(tmp_path / "v", model_bytes, manifest))
    assert error.code == "output_mismatch"
    assert "score_index 2" in error.message and "last dimension is 2" in error.message


def test_validation_rejects_a_corrupt_onnx_file(tmp_path):
    garbage = b"\x08\x07 definitely not a protobuf model"
    error = rejection(write_version(tmp_path / "v", garbage, make_manifest(sha256=sha(garbage))))
    assert error.code == "onnx_load_failed"
    assert "ONNX Runtime cannot load the model" in error.message


def test_validation_rejects_a_fixed_batch_size(tmp_path):
    fixed = _onnx_bytes(batch=1)
    error = rejection(write_version(tmp_path / "v", fixed, make_manifest(sha256=sha(fixed))))
    assert error.code == "input_mismatch"
    assert "fixed batch size of 1" in error.message


def test_validation_rejects_an_invalid_manifest_with_field_paths(tmp_path, model_bytes):
    body = make_manifest(sha256=sha(model_bytes)).model_dump(mode="json")
    body["features"][3] = {"name": "x3", "source": "online"}
    body["decision_treshold"] = 0.7
    error = rejection(write_version(tmp_path / "v", model_bytes, body))
    assert error.code == "invalid_manifest"
    locations = {item["loc"] for item in error.details}
    assert {"features.3", "decision_treshold"} <= locations
    assert "needs an `entity`" in error.message


def test_validation_of_a_folder_without_a_manifest_is_not_found(tmp_path, model_bytes):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "model.onnx").write_bytes(model_bytes)
    assert rejection(tmp_path / "v").code == "not_found"


# --- registration ----------------------------------------------------------------------------


def test_register_fills_the_sha256_and_announces_the_version(tmp_path, model_file, model_bytes):
    announced: list[ModelRegistered] = []
    folder = register(tmp_path / "models", model_file, make_manifest(), publish=announced.append)
    assert folder == tmp_path / "models" / "fraud" / "1"
    assert (folder / "model.onnx").read_bytes() == model_bytes
    assert Manifest.load(folder / "manifest.json").sha256 == sha(model_bytes)
    (message,) = announced
    assert (message.model, message.version, message.sha256) == ("fraud", "1", sha(model_bytes))
    assert message.inputs == [f"x{i}" for i in range(WIDTH)]
    assert message.path == str(folder)


def test_register_is_idempotent_for_the_same_model(tmp_path, model_file):
    announced: list[ModelRegistered] = []
    root = tmp_path / "models"
    first = register(root, model_file, make_manifest(), publish=announced.append)
    again = register(root, model_file, make_manifest(description="x"), publish=announced.append)
    assert first == again
    assert load_manifest(root, "fraud", "1").description == ""
    assert len(announced) == 2 and announced[0].sha256 == announced[1].sha256


def test_register_refuses_a_different_model_under_an_existing_version(tmp_path, model_file):
    root = tmp_path / "models"
    register(root, model_file, make_manifest())
    other = tmp_path / "other.onnx"
    other.write_bytes(_onnx_bytes(seed=1))
    with pytest.raises(RegistryError) as caught:
        register(root, other, make_manifest())
    assert caught.value.code == "version_exists"
    assert load_manifest(root, "fraud", "1").sha256 == sha(model_file.read_bytes())


def test_register_leaves_nothing_behind_when_validation_fails(tmp_path, model_file):
    root = tmp_path / "models"
    narrow = make_manifest(features=[FeatureSpec(name="only")])
    announced: list[ModelRegistered] = []
    with pytest.raises(RegistryError) as caught:
        register(root, model_file, narrow, publish=announced.append)
    assert caught.value.code == "input_mismatch"
    assert not announced
    assert list(root.iterdir()) == []

    register(root, model_file, make_manifest(version="1"))
    with pytest.raises(RegistryError):
        register(root, model_file, make_manifest(version="2", score_output="label"))
    assert sorted(p.name for p in (root / "fraud").iterdir()) == ["1"]


def test_register_refuses_a_manifest_sha256_that_does_not_match_the_file(tmp_path, model_file):
    root = tmp_path / "models"
    with pytest.raises(RegistryError) as caught:
        register(root, model_file, make_manifest(sha256=sha(b"x")))
    assert caught.value.code == "sha256_mismatch"
    assert not root.exists()


def test_register_reads_a_manifest_file(tmp_path, model_file):
    path = make_manifest().save(tmp_path / "manifest.json")
    folder = register(tmp_path / "models", model_file, path)
    assert load_manifest(tmp_path / "models", "fraud", "1").metrics == {"auc": 0.91}
    assert folder.name == "1"


# --- listing ---------------------------------------------------------------------------------


def test_versions_sort_numerically_and_listing_ignores_other_folders(tmp_path, model_file):
    root = tmp_path / "models"
    for version in ("2", "10", "9"):
        register(root, model_file, make_manifest(version=version))
    register(root, model_file, make_manifest(model="churn", version="1"))
    (root / "fraud" / "config.pbtxt").write_text("platform: 'onnxruntime_onnx'")
    (root / "fraud" / "notes").mkdir()
    (root / "empty").mkdir()
    assert versions(root, "fraud") == ["2", "9", "10"]
    assert latest_version(root, "fraud") == "10"
    assert list_models(root) == {"churn": ["1"], "fraud": ["2", "9", "10"]}
    assert list_models(tmp_path / "nowhere") == {}


def test_missing_models_and_path_like_names_are_not_found(tmp_path, model_file):
    root = tmp_path / "models"
    register(root, model_file, make_manifest())
    for model, version in (("fraud", "7"), ("nope", "1"), ("..", "1"), ("fraud", "../1")):
        with pytest.raises(RegistryError) as caught:
            load_manifest(root, model, version)
        assert caught.value.code == "not_found"
    with pytest.raises(RegistryError) as caught:
        latest_version(root, "nope")
    assert caught.value.code == "not_found"


# --- Triton repositories without our manifest ------------------------------------------------


def test_manifest_from_onnx_makes_a_bare_triton_model_registrable(tmp_path, model_file):
    manifest = manifest_from_onnx(model_file, "legacy", "3")
    assert manifest.feature_names == [f"f{i}" for i in range(WIDTH)]
    assert {f.source for f in manifest.features} == {"request"}
    assert (manifest.score_output, manifest.score_index) == ("probabilities", 1)
    assert manifest.framework == "onnx" and manifest.reference is None
    folder = register(tmp_path / "models", model_file, manifest)
    assert validate_version(folder).sha256 == manifest.sha256


def test_a_triton_version_without_a_manifest_is_listed_but_has_no_manifest(tmp_path, model_file):
    root = tmp_path / "triton"
    (root / "legacy" / "1").mkdir(parents=True)
    shutil.copy(model_file, root / "legacy" / "1" / "model.onnx")
    assert list_models(root) == {"legacy": ["1"]}
    with pytest.raises(RegistryError) as caught:
        load_manifest(root, "legacy", "1")
    assert caught.value.code == "not_found" and "manifest.json" in caught.value.message


# --- manifest and reference profile ----------------------------------------------------------


def test_feature_specs_default_their_lookup_names_and_online_ones_need_an_entity():
    assert FeatureSpec(name="amount").field == "amount"
    online = FeatureSpec(name="card_txn_count_1h", source="online", entity="card")
    assert online.feature == "card_txn_count_1h" and online.field is None
    with pytest.raises(ValueError, match="needs an `entity`"):
        FeatureSpec(name="card_txn_count_1h", source="online")


def test_build_profile_handles_nan_and_constant_columns():
    rng = np.random.default_rng(7)
    matrix = rng.normal(size=(500, 4))
    matrix[::5, 0] = np.nan
    matrix[:, 1] = 3.25
    matrix[:, 2] = np.nan
    matrix[:, 3] = rng.integers(0, 3, 500)
    profile = build_profile(
        matrix, ["a", "constant", "empty", "kind"], rng.random(500), categorical={"kind"}
    )
    a, constant, empty, kind = (profile.features[n] for n in ("a", "constant", "empty", "kind"))
    for numeric in (a, constant, profile.prediction):
        assert isinstance(numeric, NumericProfile)
        assert all(math.isfinite(f) for f in numeric.bin_fractions)
        assert math.fsum(numeric.bin_fractions) == pytest.approx(1.0)
        assert np.all(np.diff(numeric.bin_edges) > 0)
    assert a.count == 400 and a.missing_rate == pytest.approx(0.2)
    assert len(a.bin_fractions) == 10 and set(a.quantiles) == {
        "0.01",
        "0.05",
        "0.25",
        "0.5",
        "0.75",
        "0.95",
        "0.99",
    }
    assert constant.std == 0.0 and constant.bin_fractions == [0.0, 1.0, 0.0]
    below, above = np.array([3.0]), np.array([3.5])
    assert bin_index(constant.bin_edges, below)[0] == 0
    assert bin_index(constant.bin_edges, above)[0] == 2
    assert empty.count == 0 and empty.missing_rate == 1.0 and empty.bin_fractions == []
    assert isinstance(kind, CategoricalProfile)
    assert set(kind.frequencies) == {"0", "1", "2"}
    assert math.fsum(kind.frequencies.values()) == pytest.approx(1.0)


def test_bin_index_puts_out_of_range_values_in_the_outer_bins():
    edges = [0.0, 1.0, 2.0, 3.0]
    assert bin_index(edges, np.array([-5.0, 0.5, 1.0, 2.5, 99.0])).tolist() == [0, 0, 1, 2, 2]


def test_a_manifest_with_a_profile_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(100, WIDTH))
    names = [f"x{i}" for i in range(WIDTH)]
    manifest = make_manifest(reference=build_profile(matrix, names, rng.random(100)))
    assert Manifest.load(manifest.save(tmp_path / "manifest.json")) == manifest


# --- Kafka -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_register_with_the_kafka_publisher_announces_on_sluice_models(
    cluster, tmp_path, model_file
):
    model = unique("fraud")
    publish = kafka_publisher(SluiceSettings(kafka_bootstrap=cluster.kafka_bootstrap))
    register(tmp_path / "models", model_file, make_manifest(model=model), publish=publish)
    key = f"{model}/1".encode()
    messages = read_topic(
        cluster.kafka_bootstrap, MODELS.name, lambda got: any(m.key() == key for m in got)
    )
    (record,) = [m for m in messages if m.key() == key]
    announced = decode(ModelRegistered, record.value())
    assert announced.model == model and announced.version == "1"
    assert announced.sha256 == sha(model_file.read_bytes())
    assert announced.inputs == [f"x{i}" for i in range(WIDTH)]


# --- CLI -------------------------------------------------------------------------------------


runner = CliRunner()


def test_cli_registers_lists_and_shows_a_model(tmp_path, model_file):
    root = str(tmp_path / "models")
    manifest = make_manifest(model="fraud", version="4").save(tmp_path / "manifest.json")
    registered = runner.invoke(
        app,
        ["register", str(model_file), "--manifest", str(manifest), "--root", root, "--no-publish"],
    )
    assert registered.exit_code == 0, registered.output
    assert "registered fraud/4" in registered.output

    listed = runner.invoke(app, ["list", "--root", root])
    assert listed.exit_code == 0 and "fraud" in listed.output and "4" in listed.output

    shown = runner.invoke(app, ["show", "fraud", "--root", root])
    assert shown.exit_code == 0, shown.output
    assert sha(model_file.read_bytes()) in shown.output
    assert "x19 <- request x19" in shown.output
    assert "probabilities[:, 1]" in shown.output and "auc=0.91" in shown.output


def test_cli_root_defaults_to_the_model_repository_variable(tmp_path, model_file):
    root = tmp_path / "from-env"
    env = {"SLUICE_MODEL_REPOSITORY": str(root)}
    registered = runner.invoke(
        app,
        ["register", str(model_file), "--model", "legacy", "--version", "1", "--no-publish"],
        env=env,
    )
    assert registered.exit_code == 0, registered.output
    assert list_models(root) == {"legacy": ["1"]}
    shown = runner.invoke(app, ["show", "legacy", "1", "--json"], env=env)
    assert Manifest.model_validate_json(shown.output).framework == "onnx"


def test_cli_register_failure_exits_2_with_the_error_code(tmp_path, model_file):
    manifest = make_manifest(features=[FeatureSpec(name="x0")]).save(tmp_path / "manifest.json")
    result = runner.invoke(
        app,
        [
            "register",
            str(model_file),
            "--manifest",
            str(manifest),
            "--root",
            str(tmp_path / "models"),
            "--no-publish",
        ],
    )
    assert result.exit_code == 2
    assert "error [input_mismatch]" in result.output and "1 features" in result.output
    assert "Traceback" not in result.output


def test_cli_show_of_an_unknown_model_exits_2(tmp_path):
    result = runner.invoke(app, ["show", "nope", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "error [not_found]" in result.output
