"""Generates the Python protobuf and gRPC modules from proto/ into taskgate_client/_generated."""

import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
OUT = HERE / "taskgate_client" / "_generated"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(path.relative_to(PROTO)) for path in PROTO.rglob("*.proto"))
    arguments = [
        "protoc",
        f"-I{PROTO}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    status = protoc.main(arguments)
    if status != 0:
        print(f"generate.py: protoc failed with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
