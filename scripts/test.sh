#!/usr/bin/env bash
# Set up, then run the test suite and the strict documentation build (what CI runs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export NO_MKDOCS_2_WARNING=1
.venv/bin/python -m pytest -q "$@"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
.venv/bin/mkdocs build --strict --quiet --site-dir "$site"
echo "docs: mkdocs build --strict passed"
