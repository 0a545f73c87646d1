import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_gn

jax.config.update("jax_enable_x64", True)
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
model = eqx.nn.MLP(4, 3, 16, 2, activation=jnp.tanh, dtype=jnp.float64, key=k1)
fn = lambda m, x: jax.vmap(m)(x)  # noqa: E731
x, y = jax.random.normal(k2, (64, 4)), jax.random.randint(k3, (64,), 0, 3)
args = (fn, model, (x, y))
loss = eqx_gn.SoftmaxCrossEntropy()
key = jax.random.key(1)

# The 5 largest eigenpairs of G by 30 Lanczos steps (30 G-vector products).
top = eqx_gn.eigenpairs(*args, loss=loss, key=key, num_iterations=30)
print("top eigenvalues", top.eigenvalues, "residuals", top.residual_norms)

# Hutchinson: trace(G) per layer (the blocks of the layerwise GN), 100 probes.
layers = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
est = eqx_gn.trace_estimate(*args, loss=loss, key=key, num_probes=100, blocks=layers)
for name, t, se in zip(
    est.block_names, est.block_traces, est.block_trace_stderrs, strict=True
):
    print(f"trace of {name}: {t:.4f} +- {se:.4f}")

# The spectral density by stochastic Lanczos quadrature, smoothed on a grid.
slq = eqx_gn.spectral_density(
    *args, loss=loss, key=key, num_probes=8, num_iterations=20
)
sigma = 0.01 * top.eigenvalues[0]  # most of G's eigenvalues are 0: start below
grid = jnp.linspace(-5 * sigma, top.eigenvalues[0] + 5 * sigma, 400)
rho = slq.density(grid, sigma)
print("mean eigenvalue trace(G)/n by SLQ", slq.moment(1))

# The same tools on the empirical Fisher: a different matrix.
ef = eqx_gn.eigenpairs(
    *args, loss=loss, key=key, num_iterations=30, curvature="empirical_fisher"
)
print("empirical Fisher's top eigenvalues", ef.eigenvalues)

# Sanity checks against the dense G of this 147-parameter model.
flat, unravel = jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
op = eqx_gn.curvature_operator(*args, loss=loss)
dense = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(op.mv(unravel(e)))[0])(
    jnp.eye(flat.size)
)
exact = np.linalg.eigvalsh(np.asarray(dense))[::-1][:5]
assert np.allclose(top.eigenvalues, exact, rtol=1e-6)
assert abs(float(est.trace) - np.trace(dense)) < 4 * float(est.trace_stderr)
assert abs(np.trapezoid(np.asarray(rho), np.asarray(grid)) - 1) < 1e-3
