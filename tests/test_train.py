"""The training runner: configuration, resuming bit for bit, data parallelism over a
mesh and over processes, the target loss."""

import contextlib
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from compile_flags import subprocess_env
from eqx_gn.lm import ConfigError, TrainConfig, parse_method, train
from helpers import SMALL, final_arrays, psgdax_config, small


def records(run_dir, drop=("time_s",)):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in drop} for r in lines]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
        (dict(batch_size=10, micro_batches=4), "not divisible by micro_batches=4"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(warmup_fraction=1.0), "warmup_fraction must be in [0, 1)"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(tokenizer="bpe"), "needs a vocab_size"),
        (dict(resume=True, overwrite=True), "exclude each other"),
        (dict(optimizer="gn-layerwise"), "(gn-layerwise is optimizer='gn' with blocks"),
        (dict(optimizer="adamw", blocks="layerwise"), "blocks applies to optimizer"),
        (dict(solver="newton"), "unknown solver 'newton'"),
        (dict(solver="cg", lr=0.1), "lr does not apply to solver 'cg'"),
        (dict(cg_iterations=5), "cg_iterations applies to solver 'cg' only"),
        (dict(solver="cg", cg_damping=0.0), "cg_damping must be > 0"),
        (dict(line_search="armijo"), "unknown line_search 'armijo'"),
        (dict(trust="loose"), "unknown trust 'loose'"),
        (dict(optimizer="adamw", trust="fixed"), "trust applies to optimizer"),
        (dict(optimizer="muon", line_search="grid"), "line_search applies to optim"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**changes)


def test_config_derived_sizes():
    config = TrainConfig()
    assert (config.steps, config.batch_size, config.micro_batches) == (200, 64, 8)
    assert (config.warmup_steps, config.main_steps) == (20, 180)
    config = config.replace(steps=100, warmup_fraction=0.05)
    assert (config.warmup_steps, config.main_steps) == (5, 95)
    assert config.micro_batch_size == config.line_search_batch_size == 8
    # GN's lr: the fraction of the model's inner step, min(1, tokens / 768) per
    # micro-batch (8 sequences of 64 tokens here), or the paper's rate.
    assert config.micro_batch_tokens == 8 * 64
    assert config.learning_rate == 512 / 768
    assert config.replace(micro_batches=2).learning_rate == 1.0
    assert config.replace(inner_step="lr").learning_rate == 3e-2
    assert TrainConfig(warmup_fraction=0.0).warmup_steps == 0
    assert TrainConfig(steps=3, warmup_fraction=0.01).warmup_steps == 1
    assert TrainConfig(steps=1).warmup_steps == 0
    # First-order optimizers ignore micro_batches.
    assert (
        TrainConfig(optimizer="adamw", batch_size=10, micro_batches=4).batch_size == 10
    )
    config = TrainConfig(optimizer="muon", lr=0.01)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_gn_line_search_defaults_to_the_warm_walk_except_with_cg(tmp_path, cache_dir):
    assert TrainConfig().line_search_rule == "warm"
    assert TrainConfig(solver="cg").line_search_rule == "grid"
    assert TrainConfig(optimizer="adamw").line_search_rule is None
    evaluations = {}
    step_sizes = {}
    for rule in ("grid", "warm", "none"):
        # The paper's fixed rule: no shortening past the grid, so the grid's count
        # of evaluations is exact.
        config = small(
            tmp_path, cache_dir, rule, steps=6, line_search=rule, trust="fixed"
        )
        assert train(config)["line_search"] == rule
        evaluations[rule] = [
            r["line_search_evaluations"]
            for r in records(tmp_path / rule)
            if r["phase"] == "main"
        ]
        step_sizes[rule] = [
            r["step_size"] for r in records(tmp_path / rule) if r["phase"] == "main"
        ]
    # The grid evaluates all its step sizes at every step; the walk fewer, in all.
    assert evaluations["grid"] == [config.ls_grid] * len(evaluations["grid"])
    assert sum(evaluations["warm"]) < sum(evaluations["grid"])
    # No search: the step at step size 1 after one evaluation, every step.
    assert evaluations["none"] == [1] * len(evaluations["grid"])
    assert step_sizes["none"] == [1.0] * len(evaluations["grid"])
    assert step_sizes["grid"] != step_sizes["none"]


