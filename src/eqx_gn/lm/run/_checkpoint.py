"""Checkpoints of a training run with orbax-checkpoint, verified on restore.

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
  the byte length of the metrics file at that step, ...). Under the reserved key
  ``"_checkpoint"`` it also holds the checkpoint's *record*: the shape and dtype of
  every array, a SHA-256 digest of every array and of every iterator state, for
  every process, and a digest of the meta dictionary itself (the digests are
  described in `eqx_gn.lm.run._integrity`).

**Integrity.** ``save`` refuses a state with a non-finite floating-point leaf
(`CheckpointError`), so no checkpoint is ever written that a run could not
continue from. After writing, it reads the arrays back and checks their digests
(``verify_saves``). `Checkpointer.restore_latest` walks the checkpoints from the
newest to the oldest and takes the first whose meta, arrays and iterator states
all read back with the recorded digests and whose arrays are finite. Each damaged
checkpoint newer than that one (a truncated, garbled, missing or bit-flipped file)
gives one `CheckpointWarning` line naming it and is moved aside to
``<directory>/damaged-<step>``, so nothing is deleted and the step numbering of
the resumed run stays consistent.

**Pruning.** Orbax's own pruning is off; after each save the checkpointer keeps
the newest ``max_to_keep`` checkpoints and, always, the newest verified one (the
one restored from, or the newest save that read back intact).

Saves are synchronous and atomic (orbax writes to a temporary directory and renames
it), so a run killed at any moment leaves only complete checkpoints behind.
"""

import contextlib
import errno
import gc
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import equinox as eqx
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from .._errors import setting
from ._integrity import (
    KIND_NAMES,
    digest_table,
    everywhere,
    iterator_digest,
    leaf_digest,
    make_record,
    meta_digest,
    silence_failed_reads,
    sync,
)

_STATE = "state"
_META = "meta"
_RECORD = "_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or that no run can continue from."""


class NoSpaceError(CheckpointError):
    """A checkpoint that did not fit on its device (nothing of it is left)."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped (one line naming it and what is wrong)."""


class _Damaged(Exception):
    """Internal: the checkpoint being read is damaged (the message says how)."""


def _abstract(leaf: jax.Array | jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].split(". See full")[0] if lines else ""
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read(what: str, read: Callable[[], Any]) -> Any:
    """``read()``, or `_Damaged` saying what could not be read and why."""
    try:
        return read()
    except Exception as error:
        # When one array fails, orbax abandons the other reads of the same item.
        silence_failed_reads()
        reason = f"{what}: {_short(error)}"
    gc.collect()
    raise _Damaged(reason)


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an error it came from) is a full device: ENOSPC, as
    Python's ``OSError`` or as tensorstore's ``RESOURCE_EXHAUSTED`` message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


