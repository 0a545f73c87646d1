"""GN-vector products and the GN quadratic model against dense references.

The dense GN matrix is ``J^T H J`` with ``J = jax.jacfwd`` of the flattened outputs
and ``H = jax.hessian`` of an independent (optax / plain jnp) loss; the quadratic
model's value is checked against a second-order Taylor expansion built from nested
``jax.jvp``, and the linearized loss against ``L(z0 + J d)`` built from ``jax.jvp``.
"""

import inspect

import equinox as eqx
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import eqx_gn
from helpers import (
    LOSS_KINDS,
    SETTINGS,
    assert_trees_close,
    block_diagonal,
    dense_gn,
    filters_from_assignment,
    flat,
    make_problem,
    make_pytree_output_problem,
    param_paths,
    raises_invalid,
    random_assignment,
    random_like_params,
    ref_loss_value,
    seeds,
    subtree_spec,
    unravel_like_params,
)

losses = st.sampled_from(LOSS_KINDS)


@st.composite
def mlp_problems(draw):
    """A small random MLP problem with any of the losses, weighted or not.

    Widths, depths and batch sizes come from small sets so that examples share
    compilations now and then; the random draws are in the seed.
    """
    loss_kind = draw(losses)
    return make_problem(
        draw(seeds),
        "mlp",
        loss_kind,
        weighted=loss_kind != "autodiff" and draw(st.booleans()),
        batch_size=draw(st.sampled_from([1, 3])),
        width=draw(st.sampled_from([2, 5])),
        depth=draw(st.integers(1, 3)),
    )


# The tiny transformer compiles slowly, so it runs on a few fixed configurations
# (each loss, one or two heads, one or two blocks, a padding mask), and problems
# are shared between tests so that the dense references compile once.
TRANSFORMERS = {
    "ce": dict(num_heads=2, num_blocks=1, weighted=True),
    "mse": dict(num_heads=1, num_blocks=1, weighted=True),
    "autodiff": dict(num_heads=1, num_blocks=2),
}


def transformer_problem(loss_kind):
    return make_problem(7, "transformer", loss_kind, **TRANSFORMERS[loss_kind])


def _blocks_from_assignment(problem, assignment, as_callable=False):
    filters = filters_from_assignment(problem.model, assignment, as_callable)
    return eqx_gn.Blocks.from_filters(problem.model, filters)


def _random_partition(problem, seed, num_blocks, as_callable=False):
    rng = np.random.default_rng(seed)
    assignment = random_assignment(rng, len(param_paths(problem.model)), num_blocks)
    return assignment, _blocks_from_assignment(problem, assignment, as_callable)


def _layer_blocks(problem):
    if isinstance(problem.model, eqx.nn.MLP):
        return eqx_gn.Blocks.from_layers(problem.model, lambda m: m.layers)
    return eqx_gn.Blocks.from_layers(
        problem.model,
        lambda m: m.blocks,
        remainder={
            "embedding": subtree_spec(problem.model, lambda m: m.embedding),
            "head": subtree_spec(problem.model, lambda m: m.head),
        },
    )


def _gnvp(problem, v, blocks=None):
    return eqx_gn.gnvp(
        problem.fn, problem.model, problem.batch, v, loss=problem.loss, blocks=blocks
    )


def _dense_product(problem, v, leaf_block=None):
    dense = dense_gn(problem)
    if leaf_block is not None:
        dense = block_diagonal(dense, problem.model, leaf_block)
    return unravel_like_params(problem.model)(dense @ flat(v))


def _dot(x, y):
    return float(np.dot(flat(x), flat(y)))


