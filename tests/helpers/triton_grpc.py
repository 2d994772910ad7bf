"""`python -m tests.helpers.triton_grpc`: one call of the official Triton gRPC client
(tritonclient.grpc), described by a JSON job on stdin, answered as JSON on stdout.

The client runs in a process of its own, as a user's program would: tritonclient.grpc registers
the protocol's messages (package `inference`) in protobuf's default pool, and so does the
gateway's generated code (schemas/proto), so the two cannot be imported by one process, such as
the test session that also builds the gateway app in-process.

Job: {"address", "action": "health" | "metadata" | "infer", "model", "version", "headers",
"input" (name), "rows" (FP32 matrix), "outputs" (names, or null for all), "timeout_s"}.
Answer: health {"live", "ready", "model_ready", "server"}; metadata the client's as_json;
infer {"model_version", "raw_outputs", "outputs": {name: list}, "dtypes": {name: str}};
an InferenceServerException {"error": {"status", "message"}}.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def run(job: dict) -> dict:
    client = grpcclient.InferenceServerClient(url=job["address"])
    model, version = job.get("model", ""), job.get("version", "")
    headers = job.get("headers")
    if job["action"] == "health":
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model, version, headers=headers),
            "server": client.get_server_metadata(as_json=True),
        }
    if job["action"] == "metadata":
        return client.get_model_metadata(model, version, headers=headers, as_json=True)
    rows = np.asarray(job["rows"], dtype=np.float32)
    tensor = grpcclient.InferInput(job["input"], list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # the client's default: raw_input_contents
    outputs = job.get("outputs")
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    result = client.infer(
        model,
        [tensor],
        model_version=version,
        outputs=requested,
        headers=headers,
        client_timeout=job.get("timeout_s", 10),
    )
    response = result.get_response()
    names = [o.name for o in response.outputs]
    return {
        "model_version": response.model_version,
        "raw_outputs": len(response.raw_output_contents),
        "outputs": {n: result.as_numpy(n).tolist() for n in names},
        "dtypes": {n: str(result.as_numpy(n).dtype) for n in names},
    }


if __name__ == "__main__":
    try:
        answer = run(json.load(sys.stdin))
    except InferenceServerException as exc:
        answer = {"error": {"status": exc.status(), "message": exc.message()}}
    json.dump(answer, sys.stdout)
