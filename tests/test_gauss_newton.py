import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import eqx_gn


def apply(model, x):
    return jax.vmap(model)(x)


def f64(model):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )


def exact_cg(**kwargs):
    return eqx_gn.CG(damping=0.0, tolerance=1e-13, max_iterations=200, **kwargs)


def stacked(x, y, k):
    return x.reshape(k, -1, *x.shape[1:]), y.reshape(k, -1, *y.shape[1:])


def test_linear_least_squares_one_cg_step_is_the_minimiser(getkey):
    model = f64(eqx.nn.Linear(6, 3, key=getkey()))
    x = jax.random.normal(getkey(), (64, 6))
    y = jax.random.normal(getkey(), (64, 3))
    gn = eqx_gn.GaussNewton(
        apply,
        eqx_gn.MeanSquaredError(),
        solver=exact_cg(),
        line_search=eqx_gn.GridLineSearch(grid_size=1),
    )
    new, _, stats = eqx.filter_jit(gn.step)(
        model, gn.init(model), stacked(x, y, 4), stacked(x, y, 2)
    )
    design = np.concatenate([np.asarray(x), np.ones((64, 1))], axis=1)
    solution = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(new.weight, solution[:6].T, atol=1e-10)
    np.testing.assert_allclose(new.bias, solution[6], atol=1e-10)
    assert stats.step_size == 1.0
    # For a linear model the quadratic model is exact: predicted == actual.
    assert stats.predicted_decrease == pytest.approx(
        float(stats.actual_decrease), rel=1e-8
    )


def test_softmax_regression_cg_step_is_the_newton_step(getkey):
    model = f64(eqx.nn.Linear(4, 3, key=getkey()))
    x = jax.random.normal(getkey(), (48, 4))
    y = jax.random.randint(getkey(), (48,), 0, 3)
    loss = eqx_gn.SoftmaxCrossEntropy()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def total(theta):
        return loss.value(apply(eqx.combine(unravel(theta), static), x), y)

    hessian = jax.hessian(total)(flat)
    newton = -np.linalg.pinv(np.asarray(hessian)) @ np.asarray(jax.grad(total)(flat))
    problem = eqx_gn.GNProblem(apply, loss, None, None)
    # G is singular (a shift of every logit changes nothing), so undamped CG from
    # 0 gives the minimum-norm solution, pinv's, only unpreconditioned: PCG's
    # iterates lie in M^-1 range(G), which leaves the null space.
    solver = exact_cg(preconditioner="none")
    d = solver.solve(
        problem, model, stacked(x, y, 3), solver.init(model), jnp.asarray(0)
    ).direction
    np.testing.assert_allclose(ravel_pytree(d)[0], newton, atol=1e-8)


def _dense_pcg(a, b, m_inv, iterations, x0):
    """Preconditioned CG on a x = b from x0, written out on dense arrays."""
    x = x0.copy()
    r = b - a @ x0
    z = m_inv * r
    p = z.copy()
    for _ in range(iterations):
        alpha = (r @ z) / (p @ a @ p)
        x = x + alpha * p
        r_new = r - alpha * (a @ p)
        z_new = m_inv * r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
    return x


