"""Frozen parameters with Gauss-Newton: GN sees only the trainable part."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

teacher = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))


def sample(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 8))
    return x, jnp.argmax(jax.vmap(jax.vmap(teacher))(x), axis=-1)


model = eqx.nn.MLP(8, 4, 32, 2, activation=jnp.tanh, key=jax.random.key(1))
loss = eqx_gn.SoftmaxCrossEntropy()

# --8<-- [start:partition]
# A filter spec: True on the leaves to train, one False for the whole first
# layer (a spec may be a prefix of the model).
train_spec = jax.tree.map(eqx.is_inexact_array, model)
train_spec = eqx.tree_at(lambda m: m.layers[0], train_spec, replace=False)
trainable, frozen = eqx.partition(model, train_spec)


def fn(trainable, x):  # GN's model is the trainable part alone
    return jax.vmap(eqx.combine(trainable, frozen))(x)


blocks = eqx_gn.Blocks.from_layers(trainable, lambda m: m.layers[1:])
gn = eqx_gn.GaussNewton(fn, loss, blocks=blocks)
state = gn.init(trainable)
step = eqx.filter_jit(gn.step)
key_data = jax.random.key(3)
for t in range(10):
    key_gn, key_ls = jax.random.split(jax.random.fold_in(key_data, t))
    trainable, state, stats = step(
        trainable, state, sample(key_gn, 8), sample(key_ls, 2)
    )
model_trained = eqx.combine(trainable, frozen)
# --8<-- [end:partition]

assert jnp.array_equal(model_trained.layers[0].weight, model.layers[0].weight)
assert not jnp.array_equal(model_trained.layers[1].weight, model.layers[1].weight)
x_test, y_test = sample(jax.random.key(2), 1, 2048)
held_out = eqx.filter_jit(lambda m: loss.value(jax.vmap(m)(x_test[0]), y_test[0]))
print(f"held-out loss {held_out(model):.3f} -> {held_out(model_trained):.3f}")
