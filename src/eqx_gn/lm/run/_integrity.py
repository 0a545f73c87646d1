"""The integrity record of a checkpoint: digests of its arrays, iterator states and
meta, whether its arrays are finite, agreed across the processes of a run.

An array's digest covers its dtype, shape and bytes. Where the array is fully
addressable (a single-process run, or a replicated state) it is the digest of the
whole array, the same on every process; otherwise each process digests the
distinct shards it holds (with their positions), and the record keeps one digest
per process.

A failed orbax read leaves debris that the garbage collector would print later
with long tracebacks; `silence_failed_reads` drops it (and nothing else).
"""

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

#: The version of the record's layout.
VERSION = 1
_FULL, _SHARDS = 1, 2
#: The kinds of array digest: of the whole array, or of the shards a process holds.
KIND_NAMES = {_FULL: "full", _SHARDS: "shards"}


def _is_float(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def _hash_array(h: Any, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    h.update(f"{value.dtype.name}|{list(value.shape)}|".encode())
    h.update(value.tobytes())


def leaf_digest(leaf: Any) -> tuple[int, bytes, bool]:
    """``(kind, sha256 digest, all finite)`` of one array, from what this process
    holds: the whole array if it is fully addressable, else its distinct shards."""
    h = hashlib.sha256()
    finite = True
    if getattr(leaf, "is_fully_addressable", True):
        value = np.asarray(leaf)
        _hash_array(h, value)
        if _is_float(value.dtype):
            finite = bool(np.isfinite(value).all())
        return _FULL, h.digest(), finite
    shards = {}
    for shard in leaf.addressable_shards:
        index = tuple(
            (s.start or 0, n if s.stop is None else s.stop)
            for s, n in zip(shard.index, leaf.shape, strict=True)
        )
        shards.setdefault(index, shard)
    h.update(f"{leaf.dtype}|{list(leaf.shape)}|".encode())
    for index in sorted(shards):
        value = np.asarray(shards[index].data)
        h.update(repr(index).encode())
        _hash_array(h, value)
        if _is_float(value.dtype):
            finite = finite and bool(np.isfinite(value).all())
    return _SHARDS, h.digest(), finite


def iterator_digest(iterator: grain.DatasetIterator) -> bytes:
    state = json.dumps(iterator.get_state(), sort_keys=True)
    return hashlib.sha256(state.encode()).digest()


def meta_digest(meta: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "meta_digest"}
    text = json.dumps({"meta": meta, "record": body}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def digest_table(
    leaves: Sequence[Any], iterators: Iterable[grain.DatasetIterator]
) -> np.ndarray:
    """``uint8[process, row, 34]``: on each process, a row ``[kind, all finite,
    *sha256 digest]`` per leaf (`leaf_digest`), then ``[0, 1, *digest]`` per
    iterator (`iterator_digest`)."""
    local = [leaf_digest(leaf) for leaf in leaves]
    local_iterators = [iterator_digest(it) for it in iterators]
    rows = [[kind, int(finite), *digest] for kind, digest, finite in local]
    rows += [[0, 1, *digest] for digest in local_iterators]
    return gather(np.array(rows, dtype=np.uint8).reshape(len(rows), 34))


def make_record(
    leaves: Sequence[Any],
    table: np.ndarray,
    iterators: Sequence[str],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """The record of a checkpoint of ``leaves`` and the named ``iterators`` (their
    `digest_table` is ``table``) with the JSON dictionary ``meta``: the shape and
    dtype of every array, the digests of every process, and the meta's digest."""
    n = len(leaves)
    record: dict[str, Any] = {
        "version": VERSION,
        "leaves": [
            {"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for leaf in leaves
        ],
        "digests": [
            [f"{KIND_NAMES[int(r[0])]}:{bytes(r[2:]).hex()}" for r in table[p, :n]]
            for p in range(table.shape[0])
        ],
        "iterators": {
            name: [bytes(table[p, n + j, 2:]).hex() for p in range(table.shape[0])]
            for j, name in enumerate(iterators)
        },
    }
    record["meta_digest"] = meta_digest(meta, record)
    return record


def gather(local: np.ndarray) -> np.ndarray:
    """``local`` of every process, stacked along a new leading axis."""
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process."""
    return bool(gather(np.array([ok], dtype=np.uint8)).all())


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _left_by_a_failed_read(unraisable: Any) -> bool:
    """Whether an unraisable exception is the debris of an abandoned orbax read:
    one of its read coroutines closed by the garbage collector, or a TensorStore
    callback finding orbax's event loop closed."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return "orbax" in code.co_filename
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (
        unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None
        and "asyncio" in tb.tb_frame.f_code.co_filename
    )


def silence_failed_reads() -> None:
    """From now on, drop the debris of abandoned orbax reads (which the garbage
    collector would print with long tracebacks, at any later time); every other
    unraisable exception goes to the hook in place before."""
    if getattr(sys.unraisablehook, "_eqx_gn_checkpoint", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _left_by_a_failed_read(unraisable):
            previous(unraisable)

    hook._eqx_gn_checkpoint = True  # pyright: ignore[reportFunctionMemberAccess]
    sys.unraisablehook = hook
