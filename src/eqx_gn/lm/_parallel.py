"""Processes and devices of a run: `jax.distributed`, the mesh, and the checks that
every batch splits evenly over it.

Parameters and optimizer state are replicated over a one-axis ``data`` mesh and
every batch is split over it along its sequence axis (``jax.jit`` with
``NamedSharding``; XLA inserts the collectives). With ``distributed=True`` the run
calls ``jax.distributed.initialize`` first, the mesh spans every process's devices,
and each process reads only its shard of every batch.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ._config import ConfigError, TrainConfig

#: The mesh axis batches are split over.
DATA_AXIS = "data"


def initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` with the run's settings (once per process)."""
    if jax.distributed.is_initialized():
        return
    # Collectives between CPU processes need gloo; GPU and TPU ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    except (RuntimeError, ValueError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"jax.distributed.initialize failed: {message}") from e


def make_mesh(config: TrainConfig) -> Mesh:
    """The ``data`` mesh of ``config.data_parallel`` devices (all of them in a
    multi-process run)."""
    devices = jax.devices()
    if config.data_parallel is None:
        n = len(devices) if jax.process_count() > 1 else 1
    else:
        n = config.data_parallel
    if n > len(devices):
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (
                f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                "before starting"
            )
        raise ConfigError(
            f"data_parallel={n} but only {len(devices)} devices are visible "
            f"({jax.default_backend()} backend){hint}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(
            f"a multi-process run shards data over all {len(devices)} devices; "
            f"got data_parallel={n}"
        )
    _check_divisible(config, n)
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def _check_divisible(config: TrainConfig, devices: int) -> None:
    sizes = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    if config.grad_accumulation > 1:
        sizes["batch_size / grad_accumulation"] = (
            config.batch_size // config.grad_accumulation
        )
    if config.is_gn:
        sizes["batch_size / micro_batches"] = config.micro_batch_size
        sizes["ls_batch_size"] = config.line_search_batch_size
    for name, size in sizes.items():
        if size % devices:
            raise ConfigError(
                f"{name}={size} is not divisible by the {devices} devices of the "
                "data mesh"
            )


def sync(name: str) -> None:
    """A barrier across processes (nothing in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
