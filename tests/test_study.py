"""The study's bookkeeping (`benchmarks/study.py --report-only`) on hand-made runs:
which target it sets, which learning rate and step count it reports, and the
claim ratios, against numbers worked out by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).parents[1] / "benchmarks" / "study.py"
STEPS = 20
EVAL_EVERY = 5


def write_run(out, name, losses, seconds_per_step=1.0, steps=STEPS, target=None):
    """A finished run: validation loss ``losses[i]`` at step ``5 (i + 1)``."""
    path = out / name
    path.mkdir()
    records = [
        {
            "step": EVAL_EVERY * (i + 1),
            "tokens": 0,
            "time_s": seconds_per_step * EVAL_EVERY * (i + 1),
            "val_loss": loss,
        }
        for i, loss in enumerate(losses)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "completed": True,
        "steps": records[-1]["step"] if target is not None else steps,
        "target_loss": target,
        "best_val_loss": min(losses),
        "final_val_loss": losses[-1],
        "time_s": records[-1]["time_s"],
    }
    (path / "summary.json").write_text(json.dumps(summary))


def report(out, *args):
    result = subprocess.run(
        [sys.executable, str(STUDY), "--out", str(out), "--steps", str(STEPS),
         "--batch-sizes", "8,32", "--methods", "adamw,muon,gn,gn-layerwise",
         "--report-only", *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def runs(tmp_path):
    # AdamW at the largest batch sets the target: its best loss over the grid
    # (3e-3, 1e-2, 3e-2), 1.9 at lr 1e-2; 3e-2 would be the edge but is not best.
    write_run(tmp_path, "adamw_b32_lr0.003", [3.0, 2.6, 2.3, 2.1])
    write_run(tmp_path, "adamw_b32_lr0.01", [2.8, 2.4, 2.0, 1.9])
    write_run(tmp_path, "adamw_b32_lr0.03", [2.9, 2.5, 2.2, 2.0])
    write_run(tmp_path, "adamw_b8_lr0.003", [3.0, 2.8, 2.6, 2.5])
    write_run(tmp_path, "adamw_b8_lr0.01", [3.0, 2.7, 2.5, 2.4])
    write_run(tmp_path, "adamw_b8_lr0.03", [3.1, 2.9, 2.7, 2.6])
    # Muon, grid (1e-2, 3e-2, 1e-1): best at 3e-2 (crosses 1.9 at step 15).
    write_run(tmp_path, "muon_b32_lr0.01", [2.5, 2.1, 2.0, 1.9], target=1.9)
    write_run(tmp_path, "muon_b32_lr0.03", [2.4, 2.0, 1.85], target=1.9)
    write_run(tmp_path, "muon_b32_lr0.1", [2.6, 2.2, 1.95, 1.9], target=1.9)
    write_run(tmp_path, "muon_b8_lr0.01", [2.9, 2.6, 2.3, 2.1])
    write_run(tmp_path, "muon_b8_lr0.03", [2.8, 2.5, 2.2, 1.8], target=1.9)
    write_run(tmp_path, "muon_b8_lr0.1", [2.9, 2.6, 2.3, 2.2])
    # GN, grid (1e-2, 3e-2, 1e-1): best at the edge 1e-2 (step 10), so the study
    # looks up 1e-2 / 3, which is better still (step 5) and is reported.
    write_run(tmp_path, "gn_b32_lr0.01", [2.2, 1.8], 2.0, target=1.9)
    write_run(tmp_path, "gn_b32_lr0.03", [2.3, 2.0, 1.9], 2.0, target=1.9)
    write_run(tmp_path, "gn_b32_lr0.1", [2.5, 2.2, 2.0, 1.95], 2.0)
    write_run(tmp_path, "gn_b32_lr0.00333333", [1.88], 2.0, target=1.9)
    write_run(tmp_path, "gn_b8_lr0.01", [2.5, 2.1, 1.9], 2.0, target=1.9)
    write_run(tmp_path, "gn_b8_lr0.03", [2.5, 2.2, 2.0, 1.95], 2.0)
    write_run(tmp_path, "gn_b8_lr0.1", [2.6, 2.3, 2.1, 2.0], 2.0)
    write_run(tmp_path, "gn_b8_lr0.00333333", [2.6, 2.4, 2.2, 2.05], 2.0)
    # Layerwise GN at the largest batch only: the smaller batch is "not run".
    write_run(tmp_path, "gn-layerwise_b32_lr0.01", [2.4, 1.9], 2.0, target=1.9)
    write_run(tmp_path, "gn-layerwise_b32_lr0.03", [2.4, 2.0, 1.9], 2.0, target=1.9)
    write_run(tmp_path, "gn-layerwise_b32_lr0.1", [2.4, 2.0, 1.9], 2.0, target=1.9)
    return tmp_path


def test_report_sets_target_picks_runs_and_computes_the_claims(runs):
    stdout = report(runs)
    assert "target validation loss (AdamW's best at batch 32): 1.9000" in stdout
    study = json.loads((runs / "study.json").read_text())
    table = study["table"]
    assert study["target_loss"] == 1.9
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
    assert (runs / "steps_to_target.png").exists()
    assert (runs / "loss_curves.png").exists()

    claims = study["claims"]
    # Best baseline: Muon's 15 steps (15 s) against GN's 5 (10 s); warm-up is 1
    # step of 20 (5%).
    assert study["warmup_steps"] == 1
    assert claims["best_baseline_steps_over_gn"] == pytest.approx(3.0)
    assert claims["best_baseline_steps_over_gn_after_warmup"] == pytest.approx(14 / 4)
    assert claims["gn_time_over_fastest_baseline"] == pytest.approx(10 / 15)
    assert claims["layerwise_steps_over_gn"] == pytest.approx(2.0)
    scaling = claims["steps_second_largest_over_largest"]
    assert scaling["muon"] == pytest.approx(20 / 15)
    assert scaling["gn"] == pytest.approx(15 / 5)
    assert scaling["adamw"] is None and scaling["gn-layerwise"] is None


def test_refined_and_seeded_runs_replace_the_largest_batch_entries(runs):
    # Muon's refinement: lr 3e-2 * 3^(1/2) reaches the target sooner (step 10).
    write_run(runs, "muon_b32_lr0.0519615", [2.3, 1.85], target=1.9)
    write_run(runs, "muon_b32_lr0.0173205", [2.5, 2.1, 1.9], target=1.9)
    write_run(runs, "muon_b32_lr0.0519615_seed+1", [2.3, 2.0, 1.8], target=1.9)
    # GN's refinement: K = 16 and 32 at its best learning rate, neither better.
    write_run(runs, "gn_b32_lr0.00333333_K16", [2.0, 1.8], 2.0, target=1.9)
    write_run(runs, "gn_b32_lr0.00333333_K32", [1.9], 2.0, target=1.9)
    stdout = report(runs, "--refine", "--seeds", "2")
    study = json.loads((runs / "study.json").read_text())
    muon = study["table"]["muon"]["32"]["refined"]
    assert (muon["lr"], muon["steps_to_target"]) == (pytest.approx(0.0519615), 10)
    assert muon["steps_to_target_by_seed"] == {"0": 10, "1": 15}
    gn = study["table"]["gn"]["32"]["refined"]
    # A tie at 5 steps (K = 8 and K = 32) goes to the lower best loss: K = 8.
    assert (gn["micro_batches"], gn["steps_to_target"]) == (None, 5)
    assert [c["steps"] for c in gn["candidates"]] == [5, 10, 5]
    refined = study["claims_refined"]
    assert refined["best_baseline_steps_over_gn"] == pytest.approx(10 / 5)
    assert "steps_second_largest_over_largest" not in refined
    assert "muon" in stdout and "lr 0.052" in stdout
