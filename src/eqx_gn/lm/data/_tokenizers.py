"""Tokenizers: text <-> int32 ids with a reserved end-of-document id.

**End of document.** Every tokenizer reserves its *last* id, ``eos_id =
vocab_size - 1``, for the end-of-document token, and `encode` never produces it:
the byte tokenizer has ``vocab_size = 257`` (bytes 0..255, EOS = 256), a BPE
tokenizer of ``vocab_size = V`` has ``V - 1`` learned tokens and EOS = ``V - 1``.
So EOS cannot collide with any text, not even a NUL byte or a literal
``<|endoftext|>``. Documents are packed as ``doc_0 EOS doc_1 EOS ... doc_n EOS``;
`decode` drops EOS ids.

A tokenizer file (`FileTokenizer`, a Hugging Face ``tokenizer.json`` such as T5's
or GPT-2's) brings its own vocabulary and its own end-of-document token instead.
"""

import abc
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, final

import numpy as np
import tokenizers
from jaxtyping import Int32, Integer

from ._corpus import corpus_hash


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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each of ``texts``."""
        return [self.encode(text) for text in texts]

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


#: The end-of-document token a BPE tokenizer's ``tokenizer.json`` holds, at id
#: ``vocab_size - 1`` (never produced by `BPETokenizer.encode`).
BPE_EOS_TOKEN = "<|endoftext|>"


def _with_eos_token(
    tokenizer: tokenizers.Tokenizer, eos_id: int
) -> tokenizers.Tokenizer:
    """``tokenizer`` with `BPE_EOS_TOKEN` as a special token at ``eos_id``, in the
    BPE model's vocabulary and among its added tokens (so that it keeps that id
    even when fewer than ``eos_id`` tokens were learned); the other ids unchanged."""
    data = json.loads(tokenizer.to_str())
    data["model"]["vocab"][BPE_EOS_TOKEN] = eos_id
    data["added_tokens"].append(
        {
            "id": eos_id,
            "content": BPE_EOS_TOKEN,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    return tokenizers.Tokenizer.from_str(json.dumps(data))


@final
class BPETokenizer(AbstractTokenizer):
    """Byte-level BPE (GPT-2 style) from the `tokenizers` library.

    Byte-level pre-tokenization and decoding make ``decode(encode(s)) == s`` for
    every string. Ids ``0 .. vocab_size - 2`` are the learned vocabulary (the
    256 byte symbols, then merges); ``vocab_size - 1`` is EOS, held in the
    tokenizer as the special token `BPE_EOS_TOKEN` (a ``tokenizer.json`` without
    it, as cached by eqx_gn before it held one, gets it on loading).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int, name: str):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos = vocab.pop(BPE_EOS_TOKEN, None)
        learned = max(vocab.values(), default=-1) + 1
        if learned > vocab_size - 1:
            raise ValueError(
                f"BPE vocabulary of {learned} tokens does not fit "
                f"vocab_size={vocab_size} (which includes EOS)"
            )
        if eos not in (None, vocab_size - 1):
            raise ValueError(
                f"BPE tokenizer's {BPE_EOS_TOKEN} has id {eos}, not the "
                f"end-of-document id {vocab_size - 1}"
            )
        if eos is None:
            tokenizer = _with_eos_token(tokenizer, vocab_size - 1)
        # Text is text: a literal "<|endoftext|>" is encoded as its bytes.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.name = name

    def to_str(self) -> str:
        """The tokenizer as a Hugging Face ``tokenizer.json``, its end-of-document
        token ``<|endoftext|>`` at id ``vocab_size - 1``: `FileTokenizer` reads
        it back with the same ids and ``vocab_size``."""
        return self.tokenizer.to_str()

    @classmethod
    def train(
        cls, documents: Iterable[str], vocab_size: int, name: str | None = None
    ) -> "BPETokenizer":
        """Train on ``documents`` with ``vocab_size - 1`` learned tokens (not
        cached); ``name`` defaults to ``bpe<V>-`` and their `corpus_hash`."""
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
        if name is None:
            documents = list(documents)
            name = f"bpe{vocab_size}-{corpus_hash(documents)[:16]}"
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok, vocab_size, name)

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return np.asarray(
            self.tokenizer.encode_batch_fast([text])[0].ids, dtype=np.int32
        )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

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


#: End-of-document tokens a tokenizer file may hold, in the order they are looked
#: for: GPT-2's and most byte-level BPEs', T5's and Llama's (SentencePiece), others.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


@final
class FileTokenizer(AbstractTokenizer):
    """A Hugging Face ``tokenizer.json`` file: its vocabulary (added tokens
    included) and its end-of-document token, the first of `EOS_TOKENS` it holds.

    ``encode`` adds no special tokens and reads special tokens' text as plain
    text, so it never produces ``eos_id``. ``name`` is ``file-`` and the first 16
    hex digits of the file's SHA-256 (``digest``, whole).

    **Raises:** `ValueError` naming the file if it does not load or holds none of
    `EOS_TOKENS`.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        try:
            data = path.read_bytes()
            tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"tokenizer file {path} does not load: {reason}") from None
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_TOKENS if t in vocab), None)
        if eos is None:
            raise ValueError(
                f"tokenizer file {path} has no end-of-document token (none of "
                f"{', '.join(EOS_TOKENS)})"
            )
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.path = path
        self.digest = hashlib.sha256(data).hexdigest()
        self.name = f"file-{self.digest[:16]}"
        self.vocab_size = max(vocab.values()) + 1
        self.eos_token = eos
        self._eos_id = vocab[eos]

    @property
    def eos_id(self) -> int:
        """The id of the file's end-of-document token."""
        return self._eos_id

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode_documents(self, documents: Iterable[str]) -> Int32[np.ndarray, " n"]:
        eos = np.array([self.eos_id], dtype=np.int32)
        parts = [
            part for ids in self.encode_batch(list(documents)) for part in (ids, eos)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, ids: Integer[np.ndarray, " n"] | Sequence[int]) -> str:
        ids = self._check_ids(ids)
        return self.tokenizer.decode(ids[ids != self.eos_id].tolist())
