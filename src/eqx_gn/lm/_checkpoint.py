"""Checkpoints of a training run with orbax-checkpoint.

A checkpoint at step ``t`` holds everything a run needs to continue exactly as if
it had never stopped:

- ``state``: the array leaves of the training state (model parameters, optimizer
  state, PRNG key data), saved as a flat list and restored onto the shardings of a
  template built by the caller, so optax's nested NamedTuple states never meet
  orbax's tree handling;
- one item per grain iterator (the training batches and the line-search batches):
  each process writes its own iterator state, so a multi-process run restores each
  process's position in its own shard of the data;
- ``meta``: a JSON dictionary written by the primary process (the step, counters,
  the byte length of the metrics file at that step, ...).

Saves are synchronous and atomic (orbax writes to a temporary directory and renames
it), so a run killed at any moment leaves only complete checkpoints behind.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

_STATE = "state"
_META = "meta"


def _abstract(leaf: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


class Checkpointer:
    """An orbax ``CheckpointManager`` for training runs (see the module docstring).

    **Arguments:**

    - ``directory``: where the numbered checkpoint directories go.
    - ``max_to_keep``: how many of the latest checkpoints to keep.

    Every process of a multi-process run must create it and call ``save`` and
    ``restore`` together.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: PyTree[jax.Array],
        iterators: Mapping[str, grain.DatasetIterator],
        meta: Mapping[str, Any],
    ) -> None:
        """Save the array leaves of ``state``, the iterators' positions and ``meta``."""
        items = {
            _STATE: ocp.args.StandardSave(jax.tree.leaves(state)),
            _META: ocp.args.JsonSave(dict(meta)),
        }
        for name, iterator in iterators.items():
            items[name] = grain.checkpoint.CheckpointSave(iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` dictionary of the checkpoint at ``step``."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(restored[_META])

    def restore(
        self,
        step: int,
        template: PyTree[jax.Array],
        iterators: Mapping[str, grain.DatasetIterator],
    ) -> PyTree[jax.Array]:
        """The state saved at ``step``, shaped and sharded like ``template``.

        The ``iterators`` (built as for the saved run) are moved in place to where
        the saved ones were.
        """
        leaves, treedef = jax.tree.flatten(template)
        items = {_STATE: ocp.args.StandardRestore([_abstract(x) for x in leaves])}
        for name, iterator in iterators.items():
            items[name] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        saved = list(restored[_STATE])
        if len(saved) != len(leaves):
            raise ValueError(
                f"Checkpoint at step {step} in {self.directory} holds {len(saved)} "
                f"arrays, but this run's state has {len(leaves)}: it was written by "
                "a different model or optimizer."
            )
        for i, (old, new) in enumerate(zip(saved, leaves, strict=True)):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise ValueError(
                    f"Checkpoint at step {step} in {self.directory}: array {i} is "
                    f"{old.dtype}{list(old.shape)}, this run expects "
                    f"{new.dtype}{list(new.shape)}."
                )
        return jax.tree.unflatten(treedef, saved)

    def restore_arrays(self, step: int | None = None) -> list[np.ndarray]:
        """The state's arrays saved at ``step`` (default: the latest) as NumPy
        arrays, in leaf order: for inspecting and comparing runs. Works whatever
        devices and processes wrote the checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        reader = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={_STATE: ocp.StandardCheckpointHandler()},
        )
        try:
            metadata = reader.item_metadata(step)[_STATE]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = [
                jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                for m in metadata
            ]
            restored = reader.restore(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}),
            )
        finally:
            reader.close()
        return [np.asarray(x) for x in restored[_STATE]]

    def close(self) -> None:
        self._manager.close()
