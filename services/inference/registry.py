"""The model registry: a Triton-style repository of `<root>/<model>/<version>/` folders.

Each version folder holds `model.onnx` and our `manifest.json`.

Version folders are named by digits and sorted numerically ("10" after "9"); anything else in a
model folder (Triton's `config.pbtxt`, our `.staging-*` folders) is ignored. Every problem a user
can cause surfaces as a `RegistryError` with a stable `code`.

Surprises:
- `register` is idempotent: registering the same bytes again under an existing version succeeds,
  keeps the manifest already there and publishes `ModelRegistered` again, so a run that failed
  between writing and announcing is healed by running it again.
- A version is staged in a hidden folder, validated there and renamed into place, so a failed
  registration leaves nothing behind and readers never see half a version.
- Validation loads the model with the CPU provider only and runs it once on two rows of zeros:
  a model that loads but cannot run a batch (e.g. a fixed batch size of 1) is refused here,
  not when the first batch arrives.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from confluent_kafka import KafkaError, Message
from pydantic import ValidationError

from schemas.messages import ModelRegistered
from schemas.topics import MODELS
from services.common.codec import encode, validation_details
from services.common.kafka import make_producer
from services.common.settings import SluiceSettings
from services.inference.manifest import FeatureSpec, Manifest, OutputSpec

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
FLOAT_TENSORS = ("tensor(float)", "tensor(double)", "tensor(float16)")
"""ONNX Runtime type strings a score output may have."""

_VERSION = re.compile(r"^[0-9]+$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RegistryError(ValueError):
    """A registry operation refused or failed, with a stable `code` users and tools can act on.

    Codes: `not_found`, `invalid_manifest`, `sha256_mismatch`, `onnx_load_failed`,
    `onnx_run_failed`, `input_mismatch`, `output_mismatch`, `version_exists`, `publish_failed`,
    and from model import `parity_failed`, `unsupported_model`, `conversion_failed`.
    """

    def __init__(self, code: str, message: str, details: dict | list | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


def invalid_manifest(error: ValidationError, where: str) -> RegistryError:
    """An `invalid_manifest` error listing each failing field path and why."""
    details = validation_details(error)
    summary = "; ".join(f"{item['loc'] or '(root)'}: {item['msg']}" for item in details)
    return RegistryError("invalid_manifest", f"{where}: {summary}", details)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_session(model: str | Path | bytes, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU provider; `threads=0` lets ORT choose.

    Raises `RegistryError(onnx_load_failed)` with ONNX Runtime's message if the model is not
    loadable.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for unreadable models
        message = f"ONNX Runtime cannot load the model: {exc}"
        raise RegistryError("onnx_load_failed", message) from None


def default_score(outputs: list[ort.NodeArg]) -> tuple[str, int]:
    """The conventional score of a model: its first float output, last column.

    The first *float* output rather than the first output, because classifiers converted by
    skl2onnx/onnxmltools put an int64 `label` first and the probabilities second. A symbolic
    last dimension gives index 0.
    """
    for output in outputs:
        if output.type in FLOAT_TENSORS:
            last = output.shape[-1] if len(output.shape) >= 2 else None
            return output.name, last - 1 if isinstance(last, int) and last > 0 else 0
    raise RegistryError(
        "output_mismatch",
        "the model has no float output to use as a score",
        {"outputs": {output.name: output.type for output in outputs}},
    )


_CONVERTER_OUTPUTS = {
    "label": "predicted class",
    "probabilities": "probability of each class, in class order",
    "variable": "predicted value",
    "score": "model output",
}
"""What the outputs that skl2onnx, onnxmltools and our PyTorch export name mean."""


def output_specs(outputs: list[ort.NodeArg]) -> list[OutputSpec]:
    """Manifest output entries from ONNX Runtime's outputs (symbolic dimensions become None).

    The meaning of a name converters use is filled in; other outputs get their tensor type.
    """
    return [
        OutputSpec(
            name=output.name,
            meaning=_CONVERTER_OUTPUTS.get(output.name, output.type),
            shape=[dim if isinstance(dim, int) else None for dim in output.shape],
        )
        for output in outputs
    ]


def _load_manifest_file(path: Path) -> Manifest:
    if not path.is_file():
        raise RegistryError("not_found", f"no {MANIFEST_FILE} at {path.parent}")
    try:
        return Manifest.load(path)
    except ValidationError as exc:
        raise invalid_manifest(exc, str(path)) from None


def _check_input(session: ort.InferenceSession, manifest: Manifest) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RegistryError(
            "input_mismatch",
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "Sluiceway feeds exactly one float32 matrix",
            {"inputs": [i.name for i in inputs]},
        )
    tensor = inputs[0]
    details = {"name": tensor.name, "type": tensor.type, "shape": tensor.shape}
    if tensor.name != manifest.input_name:
        raise RegistryError(
            "input_mismatch",
            f"the model's input is named {tensor.name!r}, the manifest says "
            f"{manifest.input_name!r}",
            details,
        )
    if tensor.type != "tensor(float)":
        raise RegistryError(
            "input_mismatch",
            f"input {tensor.name!r} is {tensor.type}, expected tensor(float)",
            details,
        )
    if len(tensor.shape) != 2:
        raise RegistryError(
            "input_mismatch",
            f"input {tensor.name!r} has rank {len(tensor.shape)} (shape {tensor.shape}), "
            "expected a [batch, features] matrix",
            details,
        )
    batch, width = tensor.shape
    if isinstance(batch, int) and batch > 0:
        raise RegistryError(
            "input_mismatch",
            f"input {tensor.name!r} has a fixed batch size of {batch}; export it with a dynamic "
            "batch axis so requests can be batched",
            details,
        )
    if isinstance(width, int) and width != len(manifest.features):
        raise RegistryError(
            "input_mismatch",
            f"input {tensor.name!r} has {width} columns but the manifest declares "
            f"{len(manifest.features)} features",
            {**details, "features": len(manifest.features)},
        )


def _check_outputs(session: ort.InferenceSession, manifest: Manifest) -> None:
    actual = {output.name: output for output in session.get_outputs()}
    missing = [spec.name for spec in manifest.outputs if spec.name not in actual]
    if missing:
        raise RegistryError(
            "output_mismatch",
            f"declared outputs {missing} are not in the model, which has {list(actual)}",
            {"missing": missing, "model_outputs": list(actual)},
        )
    score = actual[manifest.score_output]
    if score.type not in FLOAT_TENSORS:
        raise RegistryError(
            "output_mismatch",
            f"score output {score.name!r} is {score.type}, expected a float tensor",
        )
    if len(score.shape) > 2:
        raise RegistryError(
            "output_mismatch",
            f"score output {score.name!r} has rank {len(score.shape)}; expected [batch] or "
            "[batch, k]",
        )
    last = score.shape[-1] if len(score.shape) == 2 else 1
    if isinstance(last, int) and manifest.score_index >= last:
        raise RegistryError(
            "output_mismatch",
            f"score_index {manifest.score_index} is outside score output {score.name!r}, whose "
            f"last dimension is {last}",
        )


def _smoke_run(session: ort.InferenceSession, manifest: Manifest) -> None:
    rows = np.zeros((2, len(manifest.features)), dtype=np.float32)
    try:
        (score,) = session.run([manifest.score_output], {manifest.input_name: rows})
    except Exception as exc:  # ORT's runtime failures have no common base class
        raise RegistryError(
            "onnx_run_failed", f"the model failed on a batch of 2 zero rows: {exc}"
        ) from None
    score = np.asarray(score)
    if score.shape[0] != 2 or (score.ndim == 2 and manifest.score_index >= score.shape[1]):
        raise RegistryError(
            "output_mismatch",
            f"score output {manifest.score_output!r} has shape {list(score.shape)} for 2 rows; "
            f"cannot read column {manifest.score_index} per row",
        )


def validate_version(folder: Path) -> Manifest:
    """Check a version folder: manifest valid, sha256 right, model loads, runs, and fits it.

    Returns the manifest. Raises `RegistryError` with code `not_found`, `invalid_manifest`,
    `sha256_mismatch`, `onnx_load_failed`, `onnx_run_failed`, `input_mismatch` or
    `output_mismatch`; the message names what differs. The folder's name is not checked, so a
    staging folder validates like the final one.
    """
    folder = Path(folder)
    manifest = _load_manifest_file(folder / MANIFEST_FILE)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise RegistryError("not_found", f"no {MODEL_FILE} in {folder}")
    actual = file_sha256(model_path)
    if actual != manifest.sha256:
        raise RegistryError(
            "sha256_mismatch",
            f"{MODEL_FILE} has sha256 {actual}, the manifest says {manifest.sha256 or '(empty)'}",
            {"expected": manifest.sha256, "actual": actual},
        )
    session = cpu_session(model_path, threads=1)
    _check_input(session, manifest)
    _check_outputs(session, manifest)
    _smoke_run(session, manifest)
    return manifest


def _folder(root: Path, model: str, version: str | None = None) -> Path:
    """A model (or version) folder; names that are not plain path segments are not found."""
    if not _MODEL.match(model) or (version is not None and not _VERSION.match(version)):
        raise RegistryError("not_found", f"no model {model!r} version {version!r} in {root}")
    return Path(root) / model if version is None else Path(root) / model / version


def versions(root: Path, model: str) -> list[str]:
    """A model's versions, oldest first (numeric order); empty if the model is unknown."""
    folder = _folder(root, model)
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(found, key=int)


