"""`python -m tests.bench [name ...] [--quick]`: run benchmarks, print tables, write JSON."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

import tests.bench as bench_package
from deploy.local.cluster import ClusterConfig, down, up
from tests.bench.harness import BenchContext, BenchTable, machine

RESULTS = Path(".bench/results.json")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench_package.__path__) if m.name.startswith("bench_")
    )
    if wanted:
        names = [n for n in names if any(w in n for w in wanted)]
    console = Console()
    results: dict[str, object] = {"machine": machine(), "started": time.time(), "tables": []}
    modules = {name: importlib.import_module(f"tests.bench.{name}") for name in names}
    needs_cluster = any(getattr(m, "NEEDS_CLUSTER", True) for m in modules.values())
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as scratch:
        config = ClusterConfig.with_free_ports(Path(scratch) / "cluster")
        if needs_cluster:
            up(config, auto_install=False)
        try:
            for name, module in modules.items():
                console.print(f"[bold]running {name}[/bold]")
                workdir = Path(scratch) / name
                workdir.mkdir()
                tables: list[BenchTable] = module.run(BenchContext(config, workdir, quick))
                for table in tables:
                    render = Table(title=table.title)
                    for column in table.columns:
                        render.add_column(column)
                    for row in table.rows:
                        render.add_row(*(_cell(v) for v in row))
                    console.print(render)
                    for note in table.notes:
                        console.print(f"  {note}")
                    results["tables"].append({"module": name, **table.as_dict()})
        finally:
            if needs_cluster:
                down(config, wipe=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    console.print(f"results written to {RESULTS}")
    return 0


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
