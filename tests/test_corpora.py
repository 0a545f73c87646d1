"""Corpora as their users hold them: JSON Lines (gzipped or not) and Parquet shards,
a directory or a glob of them, and a Hugging Face ``tokenizer.json`` made outside
the project. The oracles: the same documents written as one ``.txt`` file, and the
`tokenizers` library's own encoding."""

import gzip
import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from compile_flags import subprocess_env
from eqx_gn.lm import (
    ConfigError,
    FileTokenizer,
    TrainConfig,
    corpus_hash,
    load_text,
    prepare_splits,
    split_documents,
    train,
)
from helpers import SMALL


@pytest.fixture(scope="module")
def documents():
    """A text no other test reads: the docstrings of stdlib modules' public
    members, one document each, in a fixed order."""
    import argparse
    import collections
    import configparser
    import email.message
    import fractions
    import http.client
    import logging
    import shutil
    import tarfile
    import textwrap
    import zipfile

    modules = (argparse, collections, configparser, email.message, fractions,
               http.client, logging, shutil, tarfile, textwrap, zipfile)  # fmt: skip
    docs = []
    for module in modules:
        for name, member in sorted(vars(module).items()):
            if name.startswith("_"):
                continue
            members = [member]
            if inspect.isclass(member) and member.__module__ == module.__name__:
                members += [m for n, m in sorted(vars(member).items()) if n[0] != "_"]
            for m in members:
                doc = inspect.getdoc(m)
                if doc and doc.strip() and "\f" not in doc and doc not in docs:
                    docs.append(doc)
    assert len(docs) > 200 and sum(map(len, docs)) > 100_000
    return docs


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc, "url": f"doc/{i}"}) + "\n")


def write_parquet(path, docs, field="text"):
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=50)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, documents):
    """The documents in C4's and FineWeb's layouts: two gzipped JSON Lines shards,
    a plain one and a Parquet file (with a non-shard file beside them)."""
    folder = tmp_path_factory.mktemp("shards")
    thirds = np.array_split(np.arange(len(documents)), 4)
    parts = [[documents[i] for i in idx] for idx in thirds]
    write_jsonl(folder / "c4-train.00000.json.gz", parts[0], opener=gzip.open)
    write_jsonl(folder / "c4-train.00001.json.gz", parts[1], opener=gzip.open)
    (folder / "more").mkdir()
    write_jsonl(folder / "more" / "extra.jsonl", parts[2])
    write_parquet(folder / "more" / "web.parquet", parts[3])
    (folder / "README.md").write_text("not a shard")
    return folder


def make_tokenizer_file(path, documents, vocab_size=600):
    """A BPE tokenizer.json with an end-of-document token, trained on
    ``documents`` and saved at ``path``."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, documents):
    """A BPE tokenizer.json with an end-of-document token, trained and saved
    outside the project as a user's own would be."""
    path = tmp_path_factory.mktemp("user_tokenizer") / "tokenizer.json"
    return make_tokenizer_file(path, documents[::3])


def test_shards_give_the_documents_and_tokens_of_the_same_text(
    tmp_path, documents, shards
):
    # Sorted paths: c4-train.00000, c4-train.00001, more/extra.jsonl, more/web.parquet.
    assert load_text(shards) == documents
    # A glob picks its shards only.
    n = len(np.array_split(np.arange(len(documents)), 4)[0])
    first = load_text(str(shards / "c4-train.0000[0].json.gz"))
    assert first == documents[:n]
    # The oracle: the same documents as one text file, separated by form feeds.
    text = tmp_path / "same.txt"
    text.write_text("\f".join(documents), encoding="utf-8")
    assert load_text(text) == documents
    cache = tmp_path / "cache"
    a = prepare_splits(shards, cache_dir=cache)
    b = prepare_splits(text, cache_dir=cache)
    assert a.corpus_hash == b.corpus_hash == corpus_hash(documents)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.validation, b.validation)
    # And those tokens are the split documents' UTF-8 bytes, each followed by EOS.
    train_docs, _ = split_documents(documents, 0.1, 0)
    packed = b"".join(d.encode() + b"\0" for d in train_docs)
    expected = np.frombuffer(packed, np.uint8).astype(np.int64)
    expected[np.cumsum([len(d.encode()) + 1 for d in train_docs]) - 1] = 256
    np.testing.assert_array_equal(np.asarray(a.train), expected)


def test_a_text_field_names_the_field_and_the_column(tmp_path, documents):
    write_jsonl(tmp_path / "a.jsonl", documents[:5], field="content")
    write_parquet(tmp_path / "b.parquet", documents[5:9], field="content")
    assert load_text(tmp_path, text_field="content") == documents[:9]


