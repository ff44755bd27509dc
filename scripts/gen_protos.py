"""Regenerate the checked-in protobuf/gRPC Python code from `protocol/**/*.proto`.

Run from anywhere: `python scripts/gen_protos.py`. The output is written next to each `.proto`
(`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`), with imports rooted at the repository
(`from protocol.v1 import teacher_pb2`). `tests/protocol/test_generated.py` regenerates into a
temporary folder and fails when the checked-in files differ, so edit the `.proto`, run this, and
commit both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def proto_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "protocol").rglob("*.proto"))


def generate(out_dir: Path, root: Path = ROOT) -> None:
    """Generate code for every .proto under `root/protocol` into `out_dir` (same relative paths)."""
    well_known = Path(protoc.__file__).parent / "_proto"
    for proto in proto_files(root):
        rel = proto.relative_to(root)
        args = [
            "protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(rel),
        ]
        code = protoc.main([*args[:-1], str(root / rel)])
        if code != 0:
            raise SystemExit(f"protoc failed on {rel} (exit {code})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args()
    generate(args.out)
    print(
        f"generated code for {len(proto_files())} .proto file(s) under {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
