"""`python -m tests.soak [--seconds N] [--rate R]` (what `make soak` runs): every service under a
steady load for a while, then a report.

Starts a private local cluster on free ports and the five services exactly as `sluice demo` does
(`deploy.demo.run`: demo models, features definitions, monitor and rollout on), then for
`--seconds` (default 600) sends `--rate` synchronous predictions per second (reached linearly
over `--ramp` seconds, default 30, while the broker's JIT warms up) through the gateway,
each transaction's event through the gateway's `/v1/events` (so the features stream and the
monitor's events sink have work) and its label through `/v1/labels`. Every 10 s it samples the
resident memory (/proc) of each service and cluster part. At the end it waits for the consumers
to drain, reads the consumer lag each service exports (`sluice_<service>_consumer_lag`, from
librdkafka statistics) and counts what reached ClickHouse.

Targets, each reported as met or not (exit status 1 if one is missed): no failed request; every
answered prediction, event and label stored in ClickHouse; consumer lag at most `--max-lag`
messages at the end; no service's RSS grows by more than `--rss-growth-mib` between the first
sample after the warm-up (`--warmup`, default the gateway's idempotency TTL + 30 s: it keeps
every request id that long, so its memory grows until then by design) and the end. Prints a
table and writes JSON to `.bench/soak.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from clickhouse_driver import Client
from rich.console import Console
from rich.table import Table

from deploy.demo.generator import DemoConfig, generate
from deploy.demo.run import JSON, Ports, declare_champion, ensure_models, services, start_services
from deploy.demo.run import stop_services as stop_all
from deploy.demo.train import request_features
from deploy.local.cluster import ClusterConfig, down, status, up
from services.common.codec import encode
from services.common.settings import SluiceSettings
from services.ingest.settings import IngestSettings
from tests.bench.harness import machine
from tests.faults.support import free_port, metric_total, rss_bytes

RESULTS = Path(".bench/soak.json")


@dataclass
class Driver:
    """Steady synchronous predictions, events and labels through the gateway."""

    gateway: str
    rate: float
    ramp_s: float = 0.0
    """The rate rises linearly from 0 to `rate` over this long (the broker's JIT warms up)."""
    deadline_ms: int = 2000
    latencies: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    """`time.perf_counter()` at each request's send, in the order of `latencies`."""
    statuses: dict[str, int] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    produced_ids: set[str] = field(default_factory=set)
    """Requests answered 200 or 504: both reached Kafka, so both are scored and stored."""
    events_sent: int = 0
    labels_sent: int = 0
    capture_failures: int = 0
    skipped: int = 0
    """Requests not sent because `max_in_flight` were already waiting (the client saturated)."""
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def max_in_flight(self) -> int:
        """Requests that may wait at once: twice what the rate needs at the full deadline."""
        return int(2 * self.rate * (self.deadline_ms / 1000 + 1)) + 16

    def run(self) -> None:
        asyncio.run(self._run())

    def stop(self) -> None:
        self._stop.set()

    async def _run(self) -> None:
        config = DemoConfig(seed=19, start_ms=int(time.time() * 1000))
        # aiohttp, as the demo's traffic: at 500 requests/s httpx's ~2.4 ms of CPU per request
        # saturated the driver at ~48 requests/s on two cores shared with the system it drives
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.deadline_ms / 1000 + 10),
            connector=aiohttp.TCPConnector(limit=self.max_in_flight + 8, keepalive_timeout=2.0),
        ) as client:
            tasks: set[asyncio.Task] = set()
            events: list[bytes] = []
            labels: list[bytes] = []
            started = time.monotonic()
            flushed = started
            for i, item in enumerate(generate(config)):
                if self._stop.is_set():
                    break
                due = started + due_s(i, self.rate, self.ramp_s)
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                event = item.event
                body = {
                    "entity_id": event.entities["card"],
                    "features": {
                        **request_features(event.fields),
                        "merchant_id": event.entities["merchant"],
                    },
                    "request_id": event.event_id,
                    "timeout_ms": self.deadline_ms,
                }
                if len(tasks) >= self.max_in_flight:
                    self.skipped += 1
                else:
                    self.request_ids.append(event.event_id)
                    self._spawn(tasks, self._predict(client, body))
                events.append(encode(event))
                labels.append(encode(item.label))
                if time.monotonic() - flushed >= 0.2:
                    self._spawn(tasks, self._capture(client, "events", events))
                    self._spawn(tasks, self._capture(client, "labels", labels))
                    events, labels, flushed = [], [], time.monotonic()
            self._spawn(tasks, self._capture(client, "events", events))
            self._spawn(tasks, self._capture(client, "labels", labels))
            if tasks:
                await asyncio.wait(tasks)

    @staticmethod
    def _spawn(tasks: set[asyncio.Task], coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _predict(self, client: aiohttp.ClientSession, body: dict) -> None:
        sent = time.perf_counter()
        url = f"{self.gateway}/v1/models/fraud/predict"
        try:
            async with client.post(url, data=orjson.dumps(body), headers=JSON) as response:
                answer = await response.read()
            outcome = str(response.status)
            if response.status != 200:
                outcome += f" {orjson.loads(answer).get('error', {}).get('code')}"
            if response.status in (200, 504):
                self.produced_ids.add(body["request_id"])
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            outcome = f"no answer ({type(exc).__name__})"
        self.latencies.append(time.perf_counter() - sent)
        self.sent_at.append(sent)
        self.statuses[outcome] = self.statuses.get(outcome, 0) + 1

    async def _capture(self, client: aiohttp.ClientSession, kind: str, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            async with client.post(f"{self.gateway}/v1/{kind}", data=b"\n".join(lines)) as response:
                answer = await response.read()
            accepted = orjson.loads(answer).get("accepted", 0) if response.status == 202 else 0
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            accepted = 0
        self.capture_failures += len(lines) - accepted
        if kind == "events":
            self.events_sent += accepted
        else:
            self.labels_sent += accepted


def due_s(i: int, rate: float, ramp_s: float) -> float:
    """When request `i` is due, in seconds from the start, for a rate rising linearly from 0 to
    `rate` over `ramp_s` and steady after: `rate * t**2 / (2 * ramp_s)` requests by time t."""
    ramped = rate * ramp_s / 2
    if i < ramped:
        return math.sqrt(2 * ramp_s * i / rate)
    return ramp_s + (i - ramped) / rate


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def processes(stack, cluster: ClusterConfig) -> dict[str, int]:
    """The pid of every service and cluster part, by name."""
    pids = {s.name: s.process.pid for s in stack if s.process is not None}
    pids.update({f"{p.name} (cluster)": p.pid for p in status(cluster) if p.pid})
    return pids


def memory(pids: dict[str, int]) -> dict[str, int]:
    """RSS in bytes of each process."""
    return {name: rss_bytes(pid) for name, pid in pids.items()}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each process has used so far, from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            used[name] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            used[name] = 0.0
    return used


def lag(urls: dict[str, str]) -> dict[str, float]:
    """Consumer lag each service reports, summed over its partitions."""
    found = {}
    for name, url in urls.items():
        try:
            found[name] = metric_total(url, f"sluice_{name}_consumer_lag")
        except httpx.HTTPError:
            found[name] = float("nan")
    return found


def stored(cluster: ClusterConfig, since_ms: int) -> dict[str, int]:
    """Rows of this run in ClickHouse, each message counted once (FINAL)."""
    client = Client(cluster.host, port=cluster.clickhouse_tcp_port)
    db = cluster.clickhouse_database
    queries = {
        "predictions": f"SELECT count() FROM {db}.predictions FINAL WHERE model = 'fraud' "
        "AND route != 'shadow' AND created_at_ms >= %(since)s",
        "events": f"SELECT count() FROM {db}.events FINAL",
        "labels": f"SELECT count() FROM {db}.labels FINAL",
    }
    try:
        params = {"since": since_ms}
        return {name: client.execute(sql, params)[0][0] for name, sql in queries.items()}
    finally:
        client.disconnect()


def soak(seconds: float, rate: float, warmup: float, args: argparse.Namespace) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as scratch:
        cluster = ClusterConfig.with_free_ports(Path(scratch) / "cluster")
        up(cluster, auto_install=False, stop_with_caller=True)
        ports = Ports(*(free_port() for _ in range(5)))
        root = Path(scratch) / "models"
        env = {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}
        settings = SluiceSettings(**env, model_repository=root)
        declare_champion(settings)
        ensure_models(settings)
        stack = services(cluster, ports, root, cluster.state_dir)
        for service in stack:  # steady state: no retraining (a CPU burst) during the soak
            service.env.pop("SLUICE_ROLLOUT_RETRAIN_HOOK", None)
        local = "http://127.0.0.1"
        metrics = {
            "ingest": f"{local}:{ports.ingest}",
            "inference": f"{local}:{ports.inference_metrics}",
            "features": f"{local}:{ports.features}",
            "monitor": f"{local}:{ports.monitor_metrics}",
        }
        # the gateway reads its reply partitions from their end and exports no consumer lag
        consumers = {name: url for name, url in metrics.items() if name != "ingest"}
        try:
            start_services(stack, cluster.state_dir / "logs", timeout_s=120)
            console.print(f"services ready; soaking {seconds:.0f} s at {rate:g} requests/s")
            driver = Driver(metrics["ingest"], rate, ramp_s=args.ramp)
            started_ms = int(time.time() * 1000)
            thread = threading.Thread(target=driver.run, name="soak-driver", daemon=True)
            started = time.monotonic()
            thread.start()
            pids = processes(stack, cluster)
            samples = [(0.0, memory(pids))]
            timeline = []
            cpu_before, cpu_at = cpu_seconds(pids), time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                time.sleep(min(10.0, seconds - elapsed))
                samples.append((time.monotonic() - started, memory(pids)))
                cpu_now, now = cpu_seconds(pids), time.monotonic()
                cpu = {k: (cpu_now[k] - cpu_before[k]) / (now - cpu_at) for k in cpu_now}
                cpu_before, cpu_at = cpu_now, now
                timeline.append(
                    {
                        "t": round(samples[-1][0]),
                        "outcomes": dict(driver.statuses),
                        "cpu_percent": {k: round(100 * v) for k, v in cpu.items()},
                    }
                )
                console.print(
                    f"  {samples[-1][0]:5.0f} s: {len(driver.latencies)} answered, "
                    f"{driver.statuses}; broker CPU {100 * cpu.get('kafka (cluster)', 0):.0f}%"
                )
            driver.stop()
            thread.join(driver.deadline_ms / 1000 + 30)
            assert not thread.is_alive(), "the load driver did not stop"
            drained_at = time.monotonic()
            while time.monotonic() - drained_at < 60:
                lags = lag(consumers)
                if all(v <= args.max_lag for v in lags.values()):
                    break
                time.sleep(2)
            time.sleep(6)  # one more statistics interval (5 s) so the lag gauges are current
            lags = lag(consumers)
            wanted = {
                "predictions": len(driver.produced_ids),
                "events": driver.events_sent,
                "labels": driver.labels_sent,
            }
            rows = stored(cluster, started_ms)
            deadline = time.monotonic() + 60
            while rows != wanted and time.monotonic() < deadline:
                time.sleep(2)
                rows = stored(cluster, started_ms)
            final = memory(pids)
        finally:
            stop_all(stack)
            down(cluster, wipe=True)

    baseline = next((m for t, m in samples if t >= warmup), samples[-1][1])
    growth_limit = args.rss_growth_mib * 2**20
    service_names = [s.name for s in stack]
    failed = sum(n for outcome, n in driver.statuses.items() if outcome != "200")
    p50, p99 = quantile(driver.latencies, 0.5), quantile(driver.latencies, 0.99)
    first_sent = min(driver.sent_at, default=0.0)
    warm = [
        x for t, x in zip(driver.sent_at, driver.latencies, strict=True) if t - first_sent >= warmup
    ]
    warm_p99 = quantile(warm, 0.99)
    checks = {
        "no failed request": failed == 0 and driver.capture_failures == 0 and not driver.skipped,
        "everything stored in ClickHouse": rows == wanted,
        f"lag <= {args.max_lag} at the end": all(v <= args.max_lag for v in lags.values()),
        f"RSS growth <= {args.rss_growth_mib} MiB after warm-up": all(
            final.get(name, 0) - baseline.get(name, 0) <= growth_limit for name in service_names
        ),
    }
    table = Table(title=f"soak: {seconds:.0f} s at {rate:g} req/s")
    for column in ("process", "RSS start MiB", f"RSS at {warmup:.0f} s", "RSS end MiB", "lag"):
        table.add_column(column)
    for name in final:
        table.add_row(
            name,
            f"{samples[0][1].get(name, 0) / 2**20:.0f}",
            f"{baseline.get(name, 0) / 2**20:.0f}",
            f"{final[name] / 2**20:.0f}",
            f"{lags[name]:.0f}" if name in lags else "",
        )
    console.print(table)
    console.print(
        f"requests {len(driver.request_ids)} ({driver.skipped} not sent: client saturated): "
        f"{driver.statuses}; p50 "
        f"{(p50 or 0) * 1000:.1f} ms, p99 {(p99 or 0) * 1000:.1f} ms (after the warm-up "
        f"{(warm_p99 or 0) * 1000:.1f} ms); events {driver.events_sent}, "
        f"labels {driver.labels_sent} ({driver.capture_failures} capture failures); ClickHouse "
        f"{rows} of {wanted}"
    )
    for check, met in checks.items():
        console.print(f"  {'met ' if met else 'MISSED'}  {check}")
    result = {
        "machine": machine(),
        "seconds": seconds,
        "rate": rate,
        "requests": len(driver.request_ids),
        "not_sent_client_saturated": driver.skipped,
        "statuses": driver.statuses,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "p99_ms_after_warmup": None if warm_p99 is None else warm_p99 * 1000,
        "events": driver.events_sent,
        "labels": driver.labels_sent,
        "capture_failures": driver.capture_failures,
        "stored": rows,
        "expected": wanted,
        "lag_end": lags,
        "rss_mib": {
            name: {
                "start": samples[0][1].get(name, 0) / 2**20,
                "after_warmup": baseline.get(name, 0) / 2**20,
                "end": final[name] / 2**20,
            }
            for name in final
        },
        "rss_samples_mib": [
            {"t": t, **{k: round(v / 2**20, 1) for k, v in m.items()}} for t, m in samples
        ],
        "outcomes_timeline": timeline,
        "checks": checks,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    console.print(f"results written to {RESULTS}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str]) -> int:
    summary_line = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=summary_line)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to load (600)")
    parser.add_argument("--rate", type=float, default=50.0, help="predictions per second (50)")
    parser.add_argument("--ramp", type=float, default=30.0, help="seconds to reach --rate (30)")
    ttl_s = IngestSettings().ingest_idempotency_ttl_s
    parser.add_argument(
        "--warmup",
        type=float,
        default=ttl_s + 30,
        help=f"RSS baseline after this long ({ttl_s + 30:.0f} s: the gateway remembers every "
        f"request id for SLUICE_INGEST_IDEMPOTENCY_TTL_S={ttl_s:.0f} s, so its memory grows "
        "until then by design)",
    )
    parser.add_argument("--max-lag", type=float, default=0.0, help="lag target at the end (0)")
    parser.add_argument("--rss-growth-mib", type=float, default=64.0, help="RSS growth bound")
    args = parser.parse_args(argv)
    warmup = min(args.warmup, args.seconds / 2)
    return soak(args.seconds, args.rate, warmup, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