def test_a_tokenizer_file_brings_its_vocabulary_and_end_of_document(
    tmp_path, documents, shards, tokenizer_file
):
    oracle = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    eos = oracle.token_to_id("</s>")
    splits = prepare_splits(shards, tokenizer=str(tokenizer_file), cache_dir=tmp_path)
    tok = splits.tokenizer
    assert isinstance(tok, FileTokenizer)
    assert tok.vocab_size == oracle.get_vocab_size(with_added_tokens=True) == 600
    assert tok.eos_id == eos == 1
    digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    assert tok.digest == digest and tok.name == f"file-{digest[:16]}"
    train_docs, val_docs = split_documents(documents, 0.1, 0)
    for docs, tokens in ((train_docs, splits.train), (val_docs, splits.validation)):
        expected = [
            i
            for d in docs
            for i in (*oracle.encode(d, add_special_tokens=False).ids, eos)
        ]
        np.testing.assert_array_equal(np.asarray(tokens), expected)
    # Text that spells the special token is text, not an end of document.
    ids = tok.encode("one </s> two")
    assert eos not in ids.tolist() and tok.decode(ids) == "one </s> two"


def test_training_on_shards_with_a_tokenizer_file(tmp_path, shards, tokenizer_file):
    config = TrainConfig(
        **SMALL, text=str(shards), tokenizer=str(tokenizer_file), optimizer="adamw",
        cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"),
    ).replace(steps=16, lr=1e-2, warmup_fraction=0.0, eval_every=1)  # fmt: skip
    summary = train(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]
    # Below the uniform guess over the file's 600 ids (log 600 = 6.40) and falling.
    assert losses[-1] < min(losses[0] - 0.3, math.log(600) - 0.5), losses
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (
        resolved["tokenizer_sha256"]
        == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    )
    assert resolved["model_config"]["vocab_size"] == 600
    assert summary["final_val_loss"] == losses[-1]


@pytest.mark.parametrize("vocab_size", [600, 500])
def test_resume_refuses_a_swapped_tokenizer_file(
    tmp_path, shards, documents, tokenizer_file, vocab_size
):
    # Before, a swapped tokenizer of the same vocabulary was taken (the run went on
    # with other token ids, and config.json took the new digest); one of another
    # vocabulary failed on an array's shape without naming the tokenizer.
    tok = tmp_path / "tok.json"
    tok.write_bytes(tokenizer_file.read_bytes())
    config = TrainConfig(
        text=str(shards), tokenizer=str(tok), model="tiny", seq_len=32, steps=4,
        batch_size=8, optimizer="adamw", warmup_fraction=0.0, eval_every=2,
        eval_batches=1, eval_batch_size=8, progress=False, stop_after=2,
        checkpoint_every=1, cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config)
    saved = (tmp_path / "run" / "config.json").read_bytes()
    make_tokenizer_file(tok, documents[1::3], vocab_size)
    assert FileTokenizer(tok).vocab_size == vocab_size
    with pytest.raises(ConfigError, match="its tokenizer changed") as info:
        train(config.replace(stop_after=None, resume=True))
    assert str(tok) in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "run" / "config.json").read_bytes() == saved
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]


def test_shards_behind_symbolic_links_are_read(tmp_path, documents, shards):
    # Before, a directory of links to shard directories "contains no corpus shards".
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "c4").symlink_to(shards, target_is_directory=True)
    (linked / "self").symlink_to(linked, target_is_directory=True)
    assert load_text(linked) == documents
    # Broken links are named.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match=r"contains no corpus shards .*broken links: "):
        load_text(empty)


# -- bad input: one line naming the file (and the line) ----------------------------


