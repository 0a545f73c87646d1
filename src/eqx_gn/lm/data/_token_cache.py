"""Token files: tokenizers and packed token arrays, cached on disk.

**Cache layout** (``cache_dir`` argument, else ``$EQX_GN_CACHE``, else
``~/.cache/eqx_gn``); every file is written to a temporary name and renamed, so
processes sharing the directory never see a partial file::

    <cache>/tokenizers/bpe<V>-<hash16>.json
        a trained BPE tokenizer; hash16 = corpus_hash of its training documents
    <cache>/tokens/<hash16>/<tokenizer.name>/<split>-val<fraction>-seed<seed>.npy
        packed tokens of one split (uint16 when vocab_size <= 65536, else int32);
        hash16 = corpus_hash of the whole corpus
    <cache>/tokens/by-files/<key16>-<tokenizer>-val<fraction>-seed<seed>.json
        the index of a streamed corpus: its corpus_hash and tokenizer name, keyed
        by its files (paths, sizes, modification times) and text field; written
        last, so a corpus is read again only when a file changes
"""

import functools
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tokenizers
from jaxtyping import Integer

from ._corpus import (
    PathLike,
    corpus_files,
    corpus_hash,
    iter_documents,
    load_corpus,
    split_documents,
    validation_mask,
)
from ._tokenizers import (
    BPE_EOS_TOKEN,
    AbstractTokenizer,
    BPETokenizer,
    ByteTokenizer,
    FileTokenizer,
)

#: Environment variable naming the cache directory.
CACHE_ENV_VAR = "EQX_GN_CACHE"


def default_cache_dir() -> Path:
    """``$EQX_GN_CACHE`` if set, else ``~/.cache/eqx_gn``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/eqx_gn").expanduser()


def _cache_root(cache_dir: PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def make_tokenizer(
    kind: Literal["byte", "bpe"] | PathLike = "byte",
    documents: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: PathLike | None = None,
) -> AbstractTokenizer:
    """A tokenizer: ``"byte"`` (vocab 257), ``"bpe"`` trained on ``documents``, or
    the path of a Hugging Face ``tokenizer.json`` (`FileTokenizer`: its vocabulary
    and end-of-document token come from the file).

    A BPE tokenizer is cached at ``<cache>/tokenizers/bpe<V>-<hash16>.json``,
    keyed by ``vocab_size`` and the `corpus_hash` of ``documents``; later calls
    load it instead of training. ``vocab_size`` counts EOS.
    """
    if kind == "byte":
        if vocab_size not in (None, 257):
            raise ValueError(f"The byte tokenizer has vocab_size 257, got {vocab_size}")
        return ByteTokenizer()
    if kind != "bpe":
        if vocab_size is not None:
            raise ValueError(
                f"A tokenizer file has its own vocabulary; got vocab_size={vocab_size}"
            )
        return FileTokenizer(kind)
    if vocab_size is None or not documents:
        raise ValueError("A BPE tokenizer needs training documents and a vocab_size")
    name = f"bpe{vocab_size}-{corpus_hash(documents)[:16]}"
    return _cached_bpe(name, vocab_size, documents, cache_dir)


def _cached_bpe(
    name: str, vocab_size: int, documents: Iterable[str], cache_dir: PathLike | None
) -> BPETokenizer:
    """The BPE tokenizer ``name`` from the cache, or trained on ``documents`` and
    cached."""
    path = _cache_root(cache_dir) / "tokenizers" / f"{name}.json"
    if path.exists():
        cached = tokenizers.Tokenizer.from_file(str(path))
        tokenizer = BPETokenizer(cached, vocab_size, name)
        if cached.token_to_id(BPE_EOS_TOKEN) is None:
            # Cached before the file held its end-of-document token: the same ids,
            # now with EOS, so that the file can be passed back as --tokenizer PATH.
            _write_text(path, tokenizer.to_str())
        return tokenizer
    tokenizer = BPETokenizer.train(documents, vocab_size, name)
    _write_text(path, tokenizer.to_str())
    return tokenizer


def _write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, atomically."""
    tmp = _atomic_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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

    def check_ids(self) -> None:
        """Raise ``ValueError`` if a split holds a token id outside the tokenizer's
        vocabulary: the runner's loss leaves the per-step label check out
        (``SoftmaxCrossEntropy(check_labels=False)``), so it is made here, once."""
        vocab = self.tokenizer.vocab_size
        for name, tokens in (("train", self.train), ("validation", self.validation)):
            if not tokens.size:
                continue
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= vocab:
                bad = high if high >= vocab else low
                raise ValueError(
                    f"the {name} split's tokens hold id {bad}, outside the "
                    f"{self.tokenizer.name} tokenizer's vocabulary of {vocab}: "
                    "its token cache was not made by this tokenizer"
                )


