"""The inner loop's model-chosen step length (``step_length="model"``): each update
is scaled by the minimiser of its micro-batch's quadratic model along it."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_gn
from helpers import (
    Problem,
    block_diagonal,
    dense_gn,
    flat,
    make_mlp_problem,
    raises_invalid,
)

ZERO = jnp.asarray(0)


def _stacked(problem: Problem, k: int = 1):
    """The problem's batch as K identical micro-batches."""
    return jax.tree.map(lambda x: jnp.stack([x] * k), problem.batch)


def _solve(problem, solver, k=1, blocks=None):
    gn = eqx_gn.GaussNewton(problem.fn, problem.loss, solver=solver, blocks=blocks)
    return solver.solve(
        gn.problem,
        problem.model,
        _stacked(problem, k),
        solver.init(problem.model),
        ZERO,
    )


def _layers(problem):
    return eqx_gn.Blocks.from_layers(problem.model, lambda m: m.layers)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("layerwise", [False, True])
def test_one_gradient_step_is_the_exact_minimiser_along_it(fraction, layerwise):
    # Gradient descent (u = -g) with one model step from d = 0 is the Cauchy point:
    # d = -fraction (g.g / g.G g) g, with the dense G (block-diagonal layerwise).
    problem = make_mlp_problem(3, "ce", batch_size=5, depth=2)
    blocks = _layers(problem) if layerwise else None
    solver = eqx_gn.InnerOptimizer(
        optax.sgd(1.0),
        learning_rate=fraction,
        schedule="constant",
        warm_start=False,
        step_length="model",
    )
    solution = _solve(problem, solver, blocks=blocks)
    dense = dense_gn(problem)
    if layerwise:
        dense = block_diagonal(dense, problem.model, blocks.leaf_block)
    inputs, targets = problem.batch
    g = flat(
        eqx.filter_grad(lambda m: problem.loss.value(problem.fn(m, inputs), targets))(
            problem.model
        )
    )
    expected = -fraction * (g @ g) / (g @ dense @ g) * g
    np.testing.assert_allclose(
        flat(solution.direction), expected, rtol=1e-10, atol=1e-14
    )


def test_an_update_that_does_not_descend_is_not_taken():
    # u = +g ascends the model: the exact minimiser along it is at 0.
    problem = make_mlp_problem(4, "ce", batch_size=5)
    solver = eqx_gn.InnerOptimizer(
        optax.sgd(-1.0), warm_start=False, step_length="model"
    )
    solution = _solve(problem, solver, k=3)
    assert np.all(flat(solution.direction) == 0.0)


def test_steepest_descent_with_model_steps_solves_a_least_squares_problem():
    # On a linear model with the squared error the GN model is the loss itself, and
    # gradient steps with the exact step length are steepest descent with exact line
    # search: q falls at every step and reaches the least-squares solution (lstsq).
    key_w, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.Linear(4, 2, key=key_w, dtype=jnp.float64)
    x = jax.random.normal(key_x, (20, 4), jnp.float64)
    y = jax.random.normal(key_y, (20, 2), jnp.float64)
    problem = Problem(
        lambda m, x: jax.vmap(m)(x),
        model,
        (x, y),
        eqx_gn.MeanSquaredError(),
        "mse",
    )
    solver = eqx_gn.InnerOptimizer(
        optax.sgd(1.0), schedule="constant", warm_start=False, step_length="model"
    )
    values = [
        float(_model_value(problem, _solve(problem, solver, k=k).direction))
        for k in (1, 2, 4, 8, 60)
    ]
    assert all(b < a for a, b in itertools.pairwise(values))
    solution = _solve(problem, solver, k=200)
    moved = eqx.apply_updates(model, solution.direction)
    design = np.concatenate([np.asarray(x), np.ones((20, 1))], axis=1)
    coef = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(moved.weight).T, coef[:4], atol=1e-7)
    np.testing.assert_allclose(np.asarray(moved.bias), coef[4], atol=1e-7)


def _model_value(problem, d):
    q = eqx_gn.quadratic_model(
        problem.fn, problem.model, problem.batch, loss=problem.loss
    )
    return q.value(d)


def test_the_learning_rate_rule_is_unchanged_by_the_option():
    # step_length="learning_rate" (the default) computes what it always did: the
    # model step's extra product is not taken, and the direction is lr times the
    # optimizer's updates.
    problem = make_mlp_problem(5, "ce", batch_size=5)
    default = eqx_gn.InnerOptimizer(optax.sgd(1.0), learning_rate=0.1)
    assert default.step_length == "learning_rate"
    explicit = eqx_gn.InnerOptimizer(
        optax.sgd(1.0), learning_rate=0.1, step_length="learning_rate"
    )
    a = _solve(problem, default, k=3)
    b = _solve(problem, explicit, k=3)
    np.testing.assert_array_equal(flat(a.direction), flat(b.direction))
    model = _solve(
        problem, eqx_gn.InnerOptimizer(optax.sgd(1.0), step_length="model"), k=3
    )
    assert not np.allclose(flat(model.direction), flat(a.direction))


def test_a_bad_step_length_is_one_line():
    with raises_invalid("step_length must be", annotated=True):
        eqx_gn.InnerOptimizer(step_length="exact")
