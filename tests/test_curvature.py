"""Curvature tools (eigenpairs, spectral_density, trace_estimate) and the curvature
matrices beside the GN matrix, against dense float64 matrices built column by
column (tests/helpers.py's dense GN, or per-position gradients from ``jax.jacrev``
of optax's losses)."""

import math

import equinox as eqx
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

import eqx_gn
from eqx_gn.lm import Transformer, apply_lm, get_config, layerwise_blocks
from helpers import (
    SETTINGS,
    Problem,
    dense_gn,
    flat,
    flat_block_ids,
    make_mlp_problem,
    seeds,
)


# ---------------------------------------------------------------------- models
class SmallCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        kc, kh = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, dtype=jnp.float64, key=kc)
        self.head = eqx.nn.Linear(2 * 3 * 3, 3, dtype=jnp.float64, key=kh)

    def __call__(self, image):
        return self.head(jnp.tanh(self.conv(image)).reshape(-1))


def apply_cnn(model, images):
    return jax.vmap(model)(images)


def make_cnn_problem(seed: int) -> Problem:
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    images = jax.random.normal(kx, (6, 1, 5, 5), jnp.float64)
    labels = jax.random.randint(ky, (6,), 0, 3)
    return Problem(
        apply_cnn, SmallCNN(km), (images, labels), eqx_gn.SoftmaxCrossEntropy(), "ce"
    )


def make_lm_problem(seed: int) -> Problem:
    """``eqx_gn.lm``'s transformer with a vocabulary of 11 (712 parameters)."""
    config = get_config("tiny", vocab_size=11, width=8, depth=1, heads=2, ffn=16)
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    model = Transformer(config, km, dtype=jnp.float64)
    tokens = jax.random.randint(kx, (2, 4), 0, 11)
    labels = jax.random.randint(ky, (2, 4), 0, 11)
    return Problem(
        apply_lm, model, (tokens, labels), eqx_gn.SoftmaxCrossEntropy(), "ce"
    )


def dense_operator(problem: Problem, **kwargs) -> np.ndarray:
    """The matrix of ``curvature_operator(...).mv``, column by column."""
    op = eqx_gn.curvature_operator(
        problem.fn, problem.model, problem.batch, loss=problem.loss, **kwargs
    )
    _, unravel = ravel_pytree(problem.params)
    n = flat(problem.params).size

    @jax.jit
    def columns(eye):
        return jax.vmap(lambda e: ravel_pytree(op.mv(unravel(e)))[0])(eye)

    return np.asarray(columns(jnp.eye(n, dtype=jnp.float64))).T


def per_position_gradients(problem: Problem, labels=None) -> np.ndarray:
    """``(positions, params)``: the gradient of each position's unweighted loss term
    (optax's cross-entropy or half the squared error) at ``labels`` (default the
    batch's)."""
    targets = problem.targets
    if isinstance(targets, tuple):
        targets = targets[0]
    if labels is None:
        labels = targets
    theta, unravel = ravel_pytree(problem.params)

    def terms(t):
        out = problem.apply_params(unravel(t))
        if problem.loss_kind == "ce":
            per = optax.softmax_cross_entropy_with_integer_labels(out, labels)
        else:
            per = 0.5 * jnp.sum((out - labels) ** 2, axis=-1)
        return per.reshape(-1)

    return np.asarray(jax.jacrev(terms)(theta))


def position_weights(problem: Problem) -> np.ndarray:
    """``w_n / W`` of every position, flattened."""
    targets = problem.targets
    if isinstance(targets, tuple):
        w = np.asarray(targets[1], np.float64).reshape(-1)
    else:
        labels = np.asarray(targets)
        positions = labels.shape if problem.loss_kind == "ce" else labels.shape[:-1]
        w = np.ones(math.prod(positions))
    return w / w.sum()


def top(values: np.ndarray, k: int) -> np.ndarray:
    return np.sort(values)[::-1][:k]


def lanczos_residuals(dense, pairs) -> np.ndarray:
    vectors = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(pairs.eigenvectors))
    values = np.asarray(pairs.eigenvalues)
    return np.linalg.norm(vectors @ dense - values[:, None] * vectors, axis=1)


