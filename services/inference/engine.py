"""ONNX Runtime sessions: provider choice, and GPU runs through IOBinding with preallocated
buffers.

`auto` picks CUDA when onnxruntime-gpu can actually create a CUDA session here (a GPU is
visible and its libraries load), TensorRT only when asked, and the CPU provider otherwise. On
CUDA, inputs and outputs are bound to device buffers allocated once per power-of-two batch
bucket; a batch is padded to its bucket (the padding rows are scored and dropped), so steady
traffic reuses the same device memory instead of allocating per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


_PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0"}, TENSORRT: {"trt_fp16_enable": "False"}}
"""Full fp32 on the GPU: TF32 matmuls (on by default on Ampere and newer) move scores by ~1e-4,
enough to flip decisions at a threshold and to break CPU/GPU parity checks."""


def gpu_visible() -> bool:
    """Whether an NVIDIA driver is loaded here (without it CUDA providers can only fail)."""
    return Path("/dev/nvidiactl").exists()


def providers_for(setting: str) -> list[str]:
    """The provider list to ask ONNX Runtime for, by setting (`auto`, `cuda`, `tensorrt`, `cpu`).

    `auto` asks for CUDA only where a GPU is visible, so CPU-only machines with onnxruntime-gpu
    installed do not log a failed CUDA load for every session.
    """
    if setting == "cpu" or (setting == "auto" and not gpu_visible()):
        return [CPU]
    available = set(ort.get_available_providers())
    wanted = {
        "cpu": [CPU],
        "cuda": [CUDA, CPU],
        "tensorrt": [TENSORRT, CUDA, CPU],
        "auto": [CUDA, CPU],
    }[setting]
    return [p for p in wanted if p in available] or [CPU]


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # CUDA fallback warnings on CPU-only machines are expected
    return options


def _bucket(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


@dataclass
class Engine:
    """One loaded model: runs a float32 matrix [rows, features] and returns every output."""

    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    device: str
    _bound: dict[int, tuple[ort.OrtValue, ort.IOBinding]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, provider: str = "auto", intra_op_threads: int = 1) -> Engine:
        """Load `path` with the providers the setting asks for, falling back to the CPU."""
        providers = providers_for(provider)
        if providers[0] != CPU and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when that is where they are
        session = ort.InferenceSession(
            str(path),
            sess_options=_session_options(intra_op_threads),
            providers=[(p, _PROVIDER_OPTIONS.get(p, {})) for p in providers],
        )
        device = "cuda" if session.get_providers()[0] in (CUDA, TENSORRT) else "cpu"
        if device == "cpu" and providers[0] != CPU:
            log.info("GPU provider unavailable, running on CPU", extra={"model": str(path)})
        return cls(
            session=session,
            input_name=session.get_inputs()[0].name,
            output_names=[o.name for o in session.get_outputs()],
            device=device,
        )

    def run(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Score `matrix` (float32, C-contiguous) and return each output by name."""
        if self.device == "cpu":
            results = self.session.run(self.output_names, {self.input_name: matrix})
            return dict(zip(self.output_names, results, strict=True))
        return self._run_bound(matrix)

    def _run_bound(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        rows = matrix.shape[0]
        size = _bucket(rows)
        if size not in self._bound:
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                [size, matrix.shape[1]], np.float32, "cuda", 0
            )
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.input_name, buffer)
            for name in self.output_names:
                binding.bind_output(name, "cuda", 0)
            self._bound[size] = (buffer, binding)
        buffer, binding = self._bound[size]
        if rows < size:
            padded = np.zeros((size, matrix.shape[1]), dtype=np.float32)
            padded[:rows] = matrix
            matrix = padded
        buffer.update_inplace(matrix)
        self.session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        return {name: out[:rows] for name, out in zip(self.output_names, outputs, strict=True)}