def test_gn_trust_rule_defaults_to_fixed_and_is_recorded(tmp_path, cache_dir):
    # The inner steps take their length from the model: no rule scales them.
    assert TrainConfig().trust_rule == "fixed"
    assert TrainConfig(solver="cg").trust_rule == "levenberg-marquardt"
    assert TrainConfig(optimizer="adamw").trust_rule is None
    # A GN run saved before the setting existed ran the fixed rule, or with CG its
    # Levenberg-Marquardt damping.
    for solver, rule in (("inner", "fixed"), ("cg", "levenberg-marquardt")):
        saved = TrainConfig(solver=solver).to_dict()
        del saved["trust"]
        assert TrainConfig.from_dict(saved).trust_rule == rule
    scales = {}
    for rule in ("adaptive", "fixed"):
        # Inner learning rate 1.0: far too large, so the adaptive rule has
        # something to do.
        config = small(
            tmp_path, cache_dir, rule, steps=6, lr=1.0, trust=rule, inner_step="lr"
        )
        assert train(config)["trust"] == rule
        saved = json.loads((tmp_path / rule / "config.json").read_text())
        assert saved["resolved"]["trust"] == rule
        main = [r for r in records(tmp_path / rule) if r["phase"] == "main"]
        scales[rule] = [r["trust_scale"] for r in main]
        assert all(r["step_size"] > 0 or r["rejected"] for r in main)
    assert scales["fixed"] == [1.0] * 4
    # Each step's scale is the last one times the rule's factor for the step the
    # line search chose there (from the metrics alone).
    main = [r for r in records(tmp_path / "adaptive") if r["phase"] == "main"]
    assert main[0]["trust_scale"] == 1.0
    for before, after in itertools.pairwise(main):
        s, predicted = before["step_size"], before["predicted_decrease"]
        rho = before["actual_decrease"] / predicted if predicted > 0 else math.nan
        if s >= 1:
            factor = 1.0 if rho < 0.25 else 2.0
        else:
            factor = max(s, 1 / 4) if s < 0.25 else 1.0
        expected = min(8.0, max(1e-3, before["trust_scale"] * factor))
        assert after["trust_scale"] == pytest.approx(expected, rel=1e-6)
    assert min(scales["adaptive"]) < 1.0


def test_cg_trains_with_the_warm_walk_its_damping_set_by_the_trust_rule(
    tmp_path, cache_dir
):
    # Once refused (CG's own damping rule needed the loss at step size 1): the
    # Levenberg-Marquardt rule now reads the step where the walk skipped s = 1.
    config = small(tmp_path, cache_dir, "cg", steps=6, solver="cg", line_search="warm")
    assert train(config)["trust"] == "levenberg-marquardt"
    main = [r for r in records(tmp_path / "cg") if r["phase"] == "main"]
    assert main and all(math.isfinite(r["train_loss"]) for r in main)
    assert any(r["trust_scale"] != 1.0 for r in main)  # the damping moved
    for r in main:
        # The damping CG solved at is cg_damping over the rule's scale.
        assert r["damping"] == pytest.approx(config.cg_damping / r["trust_scale"])


