"""eqx_gn in one page: GN-vector products and the Gauss-Newton optimizer.

A small MLP learns a teacher network's classes. We check one GN-vector product
against the dense matrix, then train with full GN, layerwise GN and AdamW on the
same batches and compare the training loss after 25 steps.

    python examples/quickstart.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

import eqx_gn


def apply(model, x):  # fn(model, inputs) -> outputs
    return jax.vmap(model)(x)


def main():
    k_teacher, k_data, k_model = jax.random.split(jax.random.key(0), 3)
    teacher = eqx.nn.MLP(8, 4, 16, 2, key=k_teacher)
    x_all = jax.random.normal(k_data, (4096, 8))
    y_all = jnp.argmax(apply(teacher, x_all), axis=-1)
    model = eqx.nn.MLP(8, 4, 32, 2, key=k_model)
    loss = eqx_gn.SoftmaxCrossEntropy()
    k, b, steps = 8, 32, 25  # K micro-batches of b examples per optimizer step

    def batches(step, n):
        index = (jnp.arange(n * b) + step * n * b) % x_all.shape[0]
        return x_all[index].reshape(n, b, 8), y_all[index].reshape(n, b)

    # 1. One GN-vector product G v = J^T H J v, matrix-free, against the dense G.
    x, y = batches(0, 1)
    params = eqx.filter(model, eqx.is_inexact_array)
    v = jax.tree.map(lambda p: jnp.ones_like(p) / p.size, params)
    gv = eqx_gn.gnvp(apply, model, (x[0], y[0]), v, loss=loss)
    flat, unravel = ravel_pytree(params)
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    outputs = lambda f: apply(eqx.combine(unravel(f), static), x[0])  # noqa: E731
    jac = jax.jacfwd(outputs)(flat).reshape(-1, flat.size)
    z = outputs(flat)
    hess = jax.hessian(lambda zz: loss.value(zz.reshape(z.shape), y[0]))(z.reshape(-1))
    dense = jac.T @ hess @ jac @ ravel_pytree(v)[0]
    error = jnp.max(jnp.abs(ravel_pytree(gv)[0] - dense)) / jnp.max(jnp.abs(dense))
    print(f"gnvp vs dense J^T H J v: relative error {float(error):.1e}")

    @eqx.filter_jit
    def train_loss(m):
        return loss.value(apply(m, x_all), y_all)

    # 2. Gauss-Newton: K inner Muon/AdamW steps on the quadratic model, then a grid
    #    line search on the true loss; full and layerwise (one block per layer).
    def run_gn(blocks):
        solver = eqx_gn.InnerOptimizer(
            learning_rate=0.03, schedule="global_cosine", total_steps=steps
        )
        gn = eqx_gn.GaussNewton(apply, loss, solver=solver, blocks=blocks)
        m, state = model, gn.init(model)
        step = eqx.filter_jit(gn.step)
        step_sizes = []
        for i in range(steps):
            m, state, stats = step(m, state, batches(i, k), batches(1000 + i, 2))
            step_sizes.append(round(float(stats.step_size), 2))
        return float(train_loss(m)), step_sizes

    full, step_sizes = run_gn(None)
    layerwise, _ = run_gn(eqx_gn.Blocks.from_layers(model, lambda m: m.layers))
    print(f"step sizes the line search chose (full GN): {step_sizes}")

    # 3. AdamW on the same K*b examples per step, best of a small learning-rate grid.
    def run_adamw(lr):
        opt = optax.adamw(lr)
        m, state = model, opt.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(m, state, x, y):
            grad = eqx.filter_grad(lambda m: loss.value(apply(m, x), y))(m)
            updates, state = opt.update(
                grad, state, eqx.filter(m, eqx.is_inexact_array)
            )
            return eqx.apply_updates(m, updates), state

        for i in range(steps):
            x, y = batches(i, k)
            m, state = step(m, state, x.reshape(k * b, 8), y.reshape(k * b))
        return float(train_loss(m))

    adamw = min(run_adamw(lr) for lr in (3e-3, 1e-2, 3e-2))
    print(f"training loss after {steps} steps of {k * b} examples:")
    print(f"  full GN       {full:.4f}")
    print(f"  layerwise GN  {layerwise:.4f}")
    print(f"  AdamW (best)  {adamw:.4f}")


if __name__ == "__main__":
    main()
