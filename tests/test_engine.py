"""ONNX Runtime engine: provider choice and, where a GPU is present, CUDA runs through
IOBinding that match the CPU provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.inference.engine import CPU, CUDA, Engine, gpu_visible, providers_for
from tests.helpers.onnx_models import write_mlp

needs_gpu = pytest.mark.skipif(
    not (gpu_visible() and CUDA in ort.get_available_providers()),
    reason="needs an NVIDIA GPU and onnxruntime-gpu (run on the GPU machine)",
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_mlp(tmp_path_factory.mktemp("engine") / "model.onnx")


def test_cpu_setting_never_asks_for_a_gpu_provider():
    assert providers_for("cpu") == [CPU]


def test_auto_falls_back_to_the_cpu_without_a_gpu(model_path):
    engine = Engine.load(model_path, "auto")
    if not gpu_visible():
        assert engine.device == "cpu"
    matrix = np.random.default_rng(1).normal(size=(5, 20)).astype(np.float32)
    assert engine.run(matrix)["score"].shape == (5, 1)


@needs_gpu
def test_cuda_engine_matches_the_cpu_engine_for_every_batch_bucket(model_path):
    gpu = Engine.load(model_path, "cuda")
    cpu = Engine.load(model_path, "cpu")
    assert gpu.device == "cuda" and cpu.device == "cpu"
    rng = np.random.default_rng(2)
    for rows in (1, 7, 64, 100, 512, 513):
        matrix = rng.normal(size=(rows, 20)).astype(np.float32)
        np.testing.assert_allclose(gpu.run(matrix)["score"], cpu.run(matrix)["score"], atol=1e-5)
    assert {1, 8, 128, 512, 1024} <= set(gpu._bound), "one preallocated binding per bucket"
