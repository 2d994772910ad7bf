"""`python -m tests.bench.oip_load grpc|rest ADDRESS MODEL INPUT WIDTH CALLS SECONDS`: closed-loop
load on the gateway's Open Inference Protocol infer, one row per call, CALLS calls in flight at
once. Prints one line shaped like the wrk script's, `RESULT requests duration_us p50_ms p95_ms
p99_ms errors 0`.

- `grpc`: ModelInfer on the gateway's generated stubs (schemas/proto), the row as
  `raw_input_contents`, every call over one channel (HTTP/2 multiplexes them, so CALLS stands
  where wrk's connections stand).
- `rest`: `POST ADDRESS/v2/models/MODEL/infer` with the row as a JSON tensor, over CALLS
  keep-alive connections (aiohttp), so that the REST and gRPC rows share one Python driver.

Runs in its own process, in Python: the load generator spends CPU that wrk, written in C, does
not, and the same for both protocols.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
import numpy as np
import orjson

from schemas.proto import open_inference_grpc_pb2 as pb
from schemas.proto import open_inference_grpc_pb2_grpc as pb_grpc


def rows(width: int, count: int = 256) -> np.ndarray:
    """Prebuilt rows, varied so that no two calls in a row are the same."""
    return np.random.default_rng(0).normal(size=(count, width)).astype("<f4")


async def closed_loop(call: Callable[[int, int], Awaitable[bool]], in_flight: int, seconds: float):
    """`in_flight` callers, each calling `call(caller, n)` again as soon as it returns (True:
    answered, False: an error); (latencies in s, errors, duration in s)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller(first: int) -> None:
        nonlocal errors
        n = first
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            if await call(first, n):
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            n += in_flight

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(in_flight)))
    return latencies, errors, time.perf_counter() - began


async def load_grpc(address: str, model: str, input_name: str, data: np.ndarray, in_flight: int,
                    seconds: float):  # fmt: skip
    calls = []
    for row in data:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=[1, data.shape[1]])
        request.raw_input_contents.append(row.tobytes())
        calls.append(request)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await channel.channel_ready()

        async def call(first: int, n: int) -> bool:
            request = calls[n % len(calls)]
            request.id = f"{first}-{n}-{time.time_ns()}"  # no idempotent replay
            try:
                await stub.ModelInfer(request, timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return True

        return await closed_loop(call, in_flight, seconds)


async def load_rest(address: str, model: str, input_name: str, data: np.ndarray, in_flight: int,
                    seconds: float):  # fmt: skip
    url = f"{address}/v2/models/{model}/infer"
    tensors = [
        {"name": input_name, "datatype": "FP32", "shape": [1, data.shape[1]], "data": row.tolist()}
        for row in data
    ]
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(first: int, n: int) -> bool:
            body = {"id": f"{first}-{n}-{time.time_ns()}", "inputs": [tensors[n % len(tensors)]]}
            try:
                async with session.post(
                    url,
                    data=orjson.dumps(body),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as response:
                    await response.read()
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        return await closed_loop(call, in_flight, seconds)


def result_line(latencies: list[float], errors: int, duration: float) -> str:
    p50, p95, p99 = (
        np.percentile(np.array(latencies) * 1000, [50, 95, 99]) if latencies else (0, 0, 0)
    )
    return (
        f"RESULT {len(latencies) + errors} {int(duration * 1e6)} "
        f"{p50:.3f} {p95:.3f} {p99:.3f} {errors} 0"
    )


if __name__ == "__main__":
    protocol, address, model, input_name, width, in_flight, seconds = sys.argv[1:8]
    load = {"grpc": load_grpc, "rest": load_rest}[protocol]
    measured = asyncio.run(
        load(address, model, input_name, rows(int(width)), int(in_flight), float(seconds))
    )
    print(result_line(*measured))
