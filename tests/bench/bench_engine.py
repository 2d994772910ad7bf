"""Raw engine throughput (rows/s) by batch size, CPU provider vs CUDA where a GPU is present.

Two models built with `onnx.helper`: a small MLP (20-64-1, the size of a fraud scorer) and a
wide one (20-1024-1024-1), on one ONNX Runtime session each; the CUDA runs go through the
engine's IOBinding path with preallocated buffers (host->device copy and back included).
Runs without the local cluster, so it also runs alone on a GPU machine:
`python -m tests.bench.bench_engine OUT.json`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.engine import CUDA, Engine, gpu_visible
from tests.bench.harness import BenchContext, BenchTable
from tests.helpers.onnx_models import write_mlp

NEEDS_CLUSTER = False
BATCHES = (1, 8, 32, 128, 512, 2048)


def _rows_per_s(engine: Engine, rows: int, seconds: float) -> float:
    matrix = np.random.default_rng(rows).normal(size=(rows, 20)).astype(np.float32)
    for _ in range(3):
        engine.run(matrix)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        engine.run(matrix)
        runs += 1
    return runs * rows / elapsed


def _wide_mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [(20, 1024), (1024, 1024), (1024, 1)]
    nodes, inits, current = [], [], "input"
    for i, (n_in, n_out) in enumerate(sizes):
        w = numpy_helper.from_array(
            rng.normal(scale=0.05, size=(n_in, n_out)).astype(np.float32), f"w{i}"
        )
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        current = f"m{i}"
        if i < len(sizes) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Sigmoid", [current], ["score"]))
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 20])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def measure(workdir: Path, seconds: float) -> BenchTable:
    models = {
        "mlp 20-64-1": write_mlp(workdir / "small.onnx"),
        "mlp 20-1024-1024-1": _wide_mlp(workdir / "wide.onnx"),
    }
    devices = ["cpu"] + (
        ["cuda"] if gpu_visible() and CUDA in ort.get_available_providers() else []
    )
    rows = []
    for name, path in models.items():
        for device in devices:
            engine = Engine.load(path, device, intra_op_threads=1 if device == "cpu" else 0)
            rows.append([name, engine.device, *(_rows_per_s(engine, b, seconds) for b in BATCHES)])
    return BenchTable(
        title="ONNX Runtime engine rows/s by batch size (one session; CPU on one thread)",
        columns=["model", "device", *(f"batch {b}" for b in BATCHES)],
        rows=rows,
        notes=[f"onnxruntime {ort.__version__}; providers {ort.get_available_providers()}"],
    )


def run(ctx: BenchContext) -> list[BenchTable]:
    return [measure(ctx.workdir, 0.5 if ctx.quick else 2.0)]


if __name__ == "__main__":
    import json

    from tests.bench.harness import machine

    with tempfile.TemporaryDirectory() as scratch:
        table = measure(Path(scratch), 2.0)
    result = {"machine": machine(), "tables": [table.as_dict()]}
    Path(sys.argv[1] if len(sys.argv) > 1 else "engine.json").write_text(
        json.dumps(result, indent=2)
    )
    for row in table.rows:
        print(*(f"{v:,.0f}" if isinstance(v, float) else v for v in row), sep=" | ")
