"""The study's bookkeeping (`benchmarks/study.py --report-only`) on hand-made runs:
which target it sets, which learning rate and step count it reports, and the
claim ratios, against numbers worked out by hand; the consolidated study.json
(every run with its curve) and a report from it alone; method names against the
runner's fields."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).parents[1] / "benchmarks" / "study.py"
STEPS = 20
EVAL_EVERY = 5
# The runner's configuration of a hand-made run's method, old style (GN's block
# structure and solver in the optimizer name) and new.
OLD_STYLE = {"gn-layerwise": {"optimizer": "gn-layerwise"}}
NEW_STYLE = {"gn": {"optimizer": "gn", "blocks": "full", "solver": "inner"}}


def load_study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(runs, name, losses, seconds_per_step=1.0, steps=STEPS, target=None):
    """A finished run: a record per step, validation loss ``losses[i]`` at step
    ``5 (i + 1)``."""
    method, batch, lr, *rest = name.split("_")
    k = int(rest[0][1:]) if rest and rest[0].startswith("K") else 8
    seed = int(rest[-1][len("seed+") :]) if rest and "seed" in rest[-1] else 0
    last = EVAL_EVERY * len(losses) if target is not None else steps
    records = [
        {
            "step": step,
            "phase": "warmup" if step == 1 else "main",
            "tokens": 100 * step,
            "time_s": seconds_per_step * step,
            "train_loss": 3.0 - 0.01 * step,
        }
        | (
            {"val_loss": losses[step // EVAL_EVERY - 1]}
            if step % EVAL_EVERY == 0
            else {}
        )
        for step in range(1, last + 1)
    ]
    path = runs / name
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "completed": True,
        "steps": last,
        "target_loss": target,
        "best_val_loss": min(losses),
        "final_val_loss": losses[-1],
        "time_s": records[-1]["time_s"],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    config = {
        **OLD_STYLE.get(method, NEW_STYLE.get(method, {"optimizer": method})),
        "batch_size": int(batch[1:]),
        "lr": float(lr[2:]),
        "micro_batches": k,
        "seed": seed,
        "target_loss": target,
    }
    resolved = {"warmup_steps": 1}
    (path / "config.json").write_text(
        json.dumps({"config": config, "resolved": resolved})
    )


def report(out, *args, methods="adamw,muon,gn,gn-layerwise", check=True):
    result = subprocess.run(
        [sys.executable, str(STUDY), "--out", str(out / "results"),
         "--runs-dir", str(out / "runs"), "--steps", str(STEPS),
         "--batch-sizes", "8,32", "--methods", methods, "--report-only", *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
        return result.stdout
    return result


@pytest.fixture
def study(tmp_path):
    """The hand-made runs under ``tmp_path / "runs"``; the report goes to
    ``tmp_path / "results"``."""
    runs = tmp_path / "runs"
    # AdamW at the largest batch sets the target: its best loss over the grid
    # (3e-3, 1e-2, 3e-2), 1.9 at lr 1e-2; 3e-2 would be the edge but is not best.
    write_run(runs, "adamw_b32_lr0.003", [3.0, 2.6, 2.3, 2.1])
    write_run(runs, "adamw_b32_lr0.01", [2.8, 2.4, 2.0, 1.9])
    write_run(runs, "adamw_b32_lr0.03", [2.9, 2.5, 2.2, 2.0])
    write_run(runs, "adamw_b8_lr0.003", [3.0, 2.8, 2.6, 2.5])
    write_run(runs, "adamw_b8_lr0.01", [3.0, 2.7, 2.5, 2.4])
    write_run(runs, "adamw_b8_lr0.03", [3.1, 2.9, 2.7, 2.6])
    # Muon, grid (1e-2, 3e-2, 1e-1): best at 3e-2 (crosses 1.9 at step 15).
    write_run(runs, "muon_b32_lr0.01", [2.5, 2.1, 2.0, 1.9], target=1.9)
    write_run(runs, "muon_b32_lr0.03", [2.4, 2.0, 1.85], target=1.9)
    write_run(runs, "muon_b32_lr0.1", [2.6, 2.2, 1.95, 1.9], target=1.9)
    write_run(runs, "muon_b8_lr0.01", [2.9, 2.6, 2.3, 2.1])
    write_run(runs, "muon_b8_lr0.03", [2.8, 2.5, 2.2, 1.8], target=1.9)
    write_run(runs, "muon_b8_lr0.1", [2.9, 2.6, 2.3, 2.2])
    # GN, grid (1e-2, 3e-2, 1e-1): best at the edge 1e-2 (step 10), so the study
    # looks up 1e-2 / 3, which is better still (step 5) and is reported.
    write_run(runs, "gn_b32_lr0.01", [2.2, 1.8], 2.0, target=1.9)
    write_run(runs, "gn_b32_lr0.03", [2.3, 2.0, 1.9], 2.0, target=1.9)
    write_run(runs, "gn_b32_lr0.1", [2.5, 2.2, 2.0, 1.95], 2.0)
    write_run(runs, "gn_b32_lr0.00333333", [1.88], 2.0, target=1.9)
    write_run(runs, "gn_b8_lr0.01", [2.5, 2.1, 1.9], 2.0, target=1.9)
    write_run(runs, "gn_b8_lr0.03", [2.5, 2.2, 2.0, 1.95], 2.0)
    write_run(runs, "gn_b8_lr0.1", [2.6, 2.3, 2.1, 2.0], 2.0)
    write_run(runs, "gn_b8_lr0.00333333", [2.6, 2.4, 2.2, 2.05], 2.0)
    # Layerwise GN at the largest batch only: the smaller batch is "not run".
    write_run(runs, "gn-layerwise_b32_lr0.01", [2.4, 1.9], 2.0, target=1.9)
    write_run(runs, "gn-layerwise_b32_lr0.03", [2.4, 2.0, 1.9], 2.0, target=1.9)
    write_run(runs, "gn-layerwise_b32_lr0.1", [2.4, 2.0, 1.9], 2.0, target=1.9)
    return tmp_path


def read(study):
    return json.loads((study / "results" / "study.json").read_text())


def test_report_sets_target_picks_runs_and_computes_the_claims(study):
    stdout = report(study)
    assert "target validation loss (AdamW's best at batch 32): 1.9000" in stdout
    result = read(study)
    table = result["table"]
    assert result["target"] == result["target_loss"] == 1.9
    assert table["adamw"]["32"]["steps_to_target"] == 20
    assert table["adamw"]["8"]["steps_to_target"] is None
    assert (table["muon"]["32"]["lr"], table["muon"]["32"]["steps_to_target"]) == (
        0.03,
        15,
    )
    assert table["muon"]["8"]["steps_to_target"] == 20
    gn = table["gn"]["32"]
    assert gn["lr"] == pytest.approx(0.01 / 3)
    assert (gn["steps_to_target"], gn["time_to_target"]) == (5, 10.0)
    assert gn["lr_sweep"] == {"0.01": 10, "0.03": 15, "0.1": None, "0.00333333": 5}
    assert table["gn"]["8"]["steps_to_target"] == 15
    assert "8" not in table["gn-layerwise"]
    assert table["gn-layerwise"]["32"]["steps_to_target"] == 10
    assert (gn["run"], table["muon"]["8"]["run"]) == (
        "gn_b32_lr0.00333333",
        "muon_b8_lr0.03",
    )
    assert (study / "results" / "steps_to_target.png").exists()
    assert (study / "results" / "loss_curves.png").exists()

    claims = result["claims"]
    # Best baseline: Muon's 15 steps (15 s) against GN's 5 (10 s); warm-up is 1
    # step of 20 (5%).
    assert result["warmup_steps"] == 1
    assert claims["best_baseline_steps_over_gn"] == pytest.approx(3.0)
    assert claims["best_baseline_steps_over_gn_after_warmup"] == pytest.approx(14 / 4)
    assert claims["gn_time_over_fastest_baseline"] == pytest.approx(10 / 15)
    assert claims["layerwise_steps_over_gn"] == pytest.approx(2.0)
    scaling = claims["steps_second_largest_over_largest"]
    assert scaling["muon"] == pytest.approx(20 / 15)
    assert scaling["gn"] == pytest.approx(15 / 5)
    assert scaling["adamw"] is None and scaling["gn-layerwise"] is None


def test_refined_and_seeded_runs_replace_the_largest_batch_entries(study):
    runs = study / "runs"
    # Muon's refinement: lr 3e-2 * 3^(1/2) reaches the target sooner (step 10).
    write_run(runs, "muon_b32_lr0.0519615", [2.3, 1.85], target=1.9)
    write_run(runs, "muon_b32_lr0.0173205", [2.5, 2.1, 1.9], target=1.9)
    write_run(runs, "muon_b32_lr0.0519615_seed+1", [2.3, 2.0, 1.8], target=1.9)
    # GN's refinement: K = 16 and 32 at its best learning rate, neither better.
    write_run(runs, "gn_b32_lr0.00333333_K16", [2.0, 1.8], 2.0, target=1.9)
    write_run(runs, "gn_b32_lr0.00333333_K32", [1.9], 2.0, target=1.9)
    stdout = report(study, "--refine", "--seeds", "2")
    result = read(study)
    muon = result["table"]["muon"]["32"]["refined"]
    assert (muon["lr"], muon["steps_to_target"]) == (pytest.approx(0.0519615), 10)
    assert muon["steps_to_target_by_seed"] == {"0": 10, "1": 15}
    gn = result["table"]["gn"]["32"]["refined"]
    # A tie at 5 steps (K = 8 and K = 32) goes to the lower best loss: K = 8.
    assert (gn["micro_batches"], gn["steps_to_target"]) == (None, 5)
    assert [c["steps"] for c in gn["candidates"]] == [5, 10, 5]
    assert gn["run"] == "gn_b32_lr0.00333333"
    refined = result["claims_refined"]
    assert refined["best_baseline_steps_over_gn"] == pytest.approx(10 / 5)
    assert "steps_second_largest_over_largest" not in refined
    assert "muon" in stdout and "lr 0.052" in stdout


def test_study_json_holds_every_run_with_its_curve(study):
    write_run(study / "runs", "gn_b32_lr0.00333333_K16", [2.0, 1.8], target=1.9)
    report(study)
    result = read(study)
    runs = {run["name"]: run for run in result["runs"]}
    # Every finished run, the one this report did not use too.
    names = {p.name for p in (study / "runs").iterdir()}
    assert set(runs) == names and len(names) == 24
    assert result["settings"]["batch_sizes"] == "8,32"
    assert "out" not in result["settings"]
    gn = runs["gn_b32_lr0.01"]
    assert (gn["method"], gn["batch_size"], gn["seed"]) == ("gn", 32, 0)
    assert gn["hyperparameters"] == {"lr": 0.01, "micro_batches": 8}
    # Against the study's target 1.9: reached at step 10 (loss 1.8), 1,000 tokens,
    # 2 s per step.
    assert (gn["steps_to_target"], gn["tokens_to_target"]) == (10, 1000)
    assert gn["time_to_target"] == 20.0
    assert (gn["final_val_loss"], gn["best_val_loss"]) == (1.8, 1.8)
    assert gn["summary"]["steps"] == 10 and gn["resolved"] == {"warmup_steps": 1}
    curve = gn["curve"]
    assert curve["step"] == list(range(1, 11))
    assert curve["val_loss"] == [None] * 4 + [2.2] + [None] * 4 + [1.8]
    assert curve["phase"][:2] == ["warmup", "main"]
    assert curve["ls_tokens"] == [0] * 10  # not in the hand-made records
    assert curve["train_loss"][0] == pytest.approx(2.99)
    assert runs["gn_b32_lr0.00333333_K16"]["hyperparameters"]["micro_batches"] == 16
    # An old-style configuration ("gn-layerwise" as the optimizer) gets its name.
    assert runs["gn-layerwise_b32_lr0.1"]["method"] == "gn-layerwise"
    assert runs["adamw_b8_lr0.01"]["steps_to_target"] is None
    # Each curve's list on one line.
    text = (study / "results" / "study.json").read_text()
    assert re.search(r'"step": \[1,2,3,4,5,6,7,8,9,10\]', text)


def test_report_from_study_json_alone(study):
    report(study)
    first = read(study)
    first_plot = (study / "results" / "loss_curves.png").read_bytes()
    shutil.rmtree(study / "runs")
    (study / "results" / "loss_curves.png").unlink()
    stdout = report(study)
    assert "target validation loss (AdamW's best at batch 32): 1.9000" in stdout
    second = read(study)
    assert second == first
    assert (study / "results" / "loss_curves.png").read_bytes() == first_plot
    # A tagged report over a subset, from study.json alone: its own entry under
    # reports, the same runs, the untagged report left as it was.
    report(study, "--tag", "_sub", methods="adamw,gn")
    third = read(study)
    assert set(third["reports"]["_sub"]["table"]) == {"adamw", "gn"}
    assert third["reports"]["_sub"]["table"]["gn"] == first["table"]["gn"]
    assert third["runs"] == first["runs"]
    assert {k: v for k, v in third.items() if k != "reports"} == first
    assert (study / "results" / "steps_to_target_sub.png").exists()


def test_nothing_to_report(tmp_path):
    result = report(tmp_path, check=False)
    assert result.returncode != 0
    assert "no finished AdamW run at batch 32" in result.stderr
    result = report(tmp_path, methods="adamw,gn-blockwise", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "--methods: unknown method 'gn-blockwise'; use adamw, muon, soap or "
        "gn[-layerwise][-prox|-cg]"
    ]


@pytest.mark.parametrize(
    "method, fields",
    [
        ("adamw", {"optimizer": "adamw"}),
        ("soap", {"optimizer": "soap"}),
        ("gn", {"optimizer": "gn", "blocks": "full", "solver": "inner"}),
        ("gn-layerwise", {"optimizer": "gn", "blocks": "layerwise", "solver": "inner"}),
        ("gn-prox", {"optimizer": "gn", "blocks": "full", "solver": "prox"}),
        ("gn-cg", {"optimizer": "gn", "blocks": "full", "solver": "cg"}),
        (
            "gn-layerwise-prox",
            {"optimizer": "gn", "blocks": "layerwise", "solver": "prox"},
        ),
    ],
)
def test_method_names_and_runner_fields(method, fields):
    study = load_study()
    assert study.method_config(method) == fields
    assert study.method_name(fields) == method


@pytest.mark.parametrize(
    "config, method",
    [
        ({"optimizer": "gn-layerwise"}, "gn-layerwise"),
        ({"optimizer": "gn-prox"}, "gn-prox"),
        ({"optimizer": "gn"}, "gn"),
        ({"optimizer": "muon"}, "muon"),
        ({"optimizer": "gn", "blocks": "layerwise", "solver": "cg"}, "gn-layerwise-cg"),
    ],
)
def test_method_name_of_old_and_new_configs(config, method):
    assert load_study().method_name(config) == method


@pytest.mark.parametrize(
    "method", ["sgd", "gn-prox-layerwise", "gn-full", "gn-prox-cg", "gn-", "layerwise"]
)
def test_unknown_method_names(method):
    with pytest.raises(ValueError, match=f"unknown method '{method}'"):
        load_study().method_config(method)
