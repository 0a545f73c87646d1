"""`eqx_gn.lm.GNConfig`, the one typed description of the runner's Gauss-Newton,
and `TrainConfig`'s settings declared in groups, each checked where declared."""

import dataclasses
import re

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import eqx_gn
from eqx_gn.baselines import soap
from eqx_gn.lm import (
    BLOCKS,
    SOLVERS,
    ConfigError,
    GNConfig,
    TrainConfig,
    Transformer,
    apply_fn,
    embedding_and_head,
    get_config,
    layerwise_blocks,
)
from eqx_gn.lm.run._config import group_of, settings
from eqx_gn.lm.run._gn_config import gn_settings
from eqx_gn.lm.run._settings import choices_of


def _micro_batches(key, k, b, seq, vocab):
    tokens = jax.random.randint(key, (k, b, seq + 1), 0, vocab)
    return tokens[..., :-1], tokens[..., 1:]


def _by_hand(config, model, case):
    """The GaussNewton a user writes from the library's public names, as the
    GN guide describes each setting (the oracle of `GNConfig.build`)."""
    # The runner checks its token ids once on the host, so its loss has no label
    # check in the step (which would hold a host callback).
    loss = eqx_gn.SoftmaxCrossEntropy(check_labels=False)
    if case == "default":
        # The model's inner step length, the paper's fixed subproblem and a warm walk.
        inner = eqx_gn.muon_adamw(
            1.0, adam_filter=embedding_and_head(model), adam_b2=0.95, max_grad_norm=1.0
        )
        solver = eqx_gn.InnerOptimizer(
            inner,
            learning_rate=1.0,
            schedule="global_cosine",
            total_steps=10,
            warm_start=True,
            step_length="model",
        )
        search = eqx_gn.GridLineSearch(
            grid_size=8, stop_on_increase=True, warm_start=True
        )
        return eqx_gn.GaussNewton(
            apply_fn(model), loss, solver=solver, line_search=search,
            trust=eqx_gn.FixedTrust(),
        )  # fmt: skip
    if case in ("muon-lr-warm-adaptive", "trueloss-warm-adaptive"):
        inner = eqx_gn.muon_adamw(
            1.0, adam_filter=embedding_and_head(model), adam_b2=0.95, max_grad_norm=1.0
        )
        solver_cls = (
            eqx_gn.TrueLossInner
            if case.startswith("trueloss")
            else eqx_gn.InnerOptimizer
        )
        solver = solver_cls(
            inner,
            learning_rate=0.03,
            schedule="global_cosine",
            total_steps=10,
            warm_start=True,
        )
        search = eqx_gn.GridLineSearch(
            grid_size=8, stop_on_increase=True, warm_start=True, min_step_size=2.0**-10
        )
        return eqx_gn.GaussNewton(
            apply_fn(model), loss, solver=solver, line_search=search,
            trust=eqx_gn.AdaptiveTrust(),
        )  # fmt: skip
    if case == "layerwise-prox-soap-grid-fixed":
        inner = optax.chain(optax.clip_by_global_norm(1.0), soap(1.0))
        solver = eqx_gn.ProxLinear(
            inner,
            learning_rate=0.005,
            schedule="global_cosine",
            total_steps=10,
            warm_start=True,
        )
        return eqx_gn.GaussNewton(
            apply_fn(model), loss, solver=solver,
            line_search=eqx_gn.GridLineSearch(grid_size=4),
            blocks=layerwise_blocks(model), trust=eqx_gn.FixedTrust(),
        )  # fmt: skip
    assert case in ("cg", "cg-plain")
    plain = dict(preconditioner="none", warm_start=False) if case == "cg-plain" else {}
    return eqx_gn.GaussNewton(
        apply_fn(model), loss,
        solver=eqx_gn.CG(max_iterations=5, damping=1e-2, **plain),
        line_search=eqx_gn.GridLineSearch(grid_size=8, min_step_size=2.0**-10),
        trust=eqx_gn.LevenbergMarquardt(),
    )  # fmt: skip


