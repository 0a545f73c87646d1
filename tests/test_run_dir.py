"""The output directory of a run never clobbers what is not the run's own."""

import json
import re

import pytest

from eqx_gn.lm import ConfigError, TrainConfig
from eqx_gn.lm.run._run_dir import RUN_FILES, RunDirectory


def _prepare(path, **changes):
    config = TrainConfig(out=str(path), **changes)
    run_dir = RunDirectory(config.out, primary=True)
    try:
        run_dir.prepare(config)
    finally:
        run_dir.release()
    return config


def _fake_run(path, **changes):
    """A directory as an eqx-gn run leaves it, plus a file of the user's."""
    path.mkdir()
    config = TrainConfig(out=str(path), **changes)
    saved = {"eqx_gn_run": 1, "config": config.to_dict(), "resolved": {}}
    (path / "config.json").write_text(json.dumps(saved))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "checkpoints" / "1").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return config


def test_a_new_or_unrelated_directory_is_used_and_its_files_kept(tmp_path):
    _prepare(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    _prepare(other)
    assert (other / "data.csv").read_text() == "1,2"


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints", "summary.json"])
def test_files_a_run_would_write_in_a_foreign_directory_are_refused(
    tmp_path, flags, name
):
    target = tmp_path / name
    if name == "checkpoints":
        target.mkdir()
        (target / "model.ckpt").write_text("another tool's")
    else:
        target.write_text("the user's")
    with pytest.raises(ConfigError, match=f"holds {name} but is not an eqx-gn run"):
        _prepare(tmp_path, **flags)
    assert target.exists()
    if name == "checkpoints":
        assert (target / "model.ckpt").read_text() == "another tool's"
    else:
        assert target.read_text() == "the user's"


def test_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    _fake_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; pass resume"):
        _prepare(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    _prepare(run, overwrite=True)
    assert not any((run / name).exists() for name in RUN_FILES)
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_needs_the_same_configuration(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, steps=10)
    _prepare(run, steps=10, resume=True, progress=False)  # execution may change
    with pytest.raises(ConfigError, match=r"different configuration \(steps: 10 -> 9"):
        _prepare(run, steps=9, resume=True)
    # Extending a run: the message says why not, and what to do instead.
    with pytest.raises(ConfigError) as info:
        _prepare(run, steps=20, resume=True)
    assert "(steps: 10 -> 20); steps is the length of the run's learning-rate" in str(
        info.value
    )
    assert (
        "to train on from its final parameters, start a new run in another output "
        f"directory with init_from='{run}'"
    ) in str(info.value)
    with pytest.raises(ConfigError) as info:
        _prepare(run, steps=10, lr=0.5, resume=True)
    assert "cannot be extended" not in str(info.value)


def test_a_default_that_changed_since_the_run_started_is_refused_with_its_flag(
    tmp_path,
):
    # config.json records what each default resolved to. A run started when GN's
    # default fraction was 1, resumed after it became another, would silently run
    # another configuration: one line names the setting, both values and the flag
    # that resumes it as it ran.
    run = tmp_path / "run"
    config = _fake_run(run, steps=10)
    now = config.learning_rate
    assert now != 1.0
    saved = json.loads((run / "config.json").read_text())
    saved["resolved"] = {"learning_rate": 1.0, "trust": "fixed"}
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as info:
        _prepare(run, steps=10, resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert f"(lr: 1.0 -> {now!r}); the defaults changed since the run started: " in (
        message
    )
    assert message.endswith("pass lr=1.0 to resume it as it ran")
    _prepare(run, steps=10, lr=1.0, resume=True)  # as it ran: resumes
    # A recorded default that still resolves the same resumes as before.
    saved["resolved"] = {"learning_rate": now, "trust": "fixed"}
    (run / "config.json").write_text(json.dumps(saved))
    _prepare(run, steps=10, resume=True)


def test_a_file_or_an_uncreatable_path_is_refused(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        _prepare(file)
    with pytest.raises(ConfigError, match="cannot create out="):
        _prepare(file / "run")
    assert file.read_text() == "x"


def test_resume_without_a_checkpoint_starts_at_step_zero_and_says_so(tmp_path, capsys):
    from eqx_gn.lm import train

    config = TrainConfig(
        optimizer="adamw", steps=2, batch_size=8, seq_len=16, eval_every=0,
        eval_batches=1, eval_batch_size=8, progress=False, resume=True,
        out=str(tmp_path / "new"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 2 and summary["completed"]
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "starting at step 0" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_a_run_whose_config_json_is_broken_is_named_so_and_kept(tmp_path, flags):
    # Before: "holds config.json, metrics.jsonl, checkpoints but is not an eqx-gn
    # run", as if the directory were another tool's.
    run = tmp_path / "run"
    _fake_run(run)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])  # a half-written edit
    before = {p: p.stat().st_size for p in run.rglob("*")}
    with pytest.raises(ConfigError) as info:
        _prepare(run, **flags)
    message = str(info.value)
    assert "\n" not in message and "is not an eqx-gn run" not in message
    assert "config.json is not valid JSON (line 1, column " in message
    assert "repair config.json" in message
    assert {
        p: p.stat().st_size for p in run.rglob("*") if p.name != ".eqx-gn.lock"
    } == {p: size for p, size in before.items() if p.name != ".eqx-gn.lock"}


@pytest.mark.parametrize("visible", [1, 2])
def test_too_few_devices_are_counted_in_good_english(monkeypatch, visible):
    # Before: "needs 4 devices but only 1 are visible".
    import jax

    from eqx_gn.lm.run._parallel import make_mesh

    devices = jax.devices()[:visible]
    monkeypatch.setattr(jax, "devices", lambda: devices)
    verb = "is" if visible == 1 else "are"
    with pytest.raises(
        ConfigError, match=f"needs 4 devices but only {visible} {verb} visible"
    ):
        make_mesh(TrainConfig(data_parallel=4))


#: (TrainConfig settings, the same as eqx-gn train flags, the error in Python's
#: words, the error in the command line's words).
_NAMED = [
    (
        dict(batch_size=10, micro_batches=3),
        ["--batch-size", "10", "--micro-batches", "3"],
        "batch_size=10 is not divisible by micro_batches=3",
        "--batch-size 10 is not divisible by --micro-batches 3",
    ),
    (
        dict(solver="cg", lr=0.1),
        ["--solver", "cg", "--lr", "0.1"],
        "lr does not apply to solver 'cg' (CG has no learning rate; its step comes "
        "from the damped GN system: set cg_damping)",
        "--lr does not apply to solver 'cg' (CG has no learning rate; its step "
        "comes from the damped GN system: set --cg-damping)",
    ),
    (
        dict(optimizer="adamw", trust="fixed"),
        ["--optimizer", "adamw", "--trust", "fixed"],
        "trust applies to optimizer 'gn' only",
        "--trust applies to optimizer 'gn' only",
    ),
    (
        dict(eval_resolution=0.1),
        ["--eval-resolution", "0.1"],
        "eval_resolution needs a target_loss",
        "--eval-resolution needs a --target-loss",
    ),
    (
        dict(optimizer="adamw", batch_size=10, grad_accumulation=3),
        ["--optimizer", "adamw", "--batch-size", "10", "--grad-accumulation", "3"],
        "batch_size=10 is not divisible by grad_accumulation=3",
        "--batch-size 10 is not divisible by --grad-accumulation 3",
    ),
    (
        dict(resume=True, overwrite=True, out="somewhere"),
        ["--resume", "--overwrite", "--out", "somewhere"],
        "resume and overwrite exclude each other",
        "--resume and --overwrite exclude each other",
    ),
]


@pytest.mark.parametrize("settings, flags, in_python, on_the_command_line", _NAMED)
def test_errors_name_settings_the_way_they_were_set(
    capsys, settings, flags, in_python, on_the_command_line
):
    # Before: the command line's errors named settings by their Python names
    # ("batch_size=10 ... micro_batches=3") beside flags elsewhere ("--lr").
    from eqx_gn.lm import _cli

    with pytest.raises(ConfigError) as info:
        TrainConfig(**settings)
    assert in_python in str(info.value) and "--" not in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["train", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("eqx-gn train: error: ") and on_the_command_line in err
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", err), err  # no setting's own name