# Each feature alone is seen in one case, both off in the other.
@pytest.mark.parametrize(
    ("preconditioner", "warm_start"), [("none", False), ("diagonal", True)]
)
def test_cg_iterates_are_preconditioned_cg_on_the_dense_damped_system(
    getkey, preconditioner, warm_start
):
    # A tanh MLP under softmax cross-entropy in float64, 3 CG iterations (far
    # from converged, so the path, not only the solution, is compared), solved
    # twice from the same point on two data sets: the second solve starts from
    # the first's solution times the decay when warm-started, else from 0.
    model = f64(eqx.nn.MLP(3, 4, 5, 1, activation=jnp.tanh, key=getkey()))
    k, damping, floor, exponent, decay = 3, 0.05, 0.01, 0.75, 0.9
    loss = eqx_gn.SoftmaxCrossEntropy()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def outputs(theta, inputs):
        return apply(eqx.combine(unravel(theta), static), inputs)

    def total(theta, inputs, targets):
        return loss.value(outputs(theta, inputs), targets)

    def dense_solve(x, y, m_inv_of, x0):
        # G = J^T H J on all 24 examples, written out: H is softmax's Hessian.
        jac = jax.jacfwd(outputs)(flat, x)  # (24, 4, P)
        prob = jax.nn.softmax(outputs(flat, x))
        h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(prob) / len(x)
        gn = np.asarray(jnp.einsum("nip,nij,njq->pq", jac, h, jac))
        g = np.asarray(jax.grad(total)(flat, x, y))
        # Martens' diagonal: the mean square of the 3 micro-batches' gradients.
        micro = [jax.grad(total)(flat, x[i::k], y[i::k]) for i in range(k)]
        second = np.mean([np.asarray(m) ** 2 for m in micro], axis=0)
        m_inv = m_inv_of(second)
        a = gn + damping * np.eye(g.size)
        return _dense_pcg(a, -g, m_inv, 3, x0), _dense_pcg(a, -g, 1 + 0 * g, 3, x0)

    if preconditioner == "diagonal":

        def m_inv_of(second):
            return 1.0 / (second + floor * second.mean()) ** exponent
    else:

        def m_inv_of(second):
            return np.ones_like(second)

    solver = eqx_gn.CG(
        damping=damping,
        max_iterations=3,
        tolerance=0.0,
        preconditioner=preconditioner,
        preconditioner_floor=floor,
        preconditioner_exponent=exponent,
        warm_start=warm_start,
        warm_start_decay=decay,
    )
    problem = eqx_gn.GNProblem(apply, loss, None, None)
    state = solver.init(model)
    x0 = np.zeros(flat.size)
    for _ in range(2):
        x = jax.random.normal(getkey(), (24, 3))
        y = jax.random.randint(getkey(), (24,), 0, 4)
        expected, plain = dense_solve(x, y, m_inv_of, x0)
        # Micro-batch i holds examples i, i + 3, ...: the (b, k) order CG
        # concatenates them in.
        batches = (
            jnp.stack([x[i::k] for i in range(k)]),
            jnp.stack([y[i::k] for i in range(k)]),
        )
        solution = solver.solve(problem, model, batches, state, jnp.asarray(0))
        direction = np.asarray(ravel_pytree(solution.direction)[0])
        np.testing.assert_allclose(direction, expected, rtol=1e-9, atol=1e-12)
        # The preconditioner changes the path (so the comparison can tell).
        differs = not np.allclose(plain, expected, rtol=1e-3)
        assert differs == (preconditioner == "diagonal")
        state = solution.state
        x0 = decay * direction if warm_start else np.zeros(flat.size)


class TwoTowers(eqx.Module):
    """Two MLPs on disjoint output coordinates: under MSE the GN matrix (and the true
    Hessian's GN part) is block-diagonal over the towers."""

    left: eqx.nn.MLP
    right: eqx.nn.MLP

    def __call__(self, x):
        return jnp.concatenate([self.left(x), self.right(x)])


@pytest.mark.parametrize("solver_kind", ["cg", "inner"])
def test_layerwise_equals_full_when_blocks_do_not_interact(getkey, solver_kind):
    k1, k2 = getkey(), getkey()
    model = f64(
        TwoTowers(eqx.nn.MLP(3, 2, 8, 1, key=k1), eqx.nn.MLP(3, 2, 8, 1, key=k2))
    )
    x = jax.random.normal(getkey(), (32, 3))
    y = jax.random.normal(getkey(), (32, 4))
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: [m.left, m.right])
    if solver_kind == "cg":
        solver = exact_cg()
    else:
        solver = eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=0.05)
    results = []
    for b in (None, blocks):
        gn = eqx_gn.GaussNewton(
            apply, eqx_gn.MeanSquaredError(), solver=solver, blocks=b
        )
        state = gn.init(model)
        m = model
        for _ in range(2):
            m, state, stats = eqx.filter_jit(gn.step)(
                m, state, stacked(x, y, 4), stacked(x, y, 2)
            )
        results.append((m, stats))
    (full, s_full), (layerwise, s_layer) = results
    np.testing.assert_allclose(
        ravel_pytree(eqx.filter(full, eqx.is_inexact_array))[0],
        ravel_pytree(eqx.filter(layerwise, eqx.is_inexact_array))[0],
        rtol=1e-9,
        atol=1e-12,
    )
    assert s_full.loss_after == pytest.approx(float(s_layer.loss_after), rel=1e-10)


