"""Every Python snippet in the README and docs/ runs, against a real teacher.

Snippets address the teacher at its documented defaults (127.0.0.1:50051 or localhost:50051 for
gRPC, 127.0.0.1:8000 or localhost:8000 for HTTP); the test substitutes the session teacher's real
addresses. The
snippets of one file run in order in one namespace, in a subprocess. A snippet that must not run
(e.g. one that needs a GPU) is preceded by the line `<!-- snippet: skip -->`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"(<!-- snippet: skip -->\s*)?```python\n(.*?)```", re.DOTALL)


def snippets(path: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(path.read_text()) if not skip]


def test_the_docs_have_snippets() -> None:
    assert sum(len(snippets(path)) for path in DOCS) >= 3


@pytest.mark.parametrize("path", [p for p in DOCS if snippets(p)], ids=lambda p: p.name)
def test_snippets_run(path: Path, teacher, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code = "\n\n".join(snippets(path))
    http_host = teacher.http_url.removeprefix("http://")
    for host in ("127.0.0.1", "localhost"):
        code = code.replace(f"http://{host}:8000", teacher.http_url)
        code = code.replace(f"{host}:8000", http_host)
        code = code.replace(f"{host}:50051", teacher.grpc_address)
    script = tmp_path / f"{path.stem}_snippets.py"
    script.write_text(code)
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, (
        f"{path.name}:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    )
