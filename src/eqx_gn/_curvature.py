r"""Looking at curvature: Lanczos eigenpairs, spectral densities and Hutchinson
traces of a curvature matrix $C = J^\top M J$, matrix-free.

Every curvature matrix here has the GN matrix's shape: the model's Jacobian $J$ at
$\theta_0$ around an output-space matrix $M$ that is block-diagonal over positions
(each term $n$ of the loss's mean, with weight $s_n = w_n / W$):

- ``"ggn"``: $M_n = \nabla_{z_n}^2 L$, the GN matrix $G$ of [`eqx_gn.gnvp`][];
- ``"empirical_fisher"``: $M_n = s_n e_n e_n^\top$ with $e_n = \nabla_{z_n} \ell(z_n,
  y_n)$ at the batch's labels, so that $C = \sum_n s_n \nabla_\theta \ell_n
  \nabla_\theta \ell_n^\top$, the mean outer product of per-position gradients;
- ``"mc_fisher"``: the same with labels $\hat y_n$ sampled from the model's
  predictive distribution ($\mathrm{softmax}(z_n)$ for cross-entropy, $\mathcal N
  (z_n, I)$ for squared error), averaged over ``fisher_samples`` draws. Its
  expectation over the draws is the Fisher, which for these two losses is $G$.

A product $C v$ goes through the quadratic model's code path (one linearization
reused for every product, one tangent pass and one transpose per block), so every
tool here works for full and block-diagonal matrices, under ``jit`` with a sharded
batch and inside ``shard_map`` with ``axis_name``.
"""

import math
from collections.abc import Callable
from typing import Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from ._blocks import Blocks
from ._custom_types import ApplyFn, AxisName, Batch, Model, Params, typecheck
from ._gnvp import QuadraticModel, quadratic_model
from ._losses import (
    AbstractLoss,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    _scale,
    _total_weight,
)
from ._sharding import _axis_tuple

Curvature = Literal["ggn", "empirical_fisher", "mc_fisher"]
_CURVATURES = ("ggn", "empirical_fisher", "mc_fisher")


def _gradient_factors(
    loss: AbstractLoss, outputs, targets, curvature: str, samples: int, key, axis_name
):
    """``(e, scale, feature_axes)`` with ``e`` shaped ``(samples, *outputs.shape)``:
    the per-position output gradients of the unweighted loss term at the labels
    (empirical Fisher) or at labels sampled from the model (Monte-Carlo Fisher), and
    the positions' weights ``w_n / W`` with the feature axes kept as ones."""
    if isinstance(loss, SoftmaxCrossEntropy):
        outputs, labels, weights = loss._prepare(outputs, targets)
        positions = labels.shape
        total = _total_weight(weights, positions, outputs.dtype, axis_name)
        scale = _scale(weights, total, outputs.dtype, positions)[..., None]
        p = jax.nn.softmax(outputs, axis=-1)
        if curvature == "empirical_fisher":
            labels = labels[None]
        else:
            labels = jax.random.categorical(
                key, outputs, axis=-1, shape=(samples, *positions)
            )
        onehot = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
        return p[None] - onehot, scale, (-1,)
    if isinstance(loss, MeanSquaredError):
        y, weights, positions = loss._prepare(outputs, targets)
        scale = loss._position_scale(outputs, weights, positions, axis_name)
        if curvature == "empirical_fisher":
            e = (outputs - y)[None]
        else:
            # z - y_hat with y_hat ~ N(z, I): a standard normal up to sign.
            e = jax.random.normal(key, (samples, *outputs.shape), outputs.dtype)
        return e, scale, tuple(range(-loss.feature_ndim, 0))
    raise ValueError(
        f"curvature={curvature!r} needs a SoftmaxCrossEntropy or MeanSquaredError "
        f"loss (its per-position gradients); got {type(loss).__name__}."
    )


def _output_product(
    loss: AbstractLoss, outputs, targets, curvature: str, samples: int, key, axis_name
) -> Callable:
    """The output-space map $u \\mapsto M u$ of ``curvature``."""
    if curvature == "ggn":
        return loss.curvature(outputs, targets, axis_name=axis_name)[1]
    if curvature == "mc_fisher":
        # Inside shard_map every shard holds other positions: draw their labels
        # from a stream of their own.
        for axis in _axis_tuple(axis_name):
            key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    e, scale, feature_axes = _gradient_factors(
        loss, outputs, targets, curvature, samples, key, axis_name
    )

    def product(u):
        dots = jnp.sum(e * u[None], axis=feature_axes, keepdims=True)
        return scale * jnp.mean(e * dots, axis=0)

    return product


