"""The study's protocol (`eqx_gn.lm.study`, third edition) on hand-made runs, no
training: the one tuning rule (`next_point`, `bracketed`, `rank`), the target set
by the tuned baselines at the largest batch, starts chained from the next larger
batch, GN's K, give-up steps, seeds with their medians, line-search tokens,
reuse of finished runs, one-line errors and the figures.

A fake runner writes each run as `eqx_gn.lm.train` does, from a loss curve whose
best learning rate is known in closed form: the tests' independent oracle."""

import argparse
import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from eqx_gn.lm import CONFIGS, ConfigError, TrainConfig
from eqx_gn.lm.study import _command as study
from eqx_gn.lm.study._figures import _color, curves_figure, steps_figure
from eqx_gn.lm.study._page import (
    _claims_section,
    _critical_batch_lines,
    write_report,
)
from eqx_gn.lm.study._protocol import (
    BASELINES,
    CENTRES,
    Point,
    bracketed,
    centre,
    next_point,
    rank,
)
from eqx_gn.lm.study._records import run_name
from eqx_gn.lm.study._result import (
    FORMAT,
    claims,
    critical_batch,
    serial_passes,
    timed_claims,
)
from eqx_gn.lm.study._running import Study

SEQ = 8
STEPS = 40
BATCHES = (8, 16, 32)
LARGEST = max(BATCHES)
EVAL_EVERY = 3
MICRO = 4
SEEDS = 2
LS_BATCHES = 2
MAX_RUNS = 7
METHODS = ("adamw", "muon", "gn", "gn-layerwise")


def parse(*argv):
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    return parser.parse_args(list(argv))


def log3(x):
    return math.log(x) / math.log(3)


# -- the tuning rule ----------------------------------------------------------------


def outcome(steps, loss=2.0):
    """A run's outcome as `rank` reads it: steps to the target (None: missed) and
    its loss there, or its best loss when it missed."""
    if steps is None:
        return {"steps_to_target": None, "loss_at_target": None, "best_val_loss": loss}
    return {"steps_to_target": steps, "loss_at_target": loss, "best_val_loss": loss}


def tune(start, steps_of, k=None, max_runs=MAX_RUNS):
    """The runs `next_point` asks for, each answered by ``steps_of(lr)`` (at most
    20, so that a rule that never stops fails an assertion)."""
    tried = []
    while (point := next_point(start, tried, k, max_runs)) is not None:
        tried.append((point, outcome(steps_of(point.lr))))
        if len(tried) == 20:
            break
    return tried


def lrs(tried):
    return [p.lr for p, _ in tried]


def test_rank_orders_by_steps_then_loss():
    ordered = [
        outcome(20, 2.0),
        outcome(20, 2.1),  # a tie in steps goes to the lower loss at the target
        outcome(30, 1.0),  # fewer steps beat a lower loss
        outcome(None, 1.5),  # a run that missed ranks after every one that reached
        outcome(None, 1.6),  # ... and among those, by its best loss
        outcome(None, math.nan),
    ]
    for shuffled in (ordered[::-1], ordered[2:] + ordered[:2]):
        assert sorted(shuffled, key=rank) == ordered
    # A run that missed is ranked by its best loss, not a stale loss at a target.
    stale = {"steps_to_target": None, "loss_at_target": 0.5, "best_val_loss": 1.7}
    assert rank(outcome(None, 1.6)) < rank(stale)


def test_the_grid_start_x3_and_over_3_in_order():
    tried = []
    for expected in (0.01, 0.03, 0.003333):
        point = next_point(0.01, tried, k=4)
        assert point == Point(expected, 4)
        tried.append((point, outcome(30)))


def test_extension_past_either_edge_then_one_half_step_then_none():
    # Best at the upper edge: x3 beyond it, twice, until it has worse runs on both
    # sides; then half a step toward the better neighbour (0.03: 20 steps, better
    # than 0.27: 25); then nothing more.
    table = {0.01: 30, 0.03: 20, 0.003333: 40, 0.09: 15, 0.27: 25}
    tried = tune(0.01, table.get, max_runs=5)
    assert lrs(tried) == [0.01, 0.03, 0.003333, 0.09, 0.27]
    assert bracketed(tried)
    assert next_point(0.01, tried) == Point(0.05196)  # 0.09 / 3^(1/2)
    for half in (10, 18, 50):  # the half step the best, between, or worst of all
        refined = [*tried, (Point(0.05196), outcome(half))]
        assert next_point(0.01, refined) is None
    # The better neighbour above: the half step goes up.
    table = {0.01: 30, 0.03: 20, 0.003333: 40, 0.09: 15, 0.27: 19}
    tried = tune(0.01, table.get, max_runs=5)
    assert next_point(0.01, tried) == Point(0.1559)  # 0.09 x 3^(1/2)
    # Best at the lower edge: /3 beyond it, the same rule mirrored.
    table = {0.01: 30, 0.03: 40, 0.003333: 20, 0.001111: 25}
    tried = tune(0.01, table.get, max_runs=4)
    assert lrs(tried) == [0.01, 0.03, 0.003333, 0.001111]
    assert next_point(0.01, tried) == Point(0.001924)
    # A run that missed the target is worse than every run that reached it.
    table = {0.01: None, 0.03: None, 0.003333: 40, 0.001111: None}
    tried = tune(0.01, table.get, max_runs=4)
    assert lrs(tried) == [0.01, 0.03, 0.003333, 0.001111] and bracketed(tried)


def test_max_runs_caps_a_tuning_still_at_an_edge():
    def faster_up(lr):
        return round(30 - 5 * log3(lr / 0.01))

    for cap in (3, 4, 7):
        tried = tune(0.01, faster_up, max_runs=cap)
        assert len(tried) == cap
        assert not bracketed(tried)
        assert next_point(0.01, tried, max_runs=cap) is None
    assert lrs(tune(0.01, faster_up)) == [0.01, 0.03, 0.003333, 0.09, 0.27, 0.81, 2.43]


def test_the_rule_never_repeats_a_learning_rate():
    # Any outcomes, unimodal or not, ties included: distinct runs, at most the cap.
    for seed in range(300):
        rng = random.Random(seed)
        table = {}

        def steps_of(lr, rng=rng, table=table):
            if lr not in table:
                table[lr] = rng.choice([None, 20, 21, 22, 30, rng.randint(5, 60)])
            return table[lr]

        cap = rng.choice([3, 4, 5, 7, 9])
        tried = tune(0.01, steps_of, max_runs=cap)
        assert len(set(lrs(tried))) == len(tried) <= cap, seed


def test_runs_that_all_missed_walk_out_and_bracket_nothing():
    # Every run missed: no bracket, whatever their losses; the walk goes on
    # beyond the end fewer x3 steps from the start (the better end on a tie).
    missed = [(Point(0.01), outcome(None, 3.3)), (Point(0.03), outcome(None, 3.5)),
              (Point(0.003333), outcome(None, 3.6))]  # fmt: skip
    assert not bracketed(missed)
    assert next_point(0.01, missed) == Point(0.09)  # 0.03's loss is the lower end
    missed.append((Point(0.09), outcome(None, 3.4)))
    assert next_point(0.01, missed) == Point(0.001111)  # one step down, two up
    missed.append((Point(0.001111), outcome(None, 3.4)))
    assert next_point(0.01, missed) == Point(0.27)
    # The cap still stops it: every run missed is a tuning failure, not a result.
    assert next_point(0.01, missed, max_runs=5) is None
    # The runs that set the target have none: ranked by their loss, bracketed.
    assert bracketed(missed[:3], has_target=False)
    assert next_point(0.01, missed[:3], has_target=False) == Point(0.01732)
    # One run that reached ends the walk: the rule as before.
    reached = [*missed[:3], (Point(0.09), outcome(40))]
    assert next_point(0.01, reached) == Point(0.27)