CASES = {
    "default": GNConfig(steps=10),
    "muon-lr-warm-adaptive": GNConfig(steps=10, inner_step="lr", trust="adaptive"),
    "trueloss-warm-adaptive": GNConfig(steps=10, solver="trueloss", trust="adaptive"),
    "layerwise-prox-soap-grid-fixed": GNConfig(
        steps=10,
        blocks="layerwise",
        solver="prox",
        inner="soap",
        inner_step="lr",
        # Full steps that lower the loss by about 0.03 on these random tokens (at
        # 0.05 the decrease was 0.001, on the edge of the rounding: a last-bit
        # change in the loss turned it into two rejected steps).
        lr=0.005,
        ls_grid=4,
        line_search="grid",
        trust="fixed",
    ),
    "cg": GNConfig(steps=10, solver="cg", cg_iterations=5, cg_damping=1e-2),
    "cg-plain": GNConfig(
        steps=10,
        solver="cg",
        cg_iterations=5,
        cg_damping=1e-2,
        cg_preconditioner="none",
        cg_warm_start=0.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_build_takes_the_same_steps_as_gauss_newton_written_by_hand(case):
    config = CASES[case]
    lm_config = get_config("tiny", seq_len=16)
    model = Transformer(lm_config, jax.random.key(0))
    batches = _micro_batches(jax.random.key(1), 2, 4, 16, lm_config.vocab_size)
    ls_batches = _micro_batches(jax.random.key(2), 1, 4, 16, lm_config.vocab_size)
    results = []
    for gn in (config.build(model), _by_hand(config, model, case)):
        step = eqx.filter_jit(gn.step)
        m, state = model, gn.init(model)
        for _ in range(2):  # the second step reads the first's warm start and trust
            m, state, stats = step(m, state, batches, ls_batches)
        results.append((m, stats))
    (built, built_stats), (hand, hand_stats) = results
    # The same operations in the same order: equal to the last bit.
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(hand), strict=True):
        if eqx.is_array(a):
            np.testing.assert_array_equal(a, b)
    # And the same statistics: step size, line-search evaluations, trust scale...
    for a, b in zip(
        jax.tree.leaves(built_stats), jax.tree.leaves(hand_stats), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # And the steps did something: the model moved.
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(model), strict=True)
        if eqx.is_array(a)
    ]
    assert any(moved)


def test_defaults_resolve_by_solver_and_a_run_gives_its_own():
    # The line search, the trust rule and the learning rate default by solver and
    # inner optimizer, so that equal settings give equal configurations.
    default = GNConfig(steps=5)
    assert (default.line_search, default.trust, default.inner_step) == (
        "warm",
        "fixed",
        "model",
    )
    # The model's step length: lr is the fraction of it taken, 1 for every inner
    # optimizer; the paper's learning rate defaults by inner optimizer.
    assert {GNConfig(steps=5, inner=i).learning_rate for i in ("muon", "psgd")} == {1.0}
    cg = GNConfig(steps=5, solver="cg")
    assert (cg.line_search, cg.trust, cg.learning_rate) == (
        "grid",
        "levenberg-marquardt",
        None,
    )
    assert GNConfig(steps=5, inner="psgd", inner_step="lr").learning_rate == 0.3
    assert GNConfig(steps=5) == GNConfig(steps=5, line_search="warm", trust="fixed")
    assert GNConfig(steps=5, blocks="layerwise", inner="soap").method == (
        "gn-layerwise-soap"
    )
    # A run's GN: its settings of the same names, over its main steps, resolved;
    # the default fraction from its micro-batch of 8 sequences of 64 tokens.
    run = TrainConfig(steps=50, blocks="layerwise", inner="soap", ls_grid=5)
    assert run.gn == GNConfig(
        steps=45,
        blocks="layerwise",
        inner="soap",
        lr=512 / 768,
        ls_grid=5,
        micro_batch_tokens=512,
    )
    assert run.learning_rate == run.gn.lr == 512 / 768
    assert TrainConfig(optimizer="adamw").gn is None
    assert TrainConfig(solver="cg", cg_iterations=7).gn == GNConfig(
        steps=180, solver="cg", cg_iterations=7, micro_batch_tokens=512
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(solver="newton"), "unknown solver 'newton'; choose one of inner"),
        (dict(blocks="diagonal"), "unknown blocks 'diagonal'"),
        (dict(inner="sgd"), "unknown inner 'sgd'"),
        (dict(line_search="armijo"), "unknown line_search 'armijo'"),
        (dict(trust="loose"), "unknown trust 'loose'"),
        (dict(compute_dtype="fp8"), "unknown compute_dtype 'fp8'"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(ls_grid=2.0), "ls_grid must be an integer >= 1, got 2.0"),
        (dict(cg_iterations=5), "cg_iterations applies to solver 'cg' only"),
        (dict(solver="cg", inner="soap"), "inner applies to GN's inner, prox and"),
        (dict(solver="cg", inner_step="lr"), "inner_step applies to GN's inner and"),
        (dict(solver="trueloss", inner_step="model"), "inner_step='model' needs"),
        (dict(inner_step="exact"), "unknown inner_step 'exact'"),
        (
            dict(solver="trueloss", blocks="layerwise"),
            "blocks applies to GN's curvature model, which solver 'trueloss' does not",
        ),
        (dict(solver="cg", lr=0.1), "lr does not apply to solver 'cg'"),
        (dict(solver="cg", cg_damping=0.0), "cg_damping must be > 0"),
        (dict(cg_preconditioner="none"), "cg_preconditioner applies to solver 'cg'"),
        (dict(cg_warm_start=0.0), "cg_warm_start applies to solver 'cg' only"),
        (dict(solver="cg", cg_preconditioner="jacobi"), "unknown cg_preconditioner"),
        (dict(solver="cg", cg_warm_start=1.5), "cg_warm_start must be in [0, 1]"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(b2=1.0), "b2 must be in [0, 1)"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be > 0"),
    ],
)
def test_gn_config_rejects_bad_values_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        GNConfig(**{"steps": 5, **changes})
    assert "\n" not in str(error.value)