# ------------------------------------------------------------------- eigenpairs
@SETTINGS
@hypothesis.given(seed=seeds)
def test_top_eigenpairs_of_an_mlp_match_the_dense_gn(seed):
    problem = make_mlp_problem(seed, "ce", batch_size=8, in_size=3, out_size=4, width=5)
    dense = dense_gn(problem)
    pairs = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(seed),
        num_iterations=30,
    )
    exact = top(np.linalg.eigvalsh(dense), 5)
    np.testing.assert_allclose(pairs.eigenvalues, exact, rtol=1e-6)
    scale = exact[0]
    assert np.all(lanczos_residuals(dense, pairs) < 1e-6 * scale)
    assert np.all(np.asarray(pairs.residual_norms) < 1e-6 * scale)
    vectors = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(pairs.eigenvectors))
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(5), atol=1e-10)
    # Six steps do not converge: the reported residual norms are the true ones.
    early = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(seed),
        num_iterations=6,
    )
    residuals = lanczos_residuals(dense, early)
    assert residuals.max() > 1e-4 * scale
    np.testing.assert_allclose(
        early.residual_norms, residuals, rtol=1e-6, atol=1e-10 * scale
    )


@pytest.mark.parametrize(
    "make, iterations", [(make_cnn_problem, 40), (make_lm_problem, 60)]
)
def test_top_eigenpairs_of_a_cnn_and_a_transformer_match_the_dense_gn(make, iterations):
    problem = make(0)
    dense = dense_gn(problem)
    pairs = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(1),
        num_iterations=iterations,
    )
    exact = top(np.linalg.eigvalsh(dense), 5)
    np.testing.assert_allclose(pairs.eigenvalues, exact, rtol=1e-6)
    residuals = lanczos_residuals(dense, pairs)
    assert np.all(residuals < 1e-5 * exact[0]), residuals
    # The reported residual norms bound the true ones' size.
    np.testing.assert_allclose(pairs.residual_norms, residuals, atol=1e-8 * exact[0])


def test_smallest_eigenpairs_of_a_full_rank_gn():
    # Squared error of a linear map on 16 random points: G = X^T X / 16 (with the
    # bias column) on each output, full rank, its smallest eigenvalues not zero.
    kx, km = jax.random.split(jax.random.key(3))
    model = eqx.nn.Linear(5, 2, dtype=jnp.float64, key=km)
    x = jax.random.normal(kx, (16, 5), jnp.float64) * jnp.arange(1.0, 6.0)[None]
    problem = Problem(
        lambda m, x: jax.vmap(m)(x),
        model,
        (x, jnp.zeros((16, 2))),
        eqx_gn.MeanSquaredError(),
        "mse",
    )
    dense = dense_gn(problem)
    exact = np.linalg.eigvalsh(dense)
    assert exact[0] > 1e-6
    pairs = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(0),
        num_iterations=exact.size,
        num_eigenvalues=3,
        which="smallest",
    )
    np.testing.assert_allclose(pairs.eigenvalues, exact[:3], rtol=1e-6)
    assert np.all(lanczos_residuals(dense, pairs) < 1e-8 * exact[-1])


def test_layerwise_eigenvalues_are_the_union_of_the_blocks_eigenvalues():
    problem = make_mlp_problem(5, "ce", batch_size=8, in_size=3, out_size=4, width=5)
    blocks = eqx_gn.Blocks.from_layers(problem.model, lambda m: m.layers)
    dense = dense_gn(problem)
    ids = flat_block_ids(problem.model, blocks.leaf_block)
    union = np.concatenate(
        [np.linalg.eigvalsh(dense[np.ix_(ids == b, ids == b)]) for b in range(3)]
    )
    pairs = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(0),
        num_iterations=40,
        blocks=blocks,
    )
    np.testing.assert_allclose(pairs.eigenvalues, top(union, 5), rtol=1e-6)
    # Not the full matrix's: the cross-block terms are dropped.
    assert not np.allclose(top(union, 5), top(np.linalg.eigvalsh(dense), 5), rtol=1e-3)