def test_layerwise_differs_from_full_when_blocks_interact(getkey):
    """Sanity check of the previous test's premise: on a deep MLP the block-diagonal
    model is a different model."""
    model = f64(eqx.nn.MLP(3, 2, 8, 2, key=getkey(), activation=jnp.tanh))
    x = jax.random.normal(getkey(), (32, 3))
    y = jax.random.normal(getkey(), (32, 2))
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
    problem = lambda b: eqx_gn.GNProblem(apply, eqx_gn.MeanSquaredError(), b, None)  # noqa: E731
    solver = exact_cg()
    d_full = solver.solve(
        problem(None), model, stacked(x, y, 2), solver.init(model), jnp.asarray(0)
    ).direction
    d_layer = solver.solve(
        problem(blocks), model, stacked(x, y, 2), solver.init(model), jnp.asarray(0)
    ).direction
    assert np.abs(ravel_pytree(d_full)[0] - ravel_pytree(d_layer)[0]).max() > 1e-3


def _classification_task(key, n=4096):
    k1, k2 = jax.random.split(key)
    teacher = eqx.nn.MLP(8, 4, 16, 2, key=k1)
    x = jax.random.normal(k2, (n, 8))
    y = jnp.argmax(jax.vmap(teacher)(x), axis=-1)
    return x, y


