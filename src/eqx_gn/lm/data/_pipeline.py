"""grain pipelines of token windows, and the global batches a step reads.

**Batch order and sharding.** With ``shuffle=True`` the windows are shuffled by
a permutation that depends on ``seed`` and the epoch (grain's index shuffle),
then read as one endless stream (``num_epochs=None``). Global batch ``t`` is
rows ``[t B, (t + 1) B)`` of that stream. Process ``p`` of ``P`` reads only rows
``[t B + p B/P, t B + (p + 1) B/P)``, so concatenating the per-process batches
in process order gives the global batch: the layout that
`jax.make_array_from_process_local_data` assembles for a batch axis sharded
over a mesh whose devices are in process order.
"""

import mmap
from typing import Any, final

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Int32, Integer


@final
class TokenWindows:
    """A grain random-access source: window ``i`` is
    ``tokens[i * stride : i * stride + seq_len + 1]`` as int32.

    A memmap is pickled by file name (not by content), so the source is cheap
    to send to grain worker processes.
    """

    def __init__(
        self, tokens: Integer[np.ndarray, " n"], seq_len: int, stride: int | None = None
    ):
        stride = seq_len if stride is None else stride
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len < 1 or stride < 1:
            raise ValueError(
                f"seq_len and stride must be >= 1, got {seq_len}, {stride}"
            )
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"Token array of {len(tokens)} tokens is too short for seq_len="
                f"{seq_len}: a window needs seq_len + 1 = {seq_len + 1} tokens"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> Int32[np.ndarray, " seq_len_plus_1"]:
        start = index * self.stride
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:
        return (
            f"TokenWindows(n_tokens={len(self.tokens)}, seq_len={self.seq_len}, "
            f"stride={self.stride})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        tokens = self.tokens
        # Only a whole-file memmap: a slice of one keeps its parent's offset.
        if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap):
            state["tokens"] = ("memmap", tokens.filename, tokens.offset, tokens.dtype)
            state["_shape"] = tokens.shape
        return state

    def __setstate__(self, state: dict[str, Any]):
        tokens = state["tokens"]
        if isinstance(tokens, tuple):
            _, filename, offset, dtype = tokens
            shape = state.pop("_shape")
            state["tokens"] = np.memmap(
                filename, dtype=dtype, mode="r", offset=offset, shape=shape
            )
        self.__dict__.update(state)


def window_dataset(
    tokens: Integer[np.ndarray, " n"],
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    stride: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """This process's batches as a `grain.MapDataset` (random access, lazy).

    Element ``t`` is process ``process_index``'s rows of global batch ``t``, an
    int32 array of shape ``(batch_size // process_count, seq_len + 1)``; windows
    start every ``stride`` tokens (default ``seq_len``: non-overlapping). With
    ``shuffle`` the window order is a permutation seeded by ``seed`` and
    reshuffled each epoch; ``num_epochs=None`` repeats forever, otherwise the
    last partial global batch is dropped. See the module docstring for the
    order of rows across processes.

    **Raises:** `ValueError` if ``batch_size`` is not a multiple of
    ``process_count``, or ``tokens`` holds fewer than ``batch_size`` windows.
    """
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need batch_size >= 1 and 0 <= process_index < process_count, got "
            f"{batch_size=}, {process_index=}, {process_count=}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    source = TokenWindows(tokens, seq_len, stride)
    if len(source) < batch_size:
        raise ValueError(
            f"Token array of {len(tokens)} tokens has only {len(source)} windows of "
            f"seq_len + 1 = {seq_len + 1} tokens (stride {source.stride}), fewer than "
            f"batch_size={batch_size}; use more text or a smaller seq_len/batch_size"
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    # Chunks of `local` consecutive rows; global batch t is chunks
    # t*P .. t*P + P - 1, and process p takes chunk t*P + p.
    local = batch_size // process_count
    ds = ds.batch(local, drop_remainder=True)
    if num_epochs is not None:
        ds = ds[: len(ds) // process_count * process_count]
    return ds[process_index::process_count]


def batch_iterator(
    tokens: Integer[np.ndarray, " n"],
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    stride: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator over `window_dataset` (same arguments).

    Each ``next()`` is an int32 array ``(batch_size // process_count, seq_len +
    1)``; `inputs_and_targets` splits it. ``it.get_state()`` is a small dict;
    ``set_state`` on a fresh iterator built with the same arguments continues
    with exactly the next batch. ``read_options`` default to 2 threads and a
    prefetch buffer of 16 batches.
    """
    ds = window_dataset(
        tokens,
        batch_size,
        seq_len,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        stride=stride,
        shuffle=shuffle,
        num_epochs=num_epochs,
    )
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
    return iter(ds.to_iter_dataset(read_options))


def inputs_and_targets(
    batch: Integer[np.ndarray | jax.Array, "*batch seq_len_plus_1"],
) -> tuple[
    Integer[np.ndarray | jax.Array, "*batch seq_len"],
    Integer[np.ndarray | jax.Array, "*batch seq_len"],
]:
    """``(batch[..., :-1], batch[..., 1:])``: next-token inputs and targets, for a
    batch of windows or a stack of them."""
    return batch[..., :-1], batch[..., 1:]


class GlobalBatches:
    """Assembles each process's rows of a batch into one global `jax.Array`.

    Rows are sharded over ``batch_axes`` of ``mesh`` (the mesh's devices in process
    order, see the module docstring); everything else is replicated.

    - `flat`: a step's batch, ``(batch_size, seq_len + 1)``.
    - `stacked`: the same rows as ``count`` micro-batches, ``(count, batch_size /
      count, seq_len + 1)``; row ``r`` of the global batch goes to micro-batch ``r mod
      count``, a layout that does not depend on how many processes read the data.
    - `fixed`: batches read once and stacked (the validation batches).
    """

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        batch_axes: str | tuple[str, ...],
        *,
        process_count: int = 1,
    ):
        self.mesh = mesh
        self.batch_axes = batch_axes
        self.process_count = process_count

    def _global(self, local: np.ndarray, spec: PartitionSpec, shape) -> jax.Array:
        return jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, spec), np.ascontiguousarray(local), shape
        )

    def flat(self, local: Integer[np.ndarray, "rows window"]) -> jax.Array:
        """``(batch_size, seq_len + 1)`` from this process's rows."""
        rows, window = local.shape
        shape = (rows * self.process_count, window)
        return self._global(local, PartitionSpec(self.batch_axes, None), shape)

    def stacked(
        self, local: Integer[np.ndarray, "rows window"], count: int
    ) -> jax.Array:
        """``(count, batch_size / count, seq_len + 1)`` from this process's rows."""
        # Each process holds a contiguous block of rows whose length is a multiple of
        # count, so its share of every micro-batch is a contiguous block too, and
        # processes are in mesh order.
        rows, window = local.shape
        if rows % count:
            raise ValueError(
                f"{rows} rows per process do not split into {count} micro-batches"
            )
        stacked = local.reshape(rows // count, count, window).transpose(1, 0, 2)
        shape = (count, rows * self.process_count // count, window)
        return self._global(stacked, PartitionSpec(None, self.batch_axes, None), shape)

    def fixed(self, iterator, count: int) -> jax.Array:
        """``count`` batches read from ``iterator``, stacked: ``(count, batch_size,
        seq_len + 1)``."""
        local = np.stack([next(iterator) for _ in range(count)])
        _, rows, window = local.shape
        shape = (count, rows * self.process_count, window)
        return self._global(local, PartitionSpec(None, self.batch_axes, None), shape)
