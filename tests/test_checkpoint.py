"""Checkpoints: digests written with every save and checked on restore, fallback to
the newest intact checkpoint, non-finite states refused, pruning that keeps the
newest verified checkpoint."""

import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_gn.lm import (
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    batch_iterator,
)
from helpers import RESUMED_RUN

_TOKENS = np.arange(5000, dtype=np.int32) % 251


def _iterators():
    return {"train": batch_iterator(_TOKENS, 4, 16, seed=3)}


def _state(shift: float):
    key = jax.random.key(7)
    return {
        "params": {
            "w": jax.random.normal(key, (96, 64), jnp.float32) + shift,
            "b": jnp.arange(7.0) * shift,
        },
        "opt": (jnp.full((3,), shift, jnp.float32), jnp.asarray(int(shift))),
        "key": jax.random.key_data(jax.random.fold_in(key, int(shift))),
    }


def _assert_same(tree_a, tree_b):
    leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints at steps 1 and 2 of a run whose iterator advances one batch per
    step; returns the directory, step 1's state and the batch that follows it."""
    directory = tmp_path / "checkpoints"
    iterators = _iterators()
    checkpointer = Checkpointer(directory)
    next(iterators["train"])
    checkpointer.save(1, _state(1.0), iterators, {"step": 1, "loss": 0.5})
    after_1 = next(iterators["train"])
    checkpointer.save(2, _state(2.0), iterators, {"step": 2, "loss": 0.25})
    checkpointer.close()
    return directory, _state(1.0), after_1


def _largest_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir: Path) -> None:
    # The largest file of the array item holds the (zstd) chunks of the largest
    # array: XOR a few hundred bytes in its middle, size unchanged.
    path = _largest_file(step_dir / "state")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle - 150, middle + 150):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(step_dir: Path) -> None:
    path = _largest_file(step_dir / "state")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble_meta(step_dir: Path) -> None:
    path = step_dir / "meta" / "metadata"
    text = path.read_text()
    path.write_text("#garbled#" + text[9:])


def _edit_meta(step_dir: Path) -> None:
    # Still valid JSON, a counter changed: only the meta digest can tell.
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["step"] = 3
    path.write_text(json.dumps(meta))


def _delete_data_file(step_dir: Path) -> None:
    _largest_file(step_dir / "state").unlink()


def _delete_iterator_file(step_dir: Path) -> None:
    (step_dir / "train" / "process_0-of-1.json").unlink()


def _edit_iterator_state(step_dir: Path) -> None:
    path = step_dir / "train" / "process_0-of-1.json"
    state = json.loads(path.read_text())
    state["next_index"] += 1
    path.write_text(json.dumps(state))


DAMAGES = {
    "flipped bytes": _flip_bytes,
    "truncated file": _truncate,
    "garbled meta": _garble_meta,
    "edited meta": _edit_meta,
    "missing data file": _delete_data_file,
    "missing iterator file": _delete_iterator_file,
    "edited iterator state": _edit_iterator_state,
}


def test_layout_has_the_files_the_damage_tests_touch(two_checkpoints):
    directory, _, _ = two_checkpoints
    step_dir = directory / "2"
    assert (step_dir / "meta" / "metadata").is_file()
    assert (step_dir / "train" / "process_0-of-1.json").is_file()
    # The largest array (96 x 64 float32) dominates the largest data file.
    assert _largest_file(step_dir / "state").stat().st_size > 96 * 64 * 2


