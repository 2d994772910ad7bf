"""The benchmark runner's data types and machine description."""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cluster is only a type here: benchmarks without one run anywhere
    from deploy.local.cluster import ClusterConfig


@dataclass
class BenchTable:
    """One printed table: a title, column names, rows, and what the numbers are compared with."""

    title: str
    columns: list[str]
    rows: list[list[object]]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchContext:
    """What a benchmark gets: the running cluster and a scratch folder."""

    cluster: ClusterConfig
    workdir: Path
    quick: bool = False


@contextmanager
def service_gc() -> Iterator[None]:
    """Run a service's code in this process under the garbage-collector tuning the services
    apply at start-up (`tune_garbage_collector`), so an in-process measurement is not slowed
    by rescans of what the benchmark itself holds; restored afterwards."""
    from services.common.worker import tune_garbage_collector

    thresholds = gc.get_threshold()
    gc.collect()
    tune_garbage_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def machine() -> dict[str, object]:
    """The machine the numbers came from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