def test_gn_settings_are_orthogonal_and_named_by_method():
    config = TrainConfig(blocks="layerwise", solver="cg", cg_iterations=5)
    assert (config.method, config.label) == ("gn-layerwise-cg", "gn layerwise cg")
    assert config.learning_rate is None
    assert TrainConfig().method == "gn" and TrainConfig(solver="prox").method == (
        "gn-prox"
    )
    assert TrainConfig(optimizer="soap").method == "soap"
    for method in ("gn", "gn-layerwise", "gn-prox", "gn-trueloss", "gn-cg",
                   "gn-layerwise-prox"):  # fmt: skip
        assert TrainConfig().with_method(method).method == method
    assert parse_method("gn-cg-layerwise") == {
        "optimizer": "gn",
        "blocks": "layerwise",
        "solver": "cg",
        "inner": "muon",
    }
    # The inner optimizer: named last, in any order, once; never with CG.
    config = TrainConfig(blocks="layerwise", solver="prox", inner="soap")
    assert (config.method, config.label) == (
        "gn-layerwise-prox-soap",
        "gn layerwise prox soap",
    )
    assert parse_method("gn-soap-prox-layerwise") == parse_method(config.method)
    for method in ("gn-adamw", "gn-layerwise-psgd", "gn-prox-soap"):
        assert TrainConfig().with_method(method).method == method
    for bad in ("gn-soap-adamw", "gn-cg-soap", "soap-adamw"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)
    for bad, message in (
        (dict(optimizer="adamw", inner="soap"), "inner applies to optimizer 'gn'"),
        (dict(solver="cg", inner="adamw"), "not 'cg'"),
        (dict(inner="sgd"), "unknown inner 'sgd'"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad)
    for bad in ("gn-layerwise-full", "adamw-layerwise", "gn-newton", "sgd"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)
    # A configuration saved before blocks and solver existed reads as its method.
    old = {**TrainConfig().to_dict(), "optimizer": "gn-layerwise"}
    del old["blocks"], old["solver"], old["cg_damping"], old["cg_iterations"]
    assert TrainConfig.from_dict(old).method == "gn-layerwise"


@pytest.mark.parametrize("optimizer", ["adamw", "gn"])
def test_resume_gives_the_same_run_bit_for_bit(tmp_path, cache_dir, optimizer):
    whole = small(tmp_path, cache_dir, "whole", optimizer=optimizer, checkpoint_every=2)
    summary = train(whole)
    assert summary["completed"] and summary["steps"] == 6
    # Each step function is compiled once, however many steps run.
    assert summary["compiled"] == ["eval", "main", "warmup"]

    # Killed after step 5 (the last checkpoint is at step 4), then resumed: steps 5
    # and 6 are redone and the metrics file is cut back to step 4 first.
    cut = whole.replace(out=str(tmp_path / "cut"), stop_after=5)
    partial = train(cut)
    assert not partial["completed"] and partial["steps"] == 5
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert len(records(cut.out)) == 5
    resumed = train(cut.replace(stop_after=None, resume=True))
    assert resumed["completed"] and resumed["steps"] == 6
    assert resumed["compiled"] == ["eval", "main"]  # no warm-up step after step 4

    assert records(cut.out) == records(whole.out)
    step_a, arrays_a = final_arrays(whole.out)
    step_b, arrays_b = final_arrays(cut.out)
    assert step_a == step_b == 6
    assert len(arrays_a) == len(arrays_b)
    for a, b in zip(arrays_a, arrays_b, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()

    run = records(whole.out)
    assert [r["phase"] for r in run] == ["warmup"] * 2 + ["main"] * 4
    assert [r["tokens"] for r in run] == [16 * 32 * i for i in range(1, 7)]
    assert [r["step"] for r in run if "val_loss" in r] == [2, 4, 6]
    assert run[-1]["val_loss"] < run[1]["val_loss"]
    if optimizer == "gn":
        main = run[2:]
        assert [r["ls_tokens"] for r in main] == [8 * 32 * i for i in range(1, 5)]
        for name in ("step_size", "loss_before", "loss_after", "predicted_decrease"):
            assert all(name in r for r in main)
        assert resumed["ls_tokens"] == 4 * 8 * 32
        assert resumed["tokens_read"] == 6 * 16 * 32 + 4 * 8 * 32
        # GN itself trains: most of its steps are taken, and its four steps lower
        # the validation loss well below where the warm-up left it.
        assert sum(not r["rejected"] for r in main) >= 3
        assert run[-1]["val_loss"] < run[1]["val_loss"] - 0.2


def test_target_loss_stops_the_run_and_resume_after_the_end(tmp_path, cache_dir):
    config = small(
        tmp_path,
        cache_dir,
        "target",
        optimizer="adamw",
        steps=5,
        warmup_fraction=0.0,
        eval_every=1,
        target_loss=5.45,
    )
    summary = train(config)
    assert summary["target_reached"] and summary["completed"]
    assert summary["steps"] == summary["steps_to_target"] < 5
    assert summary["tokens_to_target"] == summary["steps"] * 16 * 32
    assert summary["time_to_target"] == summary["time_s"]
    assert summary["final_val_loss"] <= 5.45
    assert (
        json.loads((tmp_path / "target" / "summary.json").read_text())[
            "steps_to_target"
        ]
        == summary["steps"]
    )
    # The run is over: resuming it runs no step and returns its summary as it was
    # (compile and wall times included: tests/test_run_lifecycle.py).
    again = train(config.replace(resume=True))
    assert again == summary


# -- eval_resolution and give_up_after ------------------------------------------

# AdamW without a warm-up for 100 steps: a falling validation curve to set targets
# on. With R = 1/8 every spacing R * step is exact in floating point.
CURVE = dict(optimizer="adamw", steps=100, warmup_fraction=0.0, checkpoint_every=0)
RESOLUTION = 0.125


@pytest.fixture(scope="module")
def curve(tmp_path_factory, cache_dir):
    """The CURVE run evaluated at every step: ``(config, records)``."""
    config = small(tmp_path_factory.mktemp("curve"), cache_dir, "every", **CURVE)
    config = config.replace(eval_every=1)
    train(config)
    run = records(config.out)
    assert [r["step"] for r in run if "val_loss" in r] == list(range(1, 101))
    return config, run


def first_crossing(losses, after):
    """``(t, target)``: a target the loss first reaches at step ``t >= after``,
    halfway between its lowest before ``t`` and its value at ``t``."""
    t = next(
        t for t in range(after, len(losses) + 1) if losses[t - 1] < min(losses[: t - 1])
    )
    target = (min(losses[: t - 1]) + losses[t - 1]) / 2
    assert next(s for s, loss in enumerate(losses, 1) if loss <= target) == t
    return t, target


def resolution_schedule(losses, r, target):
    """The steps a run evaluates with ``eval_resolution=r`` alone (no eval_every,
    no warm-up), from its validation loss at every step, as TrainConfig describes
    it: when the steps since the last evaluation (or the start) reach ``r * step``,
    and at every step from the one where the line through the last two
    evaluations meets the target within two such spacings; up to the first step at
    or below the target."""
    evaluated, every_step = [], False
    for step, loss in enumerate(losses, 1):
        spacing = max(1, r * step)
        due = every_step or step - (evaluated[-1] if evaluated else 0) >= spacing
        if not due and len(evaluated) >= 2:
            (a, b), (la, lb) = evaluated[-2:], [losses[s - 1] for s in evaluated[-2:]]
            if la > lb:  # the line falls: it meets the target at step `meets`
                meets = b + (lb - target) * (b - a) / (la - lb)
                every_step = due = meets <= step + 2 * spacing
        if due:
            evaluated.append(step)
            if loss <= target:
                break
    return evaluated


@pytest.mark.parametrize("after", [50, 80])
def test_eval_resolution_finds_the_step_to_the_target_exactly(
    tmp_path, cache_dir, curve, after
):
    # The same run with a target and eval_resolution alone: evaluations at most
    # R * step apart, then at every step near the target, so the run stops at the
    # first step at or below the target, the one the run evaluated at every step
    # (an independent oracle) says; with a fraction of its evaluations.
    every, run = curve
    losses = [r["val_loss"] for r in run]
    t, target = first_crossing(losses, after)
    config = every.replace(
        out=str(tmp_path / "spaced"),
        eval_every=0,
        eval_resolution=RESOLUTION,
        target_loss=target,
    )
    summary = train(config)
    assert summary["completed"] and summary["target_reached"]
    assert summary["steps_to_target"] == summary["steps"] == t
    assert summary["gave_up_at"] is None
    spaced = records(config.out)
    evaluated = [r["step"] for r in spaced if "val_loss" in r]
    assert evaluated == resolution_schedule(losses, RESOLUTION, target)
    assert evaluated[-1] == t and len(evaluated) < 0.75 * t
    for before, step in itertools.pairwise([0, *evaluated]):
        assert step - before <= max(1, math.ceil(RESOLUTION * step)), step
    # Evaluating does not change the training: every step and every evaluation as
    # in the run evaluated at each step (the same compiled functions on CPU).
    assert len(spaced) == t
    for r in spaced:
        assert r["train_loss"] == run[r["step"] - 1]["train_loss"]
        if "val_loss" in r:
            assert r["val_loss"] == run[r["step"] - 1]["val_loss"]


def test_eval_resolution_resumes_to_the_same_evaluations(tmp_path, cache_dir, curve):
    # Killed twice and resumed from checkpoints: one after the last spaced
    # evaluation, where the next step to evaluate at depends on the last two
    # evaluations (their steps and losses); one where it evaluates at every step.
    # Both come back with the checkpoint, so the same steps are evaluated as in
    # the run never interrupted.
    every, run = curve
    t, target = first_crossing([r["val_loss"] for r in run], 50)
    config = every.replace(
        out=str(tmp_path / "whole"),
        eval_every=0,
        eval_resolution=RESOLUTION,
        target_loss=target,
    )
    assert train(config)["steps_to_target"] == t
    whole = records(config.out)
    evaluated = [r["step"] for r in whole if "val_loss" in r]
    # The every-step stretch up to the target starts after the last wider gap.
    gaps = [b - a for a, b in itertools.pairwise(evaluated)]
    last_spaced = evaluated[max(i for i, gap in enumerate(gaps) if gap > 1)]
    every_step_from = evaluated[evaluated.index(last_spaced) + 1]
    assert every_step_from - last_spaced > 2 and every_step_from + 3 < t
    after_spaced, inside = last_spaced + 1, every_step_from + 1

    cut = config.replace(out=str(tmp_path / "cut"))
    partial = train(
        cut.replace(checkpoint_every=after_spaced, stop_after=after_spaced + 1)
    )
    assert not partial["completed"] and partial["steps"] == after_spaced + 1
    partial = train(
        cut.replace(resume=True, checkpoint_every=inside, stop_after=inside + 1)
    )
    assert not partial["completed"] and partial["steps"] == inside + 1
    resumed = train(cut.replace(resume=True))
    assert resumed["steps_to_target"] == t
    assert records(cut.out) == whole


def test_give_up_after_ends_the_run_on_the_schedule_of_steps(tmp_path, cache_dir):
    # A target out of reach, given up after 7 of 12 steps: the run ends there,
    # evaluated, complete, with the 7 steps (learning rates, losses) of the 12-step
    # run, not those of a 7-step one.
    full = small(
        tmp_path, cache_dir, "full", optimizer="adamw", steps=12, eval_every=1,
        checkpoint_every=0,
    )  # fmt: skip
    assert full.warmup_steps == 4
    train(full)
    whole = records(full.out)
    config = full.replace(
        out=str(tmp_path / "give-up"), eval_every=0, target_loss=0.5, give_up_after=7
    )
    summary = train(config)
    assert summary["completed"] and not summary["target_reached"]
    assert summary["gave_up_at"] == summary["steps"] == 7
    assert summary["steps_to_target"] is None
    assert summary["tokens"] == 7 * 16 * 32
    saved = json.loads((tmp_path / "give-up" / "summary.json").read_text())
    assert saved["gave_up_at"] == 7 and saved["completed"]
    run = records(config.out)
    assert [r["step"] for r in run] == list(range(1, 8))
    assert [r["step"] for r in run if "val_loss" in r] == [4, 7]
    assert summary["final_val_loss"] == whole[6]["val_loss"]
    for a, b in zip(run, whole[:7], strict=True):
        assert a["lr"] == b["lr"] and a["train_loss"] == b["train_loss"], a["step"]
    # The run is over: resuming it runs no step and returns its summary as it was.
    assert train(config.replace(resume=True)) == summary
    # A target first reached at the step it would give up at: reached, not given up.
    losses = [r["val_loss"] for r in whole]
    assert losses[6] < min(losses[:6])
    reached = train(
        config.replace(out=str(tmp_path / "reached"), target_loss=losses[6])
    )
    assert reached["target_reached"] and reached["steps_to_target"] == 7
    assert reached["gave_up_at"] is None


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(eval_resolution=0.05), "eval_resolution needs a target_loss"),
        (dict(give_up_after=10), "give_up_after needs a target_loss"),
        (dict(target_loss=3.0, eval_resolution=-0.05), "eval_resolution must be >= 0"),
        (dict(target_loss=3.0, eval_resolution=math.inf), "eval_resolution must be"),
        (dict(target_loss=3.0, eval_resolution=math.nan), "eval_resolution must be"),
        (dict(target_loss=3.0, give_up_after=0), "give_up_after must be an integer"),
    ],
)
def test_eval_resolution_and_give_up_after_need_a_target(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        TrainConfig(**changes)
    assert "\n" not in str(error.value)


def test_an_existing_run_is_not_overwritten_or_resumed_differently(tmp_path, cache_dir):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    config = small(tmp_path, cache_dir, "taken")
    saved = {"eqx_gn_run": 1, "config": config.to_dict(), "resolved": {}}
    (run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config)
    with pytest.raises(ConfigError, match=r"different configuration \(steps: 6 -> 7"):
        train(config.replace(steps=7, resume=True))


def test_gradient_accumulation_gives_the_one_batch_step(tmp_path, cache_dir):
    # AdamW over 4 accumulated micro-batches of 4 sequences against the same steps
    # on the 16 sequences at once: the same losses up to float rounding.
    base = small(tmp_path, cache_dir, "whole", optimizer="adamw", checkpoint_every=0)
    train(base)
    train(base.replace(out=str(tmp_path / "acc"), grad_accumulation=4))
    whole, accumulated = records(base.out), records(tmp_path / "acc")
    assert len(whole) == len(accumulated) == 6
    for a, b in zip(whole, accumulated, strict=True):
        for name in ("train_loss", "val_loss"):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=2e-6, err_msg=name)
    # The step really changed: the main phase's steps differ in their last bits.
    assert any(
        a["train_loss"] != b["train_loss"]
        for a, b in zip(whole[3:], accumulated[3:], strict=True)
    )
    with pytest.raises(ConfigError, match="grad_accumulation applies to first-order"):
        TrainConfig(grad_accumulation=2)
    with pytest.raises(ConfigError, match="not divisible by grad_accumulation=3"):
        TrainConfig(optimizer="adamw", grad_accumulation=3)