@final
class CurvatureOperator(eqx.Module):
    r"""A curvature matrix $C = J^\top M J$ of a loss at $\theta_0$ on one batch, as a
    matrix-free product ``v -> C v``.

    Built by [`eqx_gn.curvature_operator`][]: it holds one linearization of the model
    and reuses it for every product. With several blocks, $C$ is block-diagonal
    (the blocks $J_b^\top M J_b$). Vectors have the structure of
    ``eqx.filter(model, eqx.is_inexact_array)``.
    """

    quadratic: QuadraticModel
    output_product: Callable
    curvature: str = eqx.field(static=True)

    @typecheck
    def mv(self, v: Params) -> Params:
        r"""The product $C v$."""
        q = self.quadratic

        def output_fn(u):
            return jnp.zeros((), q.loss_value.dtype), self.output_product(u)

        return q._per_block(v, output_fn, "tangent", local_values=True)[1]


def _check_curvature(curvature: str, fisher_samples: int) -> None:
    if curvature not in _CURVATURES:
        raise ValueError(
            f"curvature must be one of {', '.join(_CURVATURES)}; got {curvature!r}."
        )
    if not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise ValueError(f"fisher_samples must be an int >= 1, got {fisher_samples!r}.")


@typecheck
def curvature_operator(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    *,
    loss: AbstractLoss,
    blocks: Blocks | None = None,
    curvature: Curvature = "ggn",
    key: PRNGKeyArray | None = None,
    fisher_samples: int = 1,
    axis_name: AxisName = None,
) -> CurvatureOperator:
    r"""Linearize ``fn(model, inputs)`` once and return the curvature matrix
    ``curvature`` of ``loss`` on ``batch`` as a [`eqx_gn.CurvatureOperator`][].

    **Arguments:** those of [`eqx_gn.quadratic_model`][], and

    - ``curvature``: ``"ggn"`` (the GN matrix, the default), ``"empirical_fisher"``
      or ``"mc_fisher"`` (see the [guide](../guide/curvature.md)); the two Fisher
      matrices need a [`eqx_gn.SoftmaxCrossEntropy`][] or
      [`eqx_gn.MeanSquaredError`][] loss.
    - ``key``: draws the Monte-Carlo Fisher's labels (needed for ``"mc_fisher"``
      only); they are drawn once, so every product is with one fixed matrix.
    - ``fisher_samples``: labels drawn per position for ``"mc_fisher"``.
    """
    _check_curvature(curvature, fisher_samples)
    if curvature == "mc_fisher" and key is None:
        raise ValueError("curvature='mc_fisher' needs a key to sample labels.")
    q = quadratic_model(fn, model, batch, loss=loss, blocks=blocks, axis_name=axis_name)
    product = _output_product(
        loss, q.outputs, q.targets, curvature, fisher_samples, key, axis_name
    )
    return CurvatureOperator(q, product, curvature)


# --------------------------------------------------------------------- Lanczos
def _orthogonalize(w, basis, mask):
    """``w`` minus its projection on the rows of ``basis`` where ``mask`` holds;
    twice, which is enough to keep the basis orthogonal to working precision."""
    for _ in range(2):
        coefficients = jnp.where(mask, basis @ w, 0)
        w = w - coefficients @ basis
    return w


def _lanczos(matvec, start, key, num_iterations: int):
    """``num_iterations`` Lanczos steps from ``start`` with full reorthogonalization.

    Returns the tridiagonal's diagonal ``alpha`` and off-diagonal ``beta`` (``beta[i]``
    couples steps ``i`` and ``i + 1``; ``beta[-1]`` is the residual's norm) and the
    orthonormal basis (``num_iterations`` rows). On a breakdown (the Krylov space is
    invariant) the next vector is a random one orthogonal to the basis, with a zero
    coupling: the tridiagonal then splits, and its eigenvalues stay eigenvalues.
    """
    m, n = num_iterations, start.size
    dtype = start.dtype
    rows = jnp.arange(m + 1)
    basis = jnp.zeros((m + 1, n), dtype).at[0].set(start / jnp.linalg.norm(start))
    tolerance = 10 * math.sqrt(n) * jnp.finfo(dtype).eps

    def step(carry, i):
        basis, scale, key = carry
        v = basis[i]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        mask = rows <= i
        w = _orthogonalize(w, basis, mask)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        key, sub = jax.random.split(key)
        broke = beta <= tolerance * scale

        def fresh():
            r = jax.random.rademacher(sub, (n,), dtype)
            r = _orthogonalize(r, basis, mask)
            norm = jnp.linalg.norm(r)
            return r / jnp.where(norm > 0, norm, 1)

        # Only on a breakdown: a second orthogonalization every step cost a third
        # of a Lanczos step beside a product (benchmarks/curvature_cost.py).
        nxt = jax.lax.cond(broke, fresh, lambda: w / jnp.where(broke, 1, beta))
        beta = jnp.where(broke, 0, beta)
        return (basis.at[i + 1].set(nxt), scale, key), (alpha, beta)

    init = (basis, jnp.zeros((), dtype), key)
    (basis, _, _), (alpha, beta) = jax.lax.scan(step, init, jnp.arange(m))
    return alpha, beta, basis[:m]


