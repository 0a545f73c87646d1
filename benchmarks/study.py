"""The study, now ``eqx-gn study`` (`eqx_gn.lm._study`): this script passes its
arguments on, so ``python benchmarks/study.py ARGS`` is ``eqx-gn study ARGS``.

The published study (docs/results.md) was made by::

    eqx-gn study --model tiny --seq-len 64 --batch-sizes 8,16,32,64,128 --steps 80 \\
        --runs 3 --seeds 3 --out benchmarks/results/study_tiny \\
        --runs-dir runs/study/tiny
    eqx-gn study --model prototype --seq-len 64 --batch-sizes 8,32 --steps 50 \\
        --runs 3 --seeds 3 --out benchmarks/results/study_prototype \\
        --runs-dir runs/study/prototype
    eqx-gn study --model tiny ... --report-only --report docs/results.md \\
        --report-with benchmarks/results/study_prototype
"""

import sys

from eqx_gn.lm._cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
