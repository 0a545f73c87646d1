"""What the runner prints: summaries, the compare table, start and eval lines."""

import pytest

from eqx_gn.lm.run._console import (
    compare_table,
    complete_summary,
    corpus_name,
    eval_line,
    run_label,
    start_line,
    summary_text,
)


def _summary(optimizer, **extra):
    return {
        "optimizer": optimizer,
        "model": "tiny",
        "num_params": 1_234_567,
        "completed": True,
        "steps": 20,
        "warmup_steps": 2,
        "tokens": 81_920,
        "ls_tokens": 0,
        "time_s": 12.34,
        "compile_s": 3.0,
        "eval_s": 1.0,
        "wall_s": 20.0,
        "final_val_loss": 2.5,
        "best_val_loss": 2.4,
        "final_train_loss": 2.6,
        "target_loss": None,
        "target_reached": False,
        "steps_to_target": None,
        "tokens_to_target": None,
        "time_to_target": None,
        "out": "runs/x",
    } | extra


GN = _summary(
    "gn",
    blocks="layerwise",
    solver="prox",
    label="gn layerwise prox",
    rejected_steps=8,
    ls_tokens=36_864,
)


@pytest.mark.parametrize(
    ("settings", "label"),
    [
        ({"optimizer": "adamw"}, "adamw"),
        ({"optimizer": "gn", "blocks": "full", "solver": "inner"}, "gn"),
        ({"optimizer": "gn"}, "gn"),
        (
            {"optimizer": "gn", "blocks": "layerwise", "solver": "prox"},
            "gn layerwise prox",
        ),
        ({"optimizer": "gn", "blocks": "full", "solver": "cg"}, "gn cg"),
        ({"optimizer": "gn-layerwise"}, "gn layerwise"),
        ({"optimizer": "gn-prox"}, "gn prox"),
        ({"method": "muon"}, "muon"),
        ({"method": "gn-layerwise-cg"}, "gn layerwise cg"),
        (
            {"optimizer": "gn", "blocks": "full", "solver": "inner", "inner": "soap"},
            "gn soap",
        ),
        ({"method": "gn-layerwise-psgd"}, "gn layerwise psgd"),
        ({"method": "gn-prox-adamw", "solver": "prox"}, "gn prox adamw"),
        ({"optimizer": "gn", "label": "my gn"}, "my gn"),
    ],
)
def test_run_label(settings, label):
    assert run_label(settings) == label


def test_corpus_name():
    assert corpus_name(None) == "Shakespeare"
    assert corpus_name("/data/books/poems.txt") == "poems.txt"
    assert corpus_name("/data/books/") == "books"


def _cells(table, name):
    (row,) = [line for line in table.splitlines() if line.startswith(name + "  ")]
    return row.split("  ")


def test_compare_table_shows_rejected_steps_and_line_search_tokens():
    table = compare_table([_summary("adamw"), GN])
    header = table.splitlines()[0]
    assert "rejected" in header
    assert "ls tokens" in header
    gn = [c.strip() for c in _cells(table, "gn layerwise prox") if c.strip()]
    # 8 of the 18 GN steps (20 steps, 2 of warm-up) were rejected.
    assert "8/18" in gn
    assert "36,864" in gn
    adamw = [c.strip() for c in _cells(table, "adamw") if c.strip()]
    columns = [c.strip() for c in header.split("  ") if c.strip()]
    assert adamw[columns.index("rejected")] == "-"
    assert adamw[columns.index("ls tokens")] == "-"
    assert gn[columns.index("rejected")] == "8/18"
    assert gn[columns.index("ls tokens")] == "36,864"
    # Every line has the same width: the columns line up.
    assert len({len(line.rstrip()) for line in table.splitlines()}) == 1


