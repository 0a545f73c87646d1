"""Loss-curve plots of run, compare and study directories made by hand."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from eqx_gn.lm.results._loss_curves import (
    WARMUP_LABEL,
    curvature_figure,
    curvature_series,
    default_title,
    gn_steps_figure,
    loss_figure,
    plot_runs,
    series,
)
from eqx_gn.lm.results._saved_runs import labels_for, load_runs

SEQ_LEN = 8
LS_TOKENS_PER_STEP = 16  # ls_batches * ls_batch_size * seq_len of the fixtures


def _records(
    *, batch: int, steps: int, warmup: int, gn: bool, rejected=(), eval_every=2
):
    """Metrics records as the runner writes them: training tokens per step
    ``batch * SEQ_LEN``, and on GN main steps cumulative ``ls_tokens``."""
    records, ls = [], 0
    for step in range(1, steps + 1):
        phase = "warmup" if step <= warmup else "main"
        record = {
            "step": step,
            "phase": phase,
            "tokens": step * batch * SEQ_LEN,
            "time_s": 0.5 * step,
            "lr": 0.01,
            "train_loss": 5.0 - 0.2 * step,
        }
        if gn and phase == "main":
            ls += LS_TOKENS_PER_STEP
            record["ls_tokens"] = ls
            record["rejected"] = step in rejected
            record["step_size"] = 0.0 if step in rejected else 1.0
        if step % eval_every == 0 or step in (warmup, steps):
            record["val_loss"] = 5.1 - 0.2 * step
        records.append(record)
    return records


def write_run(
    path: Path,
    optimizer: str = "adamw",
    *,
    blocks=None,
    solver=None,
    batch=4,
    steps=8,
    warmup=2,
    rejected=(),
    text=None,
    target=None,
    lr=0.01,
    summary=True,
) -> Path:
    gn = optimizer.startswith("gn")
    config = {
        "text": text,
        "tokenizer": "byte",
        "model": "tiny",
        "optimizer": optimizer,
        "batch_size": batch,
        "lr": lr,
        "steps": steps,
        "target_loss": target,
    }
    if blocks is not None:
        config |= {"blocks": blocks, "solver": solver}
    resolved = {
        "tokens_per_step": batch * SEQ_LEN,
        "seq_len": SEQ_LEN,
        "num_params": 1234,
        "warmup_steps": warmup,
        "devices": 1,
    }
    records = _records(
        batch=batch, steps=steps, warmup=warmup, gn=gn, rejected=rejected
    )
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"config": config, "resolved": resolved})
    )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        # An old summary: no label, blocks, solver or rejected_steps.
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "optimizer": optimizer,
                    "model": "tiny",
                    "steps": steps,
                    "warmup_steps": warmup,
                    "tokens": records[-1]["tokens"],
                    "ls_tokens": records[-1].get("ls_tokens", 0),
                    "final_val_loss": records[-1]["val_loss"],
                    "target_loss": target,
                    "out": str(path),
                }
            )
        )
    return path


def write_compare(path: Path, *, moved=True, target=None) -> Path:
    """A compare directory with adamw and GN (layerwise, prox) runs; with
    ``moved`` its compare.json names the runs where they were before the
    directory was moved."""
    runs = [
        write_run(path / "adamw", target=target),
        write_run(
            path / "gn",
            "gn",
            blocks="layerwise",
            solver="prox",
            rejected={3, 4, 5},
            target=target,
        ),
    ]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    if moved:
        for s in summaries:
            s["out"] = f"/somewhere/else/{Path(s['out']).name}"
    (path / "compare.json").write_text(json.dumps(summaries))
    return path


def _curve(records):
    keys = ("step", "phase", "tokens", "ls_tokens", "time_s", "train_loss", "val_loss")
    return {k: [r.get(k) for r in records] for k in keys}


def write_study(path: Path) -> Path:
    """A study directory in the new format: adamw at two learning rates and GN
    at batch 8, adamw at batch 4, GN at batch 16 (best: fewest steps to the
    target)."""
    runs = []
    for name, method, batch, lr, steps_to_target, best in [
        ("adamw_b4_lr0.01", "adamw", 4, 0.01, 4, 3.0),
        ("adamw_b8_lr0.01", "adamw", 8, 0.01, None, 3.5),
        ("adamw_b8_lr0.03", "adamw", 8, 0.03, 6, 3.0),
        ("gn_b8_lr0.1", "gn", 8, 0.1, 5, 3.1),
        # A larger batch for one method only: not the default.
        ("gn_b16_lr0.1", "gn", 16, 0.1, 3, 3.0),
    ]:
        gn = method == "gn"
        records = _records(batch=batch, steps=8, warmup=2, gn=gn, rejected={4})
        config = {"model": "tiny", "optimizer": method, "batch_size": batch, "lr": lr}
        config |= {"text": None, "target_loss": 3.0}
        if gn:
            config |= {"blocks": "full", "solver": "inner"}
        runs.append(
            {
                "name": name,
                "method": method,
                "batch_size": batch,
                "seed": 0,
                "hyperparameters": {"lr": lr},
                "config": config,
                "resolved": {"tokens_per_step": batch * SEQ_LEN, "warmup_steps": 2},
                # The study's target, not the run's own (None): the entry's
                # steps_to_target is the one that counts.
                "steps_to_target": steps_to_target,
                "best_val_loss": best,
                "summary": {"steps_to_target": None, "best_val_loss": 9.0},
                "curve": _curve(records),
            }
        )
    path.mkdir(parents=True)
    study = {"target": 3.0, "settings": {"model": "tiny"}, "runs": runs}
    (path / "study.json").write_text(json.dumps(study))
    return path


def test_run_directory_in_png_pdf_and_svg(tmp_path):
    run = write_run(tmp_path / "run", target=3.5)
    out = tmp_path / "plots"
    paths = plot_runs([run], out, formats=("png", "pdf", "svg"))
    expected = {
        out / f"loss_vs_{axis}.{fmt}"
        for axis in ("steps", "tokens", "time")
        for fmt in ("png", "pdf", "svg")
    }
    assert set(paths) == expected
    for path in expected:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        elif path.suffix == ".pdf":
            assert data.startswith(b"%PDF")
        else:
            assert ET.fromstring(data).tag.endswith("svg")


def test_unknown_format_is_one_line(tmp_path):
    run = write_run(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown plot format 'jpg'") as info:
        plot_runs([run], tmp_path / "plots", formats=("png", "jpg"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("exists", [True, False])
def test_bad_directory_is_one_line_naming_it(tmp_path, exists):
    path = tmp_path / "nothing"
    if exists:
        path.mkdir()
        (path / "notes.txt").write_text("not a run")
    with pytest.raises(FileNotFoundError) as info:
        load_runs(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "not a run directory" in message


def test_compare_directory_moved_elsewhere(tmp_path):
    source = load_runs(write_compare(tmp_path / "cmp"))
    assert source.kind == "compare"
    assert [r.label for r in source.runs] == ["adamw", "gn layerwise prox"]
    # An old summary is completed from the metrics: three rejected steps.
    assert source.runs[1].summary["rejected_steps"] == 3
    assert source.runs[0].summary["rejected_steps"] is None
    paths = plot_runs([tmp_path / "cmp"], tmp_path / "cmp")
    assert {p.name for p in paths} == {
        "loss_vs_steps.png",
        "loss_vs_tokens.png",
        "loss_vs_time.png",
    }


def test_tokens_axis_adds_line_search_tokens(tmp_path):
    runs = load_runs(write_compare(tmp_path / "cmp")).runs
    adamw, gn = runs
    # Oracle: step * batch * seq_len training tokens; GN adds 16 per main step.
    x, _, _, _ = series(gn, "tokens")
    assert x == [
        step * 4 * SEQ_LEN + max(step - 2, 0) * LS_TOKENS_PER_STEP
        for step in range(1, 9)
    ]
    assert series(adamw, "tokens")[0] == [step * 4 * SEQ_LEN for step in range(1, 9)]
    _, _, x_val, val = series(gn, "steps")
    assert x_val == [2, 4, 6, 8]
    assert val == pytest.approx([5.1 - 0.2 * s for s in (2, 4, 6, 8)])
    fig = loss_figure(runs, "tokens", labels=["a", "b"], title="t")
    assert fig.axes[0].get_xlabel() == "tokens read (training + line search)"


@pytest.mark.parametrize("log_y", [False, True])
def test_log_y(tmp_path, log_y):
    runs = load_runs(write_compare(tmp_path / "cmp")).runs
    fig = loss_figure(runs, "steps", labels=["a", "b"], title="t", log_y=log_y)
    assert fig.axes[0].get_yscale() == ("log" if log_y else "linear")


def _reference_lines(fig, label_start):
    ax = fig.axes[0]
    return [line for line in ax.get_lines() if line.get_label().startswith(label_start)]


def test_one_gray_labelled_warmup_line_and_target(tmp_path):
    runs = load_runs(write_compare(tmp_path / "cmp", target=3.5)).runs
    fig = loss_figure(runs, "steps", labels=["a", "b"], title="t", targets=[3.5, 3.5])
    warmup = _reference_lines(fig, WARMUP_LABEL)
    assert len(warmup) == 1
    (line,) = warmup
    assert line.get_label() == "end of AdamW warm-up"
    assert line.get_color() == "gray"
    assert line.get_linestyle() == ":"
    assert list(line.get_xdata()) == [2, 2]
    (target,) = _reference_lines(fig, "target loss")
    assert target.get_label() == "target loss 3.5"
    assert list(target.get_ydata()) == [3.5, 3.5]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a", "b", "end of AdamW warm-up", "target loss 3.5"]
    # On the tokens axis the warm-up ends at 2 steps of 4 x 8 tokens.
    fig = loss_figure(runs, "tokens", labels=["a", "b"], title="t")
    (line,) = _reference_lines(fig, WARMUP_LABEL)
    assert list(line.get_xdata()) == [64, 64]


def test_one_warmup_line_per_distinct_step(tmp_path):
    runs = [
        load_runs(write_run(tmp_path / "a", warmup=2)).runs[0],
        load_runs(write_run(tmp_path / "b", "muon", warmup=3)).runs[0],
    ]
    fig = loss_figure(runs, "steps", labels=["a", "b"], title="t")
    lines = _reference_lines(fig, WARMUP_LABEL)
    assert sorted(line.get_xdata()[0] for line in lines) == [2, 3]
    assert {line.get_color() for line in lines} == {"gray"}


def test_labels_and_title_from_the_runs(tmp_path):
    corpus = tmp_path / "poems.txt"
    runs = [
        write_run(tmp_path / "r1", "gn-prox", rejected={3}),  # old optimizer name
        write_run(tmp_path / "r2", "gn", blocks="layerwise", solver="inner"),
        write_run(tmp_path / "r3", "adamw", lr=0.01),
        write_run(tmp_path / "r4", "adamw", lr=0.03),
    ]
    loaded = [load_runs(r).runs[0] for r in runs]
    assert labels_for(loaded) == [
        "gn prox",
        "gn layerwise",
        "adamw, lr 0.01",
        "adamw, lr 0.03",
    ]
    assert default_title(loaded) == (
        "tiny model, 32 tokens per step (4 sequences), Shakespeare"
    )
    other = load_runs(write_run(tmp_path / "r5", text=str(corpus), batch=8)).runs[0]
    title = default_title([other])
    assert title == "tiny model, 64 tokens per step (8 sequences), poems.txt"


def test_study_directory_best_run_per_method_at_the_largest_batch(tmp_path):
    study = write_study(tmp_path / "study")
    source = load_runs(study)
    assert source.kind == "study"
    assert [r.name for r in source.runs] == ["adamw_b8_lr0.03", "gn_b8_lr0.1"]
    assert "best run per method at the largest batch of all methods" in source.note
    gn = source.runs[1]
    assert gn.label == "gn"
    assert series(gn, "tokens")[0][-1] == 8 * 8 * SEQ_LEN + 6 * LS_TOKENS_PER_STEP
    everything = load_runs(study, select="all")
    assert labels_for(everything.runs) == ["adamw, lr 0.01", "adamw, lr 0.03", "gn"]
    assert [r.name for r in load_runs(study, batch_size=16).runs] == ["gn_b16_lr0.1"]
    small = load_runs(study, batch_size=4)
    assert [r.name for r in small.runs] == ["adamw_b4_lr0.01"]
    with pytest.raises(
        ValueError, match=r"no runs at batch size 32 \(it has 4, 8, 16\)"
    ):
        load_runs(study, batch_size=32)
    paths = plot_runs([study], tmp_path / "plots", log_y=True, formats=("svg",))
    assert len(paths) == 3
    assert default_title(source.runs, source.note) == (
        "tiny model, 64 tokens per step (8 sequences), Shakespeare\n"
        "study: best run per method at the largest batch of all methods"
    )


def test_runs_from_several_sources_and_given_labels(tmp_path):
    cmp = write_compare(tmp_path / "cmp")
    extra = write_run(tmp_path / "extra", "soap")
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        plot_runs([cmp, extra], tmp_path / "plots", labels=["a", "b"])
    paths = plot_runs([cmp, extra], tmp_path / "plots", labels=["a", "b", "c"])
    assert len(paths) == 3


@pytest.mark.parametrize("with_chosen", [False, True])
def test_study_best_run_is_one_the_study_chose_from(tmp_path, with_chosen):
    """A layout run (a baseline rerun with gradient accumulation) that reaches
    the target sooner than every search run is not the method's best: the study
    chooses among its grid and refinement runs (``role``), or names its choice
    in ``chosen``."""
    study = write_study(tmp_path / "study")
    data = json.loads((study / "study.json").read_text())
    layout = json.loads(json.dumps(data["runs"][2]))  # adamw_b8_lr0.03
    layout |= {"name": "adamw_b8_lr0.03_A4", "steps_to_target": 2}
    if not with_chosen:  # with `chosen`, no roles: the choice alone must tell
        for entry in data["runs"]:
            entry["role"] = "grid"
        layout["role"] = "layout"
    layout["config"]["grad_accumulation"] = 4
    layout["hyperparameters"]["grad_accumulation"] = 4
    data["runs"].append(layout)
    if with_chosen:
        data["chosen"] = {
            "adamw": {"4": {"run": "adamw_b4_lr0.01"}, "8": {"run": "adamw_b8_lr0.03"}},
            "gn": {"8": {"run": "gn_b8_lr0.1"}, "16": {"run": "gn_b16_lr0.1"}},
        }
    (study / "study.json").write_text(json.dumps(data))
    source = load_runs(study)
    assert [r.name for r in source.runs] == ["adamw_b8_lr0.03", "gn_b8_lr0.1"]
    assert source.runs[0].summary["steps_to_target"] == 6
    # Every run at the batch size is still there when asked for all of them.
    everything = load_runs(study, select="all")
    assert "adamw_b8_lr0.03_A4" in [r.name for r in everything.runs]


def test_gn_steps_figure_when_a_run_recorded_its_trust_scale(tmp_path):
    # Old GN runs (no trust_scale) get no such figure; a run with one does, with
    # one point per main step and its rejections marked.
    old = write_run(tmp_path / "old", "gn", steps=6, rejected=(4,))
    out = tmp_path / "plots_old"
    assert not any("gn_steps" in p.name for p in plot_runs([old], out))
    new = write_run(tmp_path / "new", "gn", steps=6, rejected=(4,))
    records = [json.loads(line) for line in (new / "metrics.jsonl").open()]
    scale = 1.0
    for r in records:
        if r["phase"] == "main":
            r["trust_scale"] = scale
            scale = scale / 16 if r["rejected"] else min(1.0, 1.5 * scale)
    (new / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "plots_new"
    paths = plot_runs([old, new], out, formats=("png", "svg"))
    assert {out / "gn_steps.png", out / "gn_steps.svg"} <= set(paths)
    assert (out / "gn_steps.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    runs = load_runs(new).runs
    top, bottom = gn_steps_figure(runs, labels=["gn"], title="t").axes
    assert bottom.get_ylabel() == "trust scale"
    taken, rejected = top.get_lines()
    assert list(taken.get_xdata()) == [3, 5, 6]  # main steps 3-6 but 4 rejected
    assert list(rejected.get_xdata()) == [4]
    (scales,) = bottom.get_lines()
    assert list(scales.get_ydata()) == [1.0, 1.0, 1 / 16, 1.5 / 16]


def _add_curvature(path: Path, every: int, blocks=None) -> list[dict]:
    """Curvature records every ``every`` steps, as ``--curvature-every`` writes them
    (with ``blocks``, per-block traces as a layerwise run's); returns them."""
    records = [json.loads(line) for line in (path / "metrics.jsonl").open()]
    added = []
    for r in records:
        if r["step"] % every:
            continue
        s = r["step"]
        r["curvature_top"] = [100.0 / s, 50.0 / s, 20.0 / s]
        r["curvature_trace"] = 1000.0 / s
        r["curvature_trace_stderr"] = 10.0 / s
        if blocks is not None:
            r["curvature_blocks"] = list(blocks)
            r["curvature_block_traces"] = [
                (k + 1) * 1000.0 / s / 10 for k in range(len(blocks))
            ]
        added.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return added


def test_curvature_figure_draws_the_records(tmp_path):
    # Runs without curvature records get no curvature figure; with them, the
    # figure's lines are the records: eigenvalues and trace against the step, and
    # a layerwise run's block traces in a second panel, one line per block.
    plain = write_run(tmp_path / "plain", steps=6)
    out = tmp_path / "plots_plain"
    assert not any("curvature" in p.name for p in plot_runs([plain], out))
    full = write_run(tmp_path / "full", steps=6)
    full_records = _add_curvature(full, 2)
    out = tmp_path / "plots_full"
    paths = plot_runs([plain, full], out, formats=("png", "svg"))
    assert {out / "curvature.png", out / "curvature.svg"} <= set(paths)
    assert (out / "curvature.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    (ax,) = curvature_figure(load_runs(full).runs, labels=["adamw"], title="t").axes
    first, second, third, trace = ax.get_lines()
    assert list(first.get_xdata()) == [2, 4, 6]
    assert list(first.get_ydata()) == [r["curvature_top"][0] for r in full_records]
    assert list(second.get_ydata()) == [r["curvature_top"][1] for r in full_records]
    assert list(third.get_ydata()) == [r["curvature_top"][2] for r in full_records]
    assert list(trace.get_ydata()) == [r["curvature_trace"] for r in full_records]

    names = ["embedding", "block0", "block1", "head"]
    layerwise = write_run(
        tmp_path / "layerwise", "gn", blocks="layerwise", solver="inner", steps=6
    )
    records = _add_curvature(layerwise, 3, blocks=names)
    runs = load_runs(layerwise).runs
    data = curvature_series(runs[0])
    assert data["step"] == [3, 6]
    assert data["blocks"] == names
    assert data["block_traces"]["head"] == [
        r["curvature_block_traces"][3] for r in records
    ]
    top, bottom = curvature_figure(runs, labels=["gn"], title="t").axes
    assert len(top.get_lines()) == 4  # three eigenvalues and the trace
    assert [line.get_label() for line in bottom.get_lines()] == names
    for line, k in zip(bottom.get_lines(), range(4), strict=True):
        assert list(line.get_xdata()) == [3, 6]
        assert list(line.get_ydata()) == [
            r["curvature_block_traces"][k] for r in records
        ]
    out = tmp_path / "plots_layerwise"
    assert out / "curvature.png" in plot_runs([layerwise], out)
