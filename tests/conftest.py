"""Test configuration: 8 simulated CPU devices, XLA compiling for compile time
(`compile_flags`), float64, loud rank promotion.

XLA_FLAGS must be set before JAX initialises its backend, so it is set here, at
import time of the first conftest, before any test module imports JAX.
"""

import gc
import os

import compile_flags

os.environ.update({**compile_flags.ENVIRONMENT, **os.environ})
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        compile_flags.XLA_FLAGS,
        "--xla_force_host_platform_device_count=8",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


def _memory_map_limit() -> int | None:
    """The kernel's limit on one process's memory mappings (Linux), else None."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _memory_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


_MAP_LIMIT = _memory_map_limit()


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Drop JAX's compiled executables once this process holds half the kernel's
    memory mappings.

    Each executable XLA compiles for the CPU keeps about three mappings (its code
    and data) for as long as a jit cache holds it, and one test worker compiles
    thousands over the suite: at ``vm.max_map_count`` (65530 by default) the next
    compilation cannot map its code and the worker dies of a segmentation fault
    inside ``backend_compile_and_load``, which is how CI failed. Clearing the caches
    unmaps them; the tests after it only compile again what they use.
    """
    yield
    if _MAP_LIMIT is not None and _memory_maps() > _MAP_LIMIT // 2:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One token cache per test module, shared by its runs."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    key = jax.random.key(0)

    def _getkey():
        nonlocal key
        key, sub = jax.random.split(key)
        return sub

    return _getkey