def test_every_setting_is_checked_where_it_is_declared():
    """Each setting's own declaration checks it: every choice rejects a value
    outside its Literal, and every integer a value below its minimum, naming the
    setting, whatever the other settings are."""
    choices = integers = 0
    for field in settings():
        allowed = choices_of(field)
        if allowed is not None:
            with pytest.raises(ConfigError, match=f"unknown {field.name} 'bogus'"):
                TrainConfig(**{field.name: "bogus"})
            choices += 1
        elif field.type in (int, int | None):
            low = field.metadata["minimum"]
            message = f"{field.name} must be an integer >= {low}, got {low - 1}"
            with pytest.raises(ConfigError, match=re.escape(message)):
                TrainConfig(**{field.name: low - 1})
            integers += 1
    assert choices == 10  # model, compute_dtype, optimizer, blocks, solver, inner,
    # inner_step, line_search, trust, cg_preconditioner
    assert integers == 22
    assert choices_of(dataclasses.fields(TrainConfig)[0]) is None
    assert choices_of(TrainConfig.__dataclass_fields__["blocks"]) == BLOCKS
    assert choices_of(TrainConfig.__dataclass_fields__["solver"]) == SOLVERS


def test_settings_are_declared_in_groups_in_the_command_lines_order():
    groups = [group_of(field) for field in settings()]
    # Each group's settings are together, in this order.
    order = list(dict.fromkeys(groups))
    assert order == [
        "data",
        "model",
        "optimization",
        "gauss-newton",
        "evaluation",
        "run",
        "parallelism",
    ]
    assert groups == sorted(groups, key=order.index)
    assert group_of(TrainConfig.__dataclass_fields__["micro_batches"]) == (
        "gauss-newton"
    )
    # A configuration is still given and read flat, and round-trips through JSON.
    config = TrainConfig(batch_size=32, blocks="layerwise", seed=3)
    assert (config.batch_size, config.blocks, config.seed) == (32, "layerwise", 3)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_gn_settings_are_declared_once_in_gn_config():
    """TrainConfig's Gauss-Newton group is GNConfig's declared settings, in their
    order and with their defaults and descriptions, plus GN's batches; each of GN's
    away from its default is refused for another optimizer and reaches a GN run's
    `config.gn`."""
    declared = {f.name: f for f in gn_settings()}
    group = [f for f in settings() if group_of(f) == "gauss-newton"]
    assert [f.name for f in group if f.name in declared] == list(declared)
    assert {f.name for f in group} - set(declared) == {
        "micro_batches",
        "ls_batches",
        "ls_batch_size",
    }
    for field in group:
        if field.name in declared:
            assert field.default == declared[field.name].default
            assert field.metadata == declared[field.name].metadata
    for name, field in declared.items():
        choices = choices_of(field)
        if choices is not None:
            other = next(c for c in choices if c != field.default)
        else:
            other = field.default + 1 if field.type is int else field.default / 2
        with pytest.raises(ConfigError, match=f"{name} applies to optimizer 'gn' only"):
            TrainConfig(optimizer="muon", **{name: other})
        solver = {"solver": "cg"} if field.metadata["solver"] == "cg" else {}
        if name != "solver":
            assert getattr(TrainConfig(**solver, **{name: other}).gn, name) == other