def test_bracketed():
    def runs(*pairs):
        return [(Point(lr), outcome(steps)) for lr, steps in pairs]

    assert not bracketed([])
    assert not bracketed(runs((0.01, 20)))
    assert bracketed(runs((0.01, 20), (0.03, 25), (0.003, 30)))
    assert bracketed(runs((0.01, 20), (0.03, None), (0.003, None)))
    # The best at an edge, or tied with its nearest neighbour: not bracketed.
    assert not bracketed(runs((0.01, 20), (0.03, 15), (0.003, 30)))
    assert not bracketed(runs((0.01, 20), (0.03, 20), (0.003, 30)))
    # Its nearest neighbour decides, not a worse run farther out.
    assert not bracketed(runs((0.01, 20), (0.017, 20), (0.03, 40), (0.003, 30)))


# -- a fake runner: hand-made runs, written as the runner writes them ----------------

#: The fake's best learning rate at the largest batch, in x3 steps from the
#: method's centre: AdamW's inside the first grid, Muon's past its upper edge,
#: GN's past its lower edge, layerwise GN's inside. At a smaller batch ``b`` it is
#: ``(b / largest)^(1/2)`` of that.
OPTIMUM = {"adamw": 0.3, "muon": 1.6, "gn": -1.35, "gn-layerwise": -0.4,
           "gn-soap": 0.5, "gn-layerwise-psgd": -0.5}  # fmt: skip
#: The fake's loss-drop rate at the best learning rate (Muon the best baseline).
SPEED = {"adamw": 1.0, "muon": 1.1, "gn": 1.5, "gn-layerwise": 1.3,
         "gn-soap": 1.4, "gn-layerwise-psgd": 1.2}  # fmt: skip
#: The fake's critical batch size: the rate per step grows as b / (b + 16).
CRITICAL = 16
L0, L_INF = 5.0, 1.0


def best_lr(method, batch):
    return centre(method) * 3 ** OPTIMUM[method] * (batch / LARGEST) ** 0.5


def rate(method, lr, batch, seed=0):
    """Loss-drop rate of a hand-made run: log-normal in the learning rate (one x3
    step from the best: 0.61 of it), faster at larger batches, a little faster at
    each seed."""
    d = log3(lr / best_lr(method, batch))
    return (
        0.05
        * SPEED[method]
        * math.exp(-d * d / 2)
        * batch
        / (batch + CRITICAL)
        * (1 + 0.03 * seed)
    )


def loss(r, step):
    return L_INF + (L0 - L_INF) * math.exp(-r * step)


def steps_to(r, target, steps):
    """The first step whose loss is at or below ``target`` (the oracle)."""
    return next((t for t in range(1, steps + 1) if loss(r, t) <= target), None)


def fake_evaluations(step):
    """The fake GN step's line-search evaluations: 1 to 3, by step."""
    return 1 + step % 3


class FakeTrainer:
    """Stands in for `eqx_gn.lm.train`: writes config.json, metrics.jsonl and
    summary.json like the runner, evaluating on its schedule (every
    ``eval_every``, at the end of the warm-up, at the last step, at
    ``give_up_after``, and ``eval_resolution``'s), stopping at the first evaluation
    at or below ``target_loss`` or giving up at ``give_up_after``; records each
    call."""

    def __init__(self, curve=None):
        self.calls = []
        # The validation loss of a run at a step: by default the log-normal
        # rate's exponential (`rate`, `loss`).
        self.curve = curve or (
            lambda c, step: loss(
                rate(c.method, c.learning_rate, c.batch_size, c.seed), step
            )
        )

    def __call__(self, config):
        self.calls.append(config)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        gn = config.optimizer == "gn"
        target = config.target_loss
        ls_per_step = LS_BATCHES * config.line_search_batch_size * SEQ
        records, evals, each_step = [], [], False
        reached = gave_up = None
        for step in range(1, config.steps + 1):
            main = step > config.warmup_steps
            record = {
                "step": step,
                "phase": "main" if main else "warmup",
                "tokens": step * config.batch_size * SEQ,
                "time_s": step * (2.0 if gn else 1.0),
                "lr": config.learning_rate,
                "train_loss": self.curve(config, step) + 0.01,
            }
            if gn and main:
                record["ls_tokens"] = (step - config.warmup_steps) * ls_per_step
                record["line_search_evaluations"] = fake_evaluations(step)
            due = (config.eval_every and step % config.eval_every == 0) or step in (
                config.warmup_steps,
                config.steps,
                config.give_up_after,
            )
            if not due and config.eval_resolution and target is not None:
                spacing = max(1.0, config.eval_resolution * step)
                last = evals[-1][0] if evals else 0
                due = each_step or step - last >= spacing
                if not due and len(evals) > 1:
                    (s0, l0), (s1, l1) = evals[-2:]
                    slope = (l0 - l1) / (s1 - s0)
                    gap = l1 - target
                    each_step = due = slope > 0 and gap <= slope * (
                        step - s1 + 2 * spacing
                    )
            if due:
                record["val_loss"] = self.curve(config, step)
                evals.append((step, record["val_loss"]))
                if target is not None and record["val_loss"] <= target:
                    reached = step
            records.append(record)
            if reached is not None:
                break
            if config.give_up_after is not None and step >= config.give_up_after:
                gave_up = step
                break
        last = records[-1]
        losses = [v for _, v in evals]
        ls_tokens = last.get("ls_tokens", 0)
        resolved = {
            "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps,
            "seq_len": SEQ,
            "micro_batch_size": config.micro_batch_size if gn else None,
            "line_search": config.line_search_rule,
        }
        summary = {
            "completed": True,
            "steps": last["step"],
            "warmup_steps": config.warmup_steps,
            "tokens": last["tokens"],
            "ls_tokens": ls_tokens,
            "tokens_read": last["tokens"] + ls_tokens,
            "time_s": last["time_s"],
            "final_val_loss": losses[-1],
            "best_val_loss": min(losses),
            "target_loss": target,
            "target_reached": reached is not None,
            "gave_up_at": gave_up,
            "steps_to_target": reached,
            "tokens_to_target": None if reached is None else last["tokens"] + ls_tokens,
            "time_to_target": None if reached is None else last["time_s"],
        }
        (out / "config.json").write_text(
            json.dumps({"config": config.to_dict(), "resolved": resolved})
        )
        (out / "metrics.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in records)
        )
        (out / "summary.json").write_text(json.dumps(summary))
        return summary


def study_args(base, *extra):
    return parse(
        "--methods", ",".join(METHODS), "--batch-sizes", ",".join(map(str, BATCHES)),
        "--steps", str(STEPS), "--seeds", str(SEEDS), "--eval-every", str(EVAL_EVERY),
        "--gn-micro-batch", str(MICRO), "--ls-batches", str(LS_BATCHES),
        "--max-runs", str(MAX_RUNS), "--timing-rounds", "0",
        "--out", str(base / "out"), "--runs-dir", str(base / "runs"), *extra,
    )  # fmt: skip


