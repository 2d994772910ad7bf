"""The gateway's gRPC service definition is the published Open Inference Protocol's as the
official Triton client speaks it, and the committed generated code is what grpcio-tools makes
of it.

Neither side is imported here: tritonclient.grpc and the generated module register the same
message names in protobuf's default pool, and the suite builds the gateway app in-process. Our
definition is read through protoc, Triton's from a process of its own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from schemas.proto.__main__ import PROTOS, ROOT, generate

TRITON_DESCRIPTOR = (
    "import sys; from tritonclient.grpc import service_pb2; "
    "sys.stdout.buffer.write(service_pb2.DESCRIPTOR.serialized_pb)"
)
GENERATED = ["_pb2.py", "_pb2.pyi", "_pb2_grpc.py"]
SERVED = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
]


def ours() -> descriptor_pb2.FileDescriptorProto:
    out = Path(tempfile.mkdtemp()) / "set.pb"
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(ROOT / PROTOS[0])]
    )
    assert code == 0
    (proto,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return proto


def tritons() -> descriptor_pb2.FileDescriptorProto:
    """The service file that tritonclient.grpc ships, as a descriptor."""
    serialized = subprocess.run(
        [sys.executable, "-c", TRITON_DESCRIPTOR], capture_output=True, check=True, timeout=60
    ).stdout
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, list[tuple]]:
    """Every message, nested ones too, by full name -> its fields' wire-relevant facts."""
    found: dict[str, list[tuple]] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = sorted(
            (
                f.number,
                f.name,
                f.type,
                f.label,
                f.type_name,
                f.oneof_index if f.HasField("oneof_index") else -1,
            )
            for f in message.field
        )
        for nested in message.nested_type:
            walk(name, nested)

    for message in proto.message_type:
        walk(f".{proto.package}", message)
    return found


def test_every_message_matches_the_one_the_official_client_sends_and_reads():
    mine, theirs = messages(ours()), messages(tritons())
    assert ours().package == tritons().package == "inference"
    assert set(mine) <= set(theirs)
    for name, fields in mine.items():
        assert fields == theirs[name], name


def test_the_service_offers_the_protocols_calls_with_the_clients_types():
    (mine,) = ours().service
    theirs = {m.name: m for m in next(s for s in tritons().service if s.name == mine.name).method}
    assert mine.name == "GRPCInferenceService"
    assert [m.name for m in mine.method] == SERVED
    for method in mine.method:
        assert (method.input_type, method.output_type) == (
            theirs[method.name].input_type,
            theirs[method.name].output_type,
        )


@pytest.mark.parametrize("suffix", GENERATED)
def test_the_committed_generated_code_is_what_grpcio_tools_makes(tmp_path, suffix):
    generate(tmp_path)
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        fresh = (tmp_path / f"{stem}{suffix}").read_text()
        assert (ROOT / f"{stem}{suffix}").read_text() == fresh, (
            f"{stem}{suffix} is stale: run `python -m schemas.proto`"
        )


def test_the_suite_loads_the_gateway_app_and_the_http_client_but_never_tritonclient_grpc():
    """The constraint this file's docstring states, for the whole test session: a test that
    imported tritonclient.grpc in-process would break every later import of the app."""
    import tritonclient.http  # noqa: F401
    import tritonclient.utils  # noqa: F401

    import services.ingest.app  # noqa: F401

    assert "tritonclient.grpc" not in sys.modules
