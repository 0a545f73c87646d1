"""A run's life in its directory: one run at a time (an OS lock, gone with a killed
holder), a stop at divergence with nothing non-finite saved, a resume that changes
nothing on a finished run, and one that compares resolved settings and the corpus."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from eqx_gn.lm import Checkpointer, ConfigError, Diverged, TrainConfig, train
from eqx_gn.lm._cli import main as cli
from eqx_gn.lm.run._run_dir import LOCK_FILE
from eqx_gn.lm.study._records import read_run_dir
from helpers import small


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").open()]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from eqx_gn.lm import TrainConfig
    from eqx_gn.lm.run._run_dir import RunDirectory
    config = TrainConfig(out=sys.argv[1])
    RunDirectory(config.out, primary=True).prepare(config)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_one_run_per_directory_and_a_killed_holder_leaves_no_lock(tmp_path, cache_dir):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # A missing corpus too: the lock is taken before the corpus is read.
        bad_text = {"text": str(tmp_path / "no-such-corpus.txt")}
        for flags in ({}, {"resume": True}, {"overwrite": True}, bad_text):
            config = small(tmp_path, cache_dir, "run", **flags)
            with pytest.raises(
                ConfigError,
                match=f"in use by another eqx-gn run .*process {holder.pid}",
            ):
                train(config)
        assert not (out / "config.json").exists()  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The OS released the killed holder's lock: the run trains.
    summary = train(small(tmp_path, cache_dir, "run"))
    assert summary["completed"] and summary["steps"] == 6
    # A finished run released its own lock: a resume may take it.
    assert train(small(tmp_path, cache_dir, "run", resume=True))["steps"] == 6
    # An overwrite that cannot read its corpus deletes nothing.
    with pytest.raises(ConfigError, match="does not exist"):
        train(small(tmp_path, cache_dir, "run", overwrite=True, **bad_text))
    assert (out / "summary.json").exists() and (out / "checkpoints").exists()


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_a_diverged_run_stops_with_one_line_and_saves_nothing_non_finite(
    tmp_path, cache_dir, checkpoint_every, capsys
):
    config = small(
        tmp_path,
        cache_dir,
        f"nan{checkpoint_every}",
        optimizer="adamw",
        lr=1e8,
        steps=10,
        warmup_fraction=0.0,
        checkpoint_every=checkpoint_every,
    )
    with pytest.raises(Diverged, match="training diverged at step") as info:
        train(config)
    message = str(info.value)
    assert "\n" not in message and "lower lr" in message  # lm.train: setting names
    out = tmp_path / f"nan{checkpoint_every}"
    metrics = records(out)
    step = metrics[-1]["step"]
    assert step < 10 and f"at step {step}:" in message
    # The metrics up to the step stay; the summary says where it stopped.
    assert [r["step"] for r in metrics] == list(range(1, step + 1))
    assert all(math.isfinite(r["train_loss"]) for r in metrics[:-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at"] == step
    # Not a completed run, and no final loss (before, its last evaluation's, from
    # before the divergence, and "completed": true); the study reads it so too.
    assert summary["completed"] is False and summary["final_val_loss"] is None
    record = read_run_dir(out, "tune", None)
    assert record is not None and record["final_val_loss"] is None
    checkpointer = Checkpointer(str(out / "checkpoints"))
    try:
        last = checkpointer.latest_step()
        if checkpoint_every == 0:
            assert last is None and "no checkpoint was written" in message
        else:
            assert last is not None and last < step
            assert f"the last good checkpoint is step {last}" in message
            for array in checkpointer.restore_arrays():
                if np.issubdtype(np.asarray(array).dtype, np.inexact):
                    assert np.all(np.isfinite(array))
    finally:
        checkpointer.close()
    # The command line: one line, exit status 1.
    argv = ["train", "--out", str(tmp_path / "cli"), "--cache-dir", cache_dir]
    argv += ["--model", "tiny", "--seq-len", "32", "--steps", "6", "--batch-size"]
    argv += ["16", "--optimizer", "adamw", "--lr", "1e8", "--warmup-fraction", "0"]
    argv += ["--eval-batches", "2", "--eval-batch-size", "8", "--no-progress"]
    capsys.readouterr()
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eqx-gn train: training diverged")


def _files(path):
    """Every file of the run (the lock file aside: each run writes its holder)."""
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def test_resume_on_a_finished_run_changes_no_file(tmp_path, cache_dir, capsys):
    config = small(tmp_path, cache_dir, "done", optimizer="adamw")
    summary = train(config)
    before = _files(tmp_path / "done")
    capsys.readouterr()
    again = train(config.replace(resume=True))
    assert again == summary
    assert _files(tmp_path / "done") == before
    err = capsys.readouterr().err
    assert "is finished (step 6); nothing to resume, no file changed" in err


def test_resume_compares_resolved_settings_and_the_corpus(tmp_path, cache_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question. " * 400)
    config = small(
        tmp_path, cache_dir, "gn", text=str(text), stop_after=3, checkpoint_every=1
    )
    assert config.lr is None  # GN's default: a fraction of the model's step
    train(config)
    # The same run, its default learning rate spelled out: resumes.
    same = config.replace(lr=config.learning_rate, stop_after=4, resume=True)
    assert train(same)["steps"] == 4
    # A real difference is named with the values the run used.
    used = re.escape(f"lr: {config.learning_rate} -> 0.01")
    with pytest.raises(ConfigError, match=used):
        train(config.replace(lr=0.01, resume=True))
    # A changed corpus is refused, and config.json keeps the trained one's digest.
    digest = json.loads((tmp_path / "gn" / "config.json").read_text())["resolved"][
        "corpus_hash"
    ]
    text.write_text("All the world's a stage, and all the men and women. " * 400)
    with pytest.raises(ConfigError, match="its corpus changed since it was trained"):
        train(config.replace(stop_after=None, resume=True))
    saved = json.loads((tmp_path / "gn" / "config.json").read_text())
    assert saved["resolved"]["corpus_hash"] == digest
    assert os.path.exists(tmp_path / "gn" / "checkpoints")


@pytest.mark.parametrize("cut", ["mid-line", "at a record"])
def test_a_cut_metrics_file_keeps_its_records_and_names_the_gap(
    tmp_path, cache_dir, cut
):
    # Before, resume padded a shortened metrics.jsonl with NUL bytes up to the
    # checkpoint's offset, silently; eqx-gn plot then failed on it.
    from eqx_gn.lm.results._loss_curves import plot_runs

    config = small(tmp_path, cache_dir, "run", optimizer="adamw", checkpoint_every=2)
    train(config.replace(stop_after=4))
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    size = sum(map(len, lines[:2])) + (10 if cut == "mid-line" else 0)
    os.truncate(path, size)
    with pytest.warns(UserWarning) as caught:
        train(config.replace(resume=True))
    assert [w.category.__name__ for w in caught] == ["MetricsWarning"]
    message = str(caught[0].message)
    assert "\n" not in message and f"{path} is damaged" in message
    assert "the records of steps 3-4 are lost" in message
    data = path.read_bytes()
    assert b"\0" not in data
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 5, 6]
    assert data.startswith(b"".join(lines[:2]))
    assert plot_runs([tmp_path / "run"], tmp_path / "plots")


def test_progress_in_a_log_is_a_line_per_evaluation(tmp_path, cache_dir, capsys):
    # stderr not a terminal (a job log): before, the bar's carriage-return frames,
    # one long line per run; now the lines of --no-progress.
    from eqx_gn.lm.run._config import describe

    train(small(tmp_path, cache_dir, "log", optimizer="adamw", progress=True))
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert [
        line.split("/")[0] for line in out.splitlines() if line.startswith("step")
    ] == [
        "step 2",
        "step 4",
        "step 6",
    ]
    help_text, _ = describe(TrainConfig.__dataclass_fields__["progress"])
    assert "True:" not in help_text and "--no-progress" in help_text


def _params(path, config):
    """The model parameters of the newest checkpoint in the run ``path`` (a run's
    state begins with them), as NumPy arrays."""
    import equinox as eqx
    import jax

    from eqx_gn.lm import LMConfig, Transformer

    saved = json.loads((path / "config.json").read_text())["resolved"]
    model = eqx.filter_eval_shape(
        Transformer, LMConfig(**saved["model_config"]), jax.random.key(0)
    )
    count = len(jax.tree.leaves(model))  # its arrays (the rest is not a leaf)
    assert count > 10
    checkpointer = Checkpointer(str(path / "checkpoints"), read_only=True)
    try:
        return checkpointer.restore_arrays()[:count]
    finally:
        checkpointer.close()


def test_a_finished_run_trains_on_in_a_new_run_from_its_final_parameters(
    tmp_path, cache_dir
):
    first = small(tmp_path, cache_dir, "first", optimizer="adamw", steps=4)
    train(first)
    final = _params(tmp_path / "first", first)
    # A run cannot be extended (its schedule is its length); the message says how
    # to train on from its final parameters.
    with pytest.raises(ConfigError) as info:
        train(first.replace(steps=8, resume=True))
    assert f"init_from='{tmp_path / 'first'}'" in str(info.value)
    # With a learning rate too small to move float32 parameters of the tiny
    # model's size (1e-30 x an Adam step of about 1), a run that starts from the
    # first run's parameters ends with them bit for bit; one that does not, ends
    # elsewhere. Its own optimizer and schedule start anew.
    moved = dict(optimizer="adamw", steps=2, lr=1e-30, warmup_fraction=0.0)
    on = small(tmp_path, cache_dir, "on", init_from=str(tmp_path / "first"), **moved)
    train(on)
    for mine, theirs in zip(_params(tmp_path / "on", on), final, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    resolved = json.loads((tmp_path / "on" / "config.json").read_text())["resolved"]
    assert resolved["init_from_step"] == 4
    fresh = small(tmp_path, cache_dir, "fresh", **moved)
    train(fresh)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_params(tmp_path / "fresh", fresh), final, strict=True)
    )
    # Resuming the new run keeps where it started from.
    train(on.replace(resume=True))
    resolved = json.loads((tmp_path / "on" / "config.json").read_text())["resolved"]
    assert resolved["init_from_step"] == 4
    # A directory without checkpoints, another model: one line each, nothing run.
    for source, message in [
        (tmp_path / "nothing", "is not a run directory with checkpoints"),
        (tmp_path / "first", "was written by a different model: its parameter"),
    ]:
        (tmp_path / "nothing").mkdir(exist_ok=True)
        other = dict(scan_layers=source.name == "first")
        config = small(
            tmp_path, cache_dir, "bad", init_from=str(source), overwrite=True,
            **moved, **other,
        )  # fmt: skip
        with pytest.raises(ConfigError, match=message) as info:
            train(config)
        assert "\n" not in str(info.value)
        assert str(info.value).startswith("init_from")
