"""The study's bookkeeping (`eqx_gn.lm._study`) on hand-made runs, no training: the
equal budget (every method the same number of runs at every batch size), the
declared grids, the refinement rule applied to every method alike, the target
rule, line-search tokens in tokens_to_target, reuse of finished runs, study.json
and the results page drawn from it alone, and one-line errors."""

import argparse
import itertools
import json
import math
from pathlib import Path

import pytest

from eqx_gn.lm import ConfigError, _study as study
from eqx_gn.lm._study_protocol import (
    BASELINES,
    Point,
    _point_of,
    plan_grid,
    rank,
    refine,
    search_space,
)
from eqx_gn.lm._study_runs import Study

SEQ = 10
STEPS = 40
EVAL_EVERY = 5
WARMUP = 4
METHODS = ("adamw", "muon", "soap", "psgd", "gn", "gn-layerwise", "gn-prox")


def parse(*argv):
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    return parser.parse_args(list(argv))


# -- the declared grids and the refinement rule ---------------------------------


def test_grids_are_declared_and_of_the_same_size():
    for runs in (2, 3, 5):
        for method in METHODS:
            grid = plan_grid(method, runs)
            assert len(grid) == runs - 1
            centre = search_space(method).centre
            # Learning rates x3 apart, centred (geometrically) on the centre.
            lrs = [p.lr for p in grid]
            assert math.prod(lrs) ** (1 / len(lrs)) == pytest.approx(centre, rel=1e-3)
            for a, b in itertools.pairwise(lrs):
                assert b / a == pytest.approx(3, rel=1e-3)
    # N = 3: baselines two learning rates; GN two corners of lr x K, K from {8, 4}.
    assert plan_grid("adamw", 3) == [Point(0.001732), Point(0.005196)]
    assert plan_grid("gn", 3) == [Point(0.01, 8), Point(0.03, 4)]
    assert plan_grid("gn-layerwise", 3) == plan_grid("gn", 3)
    assert [p.micro_batches for p in plan_grid("gn-prox", 5)] == [8, 4, 8, 4]


def outcome(steps, best=2.0):
    return {"steps_to_target": steps, "best_val_loss": best}


@pytest.mark.parametrize(
    "method, tried, expected",
    [
        # The best run at an edge: one x3 step outward, for every method alike.
        ("adamw", [(1e-3, None, 30), (3e-3, None, 20)], Point(9e-3)),
        ("muon", [(1e-2, None, 20), (3e-2, None, None)], Point(3.333e-3)),
        ("psgd", [(1e-3, None, None), (3e-3, None, 25)], Point(9e-3)),
        # Runs on both sides: half a step (x3^(1/2)) toward the better neighbour.
        ("soap", [(1e-3, None, 40), (3e-3, None, 20), (9e-3, None, 30)],
         Point(5.196e-3)),
        ("soap", [(1e-3, None, 25), (3e-3, None, 20), (9e-3, None, 30)],
         Point(1.732e-3)),
        # GN's corners (lr_low, K 8) and (lr_high, K 4): no run with the best one's
        # K on either side, so toward the declared centre.
        ("gn", [(0.01, 8, 20), (0.03, 4, 30)], Point(0.03, 8)),
        ("gn-prox", [(0.01, 8, 30), (0.03, 4, 20)], Point(0.01, 4)),
        # Ties in steps go to the lower best loss.
        ("adamw", [(1e-3, None, 20), (3e-3, None, 20)], Point(3.333e-4)),
    ],
)  # fmt: skip
def test_refinement_rule(method, tried, expected):
    tried = [
        (Point(lr, k), outcome(steps, 2.0 - 0.1 * (i == 0)))
        for i, (lr, k, steps) in enumerate(tried)
    ]
    assert refine(method, tried) == expected


def test_refinement_never_repeats_a_run():
    tried = [(Point(1e-3), outcome(20)), (Point(3.333e-4), outcome(30))]
    tried += [(Point(3e-3), outcome(None))]
    # Both sides tried: half a step toward the better neighbour (3.3e-4, 30 steps).
    assert refine("adamw", tried) == Point(5.774e-4)
    tried += [(Point(5.774e-4), outcome(40))]
    assert refine("adamw", tried) not in [p for p, _ in tried]


