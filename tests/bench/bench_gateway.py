"""End to end through the gateway: HTTP -> Kafka -> inference consumer -> Kafka -> HTTP, against
a naive baseline (FastAPI calling ONNX Runtime in process per request) on the same model and
the same Redis features, in the same run.

Load comes from `wrk` (one thread, fixed connection counts, a Lua script varying the entity);
each level reports sustained requests/s and p50/p95/p99. Every component shares this machine's
cores with the load generator, the broker and Redis.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.inference.manifest import Manifest
from tests.bench.bench_inference import CARDS, MERCHANTS, _free_port, _seed_online_store
from tests.bench.harness import BenchContext, BenchTable
from tests.helpers.models import FEATURES, write_version
from tests.support import unique

LEVELS = (4, 16, 32, 64)
P99_BUDGET_MS = 50.0

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = string.format(
    '{"entity_id":"card-%d","features":{"merchant_id":"merchant-%d","req_f0":0.1,' ..
    '"req_f1":-0.2,"req_f2":0.3,"req_f3":0.4,"req_f4":-0.5,"req_f5":0.6,"req_f6":0.7,' ..
    '"req_f7":-0.8}}', n % CARDS, n % MERCHANTS)
  return wrk.format(nil, "/v1/models/fraud/predict", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.3f %.3f %.3f %d %d\\n", summary.requests,
    summary.duration, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, summary.errors.status, summary.errors.timeout))
end
""".replace("CARDS", str(CARDS)).replace("MERCHANTS", str(MERCHANTS))


def _wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became ready")


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def _wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return _result(out)


def _result(out: str) -> dict[str, float]:
    """The numbers of a load generator's `RESULT` line (wrk's script, tests/bench/oip_load)."""
    match = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+) (\d+) (\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected load generator output: {out}")
    requests, duration_us, p50, p95, p99, bad_status, timeouts = match.groups()
    return {
        "rps": int(requests) / (int(duration_us) / 1e6),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "errors": int(bad_status) + int(timeouts),
    }


def _measure(url: str, script: Path, seconds: int) -> list[dict[str, float]]:
    _wrk(url, script, 4, 2)  # warm-up: connections, caches, fetch sessions
    return [{"connections": c, **_wrk(url, script, c, seconds)} for c in LEVELS]


def _oip_load(protocol: str, address: str, input_name: str, calls: int, seconds: int) -> dict:
    command = [sys.executable, "-m", "tests.bench.oip_load", protocol, address, "fraud"]
    out = subprocess.run(
        [*command, input_name, str(len(FEATURES)), str(calls), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    return _result(out)


def _measure_oip(protocol: str, address: str, input_name: str, seconds: int) -> list[dict]:
    _oip_load(protocol, address, input_name, 4, 2)  # warm-up
    return [
        {"connections": c, **_oip_load(protocol, address, input_name, c, seconds)} for c in LEVELS
    ]


def _ratio_at(ours: list[dict], theirs: list[dict], connections: int) -> float:
    rps = {r["connections"]: r["rps"] for r in theirs}
    mine = {r["connections"]: r["rps"] for r in ours}
    return mine[connections] / rps[connections] if rps.get(connections) else 0.0


def _best_within_budget(results: list[dict[str, float]]) -> float:
    return max(
        (r["rps"] for r in results if r["p99"] <= P99_BUDGET_MS and not r["errors"]), default=0.0
    )


def run(ctx: BenchContext) -> list[BenchTable]:
    if shutil.which("wrk") is None:
        return [BenchTable("gateway end to end", ["skipped"], [["wrk is not installed"]])]
    root = ctx.workdir / "models"
    write_version(root, "fraud", "1", kind="gbdt", trees=100, depth=5)
    _seed_online_store(ctx.cluster.redis_url)
    script = ctx.workdir / "predict.lua"
    script.write_text(WRK_SCRIPT)
    seconds = 3 if ctx.quick else 8
    env = {
        **ctx.cluster.env(),
        "SLUICE_MODEL_REPOSITORY": str(root),
        "SLUICE_LOG_LEVEL": "WARNING",
    }

    input_name = Manifest.load(root / "fraud" / "1" / "manifest.json").input_name
    gateway_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    inference = _spawn(
        [sys.executable, "-m", "services.inference"],
        {
            **env,
            "SLUICE_METRICS_PORT": str(metrics_port),
            "SLUICE_INFERENCE_GROUP_ID": unique("bench-e2e"),
            "SLUICE_INFERENCE_MAX_BATCH_SIZE": "128",
            "SLUICE_INFERENCE_MAX_DELAY_MS": "1",
        },
    )
    gateway = _spawn(
        [sys.executable, "-m", "services.ingest"],
        {
            **env,
            "SLUICE_INGEST_PORT": str(gateway_port),
            "SLUICE_INGEST_GRPC_PORT": str(grpc_port),
            "SLUICE_INGEST_REPLY_GROUP": unique("bench-gw"),
        },
    )
    try:
        _wait_ready(f"http://127.0.0.1:{metrics_port}/readyz")
        _wait_ready(f"http://127.0.0.1:{gateway_port}/readyz")
        sluice = _measure(f"http://127.0.0.1:{gateway_port}", script, seconds)
        rest_v2 = _measure_oip("rest", f"http://127.0.0.1:{gateway_port}", input_name, seconds)
        grpc_infer = _measure_oip("grpc", f"127.0.0.1:{grpc_port}", input_name, seconds)
    finally:
        _stop(gateway)
        _stop(inference)

    naive_port = _free_port()
    naive = _spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.bench.naive_app:create_app",
            "--port",
            str(naive_port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
    )
    try:
        _wait_for_port(naive_port)
        baseline = _measure(f"http://127.0.0.1:{naive_port}", script, seconds)
    finally:
        _stop(naive)

    rows = [
        [name, r["connections"], r["rps"], r["p50"], r["p95"], r["p99"], r["errors"]]
        for name, results in (
            ("sluiceway (gateway+kafka+inference)", sluice),
            ("sluiceway REST /v2 infer, 1 row per call, Python driver", rest_v2),
            ("sluiceway gRPC ModelInfer, 1 row per call, Python driver", grpc_infer),
            ("naive in-process baseline", baseline),
        )
        for r in results
    ]
    ours, theirs = _best_within_budget(sluice), _best_within_budget(baseline)
    ratio = ours / theirs if theirs else 0.0
    return [
        BenchTable(
            title="gateway end to end vs naive baseline (100-tree GBDT, 20 features, Redis)",
            columns=["system", "connections", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
            rows=rows,
            notes=[
                f"best req/s with p99 <= {P99_BUDGET_MS:.0f} ms: sluiceway {ours:,.0f} (target >= "
                f"2,000), baseline {theirs:,.0f}; ratio {ratio:.2f} (target >= 0.60)",
                "sluiceway captures every request and prediction in Kafka and routes per request; "
                "the baseline does neither",
                f"Open Inference Protocol, one Python driver for both (tests/bench/oip_load.py, "
                f"all 20 features given in the call, the online store still read; its "
                f"'connections' are calls in flight): best req/s with p99 <= "
                f"{P99_BUDGET_MS:.0f} ms REST /v2 {_best_within_budget(rest_v2):,.0f}, gRPC "
                f"{_best_within_budget(grpc_infer):,.0f}; at 16 in flight gRPC/REST "
                f"{_ratio_at(grpc_infer, rest_v2, 16):.2f}. The driver is Python and takes CPU "
                "that wrk does not: compare these two rows with each other, not with wrk's",
            ],
        )
    ]


def _wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} never answered")