@contextlib.contextmanager
def _quiet_writers():
    """Orbax's writer threads log each failed write at ERROR level; the failure
    itself reaches the caller, which says it in one line."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(previous)


def _warn(message: str) -> None:
    # One line on stderr (no source line under it), filterable by category.
    warnings.warn_explicit(
        message, CheckpointWarning, "eqx_gn.lm", 0, module="eqx_gn.lm.run._checkpoint"
    )


class Checkpointer:
    """An orbax ``CheckpointManager`` for training runs (see the module docstring).

    **Arguments:**

    - ``directory``: where the numbered checkpoint directories go.
    - ``max_to_keep``: how many of the latest checkpoints to keep (``None``: all);
      the newest verified checkpoint is kept in any case.
    - ``verify_saves``: read each saved checkpoint's arrays back and check their
      digests before pruning older checkpoints.
    - ``read_only``: only read (another run's checkpoints): nothing is created,
      cleaned up or saved.

    Every process of a multi-process run must create it and call ``save``,
    ``restore`` and ``restore_latest`` together.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 2,
        verify_saves: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.verify_saves = verify_saves
        # The newest checkpoint known to read back intact; pruning never deletes it.
        self.verified_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            create=not read_only,
            enable_async_checkpointing=False,
            # Another run's directory (read_only) may hold its save in progress.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    # -- saving -----------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree[jax.Array],
        iterators: Mapping[str, grain.DatasetIterator],
        meta: Mapping[str, Any],
    ) -> None:
        """Save the array leaves of ``state``, the iterators' positions and ``meta``.

        Raises `CheckpointError` (one line, naming the leaf) if a floating-point
        leaf of ``state`` is not finite on any process; nothing is written then.
        If the saved arrays do not read back with their digests, the checkpoint is
        moved aside with a `CheckpointWarning` and no older checkpoint is pruned.
        """
        if _RECORD in meta:
            raise ValueError(f"meta must not use the reserved key {_RECORD!r}")
        with_paths, _ = jax.tree_util.tree_flatten_with_path(state)
        paths = [jax.tree_util.keystr(p) for p, _ in with_paths]
        leaves = [leaf for _, leaf in with_paths]
        table = digest_table(leaves, iterators.values())
        for i in range(len(leaves)):
            if not table[:, i, 1].all():
                leaf = leaves[i]
                raise CheckpointError(
                    f"refusing to checkpoint step {step} in {self.directory}: state "
                    f"leaf {i} ({paths[i] or 'root'}, {leaf.dtype}"
                    f"{list(leaf.shape)}) is not finite"
                )
        plain = json.loads(json.dumps(dict(meta)))
        record = make_record(leaves, table, list(iterators), plain)
        items = {
            _STATE: ocp.args.StandardSave(leaves),
            _META: ocp.args.JsonSave({**plain, _RECORD: record}),
        }
        for name, iterator in iterators.items():
            items[name] = grain.checkpoint.CheckpointSave(iterator)
        try:
            with _quiet_writers():
                self._manager.save(step, args=ocp.args.Composite(**items), force=True)
                self._manager.wait_until_finished()
        except Exception as error:
            if not _no_space(error):
                raise
            self._no_space(step, leaves)
        if self.verify_saves:
            try:
                reason = None
                self._load_arrays(step, lambda meta: leaves)
            except _Damaged as error:
                reason = str(error)
            if not everywhere(reason is None):
                aside = self._move_aside([step])[0]
                _warn(
                    f"checkpoint step {step} in {self.directory} did not read back "
                    f"intact ({reason or 'on another process'}); moved to {aside}"
                )
                return
            self.verified_step = step
        self._prune()

    def _no_space(self, step: int, leaves: Sequence[jax.Array]) -> NoReturn:
        """Remove what the failed save of ``step`` left, then raise `NoSpaceError`
        naming the space it needs and the last good checkpoint."""
        sync("eqx_gn_checkpoint_no_space")
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        sync("eqx_gn_checkpoint_no_space_done")
        self._manager.reload()
        last = self.latest_step()
        kept = (
            f"the last good checkpoint, step {last}, is untouched"
            if last is not None
            else "no checkpoint was written before"
        )
        need = sum(leaf.nbytes for leaf in leaves)
        free = shutil.disk_usage(self.directory).free
        raise NoSpaceError(
            f"no space left on the device of {self.directory} to write checkpoint "
            f"step {step} (it needs about {_megabytes(need)}, {_megabytes(free)} "
            f"free); {kept}; free space and continue with {setting('resume', True)}"
        )

    def _prune(self) -> None:
        if self.max_to_keep is None:
            return
        steps = self.all_steps()
        keep = set(steps[-self.max_to_keep :])
        if self.verified_step is not None:
            keep.add(self.verified_step)
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def _move_aside(self, steps: Sequence[int]) -> list[Path]:
        """Rename the checkpoints at ``steps`` to ``damaged-<step>`` (a free name)."""
        targets = []
        for step in steps:
            target = self.directory / f"damaged-{step}"
            k = 1
            while target.exists():
                k += 1
                target = self.directory / f"damaged-{step}.{k}"
            targets.append(target)
        sync("eqx_gn_checkpoint_aside_start")
        if jax.process_index() == 0:
            for step, target in zip(steps, targets, strict=True):
                (self.directory / str(step)).rename(target)
        sync("eqx_gn_checkpoint_aside_done")
        self._manager.reload()
        return targets

    # -- restoring --------------------------------------------------------

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` dictionary of the checkpoint at ``step`` (not verified)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        meta = dict(restored[_META])
        meta.pop(_RECORD, None)
        return meta

    def _load_meta(self, step: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(meta, record)`` at ``step``; the record is ``None`` for a checkpoint
        written before records existed."""
        restored = _read(
            "meta unreadable",
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            ),
        )
        try:
            meta = dict(restored[_META])
        except Exception:
            raise _Damaged("meta unreadable") from None
        record = meta.pop(_RECORD, None)
        if record is None:
            return meta, None
        try:
            good = record["meta_digest"] == meta_digest(meta, record)
        except Exception:
            good = False
        if not good:
            raise _Damaged("meta digest mismatch")
        return meta, record

    def _check_structure(
        self,
        step: int,
        shapes: Sequence[tuple[Sequence[int], Any]],
        leaves: Sequence[Any],
    ) -> None:
        """A ``ValueError`` if the saved arrays do not fit this run's state (a
        different model or optimizer): not damage, so no older checkpoint is tried."""
        if len(shapes) != len(leaves):
            raise CheckpointError(
                f"Checkpoint at step {step} in {self.directory} holds {len(shapes)} "
                f"arrays, but this run's state has {len(leaves)}: it was written by "
                "a different model or optimizer."
            )
        for i, ((shape, dtype), new) in enumerate(zip(shapes, leaves, strict=True)):
            if tuple(shape) != tuple(new.shape) or np.dtype(dtype) != new.dtype:
                raise CheckpointError(
                    f"Checkpoint at step {step} in {self.directory}: array {i} is "
                    f"{np.dtype(dtype)}{list(shape)}, this run expects "
                    f"{new.dtype}{list(new.shape)}."
                )

    def _load_arrays(
        self, step: int, template: Callable[[dict[str, Any]], PyTree[jax.Array]]
    ) -> tuple[dict[str, Any], dict[str, Any] | None, PyTree[jax.Array]]:
        """``(meta, record, state)`` at ``step``, the state restored onto the
        structure and shardings of ``template(meta)`` and checked against the
        record; `_Damaged` if it is not intact."""
        meta, record = self._load_meta(step)
        leaves, treedef = jax.tree.flatten(template(meta))
        if record is not None:
            try:
                shapes = [(x["shape"], x["dtype"]) for x in record["leaves"]]
                mine = record["digests"][jax.process_index()]
            except Exception:
                raise _Damaged("meta record unreadable") from None
            self._check_structure(step, shapes, leaves)
        target = [_abstract(x) for x in leaves]
        restored = _read(
            "arrays unreadable",
            lambda: self._manager.restore(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}),
            ),
        )
        saved = list(restored[_STATE])
        if record is None:
            self._check_structure(step, [(x.shape, x.dtype) for x in saved], leaves)
        for i, array in enumerate(saved):
            kind, digest, finite = leaf_digest(array)
            # A digest of another kind (shards against whole array) comes from a
            # different process layout and cannot be compared.
            found = f"{KIND_NAMES[kind]}:{digest.hex()}"
            same_kind = record is not None and mine[i].split(":")[0] == KIND_NAMES[kind]
            if same_kind and mine[i] != found:
                raise _Damaged(f"digest mismatch in array {i}")
            if not finite:
                raise _Damaged(f"array {i} is not finite")
        return meta, record, jax.tree.unflatten(treedef, saved)

    def _load_iterators(
        self,
        step: int,
        iterators: Mapping[str, grain.DatasetIterator],
        record: Mapping[str, Any] | None,
    ) -> None:
        """Move ``iterators`` to their positions at ``step``; on damage put them back
        where they were and raise `_Damaged`."""
        if not iterators:
            return
        before = {name: it.get_state() for name, it in iterators.items()}
        try:
            items = {
                name: grain.checkpoint.CheckpointRestore(it)
                for name, it in iterators.items()
            }
            _read(
                "iterator state unreadable",
                lambda: self._manager.restore(step, args=ocp.args.Composite(**items)),
            )
            if record is not None:
                for name, it in iterators.items():
                    try:
                        expected = record["iterators"][name][jax.process_index()]
                    except Exception:
                        raise _Damaged(f"no digest of iterator {name!r}") from None
                    if iterator_digest(it).hex() != expected:
                        raise _Damaged(f"digest mismatch in iterator {name!r}")
        except _Damaged:
            self._rewind(iterators, before)
            raise

    @staticmethod
    def _rewind(
        iterators: Mapping[str, grain.DatasetIterator], states: Mapping[str, Any]
    ) -> None:
        for name, it in iterators.items():
            it.set_state(states[name])

    def _load(
        self,
        step: int,
        template: Callable[[dict[str, Any]], PyTree[jax.Array]],
        iterators: Mapping[str, grain.DatasetIterator],
    ) -> tuple[dict[str, Any], PyTree[jax.Array]]:
        """Meta and state at ``step``, iterators moved there, all verified on every
        process; else `_Damaged` with the iterators untouched."""
        reason = None
        try:
            meta, record, state = self._load_arrays(step, template)
        except _Damaged as error:
            reason = str(error)
        if not everywhere(reason is None):
            raise _Damaged(reason or "damaged on another process")
        before = {name: it.get_state() for name, it in iterators.items()}
        try:
            self._load_iterators(step, iterators, record)
        except _Damaged as error:
            reason = str(error)
        if not everywhere(reason is None):
            if reason is None:
                self._rewind(iterators, before)
            raise _Damaged(reason or "damaged on another process")
        return meta, state

    def restore(
        self,
        step: int,
        template: PyTree[jax.Array],
        iterators: Mapping[str, grain.DatasetIterator],
    ) -> PyTree[jax.Array]:
        """The state saved at ``step``, shaped and sharded like ``template``.

        The ``iterators`` (built as for the saved run) are moved in place to where
        the saved ones were. Raises `CheckpointError` (one line) if the checkpoint
        is damaged or does not fit ``template``.
        """
        try:
            _, state = self._load(step, lambda meta: template, iterators)
        except _Damaged as error:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is damaged ({error})"
            ) from None
        return state

    def restore_latest(
        self,
        template: PyTree[jax.Array] | Callable[[dict[str, Any]], PyTree[jax.Array]],
        iterators: Mapping[str, grain.DatasetIterator],
    ) -> tuple[int, dict[str, Any], PyTree[jax.Array]] | None:
        """``(step, meta, state)`` of the newest intact checkpoint, or ``None`` if
        there is no checkpoint at all.

        The state is shaped and sharded like ``template``, or, when ``template``
        is a function (not an equinox Module), like ``template(meta)`` for the
        verified ``meta`` of the checkpoint being read: for a state whose shape
        depends on what the meta says (a run's phase). The ``iterators`` are moved
        in place to the positions saved with it (and left untouched by the damaged
        checkpoints tried before). Each damaged checkpoint newer than it gives one
        `CheckpointWarning` line::

            checkpoint step 40 in /x/checkpoints is damaged (digest mismatch in
            array 3); moved to /x/checkpoints/damaged-40; resuming from step 20

        and is moved aside, so the run's next saves carry on from the step resumed
        from. Raises `CheckpointError` (one line, checkpoints left in place) if
        there are checkpoints but none is intact, or if they do not fit
        ``template`` (a different model or optimizer).
        """
        if callable(template) and not isinstance(template, eqx.Module):
            template_for = template
        else:
            template_for = lambda meta: template  # noqa: E731
        steps = sorted(self.all_steps(), reverse=True)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            try:
                meta, state = self._load(step, template_for, iterators)
            except _Damaged as error:
                damaged.append((step, str(error)))
                continue
            targets = self._move_aside([s for s, _ in damaged]) if damaged else []
            for (bad, reason), target in zip(damaged, targets, strict=True):
                _warn(
                    f"checkpoint step {bad} in {self.directory} is damaged "
                    f"({reason}); moved to {target}; resuming from step {step}"
                )
            self.verified_step = step
            return step, meta, state
        if damaged:
            reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} to resume from ({reasons})"
            )
        return None

    def restore_start(self, params: PyTree[jax.Array]) -> tuple[int, PyTree[jax.Array]]:
        """``(step, params)``: the parameters of the newest intact checkpoint, for a
        new run that starts from them (``TrainConfig.init_from``).

        A run's state begins with its model's parameters; they are restored shaped
        and sharded like ``params``, the rest of the state (the optimizer's, the
        key) is read only to verify the checkpoint. Damaged checkpoints are skipped
        (left in place). Raises `CheckpointError` (one line) if there is no
        checkpoint, none is intact, or the saved parameters do not fit ``params``
        (another model)."""
        own, treedef = jax.tree.flatten(params)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        damaged: list[str] = []
        for step in sorted(self.all_steps(), reverse=True):
            reason = None
            try:
                _, record = self._load_meta(step)
                if record is None:
                    saved = self._manager.item_metadata(step)[_STATE]
                    shapes = [(m.shape, m.dtype) for m in saved]
                else:
                    shapes = [(x["shape"], x["dtype"]) for x in record["leaves"]]
            except Exception as error:  # any unreadable record: damage
                reason = str(error) if isinstance(error, _Damaged) else "unreadable"
            if reason is None:
                self._check_start(step, shapes, own)
                rest = [
                    jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=device)
                    for shape, dtype in shapes[len(own) :]
                ]
                try:
                    _, _, state = self._load_arrays(
                        step, lambda meta, rest=rest: [*own, *rest]
                    )
                except _Damaged as error:
                    reason = str(error)
            if not everywhere(reason is None):
                damaged.append(f"step {step}: {reason or 'damaged on another process'}")
                continue
            return step, jax.tree.unflatten(treedef, state[: len(own)])
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({'; '.join(damaged)})"
            )
        raise CheckpointError(f"no checkpoint in {self.directory}")

    def _check_start(
        self, step: int, shapes: Sequence[tuple[Sequence[int], Any]], own: list
    ) -> None:
        """A `CheckpointError` if the first saved arrays are not parameters of
        the shapes and dtypes of ``own``."""
        if len(shapes) < len(own):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds {len(shapes)} "
                f"arrays, fewer than this run's {len(own)} parameters: it was written "
                "by a different model"
            )
        for i, ((shape, dtype), new) in enumerate(zip(shapes, own, strict=False)):
            if tuple(shape) != tuple(new.shape) or np.dtype(dtype) != new.dtype:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was written by a "
                    f"different model: its parameter {i} is "
                    f"{np.dtype(dtype)}{list(shape)}, this run's is "
                    f"{new.dtype}{list(new.shape)}"
                )

    def restore_arrays(self, step: int | None = None) -> list[np.ndarray]:
        """The state's arrays saved at ``step`` (default: the latest) as NumPy
        arrays, in leaf order: for inspecting and comparing runs. Works whatever
        devices and processes wrote the checkpoint. Not verified."""
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