# -- a fake runner: hand-made runs, written as the runner writes them -------------


def quality(method, lr, k):
    """Loss drop per step of a hand-made run: best at lr = 2x the method's centre;
    GN better at K = 8 than 4; GN's line search reads 2 micro-batches per step."""
    centre = search_space(method).centre
    q = {"adamw": 0.02, "muon": 0.04, "soap": 0.03, "psgd": 0.025}.get(method, 0.08)
    q *= math.exp(-(math.log(lr / (2 * centre)) ** 2) / 4)
    if k == 4:
        q *= 0.8
    return q


class FakeTrainer:
    """Stands in for `eqx_gn.lm.train`: writes config.json, metrics.jsonl and
    summary.json like the runner (stopping at the target), and records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, config):
        self.calls.append(config)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        gn = config.optimizer == "gn"
        q = quality(config.method, config.lr, config.micro_batches if gn else None)
        q *= 1 + 0.05 * config.seed + 0.002 * math.log2(config.batch_size)
        tokens_per_step = config.batch_size * SEQ
        ls_per_step = 2 * (config.batch_size // config.micro_batches) * SEQ
        records, ls, reached = [], 0, None
        for step in range(1, config.steps + 1):
            main = step > WARMUP
            ls += ls_per_step if gn and main else 0
            record = {
                "step": step,
                "phase": "main" if main else "warmup",
                "tokens": step * tokens_per_step,
                "time_s": step * (2.0 if gn else 1.0),
                "train_loss": 4.0 - q * step,
            }
            if gn and main:
                record["ls_tokens"] = ls
            if step % EVAL_EVERY == 0:
                record["val_loss"] = round(4.0 - q * step, 6)
                target = config.target_loss
                if target is not None and record["val_loss"] <= target:
                    reached = step
            records.append(record)
            if reached:
                break
        resolved = {
            "warmup_steps": WARMUP,
            "seq_len": SEQ,
            "line_search": config.line_search_rule,
        }
        (out / "config.json").write_text(
            json.dumps({"config": config.to_dict(), "resolved": resolved})
        )
        (out / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
        summary = {
            "completed": True,
            "steps": records[-1]["step"],
            "target_loss": config.target_loss,
            "target_reached": reached is not None,
            "tokens_to_target": None,
            "time_s": records[-1]["time_s"],
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return summary


def run_study(tmp_path, trainer, *extra, methods=None, runs=3, timing=0):
    methods = ",".join(METHODS) if methods is None else methods
    args = parse(
        "--timing-rounds", str(timing), "--methods", methods, "--batch-sizes", "8,32", "--steps", str(STEPS),
        "--runs", str(runs), "--seeds", "3", "--out", str(tmp_path / "out"),
        "--runs-dir", str(tmp_path / "runs"), *extra,
    )  # fmt: skip
    settings = study.settings_from(args)
    s = Study(settings, Path(args.out), Path(args.runs_dir), trainer,
              log=lambda line: None)  # fmt: skip
    return s.execute()


@pytest.fixture
def finished(tmp_path):
    trainer = FakeTrainer()
    result = run_study(tmp_path, trainer)
    return tmp_path, trainer, result


def test_every_method_gets_the_same_budget(finished):
    _, trainer, result = finished
    searches = {}
    for config in trainer.calls:
        if config.seed == 0 and config.grad_accumulation == 1:
            key = (config.method, config.batch_size)
            searches[key] = searches.get(key, 0) + 1
    # N = 3 trained runs per method and batch size, for all 7 methods at both.
    assert searches == {(m, b): 3 for m in METHODS for b in (8, 32)}
    assert result["runs_per_method_and_batch"] == {
        m: {"8": 3, "32": 3} for m in METHODS
    }
    # Two more seeds of each method's chosen configuration at the largest batch.
    seeds = [(c.method, c.batch_size, c.seed) for c in trainer.calls if c.seed]
    assert sorted(seeds) == sorted((m, 32, s) for m in METHODS for s in (1, 2))
    for method in METHODS:
        chosen = result["chosen"][method]["32"]
        for config in trainer.calls:
            if config.method == method and config.seed:
                assert config.lr == chosen["lr"]
                if method.startswith("gn"):
                    assert config.micro_batches == chosen["micro_batches"]
        assert len(result["steps_to_target_by_seed"][method]) == 3
    # The layout check: each baseline's chosen run with GN's chosen K micro-batches.
    layout = [c for c in trainer.calls if c.grad_accumulation != 1]
    k = result["chosen"]["gn"]["32"]["micro_batches"]
    assert sorted(c.method for c in layout) == sorted(BASELINES)
    assert {(c.batch_size, c.grad_accumulation) for c in layout} == {(32, k)}


def test_every_method_is_refined_by_the_same_rule(finished):
    _, _, result = finished
    runs = result["runs"]
    for method in METHODS:
        for batch in (8, 32):
            mine = [
                r for r in runs if r["method"] == method and r["batch_size"] == batch
            ]
            grid = [r for r in mine if r["role"] == "grid"]
            (refined,) = [r for r in mine if r["role"] == "refine"]
            points = [_point_of(r) for r in grid]
            assert points == plan_grid(method, 3)
            tried = [(_point_of(r), r) for r in grid]
            assert _point_of(refined) == refine(method, tried)
            # The chosen run is the best of the three.
            chosen = result["chosen"][method][str(batch)]
            best = min([*grid, refined], key=rank)
            assert chosen["run"] == best["name"]
    # In this hand-made world every baseline is best at twice its centre, so the
    # upper grid point wins and every baseline moves up by 3, the same move.
    for method in BASELINES:
        refined = [r for r in runs if r["method"] == method and r["role"] == "refine"]
        for r in refined:
            assert r["hyperparameters"]["lr"] == pytest.approx(
                plan_grid(method, 3)[1].lr * 3, rel=1e-3
            )


def test_target_is_adamws_best_at_the_largest_batch(finished):
    base, trainer, result = finished
    adamw = [
        r for r in result["runs"] if r["method"] == "adamw" and r["batch_size"] == 32
    ]
    search = [r for r in adamw if r["role"] in ("grid", "refine")]
    assert len(search) == 3
    assert result["target"] == min(r["best_val_loss"] for r in search)
    # AdamW's runs at the largest batch trained with no target; every other run
    # stopped at this one.
    for config in trainer.calls:
        first = config.method == "adamw" and config.batch_size == 32 and not config.seed
        if first and config.grad_accumulation == 1:
            assert config.target_loss is None
        else:
            assert config.target_loss == result["target"]
    # A given target replaces the rule; AdamW then trains against it too.
    other = FakeTrainer()
    given = run_study(base / "given", other, "--target", "3.5")
    assert given["target"] == 3.5
    assert {c.target_loss for c in other.calls} == {3.5}


def test_tokens_to_target_count_line_search_tokens(finished):
    _, _, result = finished
    for run in result["runs"]:
        if run["steps_to_target"] is None:
            continue
        step = run["steps_to_target"]
        tokens = step * run["batch_size"] * SEQ
        if run["method"].startswith("gn"):
            k = run["hyperparameters"]["micro_batches"]
            tokens += (step - WARMUP) * 2 * (run["batch_size"] // k) * SEQ
        assert run["tokens_to_target"] == tokens, run["name"]
    gn = [r for r in result["runs"] if r["method"] == "gn" and r["steps_to_target"]]
    assert gn and all(
        r["tokens_to_target"] > r["steps_to_target"] * r["batch_size"] * SEQ for r in gn
    )


def test_claims_from_the_chosen_runs(finished):
    _, _, result = finished
    chosen = {m: result["chosen"][m]["32"] for m in METHODS}
    steps = {m: chosen[m]["steps_to_target"] for m in METHODS}
    base = min(BASELINES, key=lambda m: steps[m] or math.inf)
    claims = result["claims"]["largest"]
    assert claims["best_baseline"] == base
    assert claims["best_baseline_steps_over_gn"] == pytest.approx(
        steps[base] / steps["gn"]
    )
    assert claims["best_baseline_steps_over_gn_after_warmup"] == pytest.approx(
        (steps[base] - WARMUP) / (steps["gn"] - WARMUP)
    )
    assert claims["layerwise_steps_over_gn"] == pytest.approx(
        steps["gn-layerwise"] / steps["gn"]
    )
    times = {m: chosen[m]["time_to_target"] for m in BASELINES}
    fastest = min(t for t in times.values() if t is not None)
    assert claims["gn_time_over_fastest_baseline"] == pytest.approx(
        chosen["gn"]["time_to_target"] / fastest
    )
    assert result["claims"]["by_batch"]["8"]["batch_size"] == 8


def test_finished_runs_are_reused_and_study_json_suffices(finished):
    tmp_path, _trainer, result = finished
    again = FakeTrainer()
    assert run_study(tmp_path, again)["runs"] == result["runs"]
    assert again.calls == []
    # From study.json alone, the run directories gone: the same result.
    for path in (tmp_path / "runs").iterdir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    alone = run_study(tmp_path, None)
    assert alone["runs"] == result["runs"] and alone["chosen"] == result["chosen"]
    # study.json's runs carry what `eqx-gn plot` reads.
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    run = saved["runs"][0]
    for key in ("config", "summary", "curve", "method", "batch_size"):
        assert key in run
    for key in ("step", "phase", "tokens", "ls_tokens", "time_s", "train_loss"):
        assert len(run["curve"][key]) == len(run["curve"]["step"])
    assert saved["plots"] == ["steps_to_target.png", "loss_curves.png"]


def test_eqx_gn_plot_reads_study_json(finished):
    from eqx_gn.lm._plot import load_runs

    tmp_path, _, _result = finished
    source = load_runs(tmp_path / "out")
    assert {r.label for r in source.runs} == {m.replace("-", " ") for m in METHODS}


def test_report_page_traces_to_study_json(finished, tmp_path):
    from eqx_gn.lm._study_report import write_report

    base, _, result = finished
    page = tmp_path / "docs" / "results.md"
    write_report([base / "out"], page)
    text = page.read_text()
    assert str(base / "out" / "study.json") in text or "out/study.json" in text
    assert f"{result['target']:.4f}" in text
    gn = result["chosen"]["gn"]["32"]
    assert f"| {gn['steps_to_target']} " in text
    ratio = result["claims"]["largest"]["best_baseline_steps_over_gn"]
    assert f"{ratio:.2f}" in text
    assert (page.parent / "assets" / "out" / "steps_to_target.png").exists()
    assert "GN's line search (each run's resolved `line_search`): the warm walk" in text


def test_report_shows_the_learning_rate_robustness_beside_the_study(finished, tmp_path):
    from eqx_gn.lm._study_report import write_report

    base, _, _ = finished
    factors = [0.5, 1.0, 2.0]

    def runs(steps):
        return [
            {"factor": f, "lr": f, "steps_to_target": s}
            for f, s in zip(factors, steps, strict=True)
        ]

    result = {
        "model": "tiny",
        "date": "2026-12-03",
        "machine": "cpu",
        "seed": 0,
        "steps": 80,
        "rule": {"target": "AdamW's loss", "good_range": "runs within 1.25x"},
        "batch_sizes": {
            "32": {
                "target": 2.97941,
                "runs": {
                    "gn-adaptive": runs([12, 13, 15]),
                    "muon": runs([19, 14, None]),
                },
                "good_range": {
                    "gn-adaptive": dict(
                        best_factor=0.5,
                        best_steps=12,
                        low_factor=0.5,
                        high_factor=2.0,
                        width=4.0,
                        open=True,
                    ),
                    "muon": dict(
                        best_factor=1.0,
                        best_steps=14,
                        low_factor=1.0,
                        high_factor=1.0,
                        width=1.0,
                        open=False,
                    ),
                },
            }
        },
    }
    (base / "lr_robustness_tiny.json").write_text(json.dumps(result))
    (base / "lr_robustness_tiny.png").write_bytes(b"png")
    page = tmp_path / "docs" / "results.md"
    try:
        write_report([base / "out"], page)
    finally:
        (base / "lr_robustness_tiny.json").unlink()
        (base / "lr_robustness_tiny.png").unlink()
    text = page.read_text()
    assert "## Learning-rate robustness (tiny)" in text
    assert (
        "| 32 | 2.9794 | gn-adaptive | 12 | 13 | 15 | 12 at x1/2 | x1/2 to x2 | >= 4x |"
        in text
    )
    assert (
        "| 32 | 2.9794 | muon | 19 | 14 | missed | 14 at x1 | x1 to x1 | 1x |" in text
    )
    assert "GN's good range is at least 4x wide against Muon's 1x (met" in text
    assert (page.parent / "assets" / "lr_robustness_tiny.png").read_bytes() == b"png"


def test_report_names_the_grid_for_runs_from_before_the_line_search_setting():
    from eqx_gn.lm._study_report import _gn_line_search

    runs = [
        {"method": "gn", "resolved": {}},
        {"method": "adamw", "resolved": {"line_search": None}},
    ]
    assert "the exhaustive grid" in _gn_line_search({"runs": runs})
    runs.append({"method": "gn-prox", "resolved": {"line_search": "warm"}})
    assert "grid (every step size evaluated, the paper's); the warm walk" in (
        _gn_line_search({"runs": runs})
    )


def test_report_only_takes_the_settings_study_json_records(finished, tmp_path):
    # The page's own command: --out and --report, none of the study's options.
    base, _, result = finished
    page = tmp_path / "page" / "results.md"
    argv = ["--out", str(base / "out"), "--runs-dir", str(base / "runs")]
    assert study.main(parse(*argv, "--report-only", "--report", str(page))) == 0
    assert f"{result['target']:.4f}" in page.read_text()
    saved = json.loads((base / "out" / "study.json").read_text())
    assert saved["runs"] == result["runs"] and saved["settings"]["steps"] == STEPS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "adamw,sgd"], "unknown method 'sgd'"),
        (["--methods", "adamw,gn-cg"], "GN with CG has no learning rate"),
        (["--methods", "adamw,adamw"], "lists a method twice"),
        (["--batch-sizes", "8,6", "--methods", "adamw,gn"],
         "--batch-sizes 6 is not divisible by gn's K=8"),
        (["--batch-sizes", "8,x"], "--batch-sizes takes integers"),
        (["--runs", "1"], "--runs must be >= 2"),
    ],
)  # fmt: skip
def test_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        study.settings_from(parse(*argv))
    assert "\n" not in str(info.value)


def test_report_only_without_adamw_runs(tmp_path):
    with pytest.raises(ConfigError, match="cannot set the target"):
        run_study(tmp_path, None, methods="adamw,gn")


def test_interleaved_timing_and_the_timed_claims(tmp_path):
    trainer = FakeTrainer()
    run_study(tmp_path, trainer)
    searched = len(trainer.calls)
    result = run_study(tmp_path, trainer, timing=2)
    timing_calls = trainer.calls[searched:]
    # Every chosen configuration at the largest batch, the baselines also with GN's
    # K micro-batches: 7 + 4 configurations, once per round, round after round.
    k = result["chosen"]["gn"]["32"]["micro_batches"]
    labels = [c.method + ("" if c.grad_accumulation == 1 else f" A{k}")
              for c in timing_calls]  # fmt: skip
    assert len(labels) == 2 * 11 and labels[:11] == labels[11:]
    assert {c.batch_size for c in timing_calls} == {32}
    timing = result["timing"]
    assert timing["rounds"] == 2 and len(timing["seconds_per_step"]) == 11
    # The fake runner's clock: 2 s per GN step, 1 s per first-order step.
    assert timing["median_seconds_per_step"]["gn"] == 2.0
    assert timing["median_seconds_per_step"][f"muon A{k}"] == 1.0
    assert {c.grad_accumulation for c in timing_calls} == {1, k}
    timed = result["claims"]["timed"]
    steps = {m: result["chosen"][m]["32"]["steps_to_target"] for m in METHODS}
    base = min(BASELINES, key=lambda m: steps[m] or math.inf)
    assert timed["fastest_baseline"] == base
    assert timed["gn_over_fastest_baseline"] == pytest.approx(
        (steps["gn"] - WARMUP) * 2.0 / ((steps[base] - WARMUP) * 1.0)
    )
    assert timed["psgd_over_adamw_seconds_per_step"] == 1.0
    # Measured once: a later invocation keeps it.
    again = FakeTrainer()
    assert run_study(tmp_path, again, timing=2)["timing"] == timing
    assert again.calls == []
