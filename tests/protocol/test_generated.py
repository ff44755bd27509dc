"""The checked-in protobuf/gRPC code is exactly what `scripts/gen_protos.py` generates now."""

from __future__ import annotations

import difflib
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = sorted(
    path.relative_to(ROOT)
    for pattern in ("*_pb2*.py", "*_pb2*.pyi")
    for path in (ROOT / "protocol").rglob(pattern)
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    gen_protos = runpy.run_path(str(ROOT / "scripts" / "gen_protos.py"))
    gen_protos["generate"](out)
    return out


def test_generated_files_exist() -> None:
    names = {str(path) for path in CHECKED_IN}
    assert {f"protocol/v1/teacher_pb2{end}" for end in (".py", ".pyi", "_grpc.py")} <= names


@pytest.mark.parametrize("relative", CHECKED_IN, ids=str)
def test_checked_in_code_is_up_to_date(generated: Path, relative: Path) -> None:
    fresh = generated / relative
    assert fresh.is_file(), (
        f"{relative} is not generated any more; run python scripts/gen_protos.py"
    )
    checked_in = (ROOT / relative).read_text()
    expected = fresh.read_text()
    same = (ROOT / relative).read_bytes() == fresh.read_bytes()
    diff = "".join(
        list(difflib.unified_diff(expected.splitlines(True), checked_in.splitlines(True)))[:30]
    )
    assert same, (
        f"{relative} differs from the code generated from the .proto (edited or reformatted by "
        f"hand?); run python scripts/gen_protos.py\n{diff}"
    )


def test_no_generated_file_missing(generated: Path) -> None:
    fresh = sorted(path.relative_to(generated) for path in generated.rglob("*_pb2*.py*"))
    missing = [str(path) for path in fresh if not (ROOT / path).is_file()]
    assert not missing, f"not checked in: {missing}; run python scripts/gen_protos.py"