def test_gn_needs_clearly_fewer_steps_than_adamw_on_mlp_classification():
    """GN reaches the target in at most half the steps of the best of four AdamW
    learning rates, and both reach it: with GN switched off (inner learning rate
    1e-12) the loss never moves and the test fails on ``gn_steps``."""
    x_all, y_all = _classification_task(jax.random.key(0))
    x_all, y_all = x_all.astype(jnp.float32), y_all
    loss = eqx_gn.SoftmaxCrossEntropy()
    model0 = eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(1))
    k, b, steps, target = 8, 32, 40, 0.2
    size = k * b

    def batch(i):
        index = (jnp.arange(size) + i * size) % x_all.shape[0]
        return x_all[index], y_all[index]

    @eqx.filter_jit
    def train_loss(m):
        return loss.value(apply(m, x_all), y_all)

    def steps_to_target(history):
        hits = [i + 1 for i, v in enumerate(history) if v <= target]
        return hits[0] if hits else np.inf

    def adamw(lr):
        opt = optax.adamw(lr)
        m, state = model0, opt.init(eqx.filter(model0, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(m, state, x, y):
            g = eqx.filter_grad(lambda m: loss.value(apply(m, x), y))(m)
            u, state = opt.update(g, state, eqx.filter(m, eqx.is_inexact_array))
            return eqx.apply_updates(m, u), state

        history = []
        for i in range(steps):
            m, state = step(m, state, *batch(i))
            history.append(float(train_loss(m)))
        return history

    best_adamw = min(steps_to_target(adamw(lr)) for lr in (3e-3, 1e-2, 3e-2, 1e-1))

    gn = eqx_gn.GaussNewton(
        apply,
        loss,
        solver=eqx_gn.InnerOptimizer(
            learning_rate=0.03, schedule="global_cosine", total_steps=steps
        ),
    )
    m, state = model0, gn.init(model0)
    step = eqx.filter_jit(gn.step)
    history = []
    for i in range(steps):
        x, y = batch(i)
        xl, yl = batch(i + 1000)
        m, state, _ = step(
            m, state, stacked(x, y, k), stacked(xl[: 2 * b], yl[: 2 * b], 2)
        )
        history.append(float(train_loss(m)))
    gn_steps = steps_to_target(history)
    # Both finite: a run that never reaches the target must not pass as "faster"
    # (inf * 2 <= inf).
    assert np.isfinite(best_adamw), "no AdamW learning rate reached the target"
    assert np.isfinite(gn_steps), f"GN did not reach {target} in {steps} steps"
    assert gn_steps * 2 <= best_adamw, (gn_steps, best_adamw)


@pytest.mark.parametrize(
    "solver",
    [
        eqx_gn.InnerOptimizer(learning_rate=1e-2),
        eqx_gn.ProxLinear(learning_rate=1e-2),
        eqx_gn.CG(max_iterations=5),
    ],
    ids=["inner", "prox", "cg"],
)
def test_nonfinite_batch_is_rejected_and_changes_nothing(getkey, solver):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (5, 16, 3))
    y = jax.random.randint(getkey(), (5, 16), 0, 4)
    gn = eqx_gn.GaussNewton(apply, eqx_gn.SoftmaxCrossEntropy(), solver=solver)
    step = eqx.filter_jit(gn.step)
    state = gn.init(model)
    clean = (x[:4], y[:4]), (x[4:], y[4:])
    # A clean first step, so the solver state is non-trivial.
    model, state, _ = step(model, state, *clean)
    bad_x = x.at[2, 3, 1].set(jnp.nan)
    bad = (bad_x[:4], y[:4]), (x[4:], y[4:])
    new_model, new_state, stats = step(model, state, *bad)
    assert bool(stats.nonfinite) and bool(stats.rejected)
    assert float(stats.step_size) == 0.0
    for a, b in zip(
        jax.tree.leaves((model, state)),
        jax.tree.leaves((new_model, new_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The next clean step proceeds exactly as if the bad one had never happened.
    after_bad, _, stats_after = step(new_model, new_state, *clean)
    reference, _, stats_ref = step(model, state, *clean)
    assert not bool(stats_after.nonfinite)
    assert float(stats_after.loss_after) == float(stats_ref.loss_after)
    for a, b in zip(
        jax.tree.leaves(after_bad), jax.tree.leaves(reference), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_inner_warm_start_carries_the_unsearched_iterate(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (4, 16, 3))
    y = jax.random.randint(getkey(), (4, 16), 0, 4)
    solver = eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=0.5, warm_start=True)
    gn = eqx_gn.GaussNewton(apply, eqx_gn.SoftmaxCrossEntropy(), solver=solver)
    problem = eqx_gn.GNProblem(apply, eqx_gn.SoftmaxCrossEntropy(), None, None)
    state = gn.init(model)
    d = solver.solve(
        problem, model, (x[:2], y[:2]), state.solver_state, jnp.asarray(0)
    ).direction
    new_model, new_state, stats = gn.step(model, state, (x[:2], y[:2]), (x[2:], y[2:]))
    s = float(stats.step_size)
    assert s > 0
    # theta0 + d (the inner iterate) == theta1 + carried direction.
    inner = jax.tree.map(jnp.add, eqx.filter(model, eqx.is_inexact_array), d)
    carried = jax.tree.map(
        jnp.add,
        eqx.filter(new_model, eqx.is_inexact_array),
        new_state.solver_state.direction,
    )
    np.testing.assert_allclose(
        ravel_pytree(inner)[0], ravel_pytree(carried)[0], atol=1e-12
    )


def test_inner_schedules():
    def rates(schedule, step, k=4):
        solver = eqx_gn.InnerOptimizer(
            learning_rate=0.1, schedule=schedule, total_steps=10
        )
        return np.array(
            [float(solver._rate(jnp.asarray(step), j, k)) for j in range(k)]
        )

    np.testing.assert_allclose(rates("constant", 3), 0.1)
    np.testing.assert_allclose(rates("cosine", 0), rates("cosine", 7))
    np.testing.assert_allclose(
        rates("cosine", 0), 0.05 * (1 + np.cos(np.pi * np.arange(4) / 4))
    )
    expected = 0.05 * (1 + np.cos(np.pi * (5 * 4 + np.arange(4)) / 40))
    np.testing.assert_allclose(rates("global_cosine", 5), expected)
    np.testing.assert_allclose(rates("global_cosine", 12), 0.0, atol=1e-15)


def test_misconfiguration_raises_clear_errors(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (4, 16, 3))
    y = jax.random.randint(getkey(), (4, 16), 0, 4)
    gn = eqx_gn.GaussNewton(apply, eqx_gn.SoftmaxCrossEntropy())
    state = gn.init(model)
    with pytest.raises(ValueError, match="K must be >= 1"):
        gn.step(model, state, (x[:0], y[:0]), (x, y))
    with pytest.raises(ValueError, match="disagree on the number of micro-batches"):
        gn.step(model, state, (x[:3], y), (x, y))
    with pytest.raises(ValueError, match="pair"):
        gn.step(model, state, x, (x, y))
    # Under the jaxtyping test hook, beartype catches this first (a TypeError).
    with pytest.raises((ValueError, TypeError), match=r"labels|targets"):
        gn.step(model, state, (x, y[:, :8]), (x, y))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        eqx_gn.CG(damping=-1.0)
    with pytest.raises(ValueError, match="max_iterations"):
        eqx_gn.CG(max_iterations=0)
    with pytest.raises(ValueError, match="grid_size"):
        eqx_gn.GridLineSearch(grid_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        eqx_gn.InnerOptimizer(learning_rate=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        eqx_gn.InnerOptimizer(schedule="global_cosine")
    with pytest.raises((ValueError, TypeError), match="schedule"):
        eqx_gn.ProxLinear(schedule="linear")


def test_float32_model_stays_float32_with_float64_loss_values(getkey):
    model = eqx.nn.MLP(3, 2, 8, 1, key=getkey(), dtype=jnp.float32)
    x = jax.random.normal(getkey(), (3, 16, 3), jnp.float32)
    # Learnable float64 targets (numpy): a fixed smooth map of the inputs.
    y = np.tanh(np.asarray(x, np.float64) @ np.ones((3, 2)))
    loss = eqx_gn.AutodiffLoss(lambda z, t: jnp.mean((z - t) ** 2))
    for solver in (eqx_gn.InnerOptimizer(learning_rate=0.05), exact_cg()):
        gn = eqx_gn.GaussNewton(apply, loss, solver=solver)
        m, state = model, gn.init(model)
        for _ in range(2):
            m, state, stats = eqx.filter_jit(gn.step)(
                m, state, (x[:2], y[:2]), (x[2:], y[2:])
            )
        assert not bool(stats.nonfinite)
        carried = getattr(state.solver_state, "direction", None)
        if carried is None:
            carried = state.solver_state.previous
        for leaf in jax.tree.leaves(eqx.filter((m, carried), eqx.is_inexact_array)):
            assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("on_reject", ["restart_iterate", "restart", "keep"])
def test_inner_rejected_step_restarts_the_inner_loop(getkey, on_reject):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (2, 16, 3))
    y = jax.random.randint(getkey(), (2, 16), 0, 4)
    solver = eqx_gn.InnerOptimizer(learning_rate=0.1, on_reject=on_reject)
    problem = eqx_gn.GNProblem(apply, eqx_gn.SoftmaxCrossEntropy(), None, None)
    state = solver.init(model)
    solution = solver.solve(problem, model, (x, y), state, jnp.asarray(0))
    d, provisional = solution.direction, solution.state
    after = solver.accept(provisional, d, jnp.asarray(0.0))
    fresh = solver.init(model)
    # The iterate: 0 unless kept; the optimizer state: fresh only with "restart".
    expected = eqx_gn.InnerState(
        provisional.direction if on_reject == "keep" else fresh.direction,
        fresh.opt_state if on_reject == "restart" else provisional.opt_state,
    )
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(  # the provisional state is not the fresh one: the test can fail
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(provisional.opt_state),
            jax.tree.leaves(fresh.opt_state),
            strict=True,
        )
    )
    # An accepted step always carries (1 - s) d and the optimizer state.
    kept = solver.accept(provisional, d, jnp.asarray(0.25))
    np.testing.assert_allclose(
        ravel_pytree(kept.direction)[0], 0.75 * ravel_pytree(d)[0], rtol=1e-12
    )
    # A ValueError, or the type checker's error where it checks the Literal first.
    with pytest.raises((ValueError, TypeError), match="on_reject"):
        eqx_gn.InnerOptimizer(on_reject="forget")


def test_array_learning_rate_is_traced_matches_float_and_vmaps(getkey):
    model = f64(eqx.nn.MLP(3, 2, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (32, 3))
    y = jax.random.normal(getkey(), (32, 2))
    batches, ls_batches = stacked(x, y, 4), stacked(x, y, 2)
    traces = []

    @eqx.filter_jit
    def one_step(learning_rate):
        traces.append(learning_rate)
        solver = eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=learning_rate)
        gn = eqx_gn.GaussNewton(apply, eqx_gn.MeanSquaredError(), solver=solver)
        new, _, stats = gn.step(model, gn.init(model), batches, ls_batches)
        return new, stats.loss_after

    rates = (0.02, 0.05, 0.1)
    by_float = [one_step(lr) for lr in rates]
    assert len(traces) == 3  # a Python float is static: one compilation each
    traces.clear()
    by_array = [one_step(jnp.asarray(lr)) for lr in rates]
    assert len(traces) == 1  # a scalar array is traced: one compilation for all
    for (m_f, loss_f), (m_a, loss_a) in zip(by_float, by_array, strict=True):
        assert loss_a == pytest.approx(float(loss_f), rel=1e-12)
        np.testing.assert_allclose(
            ravel_pytree(eqx.filter(m_a, eqx.is_inexact_array))[0],
            ravel_pytree(eqx.filter(m_f, eqx.is_inexact_array))[0],
            rtol=1e-12,
        )
    # ... so a sweep can be vmapped.
    losses = jax.vmap(lambda lr: one_step(lr)[1])(jnp.asarray(rates))
    np.testing.assert_allclose(
        losses, [float(loss) for _, loss in by_float], rtol=1e-10
    )


def _with_cg(**numbers):
    return eqx_gn.GaussNewton(
        apply,
        eqx_gn.MeanSquaredError(),
        solver=eqx_gn.CG(max_iterations=5, warm_start=True, **numbers),
        line_search=eqx_gn.GridLineSearch(grid_size=4),
    )


def _with_search(search):
    return eqx_gn.GaussNewton(
        apply,
        eqx_gn.MeanSquaredError(),
        # Steps too long at size 1: the search has to shorten them.
        solver=eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=1.5),
        line_search=search,
    )


@pytest.mark.parametrize(
    "build, values",
    [
        (lambda v: _with_cg(damping=v), (1e-3, 1e-2, 1e-1)),
        (lambda v: _with_cg(tolerance=v), (0.9, 0.5, 0.1)),
        (lambda v: _with_cg(warm_start_decay=v), (0.5, 0.9, 1.0)),
        (lambda v: _with_search(eqx_gn.GridLineSearch(factor=v)), (0.3, 0.5, 0.8)),
        (
            lambda v: _with_search(eqx_gn.BacktrackingArmijo(shrink=v)),
            (0.3, 0.5, 0.8),
        ),
        (lambda v: _with_search(eqx_gn.BacktrackingArmijo(c=v)), (1e-4, 0.6, 0.9)),
    ],
    ids=["cg-damping", "cg-tolerance", "cg-decay", "grid-factor", "shrink", "c"],
)
def test_a_sweep_over_a_numeric_hyperparameter_compiles_once(build, values):
    """Numbers are traced fields, not static ones: a sweep over scalar arrays
    traces once and gives what the same Python floats give (each a constant of its
    own trace), and vmaps. Fixed keys: on this problem each value leads the search
    or the solver somewhere else (asserted), so the sweep tests something."""
    keys = jax.random.split(jax.random.key(0), 3)
    model = f64(eqx.nn.MLP(3, 2, 8, 1, key=keys[0]))
    x = jax.random.normal(keys[1], (32, 3))
    y = jax.random.normal(keys[2], (32, 2))
    batches, ls_batches = stacked(x, y, 4), stacked(x, y, 2)
    traces = []

    @eqx.filter_jit
    def two_steps(value):
        traces.append(value)
        gn = build(value)
        state = gn.init(model)
        new, state, _ = gn.step(model, state, batches, ls_batches)
        new, _, stats = gn.step(new, state, batches, ls_batches)
        return new, stats.loss_after

    by_float = [two_steps(v) for v in values]
    assert len(traces) == len(values)
    losses = [float(loss) for _, loss in by_float]
    assert len(set(losses)) == len(values), losses  # each value matters here
    traces.clear()
    by_array = [two_steps(jnp.asarray(v)) for v in values]
    assert len(traces) == 1
    for (m_f, loss_f), (m_a, loss_a) in zip(by_float, by_array, strict=True):
        assert float(loss_a) == pytest.approx(float(loss_f), rel=1e-12)
        np.testing.assert_allclose(
            ravel_pytree(eqx.filter(m_a, eqx.is_inexact_array))[0],
            ravel_pytree(eqx.filter(m_f, eqx.is_inexact_array))[0],
            rtol=1e-12,
            atol=1e-14,
        )
    swept = jax.vmap(lambda v: two_steps(v)[1])(jnp.asarray(values))
    np.testing.assert_allclose(swept, losses, rtol=1e-10)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: eqx_gn.CG(damping=-1.0), "CG: damping must be >= 0"),
        (lambda: eqx_gn.CG(tolerance=jnp.ones(2)), "tolerance"),
        (lambda: eqx_gn.GridLineSearch(factor=1.5), "factor must be in (0, 1)"),
        (lambda: eqx_gn.BacktrackingArmijo(c=jnp.asarray(2.0)), "c must be in (0, 1)"),
    ],
)
def test_numeric_hyperparameters_are_checked_when_concrete(make, message):
    # Under the jaxtyping test hook, beartype may catch a shape first (TypeError).
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        make()