def _check_symmetric_psd_linear(problem, blocks, seed, a=0.7, b=-1.3):
    """With G from gnvp: u.Gv = v.Gu, v.Gv >= 0, G(a u + b v) = a Gu + b Gv."""
    ku, kv = jax.random.split(jax.random.key(seed))
    u = random_like_params(ku, problem.model)
    v = random_like_params(kv, problem.model)
    gu, gv = _gnvp(problem, u, blocks), _gnvp(problem, v, blocks)
    combo = jax.tree.map(lambda x, y: a * x + b * y, u, v)
    scale = max(np.linalg.norm(flat(gu)), np.linalg.norm(flat(gv)), 1.0)
    tol = 1e-10 * scale * (np.linalg.norm(flat(u)) + np.linalg.norm(flat(v)))
    assert abs(_dot(u, gv) - _dot(v, gu)) <= tol
    assert _dot(u, gu) >= -tol
    assert _dot(v, gv) >= -tol
    expected = jax.tree.map(lambda x, y: a * x + b * y, gu, gv)
    assert_trees_close(_gnvp(problem, combo, blocks), expected, atol=1e-10 * scale)


# --------------------------------------------------------------- GN products
@hypothesis.settings(SETTINGS, max_examples=6)
@given(problem=mlp_problems(), seed=seeds)
def test_gnvp_matches_dense_mlp(problem, seed):
    v = random_like_params(jax.random.key(seed), problem.model)
    assert_trees_close(_gnvp(problem, v), _dense_product(problem, v))


@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_gnvp_matches_dense_transformer(loss_kind):
    problem = transformer_problem(loss_kind)
    v = random_like_params(jax.random.key(0), problem.model)
    assert_trees_close(_gnvp(problem, v), _dense_product(problem, v))
    _check_symmetric_psd_linear(problem, None, seed=1)


@SETTINGS
@given(
    problem=mlp_problems(),
    seed=seeds,
    num_blocks=st.integers(1, 4),
    as_callable=st.booleans(),
)
def test_block_diagonal_gnvp_matches_dense_mlp(problem, seed, num_blocks, as_callable):
    assignment, blocks = _random_partition(problem, seed, num_blocks, as_callable)
    v = random_like_params(jax.random.key(seed), problem.model)
    assert_trees_close(
        _gnvp(problem, v, blocks), _dense_product(problem, v, assignment)
    )


@pytest.mark.parametrize(
    ("arch", "loss_kind", "partition"),
    [
        ("mlp", "ce", "layers"),
        ("transformer", "ce", "layers"),
        ("transformer", "autodiff", "random"),
    ],
)
def test_block_diagonal_gnvp_matches_dense(arch, loss_kind, partition):
    if arch == "mlp":
        problem = make_problem(1, arch, loss_kind, depth=3, weighted=True)
    else:
        problem = transformer_problem(loss_kind)
    if partition == "layers":
        blocks = _layer_blocks(problem)
    else:
        _, blocks = _random_partition(problem, 5, 3, as_callable=True)
    assert blocks.num_blocks >= 3
    v = random_like_params(jax.random.key(2), problem.model)
    got = _gnvp(problem, v, blocks)
    assert_trees_close(got, _dense_product(problem, v, blocks.leaf_block))
    # Dropping the cross-block terms really changes the product here.
    assert not np.allclose(flat(_gnvp(problem, v)), flat(got))


@hypothesis.settings(SETTINGS, max_examples=6)
@given(problem=mlp_problems(), seed=seeds, num_blocks=st.integers(0, 3))
def test_curvature_along_a_vector_matches_dense(problem, seed, num_blocks):
    # v^T G v with the dense G (block-diagonal with blocks), full and any partition.
    assignment, blocks = (None, None)
    if num_blocks:
        assignment, blocks = _random_partition(problem, seed, num_blocks)
    v = random_like_params(jax.random.key(seed), problem.model)
    q = eqx_gn.quadratic_model(
        problem.fn, problem.model, problem.batch, loss=problem.loss, blocks=blocks
    )
    dense = dense_gn(problem)
    if assignment is not None:
        dense = block_diagonal(dense, problem.model, assignment)
    expected = flat(v) @ dense @ flat(v)
    got = eqx.filter_jit(lambda q, v: q.curvature(v))(q, v)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_one_block_equals_full():
    problem = transformer_problem("mse")
    v = random_like_params(jax.random.key(0), problem.model)
    blocks = eqx_gn.Blocks.from_filters(
        problem.model, [eqx.is_inexact_array], names=["one"]
    )
    assert_trees_close(_gnvp(problem, v, blocks), _gnvp(problem, v))


