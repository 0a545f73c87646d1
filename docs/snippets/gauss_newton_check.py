import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn

jax.config.update("jax_enable_x64", True)
k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
model = eqx.nn.MLP(4, 3, 16, 2, activation=jnp.tanh, dtype=jnp.float64, key=k1)
fn = lambda m, x: jax.vmap(m)(x)  # noqa: E731
x, y = jax.random.normal(k2, (32, 4)), jax.random.randint(k3, (32,), 0, 3)
loss = eqx_gn.SoftmaxCrossEntropy()
params, static = eqx.partition(model, eqx.is_inexact_array)
v = jax.tree.map(lambda p: jax.random.normal(k4, p.shape), params)

q = eqx_gn.quadratic_model(fn, model, (x, y), loss=loss)  # one jax.linearize
gv = q.gnvp(v)  # J^T H J v: a tangent pass and its transpose, no forward pass


def linearized_loss(d):  # L(f(theta0) + J d), the model linearized with jax.jvp
    z0, jd = jax.jvp(lambda p: fn(eqx.combine(p, static), x), (params,), (d,))
    return loss.value(z0 + jd, y)


zero = jax.tree.map(jnp.zeros_like, params)
_, gv_ref = jax.jvp(jax.grad(linearized_loss), (zero,), (v,))  # its Hessian times v
g_ref = jax.grad(lambda p: loss.value(fn(eqx.combine(p, static), x), y))(params)


def close(a, b):
    return all(jax.tree.leaves(jax.tree.map(jnp.allclose, a, b)))


assert close(gv, gv_ref) and close(q.gradient(), g_ref)
assert close(q.grad(v), jax.tree.map(jnp.add, g_ref, gv))  # grad q(d) = g + G d