def bad_inputs(tmp_path, documents):
    """Each bad input, the path to read and the message's pattern."""
    missing = tmp_path / "missing_field"
    missing.mkdir()
    write_jsonl(missing / "a.jsonl", documents[:3])
    with open(missing / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n\n")
        f.write(json.dumps({"body": "no text"}) + "\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write_jsonl(corrupt / "a.jsonl.gz", documents[:50], opener=gzip.open)
    data = (corrupt / "a.jsonl.gz").read_bytes()
    (corrupt / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "a.jsonl", documents[:2])
    (empty / "b.jsonl.gz").write_bytes(gzip.compress(b""))
    column = tmp_path / "column"
    column.mkdir()
    write_parquet(column / "a.parquet", documents[:4], field="content")
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return {
        "missing field": (missing, None, r"b\.jsonl, line 3 has no 'text' field "
                          r"\(its fields: body\); set (--text-field|text_field)"),
        "corrupt gzip": (corrupt, None, r"a\.jsonl\.gz is not a valid gzip file "
                         r"after line \d+"),
        "empty shard": (empty, None, r"b\.jsonl\.gz is empty"),
        "no column": (column, None, r"a\.parquet has no column 'text' \(its "
                      r"columns: id, content\)"),
        "tokenizer": (None, broken, r"tokenizer file .*tokenizer\.json does not load"),
    }  # fmt: skip


def test_bad_inputs_name_the_file(tmp_path, documents):
    for name, (text, tokenizer, message) in bad_inputs(tmp_path, documents).items():
        with pytest.raises(ValueError, match=message) as info:
            if tokenizer is None:
                load_text(text)
            else:
                FileTokenizer(tokenizer)
        assert "\n" not in str(info.value) and "--" not in str(info.value), name
    with pytest.raises(FileNotFoundError, match="No corpus shards match"):
        load_text(str(tmp_path / "nothing-*.jsonl.gz"))


@pytest.mark.parametrize("case", ["missing field", "corrupt gzip", "tokenizer"])
def test_bad_input_from_the_command_line_is_one_line(tmp_path, documents, case):
    text, tokenizer, message = bad_inputs(tmp_path, documents)[case]
    args = ["train", "--steps", "1", "--out", str(tmp_path / "run")]
    args += ["--cache-dir", str(tmp_path / "cache")]
    if text is not None:
        args += ["--text", str(text)]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "eqx_gn.lm._cli", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("eqx-gn train: error: ")
    assert re.search(message, lines[0]) and "text_field" not in lines[0], lines[0]
    assert not (tmp_path / "cache" / "tokens").exists() or not any(
        (tmp_path / "cache" / "tokens").rglob("*.npy")
    )


# -- the token cache: streamed, bounded, found again, never half-trusted ------------


def test_the_cache_is_found_again_by_its_files_and_rebuilt_when_one_changes(
    tmp_path, documents, monkeypatch
):
    from eqx_gn.lm.data import _corpus

    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", documents[:100])
    write_parquet(folder / "b.parquet", documents[100:200])
    first = prepare_splits(folder, cache_dir=tmp_path / "cache")

    def unread(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    with monkeypatch.context() as m:
        m.setattr(_corpus, "_file_documents", unread)
        again = prepare_splits(folder, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.train, first.train)
    assert again.corpus_hash == first.corpus_hash == corpus_hash(documents[:200])
    # A changed shard is a new corpus.
    write_jsonl(folder / "a.jsonl", documents[:99])
    changed = prepare_splits(folder, cache_dir=tmp_path / "cache")
    assert changed.corpus_hash == corpus_hash(documents[:99] + documents[100:200])


def test_tokenizing_holds_a_chunk_not_the_corpus(tmp_path, documents, monkeypatch):
    import tracemalloc

    from eqx_gn.lm.data import _token_cache as _tokens

    # About 6 MB of text in gzipped JSON Lines, tokenized in 256 kB chunks. The
    # peak is about 6.4 chunks (1.7 MB measured; 6.2 MB at 24 MB in 1 MB chunks).
    monkeypatch.setattr(_tokens, "CHUNK_BYTES", 2**18)
    text = sum(map(len, documents))
    copies = 6_000_000 // text + 1
    write_jsonl(tmp_path / "big.jsonl.gz", documents * copies, opener=gzip.open)
    tracemalloc.start()
    try:
        splits = prepare_splits(tmp_path / "big.jsonl.gz", cache_dir=tmp_path / "c")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = len(splits.train) + len(splits.validation)
    assert tokens > 6_000_000
    # The corpus in memory would be >= 6 MB of text and 12 MB of uint16 tokens.
    assert peak < 3_000_000, peak


def test_an_interrupted_tokenization_leaves_nothing_trusted(
    tmp_path, documents, monkeypatch
):
    from eqx_gn.lm import ByteTokenizer
    from eqx_gn.lm.data import _token_cache as _tokens

    monkeypatch.setattr(_tokens, "CHUNK_BYTES", 10_000)
    write_jsonl(tmp_path / "a.jsonl", documents)
    calls = []
    original = ByteTokenizer.encode_batch

    def interrupted(self, texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, texts)

    with monkeypatch.context() as m:
        m.setattr(ByteTokenizer, "encode_batch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_splits(tmp_path / "a.jsonl", cache_dir=tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    splits = prepare_splits(tmp_path / "a.jsonl", cache_dir=tmp_path / "cache")
    train_docs, _ = split_documents(documents, 0.1, 0)
    np.testing.assert_array_equal(
        splits.train, splits.tokenizer.encode_documents(train_docs)
    )
