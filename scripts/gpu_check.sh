#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU (issue 19):
#
#   scripts/gpu_check.sh [--out DIR] [--venv DIR] [--skip-install] [--repository DIR] [--dry-run]
#   make gpu-check                      # the same, with the defaults
#
# 1. installs: a virtual environment (default .venv-gpu, beside the CPU .venv) with a CUDA build
#    of the torch version constraints.txt pins, from PyTorch's CUDA wheel index (TORCH_INDEX_URL,
#    default https://download.pytorch.org/whl/cu130), then the project with
#    `-c constraints.txt -e .[dev]`. constraints.txt pins `torch==2.13.0`, which the CUDA wheel
#    `2.13.0+cu130` satisfies (a pin without a local label matches any), so pip keeps it rather
#    than taking the CPU wheel (`+cpu`) this repository's CI finds on disk.
#    --skip-install: use the venv as it is (e.g. --venv .venv --skip-install on a CPU machine).
# 2. without CUDA: records the machine (nvidia-smi, torch), makes sure the default teacher is
#    trained (into OUT/model_repository, or the --repository given), and writes the check's
#    images;
# 3. stops there with exit code 3 and a message when torch sees no CUDA device;
# 4. with CUDA, each step under its own time limit (together under 8 minutes):
#    scripts/check_cuda_engine.py (CPU vs CUDA agreement, batch-256 forward times),
#    `python -m bench.throughput --device cuda` (in-process limit, every transport, concurrency
#    with and without the batcher, and the issue's GPU targets), `python -m bench.sequence
#    --device cuda --quick`, and `python -m bench.request_cost --device cuda` (microseconds per
#    stage per door, host-to-device and forward included);
# 5. writes everything into one folder (default runs/gpu-check-<UTC time>): each step's JSON and
#    log, and summary.md (machine, each step's exit code and seconds, the targets tables).
#
# --dry-run prints the plan (the commands, limits and folder) and runs nothing.
# Exit code: 0 all steps passed, 3 no CUDA device, 1 a step failed (summary.md says which).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
VENV=".venv-gpu"
SKIP_INSTALL=0
DRY_RUN=0
REPOSITORY=""
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}"
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        --repository) REPOSITORY="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
TORCH_PIN="$(grep -E '^torch==' constraints.txt | head -n 1)"
PY="$VENV/bin/python"
REPOSITORY="${REPOSITORY:-$OUT/model_repository}"
# step name, time limit (seconds), command: the CUDA steps, in order
STEPS=(
    "engine|90|$PY scripts/check_cuda_engine.py $REPOSITORY/mnist-multitask $OUT/images.npy"
    "throughput|240|$PY -m bench.throughput --device cuda --duration 2 --repository $REPOSITORY --json $OUT/throughput.json"
    "sequence|120|$PY -m bench.sequence --device cuda --quick --json $OUT/sequence.json"
    "request_cost|60|$PY -m bench.request_cost --device cuda --calls 150 --json $OUT/request_cost.json"
)

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check plan (dry run; nothing is run):"
    echo "  folder: $OUT"
    if [ "$SKIP_INSTALL" = 1 ]; then
        echo "  install: skipped, using $VENV as it is"
    else
        echo "  install: $PYTHON -m venv $VENV"
        echo "           $PY -m pip install '$TORCH_PIN' --index-url $TORCH_INDEX_URL"
        echo "           $PY -m pip install -c constraints.txt -e '.[dev]'"
    fi
    echo "  without CUDA: nvidia-smi, torch version, default teacher into $REPOSITORY, $OUT/images.npy"
    echo "  CUDA check: stop with exit code 3 when torch.cuda.is_available() is false"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        echo "  $name (at most ${limit}s): $command"
    done
    echo "  summary: $OUT/summary.md"
    exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
STARTED=$(date +%s)
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`scripts/gpu_check.sh --out $OUT\`, at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
} >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

if [ "$SKIP_INSTALL" = 0 ]; then
    note "- install: $VENV with $TORCH_PIN from $TORCH_INDEX_URL, then the project"
    "$PYTHON" -m venv "$VENV" >"$OUT/install.log" 2>&1
    "$PY" -m pip install --quiet --upgrade pip >>"$OUT/install.log" 2>&1
    "$PY" -m pip install --quiet "$TORCH_PIN" --index-url "$TORCH_INDEX_URL" >>"$OUT/install.log" 2>&1
    "$PY" -m pip install --quiet -c constraints.txt -e '.[dev]' >>"$OUT/install.log" 2>&1
    note "- install took $(($(date +%s) - STARTED)) s"
elif [ ! -x "$PY" ]; then
    echo "gpu_check: --skip-install, but $PY does not exist" >&2
    exit 2
fi

# ---- the steps that need no CUDA ------------------------------------------------------------
{
    echo
    echo "## Machine"
    echo
    echo '```'
    (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not found") | head -n 5
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda build', torch.version.cuda, 'cuda available', torch.cuda.is_available())"
    echo '```'
} >>"$SUMMARY"
# the default teacher (trained on the CPU if missing, ~30 s) and the engine check's images
"$PY" - "$REPOSITORY" "$OUT/images.npy" >"$OUT/prepare.log" 2>&1 <<'EOF'
import sys
from pathlib import Path

import numpy as np

from bench.common import ensure_repository
from teacher_server.repository.default_teacher import mnist_split

repository = Path(sys.argv[1])
repository.mkdir(parents=True, exist_ok=True)
ensure_repository(repository)
np.save(sys.argv[2], mnist_split()[2][:256])
EOF
note "- prepared: the default teacher in $REPOSITORY, 256 test images in $OUT/images.npy"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note ""
    note "STOPPED: torch $("$PY" -c 'import torch; print(torch.__version__)') in $VENV sees no CUDA device, so the CUDA steps (${#STEPS[@]}: engine, throughput, sequence, request_cost) did not run. Run this on a machine with an NVIDIA GPU and driver, without --skip-install (or with a venv holding a CUDA torch)."
    exit 3
fi

# ---- the CUDA steps ---------------------------------------------------------------------------
{
    echo
    echo "## Steps"
    echo
    echo "| step | exit code | seconds | limit | log |"
    echo "|---|---|---|---|---|"
} >>"$SUMMARY"
FAILED=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    begun=$(date +%s)
    set +e
    # shellcheck disable=SC2086  # the command is a list of words
    timeout "$limit" $command >"$OUT/$name.log" 2>&1
    code=$?
    set -e
    [ "$code" = 0 ] || FAILED=1
    echo "| $name | $code$([ "$code" = 124 ] && echo ' (time limit)') | $(($(date +%s) - begun)) | $limit | $name.log |" >>"$SUMMARY"
    echo "gpu_check: $name exited $code after $(($(date +%s) - begun)) s"
done
{
    echo
    echo "Total $(($(date +%s) - STARTED)) s (install included)."
    echo
    echo "## Targets and tables"
    for name in engine throughput sequence request_cost; do
        echo
        echo "### $name (last lines of $name.log)"
        echo
        echo '```'
        tail -n 40 "$OUT/$name.log"
        echo '```'
    done
} >>"$SUMMARY"
echo "gpu_check: wrote $OUT (summary.md, *.json, *.log)"
exit "$FAILED"
