"""Model import: a trained scikit-learn, LightGBM, XGBoost or PyTorch model -> checked ONNX.

`import_model` converts the model to ONNX with one float32 input `input` of shape
[batch, features], scores a sample with both the original and the ONNX model, and refuses the
result (`RegistryError(parity_failed)`) if they differ by more than a tolerance. With
`quantize=True` it also applies ONNX Runtime dynamic int8 quantization, checks that model's
parity against the original with a looser tolerance and reports fp32-vs-int8 throughput.

Surprises:
- Only trusted files may be imported: pickle/joblib files and TorchScript archives run code
  when loaded.
- Parity compares the whole score output (e.g. every class probability) when the original
  returns the same shape, and the score column alone otherwise (a LightGBM `Booster` returns
  only P(class 1)); the sample is cast to float32 first for both, as serving does.
- Dynamic quantization only rewrites MatMul/Gemm-style weights; tree ensembles have none, so
  their "int8" model is the fp32 one (`quantized_ops == 0`). It is per-channel with
  `reduce_range`: per-channel without it gave errors up to 0.66 on AVX2 CPUs (u8s8
  saturation) in our measurements, against 0.003-0.03 with it.
- Throughput is measured on one thread, the whole sample as one batch, so it is comparable
  between the two models of one call, not with serving numbers.
- Framework packages are imported only when that framework is used; skl2onnx is needed for
  scikit-learn, onnxmltools plus lightgbm/xgboost for those, torch for PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from pydantic import ValidationError

from services.inference.manifest import FeatureSpec, Manifest, build_profile
from services.inference.registry import (
    RegistryError,
    cpu_session,
    default_score,
    invalid_manifest,
    output_specs,
)


class Framework(StrEnum):
    """The libraries `import_model` converts from (plain strings are accepted too)."""

    sklearn = "sklearn"
    lightgbm = "lightgbm"
    xgboost = "xgboost"
    pytorch = "pytorch"


INPUT_NAME = "input"
QUANTIZED_TOLERANCE = 0.05
"""Default parity tolerance of an int8 model against the original (absolute, on scores)."""

_INTEGER_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QAttention")
_TIMING_SECONDS = 0.2


@dataclass(frozen=True)
class QuantizationReport:
    """How the int8 model compares with the original and with the fp32 ONNX model."""

    max_abs_diff: float
    tolerance: float
    quantized_ops: int
    fp32_rows_per_s: float
    int8_rows_per_s: float

    @property
    def speedup(self) -> float:
        """int8 throughput over fp32 throughput (below 1 means int8 is slower)."""
        return self.int8_rows_per_s / self.fp32_rows_per_s


@dataclass(frozen=True)
class ImportResult:
    """A converted model that passed parity, with its manifest ready for `register`.

    `onnx_bytes` is the model to serve: the int8 one when quantization was asked for.
    `max_abs_diff` is the fp32 ONNX model's parity; `quantization` the int8 report, if any.
    """

    onnx_bytes: bytes
    manifest: Manifest
    max_abs_diff: float
    rows_per_s: float
    quantization: QuantizationReport | None = None

    def write(self, path: str | Path) -> Path:
        """Write the ONNX model to `path` (e.g. a temporary file for `register`)."""
        target = Path(path)
        target.write_bytes(self.onnx_bytes)
        return target


def _load_pickled(path: Path) -> Any:
    import joblib  # installed with scikit-learn; also reads plain pickles

    return joblib.load(path)


def load_torch_module(source: str | Path, state_dict: str | Path | None = None) -> Any:
    """A PyTorch module in eval mode from a TorchScript file or a `package.module:factory` spec.

    A factory is called without arguments; `state_dict` (a `torch.save`d dict of tensors,
    loaded with `weights_only=True`) is then loaded into it. A TorchScript file needs no
    `state_dict`.
    """
    import torch

    path = Path(source)
    if path.is_file():
        if state_dict is not None:
            raise RegistryError(
                "unsupported_model", "a TorchScript file carries its weights; drop the state dict"
            )
        return torch.jit.load(str(path), map_location="cpu").eval()
    module_name, _, factory_name = str(source).partition(":")
    if not factory_name:
        raise RegistryError(
            "not_found",
            f"{source} is neither a TorchScript file nor a 'package.module:factory' spec",
        )
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise RegistryError("not_found", f"cannot import {source}: {exc}") from None
    module = factory()
    if state_dict is not None:
        module.load_state_dict(torch.load(str(state_dict), map_location="cpu", weights_only=True))
    return module.eval()


def _load_source(source: Any, framework: str, state_dict: str | Path | None) -> Any:
    if framework == "pytorch":
        return source if hasattr(source, "forward") else load_torch_module(source, state_dict)
    if not isinstance(source, str | Path):
        return source
    path = Path(source)
    if not path.is_file():
        raise RegistryError("not_found", f"no model file at {path}")
    if framework == "lightgbm" and path.suffix in (".txt", ".model"):
        import lightgbm

        return lightgbm.Booster(model_file=str(path))
    if framework == "xgboost" and path.suffix in (".json", ".ubj"):
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        return booster
    return _load_pickled(path)


def _to_onnx(model: Any, framework: str, width: int) -> onnx.ModelProto:
    """Convert with the framework's converter; classifiers output tensors, not ZipMaps."""
    if framework == "sklearn":
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType

        options = {id(model): {"zipmap": False}} if hasattr(model, "predict_proba") else None
        return convert_sklearn(
            model, initial_types=[(INPUT_NAME, FloatTensorType([None, width]))], options=options
        )
    if framework in ("lightgbm", "xgboost"):
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        initial_types = [(INPUT_NAME, FloatTensorType([None, width]))]
        if framework == "lightgbm":
            return onnxmltools.convert_lightgbm(model, initial_types=initial_types, zipmap=False)
        return onnxmltools.convert_xgboost(model, initial_types=initial_types)
    return _torch_to_onnx(model, width)