def prepare_splits(
    text: PathLike | None = None,
    *,
    text_field: str = "text",
    tokenizer: Literal["byte", "bpe"] | PathLike | AbstractTokenizer = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    progress: bool = False,
) -> TokenSplits:
    """Load the corpus, split it by document, tokenize and cache both splits.

    ``text`` and ``text_field`` are as in `load_corpus`; ``tokenizer`` as in
    `make_tokenizer`, or a tokenizer. A ``"bpe"`` tokenizer is trained on the
    train split only (no validation leakage). Token files are cached under
    ``<cache>/tokens/<hash16>/<tokenizer.name>/``.

    A corpus of files (``text`` not None, two or more documents) is **streamed**:
    one pass counts its documents, a second tokenizes them in chunks straight
    into the token files, so memory stays bounded whatever the corpus's size
    (``progress`` shows the second pass and reports its throughput). An index
    keyed by the corpus files (paths, sizes, modification times), the text field,
    the tokenizer and the split finds the cache again without reading the corpus.
    An interrupted pass leaves only its temporary files' names behind it, which no
    later run reads.
    """
    if text is not None:
        streamed = _streamed_splits(
            text, text_field, tokenizer, vocab_size, val_fraction, seed, cache_dir,
            progress,
        )  # fmt: skip
        if streamed is not None:
            return streamed
    documents = load_corpus(text, text_field)
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


#: Text per tokenization chunk of the streamed pass (bytes of UTF-8).
CHUNK_BYTES = 8 * 2**20


class _TokenFileWriter:
    """Token ids appended chunk by chunk to a ``.npy`` file under a temporary name;
    `close` writes the header with the final length (numpy pads a 1-D header for
    any length, so it keeps its size) and renames the file into place."""

    def __init__(self, folder: Path, dtype: "type[np.integer]"):
        self.dtype = np.dtype(dtype)
        self.tmp = _atomic_path(folder / "stream.npy")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed by close/discard
        self.count = 0
        self.header = self._write_header()

    def _write_header(self) -> int:
        self.file.seek(0)
        np.lib.format.write_array_header_1_0(
            self.file,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.count,),
            },
        )
        return self.file.tell()

    def append(self, ids: np.ndarray) -> None:
        self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.count += len(ids)

    def close(self, path: Path) -> None:
        if self._write_header() != self.header:  # pragma: no cover - numpy's format
            raise RuntimeError(f"the .npy header of {path} changed size")
        self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _files_key(files: list[Path], text_field: str, single: bool) -> str:
    h = hashlib.sha256(json.dumps([text_field, single]).encode())
    for file in files:
        stat = file.stat()
        h.update(
            json.dumps([str(file.resolve()), stat.st_size, stat.st_mtime_ns]).encode()
        )
    return h.hexdigest()