def test_a_learning_rate_sweep_compiles_once(tmp_path, cache_dir):
    # The learning rate is an argument of the compiled steps: a run that differs
    # only in it reuses every compiled function, and still trains differently.
    # A sequence length no other test uses, so the first run compiles.
    first = small(
        tmp_path, cache_dir, "a", lr=0.02, seq_len=24, steps=4, checkpoint_every=0
    )
    one = train(first)
    two = train(first.replace(out=str(tmp_path / "b"), lr=0.05))
    assert one["compile_s"] > 0 and two["compile_s"] == 0.0
    assert one["final_val_loss"] != two["final_val_loss"]


def test_scanned_layers_train_as_the_list_of_blocks(tmp_path, cache_dir):
    # The same weights stacked and applied with lax.scan: layerwise GN (one block
    # per layer, from slices of the stacked leaves) takes the same steps.
    config = small(tmp_path, cache_dir, "list", blocks="layerwise", checkpoint_every=0)
    train(config)
    summary = train(config.replace(out=str(tmp_path / "scan"), scan_layers=True))
    saved = json.loads((tmp_path / "scan" / "config.json").read_text())
    assert saved["resolved"]["model_config"]["scan_layers"] is True
    listed, scanned = records(config.out), records(summary["out"])
    for a, b in zip(listed, scanned, strict=True):
        for name in ("train_loss", "val_loss", "model_end", "step_size"):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-4, err_msg=name)