@pytest.mark.parametrize("bad", [jnp.ones(2), jnp.asarray(1), True, "0.1"])
def test_learning_rate_must_be_a_float_scalar(bad):
    # Under the jaxtyping test hook, beartype may catch it first (a TypeError).
    with pytest.raises((ValueError, TypeError), match="learning_rate"):
        eqx_gn.InnerOptimizer(learning_rate=bad)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        eqx_gn.ProxLinear(learning_rate=jnp.asarray(-0.1))


def test_step_is_exactly_solve_search_accept(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (6, 16, 3))
    y = jax.random.randint(getkey(), (6, 16), 0, 4)
    batches, ls_batches = (x[:4], y[:4]), (x[4:], y[4:])
    warm = eqx_gn.GridLineSearch(stop_on_increase=True, warm_start=True)
    for line_search in (eqx_gn.GridLineSearch(), eqx_gn.BacktrackingArmijo(), warm):
        gn = eqx_gn.GaussNewton(
            apply, eqx_gn.SoftmaxCrossEntropy(), line_search=line_search
        )
        # From the second step on, so that the state's last step size is not 1.
        model, state, _ = gn.step(model, gn.init(model), batches, ls_batches)
        by_step = gn.step(model, state, batches, ls_batches)
        solution = gn.solve(model, state, batches)
        d = solution.direction
        phi = gn.line_search_objective(model, d, ls_batches)
        # phi is the mean loss at the moved model (an independent evaluation).
        moved = eqx.apply_updates(model, jax.tree.map(lambda u: 0.5 * u, d))
        assert float(phi(jnp.asarray(0.5))) == pytest.approx(
            float(eqx_gn.mean_loss(apply, gn.loss, moved, ls_batches)), rel=1e-12
        )
        s, ls_stats = gn.search(
            phi, solution.stats.model_end.dtype, previous=state.step_size
        )
        by_hand = gn.accept(model, state, solution, s, ls_stats)
        assert float(by_step[2].step_size) > 0
        for a, b in zip(
            jax.tree.leaves(by_step), jax.tree.leaves(by_hand), strict=True
        ):
            np.testing.assert_array_equal(a, b)