def _torch_to_onnx(module: Any, width: int) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter (`dynamo=False`) and a dynamic batch axis.

    The dynamo exporter needs onnxscript and traces data-dependent shapes less predictably;
    the legacy one handles the plain feed-forward modules this path is for.
    """
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation notice is our choice, not news
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="no signature found for")
        torch.onnx.export(
            module,
            (torch.zeros(1, width, dtype=torch.float32),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=["score"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "score": {0: "batch"}},
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _original_scores(model: Any, framework: str, rows: np.ndarray) -> np.ndarray:
    """What the original model outputs for `rows`: probabilities if it has them, else values."""
    if framework == "pytorch":
        import torch

        with torch.no_grad():
            return np.asarray(model(torch.from_numpy(rows)).numpy(), dtype=np.float64)
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(rows), dtype=np.float64)
    if framework == "xgboost" and not hasattr(model, "fit"):  # a raw xgboost.Booster
        import xgboost

        return np.asarray(model.predict(xgboost.DMatrix(rows)), dtype=np.float64)
    return np.asarray(model.predict(rows), dtype=np.float64)


def _column(values: np.ndarray, index: int) -> np.ndarray:
    return values if values.ndim == 1 else values[:, index]


def _max_abs_diff(original: np.ndarray, converted: np.ndarray, score_index: int) -> float:
    """Largest absolute difference; NaN on both sides counts as equal, on one side as inf."""
    if original.shape != converted.shape:
        original, converted = _column(original, -1), _column(converted, score_index)
        if original.shape != converted.shape:
            raise RegistryError(
                "parity_failed",
                f"the ONNX score has shape {list(converted.shape)}, the original model's "
                f"{list(original.shape)}",
            )
    both_nan = np.isnan(original) & np.isnan(converted)
    diff = np.where(both_nan, 0.0, np.abs(original - converted))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def _rows_per_second(session: Any, rows: np.ndarray) -> float:
    """Throughput of one session on `rows` as one batch: best of repeated runs."""
    feed = {INPUT_NAME: rows}
    session.run(None, feed)
    best = float("inf")
    deadline = time.perf_counter() + _TIMING_SECONDS
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
        runs += 1
    return rows.shape[0] / max(best, 1e-9)


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def _quantize(model_bytes: bytes) -> bytes:
    """Dynamic int8 quantization of the weights, without ORT's pre-processing step.

    ORT logs a hint to run `quant_pre_process` first; in ORT 1.31 that step fails on the
    ai.onnx.ml tree operators ("Incomplete symbolic shape inference"), so the hint is dropped.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_preprocess_hint)
    try:
        # ORT's symbolic shape inference drops `sym_shape_infer_temp.onnx` into the working
        # directory when it gives up on tree operators: run it where that lands in the trash.
        with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
            source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
            source.write_bytes(model_bytes)
            quantize_dynamic(
                source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
            )
            return target.read_bytes()
    finally:
        root_logger.removeFilter(_drop_preprocess_hint)


def _check_parity(what: str, diff: float, tolerance: float) -> None:
    if diff > tolerance:
        raise RegistryError(
            "parity_failed",
            f"{what} differs from the original model by up to {diff:.3g} on the sample "
            f"(tolerance {tolerance:g})",
            {"max_abs_diff": diff, "tolerance": tolerance},
        )


