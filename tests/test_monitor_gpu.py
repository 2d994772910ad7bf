"""The health scorecard's GPU figure: a ratio where a GPU answers, None (NULL) where none does."""

from __future__ import annotations

import shutil

from services.monitor.gpu import gpu_utilization


def test_gpu_utilization_is_a_ratio_or_none():
    found = gpu_utilization()
    if shutil.which("nvidia-smi") is None:
        assert found is None
    else:
        assert found is None or 0.0 <= found <= 1.0
