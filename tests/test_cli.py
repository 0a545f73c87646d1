"""The ``eqx-gn`` command line, run in subprocesses as a user would."""

import json
import subprocess
import sys

import pytest

from compile_flags import subprocess_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return subprocess_env(EQX_GN_CACHE=str(cache))


def eqx_gn(env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "eqx_gn.lm._cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_commands_and_options(env):
    top = eqx_gn(env, "--help")
    assert top.returncode == 0
    for command in ("train", "compare", "plot", "curvature"):
        assert command in top.stdout
    curvature = eqx_gn(env, "curvature", "--help")
    assert curvature.returncode == 0
    for flag in ("RUN_DIR", "--matrix", "--probes", "--iterations", "--top", "--out"):
        assert flag in curvature.stdout, flag
    train = eqx_gn(env, "train", "--help")
    assert train.returncode == 0
    for flag in (
        "--text",
        "--tokenizer",
        "--vocab-size",
        "--optimizer",
        "--blocks",
        "--solver",
        "--cg-damping",
        "--cg-iterations",
        "--model",
        "--steps",
        "--batch-size",
        "--micro-batches",
        "--ls-batches",
        "--seq-len",
        "--lr",
        "--warmup-fraction",
        "--eval-every",
        "--curvature-every",
        "--checkpoint-every",
        "--target-loss",
        "--seed",
        "--out",
        "--resume",
        "--mesh",
        "--distributed",
        "--coordinator-address",
        "--no-progress",
    ):
        assert flag in train.stdout, flag
    # --out names one default (the command's), and --no-progress does not read as
    # a progress bar; the epilog says what the behaviour is: other files are kept.
    help_text = " ".join(train.stdout.split())
    assert "runs/METHOD-DATE-TIME" in help_text and "runs/eqx-gn" not in help_text
    assert "--no-progress a progress bar" not in help_text
    assert "any other files in it are left alone" in help_text
    assert "a directory holding other files is refused" not in help_text


def test_plot_into_an_unwritable_directory_is_one_line(tmp_path, capsys, monkeypatch):
    # Run as root here, so the directory is made unwritable by the plotter failing
    # as matplotlib does on a read-only directory.
    from eqx_gn.lm import _cli
    from eqx_gn.lm.results import _loss_curves as _plot

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_plot, "plot_runs", refuse)
    with pytest.raises(SystemExit) as info:
        _cli.main(["plot", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the figures into" in err[0]


def test_train_defaults_on_a_cut_down_budget(env, tmp_path):
    out = tmp_path / "run"
    result = eqx_gn(
        env, "train", "--steps", 3, "--eval-every", 3, "--batch-size", 8,
        "--out", out, "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Without a progress bar: a start line, then a line per evaluation.
    start, *evaluations = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("start", "step"))
    ]
    assert start.startswith("start: gn; tiny model") and "Shakespeare" in start
    assert [line.split()[1] for line in evaluations] == ["1/3", "3/3"]
    assert "gn on the tiny model" in result.stdout
    assert "final validation loss" in result.stdout
    assert str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "gn" and summary["steps"] == 3
    assert summary["final_val_loss"] < 5.55  # below the uniform loss, log(257)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == ["warmup", "main", "main"]
    assert (out / "checkpoints" / "3").is_dir()
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["micro_batch_size"] == 1

    # The finished run resumes to the same summary; a second plain run refuses.
    again = eqx_gn(env, "train", "--out", out, "--resume", "--no-progress",
                   "--steps", 3, "--eval-every", 3, "--batch-size", 8)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    taken = eqx_gn(env, "train", "--out", out, "--no-progress")
    assert taken.returncode == 2
    assert "already holds a run" in taken.stderr


def test_compare_methods_then_plot(env, tmp_path):
    out = tmp_path / "cmp"
    result = eqx_gn(
        env, "compare", "--methods", "adamw,gn-layerwise-prox", "--steps", 3,
        "--batch-size", 8, "--micro-batches", 4, "--eval-every", 3,
        "--eval-batches", 2, "--seq-len", 32, "--target-loss", 1.0,
        "--lr", "adamw=0.003,gn-layerwise-prox=0.03", "--out", out, "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("method") :].splitlines()
    header, _, *rows = table[:4]
    assert header.split()[:3] == ["method", "final", "val"]
    assert "steps to target" in header and "rejected" in header
    assert [row[: len("gn layerwise prox")] for row in rows] == [
        "adamw            ",
        "gn layerwise prox",
    ]
    settings = {"adamw": ("adamw", "full", "inner"),
                "gn-layerwise-prox": ("gn", "layerwise", "prox")}  # fmt: skip
    for name, (optimizer, blocks, solver) in settings.items():
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 3 and not summary["target_reached"]
        config = json.loads((out / name / "config.json").read_text())["config"]
        assert config["batch_size"] == 8
        assert (config["optimizer"], config["blocks"], config["solver"]) == (
            optimizer, blocks, solver,
        )  # fmt: skip
    assert len(json.loads((out / "compare.json").read_text())) == 2
    for axis in ("steps", "tokens", "time"):
        assert (out / f"loss_vs_{axis}.png").read_bytes().startswith(PNG_MAGIC)

    # A compare directory plots as a whole.
    plots = tmp_path / "plots"
    result = eqx_gn(env, "plot", out, "--out", plots)
    assert result.returncode == 0, result.stderr[-3000:]
    for axis in ("steps", "tokens", "time"):
        png = plots / f"loss_vs_{axis}.png"
        assert png.stat().st_size > 1000
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert str(png) in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--text", "/no/such/corpus.txt"], "does not exist"),
        (
            ["train", "--batch-size", 10, "--micro-batches", 4],
            "--batch-size 10 is not divisible by --micro-batches 4",
        ),
        (["train", "--steps", "many"], "--steps: expected an integer"),
        (["train", "--mesh", "model=2"], "--mesh: expected data=N"),
        (["compare", "--optimizers", "adamw,sgd"], "unknown method 'sgd'"),
        (["compare", "--methods", "gn-cg", "--lr", "0.1"], "--lr does not apply"),
        (
            ["train", "--optimizer", "adamw", "--blocks", "layerwise"],
            "--blocks applies to optimizer 'gn' only",
        ),
        (["train", "--solver", "newton"], "invalid choice: 'newton'"),
        (["plot", "/no/such/run"], "not a run directory"),
        (["train", "--out", "TMP:/a_file"], "is a file, not a directory"),
        (["train", "--out", "TMP:/a_file/run"], "cannot create --out "),
        (["plot", "TMP:/", "--format", "gif"], "--format 'gif'"),
        (["plot", "TMP:/", "--out", "TMP:/a_file"], "is a file; plot writes its"),
        (["study", "--report-only", "--out", "TMP:/"], "no study in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, args, message):
    (tmp_path / "a_file").write_text("x")
    args = [str(tmp_path / a[5:]) if str(a).startswith("TMP:/") else a for a in args]
    if "--out" not in args:
        args += ["--out" if args[0] != "plot" else "--title", tmp_path / "out"]
    result = eqx_gn(env, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"eqx-gn {args[0]}: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_compare_gives_gn_settings_to_the_methods_they_apply_to():
    # `compare --methods adamw,gn,gn-cg --line-search grid --cg-damping 0.01`: each
    # method's configuration is valid and keeps the settings that apply to it.
    from eqx_gn.lm import TrainConfig, parse_method
    from eqx_gn.lm._cli import applicable

    values = {"steps": 3, "line_search": "grid", "cg_damping": 0.01}
    configs = {
        m: TrainConfig(**applicable(values, parse_method(m)), **parse_method(m))
        for m in ("adamw", "gn", "gn-cg")
    }
    assert configs["adamw"].line_search is None
    assert configs["gn"].line_search_rule == configs["gn-cg"].line_search_rule == "grid"
    assert configs["gn"].cg_damping == TrainConfig().cg_damping
    assert configs["gn-cg"].cg_damping == 0.01
    assert {c.steps for c in configs.values()} == {3}


def test_ctrl_c_is_one_line_and_the_run_resumes(env, tmp_path):
    # Ctrl-C while checkpointing at every step: before, orbax's writer threads
    # printed tracebacks of the cut-short write (7 to 36 lines in 3 of 7 tries)
    # or kept the process waiting; now the run stops between two steps.
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "eqx_gn.lm._cli", "train", "--out", str(out)]
    args += ["--optimizer", "adamw", "--model", "tiny", "--steps", "100000"]
    args += ["--batch-size", "16", "--checkpoint-every", "1"]
    # The first evaluation's line says the run is training: each try waits for it,
    # then lets the run go on for a while, checkpointing at every step.
    args += ["--no-progress", "--eval-every", "2", "--eval-batches", "1"]
    args += ["--eval-batch-size", "8"]
    for i, delay in enumerate((0.1, 0.2, 0.3, 0.5, 0.7, 1.0)):
        process = subprocess.Popen(
            [*args, "--resume"] if i else args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # No preexec_fn (a fork of this multithreaded process must not run
            # Python): eqx-gn train installs its own SIGINT handler, which holds
            # even where a runner started in the background left SIGINT ignored.
        )
        while not process.stdout.readline().startswith("step"):
            assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130, err[-2000:]
        assert err.strip().splitlines() == [
            f"eqx-gn train: interrupted; continue with --resume --out {out}"
        ]
    # Each try resumed the last; the metrics are one run's, step after step.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1


def test_ctrl_c_checkpoints_the_step_it_stops_at(env, tmp_path):
    # With the default --checkpoint-every 50, Ctrl-C at step ~5 left no
    # checkpoint: --resume said "no checkpoint ... starting at step 0".
    import signal

    from eqx_gn.lm import Checkpointer

    out = tmp_path / "run"
    args = [sys.executable, "-m", "eqx_gn.lm._cli", "train", "--out", str(out)]
    args += ["--optimizer", "adamw", "--model", "tiny", "--seq-len", "32"]
    args += ["--steps", "1000", "--batch-size", "8", "--no-progress"]
    args += ["--eval-every", "2", "--eval-batches", "1", "--eval-batch-size", "8"]
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not process.stdout.readline().startswith("step"):
        assert process.poll() is None, process.stderr.read()[-2000:]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [
        f"eqx-gn train: interrupted; continue with --resume --out {out}"
    ]
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) < 50
    checkpointer = Checkpointer(out / "checkpoints")
    try:
        assert checkpointer.all_steps() == [steps[-1]]
    finally:
        checkpointer.close()
    stop = steps[-1] + 2
    resumed = eqx_gn(env, *args[3:], "--resume", "--stop-after", stop)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no checkpoint" not in resumed.stderr
    again = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert again == list(range(1, stop + 1))


@pytest.mark.parametrize(
    "args, flag",
    [
        (["study", "--runs", "2"], "--runs"),
        (["train", "--step", "5"], "--step"),
        (["compare", "--methods", "adamw", "--batch", "8"], "--batch"),
        (["plot", "run", "--log"], "--log"),
    ],
)
def test_abbreviated_flags_are_refused_in_one_line(capsys, args, flag):
    # Before, argparse took a prefix: `study --runs 2` was `--runs-dir 2`, and
    # wrote its runs into ./2.
    from eqx_gn.lm._cli import _parser

    with pytest.raises(SystemExit) as info:
        _parser().parse_args(args)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"unrecognized arguments: {flag}" in lines[0]


def test_study_help_shows_defaults_and_takes_a_tokenizer_file(capsys):
    # Before: no defaults, and --tokenizer offered byte|bpe only.
    from eqx_gn.lm._cli import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 150)", "(default: 3)", "(default: 8,16,32,64,128,256)"):
        assert default in text, default
    assert "tokenizer.json" in text and "(default: byte)" in text
    args = _parser().parse_args(["study", "--tokenizer", "my/tokenizer.json"])
    assert args.tokenizer == "my/tokenizer.json"