def list_models(root: Path) -> dict[str, list[str]]:
    """Every model with at least one version, by name, each with its versions in order."""
    root = Path(root)
    if not root.is_dir():
        return {}
    listing = {
        p.name: versions(root, p.name)
        for p in sorted(root.iterdir())
        if p.is_dir() and _MODEL.match(p.name)
    }
    return {name: found for name, found in listing.items() if found}


def latest_version(root: Path, model: str) -> str:
    """The highest version of `model`; `RegistryError(not_found)` if it has none."""
    found = versions(root, model)
    if not found:
        raise RegistryError("not_found", f"model {model!r} has no versions in {root}")
    return found[-1]


def load_manifest(root: Path, model: str, version: str) -> Manifest:
    """The manifest of one version, checked to belong to the folder it lies in.

    Raises `not_found` (no such version, or a Triton folder without our manifest) or
    `invalid_manifest`. Does not re-hash or load the model; `validate_version` does.
    """
    folder = _folder(root, model, version)
    if not folder.is_dir():
        raise RegistryError("not_found", f"no version {version!r} of model {model!r} in {root}")
    manifest = _load_manifest_file(folder / MANIFEST_FILE)
    if (manifest.model, manifest.version) != (model, version):
        raise RegistryError(
            "invalid_manifest",
            f"{folder / MANIFEST_FILE} describes {manifest.model}/{manifest.version}, "
            f"not {model}/{version}",
        )
    return manifest