# ------------------------------------------------------------------ Hutchinson
def test_trace_and_diagonal_are_within_standard_errors_of_the_exact_ones():
    problem = make_lm_problem(2)
    blocks = layerwise_blocks(problem.model)
    dense = dense_gn(problem)
    ids = flat_block_ids(problem.model, blocks.leaf_block)
    est = eqx_gn.trace_estimate(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(0),
        num_probes=400,
        blocks=blocks,
    )
    assert est.block_names == blocks.names
    exact_blocks = np.asarray(
        [np.trace(dense[np.ix_(ids == b, ids == b)]) for b in range(blocks.num_blocks)]
    )
    z = (np.asarray(est.block_traces) - exact_blocks) / np.asarray(
        est.block_trace_stderrs
    )
    assert np.all(np.abs(z) < 4), z
    assert abs(float(est.trace) - np.trace(dense)) < 4 * float(est.trace_stderr)
    # The standard errors are the Rademacher ones: a block's trace has variance
    # 2 sum_{i != j} G_ij^2 over its entries, an entry G_ii has sum_{j != i} G_ij^2.
    off = dense - np.diag(np.diag(dense))
    same = ids[:, None] == ids[None, :]
    exact_block_se = np.sqrt(
        [
            2 * np.sum((off**2)[same & (ids == b)[:, None]]) / 400
            for b in range(blocks.num_blocks)
        ]
    )
    np.testing.assert_allclose(est.block_trace_stderrs, exact_block_se, rtol=0.3)
    np.testing.assert_allclose(est.trace, np.sum(est.block_traces), rtol=1e-12)
    # The diagonal: per entry, a standard normal's share within 3 and 4 errors
    # (entries with zero variance are exact).
    diag, stderr = flat(est.diagonal), flat(est.diagonal_stderr)
    error = np.abs(diag - np.diag(dense))
    noisy = stderr > 1e-12
    assert np.all(error[~noisy] < 1e-10)
    z = error[noisy] / stderr[noisy]
    exact_se = np.sqrt(np.sum(np.where(same, off, 0) ** 2, axis=1) / 400)
    assert 0.9 < np.median(stderr[noisy] / exact_se[noisy]) < 1.1
    assert np.mean(z < 3) > 0.98 and np.mean(z < 4.5) > 0.999, np.sort(z)[-10:]


def test_trace_standard_error_is_the_rademacher_one_and_shrinks_as_one_over_root_p():
    problem = make_mlp_problem(1, "ce", batch_size=8, in_size=3, out_size=4, width=5)
    dense = dense_gn(problem)
    off = dense - np.diag(np.diag(dense))
    exact_se = {p: math.sqrt(2 * np.sum(off**2) / p) for p in (100, 1600)}
    errors = {}
    for p in (100, 1600):
        est = eqx_gn.trace_estimate(
            problem.fn,
            problem.model,
            problem.batch,
            loss=problem.loss,
            key=jax.random.key(p),
            num_probes=p,
        )
        errors[p] = float(est.trace_stderr)
        # A sample standard deviation of p draws is within 30% / sqrt(p / 100).
        np.testing.assert_allclose(
            errors[p], exact_se[p], rtol=0.3 * math.sqrt(100 / p) + 0.05
        )
    np.testing.assert_allclose(errors[1600] / errors[100], 0.25, rtol=0.3)


def test_trace_of_a_diagonal_curvature_is_exact():
    # A linear model on one-hot inputs with squared error: G is diagonal, so
    # Rademacher probes estimate its trace and diagonal with zero variance.
    model = eqx.nn.Linear(
        4, 1, use_bias=False, dtype=jnp.float64, key=jax.random.key(0)
    )
    x = jnp.eye(4, dtype=jnp.float64) * jnp.arange(1.0, 5.0)[:, None]
    y = jnp.zeros((4, 1))
    problem = Problem(
        lambda m, x: jax.vmap(m)(x), model, (x, y), eqx_gn.MeanSquaredError(), "mse"
    )
    dense = dense_gn(problem)
    np.testing.assert_allclose(dense, np.diag(np.diag(dense)), atol=1e-14)
    est = eqx_gn.trace_estimate(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(0),
        num_probes=3,
    )
    np.testing.assert_allclose(flat(est.diagonal), np.diag(dense), rtol=1e-12)
    np.testing.assert_allclose(est.trace, np.trace(dense), rtol=1e-12)
    assert float(est.trace_stderr) < 1e-12


