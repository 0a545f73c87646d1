"""`eqx_gn.TrueLossInner`, the ablation with no curvature model: where the GN
model is exact (mean squared error of a linear model) it is `InnerOptimizer` step
for step; elsewhere its gradient is the true loss's (`jax.grad`, the oracle), and
it differs from `InnerOptimizer`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqx_gn
from helpers import assert_trees_close


def apply(model, x):
    return jax.vmap(model)(x)


def f64(model):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )


def run(solver, model, loss, batches, ls_batches, steps=3, **kwargs):
    """``steps`` outer steps of GN with ``solver`` (fresh batches each step);
    the models and statistics of every step."""
    gn = eqx_gn.GaussNewton(apply, loss, solver=solver, **kwargs)
    step = eqx.filter_jit(gn.step)
    state = gn.init(model)
    history = []
    for i in range(steps):
        model, state, stats = step(model, state, batches(i), ls_batches(i))
        history.append((model, state, stats))
    return history


def data(key, k, b, d_in, d_out, labels=False):
    def batches(i):
        kx, ky = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(kx, (k, b, d_in))
        if labels:
            return x, jax.random.randint(ky, (k, b), 0, d_out)
        return x, jax.random.normal(ky, (k, b, d_out))

    return batches


SOLVER_KWARGS = dict(learning_rate=0.05, schedule="cosine", warm_start=True)


@pytest.mark.parametrize("trust", ["fixed", "adaptive"])
def test_equals_inner_optimizer_where_the_gn_model_is_exact(getkey, trust):
    # MSE of a linear model is quadratic in the parameters: q(d) = L(theta0 + d).
    model = f64(eqx.nn.Linear(5, 3, key=getkey()))
    batches = data(getkey(), 4, 8, 5, 3)
    ls = data(getkey(), 2, 8, 5, 3)
    trust_rule = eqx_gn.AdaptiveTrust() if trust == "adaptive" else None
    runs = [
        run(
            cls(optax.adam(1.0), **SOLVER_KWARGS),
            model,
            eqx_gn.MeanSquaredError(),
            batches,
            ls,
            trust=trust_rule,
        )
        for cls in (eqx_gn.InnerOptimizer, eqx_gn.TrueLossInner)
    ]
    for (m_q, s_q, st_q), (m_t, s_t, st_t) in zip(*runs, strict=True):
        assert float(st_q.step_size) > 0  # steps taken, not rejected
        assert_trees_close(m_t, m_q, rtol=1e-12, atol=1e-13)
        assert_trees_close(s_t, s_q, rtol=1e-12, atol=1e-13)
        assert_trees_close(st_t, st_q, rtol=1e-10, atol=1e-12)


def test_its_gradient_is_the_true_loss_gradient_on_each_micro_batch(getkey):
    # One plain SGD step of rate 1 per micro-batch with no schedule: the direction
    # is -sum_k grad L_k at the iterate of step k, computed here by jax.grad.
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    loss = eqx_gn.SoftmaxCrossEntropy()
    x = jax.random.normal(getkey(), (3, 6, 3))
    y = jax.random.randint(getkey(), (3, 6), 0, 4)
    solver = eqx_gn.TrueLossInner(optax.sgd(1.0), learning_rate=0.3,
                                  schedule="constant", warm_start=False)  # fmt: skip
    problem = eqx_gn.GNProblem(apply, loss, None, None)
    solution = solver.solve(problem, model, (x, y), solver.init(model), jnp.asarray(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def true_loss(p, k):
        logits = apply(eqx.combine(p, static), x[k])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[k][:, None], axis=1))

    d = jax.tree.map(jnp.zeros_like, params)
    values = []
    for k in range(3):
        theta = jax.tree.map(jnp.add, params, d)
        values.append(true_loss(theta, k))
        d = jax.tree.map(lambda a, g: a - 0.3 * g, d, jax.grad(true_loss)(theta, k))
    assert_trees_close(solution.direction, d)
    stats = solution.stats
    assert float(stats.model_start) == pytest.approx(float(values[0]), rel=1e-12)
    assert float(stats.model_end) == pytest.approx(float(values[-1]), rel=1e-12)
    assert float(stats.predicted_decrease) == pytest.approx(
        float(true_loss(params, 2) - values[-1]), rel=1e-10
    )


def test_differs_from_inner_optimizer_on_softmax_cross_entropy(getkey):
    model = f64(eqx.nn.MLP(3, 4, 8, 1, key=getkey()))
    batches = data(getkey(), 4, 8, 3, 4, labels=True)
    ls = data(getkey(), 2, 8, 3, 4, labels=True)
    loss = eqx_gn.SoftmaxCrossEntropy()
    (m_q, _, _), (m_t, _, _) = (
        run(cls(optax.adam(1.0), **SOLVER_KWARGS), model, loss, batches, ls, 1)[0]
        for cls in (eqx_gn.InnerOptimizer, eqx_gn.TrueLossInner)
    )

    def flat(m):
        return jnp.concatenate(
            [x.ravel() for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))]
        )

    # Both moved, and apart by more than a tenth of the GN step's length.
    step = float(jnp.linalg.norm(flat(m_q) - flat(model)))
    assert step > 1e-3 and float(jnp.linalg.norm(flat(m_t) - flat(model))) > 1e-3
    assert float(jnp.linalg.norm(flat(m_t) - flat(m_q))) > 0.1 * step


def test_bad_learning_rate_is_one_line():
    with pytest.raises(ValueError, match="TrueLossInner: learning_rate must be > 0"):
        eqx_gn.TrueLossInner(learning_rate=-1.0)
