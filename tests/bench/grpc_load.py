"""`python -m tests.bench.grpc_load ADDRESS MODEL INPUT WIDTH CALLS SECONDS`: closed-loop load on
the gateway's gRPC ModelInfer, one row per call, CALLS calls in flight at once over one channel
(HTTP/2 multiplexes them, so CALLS stands where wrk's connections stand). Prints one line shaped
like the wrk script's, `RESULT requests duration_us p50_ms p95_ms p99_ms errors 0`.

Runs in its own process, on the gateway's generated stubs (schemas/proto), and in Python: the
load generator spends CPU that wrk, written in C, does not.
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import numpy as np

from schemas.proto import open_inference_grpc_pb2 as pb
from schemas.proto import open_inference_grpc_pb2_grpc as pb_grpc


def requests(model: str, input_name: str, width: int, count: int = 256) -> list:
    """Prebuilt calls, one row each, varied so that no two in a row are the same."""
    rng = np.random.default_rng(0)
    built = []
    for i in range(count):
        row = rng.normal(size=(1, width)).astype("<f4")
        request = pb.ModelInferRequest(model_name=model, id=f"bench-{time.time_ns()}-{i}")
        request.inputs.add(name=input_name, datatype="FP32", shape=[1, width])
        request.raw_input_contents.append(row.tobytes())
        built.append(request)
    return built


async def load(address: str, calls: list, in_flight: int, seconds: float) -> str:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await channel.channel_ready()
        stop_at = time.perf_counter() + seconds

        async def caller(first: int) -> None:
            nonlocal errors
            n = first
            while time.perf_counter() < stop_at:
                request = calls[n % len(calls)]
                request.id = f"{first}-{n}-{time.time_ns()}"  # no idempotent replay
                started = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=5)
                except grpc.aio.AioRpcError:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - started)
                n += in_flight

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(in_flight)))
        duration = time.perf_counter() - began
    p50, p95, p99 = (
        np.percentile(np.array(latencies) * 1000, [50, 95, 99]) if latencies else (0, 0, 0)
    )
    return (
        f"RESULT {len(latencies) + errors} {int(duration * 1e6)} "
        f"{p50:.3f} {p95:.3f} {p99:.3f} {errors} 0"
    )


if __name__ == "__main__":
    address, model, input_name, width, in_flight, seconds = sys.argv[1:7]
    calls = requests(model, input_name, int(width))
    print(asyncio.run(load(address, calls, int(in_flight), float(seconds))))
