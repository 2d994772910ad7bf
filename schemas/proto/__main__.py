"""`python -m schemas.proto`: regenerate the Python code of the .proto files here with
grpcio-tools (a dev dependency); the generated modules are committed."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent.parent
PROTOS = ["schemas/proto/open_inference_grpc.proto"]


def generate(out: Path) -> None:
    """Write `<name>_pb2.py`, `<name>_pb2.pyi` and `<name>_pb2_grpc.py` of every proto under
    `out` (at their paths relative to the repository root)."""
    include = Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(ROOT / proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} ({code})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
