"""GPU utilisation of this host, for the health scorecard, via `nvidia-smi` (no extra library).

Utilisation is a host figure, not a version's: it is recorded in every health row of the window
when the monitor runs on (or beside) the GPU host, and is NULL where there is no GPU.
"""

from __future__ import annotations

import shutil
import subprocess


def gpu_utilization(timeout_s: float = 2.0) -> float | None:
    """Mean utilisation of this host's GPUs as a ratio in [0, 1], or None without a GPU.

    Reads `nvidia-smi --query-gpu=utilization.gpu` (percent busy over the driver's last sample
    period). Any failure (no driver, no device, a timeout) gives None rather than an error.
    """
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        percents = [float(line) for line in result.stdout.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not percents:
        return None
    return min(1.0, max(0.0, sum(percents) / len(percents) / 100))