@SETTINGS
@given(
    problem=mlp_problems(),
    seed=seeds,
    num_blocks=st.integers(0, 3),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
)
def test_gn_is_symmetric_psd_and_linear(problem, seed, num_blocks, a, b):
    blocks = _random_partition(problem, seed, num_blocks)[1] if num_blocks else None
    _check_symmetric_psd_linear(problem, blocks, seed, a, b)


# ----------------------------------------------------------- quadratic model
@eqx.filter_jit
def _quadratic_model_quantities(fn, model, batch, loss, blocks, d, check_all):
    q = eqx_gn.quadratic_model(fn, model, batch, loss=loss, blocks=blocks)
    out = dict(
        loss_value=q.loss_value,
        value_and_grad=q.value_and_grad(d),
        gradient=q.gradient(),
        jvp=q.jvp(d),
        linearized=q.linearized_loss_value_and_grad(d),
    )
    if check_all:
        out.update(
            gnvp=q.gnvp(d),
            # The model's gradient, by autodiff of its own value.
            autodiff_grad=jax.grad(q.value)(d),
        )
    return out


def _mask_tree(tree, assignment, b):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef,
        [
            x if a == b else jnp.zeros_like(x)
            for x, a in zip(leaves, assignment, strict=True)
        ],
    )


@eqx.filter_jit
def _independent_quantities(fn, model, batch, loss_kind, assignment, d):
    """What ``_quadratic_model_quantities`` gives, from jax.jvp / jax.grad of the
    model and of the reference loss; ``assignment`` is leaf -> block, or None."""
    inputs, targets = batch
    params, static = eqx.partition(model, eqx.is_inexact_array)
    ref = lambda z: ref_loss_value(loss_kind)(z, targets)  # noqa: E731

    def apply(p):
        return fn(eqx.combine(p, static), inputs)

    def tangent(d):
        return jax.jvp(apply, (params,), (d,))

    def pieces(d):
        """d split by block: d_b, zero outside block b."""
        if assignment is None:
            return [d]
        return [_mask_tree(d, assignment, b) for b in range(max(assignment) + 1)]

    def second_derivative(u):
        """d2L[u, u] at z0, by nested jax.jvp."""
        first = lambda z: jax.jvp(ref, (z,), (u,))[1]  # noqa: E731
        return jax.jvp(first, (z0,), (u,))[1]

    z0, jd = tangent(d)
    first_order = jax.jvp(ref, (z0,), (jd,))[1]
    second_order = sum(second_derivative(tangent(p)[1]) for p in pieces(d))
    taylor = ref(z0) + first_order + 0.5 * second_order

    def linearized(d):
        """L(z0) + sum over blocks of [L(z0 + J_b d_b) - L(z0)]."""
        moved = [jax.tree.map(jnp.add, z0, tangent(p)[1]) for p in pieces(d)]
        changes = [ref(z) - ref(z0) for z in moved]
        return ref(z0) + sum(changes)

    return dict(
        loss_value=ref(z0),
        taylor=taylor,
        gradient=jax.grad(lambda p: ref(apply(p)))(params),
        jvp=jd,
        linearized=jax.value_and_grad(linearized)(d),
    )


