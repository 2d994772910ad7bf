"""A real gateway process and an inference worker behind it, for the gateway's integration
tests: `python -m services.ingest` on free ports, the inference service in a thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from services.inference.app import build
from services.inference.settings import InferenceSettings
from tests.support import unique

REPO = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayProcess:
    """`python -m services.ingest` on a free HTTP port and a free gRPC port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest"],
            cwd=REPO,
            env={
                **os.environ,
                **env,
                "SLUICE_INGEST_PORT": str(self.port),
                "SLUICE_INGEST_GRPC_PORT": str(self.grpc_port),
                "SLUICE_LOG_LEVEL": "WARNING",
            },
        )

    def wait_ready(self, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=1)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("gateway not ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextmanager
def serving(cluster, root: Path, warm_up) -> Iterator[dict]:
    """An inference worker over the model repository `root` and one gateway in front of it,
    ready: `warm_up(gateway)` must send one request with a long deadline (a new inference group
    starts at the earliest offset of the session's shared sluice.requests, so that request
    returns once the backlog is scored). Yields the gateway, its env and reply group."""
    env = {**cluster.env(), "SLUICE_MODEL_REPOSITORY": str(root)}
    settings = InferenceSettings(
        **{k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()},
        model_repository=root,
        inference_group_id=unique("inference"),
        inference_max_delay_ms=1,
    )
    worker, service, control = build(settings)
    service.load_repository(root)
    control.start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    group = unique("gateway")
    gateway = GatewayProcess({**env, "SLUICE_INGEST_REPLY_GROUP": group})
    try:
        gateway.wait_ready()
        # the first request must not spend its deadline waiting for inference's group join
        deadline = time.monotonic() + 60
        while not worker.ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.ready(), "inference was assigned no partition of sluice.requests"
        warm_up(gateway)
        yield {"env": env, "group": group, "gateway": gateway}
    finally:
        gateway.stop()
        worker.stop()
        thread.join(30)
        control.stop()


@contextmanager
def secured_gateway(env: dict[str, str], keys: str) -> Iterator[GatewayProcess]:
    """One more gateway in front of the same cluster and models, requiring the API keys `keys`
    (`SLUICE_INGEST_API_KEYS`), in a reply group of its own; ready."""
    gateway = GatewayProcess(
        {**env, "SLUICE_INGEST_REPLY_GROUP": unique("keys"), "SLUICE_INGEST_API_KEYS": keys}
    )
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()