def test_the_default_fraction_falls_with_the_micro_batch_below_768_tokens():
    # min(1, tokens / 768): the model's step whole from 768 tokens per micro-batch,
    # in proportion below; 1 where the micro-batch is not known; an lr given, or
    # the paper's learning-rate steps, are not touched.
    fractions = {
        tokens: GNConfig(steps=5, micro_batch_tokens=tokens).learning_rate
        for tokens in (None, 64, 256, 512, 768, 1024, 2048)
    }
    assert fractions == {
        None: 1.0, 64: 1 / 12, 256: 1 / 3, 512: 2 / 3, 768: 1.0, 1024: 1.0, 2048: 1.0
    }  # fmt: skip
    assert GNConfig(steps=5, micro_batch_tokens=256, lr=0.5).learning_rate == 0.5
    paper = GNConfig(steps=5, micro_batch_tokens=256, inner_step="lr")
    assert paper.learning_rate == 0.03
    # A run's micro-batch: batch_size / micro_batches sequences of the context.
    assert [
        TrainConfig(batch_size=b, micro_batches=k, seq_len=s).learning_rate
        for b, k, s in ((256, 64, None), (256, 8, None), (32, 8, 32), (64, 8, 128))
    ] == [1 / 3, 1.0, 128 / 768, 1.0]
    # prototype's context is 128 tokens: 2 sequences are 256 tokens.
    prototype = TrainConfig(model="prototype", batch_size=16, micro_batches=8)
    assert prototype.gn.lr == 1 / 3


def test_a_run_saved_before_inner_step_resumes_as_it_ran():
    # config.json written before inner_step existed: the paper's learning-rate
    # steps under the trust rule that was then the default (adaptive), so --resume
    # finds the same configuration; a saved trust rule stays.
    saved = TrainConfig().to_dict()
    del saved["inner_step"]
    old = TrainConfig.from_dict(saved)
    assert (old.inner_step, old.trust_rule, old.learning_rate) == (
        "lr",
        "adaptive",
        0.03,
    )
    assert TrainConfig.from_dict({**saved, "trust": "fixed"}).trust_rule == "fixed"
    cg = TrainConfig.from_dict({**saved, "solver": "cg"})
    assert (cg.inner_step_rule, cg.trust_rule) == (None, "levenberg-marquardt")


def test_a_cg_run_saved_before_the_preconditioner_resumes_as_plain_cg():
    # config.json written before CG had a preconditioner and a warm start: it ran
    # plain CG from zero, so that is what it reads back as (and a resume with
    # today's defaults differs from it in exactly those two settings).
    saved = TrainConfig(solver="cg").to_dict()
    del saved["cg_preconditioner"], saved["cg_warm_start"]
    old = TrainConfig.from_dict(saved)
    assert (old.cg_preconditioner, old.cg_warm_start) == ("none", 0.0)
    assert set(TrainConfig(solver="cg").differences(old)) == {
        "cg_preconditioner",
        "cg_warm_start",
    }
    model = Transformer(get_config("tiny", seq_len=16), jax.random.key(0))
    solver = old.gn.build(model).solver
    assert (solver.preconditioner, solver.warm_start) == ("none", False)
    # A run of another solver or optimizer recorded CG's defaults of its time
    # (damping 1e-3 then): it reads back, with today's.
    for optimizer in ("gn", "adamw"):
        saved = TrainConfig(optimizer=optimizer).to_dict()
        del saved["cg_preconditioner"], saved["cg_warm_start"]
        read = TrainConfig.from_dict({**saved, "cg_damping": 1e-3})
        assert read == TrainConfig(optimizer=optimizer)