def test_old_summary_is_completed_from_config_and_metrics():
    old = _summary("gn-prox", ls_tokens=None)
    records = [{"step": 1, "phase": "warmup"}] + [
        {"step": s, "phase": "main", "rejected": s in (3, 4, 10), "ls_tokens": 64 * s}
        for s in range(2, 11)
    ]
    done = complete_summary(old, {"optimizer": "gn-prox"}, records)
    assert done["label"] == "gn prox"
    assert (done["blocks"], done["solver"]) == ("full", "prox")
    assert done["rejected_steps"] == 3
    assert done["ls_tokens"] == 640
    first_order = complete_summary(_summary("adamw"), {}, [{"step": 1}])
    assert first_order["rejected_steps"] is None
    assert first_order["label"] == "adamw"


def test_summary_text_mentions_rejected_steps_and_line_search_tokens():
    text = summary_text(GN)
    assert text.splitlines()[0].startswith("gn layerwise prox on the tiny model")
    assert "1,234,567 parameters" in text
    assert "81,920 training + 36,864 line search = 118,784 read" in text
    assert "rejected GN steps      8 of 18" in text
    # 8 of 18 is more than a third: the summary says what rejections point to,
    # a rate off its default either way (not "lower --lr": far below the default
    # GN rejects steps too). 6 of 18, as the default can reject, says nothing.
    assert "many steps rejected" in text and "above it" in text and "below it" in text
    assert "many steps" not in summary_text({**GN, "rejected_steps": 6})
    assert "target" not in text
    adamw = summary_text(_summary("adamw"))
    assert "rejected" not in adamw
    assert "line search" not in adamw
    reached = summary_text(
        _summary(
            "adamw",
            target_loss=2.5,
            steps_to_target=15,
            tokens_to_target=61_440,
            time_to_target=9.25,
        )
    )
    assert "reached at step 15 (61,440 tokens read, 9.2 s)" in reached
    # An old, sparse summary still prints.
    assert "adamw on the tiny model" in summary_text(
        {"optimizer": "adamw", "model": "tiny"}
    )


def test_start_line_has_the_numbers():
    line = start_line(
        {
            "label": "gn layerwise prox",
            "model": "tiny",
            "num_params": 1_234_567,
            "corpus": "Shakespeare",
            "train_tokens": 1_003_854,
            "validation_tokens": 111_540,
            "tokens_per_step": 4096,
            "devices": 8,
            "steps": 300,
        }
    )
    assert "\n" not in line
    for piece in (
        "gn layerwise prox",
        "tiny model, 1,234,567 (1.2M) parameters",
        "corpus Shakespeare (1,003,854 training + 111,540 validation tokens)",
        "300 steps x 4,096 tokens = 1,228,800 training tokens",
        "8 devices",
    ):
        assert piece in line
    assert "1 device" in start_line({"label": "adamw", "devices": 1})
    assert "devices" not in start_line({"label": "adamw", "devices": 1})


def test_eval_line_has_the_numbers_and_marks_rejected_steps():
    record = {
        "step": 40,
        "phase": "main",
        "tokens": 163_840,
        "ls_tokens": 81_920,
        "time_s": 12.345,
        "train_loss": 2.40123,
        "val_loss": 2.34567,
        "rejected": False,
        "rejected_since_eval": 3,
    }
    line = eval_line(record, 300)
    assert "\n" not in line
    for piece in (
        "step  40/300",
        "val 2.3457",
        "train 2.4012",
        "tokens 163,840 + 81,920 line search",
        "time 12.3 s",
        "3 GN steps rejected since the last evaluation",
    ):
        assert piece in line
    quiet = eval_line(record | {"rejected_since_eval": 0}, 300)
    assert "rejected" not in quiet
    alone = eval_line(
        {k: v for k, v in record.items() if k != "rejected_since_eval"}, 300
    )
    assert "rejected" not in alone
    marked = eval_line(
        {k: v for k, v in record.items() if k != "rejected_since_eval"}
        | {"rejected": True},
        300,
    )
    assert "GN step rejected (step size 0)" in marked
    warmup = eval_line({"step": 2, "phase": "warmup", "val_loss": 4.0}, 20)
    assert warmup.startswith("step  2/20 (warm-up)")