def test_missing_text_is_a_config_error(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        train(small(tmp_path, cache_dir, "x", text=str(tmp_path / "missing.txt")))


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "optimizer, mesh, model",
    [("gn", dict(data_parallel=8), {}), ("gn", dict(data_parallel=2, fsdp=4), {}),
     ("muon", dict(fsdp=8), {}), ("shampoo", dict(data_parallel=2, fsdp=4), {}),
     ("gn", dict(data_parallel=2, fsdp=4), dict(scan_layers=True, blocks="layerwise"))],
    ids=["gn-data", "gn-data-fsdp", "muon-fsdp", "shampoo-data-fsdp",
         "gn-layerwise-scanned-data-fsdp"],
)  # fmt: skip
def test_a_mesh_matches_one_device(tmp_path, cache_dir, optimizer, mesh, model):
    # 8 simulated CPU devices (tests/conftest.py): every micro-batch, line-search
    # batch and evaluation batch of 8 sequences is split one sequence per device;
    # with an fsdp axis, parameters and optimizer state are sharded along it too.
    # The scanned model's layerwise products go through its eqx_gn.LayerScan.
    config = small(
        tmp_path, cache_dir, "one", optimizer=optimizer, checkpoint_every=0, **model
    )
    single = train(config)
    summary = train(config.replace(out=str(tmp_path / "mesh"), **mesh))
    resolved = json.loads((tmp_path / "mesh" / "config.json").read_text())["resolved"]
    assert resolved["devices"] == 8
    assert resolved["mesh"] == {"data": mesh.get("data_parallel", 1),
                                "fsdp": mesh.get("fsdp", 1)}  # fmt: skip
    one, many = records(config.out), records(summary["out"])
    assert len(one) == len(many) == 6
    for a, b in zip(one, many, strict=True):
        for name in ("train_loss", "val_loss", "loss_before", "loss_after"):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-5, err_msg=name)
    # Sharding the state along fsdp divides what the fullest device holds (but for
    # the few arrays no fsdp size divides, kept whole). Shampoo's (d, d) factors
    # of the tiny model's small axes are such arrays, and many: not checked.
    share = summary["param_bytes_per_device"] / single["param_bytes_per_device"]
    fsdp = mesh.get("fsdp", 1)
    assert share >= 1 / fsdp
    if optimizer != "shampoo":
        assert share < (1.0 if fsdp == 1 else 1.3 / fsdp) + 1e-9