def _tridiagonal_eigh(alpha, beta):
    off = beta[:-1]
    t = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.linalg.eigh(t)


def _flat_operator(op: CurvatureOperator, model: Model):
    """``(matvec on flat vectors, flat params, unravel)``.

    The flat parameters come from ``model``, not from the quadratic model, whose
    copy is cast to varying over ``axis_name``: the products are summed over the
    axis, so everything built here stays replicated inside ``shard_map``.
    """
    flat, unravel = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))

    def matvec(x):
        return ravel_pytree(op.mv(unravel(x.astype(flat.dtype))))[0]

    return matvec, flat, unravel


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


@final
class Eigenpairs(eqx.Module):
    r"""Ritz pairs of a curvature matrix from [`eqx_gn.eigenpairs`][].

    ``eigenvalues[i]`` is the $i$-th largest (or smallest) Ritz value,
    ``eigenvectors`` has the structure of the parameters with a leading axis of
    the same length (unit norm over all leaves), and ``residual_norms[i]`` is
    $\lVert C y_i - \lambda_i y_i \rVert$ (exact arithmetic's value,
    $\beta_m |s_{m i}|$, which full reorthogonalization keeps honest): an
    eigenvalue is then within that of one of $C$'s. ``ritz_values`` are all the
    ``num_iterations`` Ritz values, ascending.
    """

    eigenvalues: Float[Array, " k"]
    eigenvectors: PyTree[Float[Array, "k ..."]]
    residual_norms: Float[Array, " k"]
    ritz_values: Float[Array, " m"]


@eqx.filter_jit
@typecheck
def eigenpairs(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    *,
    loss: AbstractLoss,
    key: PRNGKeyArray,
    num_iterations: int,
    num_eigenvalues: int = 5,
    which: Literal["largest", "smallest"] = "largest",
    blocks: Blocks | None = None,
    curvature: Curvature = "ggn",
    fisher_samples: int = 1,
    axis_name: AxisName = None,
) -> Eigenpairs:
    r"""The ``num_eigenvalues`` largest (or smallest) eigenpairs of a curvature
    matrix $C$ (the GN matrix by default), by Lanczos with full reorthogonalization.

    ``num_iterations`` products with $C$ (one linearization) from a random start
    drawn from ``key`` build an orthonormal basis $V$ of the Krylov space and the
    tridiagonal $T = V^\top C V$; the eigenpairs of $T$ give Ritz pairs
    $(\theta_i, V s_i)$. Extreme eigenvalues converge first, the largest ones
    fastest when the spectrum decays. Costs ``num_iterations`` products and
    ``num_iterations + 1`` parameter-sized vectors of memory.

    **Arguments:** those of [`eqx_gn.curvature_operator`][], and

    - ``key``: the start vector (and the Monte-Carlo Fisher's labels).
    - ``num_iterations``: Lanczos steps, at most the number of parameters.
    - ``num_eigenvalues``: how many pairs to return, at most ``num_iterations``.
    - ``which``: ``"largest"`` (descending) or ``"smallest"`` (ascending).

    ```python
    top = eqx_gn.eigenpairs(
        apply, model, (x, y), loss=eqx_gn.SoftmaxCrossEntropy(),
        key=jax.random.key(0), num_iterations=30,
    )
    top.eigenvalues  # (5,), descending
    ```
    """
    _check_count("num_iterations", num_iterations, 1)
    _check_count("num_eigenvalues", num_eigenvalues, 1)
    if num_eigenvalues > num_iterations:
        raise ValueError(
            f"num_eigenvalues ({num_eigenvalues}) must be at most num_iterations "
            f"({num_iterations})."
        )
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}.")
    k_fisher, k_start, k_fresh = jax.random.split(key, 3)
    op = curvature_operator(
        fn,
        model,
        batch,
        loss=loss,
        blocks=blocks,
        curvature=curvature,
        key=k_fisher,
        fisher_samples=fisher_samples,
        axis_name=axis_name,
    )
    matvec, flat, unravel = _flat_operator(op, model)
    if num_iterations > flat.size:
        raise ValueError(
            f"num_iterations ({num_iterations}) must be at most the number of "
            f"parameters ({flat.size})."
        )
    start = jax.random.rademacher(k_start, flat.shape, flat.dtype)
    alpha, beta, basis = _lanczos(matvec, start, k_fresh, num_iterations)
    theta, s = _tridiagonal_eigh(alpha, beta)
    order = (
        jnp.arange(num_iterations - 1, num_iterations - 1 - num_eigenvalues, -1)
        if which == "largest"
        else jnp.arange(num_eigenvalues)
    )
    s_k = s[:, order]
    vectors = (s_k.T @ basis).astype(flat.dtype)
    return Eigenpairs(
        theta[order],
        jax.vmap(unravel)(vectors),
        jnp.abs(beta[-1] * s_k[-1]),
        theta,
    )


