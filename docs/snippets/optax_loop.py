"""Gauss-Newton from a standard Equinox optax loop (`eqx_gn.as_optax`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_gn

teacher = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))


def sample(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 8))
    return x, jnp.argmax(jax.vmap(jax.vmap(teacher))(x), axis=-1)


def apply(model, x):
    return jax.vmap(model)(x)


model = eqx.nn.MLP(8, 4, 32, 2, activation=jnp.tanh, key=jax.random.key(1))
loss = eqx_gn.SoftmaxCrossEntropy()
# --8<-- [start:loop]
gn = eqx_gn.GaussNewton(apply, loss)
# GN as an optax transformation; chain it as any other (here: a clip that GN
# ignores, since it computes its own direction, kept to show that it composes).
tx = optax.chain(optax.clip_by_global_norm(1.0), eqx_gn.as_optax(gn, model))
opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def train_step(model, opt_state, batches, line_search_batches):
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx.filter_grad(
        lambda p: eqx_gn.mean_loss(apply, loss, eqx.combine(p, model), batches)
    )(params)
    updates, opt_state = tx.update(
        grads, opt_state, params,
        batches=batches, line_search_batches=line_search_batches,
    )  # fmt: skip
    return eqx.apply_updates(model, updates), opt_state


key_data = jax.random.key(3)
trained = model
for t in range(10):
    key_gn, key_ls = jax.random.split(jax.random.fold_in(key_data, t))
    trained, opt_state = train_step(
        trained, opt_state, sample(key_gn, 8), sample(key_ls, 2)
    )
    gn_stats = opt_state[1].stats  # the GN step's eqx_gn.GNStats
    print(t, f"{gn_stats.loss_before:.3f} -> {gn_stats.loss_after:.3f}")
# --8<-- [end:loop]

x_test, y_test = sample(jax.random.key(2), 1, 2048)
held_out = eqx.filter_jit(lambda m: loss.value(jax.vmap(m)(x_test[0]), y_test[0]))
print(f"held-out loss {held_out(model):.3f} -> {held_out(trained):.3f}")