@pytest.mark.multidevice
def test_fsdp_state_shards_and_resumes_bit_for_bit(tmp_path, cache_dir):
    from jax.sharding import PartitionSpec as P

    from eqx_gn.lm.run._parallel import StateLayout, make_mesh

    config = small(tmp_path, cache_dir, "whole", data_parallel=2, fsdp=4,
                   checkpoint_every=2)  # fmt: skip
    layout = StateLayout(make_mesh(config))
    # The rule: the largest dimension that fsdp divides, floats only.
    assert layout.sharding((6, 16), np.float32).spec == P(None, "fsdp")
    assert layout.sharding((16, 16), np.float32).spec == P("fsdp", None)
    assert layout.sharding((6, 3), np.float32).spec == P()
    assert layout.sharding((16,), np.int32).spec == P()
    train(config)
    cut = config.replace(out=str(tmp_path / "cut"), stop_after=5)
    train(cut)
    train(cut.replace(stop_after=None, resume=True))
    assert records(cut.out) == records(config.out)
    _, whole = final_arrays(config.out)
    _, resumed = final_arrays(cut.out)
    for a, b in zip(whole, resumed, strict=True):
        assert a.tobytes() == b.tobytes()


_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax

    process_id, num_processes, port, out, cache, changes = sys.argv[1:7]
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
        )
    from eqx_gn.lm import TrainConfig, train

    config = TrainConfig(**json.loads(changes), out=out, cache_dir=cache)
    summary = train(config.replace(distributed=num_processes > 1))
    print("SUMMARY", json.dumps(summary), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", [{}, {"fsdp": 2}], ids=["data", "fsdp"])
def test_two_processes_equal_one_process_across_a_restart(tmp_path, cache_dir, mesh):
    # Two processes with one CPU device each (gloo collectives), each reading only
    # its half of every batch (and with fsdp, holding half of the state), stopped
    # after step 3 and resumed from the checkpoint at step 2; against one process
    # with two simulated devices on the same mesh that ran straight through.
    #
    # Why bit for bit: both compile the same SPMD program for the same two-device
    # mesh, so every local reduction runs in the same order; what differs is who
    # moves the data (XLA in-process or gloo) and the restart. A collective over two
    # participants is exact in any order (a + b == b + a in IEEE arithmetic; gathers
    # copy), so any difference at all is a bug in the multi-process or resume path.
    # Against one device the reductions are reordered and Adam's division by the
    # root of tiny second moments (rare byte rows) amplifies that rounding without a
    # useful bound on single entries: that comparison is the losses' job, in
    # test_a_mesh_matches_one_device.
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    base = dict(SMALL, optimizer="gn", steps=4, checkpoint_every=2, eval_every=1)

    def launch(process_id, num_processes, port, out, xla_flags="", **changes):
        env = subprocess_env(xla_flags)
        return subprocess.Popen(
            [sys.executable, str(script), str(process_id), str(num_processes),
             str(port), str(out), cache_dir, json.dumps({**base, **changes})],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def summaries(processes):
        outputs = [p.communicate(timeout=600)[0] for p in processes]
        for p, output in zip(processes, outputs, strict=True):
            # Python's shutdown noise (orbax coroutines) would bury the real error.
            lines = [line for line in output.splitlines() if "meta_path" not in line]
            assert p.returncode == 0, "\n".join(lines)[-5000:]
        return [
            json.loads(line.split(" ", 1)[1])
            for output in outputs
            for line in output.splitlines()
            if line.startswith("SUMMARY ")
        ]

    # One at a time: the reference's in-process collectives must not be starved.
    one, two = tmp_path / "one", tmp_path / "two"
    one_mesh = {"fsdp": 2, "data_parallel": 1} if mesh else {"data_parallel": 2}
    (reference,) = summaries(
        [launch(0, 1, 0, one, "--xla_force_host_platform_device_count=2", **one_mesh)]
    )
    port = _free_port()
    cut = summaries([launch(i, 2, port, two, stop_after=3, **mesh) for i in range(2)])
    assert [s["steps"] for s in cut] == [3, 3]
    assert not any(s["completed"] for s in cut)
    port = _free_port()
    resumed = summaries(
        [launch(i, 2, port, two, resume=True, **mesh) for i in range(2)]
    )

    assert [s["steps"] for s in resumed] == [4, 4]
    assert resumed[0]["final_val_loss"] == resumed[1]["final_val_loss"]
    assert resumed[0]["final_val_loss"] == reference["final_val_loss"]
    resolved = json.loads((two / "config.json").read_text())["resolved"]
    assert resolved["processes"] == 2 and resolved["devices"] == 2
    reference_resolved = json.loads((one / "config.json").read_text())["resolved"]
    assert reference_resolved["processes"] == 1
    assert reference_resolved["mesh"] == resolved["mesh"]
    assert len(records(one)) == 4
    assert records(two) == records(one)
    # Each process saved its own position in its shard of the data.
    iterator_states = (two / "checkpoints" / "4" / "train_iter").glob("process_*")
    assert sorted(p.name for p in iterator_states) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    step_one, arrays_one = final_arrays(one)
    step_two, arrays_two = final_arrays(two)
    assert step_one == step_two == 4
    assert len(arrays_one) == len(arrays_two)
    for i, (a, b) in enumerate(zip(arrays_one, arrays_two, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert a.tobytes() == b.tobytes(), (
            f"state leaf {i} {a.shape}: max difference {np.max(np.abs(b - a))}"
        )


@pytest.mark.parametrize(
    "method",
    [
        "adamw",
        "muon",
        "soap",
        "gn",
        "gn-layerwise",
        "gn-prox",
        "gn-trueloss",
        "gn-cg",
        "gn-layerwise-prox",
        "gn-layerwise-cg",
    ],
)
def test_a_short_run_of_each_method_lowers_the_validation_loss(
    tmp_path, cache_dir, method
):
    # One AdamW warm-up step, then 9 of the method under test: its own progress is
    # the drop from the evaluation after the warm-up to the end. Every combination
    # of GN's blocks and solver trains.
    config = small(
        tmp_path,
        cache_dir,
        method,
        steps=10,
        warmup_fraction=0.1,
        eval_every=0,
        checkpoint_every=0,
    )
    config = config.with_method(method)
    summary = train(config)
    assert summary["method"] == method
    saved = json.loads((tmp_path / method / "config.json").read_text())["config"]
    assert TrainConfig.from_dict(saved).method == method
    evaluated = [r for r in records(tmp_path / method) if r.get("val_loss")]
    after_warmup = next(r for r in evaluated if r["step"] == config.warmup_steps)
    assert summary["final_val_loss"] < after_warmup["val_loss"] - 0.05, (
        after_warmup["val_loss"],
        summary["final_val_loss"],
    )


@pytest.fixture(scope="module")
def unseen_text(tmp_path_factory):
    """A text no other test trains on: Python's own help topics (English prose
    and code), shipped with every Python."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("unseen") / "help_topics.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:400_000])
    return str(path)


def test_every_inner_optimizer_trains_full_and_layerwise(
    tmp_path, cache_dir, unseen_text
):
    # AdamW on the same tokens (8 steps of the same batches, no warm-up) is the bar.
    base = small(
        tmp_path, cache_dir, "adamw", text=unseen_text, steps=8, eval_every=0,
        warmup_fraction=0.0,
    )  # fmt: skip
    adamw = train(base.replace(optimizer="adamw"))["final_val_loss"]
    for inner in ("muon", "adamw", "soap", "shampoo", "psgd"):
        for blocks in ("full", "layerwise"):
            name = f"gn-{blocks}-{inner}"
            # The model's step whole: the default fraction at these 256-token
            # micro-batches is 1/3 (model_step_fraction), tuned for runs of
            # 50-100 steps; over 8 steps from scratch, GN with SOAP inside then
            # ends above AdamW (4.51 against 4.36).
            config = base.replace(
                out=str(tmp_path / name), blocks=blocks, inner=inner, lr=1.0
            )
            # psgdax 0.1.1 needs JAX's default configuration (tests/test_psgd.py).
            with psgdax_config() if inner == "psgd" else contextlib.nullcontext():
                summary = train(config)
            saved = json.loads((tmp_path / name / "config.json").read_text())
            assert saved["config"]["inner"] == summary["inner"] == inner, name
            assert summary["label"] == config.label and (
                inner == "muon" or inner in summary["label"]
            )
            assert summary["final_val_loss"] < adamw, (name, summary, adamw)


def test_curvature_every_records_the_tools_numbers(tmp_path, cache_dir, monkeypatch):
    """With curvature_every=2 the steps 2 and 4 (and no other) record the top 3 GN
    eigenvalues and the Hutchinson trace: those of eqx_gn.eigenpairs and
    eqx_gn.trace_estimate at that step's parameters on the first validation batch,
    with the runner's fixed keys."""
    import jax

    import eqx_gn
    from eqx_gn.lm import apply_lm
    from eqx_gn.lm.data._pipeline import inputs_and_targets
    from eqx_gn.lm.run import _train as train_module

    seen = []
    original = train_module._Training._curvature

    def spy(self):
        seen.append((self.model, self.eval_batches))
        return original(self)

    monkeypatch.setattr(train_module._Training, "_curvature", spy)
    config = small(
        tmp_path, cache_dir, "curvature", optimizer="adamw", steps=4, curvature_every=2
    )
    train(config)
    rows = records(config.out)
    assert [r["step"] for r in rows if "curvature_top" in r] == [2, 4]
    assert len(seen) == 2
    loss = eqx_gn.SoftmaxCrossEntropy()
    for row, (model, batches) in zip(
        [r for r in rows if "curvature_top" in r], seen, strict=True
    ):
        batch = inputs_and_targets(batches[0])
        k1, k2 = jax.random.split(jax.random.key(0))
        pairs = eqx_gn.eigenpairs(
            apply_lm,
            model,
            batch,
            loss=loss,
            key=k1,
            num_iterations=20,
            num_eigenvalues=3,
        )
        trace = eqx_gn.trace_estimate(
            apply_lm, model, batch, loss=loss, key=k2, num_probes=8
        )
        np.testing.assert_allclose(row["curvature_top"], pairs.eigenvalues, rtol=1e-5)
        np.testing.assert_allclose(row["curvature_trace"], trace.trace, rtol=1e-5)
        top = row["curvature_top"]
        assert top[0] >= top[1] >= top[2] > 0
        # G is positive semi-definite: its largest eigenvalue is below its trace.
        assert top[0] < row["curvature_trace"] + 4 * row["curvature_trace_stderr"]


def test_curvature_every_records_block_traces_of_a_layerwise_run(
    tmp_path, cache_dir, monkeypatch
):
    """A layerwise GN run's curvature records (its warm-up step and its GN step)
    add the trace of every layerwise block, named in the blocks' order (embedding,
    block0, block1, head): eqx_gn.trace_estimate with eqx_gn.lm.layerwise_blocks at
    that step's parameters on the first validation batch; they sum to the recorded
    trace. The top eigenvalues stay those of the full GN matrix."""
    import jax

    import eqx_gn
    from eqx_gn.lm import apply_lm, layerwise_blocks
    from eqx_gn.lm.data._pipeline import inputs_and_targets
    from eqx_gn.lm.run import _train as train_module

    seen = []
    original = train_module._Training._curvature

    def spy(self):
        seen.append((self.model, self.eval_batches))
        return original(self)

    monkeypatch.setattr(train_module._Training, "_curvature", spy)
    config = small(
        tmp_path,
        cache_dir,
        "curvature-layerwise",
        blocks="layerwise",
        steps=2,
        warmup_fraction=0.5,
        curvature_every=1,
    )
    train(config)
    rows = [r for r in records(config.out) if "curvature_top" in r]
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "warmup"), (2, "main")]
    loss = eqx_gn.SoftmaxCrossEntropy()
    for row, (model, batches) in zip(rows, seen, strict=True):
        batch = inputs_and_targets(batches[0])
        k1, k2 = jax.random.split(jax.random.key(0))
        blocks = layerwise_blocks(model)
        assert row["curvature_blocks"] == ["embedding", "block0", "block1", "head"]
        assert row["curvature_blocks"] == list(blocks.names)
        trace = eqx_gn.trace_estimate(
            apply_lm, model, batch, loss=loss, key=k2, num_probes=8, blocks=blocks
        )
        np.testing.assert_allclose(
            row["curvature_block_traces"], trace.block_traces, rtol=1e-5
        )
        np.testing.assert_allclose(
            row["curvature_block_trace_stderrs"], trace.block_trace_stderrs, rtol=1e-5
        )
        assert min(row["curvature_block_traces"]) > 0
        np.testing.assert_allclose(
            sum(row["curvature_block_traces"]), row["curvature_trace"], rtol=1e-5
        )
        pairs = eqx_gn.eigenpairs(
            apply_lm, model, batch, loss=loss, key=k1, num_iterations=20,
            num_eigenvalues=3,
        )  # fmt: skip
        np.testing.assert_allclose(row["curvature_top"], pairs.eigenvalues, rtol=1e-5)
