"""Benchmarks (`make bench`): each `tests/bench/bench_*.py` module defines
`run(ctx: BenchContext) -> list[BenchTable]`. The runner starts one private local cluster, runs
every module (or those named on the command line), prints each table and writes all results,
with the machine they came from, to `.bench/results.json`.

Targets are compared as ratios measured in the same run, never as timed assertions in tests.
"""