class _HalvingSearch(eqx_gn.AbstractLineSearch):
    """Returns half the step size it is given as ``previous``."""

    needs_slope = False

    def search(self, phi, phi0, slope=None, previous=None):
        step = 0.5 * previous
        unit = phi(jnp.ones_like(step))
        stats = eqx_gn.LineSearchStats(phi0, phi(step), unit, jnp.asarray(2))
        return step, stats


def test_step_passes_the_last_step_size_to_the_line_search(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (6, 16, 3))
    y = jax.random.randint(getkey(), (6, 16), 0, 4)
    gn = eqx_gn.GaussNewton(
        apply, eqx_gn.SoftmaxCrossEntropy(), line_search=_HalvingSearch()
    )
    state = gn.init(model)
    assert float(state.step_size) == 1.0
    step = eqx.filter_jit(gn.step)
    for expected in (0.5, 0.25, 0.125):
        model, state, stats = step(model, state, (x[:4], y[:4]), (x[4:], y[4:]))
        assert float(stats.step_size) == expected
        assert float(state.step_size) == expected
    # A non-finite step changes nothing, the last step size included.
    bad = (x[:4].at[0, 0, 0].set(jnp.nan), y[:4])
    _, same, stats = step(model, state, bad, (x[4:], y[4:]))
    assert bool(stats.nonfinite)
    assert float(same.step_size) == 0.125


