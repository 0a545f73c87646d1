"""Gauss-Newton on your own Equinox model: an MLP learns a teacher's classes."""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

# Your model: any Equinox module. Its parameters are its inexact-array leaves.
key_teacher, key_model, key_data = jax.random.split(jax.random.key(0), 3)
teacher = eqx.nn.MLP(8, 4, 16, 2, key=key_teacher)
model = eqx.nn.MLP(8, 4, 32, 2, activation=jnp.tanh, key=key_model)


def fn(model, x):  # how the model is applied: fn(model, inputs) -> outputs
    return jax.vmap(model)(x)


def sample(key, k, b=64):  # k micro-batches of b examples, stacked on axis 0
    x = jax.random.normal(key, (k, b, 8))
    y = jnp.argmax(jax.vmap(fn, (None, 0))(teacher, x), axis=-1)
    return x, y  # (inputs, targets); every leaf has the leading axis k


loss = eqx_gn.SoftmaxCrossEntropy()
gn = eqx_gn.GaussNewton(
    fn,
    loss,
    # K inner steps of Muon/AdamW on the quadratic model (the default solver)
    solver=eqx_gn.InnerOptimizer(learning_rate=1e-2),
    # the best of s = 1, 2^-1/2, ..., 2^-7/2 on the true loss (the default)
    line_search=eqx_gn.GridLineSearch(),
    # a block per layer: layerwise GN (blocks=None: full GN)
    blocks=eqx_gn.Blocks.from_layers(model, lambda m: m.layers),
)
state = gn.init(model)
step = eqx.filter_jit(gn.step)  # compiles on the first call, then reuses it

x_test, y_test = sample(jax.random.key(1), 1, 2048)
held_out = eqx.filter_jit(lambda m: loss.value(fn(m, x_test[0]), y_test[0]))
before = held_out(model)
for t in range(20):
    key_gn, key_ls = jax.random.split(jax.random.fold_in(key_data, t))
    # K = 8 micro-batches for the solver, 2 other batches for the line search
    batches, ls_batches = sample(key_gn, 8), sample(key_ls, 2)
    model, state, stats = step(model, state, batches, ls_batches)
    print(
        f"step {t:2d}  loss {stats.loss_before:.3f} -> "
        f"{stats.loss_after:.3f}  step size {stats.step_size:.3f}  "
        f"rejected {bool(stats.rejected)}"
    )
print(f"held-out loss {before:.3f} -> {held_out(model):.3f}")