def _check_quadratic_model(problem, blocks, d, check_all=True):
    assignment = None if blocks is None else blocks.leaf_block
    ours = _quadratic_model_quantities(
        problem.fn, problem.model, problem.batch, problem.loss, blocks, d, check_all
    )
    ref = _independent_quantities(
        problem.fn, problem.model, problem.batch, problem.loss_kind, assignment, d
    )
    unravel = unravel_like_params(problem.model)
    dense = dense_gn(problem)
    if assignment is not None:
        dense = block_diagonal(dense, problem.model, assignment)

    assert_trees_close(ours["loss_value"], ref["loss_value"])
    assert_trees_close(ours["gradient"], ref["gradient"])
    assert_trees_close(ours["jvp"], ref["jvp"])
    value, grad = ours["value_and_grad"]
    # q(d): the second-order Taylor expansion of the loss of the linearized model.
    assert_trees_close(value, ref["taylor"])
    # grad q(d) = g + G d, with G dense (block-diagonal with blocks).
    assert_trees_close(grad, unravel(flat(ref["gradient"]) + dense @ flat(d)))
    # The prox-linear model: L(z0 + J d) and its gradient.
    assert_trees_close(ours["linearized"], ref["linearized"])
    if check_all:
        assert_trees_close(ours["gnvp"], unravel(dense @ flat(d)))
        assert_trees_close(ours["autodiff_grad"], grad)


@hypothesis.settings(SETTINGS, max_examples=6)
@given(problem=mlp_problems(), seed=seeds, num_blocks=st.integers(0, 3))
def test_quadratic_model_matches_independent_references_mlp(problem, seed, num_blocks):
    blocks = _random_partition(problem, seed, num_blocks)[1] if num_blocks else None
    d = random_like_params(jax.random.key(seed), problem.model)
    _check_quadratic_model(problem, blocks, d)


@pytest.mark.parametrize(("loss_kind", "layerwise"), [("ce", True), ("mse", False)])
def test_quadratic_model_matches_independent_references_transformer(
    loss_kind, layerwise
):
    problem = transformer_problem(loss_kind)
    blocks = _layer_blocks(problem) if layerwise else None
    d = random_like_params(jax.random.key(3), problem.model)
    _check_quadratic_model(problem, blocks, d, check_all=False)


def test_pytree_outputs():
    """Outputs may be any PyTree (here a dict), with an AutodiffLoss on it."""
    problem = make_pytree_output_problem(0)
    _, blocks = _random_partition(problem, 0, 2)
    v = random_like_params(jax.random.key(1), problem.model)
    assert_trees_close(_gnvp(problem, v), _dense_product(problem, v))
    _check_quadratic_model(problem, blocks, v)


@eqx.filter_jit
def _along_a_ray(fn, model, batch, loss, d, t):
    q = eqx_gn.quadratic_model(fn, model, batch, loss=loss)
    small = jax.tree.map(lambda x: t * x, d)
    zero = jax.tree.map(jnp.zeros_like, d)
    return dict(
        loss=q.loss_value,
        q0=q.value_and_grad(zero),
        g=q.gradient(),
        l0=q.linearized_loss_value_and_grad(zero),
        qt=q.value(small),
        grad_qt=q.grad(small),
        value_and_grad_qt=q.value_and_grad(small),
        lt=q.linearized_loss_value_and_grad(small)[0],
    )


@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_models_agree_at_and_near_zero(loss_kind):
    """q(0) = L, grad q(0) = g, and q(t d) = L(z0 + J t d) + O(t^3); value and
    grad agree with value_and_grad."""
    problem = make_problem(4, "mlp", loss_kind)
    d = random_like_params(jax.random.key(1), problem.model)
    errors = []
    for t in (1e-2, 5e-3):
        out = _along_a_ray(
            problem.fn, problem.model, problem.batch, problem.loss, d, jnp.asarray(t)
        )
        assert_trees_close(out["q0"], (out["loss"], out["g"]))
        assert_trees_close(out["l0"], (out["loss"], out["g"]))
        assert_trees_close(out["value_and_grad_qt"], (out["qt"], out["grad_qt"]))
        errors.append(abs(float(out["qt"] - out["lt"])))
    if loss_kind == "mse":  # L is quadratic: the two models coincide.
        assert max(errors) < 1e-12
    else:  # Halving t divides a third-order error by about 8.
        assert 0 < errors[1] < errors[0] / 5


