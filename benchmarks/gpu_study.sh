#!/usr/bin/env bash
# The study's second-edition protocol (eqx-gn study, eqx_gn.lm.study) on the 45m
# model with a byte-pair vocabulary of 32,000, sized for one H100/H200 within 9
# minutes: fewer methods (AdamW, Muon, GN), three batch sizes, one seed and a
# cap of 4 tuning runs (stated in study.json's settings). The study reuses its
# finished runs, so a second call continues where a timeout stopped the first.
#
#   bash benchmarks/gpu_study.sh OUTDIR            # the GPU study
#   bash benchmarks/gpu_study.sh OUTDIR --smoke    # tiny shapes, any machine
#
# On the device machine, the wheels its image lacks travel in .whl/ (see
# benchmarks/gpu_scale.sh); OUTDIR gets study.json, its plots, results.md and
# study.log, and status.txt with the exit code.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_study.sh OUTDIR [--smoke]}
smoke=${2:-}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

if [ "$smoke" = "--smoke" ]; then
    args=(--model tiny --seq-len 32 --methods adamw,gn --batch-sizes 8,16
          --steps 12 --max-runs 3 --seeds 1 --timing-rounds 0 --eval-batches 1
          --eval-batch-size 8 --gn-micro-batch 4)
    limit=600
else
    python3 -c "import jax; print(jax.devices())"
    args=(--model 45m --tokenizer bpe --vocab-size 32000 --seq-len 1024
          --methods adamw,muon,gn --batch-sizes 16,32,64 --steps 60 --max-runs 4
          --seeds 1 --timing-rounds 1 --eval-batches 2 --eval-batch-size 16
          --gn-micro-batch 4)
    limit=540
fi
timeout "$limit" python3 -m eqx_gn study "${args[@]}" --out "$out" \
    --runs-dir "$out/runs" --report "$out/results.md" >"$out/study.log" 2>&1
code=$?
echo "study exit $code" | tee -a "$out/status.txt"
grep -v "^step " "$out/study.log" | tail -n 30
exit $code