# ----------------------------------------------------- spectral density (SLQ)
@final
class SpectralDensity(eqx.Module):
    r"""A stochastic Lanczos quadrature estimate of a curvature matrix's spectral
    density, from [`eqx_gn.spectral_density`][].

    For probe $p$, the Lanczos tridiagonal $T_p$ from the unit vector $q_p$ gives
    ``nodes[p]`` (its eigenvalues $\theta_{pj}$) and ``weights[p]`` (the squared
    first components of its eigenvectors, summing to 1): the Gauss quadrature of
    the measure $\sum_i (q_p^\top u_i)^2 \delta_{\lambda_i}$, exact for polynomials
    up to degree $2m - 1$. Averaged over probes, it estimates the spectral density
    $\frac1n \sum_i \delta_{\lambda_i}$ of the $n \times n$ matrix.
    """

    nodes: Float[Array, "probes m"]
    weights: Float[Array, "probes m"]
    dimension: int = eqx.field(static=True)

    @typecheck
    def moment(self, power: int) -> Scalar:
        r"""$\frac1P \sum_p \sum_j w_{pj} \theta_{pj}^k$: an estimate of
        $\operatorname{tr}(C^k) / n$, equal to the probes' own mean of
        $q_p^\top C^k q_p$ for $k \le 2m - 1$."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**power, axis=1))

    @typecheck
    def density(
        self, grid: Float[Array, " points"], sigma: float | Scalar
    ) -> Float[Array, " points"]:
        r"""The estimate smoothed by a Gaussian of width ``sigma`` on ``grid``:
        $\rho(x) = \frac1P \sum_{p, j} w_{pj}\, \mathcal N(x; \theta_{pj},
        \sigma^2)$, a density (it integrates to 1) whose mean is the quadrature's."""
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        kernel = jnp.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return jnp.mean(jnp.sum(self.weights[None] * kernel, axis=2), axis=1)


@eqx.filter_jit
@typecheck
def spectral_density(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    *,
    loss: AbstractLoss,
    key: PRNGKeyArray,
    num_probes: int,
    num_iterations: int,
    blocks: Blocks | None = None,
    curvature: Curvature = "ggn",
    fisher_samples: int = 1,
    axis_name: AxisName = None,
) -> SpectralDensity:
    r"""A stochastic Lanczos quadrature (SLQ) estimate of the spectral density of a
    curvature matrix (the GN matrix by default).

    Each of ``num_probes`` Rademacher probes starts ``num_iterations`` Lanczos steps
    with full reorthogonalization, all on one linearization:
    ``num_probes * num_iterations`` products. See [`eqx_gn.SpectralDensity`][] for
    what comes back, and [`eqx_gn.eigenpairs`][] for the other arguments.
    """
    _check_count("num_probes", num_probes, 1)
    _check_count("num_iterations", num_iterations, 1)
    k_fisher, k_probes = jax.random.split(key)
    op = curvature_operator(
        fn,
        model,
        batch,
        loss=loss,
        blocks=blocks,
        curvature=curvature,
        key=k_fisher,
        fisher_samples=fisher_samples,
        axis_name=axis_name,
    )
    matvec, flat, _ = _flat_operator(op, model)
    if num_iterations > flat.size:
        raise ValueError(
            f"num_iterations ({num_iterations}) must be at most the number of "
            f"parameters ({flat.size})."
        )

    def one_probe(k):
        k_start, k_fresh = jax.random.split(k)
        start = jax.random.rademacher(k_start, flat.shape, flat.dtype)
        alpha, beta, _ = _lanczos(matvec, start, k_fresh, num_iterations)
        theta, s = _tridiagonal_eigh(alpha, beta)
        return theta, s[0] ** 2

    nodes, weights = jax.lax.map(one_probe, jax.random.split(k_probes, num_probes))
    return SpectralDensity(nodes, weights, int(flat.size))


