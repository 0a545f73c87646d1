import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

model = eqx.nn.MLP(4, 3, 32, 2, activation=jnp.tanh, key=jax.random.key(0))
loss = eqx_gn.SoftmaxCrossEntropy()


def fn(model, x):  # how a model is applied: fn(model, inputs) -> outputs
    return jax.vmap(model)(x)


def batches(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 4))
    return x, jnp.argmax(x[..., :3] * x[..., 1:], axis=-1)


x, y = batches(jax.random.key(1), 1)
v = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
# A block per layer, for layerwise GN:
layers = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
gv = eqx_gn.gnvp(fn, model, (x[0], y[0]), v, loss=loss)  # G v, full GN matrix
gv_layerwise = eqx_gn.gnvp(fn, model, (x[0], y[0]), v, loss=loss, blocks=layers)

gn = eqx_gn.GaussNewton(fn, loss, blocks=layers)  # blocks=None: full GN
state, step = gn.init(model), eqx.filter_jit(gn.step)
for t in range(20):
    k1, k2 = jax.random.split(jax.random.key(t + 2))
    model, state, stats = step(model, state, batches(k1, 8), batches(k2, 2))
    print(t, f"{stats.loss_before:.4f} -> {stats.loss_after:.4f}")