# -------------------------------------------------------------------------- SLQ
def test_spectral_density_integrates_to_one_and_its_moments_are_the_traces():
    problem = make_cnn_problem(4)
    dense = dense_gn(problem)
    n = dense.shape[0]
    probes = 200

    def slq(iterations):
        return eqx_gn.spectral_density(
            problem.fn,
            problem.model,
            problem.batch,
            loss=problem.loss,
            key=jax.random.key(7),
            num_probes=probes,
            num_iterations=iterations,
        )

    short, long = slq(2), slq(12)
    np.testing.assert_allclose(np.sum(short.weights, axis=1), 1, rtol=1e-12)
    # Gauss quadrature with m nodes is exact for degree <= 2m - 1: with the same
    # probes, 2 steps give the same first three moments as 12.
    for k in (0, 1, 2, 3):
        np.testing.assert_allclose(short.moment(k), long.moment(k), rtol=1e-9)
    assert not np.isclose(short.moment(6), long.moment(6), rtol=1e-3)
    # Against the exact traces, within 4 standard errors of the Rademacher probes.
    for k, power in ((1, dense), (2, dense @ dense)):
        off = power - np.diag(np.diag(power))
        se = math.sqrt(2 * np.sum(off**2) / probes) / n
        assert abs(float(long.moment(k)) - np.trace(power) / n) < 4 * se
    # The smoothed density integrates to 1 and keeps the mean.
    top_value = np.linalg.eigvalsh(dense)[-1]
    sigma = 0.01 * top_value
    grid = jnp.linspace(-10 * sigma, top_value + 10 * sigma, 20001)
    rho = np.asarray(long.density(grid, sigma))
    np.testing.assert_allclose(np.trapezoid(rho, grid), 1, rtol=1e-6)
    np.testing.assert_allclose(
        np.trapezoid(rho * grid, grid), long.moment(1), rtol=1e-6
    )


# --------------------------------------------------- the choice of curvature
@pytest.mark.parametrize(
    "loss_kind, weighted", [("ce", False), ("ce", True), ("mse", True)]
)
def test_empirical_fisher_is_the_mean_outer_product_of_per_position_gradients(
    loss_kind, weighted
):
    problem = make_mlp_problem(6, loss_kind, batch_size=5, weighted=weighted)
    grads = per_position_gradients(problem)
    weights = position_weights(problem)
    expected = grads.T @ (weights[:, None] * grads)
    actual = dense_operator(problem, curvature="empirical_fisher")
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
    assert not np.allclose(expected, dense_gn(problem), rtol=1e-2)


def test_empirical_fisher_of_a_transformer_per_token():
    problem = make_lm_problem(3)
    grads = per_position_gradients(problem)
    expected = grads.T @ grads / grads.shape[0]
    actual = dense_operator(problem, curvature="empirical_fisher")
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-12)


