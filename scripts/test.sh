#!/usr/bin/env bash
# The project's test command: lint, the whole test suite (slow tests included),
# the docs (strict) and the quickstart example.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks examples scripts docs
ruff format --check src tests benchmarks examples scripts docs
# Two workers for most tests; the tests with collectives over simulated devices run
# alone afterwards: XLA's CPU collectives abort the process when another process
# starves one device thread for 40 s.
python -m pytest -n 2 --dist loadfile -q -m "not multidevice"
python -m pytest -q -m multidevice
python scripts/check_api_docs.py
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "${TMPDIR:-/tmp}/eqx_gn_site"
python examples/quickstart.py
