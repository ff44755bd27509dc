"""The separate virtual environment that holds KServe (never installed into the project's .venv).

    python -m bench.kserve_env            # create bench/.venv-kserve if needed, print versions

It is made with `python3 -m venv` and `pip install -c bench/kserve-constraints.txt kserve
torch==2.13.0 safetensors numpy httpx tritonclient[grpc,http]`; the constraints pin the same CPU torch wheel as the project
(found on local disk). KServe's gRPC code is generated for protobuf 6 while this project's is for
protobuf 7, which is one reason the two never share a process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.common import REPO_ROOT

KSERVE_VENV = REPO_ROOT / "bench" / ".venv-kserve"
CONSTRAINTS = REPO_ROOT / "bench" / "kserve-constraints.txt"
# tritonclient: the unmodified client of section f (bench/kserve_tritonclient.py); its [grpc]
# extra pins protobuf below 7, which this venv has and the project's does not
PACKAGES = ("kserve", "torch==2.13.0", "safetensors", "numpy", "httpx", "tritonclient[grpc,http]")
_PROBE = (
    "import importlib.metadata, kserve, torch, safetensors, httpx, numpy, tritonclient.http; "
    "print(importlib.metadata.version('kserve'))"
)


def venv_python(venv: Path = KSERVE_VENV) -> Path:
    return venv / "bin" / "python"


def kserve_version(venv: Path = KSERVE_VENV) -> str | None:
    """The installed KServe version, or None when the venv is missing or incomplete."""
    python = venv_python(venv)
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_kserve_venv(venv: Path = KSERVE_VENV, timeout: float = 1800.0) -> Path:
    """Create the venv and install KServe into it unless it already works; return its python.
    Raises `RuntimeError` with pip's output tail if the install fails."""
    if kserve_version(venv) is not None:
        return venv_python(venv)
    print(f"creating {venv} and installing {' '.join(PACKAGES)} (a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    if not CONSTRAINTS.exists():
        CONSTRAINTS.write_text("torch==2.13.0\n")
    install = subprocess.run(
        [str(venv_python(venv)), "-m", "pip", "install", "-c", str(CONSTRAINTS), *PACKAGES],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if install.returncode != 0 or kserve_version(venv) is None:
        raise RuntimeError(
            f"installing KServe failed:\n{(install.stdout + install.stderr)[-4000:]}"
        )
    return venv_python(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=KSERVE_VENV)
    args = parser.parse_args()
    python = ensure_kserve_venv(args.venv)
    print(f"{python}: kserve {kserve_version(args.venv)}")


if __name__ == "__main__":
    main()