def manifest_from_onnx(model_path: Path, model: str, version: str) -> Manifest:
    """A minimal manifest for a bare ONNX model, e.g. from an existing Triton repository.

    Features are request features `f0..f{n-1}` (n = the input's width, which must be fixed),
    the score is the first float output's last column (see `default_score`), the framework
    is "onnx" and there is no reference profile, so drift is not measured until one is added.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise RegistryError("not_found", f"no model file at {model_path}")
    session = cpu_session(model_path, threads=1)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 2:
        raise RegistryError(
            "input_mismatch",
            f"cannot derive a manifest: the model needs exactly one [batch, features] input, "
            f"it has {[(i.name, i.shape) for i in inputs]}",
        )
    width = inputs[0].shape[1]
    if not isinstance(width, int):
        raise RegistryError(
            "input_mismatch",
            f"cannot derive a manifest: input {inputs[0].name!r} has a symbolic width "
            f"{width!r}; write a manifest that lists the features",
        )
    score_output, score_index = default_score(session.get_outputs())
    return Manifest(
        model=model,
        version=version,
        framework="onnx",
        input_name=inputs[0].name,
        features=[FeatureSpec(name=f"f{i}") for i in range(width)],
        outputs=output_specs(session.get_outputs()),
        score_output=score_output,
        score_index=score_index,
        sha256=file_sha256(model_path),
        created_at_ms=int(time.time() * 1000),
        description=f"derived from {model_path.name}",
    )


def _registered(manifest: Manifest, folder: Path) -> ModelRegistered:
    return ModelRegistered(
        model=manifest.model,
        version=manifest.version,
        path=str(folder),
        sha256=manifest.sha256,
        inputs=manifest.feature_names,
        registered_at_ms=int(time.time() * 1000),
    )


def register(
    root: Path,
    model_path: Path,
    manifest: Manifest | Path,
    *,
    publish: Callable[[ModelRegistered], None] | None = None,
) -> Path:
    """Add a version to the repository, validate it, announce it; returns its folder.

    `manifest` is a `Manifest` or the path of a manifest file. An empty `sha256` is filled from
    `model_path`; a different one is refused (`sha256_mismatch`) before anything is written. An
    existing version with the same sha256 is left as is and announced again; a different one
    is refused (`version_exists`). If `publish` raises, the version stays registered and the
    error propagates: run `register` again to announce it.
    """
    root, model_path = Path(root), Path(model_path)
    if not isinstance(manifest, Manifest):
        manifest = _load_manifest_file(Path(manifest))
    if not model_path.is_file():
        raise RegistryError("not_found", f"no model file at {model_path}")
    sha256 = file_sha256(model_path)
    if manifest.sha256 and manifest.sha256 != sha256:
        raise RegistryError(
            "sha256_mismatch",
            f"{model_path} has sha256 {sha256}, the manifest says {manifest.sha256}",
            {"expected": manifest.sha256, "actual": sha256},
        )
    manifest = manifest.model_copy(update={"sha256": sha256})
    model_folder = _folder(root, manifest.model)
    target = model_folder / manifest.version
    if not target.exists():
        target = _install(model_folder, target, model_path, manifest)
    existing = _load_manifest_file(target / MANIFEST_FILE)
    if existing.sha256 != sha256:
        raise RegistryError(
            "version_exists",
            f"{manifest.model} version {manifest.version} already exists with a different "
            f"model (sha256 {existing.sha256}); register under a new version",
            {"existing_sha256": existing.sha256, "new_sha256": sha256},
        )
    if publish is not None:
        publish(_registered(existing, target))
    return target


def _install(model_folder: Path, target: Path, model_path: Path, manifest: Manifest) -> Path:
    """Stage, validate and move a new version into place; on failure remove all it created."""
    created_model_folder = not model_folder.exists()
    staging = model_folder / f".staging-{manifest.version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)

    def clean_up() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        if created_model_folder and not any(model_folder.iterdir()):
            model_folder.rmdir()

    try:
        shutil.copyfile(model_path, staging / MODEL_FILE)
        manifest.save(staging / MANIFEST_FILE)
        validate_version(staging)
    except BaseException:
        clean_up()
        raise
    try:
        staging.rename(target)
    except OSError:
        clean_up()
        if not target.is_dir():
            raise
        # A concurrent register of the same version won; the caller compares its sha256.
    return target


def kafka_publisher(
    settings: SluiceSettings, timeout_s: float = 15.0
) -> Callable[[ModelRegistered], None]:
    """A `publish` callable for `register` that produces to `sluice.models` and waits for the ack.

    Key `"model/version"`, value `encode(message)`. Raises `RegistryError(publish_failed)` if the
    broker does not acknowledge within `timeout_s`, naming the last broker error (e.g. connection
    refused). librdkafka's own log lines are turned off below critical, since a CLI user would
    otherwise see one per reconnect attempt; the error carries the cause instead.
    """
    broker_errors: list[str] = []
    producer = make_producer(
        settings,
        **{
            "message.timeout.ms": int(timeout_s * 1000),
            "log_level": 2,
            "error_cb": lambda error: broker_errors.append(error.str()),
        },
    )

    def publish(message: ModelRegistered) -> None:
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                failures.append(error.str())

        producer.produce(
            MODELS.name,
            encode(message),
            key=f"{message.model}/{message.version}",
            on_delivery=on_delivery,
        )
        if producer.flush(timeout_s) or failures:
            reason = failures[0] if failures else f"no acknowledgement within {timeout_s:g}s"
            if broker_errors:
                reason += f"; last broker error: {broker_errors[-1]}"
            raise RegistryError(
                "publish_failed",
                f"{message.model}/{message.version} is registered but announcing it on "
                f"{MODELS.name} failed ({reason}); run register again to retry",
            )

    return publish