def test_intact_checkpoints_restore_the_newest(two_checkpoints):
    directory, _, _ = two_checkpoints
    iterators = _iterators()
    checkpointer = Checkpointer(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        step, meta, state = checkpointer.restore_latest(_state(0.0), iterators)
    checkpointer.close()
    assert (step, meta) == (2, {"step": 2, "loss": 0.25})
    _assert_same(state, _state(2.0))
    expected = _iterators()["train"]
    for _ in range(2):
        next(expected)
    np.testing.assert_array_equal(next(iterators["train"]), next(expected))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_falls_back_to_the_previous(two_checkpoints, damage):
    directory, state_1, after_1 = two_checkpoints
    DAMAGES[damage](directory / "2")
    iterators = _iterators()
    checkpointer = Checkpointer(directory)
    with pytest.warns(CheckpointWarning) as caught:
        step, meta, state = checkpointer.restore_latest(_state(0.0), iterators)
    messages = [str(w.message) for w in caught if w.category is CheckpointWarning]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert f"checkpoint step 2 in {directory} is damaged" in messages[0]
    assert messages[0].endswith("resuming from step 1")
    assert (step, meta) == (1, {"step": 1, "loss": 0.5})
    _assert_same(state, state_1)
    np.testing.assert_array_equal(next(iterators["train"]), after_1)
    # Moved aside, not deleted: the run carries on from step 1.
    assert checkpointer.all_steps() == [1]
    assert (directory / "damaged-2").is_dir()
    checkpointer.close()


def test_all_damaged_raises_one_line_and_keeps_them(two_checkpoints):
    directory, _, _ = two_checkpoints
    _flip_bytes(directory / "2")
    _garble_meta(directory / "1")
    iterators = _iterators()
    checkpointer = Checkpointer(directory)
    with pytest.raises(CheckpointError) as info:
        checkpointer.restore_latest(_state(0.0), iterators)
    message = str(info.value)
    assert "\n" not in message
    assert f"no intact checkpoint in {directory}" in message
    assert "step 2: digest mismatch in array" in message
    assert "step 1: meta" in message
    assert checkpointer.all_steps() == [1, 2]
    # The iterator was not moved by the failed attempts.
    np.testing.assert_array_equal(next(iterators["train"]), next(_iterators()["train"]))
    checkpointer.close()


def test_no_checkpoint_gives_none(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.restore_latest(_state(0.0), _iterators()) is None
    checkpointer.close()


def test_restore_of_a_damaged_step_raises_one_line(two_checkpoints):
    directory, _, _ = two_checkpoints
    _flip_bytes(directory / "2")
    checkpointer = Checkpointer(directory)
    with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is damaged"):
        checkpointer.restore(2, _state(0.0), _iterators())
    checkpointer.close()


def test_a_different_model_is_an_error_not_damage(two_checkpoints):
    directory, _, _ = two_checkpoints
    template = _state(0.0)
    template["params"]["w"] = jnp.zeros((96, 65), jnp.float32)
    checkpointer = Checkpointer(directory)
    with pytest.raises(CheckpointError, match=r"this run expects float32\[96, 65\]"):
        checkpointer.restore_latest(template, _iterators())
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_state_is_refused(tmp_path, bad):
    directory = tmp_path / "checkpoints"
    state = _state(1.0)
    state["opt"] = (state["opt"][0].at[1].set(bad), state["opt"][1])
    checkpointer = Checkpointer(directory)
    with pytest.raises(CheckpointError) as info:
        checkpointer.save(5, state, _iterators(), {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"refusing to checkpoint step 5 in {directory}")
    assert "['opt'][0], float32[3]) is not finite" in message
    assert checkpointer.all_steps() == []
    checkpointer.close()


def test_non_finite_checkpoint_on_disk_is_skipped(tmp_path, monkeypatch):
    # A non-finite checkpoint written by an older version (no refusal, no
    # digests) is not resumed from.
    import eqx_gn.lm.run._integrity as integrity

    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(directory)
    checkpointer.save(1, _state(1.0), _iterators(), {"step": 1})
    state = _state(2.0)
    state["params"]["b"] = state["params"]["b"].at[0].set(jnp.nan)
    monkeypatch.setattr(integrity, "leaf_digest", _finite_digest(integrity.leaf_digest))
    checkpointer.verify_saves = False
    checkpointer.save(2, state, _iterators(), {"step": 2})
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match=r"array 3 is not finite"):
        step, _, restored = checkpointer.restore_latest(_state(0.0), _iterators())
    assert step == 1
    _assert_same(restored, _state(1.0))
    checkpointer.close()


def _finite_digest(leaf_digest):
    def digest(leaf):
        kind, value, _ = leaf_digest(leaf)
        return kind, value, True

    return digest


def test_checkpoint_without_record_still_restores(two_checkpoints):
    # Checkpoints written before digests existed have no record in their meta.
    directory, _, _ = two_checkpoints
    path = directory / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["_checkpoint"]
    path.write_text(json.dumps(meta))
    checkpointer = Checkpointer(directory)
    step, meta, state = checkpointer.restore_latest(_state(0.0), _iterators())
    assert (step, meta) == (2, {"step": 2, "loss": 0.25})
    _assert_same(state, _state(2.0))
    assert checkpointer.restore_meta(1) == {"step": 1, "loss": 0.5}
    checkpointer.close()


def test_pruning_after_fallback_keeps_the_good_one(two_checkpoints):
    # The scenario: the latest checkpoint is damaged on disk, the run
    # resumes and saves again; the last good checkpoint must survive.
    directory, _, _ = two_checkpoints
    _flip_bytes(directory / "2")
    iterators = _iterators()
    checkpointer = Checkpointer(directory, max_to_keep=2)
    with pytest.warns(CheckpointWarning):
        step, _, _ = checkpointer.restore_latest(_state(0.0), iterators)
    assert step == 1
    checkpointer.save(2, _state(2.0), iterators, {"step": 2})
    assert checkpointer.all_steps() == [1, 2]
    assert checkpointer.latest_step() == 2
    checkpointer.save(3, _state(3.0), iterators, {"step": 3})
    assert checkpointer.all_steps() == [2, 3]
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3", "damaged-2"]
    checkpointer.close()


def test_pruning_never_deletes_the_newest_verified(two_checkpoints):
    directory, _, _ = two_checkpoints
    iterators = _iterators()
    checkpointer = Checkpointer(directory, max_to_keep=2, verify_saves=False)
    step, _, _ = checkpointer.restore_latest(_state(0.0), iterators)
    assert step == checkpointer.verified_step == 2
    for step in (3, 4, 5):
        checkpointer.save(step, _state(float(step)), iterators, {"step": step})
    assert checkpointer.all_steps() == [2, 4, 5]
    checkpointer.close()


def test_save_that_does_not_read_back_is_moved_aside(two_checkpoints, monkeypatch):
    import eqx_gn.lm.run._checkpoint as module

    directory, _, _ = two_checkpoints
    iterators = _iterators()
    checkpointer = Checkpointer(directory, max_to_keep=2)
    checkpointer.restore_latest(_state(0.0), iterators)

    def unreadable(self, step, leaves):
        raise module._Damaged("simulated read error")

    monkeypatch.setattr(Checkpointer, "_load_arrays", unreadable)
    with pytest.warns(CheckpointWarning) as caught:
        checkpointer.save(3, _state(3.0), iterators, {"step": 3})
    (message,) = [str(w.message) for w in caught]
    assert message == (
        f"checkpoint step 3 in {directory} did not read back intact (simulated "
        f"read error); moved to {directory / 'damaged-3'}"
    )
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


def test_reserved_meta_key_is_refused(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="reserved key '_checkpoint'"):
        checkpointer.save(1, _state(1.0), _iterators(), {"_checkpoint": 1})
    checkpointer.close()


# -- end to end through the runner ------------------------------------------

_RUN = dict(RESUMED_RUN, optimizer="adamw")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from eqx_gn.lm import TrainConfig, train

    root = tmp_path_factory.mktemp("uninterrupted")
    cache = str(root / "cache")
    summary = train(TrainConfig(**_RUN, out=str(root / "run"), cache_dir=cache))
    checkpointer = Checkpointer(root / "run" / "checkpoints")
    arrays = checkpointer.restore_arrays()
    checkpointer.close()
    return cache, summary, arrays


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", ["flipped bytes", "truncated file", "garbled meta", "missing data file"]
)
def test_resume_after_damage_matches_uninterrupted_run(tmp_path, uninterrupted, damage):
    from eqx_gn.lm import TrainConfig, train

    cache, summary, arrays = uninterrupted
    config = TrainConfig(**_RUN, out=str(tmp_path), cache_dir=cache)
    train(config.replace(stop_after=4))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]
    DAMAGES[damage](checkpoints / "4")
    with pytest.warns(CheckpointWarning, match="checkpoint step 4 .* is damaged"):
        resumed = train(config.replace(resume=True))
    checkpointer = Checkpointer(checkpoints)
    final = checkpointer.restore_arrays()
    checkpointer.close()
    assert len(final) == len(arrays)
    for a, b in zip(final, arrays, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert resumed["final_val_loss"] == summary["final_val_loss"]


def test_template_function_sees_each_candidates_verified_meta(two_checkpoints):
    directory, state_1, _ = two_checkpoints
    _flip_bytes(directory / "2")
    seen = []

    def template(meta):
        seen.append(meta)
        return _state(0.0)

    checkpointer = Checkpointer(directory)
    with pytest.warns(CheckpointWarning):
        step, _, state = checkpointer.restore_latest(template, _iterators())
    assert step == 1
    assert seen == [{"step": 2, "loss": 0.25}, {"step": 1, "loss": 0.5}]
    _assert_same(state, state_1)
    checkpointer.close()


def test_iterators_untouched_when_nothing_is_intact(two_checkpoints):
    # Step 2's arrays are intact, its iterator state is not: the iterator, moved
    # while reading it, is put back before the (damaged) step 1 is tried.
    directory, _, _ = two_checkpoints
    _edit_iterator_state(directory / "2")
    _flip_bytes(directory / "1")
    iterators = _iterators()
    checkpointer = Checkpointer(directory)
    with pytest.raises(CheckpointError, match="digest mismatch in iterator 'train'"):
        checkpointer.restore_latest(_state(0.0), iterators)
    np.testing.assert_array_equal(next(iterators["train"]), next(_iterators()["train"]))
    checkpointer.close()


# ENOSPC at orbax's writer, as tensorstore reports it, for the checkpoint of step 4.
_FULL_DISK = """
import sys
from orbax.checkpoint._src.serialization import serialization

write = serialization.async_serialize_from_host

async def full_at_step_4(*args, **kwargs):
    if "/checkpoints/4.orbax-checkpoint-tmp" in repr((args, kwargs)):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "0/0.0" in OCDBT database: Failed to '
            "write 377103 bytes to file 21: No space left on device "
            "[os_error_code='28']"
        )
    return await write(*args, **kwargs)

serialization.async_serialize_from_host = full_at_step_4
from eqx_gn.lm._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_is_one_line_and_resume_ends_bit_exact(tmp_path, uninterrupted):
    # Before: a 269-line traceback from orbax's writer threads, and a temporary
    # directory left behind.
    import subprocess
    import sys

    from eqx_gn.lm import TrainConfig, train

    cache, summary, arrays = uninterrupted
    out = tmp_path / "run"
    # _RUN's settings as flags.
    argv = ["train", "--out", str(out), "--cache-dir", cache, "--no-progress"]
    for name, value in _RUN.items():
        if name != "progress":
            argv += ["--" + name.replace("_", "-"), str(value)]
    # As this process runs (conftest.py): float64 on, 8 simulated devices.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(
        f"eqx-gn train: error: no space left on the device of {out / 'checkpoints'}"
        " to write checkpoint step 4 (it needs about "
    )
    assert "the last good checkpoint, step 2, is untouched" in lines[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]  # no temporary left
    # Space freed: the run resumes from step 2 and ends as if never stopped.
    config = TrainConfig(**_RUN, out=str(out), cache_dir=cache)
    resumed = train(config.replace(resume=True))
    checkpointer = Checkpointer(out / "checkpoints")
    final = checkpointer.restore_arrays()
    checkpointer.close()
    assert len(final) == len(arrays)
    for a, b in zip(final, arrays, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert resumed["final_val_loss"] == summary["final_val_loss"]
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7))
