#!/usr/bin/env bash
# The project's test command: lint, tests (slow ones included), docs, quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
python -m pytest -n 2 --dist loadfile -q
mkdocs build --strict --quiet --site-dir /tmp/eqx_gn_site