def test_the_exact_fisher_of_softmax_cross_entropy_is_the_gn_matrix():
    # E_{y ~ softmax(z_n)} of the outer products of per-position gradients, in
    # closed form (a sum over every class at every position), against G.
    problem = make_mlp_problem(8, "ce", batch_size=4, out_size=3)
    logits = np.asarray(problem.apply_params(problem.params))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    fisher = 0
    for c in range(3):
        grads = per_position_gradients(problem, labels=jnp.full((4,), c))
        fisher = fisher + grads.T @ (probs[:, c, None] / 4 * grads)
    np.testing.assert_allclose(fisher, dense_gn(problem), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
def test_monte_carlo_fisher_converges_to_the_gn_matrix(loss_kind):
    problem = make_mlp_problem(9, loss_kind, batch_size=4, out_size=3)
    gn = dense_gn(problem)
    errors = []
    for samples in (400, 102400):
        mc = dense_operator(
            problem,
            curvature="mc_fisher",
            key=jax.random.key(samples),
            fisher_samples=samples,
        )
        np.testing.assert_allclose(mc, mc.T, atol=1e-12)
        errors.append(np.linalg.norm(mc - gn) / np.linalg.norm(gn))
    # Unbiased with a variance falling as 1 / samples: 256x the samples, 1/16 the
    # error (measured over four keys: 1/14 to 1/5 for one draw).
    assert errors[1] < 0.01, errors
    assert errors[1] < 0.25 * errors[0], errors


def test_the_tools_take_a_fisher():
    problem = make_mlp_problem(6, "ce", batch_size=5)
    grads = per_position_gradients(problem)
    fisher = grads.T @ grads / grads.shape[0]
    pairs = eqx_gn.eigenpairs(
        problem.fn,
        problem.model,
        problem.batch,
        loss=problem.loss,
        key=jax.random.key(0),
        num_iterations=20,
        curvature="empirical_fisher",
    )
    # Rank 5 (one gradient per example): every Ritz value past it is zero.
    np.testing.assert_allclose(
        pairs.eigenvalues, top(np.linalg.eigvalsh(fisher), 5), rtol=1e-6
    )


# ----------------------------------------------------------------------- errors
def test_errors_are_one_line():
    problem = make_mlp_problem(0, "ce")
    args = (problem.fn, problem.model, problem.batch)
    with pytest.raises(
        ValueError, match="needs a SoftmaxCrossEntropy or MeanSquaredError"
    ):
        eqx_gn.curvature_operator(
            *args,
            loss=eqx_gn.AutodiffLoss(lambda z, y: jnp.mean(z**2)),
            curvature="empirical_fisher",
        )
    with pytest.raises(ValueError, match="needs a key"):
        eqx_gn.curvature_operator(*args, loss=problem.loss, curvature="mc_fisher")
    n = flat(problem.params).size
    with pytest.raises(ValueError, match=f"at most the number of parameters \\({n}\\)"):
        eqx_gn.eigenpairs(
            *args, loss=problem.loss, key=jax.random.key(0), num_iterations=n + 1
        )
    with pytest.raises(ValueError, match="num_probes must be an int >= 2"):
        eqx_gn.trace_estimate(
            *args, loss=problem.loss, key=jax.random.key(0), num_probes=1
        )
    with pytest.raises(ValueError, match="num_eigenvalues \\(6\\) must be at most"):
        eqx_gn.eigenpairs(
            *args,
            loss=problem.loss,
            key=jax.random.key(0),
            num_iterations=5,
            num_eigenvalues=6,
        )


# ----------------------------------------------------------------- multi-device
@pytest.mark.multidevice
@pytest.mark.parametrize("mode", ["jit", "shard_map"])
def test_the_tools_on_a_sharded_batch_give_the_single_device_values(mode):
    """8 simulated devices, the batch split over a ``data`` axis: under ``jit`` on a
    sharded batch (XLA's collectives) or in ``shard_map`` with ``axis_name``, every
    tool gives the single-device numbers (the MC Fisher under ``jit`` only: inside
    ``shard_map`` each shard draws its own labels)."""
    problem = make_mlp_problem(
        11, "ce", batch_size=16, in_size=3, out_size=4, width=5, weighted=True
    )
    blocks = eqx_gn.Blocks.from_layers(problem.model, lambda m: m.layers)
    key = jax.random.key(0)

    def tools(model, batch, axis_name=None):
        common = dict(loss=problem.loss, key=key, axis_name=axis_name)
        out = {
            "pairs": eqx_gn.eigenpairs(
                problem.fn, model, batch, num_iterations=12, **common
            ),
            "trace": eqx_gn.trace_estimate(
                problem.fn, model, batch, num_probes=8, blocks=blocks, **common
            ),
            "density": eqx_gn.spectral_density(
                problem.fn, model, batch, num_probes=3, num_iterations=6, **common
            ),
        }
        if axis_name is None:
            out["mc_fisher"] = eqx_gn.trace_estimate(
                problem.fn,
                model,
                batch,
                num_probes=4,
                curvature="mc_fisher",
                fisher_samples=3,
                **common,
            )
        return out

    single = tools(problem.model, problem.batch)
    mesh = eqx_gn.data_mesh(8)
    batch = eqx_gn.shard_batch(problem.batch, mesh)
    if mode == "jit":
        many = tools(eqx_gn.replicate(problem.model, mesh), batch)
    else:
        arrays, static = eqx.partition(problem.model, eqx.is_array)
        body = jax.shard_map(
            lambda arrays, batch: tools(eqx.combine(arrays, static), batch, "data"),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P(),
        )
        many = jax.jit(body)(arrays, batch)
        del single["mc_fisher"]
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
