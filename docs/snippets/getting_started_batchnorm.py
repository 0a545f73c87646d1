"""BatchNorm with Gauss-Newton: batch statistics in fn, running ones outside."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

teacher = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))


def sample(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 8))
    return x, jnp.argmax(jax.vmap(jax.vmap(teacher))(x), axis=-1)


# --8<-- [start:model]
class Net(eqx.Module):
    linear1: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    linear2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear1 = eqx.nn.Linear(8, 32, key=k1)
        # mode="batch": training outputs use the batch's own statistics
        self.norm = eqx.nn.BatchNorm(32, axis_name="batch", mode="batch")
        self.linear2 = eqx.nn.Linear(32, 4, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(jnp.tanh(self.linear1(x)), state)
        return self.linear2(h), state


model, bn_state = eqx.nn.make_with_state(Net)(jax.random.key(1))
forward = jax.vmap(  # a batch through the model, one state for the batch
    lambda model, x, state: model(x, state),
    in_axes=(None, 0, None),
    out_axes=(0, None),
    axis_name="batch",
)
bn_state0 = bn_state  # only its structure matters to fn (see below)


def fn(model, x):  # pure: in training mode the outputs do not read the state
    outputs, _ = forward(model, x, bn_state0)
    return outputs


loss = eqx_gn.SoftmaxCrossEntropy()
gn = eqx_gn.GaussNewton(fn, loss)
state = gn.init(model)
step = eqx.filter_jit(gn.step)
running_stats = eqx.filter_jit(lambda model, x, s: forward(model, x, s)[1])
# --8<-- [end:model]

x_test, y_test = sample(jax.random.key(2), 1, 2048)


# --8<-- [start:loop]
@eqx.filter_jit
def held_out(model, bn_state):  # inference mode: the running statistics
    outputs, _ = forward(eqx.nn.inference_mode(model), x_test[0], bn_state)
    return loss.value(outputs, y_test[0])


key_data = jax.random.key(3)
before = held_out(model, bn_state)
for t in range(15):
    key_gn, key_ls = jax.random.split(jax.random.fold_in(key_data, t))
    batches = sample(key_gn, 8)
    model, state, stats = step(model, state, batches, sample(key_ls, 2))
    bn_state = running_stats(model, batches[0].reshape(-1, 8), bn_state)
print(f"held-out loss {before:.3f} -> {held_out(model, bn_state):.3f}")
# --8<-- [end:loop]
