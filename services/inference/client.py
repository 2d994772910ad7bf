"""The inference service's public face: the model repository as other services read it.

The gateway lists models and reads manifests and tensor metadata (Open Inference Protocol);
the monitor reads each version's reference profile and applies the same binning rule. Nothing
else in `services/inference/` may be imported by another service.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx

from services.inference.manifest import (
    CategoricalProfile,
    FeatureSpec,
    Manifest,
    NumericProfile,
    ReferenceProfile,
    bin_index,
)
from services.inference.registry import (
    RegistryError,
    latest_version,
    list_models,
    load_manifest,
    versions,
)

__all__ = [
    "CategoricalProfile",
    "FeatureSpec",
    "Manifest",
    "NumericProfile",
    "ReferenceProfile",
    "RegistryError",
    "TensorSpec",
    "bin_index",
    "latest_version",
    "list_models",
    "load_manifest",
    "tensor_specs",
    "versions",
]

_OIP_DATATYPES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the Open Inference Protocol describes it (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def tensor_specs(root: Path, model: str, version: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a registered version, read from its ONNX graph."""
    path = Path(root) / model / version / "model.onnx"
    return _tensor_specs(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=256)
def _tensor_specs(path: Path, _mtime_ns: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(
            dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim
        )
        return TensorSpec(value.name, _OIP_DATATYPES.get(tensor.elem_type, "BYTES"), shape)

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]