def test_mean_loss_is_the_mean_over_micro_batches(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    x = jax.random.normal(getkey(), (3, 5, 3))
    y = jax.random.randint(getkey(), (3, 5), 0, 4)
    expected = np.mean(
        [
            optax.softmax_cross_entropy_with_integer_labels(apply(model, x[k]), y[k])
            .mean()
            .item()
            for k in range(3)
        ]
    )
    value = eqx_gn.mean_loss(apply, eqx_gn.SoftmaxCrossEntropy(), model, (x, y))
    assert float(value) == pytest.approx(expected, rel=1e-12)


def test_cosine_decay():
    fractions = np.array([-0.5, 0.0, 0.25, 0.5, 0.9, 1.0, 3.0])
    expected = 0.3 * 0.5 * (1 + np.cos(np.pi * np.clip(fractions, 0, 1)))
    got = [float(eqx_gn.cosine_decay(0.3, float(f))) for f in fractions]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    traced = jax.jit(jax.vmap(eqx_gn.cosine_decay))(
        jnp.full(len(fractions), 0.3), jnp.asarray(fractions)
    )
    np.testing.assert_allclose(traced, expected, rtol=1e-12, atol=1e-15)


def test_modules_are_abstract_or_final():
    """Every eqx_gn Module is abstract or final, and no concrete method is
    overridden anywhere below an abstract base."""
    import inspect
    import typing

    classes = {
        obj
        for obj in vars(eqx_gn).values()
        if isinstance(obj, type) and issubclass(obj, eqx.Module)
    }
    classes |= {c for cls in list(classes) for c in cls.__mro__}
    classes = {
        c for c in classes if c.__module__.startswith("eqx_gn") and c is not eqx.Module
    }
    for cls in classes:
        abstract = bool(getattr(cls, "__abstractmethods__", ())) or inspect.isabstract(
            cls
        )
        assert abstract or getattr(cls, "__final__", False), cls
        for base in cls.__mro__[1:]:
            if not base.__module__.startswith("eqx_gn"):
                continue
            for name, member in vars(base).items():
                if name.startswith("__") or not callable(member):
                    continue
                if getattr(member, "__isabstractmethod__", False):
                    continue
                assert vars(cls).get(name, member) is member, (cls, base, name)
    assert typing.final  # the marker used


def test_unit_step_takes_the_solvers_direction_whole(getkey):
    # Exact CG with no search lands on the least-squares solution (lstsq oracle).
    model = f64(eqx.nn.Linear(6, 3, key=getkey()))
    x = jax.random.normal(getkey(), (64, 6))
    y = jax.random.normal(getkey(), (64, 3))
    gn = eqx_gn.GaussNewton(
        apply, eqx_gn.MeanSquaredError(), solver=exact_cg(),
        line_search=eqx_gn.UnitStep(), trust=eqx_gn.FixedTrust(),
    )  # fmt: skip
    new, _, stats = eqx.filter_jit(gn.step)(
        model, gn.init(model), stacked(x, y, 4), stacked(x, y, 2)
    )
    design = np.concatenate([np.asarray(x), np.ones((64, 1))], axis=1)
    solution = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(new.weight, solution[:6].T, atol=1e-10)
    assert int(stats.line_search_evaluations) == 1 and stats.step_size == 1.0
    # An inner loop that overshoots: the loss rises, and the step is still taken
    # whole (the grid search would have shortened it).
    gn = eqx_gn.GaussNewton(
        apply, eqx_gn.MeanSquaredError(),
        solver=eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=3.0),
        line_search=eqx_gn.UnitStep(), trust=eqx_gn.FixedTrust(),
    )  # fmt: skip
    state = gn.init(model)
    direction = gn.solve(model, state, stacked(x, y, 4)).direction
    new, _, stats = gn.step(model, state, stacked(x, y, 4), stacked(x, y, 2))
    assert float(stats.loss_after) > float(stats.loss_before)
    assert not stats.rejected
    np.testing.assert_allclose(new.weight, model.weight + direction.weight, rtol=1e-12)