def run_study(base, trainer, *extra):
    args = study_args(base, *extra)
    s = Study(study.settings_from(args), Path(args.out), Path(args.runs_dir),
              trainer, log=lambda line: None)  # fmt: skip
    return s.execute()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    trainer = FakeTrainer()
    result = run_study(base, trainer)
    return base, trainer, result


def by_name(result):
    return {r["name"]: r for r in result["runs"]}


def budget(batch):
    return STEPS * LARGEST // batch


def tuning_runs(result, method, batch):
    runs = by_name(result)
    return [runs[n] for n in result["tuning"][method][str(batch)]["runs"]]


# -- the study end to end on the fake ------------------------------------------------


def test_target_is_the_median_of_3_seeds_at_0_8_of_the_budget(finished, tmp_path):
    _, trainer, result = finished
    runs = by_name(result)
    # The baselines at the largest batch are tuned first, with no target, over
    # the whole budget, evaluated every EVAL_EVERY steps, then the best one's
    # configuration on two more seeds; every later run stops at the target.
    free = [c for c in trainer.calls if c.target_loss is None]
    assert trainer.calls[: len(free)] == free
    assert {c.method for c in free} == {"adamw", "muon"}
    tuned, seeds = free[:-2], free[-2:]
    assert [c.seed for c in tuned] == [0] * len(tuned)
    for c in free:
        assert (c.batch_size, c.steps, c.grad_accumulation) == (LARGEST, STEPS, 1)
        assert (c.eval_every, c.eval_resolution, c.give_up_after) == (
            EVAL_EVERY,
            0,
            None,
        )
    assert {c.target_loss for c in trainer.calls[len(free) :]} == {result["target"]}
    # The oracle: the tuning run with the fastest hand-made rate; its
    # configuration on seeds 0, 1, 2, each at the evaluation nearest below
    # 0.8 x 40 = 32 steps (evaluations every 3 steps: step 30); their median.
    best = max(tuned, key=lambda c: rate(c.method, c.lr, c.batch_size))
    assert best.method == "muon"
    assert [(c.method, c.lr, c.seed) for c in seeds] == [
        ("muon", best.lr, 1), ("muon", best.lr, 2)]  # fmt: skip
    source = result["target_source"]
    assert source["run"] == Path(best.out).name
    assert (source["method"], source["step"], source["budget"]) == ("muon", 30, STEPS)
    assert source["batch_size"] == LARGEST
    losses = [loss(rate("muon", best.lr, LARGEST, s), 30) for s in range(3)]
    assert source["seed_losses"] == losses and source["seed_steps"] == [30] * 3
    assert result["target"] == sorted(losses)[1] != losses[0]
    names = [source["run"], *(Path(c.out).name for c in seeds)]
    assert source["seed_runs"] == names
    for name, value in zip(names, losses, strict=True):
        curve = runs[name]["curve"]
        assert curve["val_loss"][curve["step"].index(30)] == value
        assert [30, value] in source["seed_curves"][name]
    assert set(source["tuning"]) == {"adamw", "muon"}
    # A given target replaces the rule: no run without one.
    other = FakeTrainer()
    given = run_study(tmp_path, other, "--target", "2.5")
    assert given["target"] == 2.5 and given["target_source"] is None
    assert {c.target_loss for c in other.calls} == {2.5}


def test_every_choice_is_bracketed_and_near_the_known_optimum(finished):
    _, _, result = finished
    for method in METHODS:
        for batch in BATCHES:
            tuning = result["tuning"][method][str(batch)]
            runs = tuning_runs(result, method, batch)
            chosen = result["chosen"][method][str(batch)]
            assert tuning["bracketed"] and tuning["complete"]
            assert len(runs) <= MAX_RUNS
            by_lr = {r["hyperparameters"]["lr"]: r for r in runs}
            assert len(by_lr) == len(runs)
            lr = chosen["lr"]
            assert chosen["run"] == by_lr[lr]["name"]
            below = max(x for x in by_lr if x < lr)
            above = min(x for x in by_lr if x > lr)
            for neighbour in (below, above):
                assert rank(by_lr[neighbour]) > rank(by_lr[lr])

            # The oracle: the chosen run is the fastest tried, and within the
            # half step of the fake's best learning rate.
            def speed(x, method=method, batch=batch):
                return rate(method, x, batch)

            assert max(by_lr, key=speed) == lr
            assert speed(below) < speed(lr) > speed(above)
            assert abs(log3(lr / best_lr(method, batch))) <= 0.5 + 1e-3
            # Half a step was taken: one run off the x3 grid of the start.
            offsets = [log3(x / tuning["start_lr"]) for x in by_lr]
            assert sum(abs(o - round(o)) > 0.4 for o in offsets) == 1
    # Muon's optimum lies past the first grid's upper edge, GN's past its lower.
    muon = sorted(by_lr_of(result, "muon", LARGEST))
    assert muon[-1] == pytest.approx(centre("muon") * 27, rel=1e-3)
    gn = sorted(by_lr_of(result, "gn", LARGEST))
    assert gn[0] == pytest.approx(centre("gn") / 9, rel=1e-3)


def test_a_choice_still_at_an_edge_is_reported_unbracketed(tmp_path):
    # Three runs at most: Muon's optimum, 1.6 x3 steps above its centre, is out of
    # reach, and its choice stays at the grid's upper edge; AdamW's is bracketed
    # by its grid (its half step is past the cap).
    trainer = FakeTrainer()
    result = run_study(tmp_path, trainer, "--methods", "adamw,muon", "--batch-sizes",
                       "32", "--max-runs", "3", "--seeds", "1")  # fmt: skip
    muon, adamw = result["tuning"]["muon"]["32"], result["tuning"]["adamw"]["32"]
    assert len(muon["runs"]) == len(adamw["runs"]) == 3
    assert not muon["bracketed"] and adamw["bracketed"]
    lrs = by_lr_of(result, "muon", 32)
    assert result["chosen"]["muon"]["32"]["lr"] == max(lrs) == 0.15  # 3 x centre
    # The free runs, reused with the target, and the target's two more seeds.
    assert len(trainer.calls) == 8


def by_lr_of(result, method, batch):
    return [r["hyperparameters"]["lr"] for r in tuning_runs(result, method, batch)]