# ------------------------------------------------------------------ Hutchinson
@final
class TraceEstimate(eqx.Module):
    r"""Hutchinson estimates of a curvature matrix's trace and diagonal, from
    [`eqx_gn.trace_estimate`][].

    With Rademacher probes $z_p$, $\operatorname{diag}(C) \approx \frac1P \sum_p
    z_p \odot C z_p$ and the trace of block $b$ is the sum of that over the block's
    entries. The standard errors are the probes' sample standard deviation over
    $\sqrt P$; a Rademacher probe's variance is $2 \sum_{i \ne j} C_{ij}^2$ for the
    trace (so a diagonal matrix is estimated exactly) and $\sum_{j \ne i} C_{ij}^2$
    for the entry $C_{ii}$.
    """

    trace: Scalar
    trace_stderr: Scalar
    block_traces: Float[Array, " blocks"]
    block_trace_stderrs: Float[Array, " blocks"]
    diagonal: Params
    diagonal_stderr: Params
    block_names: tuple[str, ...] = eqx.field(static=True)


def _flat_block_ids(blocks: Blocks, params) -> np.ndarray:
    """The block of every entry of the flattened parameters."""
    ids = []
    for leaf, owner, layers in zip(
        jax.tree.leaves(params), blocks.leaf_block, blocks.layer_blocks, strict=True
    ):
        shape = jnp.shape(leaf)
        if layers is None:
            ids.append(np.full(shape, owner))
        else:
            column = np.asarray(layers).reshape((-1,) + (1,) * (len(shape) - 1))
            ids.append(np.broadcast_to(column, shape))
    return np.concatenate([i.ravel() for i in ids]).astype(np.int32)


@eqx.filter_jit
@typecheck
def trace_estimate(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    *,
    loss: AbstractLoss,
    key: PRNGKeyArray,
    num_probes: int,
    blocks: Blocks | None = None,
    curvature: Curvature = "ggn",
    fisher_samples: int = 1,
    axis_name: AxisName = None,
) -> TraceEstimate:
    r"""Hutchinson estimates of the trace and diagonal of a curvature matrix (the GN
    matrix by default), per block of ``blocks`` and in total, with standard errors.

    ``num_probes`` (at least 2) Rademacher probes, one product each, on one
    linearization. With ``blocks`` the matrix is block-diagonal; its blocks' traces
    and its diagonal are those of the full matrix, and the estimates have less
    variance (no cross-block terms). See [`eqx_gn.TraceEstimate`][], and
    [`eqx_gn.eigenpairs`][] for the other arguments.
    """
    _check_count("num_probes", num_probes, 2)
    k_fisher, k_probes = jax.random.split(key)
    op = curvature_operator(
        fn,
        model,
        batch,
        loss=loss,
        blocks=blocks,
        curvature=curvature,
        key=k_fisher,
        fisher_samples=fisher_samples,
        axis_name=axis_name,
    )
    blocks = op.quadratic.blocks
    matvec, flat, unravel = _flat_operator(op, model)
    ids = jnp.asarray(_flat_block_ids(blocks, eqx.filter(model, eqx.is_inexact_array)))
    num_blocks = blocks.num_blocks

    def one_probe(carry, k):
        count, mean, m2 = carry
        z = jax.random.rademacher(k, flat.shape, flat.dtype)
        d = z * matvec(z)
        # Welford's update: no cancellation when the variance is small.
        count = count + 1
        delta = d - mean
        mean = mean + delta / count
        m2 = m2 + delta * (d - mean)
        return (count, mean, m2), jax.ops.segment_sum(d, ids, num_blocks)

    zeros = jnp.zeros_like(flat)
    init = (jnp.zeros((), flat.dtype), zeros, zeros)
    (_, mean, m2), per_block = jax.lax.scan(
        one_probe, init, jax.random.split(k_probes, num_probes)
    )
    root = math.sqrt(num_probes)
    totals = jnp.sum(per_block, axis=1)
    return TraceEstimate(
        trace=jnp.mean(totals),
        trace_stderr=jnp.std(totals, ddof=1) / root,
        block_traces=jnp.mean(per_block, axis=0),
        block_trace_stderrs=jnp.std(per_block, axis=0, ddof=1) / root,
        diagonal=unravel(mean),
        diagonal_stderr=unravel(jnp.sqrt(m2 / (num_probes - 1)) / root),
        block_names=blocks.names,
    )
