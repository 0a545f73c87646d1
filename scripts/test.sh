#!/usr/bin/env bash
# The project's test command: lint, the whole test suite (slow tests included; the
# docs are built strict by tests/test_docs.py, which then checks the pages) and the
# quickstart example. Each phase prints a line when it starts and one with the time
# it took, and the slowest tests of each pytest call are listed, so a slow or
# silent phase shows where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
timings=()

phase() {
    local name="$1" start=$SECONDS status=0
    shift
    echo "==> [$(date +%H:%M:%S)] ${name}: started"
    "$@" || status=$?
    local took=$((SECONDS - start))
    timings+=("$(printf '%-18s %5d s' "${name}" "${took}")")
    if ((status != 0)); then
        echo "==> ${name}: FAILED (exit ${status}) after ${took} s"
        exit "${status}"
    fi
    echo "==> ${name}: ok in ${took} s"
}

# Called as a condition, where set -e does not apply: chained with && instead.
lint() {
    ruff check src tests benchmarks examples scripts docs &&
        ruff format --check src tests benchmarks examples scripts docs
}

# One persistent compilation cache for the run, shared by the test workers, the
# multi-device phase and the command-line subprocesses they start: a program
# compiled once (the runner's step of a small configuration that several tests
# and subprocesses train) is read back instead of compiled again. A new directory
# each run, removed at the end, so no run reads another's programs. Programs that
# compile in under 0.2 s are not stored; a program holding a host callback (an
# eqx.error_if) is never stored, which is why the runner's loss checks its labels
# on the host instead.
JAX_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/eqx_gn_jax_cache.XXXXXX")"
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2
trap 'rm -rf "${JAX_COMPILATION_CACHE_DIR}"' EXIT

phase lint lint
# Two workers for most tests; the tests with collectives over simulated devices run
# alone afterwards: XLA's CPU collectives abort the process when another process
# starves one device thread for 40 s. A worker that dies fails the run at once
# (--max-worker-restart=0: restarted workers can hang xdist), and each pytest call
# is stopped after 45 minutes (four times what the longer one takes on 2 cores) so
# a hang fails with its phase's name instead of running out CI's time. XLA compiles
# for compile time in every test process and the subprocesses they start
# (tests/compile_flags.py, applied by tests/conftest.py): most of the suite's time
# is compiling.
phase tests timeout -k 60 2700 python -m pytest -n 2 --dist loadfile \
    --max-worker-restart=0 -q --durations=15 -m "not multidevice"
phase multi-device timeout -k 60 2700 python -m pytest -q --durations=15 -m multidevice
phase api-docs python scripts/check_api_docs.py
phase quickstart python examples/quickstart.py

echo "==> phase times"
printf '    %s\n' "${timings[@]}"
echo "    $(printf '%-18s %5d s' total $((SECONDS - started)))"