def test_tuning_follows_the_rule_from_the_next_larger_batchs_choice(finished):
    _, trainer, result = finished
    for method in METHODS:
        start = centre(method)
        for batch in sorted(BATCHES, reverse=True):
            tuning = result["tuning"][method][str(batch)]
            assert tuning["start_lr"] == start
            k = batch // MICRO if method.startswith("gn") else None
            # Run by run, the one rule on the outcomes recorded so far.
            tried = []
            for run in tuning_runs(result, method, batch):
                point = Point(run["hyperparameters"]["lr"], k)
                assert next_point(start, tried, k, MAX_RUNS) == point
                assert run["hyperparameters"]["micro_batches"] == k
                tried.append((point, run))
            assert next_point(start, tried, k, MAX_RUNS) is None
            start = result["chosen"][method][str(batch)]["lr"]
    # GN's K = batch / micro-batch in every GN run, and in what study.json says.
    gn_calls = [c for c in trainer.calls if c.optimizer == "gn"]
    assert {c.batch_size for c in gn_calls} == set(BATCHES)
    for c in gn_calls:
        assert c.micro_batches == c.batch_size // MICRO
    assert result["gn_micro_batches"] == {str(b): b // MICRO for b in BATCHES}


def test_tuning_runs_give_up_at_the_best_steps_so_far(finished):
    _, trainer, result = finished
    gave_up = 0
    for method in METHODS:
        for batch in BATCHES:
            best = None
            for run in tuning_runs(result, method, batch):
                config = run["config"]
                if config["target_loss"] is None:  # a free run, reused: all steps
                    assert run["curve"]["step"][-1] == budget(batch) == STEPS
                    assert config["give_up_after"] is None
                else:
                    assert config["give_up_after"] == best
                if run["gave_up_at"] is not None:
                    gave_up += 1
                    assert run["gave_up_at"] == best == run["curve"]["step"][-1]
                    assert run["steps_to_target"] is None
                if run["steps_to_target"] is not None:
                    best = min(run["steps_to_target"], best or math.inf)
    assert gave_up >= 10
    # Seeds and layout runs run their whole budget or to the target.
    assert all(c.give_up_after is None for c in trainer.calls if c.seed)
    assert all(c.give_up_after is None for c in trainer.calls
               if c.grad_accumulation != 1)  # fmt: skip


def test_runs_with_a_target_are_exact_to_one_step(finished):
    _, _, result = finished
    target = result["target"]
    exact = 0
    for run in result["runs"]:
        config = run["config"]
        r = rate(
            run["method"],
            run["resolved"]["learning_rate"],
            run["batch_size"],
            config["seed"],
        )
        oracle = steps_to(r, target, budget(run["batch_size"]))
        if config["target_loss"] is None:  # a free run: its evaluations only
            evaluated = [s for s in range(oracle or 1, STEPS + 1)
                         if s % EVAL_EVERY == 0 or s in (4, STEPS)]  # fmt: skip
            assert run["steps_to_target"] == (evaluated[0] if oracle else None)
            continue
        if run["steps_to_target"] is None:
            assert oracle is None or oracle > run["curve"]["step"][-1]
            continue
        assert run["steps_to_target"] == oracle, run["name"]
        assert run["resolution"] == 1, run["name"]
        exact += 1
    assert exact >= 30


def test_gn_runs_at_its_runner_default_on_every_seed(finished, tmp_path):
    """Each GN method at its runner default (no tuned rate, as a user runs it) at
    every batch size on every seed, against the target; its own row on the page."""
    base, _, result = finished
    runs = by_name(result)
    # The runner's rule written out: min(1, tokens per micro-batch / 768), the
    # study's micro-batch of MICRO sequences of the model's context.
    assert result["settings"]["seq_len"] is None
    fraction = min(1.0, MICRO * CONFIGS[result["settings"]["model"]].seq_len / 768)
    for method in ("gn", "gn-layerwise"):
        for b in BATCHES:
            k = b // MICRO
            names = [f"{method}_b{b}_default_K{k}" + (f"_seed{s}" if s else "")
                     for s in range(SEEDS)]  # fmt: skip
            for seed, name in enumerate(names):
                run = runs[name]
                assert run["role"] == "default" and run["config"]["lr"] is None
                assert run["config"]["target_loss"] == result["target"]
                assert run["resolved"]["learning_rate"] == pytest.approx(fraction)
                r = rate(method, fraction, b, seed)
                oracle = steps_to(r, result["target"], budget(b))
                assert run["steps_to_target"] == oracle, name
            entry = result["defaults"][method][str(b)]
            assert entry["seed_runs"] == names
            assert entry["lr"] == pytest.approx(fraction)
            assert entry["steps_by_seed"] == [runs[n]["steps_to_target"] for n in names]
    assert set(result["defaults"]) == {"gn", "gn-layerwise"}
    write_report([base / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    row, _ = [r for r in page_rows(page, "gn default") if len(r) == len(BATCHES) + 1]
    for b, cell in zip(BATCHES, row[1:], strict=True):
        assert cell.endswith(f"(lr {fraction:.3g}, K {b // MICRO})"), cell


def test_seeds_of_every_chosen_configuration_at_every_batch(finished):
    _, trainer, result = finished
    runs = by_name(result)
    seeded = {(c.method, c.batch_size, c.seed) for c in trainer.calls if c.seed}
    # Every chosen configuration's seeds, and the target's two more seeds of the
    # best baseline at the largest batch (a seed of both is trained once).
    assert seeded == {
        (m, b, s) for m in METHODS for b in BATCHES for s in range(1, SEEDS)
    } | {("muon", LARGEST, 1), ("muon", LARGEST, 2)}
    for method in METHODS:
        for batch in BATCHES:
            entry = result["chosen"][method][str(batch)]
            k = entry["micro_batches"]
            names = [run_name(method, batch, Point(entry["lr"], k), s)
                     for s in range(SEEDS)]  # fmt: skip
            assert entry["seed_runs"] == names and entry["seeds_complete"]
            assert names[0] == entry["run"]
            for s, name in enumerate(names):
                h = runs[name]["hyperparameters"]
                assert (h["lr"], h["micro_batches"], runs[name]["seed"]) == (
                    entry["lr"], k, s)  # fmt: skip
            steps = [runs[n]["steps_to_target"] for n in names]
            assert None not in steps
            assert entry["steps_by_seed"] == steps
            assert entry["median_steps"] == sum(steps) / 2
            assert (entry["min_steps"], entry["max_steps"]) == (min(steps), max(steps))
            assert entry["tokens_by_seed"] == [runs[n]["tokens_to_target"]
                                               for n in names]  # fmt: skip
            assert entry["missed_seeds"] == 0
    # The claims at each batch size, from the medians.
    for batch in BATCHES:
        claims = result["claims"]["by_batch"][str(batch)]
        medians = {m: result["chosen"][m][str(batch)]["median_steps"] for m in METHODS}
        best = min(BASELINES[:2], key=medians.get)
        warmup = round(0.1 * budget(batch))
        assert (claims["best_baseline"], claims["warmup_steps"]) == (best, warmup)
        assert claims["best_baseline_steps_over_gn"] == pytest.approx(
            medians[best] / medians["gn"]
        )
        assert claims["layerwise_steps_over_gn_after_warmup"] == pytest.approx(
            (medians["gn-layerwise"] - warmup) / (medians["gn"] - warmup)
        )


def test_tokens_to_target_include_line_search_tokens(finished):
    _, _, result = finished
    checked = 0
    for run in result["runs"]:
        step = run["steps_to_target"]
        if step is None:
            continue
        tokens = step * run["batch_size"] * SEQ
        if run["method"].startswith("gn"):
            warmup = run["resolved"]["warmup_steps"]
            tokens += (step - warmup) * LS_BATCHES * MICRO * SEQ
            checked += 1
        assert run["tokens_to_target"] == tokens, run["name"]
    assert checked >= 12
    entry = result["chosen"]["gn"][str(LARGEST)]
    assert entry["tokens_to_target"] > entry["steps_to_target"] * LARGEST * SEQ


def test_budgets_give_every_batch_size_the_same_tokens(finished):
    _, trainer, result = finished
    assert result["budgets"] == {str(b): budget(b) for b in BATCHES}
    assert {b: budget(b) for b in BATCHES} == {8: 160, 16: 80, 32: 40}
    for c in trainer.calls:
        assert c.steps == STEPS * LARGEST // c.batch_size
        assert c.warmup_steps == round(0.1 * c.steps)
    for run in result["runs"]:
        assert run["curve"]["step"][-1] <= budget(run["batch_size"])
    # The layout check: the baselines' chosen runs at the largest batch with GN's K.
    layout = [c for c in trainer.calls if c.grad_accumulation != 1]
    k = result["chosen"]["gn"][str(LARGEST)]["micro_batches"]
    assert sorted(c.method for c in layout) == ["adamw", "muon"]
    assert {(c.batch_size, c.grad_accumulation) for c in layout} == {(LARGEST, k)}
    assert set(result["layouts"]) == {"adamw", "muon"}


def test_a_second_execute_trains_nothing(finished, tmp_path):
    base, trainer, result = finished
    shutil.copytree(base / "out", tmp_path / "out")
    shutil.copytree(base / "runs", tmp_path / "runs")
    keys = ("target", "target_source", "tuning", "chosen", "claims")

    def same(other, runs=True):
        if runs:
            assert other["runs"] == result["runs"]
        assert [r["name"] for r in other["runs"]] == [r["name"] for r in result["runs"]]
        assert {k: other[k] for k in keys} == {k: result[k] for k in keys}

    again = FakeTrainer()
    same(run_study(tmp_path, again))
    assert again.calls == []
    # From the run directories alone.
    saved = tmp_path / "out" / "study.json"
    text = saved.read_text()
    saved.unlink()
    same(run_study(tmp_path, again))
    assert again.calls == []
    # From study.json alone, with nothing to train with.
    saved.write_text(text)
    shutil.rmtree(tmp_path / "runs")
    same(run_study(tmp_path, None))
    # An earlier edition's study.json answers other questions: all trained anew.
    saved.write_text(text.replace(f'"{FORMAT}"', '"eqx-gn study 3"'))
    fresh = FakeTrainer()
    same(run_study(tmp_path, fresh), runs=False)  # runs now under tmp_path
    assert len(fresh.calls) == len(trainer.calls)


def test_a_run_with_another_budget_is_trained_anew(finished, tmp_path):
    base, _, result = finished
    shutil.copytree(base / "out", tmp_path / "out")
    shutil.copytree(base / "runs", tmp_path / "runs")
    trainer = FakeTrainer()
    other = run_study(tmp_path, trainer, "--steps", "30")
    # The free runs (40 steps) answer for no 30-step budget: trained again, and
    # the target set anew at the evaluation nearest below 0.8 x 30 = 24.
    free = [c for c in trainer.calls if c.target_loss is None]
    assert {c.method for c in free} == {"adamw", "muon"}
    assert {c.steps for c in free} == {30}
    assert other["target_source"]["step"] == 24 != result["target_source"]["step"]
    for c in trainer.calls:
        assert c.steps == 30 * LARGEST // c.batch_size
    assert other["budgets"] == {"8": 120, "16": 60, "32": 30}


def test_report_only_on_an_empty_directory(tmp_path):
    argv = ["--report-only", "--out", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match="no study in") as info:
        study.main(parse(*argv))
    assert "\n" not in str(info.value)
    (tmp_path / "out" / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot set the target") as info:
        study.main(parse(*argv, "--methods", "adamw,gn"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-runs", "2"], "--max-runs must be >= 3"),
        (["--methods", "adamw,gn", "--batch-sizes", "8,16", "--gn-micro-batch", "3"],
         "--batch-sizes 8 is not divisible by --gn-micro-batch 3"),
        (["--methods", "adamw,gn-cg"], "GN with CG has no learning rate"),
        (["--methods", "adamw,sgd"], "unknown method 'sgd'"),
        (["--methods", "adamw,adamw"], "lists a method twice"),
        (["--methods", "adamw", "--batch-sizes", "8,12", "--steps", "5"],
         "--batch-sizes 8 does not divide --steps x the largest batch"),
        (["--batch-sizes", "8,x"], "--batch-sizes takes integers"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--budget-batch", "0"], "--budget-batch must be >= 1"),
        (["--methods", "adamw", "--batch-sizes", "8,512", "--steps", "5",
          "--budget-batch", "12"], "--batch-sizes 8 does not divide --steps x "
         "--budget-batch"),
    ],
)  # fmt: skip
def test_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        study.settings_from(parse(*argv))
    assert "\n" not in str(info.value)


def test_the_true_loss_ablation_is_a_study_method():
    """gn-trueloss (`eqx_gn.TrueLossInner`) is tuned as GN is, from its runner
    default (an inner learning rate: it has no model to take a step length from,
    where GN's centre is the fraction 1 of the model's step), with GN's K, and its
    runs configured with solver trueloss (the runner's oracle)."""
    settings = study.settings_from(parse("--methods", "adamw,gn,gn-trueloss"))
    # GN's centre: the model's whole step, the runner's default from micro-batches
    # of 768 tokens (16 sequences of 64 here).
    assert centre("gn") == TrainConfig(micro_batches=4).learning_rate == 1.0
    assert centre("gn-trueloss") == TrainConfig(solver="trueloss").learning_rate
    assert centre("gn-trueloss") == 0.03
    config = settings.train_config("gn-trueloss", 32, Point(0.1, 8), Path("x"))
    assert (config.solver, config.blocks, config.micro_batches) == (
        "trueloss",
        "full",
        8,
    )
    assert config.method == "gn-trueloss" and config.learning_rate == 0.1


def test_a_method_without_a_declared_learning_rate(monkeypatch):
    monkeypatch.delitem(CENTRES, "psgd")
    with pytest.raises(
        ConfigError, match="no declared learning rate for method 'psgd'"
    ):
        study.settings_from(parse("--methods", "adamw,psgd"))


# -- the figures ------------------------------------------------------------------


@pytest.fixture
def figures():
    """Closes the figures a test drew."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_steps_figure_has_plain_tick_labels(finished, figures):
    _, _, result = finished
    fig = steps_figure(result)
    fig.canvas.draw()
    (ax,) = fig.axes
    for axis in (ax.xaxis, ax.yaxis):
        labels = [t.get_text() for t in axis.get_ticklabels(which="both")]
        labels = [t for t in labels if t]
        assert labels
        for text in labels:
            assert "\\times" not in text and "$" not in text, text
            float(text)
    assert {"8", "16", "32"} <= {t.get_text() for t in ax.xaxis.get_ticklabels()}


def test_curves_figure_labels_its_lines_and_clips_no_curve(finished, figures):
    _, _, result = finished
    fig = curves_figure(result)
    fig.canvas.draw()
    steps_ax, time_ax = fig.axes
    labels = [t.get_text() for t in steps_ax.get_legend().get_texts()]
    assert f"target {result['target']:.3f}" in labels
    assert "end of warm-up" in labels
    assert set(METHODS) <= set(labels)
    runs = by_name(result)
    drawn = 0
    for method in METHODS:
        entry = result["chosen"][method][str(LARGEST)]
        curve = runs[entry["run"]]["curve"]
        for step, value in zip(curve["step"], curve["val_loss"], strict=True):
            if value is None or step < entry["warmup_steps"]:
                continue
            for ax in (steps_ax, time_ax):
                low, high = ax.get_ylim()
                assert low <= value <= high, (method, step, value)
            drawn += 1
    assert drawn > 20


def test_eqx_gn_plot_reads_study_json(finished):
    from eqx_gn.lm.results._loss_curves import load_runs

    base, _, result = finished
    source = load_runs(base / "out")
    assert {r.label for r in source.runs} == {m.replace("-", " ") for m in METHODS}
    chosen = {result["chosen"][m][str(LARGEST)]["run"] for m in METHODS}
    assert {r.name for r in source.runs} == chosen


# -- the results page -------------------------------------------------------------


def page_rows(page, first_cell):
    """The table rows of ``page`` whose first cell is ``first_cell``."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in page.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_report_reads_every_median_from_the_runs(finished, tmp_path):
    base, _, result = finished
    page_path = tmp_path / "docs" / "results.md"
    write_report([base / "out"], page_path)
    page = page_path.read_text()
    runs = by_name(result)
    # The oracle: each chosen configuration's seeds, read from the runs themselves.
    for method in METHODS:
        (row, serial) = [
            r for r in page_rows(page, method) if len(r) == len(BATCHES) + 1
        ]
        for b, cell, cost in zip(BATCHES, row[1:], serial[1:], strict=True):
            best = runs[result["chosen"][method][str(b)]["run"]]
            seeds = [best] + [
                r for r in runs.values()
                if r["role"] == "seed" and r["method"] == method
                and r["batch_size"] == b
                and r["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
            ]  # fmt: skip
            assert len(seeds) == SEEDS
            steps = sorted(r["steps_to_target"] for r in seeds)
            median = (steps[0] + steps[1]) / 2  # two seeds
            assert cell.startswith(f"{median:g} [{steps[0]}-{steps[1]}]"), cell
            # Serial passes, from the fake's construction: a warm-up step 1, a
            # main first-order step 1, a GN step K + its line-search evaluations.
            passes = []
            for r in seeds:
                warm = r["resolved"]["warmup_steps"]
                k = r["hyperparameters"]["micro_batches"]
                main = range(warm + 1, r["steps_to_target"] + 1)
                per_step = [1] * len(main) if k is None else [
                    k + fake_evaluations(st) for st in main]  # fmt: skip
                passes.append(warm + sum(per_step))
            assert cost.endswith(f"{(passes[0] + passes[1]) / 2:,.0f} passes"), cost
            assert "\\*" not in cell  # every choice of the fake study is bracketed
    source = result["target_source"]
    assert (
        f"step {source['step']} of {source['budget']} in run `{source['run']}`" in page
    )
    assert f"**{result['target']:.4f}**" in page
    # The critical-batch lines: each method's fall over the last doubling.
    lo, hi = BATCHES[-2:]
    falls = {
        m: result["chosen"][m][str(lo)]["median_steps"]
        / result["chosen"][m][str(hi)]["median_steps"]
        for m in METHODS
    }
    expected = ", ".join(f"{m} {f:.2f}x" for m, f in falls.items())
    assert f"From batch {lo} to {hi}" in page and expected in page
    assert (page_path.parent / "assets" / "out").is_dir()


def test_serial_passes_count_each_step_on_the_critical_path():
    """A hand-made run: 2 warm-up steps, then GN steps of K = 4 with 3, 1 and 2
    line-search evaluations, the target at step 4; a first-order run with the same
    phases and gradient accumulation over 8 micro-batches, the target at step 5."""
    curve = {
        "step": [1, 2, 3, 4, 5],
        "phase": ["warmup", "warmup", "main", "main", "main"],
        "line_search_evaluations": [None, None, 3, 1, 2],
    }
    gn = {
        "steps_to_target": 4,
        "hyperparameters": {"micro_batches": 4, "grad_accumulation": 1},
        "curve": curve,
    }
    assert serial_passes(gn) == 2 + (4 + 3) + (4 + 1)
    accumulated = {
        "steps_to_target": 5,
        "hyperparameters": {"micro_batches": None, "grad_accumulation": 8},
        "curve": {**curve, "line_search_evaluations": [None] * 5},
    }
    assert serial_passes(accumulated) == 2 + 3 * 8
    assert serial_passes({**gn, "steps_to_target": None}) is None  # missed
    # A curve recorded before the evaluations were kept: GN's count is unknown,
    # a first-order run's is not.
    old = {k: v for k, v in curve.items() if k != "line_search_evaluations"}
    assert serial_passes({**gn, "curve": old}) is None
    assert serial_passes({**accumulated, "curve": old}) == 2 + 3 * 8


def test_budgets_keep_the_tokens_up_to_the_budget_batch_and_the_steps_above():
    """--budget-batch 256 with --steps 160 from 8 to 1024 sequences: every batch up
    to 256 reads the tokens of 160 steps at 256, every larger one runs 160 steps;
    without it, the largest batch sets the tokens (the second edition's rule)."""
    sizes = "8,16,32,64,128,256,512,1024"
    given = study.settings_from(
        parse("--batch-sizes", sizes, "--steps", "160", "--budget-batch", "256")
    )
    budgets = {b: given.budget(b) for b in given.batch_sizes}
    assert budgets == {8: 5120, 16: 2560, 32: 1280, 64: 640, 128: 320, 256: 160,
                       512: 160, 1024: 160}  # fmt: skip
    default = study.settings_from(parse("--batch-sizes", sizes, "--steps", "160"))
    assert default.budget(1024) == 160 and default.budget(8) == 160 * 128


def test_critical_batch_is_where_steps_leave_the_linear_line_by_20_percent():
    """Zhang et al.'s measure against hand-made curves."""
    budgets = dict.fromkeys((8, 16, 32, 64), 10_000)
    # Linear to 16, then 1.1x and 1.6x the line (800 x 8 / b) at 32 and 64: the
    # crossing lies between 32 and 64, where the power law through those two
    # points is 1.2x the line.
    c = critical_batch({8: 800, 16: 400, 32: 220, 64: 160}, budgets)
    assert c["between"] == [32, 64] and c["bound"] is None
    slope = math.log(1.6 / 1.1) / math.log(2)
    assert 1.1 * (c["batch"] / 32) ** slope == pytest.approx(1.2)
    assert 32 < c["batch"] < 64
    # On the line at every batch: past the largest.
    c = critical_batch({8: 800, 16: 400, 32: 200}, budgets)
    assert (c["batch"], c["between"], c["bound"]) == (None, [32, None], "above")
    # A miss within a budget 2.5x the line is past 1.2x; within 1.125x it says
    # nothing about that batch.
    c = critical_batch({8: 800, 16: None}, {8: 2000, 16: 1000})
    assert (c["between"], c["bound"]) == ([8, 16], "missed")
    c = critical_batch({8: 800, 16: None}, {8: 2000, 16: 450})
    assert (c["between"], c["bound"]) == ([8, None], "missed")
    assert critical_batch({8: None, 16: 400}, budgets)["bound"] == "unknown"


def test_the_study_reports_each_methods_critical_batch(finished, tmp_path):
    base, _, result = finished
    budgets = {b: budget(b) for b in BATCHES}
    for method in METHODS:
        medians = {b: result["chosen"][method][str(b)]["median_steps"] for b in BATCHES}
        assert result["critical_batch"][method] == critical_batch(medians, budgets)
    assert "gn default" in result["critical_batch"]
    write_report([base / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    line = next(x for x in page.splitlines() if "Critical batch size" in x)
    for method in METHODS:
        assert f" {method} " in line


def test_report_marks_an_unbracketed_choice(tmp_path):
    run_study(tmp_path, FakeTrainer(), "--methods", "adamw,muon", "--batch-sizes",
              "32", "--max-runs", "3", "--seeds", "1")  # fmt: skip
    write_report([tmp_path / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    # The steps table, then the costs table: a method and one cell per batch size.
    muon, _ = [r for r in page_rows(page, "muon") if len(r) == 2]
    adamw, _ = [r for r in page_rows(page, "adamw") if len(r) == 2]
    assert muon[1].endswith("\\*") and not adamw[1].endswith("\\*")


def test_a_study_of_inner_optimizers_records_and_reports_them(finished, tmp_path):
    """GN with other inner optimizers against a given target: every run's record
    names its method as the runner's config does (`TrainConfig.method`, the
    oracle), and the page reports the study in its own section with no claims
    column (it holds no baseline to compare with)."""
    base, _, main = finished
    trainer = FakeTrainer()
    result = run_study(tmp_path, trainer, "--methods", "gn-soap,gn-layerwise-psgd",
                       "--batch-sizes", str(LARGEST), "--seeds", "1",
                       "--target", str(main["target"]))  # fmt: skip
    assert {r["method"] for r in result["runs"]} == {"gn-soap", "gn-layerwise-psgd"}
    for r in result["runs"]:
        config = next(c for c in trainer.calls if Path(c.out).name == r["name"])
        assert r["method"] == config.method
    write_report([base / "out", tmp_path / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    (header,) = [line for line in page.splitlines() if line.startswith("| claim |")]
    assert header.count("|") == 3  # the claim and the main study's column only
    assert f"## The tiny model: gn-soap, gn-layerwise-psgd at batch {LARGEST}" in page


def test_report_refuses_a_first_edition_study(finished, tmp_path):
    base, _, _ = finished
    old = json.loads((base / "out" / "study.json").read_text())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.json").write_text(
        json.dumps({**old, "format": "eqx-gn study 2"})
    )
    with pytest.raises(ConfigError, match="format 'eqx-gn study 2'") as info:
        write_report([tmp_path / "old"], tmp_path / "results.md")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results.md").exists()


def test_baselines_that_all_miss_at_the_largest_batch_bound_the_ratio(finished):
    _, _, result = finished
    assert result["claims"]["largest"]["best_baseline_steps_over_gn_at_least"] is None
    r = copy.deepcopy(result)
    for m in METHODS:
        if m in BASELINES:  # every seed missed within the budget
            r["chosen"][m][str(LARGEST)].update(
                steps_by_seed=[None] * SEEDS, median_steps=None, missed_seeds=SEEDS
            )
    c = claims(r["chosen"], LARGEST, budget(LARGEST))
    gn = r["chosen"]["gn"][str(LARGEST)]["median_steps"]
    warmup = c["warmup_steps"]
    assert c["best_baseline"] is None and c["best_baseline_steps_over_gn"] is None
    # Each baseline's median lies past the budget: the ratio is above budget / GN.
    assert c["best_baseline_steps_over_gn_at_least"] == budget(LARGEST) / gn
    assert c["best_baseline_steps_over_gn_after_warmup_at_least"] == (
        (budget(LARGEST) - warmup) / (gn - warmup)
    )
    r["claims"]["largest"] = r["claims"]["by_batch"][str(LARGEST)] = c
    low = (budget(LARGEST) - warmup) / (gn - warmup)
    page = "\n".join(_claims_section([(r, "study.json")]))
    assert f"> {low:.2f}x: every baseline missed the target" in page
    assert (
        f"every baseline > {budget(LARGEST)} (missed within the budget) / GN {gn}"
        in page
    )
    assert f"> {budget(LARGEST) / gn:.2f} (> {low:.2f}): every baseline missed" in page
    # The critical-batch line: a baseline's fall is below its steps at the batch
    # before over the budget; GN's is its own ratio.
    lo = BATCHES[-2]
    text = "\n".join(_critical_batch_lines(r))
    for m in BASELINES:
        if m in METHODS:
            fall = r["chosen"][m][str(lo)]["median_steps"] / budget(LARGEST)
            assert f"{m} < {fall:.2f}x (missed at {LARGEST}" in text
    gn_fall = r["chosen"]["gn"][str(lo)]["median_steps"] / gn
    assert "GN's steps kept falling faster than" in text or gn_fall <= max(
        r["chosen"][m][str(lo)]["median_steps"] / budget(LARGEST)
        for m in BASELINES if m in METHODS
    )  # fmt: skip
    assert f"{gn_fall:.2f}x against at most" in text


def test_timed_claims_bound_gn_by_the_budget_when_every_baseline_missed(finished):
    _, _, result = finished
    r = copy.deepcopy(result)
    for m in METHODS:
        if m in BASELINES:
            r["chosen"][m][str(LARGEST)].update(median_steps=None, missed_seeds=SEEDS)
    seconds = {"adamw": 0.3, "adamw A4": 0.2, "muon": 0.5, "muon A4": 0.25, "gn": 0.6}
    timing = {"batch_size": LARGEST, "median_seconds_per_step": seconds}
    t = timed_claims(r, timing)
    gn = r["chosen"]["gn"][str(LARGEST)]
    warmup = gn["warmup_steps"]
    gn_time = (gn["median_steps"] - warmup) * 0.6
    # The fastest baseline needs more than its main steps in the budget.
    floor = (budget(LARGEST) - warmup) * 0.3
    assert t["gn_over_fastest_baseline"] is None
    assert t["gn_over_fastest_baseline_at_most"] == pytest.approx(gn_time / floor)
    floor = (budget(LARGEST) - warmup) * 0.2
    assert t["gn_over_fastest_baseline_in_gn_layout_at_most"] == pytest.approx(
        gn_time / floor
    )
    # With a baseline that reached it, there is no bound: the ratio is measured.
    assert timed_claims(result, timing)["gn_over_fastest_baseline_at_most"] is None


def test_steps_figure_draws_a_missed_target_at_the_budget(finished, figures):
    """A median that missed the target is not left out: an open triangle stands at
    the run's budget, in the method's colour, with a legend entry saying so."""
    import copy

    _, _, result = finished

    def triangles(fig):
        (ax,) = fig.axes
        return ax, [line for line in ax.get_lines() if line.get_marker() == "^"]

    missed_anywhere = any(
        e["median_steps"] is None for row in result["chosen"].values()
        for e in row.values()
    )  # fmt: skip
    ax, drawn = triangles(steps_figure(result))
    assert bool(drawn) == missed_anywhere
    changed = copy.deepcopy(result)
    method = METHODS[0]
    entry = changed["chosen"][method][str(LARGEST)]
    entry.update(median_steps=None, min_steps=None, max_steps=None, missed_seeds=3)
    ax, drawn = triangles(steps_figure(changed))
    points = {
        (float(x), float(y))
        for line in drawn
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
    }
    # At the budget, and at the batch size (beside the others missed there).
    assert any(
        y == budget(LARGEST) and abs(math.log2(x / LARGEST)) < 0.5 for x, y in points
    )
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "missed: at its budget" in labels
    # The method's own line (its colour, round markers) no longer reaches the
    # largest batch; the triangle has its colour.
    import matplotlib.colors

    colour = matplotlib.colors.to_rgba(_color(method, 0))
    own = [
        x
        for x in ax.get_lines()
        if x.get_marker() == "o" and matplotlib.colors.to_rgba(x.get_color()) == colour
    ]
    assert own and all(LARGEST not in list(x.get_xdata()) for x in own)
    assert any(matplotlib.colors.to_rgba(x.get_color()) == colour for x in drawn)


# -- the third edition: a plateau, and the declared cap -------------------------------

#: The plateau fake's optimum, 4 x3 steps above GN's centre, and its target.
PLATEAU_OPTIMUM = 4
PLATEAU_TARGET = 2.0


def plateau_lr_steps(lr):
    return log3(lr / centre("gn"))


def plateau_curve(config, step):
    """GN on a plateau: the loss falls fast to 3.4 and leaves it at a rate that is
    log-normal around 81 x the centre, too slow to reach the target more than
    1.5 x3 steps away; at the centre it creeps lower on the plateau (as the
    prototype's full GN did at 0.03: it left the plateau late and missed)."""
    d = plateau_lr_steps(config.learning_rate) - PLATEAU_OPTIMUM
    r = 0.075 * math.exp(-d * d / 2)
    creep = 0.3 * math.exp(-((plateau_lr_steps(config.learning_rate) / 0.3) ** 2))
    return L_INF + 2.4 * math.exp(-r * step) + 1.6 * math.exp(-step) - creep


def plateau_steps(lr):
    """Steps to the target of the plateau fake at ``lr`` within the budget (the
    oracle), None where it misses."""
    config = argparse.Namespace(learning_rate=lr)
    return next((t for t in range(1, STEPS + 1)
                 if plateau_curve(config, t) <= PLATEAU_TARGET), None)  # fmt: skip


def test_a_plateau_does_not_strand_the_walk(tmp_path):
    """On the plateau the lowest loss sits at the centre between two worse runs,
    all short of the target: the second edition's rule bracketed there and chose
    a run that missed. The walk goes on until runs reach the target, and chooses
    the fastest, near the known optimum."""
    trainer = FakeTrainer(plateau_curve)
    result = run_study(tmp_path, trainer, "--methods", "gn", "--batch-sizes",
                       str(LARGEST), "--seeds", "1", "--max-runs", "12",
                       "--target", str(PLATEAU_TARGET))  # fmt: skip
    tuning = result["tuning"]["gn"][str(LARGEST)]
    chosen = result["chosen"]["gn"][str(LARGEST)]
    tried = by_lr_of(result, "gn", LARGEST)
    # The first grid is all on the plateau, its best loss at the centre.
    grid = tuning_runs(result, "gn", LARGEST)[:3]
    assert all(r["steps_to_target"] is None for r in grid)
    assert min(grid, key=lambda r: r["best_val_loss"])["hyperparameters"]["lr"] == (
        centre("gn")
    )
    # The oracle: the chosen run reached the target, in the fewest steps any
    # learning rate tried takes, within half a x3 step of the optimum.
    assert chosen["steps_to_target"] is not None
    assert chosen["steps_to_target"] == plateau_steps(chosen["lr"])
    fastest = min(
        (plateau_steps(lr), lr) for lr in tried if plateau_steps(lr) is not None
    )
    assert chosen["lr"] == fastest[1]
    assert abs(plateau_lr_steps(chosen["lr"]) - PLATEAU_OPTIMUM) <= 0.5 + 1e-3
    assert tuning["bracketed"] and tuning["complete"] and len(tried) <= 12


def test_the_declared_cap_is_12_in_study_json_and_on_the_page(tmp_path):
    args = parse("--methods", "adamw,gn", "--target", "2.0")
    assert args.max_runs == 12
    result = run_study(tmp_path, FakeTrainer(), "--methods", "adamw,muon",
                       "--batch-sizes", "32", "--seeds", "1", "--max-runs", "4")  # fmt: skip
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["max_runs"] == saved["settings"]["max_runs"] == 4
    assert "at most 4 runs" in saved["rule"]
    assert all(len(t["runs"]) <= 4 for t in result["tuning"]["muon"].values())
    write_report([tmp_path / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    assert "- **The cap** (`max_runs`): at most 4 runs tune one method" in page


def test_a_second_edition_study_is_reported_as_written(finished, tmp_path):
    """A study.json of the second edition (format 3, no ``max_runs`` key, its
    cap in its settings) is tabulated and paged as written: --report-only walks
    nothing by this edition's rule, trains nothing and leaves the file alone."""
    base, _, result = finished
    old = {k: v for k, v in result.items() if k != "max_runs"}
    old = {**old, "format": "eqx-gn study 3"}
    old["settings"] = {**old["settings"], "max_runs": 9}
    shutil.copytree(base / "out", tmp_path / "old")  # the study and its plots
    text = json.dumps(old)
    (tmp_path / "old" / "study.json").write_text(text)
    page = tmp_path / "results.md"
    argv = ["--report-only", "--out", str(tmp_path / "old"), "--report", str(page)]
    assert study.main(parse(*argv)) == 0
    assert (tmp_path / "old" / "study.json").read_text() == text
    assert not (tmp_path / "old" / "runs").exists()
    assert "- **The cap** (`max_runs`): at most 9 runs tune" in page.read_text()


def test_the_page_reads_the_learning_rate_robustness_file(finished, tmp_path):
    """`benchmarks/lr_robustness.py`'s JSON beside a study: one row per batch size
    and method with every run's steps (or 'missed'), its good range and the
    default's steps over the best, and one line per GN cell against Muon's width."""
    base, _, result = finished
    shutil.copytree(base / "out", tmp_path / "out")
    factors = [4.0**e for e in range(-3, 4)]

    def runs(steps):
        return [{"factor": f, "lr": f, "steps_to_target": s} for f, s in zip(
            factors, steps, strict=True)]  # fmt: skip

    gn = [None, 300, 120, 100, 110, None, None]
    muon = [None, None, None, 200, 150, None, None]
    robustness = {
        "model": result["settings"]["model"], "date": "2026-12-07", "machine": "m",
        "seed": 0, "factors": factors,
        "rule": {"target": "1.8197", "steps_to_target": "first step",
                 "good_range": "within 1.25x"},
        "batch_sizes": {"32": {
            "target": 1.8197, "budget": 1280,
            "runs": {"gn K=8": runs(gn), "muon": runs(muon)},
            "good_range": {
                "gn K=8": {"best_factor": 1.0, "best_steps": 100, "low_factor": 1.0,
                           "high_factor": 4.0, "width": 4.0, "open": False,
                           "default_over_best": 1.0},
                "muon": {"best_factor": 4.0, "best_steps": 150, "low_factor": 4.0,
                         "high_factor": 4.0, "width": 1.0, "open": False,
                         "default_over_best": 200 / 150},
            },
        }},
    }  # fmt: skip
    file = tmp_path / f"lr_robustness_{result['settings']['model']}.json"
    file.write_text(json.dumps(robustness))
    write_report([tmp_path / "out"], tmp_path / "results.md")
    page = (tmp_path / "results.md").read_text()
    assert "at x1/64 to x64 each method's default" in page
    rows = {r[1]: r for r in page_rows(page, "32") if len(r) == 2 + len(factors) + 4}
    assert rows["gn K=8"][2:] == [
        "missed", "300", "120", "100", "110", "missed", "missed",
        "100 at x1", "x1 to x4", "4x", "1.00",
    ]  # fmt: skip
    assert rows["muon"][-4:] == ["150 at x4", "x4 to x4", "1x", "1.33"]
    assert "- Batch 32, gn K=8: GN's good range is 4x wide against Muon's 1x (met" in (
        page
    )
