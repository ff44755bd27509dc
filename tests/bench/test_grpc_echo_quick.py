"""`python -m bench.grpc_echo` for a few hundred messages: every cell echoes every message."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
grpc_echo = importlib.import_module("bench.grpc_echo")


def test_every_cell_echoes_its_messages(tmp_path: Path) -> None:
    out = tmp_path / "echo.json"
    grpc_echo.main(["--messages", "300", "--duration", "20", "--json", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert [(c["payload_bytes"], c["in_flight"]) for c in cells] == [
        (size, depth) for size in grpc_echo.PAYLOADS for depth in grpc_echo.IN_FLIGHT
    ]
    for cell in cells:
        assert cell["messages"] == 300  # every message came back, within the time bound
        assert cell["messages_per_s"] > 0
