"""How the tests have XLA compile: for compile time, not run time.

The suite's programs are small and run for a few steps, so on CPU almost all of
a test's time is XLA compiling them (80% of `test_gauss_newton.py`, measured
with JAX's compile-duration events). These settings cut that time without
changing what is computed (the tests still compare to their dense or
single-device references at the same tolerances):

- ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: LLVM at optimisation level 0 and no
  expensive passes;
- ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's older loop emitters, much
  cheaper to compile than the fusion emitters;
- ``--xla_cpu_parallel_codegen_split_count=1``: one code-generation thread; the
  test workers already keep both cores busy.

No JAX import here: ``conftest.py`` applies these before JAX initialises, and the
tests that start Python subprocesses hand them on with `subprocess_env`.
"""

import os

XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
ENVIRONMENT = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def subprocess_env(xla_flags: str = "", **changes: str) -> dict[str, str]:
    """This process's environment for a Python subprocess on the CPU: the compile
    settings above, then ``xla_flags`` (``""``: one device) and ``changes``."""
    return {
        **os.environ,
        **ENVIRONMENT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{XLA_FLAGS} {xla_flags}".strip(),
        **changes,
    }
