"""Processes and devices of a run: `jax.distributed`, the mesh, the layout of the
training state on it, and the checks that every batch splits evenly over it.

The mesh has two axes, ``data`` (``data_parallel`` devices) and ``fsdp``
(``fsdp`` devices). Every batch is split along its sequence axis over all of them
(``data`` x ``fsdp``). The training state (parameters, every optimizer's state,
GN's inner state) is sharded along ``fsdp`` by one rule, `StateLayout`: a
floating-point array is split along its largest dimension that ``fsdp`` divides
(the first of equal ones), and replicated when none does; integer arrays (step
counts, keys) and scalars are replicated. With ``fsdp = 1`` everything is
replicated: plain data parallelism. ``jax.jit`` with ``NamedSharding`` does the
rest (XLA gathers a sharded parameter where a computation needs it whole and
inserts the collectives). With ``distributed=True`` the run calls
``jax.distributed.initialize`` first, the mesh spans every process's devices, and
each process reads only its shard of every batch.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import ConfigError, setting
from ._config import TrainConfig

#: The mesh axis of data parallelism.
DATA_AXIS = "data"
#: The mesh axis the training state is sharded along.
FSDP_AXIS = "fsdp"
#: The mesh axes a batch is split over.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


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
    """The ``data`` x ``fsdp`` mesh of the run: ``data_parallel`` x ``fsdp``
    devices (all of them in a multi-process run, where ``data_parallel`` defaults
    to the device count over ``fsdp``)."""
    devices = jax.devices()
    fsdp = config.fsdp
    if config.data_parallel is not None:
        data = config.data_parallel
    elif jax.process_count() > 1:
        data = max(len(devices) // fsdp, 1)
    else:
        data = 1
    n = data * fsdp
    if n > len(devices):
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (
                f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                "before starting"
            )
        raise ConfigError(
            f"the mesh data={data},fsdp={fsdp} needs {n} devices but only "
            f"{len(devices)} {'is' if len(devices) == 1 else 'are'} visible "
            f"({jax.default_backend()} backend){hint}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(
            f"a multi-process run spans all {len(devices)} devices; got the mesh "
            f"data={data},fsdp={fsdp} ({n} devices)"
        )
    _check_divisible(config, n)
    grid = np.asarray(devices[:n]).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


class StateLayout(eqx.Module):
    """Where each array of the training state lives on the mesh (the module
    docstring's rule), and how many bytes of it the fullest device holds."""

    mesh: Mesh = eqx.field(static=True)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def sharding(self, shape: tuple[int, ...], dtype) -> NamedSharding:
        """The sharding of an array of this shape and dtype."""
        size = self.mesh.shape[FSDP_AXIS]
        if size == 1 or not jnp.issubdtype(dtype, jnp.inexact):
            return self.replicated
        divisible = [i for i, n in enumerate(shape) if n % size == 0]
        if not divisible:
            return self.replicated
        axis = max(divisible, key=lambda i: (shape[i], -i))
        spec = [None] * len(shape)
        spec[axis] = FSDP_AXIS
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def shardings(self, tree):
        """The sharding of every array (or ``jax.ShapeDtypeStruct``) leaf of
        ``tree``, ``None`` elsewhere."""

        def sharding(x):
            if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x):
                return self.sharding(x.shape, x.dtype)
            return None

        return jax.tree.map(sharding, tree)

    def constrain(self, tree):
        """``tree`` with every array constrained to its sharding (inside ``jit``)."""
        return jax.tree.map(
            lambda x: (
                jax.lax.with_sharding_constraint(x, self.sharding(x.shape, x.dtype))
                if eqx.is_array(x)
                else x
            ),
            tree,
        )

    def bytes_per_device(self, tree) -> int:
        """Bytes of ``tree``'s arrays on the fullest device."""
        total = 0
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
            shard = self.sharding(x.shape, x.dtype).shard_shape(x.shape)
            total += math.prod(shard) * x.dtype.itemsize
        return total


def _check_divisible(config: TrainConfig, devices: int) -> None:
    batch, accumulation = setting("batch_size"), setting("grad_accumulation")
    sizes = {
        batch: config.batch_size,
        setting("eval_batch_size"): config.eval_batch_size,
    }
    if config.grad_accumulation > 1:
        sizes[f"{batch} / {accumulation}"] = (
            config.batch_size // config.grad_accumulation
        )
    if config.is_gn:
        sizes[f"{batch} / {setting('micro_batches')}"] = config.micro_batch_size
        sizes[setting("ls_batch_size")] = config.line_search_batch_size
    for name, size in sizes.items():
        if size % devices:
            raise ConfigError(
                f"{name} ({size}) is not divisible by the {devices} devices of the "
                "mesh (data x fsdp)"
            )


def sync(name: str) -> None:
    """A barrier across processes (nothing in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
