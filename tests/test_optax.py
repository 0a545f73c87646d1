"""`eqx_gn.as_optax` in the standard Equinox optax loop, against
`GaussNewton.step` (the oracle) on models the API was not built around: an MLP,
a CNN, and a model with integer and frozen leaves; under jit, inside
`optax.chain`, and carried through `lax.scan`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_gn

K, B = 4, 8


def apply(model, x):
    return jax.vmap(model)(x)


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 3, 3, key=k1)
        self.head = eqx.nn.Linear(3 * 4 * 4, 5, key=k2)

    def __call__(self, x):
        return self.head(jnp.tanh(self.conv(x)).reshape(-1))


class Mixed(eqx.Module):
    """A float weight that trains, a frozen float embedding, an integer table."""

    weight: jax.Array
    frozen: jax.Array
    table: jax.Array  # int32: indices into the input's features

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.weight = jax.random.normal(k1, (5, 6)) / 3
        self.frozen = jax.random.normal(k2, (6,))
        self.table = jnp.array([5, 4, 3, 2, 1, 0], jnp.int32)

    def __call__(self, x):
        return self.weight @ jnp.tanh(x[self.table] + self.frozen)


def problem(kind, key):
    km, kx, ky = jax.random.split(key, 3)
    if kind == "mlp":
        model = eqx.nn.MLP(6, 5, 16, 2, key=km)
        x = jax.random.normal(kx, (K * B, 6))
    elif kind == "cnn":
        model = CNN(km)
        x = jax.random.normal(kx, (K * B, 1, 6, 6))
    else:
        model = Mixed(km)
        x = jax.random.normal(kx, (K * B, 6))
    y = jax.random.randint(ky, (K * B,), 0, 5)
    batches = (x.reshape(K, B, *x.shape[1:]), y.reshape(K, B))
    ls = (x[: 2 * B].reshape(2, B, *x.shape[1:]), y[: 2 * B].reshape(2, B))
    return model, batches, ls


def trainable(model):
    """The loop's filter: every float leaf but Mixed's frozen one."""
    spec = jax.tree.map(eqx.is_inexact_array, model)
    if isinstance(model, Mixed):
        spec = eqx.tree_at(lambda m: m.frozen, spec, False)
    return spec


def gauss_newton(fn=apply):
    return eqx_gn.GaussNewton(
        fn,
        eqx_gn.SoftmaxCrossEntropy(),
        solver=eqx_gn.InnerOptimizer(learning_rate=0.1),
    )


def reference(model, batches, ls, steps):
    """`GaussNewton.step` on the loop's parameters, built here independently:
    for Mixed, a GN on the trainable partition whose fn closes over the rest."""
    params, rest = eqx.partition(model, trainable(model))
    gn = gauss_newton(lambda p, x: apply(eqx.combine(p, rest), x))
    state = gn.init(params)
    step = eqx.filter_jit(gn.step)
    for _ in range(steps):
        params, state, stats = step(params, state, batches, ls)
    return eqx.combine(params, rest), state, stats


def optax_loop(tx, model, batches, ls, steps, grads=False):
    params = eqx.filter(model, trainable(model))
    state = tx.init(params)

    @eqx.filter_jit
    def one(model, state):
        params = eqx.filter(model, trainable(model))
        g = None
        if grads:  # what a loop feeding gradients through a chain passes
            g = eqx.filter_grad(
                lambda p: eqx_gn.mean_loss(
                    apply,
                    eqx_gn.SoftmaxCrossEntropy(),
                    eqx.combine(p, model),
                    batches,
                )
            )(params)
        updates, state = tx.update(
            g, state, params, batches=batches, line_search_batches=ls
        )
        return eqx.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = one(model, state)
    return model, state


def assert_models_close(a, b):
    # Float32 arithmetic in two compiled programs: the same operations, possibly
    # fused differently, so equal to a few ulps of the parameters per step.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if eqx.is_inexact_array(x):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(x, y) if eqx.is_array(x) else x == y


@pytest.mark.parametrize("kind", ["mlp", "cnn", "mixed"])
def test_as_optax_is_gauss_newton_step(kind):
    model, batches, ls = problem(kind, jax.random.key(0))
    expected, gn_state, stats = reference(model, batches, ls, steps=3)
    assert not stats.nonfinite
    tx = eqx_gn.as_optax(gauss_newton(), model)
    got, state = optax_loop(tx, model, batches, ls, steps=3)
    assert_models_close(got, expected)
    assert int(state.gn.step) == 3
    np.testing.assert_allclose(state.gn.step_size, gn_state.step_size, rtol=1e-6)
    np.testing.assert_allclose(state.stats.loss_after, stats.loss_after, rtol=1e-5)
    if kind == "mixed":  # the frozen and integer leaves never move
        assert np.array_equal(got.frozen, model.frozen)
        assert np.array_equal(got.table, model.table)
        assert not np.allclose(got.weight, model.weight)


def test_as_optax_in_a_chain_passes_the_extra_arguments_on():
    model, batches, ls = problem("mlp", jax.random.key(1))
    expected, _, _ = reference(model, batches, ls, steps=1)
    # Gradient clipping before GN: GN ignores the incoming updates.
    tx = optax.chain(
        optax.clip_by_global_norm(1e-3), eqx_gn.as_optax(gauss_newton(), model)
    )
    got, _ = optax_loop(tx, model, batches, ls, steps=1, grads=True)
    assert_models_close(got, expected)
    # A scale after GN halves its step: theta_0 + (theta_1 - theta_0) / 2.
    tx = optax.chain(eqx_gn.as_optax(gauss_newton(), model), optax.scale(0.5))
    got, _ = optax_loop(tx, model, batches, ls, steps=1)
    half = jax.tree.map(
        lambda a, b: (a + b) / 2 if eqx.is_inexact_array(a) else a, model, expected
    )
    assert_models_close(got, half)


def test_as_optax_state_carries_through_scan():
    model, batches, ls = problem("mlp", jax.random.key(2))
    expected, _, _ = reference(model, batches, ls, steps=2)
    tx = eqx_gn.as_optax(gauss_newton(), model)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(
            None, state, params, batches=batches, line_search_batches=ls
        )
        return (optax.apply_updates(params, updates), state), state.stats.loss_after

    (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), length=2)
    assert_models_close(eqx.combine(params, static), expected)
    assert losses.shape == (2,) and bool(losses[1] < losses[0])


def test_as_optax_errors_name_what_is_wrong():
    model, batches, ls = problem("mlp", jax.random.key(3))
    tx = eqx_gn.as_optax(gauss_newton(), model)
    params = eqx.filter(model, eqx.is_inexact_array)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs line_search_batches=") as info:
        tx.update(None, state, params, batches=batches)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(None, state, batches=batches, line_search_batches=ls)
    other = eqx.filter(CNN(jax.random.key(4)), eqx.is_inexact_array)
    with pytest.raises(ValueError, match="params does not have the structure"):
        tx.update(None, state, other, batches=batches, line_search_batches=ls)
