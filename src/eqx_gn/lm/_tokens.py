"""Token files: tokenizers and packed token arrays, cached on disk.

**Cache layout** (``cache_dir`` argument, else ``$EQX_GN_CACHE``, else
``~/.cache/eqx_gn``); every file is written to a temporary name and renamed, so
processes sharing the directory never see a partial file::

    <cache>/tokenizers/bpe<V>-<hash16>.json
        a trained BPE tokenizer; hash16 = corpus_hash of its training documents
    <cache>/tokens/<hash16>/<tokenizer.name>/<split>-val<fraction>-seed<seed>.npy
        packed tokens of one split (uint16 when vocab_size <= 65536, else int32);
        hash16 = corpus_hash of the whole corpus
"""

import functools
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tokenizers
from jaxtyping import Integer

from ._corpus import PathLike, corpus_hash, load_corpus, split_documents
from ._tokenizers import AbstractTokenizer, BPETokenizer, ByteTokenizer, FileTokenizer

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
    path = _cache_root(cache_dir) / "tokenizers" / f"{name}.json"
    if path.exists():
        return BPETokenizer(tokenizers.Tokenizer.from_file(str(path)), vocab_size, name)
    tokenizer = BPETokenizer.train(documents, vocab_size)
    tmp = _atomic_path(path)
    tokenizer.tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return tokenizer


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
    text_field: str = "text",
    tokenizer: Literal["byte", "bpe"] | PathLike | AbstractTokenizer = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: PathLike | None = None,
) -> TokenSplits:
    """Load the corpus, split it by document, tokenize and cache both splits.

    ``text`` and ``text_field`` are as in `load_corpus`; ``tokenizer`` as in
    `make_tokenizer`, or a tokenizer. A ``"bpe"`` tokenizer is trained on the
    train split only (no validation leakage). Token files are cached under
    ``<cache>/tokens/<hash16>/<tokenizer.name>/``.
    """
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
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
    )
