"""The study, now ``eqx-gn study`` (`eqx_gn.lm.study`): this script passes its
arguments on, so ``python benchmarks/study.py ARGS`` is ``eqx-gn study ARGS``.

The second edition's ``tiny`` study (its protocol: ``eqx-gn study --help``)::

    eqx-gn study --model tiny --batch-sizes 8,16,32,64,128,256 --steps 160 \\
        --seeds 3 --timing-rounds 3 --out benchmarks/results/study2_tiny

The first edition (docs/results.md until the second is finished; study.json
format "eqx-gn study 2", which this eqx-gn no longer trains or reports) was made
with ``--runs 3 --seeds 3`` into ``benchmarks/results/study_tiny`` and
``benchmarks/results/study_prototype``.
"""

import sys

from eqx_gn.lm._cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
