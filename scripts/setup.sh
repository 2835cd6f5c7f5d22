#!/usr/bin/env bash
# Set up .venv with cachepolicy (editable) and its dev and docs extras. Idempotent; safe to rerun.
#
# torch: where no torch is importable, the CPU build (torch==2.13.0) is installed first, so that the
# unpinned torch requirement never pulls a multi-GB CUDA build. An existing torch (e.g. a CUDA build in
# the interpreter the venv is made from) is kept: the venv sees system site-packages.
# Set TORCH_INDEX_URL to install torch from another index (e.g. a CPU-only wheel index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${CACHEPOLICY_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing the CPU build torch==2.13.0"
    "$PY" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi

stamp="$VENV/.cachepolicy-setup"
want="$(cat pyproject.toml examples/*/pyproject.toml 2>/dev/null | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import cachepolicy.cli" >/dev/null 2>&1; then
    echo "setup: installing cachepolicy (editable) with dev and docs extras"
    "$PY" -m pip install --quiet -e ".[dev,docs]"
    echo "$want" > "$stamp"
fi
echo "setup: ready ($("$PY" -c 'import torch, diffusers, cachepolicy; print(f"cachepolicy {cachepolicy.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")'))"
