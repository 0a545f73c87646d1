"""Dropout with Gauss-Newton: the dropout key travels in the inputs."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

teacher = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))


def sample(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 8))
    return x, jnp.argmax(jax.vmap(jax.vmap(teacher))(x), axis=-1)


class Net(eqx.Module):
    linear1: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    linear2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear1 = eqx.nn.Linear(8, 64, key=k1)
        self.dropout = eqx.nn.Dropout(0.1)
        self.linear2 = eqx.nn.Linear(64, 4, key=k2)

    def __call__(self, x, *, key=None):
        return self.linear2(self.dropout(jnp.tanh(self.linear1(x)), key=key))


model = Net(jax.random.key(1))


# --8<-- [start:fn]
def fn(model, inputs):  # inputs = (x, key): the key is data, like x
    x, key = inputs
    keys = jax.random.split(key, x.shape[0])  # a mask per example
    return jax.vmap(lambda x, key: model(x, key=key))(x, keys)


def sample_with_keys(key, k):  # a dropout key per micro-batch, stacked like x
    key_data, key_dropout = jax.random.split(key)
    x, y = sample(key_data, k)
    return (x, jax.random.split(key_dropout, k)), y


loss = eqx_gn.SoftmaxCrossEntropy()
gn = eqx_gn.GaussNewton(fn, loss)
state = gn.init(model)
step = eqx.filter_jit(gn.step)
# --8<-- [end:fn]

x_test, y_test = sample(jax.random.key(2), 1, 2048)


@eqx.filter_jit
def held_out(model):  # no dropout at evaluation
    outputs = jax.vmap(eqx.nn.inference_mode(model))(x_test[0])
    return loss.value(outputs, y_test[0])


key_data = jax.random.key(3)
before = held_out(model)
# --8<-- [start:loop]
for t in range(15):
    key_gn, key_ls = jax.random.split(jax.random.fold_in(key_data, t))
    batches = sample_with_keys(key_gn, 8)
    ls_batches = sample_with_keys(key_ls, 2)
    model, state, stats = step(model, state, batches, ls_batches)
# --8<-- [end:loop]
print(f"held-out loss {before:.3f} -> {held_out(model):.3f}")