def import_model(
    source: Any,
    framework: Framework | str,
    feature_names: Sequence[str | FeatureSpec],
    sample_rows: np.ndarray,
    *,
    tolerance: float = 1e-4,
    quantize: bool = False,
    quantized_tolerance: float = QUANTIZED_TOLERANCE,
    model: str = "model",
    version: str = "1",
    metrics: Mapping[str, float] | None = None,
    description: str = "",
    state_dict: str | Path | None = None,
) -> ImportResult:
    """Convert a trained model to ONNX, prove it scores like the original, prefill a manifest.

    `source` is an estimator/module object or a file: pickle/joblib (any framework), a
    LightGBM text model (`.txt`/`.model`), an XGBoost `.json`/`.ubj` model, a TorchScript file
    or a `package.module:factory` spec with `state_dict` (PyTorch). `feature_names` lists the
    matrix columns in order; plain names become request features, `FeatureSpec`s are taken as
    given. `sample_rows` (rows x features) is the parity sample and the reference profile.
    Raises `RegistryError` with `parity_failed`, `conversion_failed`, `unsupported_model`,
    `input_mismatch` or `not_found`.
    """
    try:
        framework = Framework(framework)
    except ValueError:
        known = [f.value for f in Framework]
        raise RegistryError(
            "unsupported_model", f"framework {framework!r} is not one of {known}"
        ) from None
    try:
        features = [f if isinstance(f, FeatureSpec) else FeatureSpec(name=f) for f in feature_names]
    except ValidationError as exc:
        raise invalid_manifest(exc, "features") from None
    rows = np.ascontiguousarray(sample_rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != len(features) or rows.shape[0] == 0:
        raise RegistryError(
            "input_mismatch",
            f"sample of shape {list(np.shape(sample_rows))} does not fit {len(features)} "
            "features (need at least one row)",
        )
    original = _load_source(source, framework, state_dict)
    try:
        fp32_bytes = _to_onnx(original, framework, len(features)).SerializeToString()
    except Exception as exc:  # converters raise anything from RuntimeError to NotImplementedError
        raise RegistryError(
            "conversion_failed", f"{framework} -> ONNX failed: {type(exc).__name__}: {exc}"
        ) from None
    fp32 = cpu_session(fp32_bytes, threads=1)
    score_output, score_index = default_score(fp32.get_outputs())
    try:
        expected = _original_scores(original, framework, rows)
    except Exception as exc:  # whatever the library raises for a sample it cannot score
        raise RegistryError(
            "input_mismatch",
            f"the original model cannot score the sample: {type(exc).__name__}: {exc}",
        ) from None

    def parity(session: Any) -> float:
        (converted,) = session.run([score_output], {INPUT_NAME: rows})
        return _max_abs_diff(expected, np.asarray(converted, dtype=np.float64), score_index)

    max_abs_diff = parity(fp32)
    _check_parity("the ONNX model", max_abs_diff, tolerance)
    fp32_rate = _rows_per_second(fp32, rows)
    served, report = fp32_bytes, None
    if quantize:
        served = _quantize(fp32_bytes)
        int8 = cpu_session(served, threads=1)
        report = QuantizationReport(
            max_abs_diff=parity(int8),
            tolerance=quantized_tolerance,
            quantized_ops=_count_integer_ops(served),
            fp32_rows_per_s=fp32_rate,
            int8_rows_per_s=_rows_per_second(int8, rows),
        )
        _check_parity("the int8-quantized model", report.max_abs_diff, quantized_tolerance)
    try:
        manifest = _manifest(
            served,
            features,
            rows,
            score_output,
            score_index,
            framework=framework.value,
            model=model,
            version=version,
            metrics=dict(metrics or {}),
            description=description,
        )
    except ValidationError as exc:
        raise invalid_manifest(exc, f"manifest of {model}/{version}") from None
    return ImportResult(served, manifest, max_abs_diff, fp32_rate, report)


def _count_integer_ops(model_bytes: bytes) -> int:
    graph = onnx.load_from_string(model_bytes).graph
    return sum(node.op_type in _INTEGER_OPS for node in graph.node)


def _manifest(
    model_bytes: bytes,
    features: list[FeatureSpec],
    rows: np.ndarray,
    score_output: str,
    score_index: int,
    **fields: Any,
) -> Manifest:
    """The manifest of the served model, profiled on the sample with that model's own scores."""
    session = cpu_session(model_bytes, threads=1)
    (scores,) = session.run([score_output], {INPUT_NAME: rows})
    scores = _column(np.asarray(scores, dtype=np.float64), score_index)
    names = [feature.name for feature in features]
    categorical = {feature.name for feature in features if feature.dtype == "bool"}
    return Manifest(
        input_name=INPUT_NAME,
        features=features,
        outputs=output_specs(session.get_outputs()),
        score_output=score_output,
        score_index=score_index,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        reference=build_profile(rows, names, scores, categorical=categorical),
        created_at_ms=int(time.time() * 1000),
        **fields,
    )