# ------------------------------------------------------------------- errors
def _quadratic(problem):
    return eqx_gn.quadratic_model(
        problem.fn, problem.model, problem.batch, loss=problem.loss
    )


@pytest.fixture(scope="module")
def mlp_problem():
    return make_problem(0, "mlp", "mse", depth=2)


def _bad_tangents(problem):
    good = random_like_params(jax.random.key(0), problem.model)
    w0 = good.layers[0].weight
    wrong_shape = eqx.tree_at(lambda t: t.layers[0].weight, good, w0[:, :-1])
    wrong_dtype = eqx.tree_at(
        lambda t: t.layers[1].bias, good, good.layers[1].bias.astype(jnp.float32)
    )
    missing = eqx.tree_at(lambda t: t.layers[2].bias, good, None)
    as_list = list(jax.tree.leaves(good))
    other_model = random_like_params(
        jax.random.key(0), make_problem(0, "mlp", "mse", depth=3).model
    )
    return [
        (wrong_shape, r"leaf \.layers\[0\]\.weight has shape"),
        (wrong_dtype, r"leaf \.layers\[1\]\.bias .* dtype float32"),
        (missing, r"missing leaves \['\.layers\[2\]\.bias'\]"),
        (as_list, "must have the structure"),
        (other_model, r"unexpected leaves \['\.layers\[3\]\.weight'"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mismatched_tangents_name_the_leaf(mlp_problem, case):
    tangent, match = _bad_tangents(mlp_problem)[case]
    q = _quadratic(mlp_problem)
    for method in (
        q.gnvp,
        q.value_and_grad,
        q.value,
        q.jvp,
        q.linearized_loss_value_and_grad,
    ):
        with pytest.raises(ValueError, match=match):
            method(tangent)
    with pytest.raises(ValueError, match=match):
        eqx_gn.gnvp(
            mlp_problem.fn,
            mlp_problem.model,
            mlp_problem.batch,
            tangent,
            loss=mlp_problem.loss,
        )


@pytest.mark.parametrize(
    "batch",
    [
        "not_a_tuple",
        "list",
        "triple",
    ],
)
def test_batch_must_be_a_pair(mlp_problem, batch):
    x, y = mlp_problem.batch
    bad = {"not_a_tuple": x, "list": [x, y], "triple": (x, y, y)}[batch]
    match = "batch must be a pair"
    p = mlp_problem
    with raises_invalid(match, annotated=True):
        eqx_gn.quadratic_model(p.fn, p.model, bad, loss=p.loss)
    with pytest.raises(ValueError, match=match):
        inspect.unwrap(eqx_gn.quadratic_model)(p.fn, p.model, bad, loss=p.loss)
    with raises_invalid(match, annotated=True):
        v = random_like_params(jax.random.key(0), p.model)
        eqx_gn.gnvp(p.fn, p.model, bad, v, loss=p.loss)


def test_block_ordering_leaves_the_tangents_exactly_as_they_are():
    # The dependency that orders the blocks adds an exact zero, NaNs included.
    from eqx_gn._gnvp import _after

    x = jnp.asarray([1.5, -2.0, 3.0])
    y = jnp.asarray([0.25])
    for done in (
        (jnp.asarray(1.0), [jnp.ones(4), jnp.asarray([2.0])]),
        (jnp.asarray(jnp.nan), [jnp.ones(4)]),
        (jnp.asarray(1.0), [jnp.asarray([jnp.inf, -jnp.inf]), jnp.ones(7)]),
    ):
        got = jax.jit(_after)([x, y], done)
        np.testing.assert_array_equal(got[0], x)
        np.testing.assert_array_equal(got[1], y)
