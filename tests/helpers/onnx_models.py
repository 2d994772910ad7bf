"""Tiny ONNX models built with `onnx.helper` alone (no converter), for engine tests that must
also run where scikit-learn or skl2onnx are absent (the GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_mlp(path: Path, features: int = 20, hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer MLP with a sigmoid score: input `input` [N, F] -> `score` [N, 1]."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(scale=0.3, size=(features, hidden)).astype(np.float32),
        "b1": rng.normal(scale=0.1, size=(hidden,)).astype(np.float32),
        "w2": rng.normal(scale=0.3, size=(hidden, 1)).astype(np.float32),
        "b2": np.zeros((1,), dtype=np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["o1"]),
        helper.make_node("Sigmoid", ["o1"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