def _streamed_splits(
    text: PathLike,
    text_field: str,
    tokenizer: str | PathLike | AbstractTokenizer,
    vocab_size: int | None,
    val_fraction: float,
    seed: int,
    cache_dir: PathLike | None,
    progress: bool,
) -> TokenSplits | None:
    """`prepare_splits` of a corpus of files in two streamed passes; None for a
    single document (split by position, in memory)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = corpus_files(text)
    single = len(files) == 1 and Path(os.fspath(text)).expanduser().is_file()
    root = _cache_root(cache_dir)
    if isinstance(tokenizer, AbstractTokenizer) or tokenizer != "bpe":
        if not isinstance(tokenizer, AbstractTokenizer):
            tokenizer = make_tokenizer(tokenizer, None, vocab_size, cache_dir)
        spec = tokenizer.name
    else:
        if vocab_size is None:
            raise ValueError(
                "A BPE tokenizer needs training documents and a vocab_size"
            )
        spec = f"bpe{vocab_size}"
    key = _files_key(files, text_field, single)
    index = (
        root
        / "tokens"
        / "by-files"
        / (f"{key[:16]}-{spec}-val{val_fraction!r}-seed{seed}.json")
    )
    suffix = f"val{val_fraction!r}-seed{seed}.npy"
    if index.exists():
        meta = json.loads(index.read_text())
        folder = root / "tokens" / meta["corpus_hash"][:16] / meta["tokenizer"]
        paths = [folder / f"{split}-{suffix}" for split in ("train", "validation")]
        if all(p.exists() for p in paths):
            if isinstance(tokenizer, str):  # BPE, cached under the index's name
                tokenizer = _cached_bpe(meta["tokenizer"], vocab_size, [], cache_dir)
            return TokenSplits(
                tokenizer, *(np.load(p, mmap_mode="r") for p in paths),
                corpus_hash=meta["corpus_hash"],
            )  # fmt: skip

    n = sum(1 for _ in iter_documents(text, text_field))
    if n < 2:
        return None
    is_val = validation_mask(n, val_fraction, seed)

    def documents(validation: bool | None = None) -> Iterator[str]:
        for i, document in enumerate(iter_documents(text, text_field)):
            if validation is None or is_val[i] == validation:
                yield document

    if isinstance(tokenizer, str):  # BPE on the train split: its name is its hash
        h = hashlib.sha256(int(n - is_val.sum()).to_bytes(8, "little"))
        for document in documents(validation=False):
            data = document.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        name = f"bpe{vocab_size}-{h.hexdigest()[:16]}"
        tokenizer = _cached_bpe(name, vocab_size, documents(False), cache_dir)
    return _tokenize_streamed(
        documents(), is_val, tokenizer, root, suffix, index, progress
    )


def _tokenize_streamed(
    documents: Iterator[str],
    is_val: np.ndarray,
    tokenizer: AbstractTokenizer,
    root: Path,
    suffix: str,
    index: Path,
    progress: bool,
) -> TokenSplits:
    """The second pass: hash, tokenize and write both splits, chunk by chunk."""
    n = len(is_val)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    staging = root / "tokens"
    writers = [_TokenFileWriter(staging, dtype), _TokenFileWriter(staging, dtype)]
    h = hashlib.sha256(n.to_bytes(8, "little"))
    eos = np.array([tokenizer.eos_id])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="doc", desc="tokenizing", dynamic_ncols=True)
    start, text_bytes = time.perf_counter(), 0
    chunk: list[str] = []
    splits: list[bool] = []
    size = 0

    def flush():
        for validation, ids in zip(splits, tokenizer.encode_batch(chunk), strict=True):
            writers[validation].append(ids)
            writers[validation].append(eos)
        if bar is not None:
            bar.update(len(chunk))
        chunk.clear()
        splits.clear()

    try:
        for i, document in enumerate(documents):
            data = document.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
            chunk.append(document)
            splits.append(bool(is_val[i]))
            size += len(data)
            text_bytes += len(data)
            if size >= CHUNK_BYTES:
                flush()
                size = 0
        flush()
        digest = h.hexdigest()
        folder = root / "tokens" / digest[:16] / tokenizer.name
        paths = [folder / f"{split}-{suffix}" for split in ("train", "validation")]
        for writer, path in zip(writers, paths, strict=True):
            writer.close(path)
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    tmp = _atomic_path(index)
    tmp.write_text(json.dumps({"corpus_hash": digest, "tokenizer": tokenizer.name}))
    os.replace(tmp, index)
    if progress:
        seconds = time.perf_counter() - start
        tokens = writers[0].count + writers[1].count
        print(
            f"tokenized {n:,} documents ({text_bytes / 1e6:,.1f} MB of text) into "
            f"{tokens:,} tokens in {seconds:.1f} s ({text_bytes / 1e6 / seconds:,.1f} "
            "MB/s)",
            file=sys.stderr,
            flush=True,
        )
    return TokenSplits(
        tokenizer, *(np.load(p, mmap_mode="r") for p in paths), corpus_hash=digest
    )


@functools.lru_cache(maxsize=4)
def _bundled_splits(
    tokenizer: str, vocab_size: int | None, val_fraction: float, cache_dir: str | None
) -> TokenSplits:
    return prepare_splits(
        None,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
    )


def cached_splits(
    text: PathLike | None,
    *,
    text_field: str = "text",
    progress: bool = False,
    tokenizer: Literal["byte", "bpe"] | PathLike = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: PathLike | None = None,
) -> TokenSplits:
    """`prepare_splits` (seed 0), keeping the bundled corpus's splits in memory:
    reading the plays takes seconds, and they do not change while a process runs
    (a comparison, a study, tests)."""
    if text is None:
        cache = None if cache_dir is None else str(cache_dir)
        return _bundled_splits(tokenizer, vocab_size, val_fraction, cache)
    return prepare_splits(
        text,
        text_field=text_field,
        progress=progress,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
    )
