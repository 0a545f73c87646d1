"""Losses: value, gradient and output-space HVP against independent references."""

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
    SETTINGS,
    assert_trees_close,
    raises_invalid,
    ref_mean_squared_error,
    ref_softmax_cross_entropy,
    seeds,
)

positions_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)
weight_kinds = st.sampled_from(["none", "float", "bool"])


def _random_weights(key, kind, positions):
    if kind == "none":
        return None
    if kind == "float":
        return jax.random.uniform(key, positions, jnp.float64, 0.0, 2.0)
    mask = jax.random.bernoulli(key, 0.6, positions)
    return mask.at[(0,) * len(positions)].set(True)


def _hessian_times(value_fn, outputs, tangent):
    """``jax.hessian`` of ``value_fn`` at ``outputs``, contracted with ``tangent``."""
    hess = jax.hessian(value_fn)(outputs)
    axes = tuple(range(outputs.ndim))
    return jnp.tensordot(
        hess, tangent, axes=(tuple(a + outputs.ndim for a in axes), axes)
    )


@eqx.filter_jit
def _ours_and_reference(loss, ref_fn, outputs, targets, tangent):
    """(value, grad, hvp) of ``loss``, and the same from ``ref_fn(outputs, targets)``
    by ``jax.grad`` and ``jax.hessian``."""
    ours = (
        loss.value(outputs, targets),
        loss.grad(outputs, targets),
        loss.hvp(outputs, targets, tangent),
    )
    ref = lambda z: ref_fn(z, targets)  # noqa: E731
    reference = (
        ref(outputs),
        jax.grad(ref)(outputs),
        _hessian_times(ref, outputs, tangent),
    )
    return ours, reference


def _ref_ce(outputs, targets):
    if isinstance(targets, tuple):
        return ref_softmax_cross_entropy(outputs, *targets)
    return ref_softmax_cross_entropy(outputs, targets)


def _ref_mse(feature_ndim):
    def ref(outputs, targets):
        if isinstance(targets, tuple):
            return ref_mean_squared_error(outputs, *targets, feature_ndim=feature_ndim)
        return ref_mean_squared_error(outputs, targets, feature_ndim=feature_ndim)

    return ref


_REF_MSE = {n: _ref_mse(n) for n in range(3)}


@hypothesis.settings(SETTINGS, max_examples=6)
@given(
    seed=seeds, positions=positions_shapes, classes=st.integers(2, 6), kind=weight_kinds
)
def test_softmax_cross_entropy_matches_optax(seed, positions, classes, kind):
    kz, ky, kw, ku = jax.random.split(jax.random.key(seed), 4)
    logits = 3 * jax.random.normal(kz, (*positions, classes), jnp.float64)
    labels = jax.random.randint(ky, positions, 0, classes)
    weights = _random_weights(kw, kind, positions)
    tangent = jax.random.normal(ku, logits.shape, jnp.float64)
    targets = labels if weights is None else (labels, weights)
    ours, reference = _ours_and_reference(
        eqx_gn.SoftmaxCrossEntropy(), _ref_ce, logits, targets, tangent
    )
    assert_trees_close(ours, reference)


@hypothesis.settings(SETTINGS, max_examples=6)
@given(
    seed=seeds,
    positions=positions_shapes,
    features=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    kind=weight_kinds,
)
def test_mean_squared_error_matches_reference(seed, positions, features, kind):
    kz, ky, kw, ku = jax.random.split(jax.random.key(seed), 4)
    shape = positions + features
    outputs = jax.random.normal(kz, shape, jnp.float64)
    y = jax.random.normal(ky, shape, jnp.float64)
    weights = _random_weights(kw, kind, positions)
    tangent = jax.random.normal(ku, shape, jnp.float64)
    targets = y if weights is None else (y, weights)
    feature_ndim = len(features)
    ours, reference = _ours_and_reference(
        eqx_gn.MeanSquaredError(feature_ndim=feature_ndim),
        _REF_MSE[feature_ndim],
        outputs,
        targets,
        tangent,
    )
    assert_trees_close(ours, reference)


def test_mean_squared_error_by_hand():
    outputs = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    targets = jnp.array([[0.0, 0.0], [0.0, 1.0]])
    loss = eqx_gn.MeanSquaredError()
    # Per position: 0.5 * (1 + 4) = 2.5 and 0.5 * 4 = 2; the mean is 2.25.
    assert loss.value(outputs, targets) == pytest.approx(2.25)
    np.testing.assert_allclose(loss.grad(outputs, targets), (outputs - targets) / 2)
    assert_trees_close(loss.hvp(outputs, targets, targets), targets / 2)


def test_softmax_cross_entropy_by_hand():
    # Uniform logits over 4 classes: the loss is log 4 whatever the label.
    logits = jnp.zeros((3, 4))
    labels = jnp.array([0, 3, 1])
    loss = eqx_gn.SoftmaxCrossEntropy()
    assert loss.value(logits, labels) == pytest.approx(np.log(4.0))
    expected = (jnp.full((3, 4), 0.25) - jax.nn.one_hot(labels, 4)) / 3
    assert_trees_close(loss.grad(logits, labels), expected)


# ------------------------------------------------------------ weights and masks
@eqx.filter_jit
def _value_grad_hvp(loss, outputs, targets, tangent):
    return (
        loss.value(outputs, targets),
        loss.grad(outputs, targets),
        loss.hvp(outputs, targets, tangent),
    )


def _pad_problem(seed, loss_name):
    """Outputs, targets and a padding mask (bool, ``(batch, seq)``)."""
    kz, ky, km = jax.random.split(jax.random.key(seed), 3)
    positions, classes = (3, 5), 4
    outputs = jax.random.normal(kz, (*positions, classes), jnp.float64)
    if loss_name == "ce":
        loss = eqx_gn.SoftmaxCrossEntropy()
        y = jax.random.randint(ky, positions, 0, classes)
    else:
        loss = eqx_gn.MeanSquaredError()
        y = jax.random.normal(ky, outputs.shape, jnp.float64)
    mask = jax.random.bernoulli(km, 0.6, positions).at[0, 0].set(True)
    mask = mask.at[0, -1].set(False)
    return loss, outputs, y, mask


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_padding_positions_do_not_change_value_or_grad(loss_name, seed):
    loss, outputs, y, mask = _pad_problem(seed, loss_name)
    pad = ~mask
    # Anything at padding positions: other outputs, other targets (for
    # cross-entropy even labels out of range, which must not raise there).
    garbage_z = jnp.where(pad[..., None], 100.0, outputs)
    if loss_name == "ce":
        garbage_y = jnp.where(pad, -7, y)
    else:
        garbage_y = jnp.where(pad[..., None], -50.0, y)
    tangent = jax.random.normal(jax.random.key(seed + 10), outputs.shape)
    for weights in (mask, mask.astype(jnp.float64)):
        value_a, grad_a, hvp_a = _value_grad_hvp(loss, outputs, (y, weights), tangent)
        value_b, grad_b, hvp_b = _value_grad_hvp(
            loss, garbage_z, (garbage_y, weights), tangent
        )
        assert_trees_close(value_a, value_b)
        assert_trees_close(grad_a[mask], grad_b[mask])
        assert_trees_close(hvp_a[mask], hvp_b[mask])
        for padded in (grad_a, grad_b, hvp_a, hvp_b):
            assert not np.any(padded[pad])


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equals_dropping_positions(loss_name, seed):
    loss, outputs, y, mask = _pad_problem(seed, loss_name)
    tangent = jax.random.normal(jax.random.key(seed + 10), outputs.shape)
    value, grad, hvp = _value_grad_hvp(loss, outputs, (y, mask), tangent)
    kept = _value_grad_hvp(loss, outputs[mask], y[mask], tangent[mask])
    assert_trees_close((value, grad[mask], hvp[mask]), kept)


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_weights_are_relative(loss_name):
    """A weight of 2 counts a position twice; scaling every weight changes nothing."""
    loss, outputs, y, _ = _pad_problem(3, loss_name)
    weights = jnp.ones(y.shape[:2]).at[1, 2].set(2.0)
    # Duplicate position (1, 2) as an extra row of positions.
    dup_z = jnp.concatenate(
        [outputs.reshape(-1, outputs.shape[-1]), outputs[1, 2][None]]
    )
    tail = y[1, 2][None]
    dup_y = jnp.concatenate([y.reshape(-1, *y.shape[2:]), tail])
    assert_trees_close(loss.value(outputs, (y, weights)), loss.value(dup_z, dup_y))
    assert_trees_close(
        loss.value(outputs, (y, weights)), loss.value(outputs, (y, 3.0 * weights))
    )


# -------------------------------------------------------------- AutodiffLoss
def _ce_fn(outputs, targets):
    return ref_softmax_cross_entropy(outputs, *targets)


def _mse_fn(outputs, targets):
    return ref_mean_squared_error(outputs, *targets)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_autodiff_loss_equals_builtin(loss_name, weighted):
    kz, ky, kw, ku = jax.random.split(jax.random.key(5), 4)
    positions, classes = (2, 3), 4
    outputs = jax.random.normal(kz, (*positions, classes), jnp.float64)
    weights = (
        jax.random.uniform(kw, positions, jnp.float64, 0.1, 1.0)
        if weighted
        else jnp.ones(positions)
    )
    if loss_name == "ce":
        builtin, fn = eqx_gn.SoftmaxCrossEntropy(), _ce_fn
        y = jax.random.randint(ky, positions, 0, classes)
    else:
        builtin, fn = eqx_gn.MeanSquaredError(), _mse_fn
        y = jax.random.normal(ky, outputs.shape, jnp.float64)
    targets = (y, weights)
    auto = eqx_gn.AutodiffLoss(fn)
    tangent = jax.random.normal(ku, outputs.shape, jnp.float64)
    builtin_targets = targets if weighted else y
    assert_trees_close(
        _value_grad_hvp(auto, outputs, targets, tangent),
        _value_grad_hvp(builtin, outputs, builtin_targets, tangent),
    )


def test_autodiff_loss_on_pytree_outputs():
    """Outputs may be any PyTree; grad and hvp have its structure."""

    def fn(outputs, targets):
        return jnp.mean((outputs["a"] - targets) ** 2) + jnp.mean(outputs["b"] ** 4)

    outputs = {"a": jnp.arange(3.0), "b": jnp.array([1.0, -2.0])}
    targets = jnp.ones(3)
    loss = eqx_gn.AutodiffLoss(fn)
    tangent = {"a": jnp.array([1.0, 0.0, 2.0]), "b": jnp.array([0.5, 1.0])}
    assert_trees_close(loss.grad(outputs, targets), jax.grad(fn)(outputs, targets))
    expected = {
        "a": 2 * tangent["a"] / 3,
        "b": 12 * outputs["b"] ** 2 * tangent["b"] / 2,
    }
    assert_trees_close(loss.hvp(outputs, targets, tangent), expected)


# -------------------------------------------------------------------- errors
def _unchecked(loss, method):
    """``loss.method`` without the runtime type check the jaxtyping hook adds."""
    return lambda *args: inspect.unwrap(getattr(type(loss), method))(loss, *args)


z34 = jnp.zeros((3, 4))
labels3 = jnp.array([0, 1, 2])
ce = eqx_gn.SoftmaxCrossEntropy()
mse = eqx_gn.MeanSquaredError()

INVALID = [
    # (loss, outputs, targets, match, violates the annotations)
    (ce, z34, jnp.array([0, 1]), "labels have shape", False),
    (ce, z34, jnp.zeros((3, 1), int), "labels have shape", False),
    (
        ce,
        z34,
        jnp.array([0.0, 1.0, 2.0]),
        "targets must be integer class labels",
        False,
    ),
    (ce, z34, jnp.eye(3, 4), r"integer class labels.*one-hot targets\?", False),
    (ce, jnp.zeros(3), labels3, "either fn's outputs lack the class axis", False),
    (ce, z34, (labels3, jnp.ones(2)), r"weights have shape \(2,\)", False),
    (ce, z34, (labels3, jnp.ones((3, 1))), "weights have shape", False),
    (ce, z34, (labels3, jnp.ones(3, int)), "weights must be floats or bools", False),
    (ce, z34, (labels3, jnp.ones(3), jnp.ones(3)), "tuple of length 3", True),
    (ce, jnp.zeros(()), jnp.zeros((), int), "must have a class axis", True),
    (mse, z34, jnp.zeros((3, 5)), "targets have shape", False),
    (mse, z34, jnp.zeros(3), "targets have shape", False),
    (mse, z34, (jnp.zeros((3, 4)), jnp.ones(4)), "weights have shape", False),
    (mse, z34, (jnp.zeros((3, 4)), jnp.ones((3, 4))), "weights have shape", False),
    (eqx_gn.MeanSquaredError(feature_ndim=3), z34, z34, "fewer than", False),
]


@pytest.mark.parametrize("method", ["value", "grad", "hvp"])
@pytest.mark.parametrize(("loss", "outputs", "targets", "match", "annotated"), INVALID)
def test_invalid_targets_raise(loss, outputs, targets, match, annotated, method):
    args = (outputs, targets) + ((outputs,) if method == "hvp" else ())
    with raises_invalid(match, annotated=annotated):
        getattr(loss, method)(*args)
    # The library's own check, whether or not the annotations caught it first.
    with pytest.raises(ValueError, match=match):
        _unchecked(loss, method)(*args)


def test_negative_feature_ndim_raises():
    with pytest.raises(ValueError, match="feature_ndim must be >= 0"):
        eqx_gn.MeanSquaredError(feature_ndim=-1)


def test_autodiff_loss_must_return_a_scalar():
    loss = eqx_gn.AutodiffLoss(lambda z, y: (z - y) ** 2)
    with pytest.raises(ValueError, match="must return a scalar"):
        loss.value(jnp.zeros(3), jnp.zeros(3))


@pytest.mark.parametrize("bad_label", [4, -1])
@pytest.mark.parametrize("how", ["eager", "filter_jit", "jit"])
@pytest.mark.parametrize("method", ["value", "grad", "hvp"])
def test_out_of_range_label_raises(bad_label, how, method):
    """``eqx.error_if``: an ``EquinoxRuntimeError`` eagerly and under
    ``eqx.filter_jit``, a ``JaxRuntimeError`` under plain ``jax.jit``; both are
    ``RuntimeError``s whose message names the range."""
    labels = labels3.at[1].set(bad_label)

    def call(z, y):
        args = (z, y) + ((z,) if method == "hvp" else ())
        return getattr(ce, method)(*args)

    if how == "filter_jit":
        call = eqx.filter_jit(call)
    elif how == "jit":
        call = jax.jit(call)
    expected = RuntimeError if how == "jit" else eqx.EquinoxRuntimeError
    with pytest.raises(expected, match=r"outside \[0, 4\)"):
        jax.block_until_ready(call(z34, labels))
    # The same label with zero weight is padding, and fine.
    weights = jnp.ones(3).at[1].set(0.0)
    jax.block_until_ready(call(z34, (labels, weights)))


@pytest.mark.parametrize("method", ["value", "grad", "hvp"])
def test_unchecked_labels_leave_no_host_callback_in_the_program(method):
    # The check is an eqx.error_if: a host callback in the lowered program, which
    # keeps the program out of JAX's persistent compilation cache. Without it the
    # program has none, and computes the same on labels in range.
    def lowered(loss):
        def call(z, y):
            return getattr(loss, method)(*((z, y) + ((z,) if method == "hvp" else ())))

        return jax.jit(call).lower(z34, labels3).as_text(), call(z34, labels3)

    checked, expected = lowered(ce)
    unchecked, got = lowered(eqx_gn.SoftmaxCrossEntropy(check_labels=False))
    assert "callback" in checked
    assert "callback" not in unchecked
    np.testing.assert_array_equal(got, expected)
    # Unchecked, an out-of-range label raises nothing.
    unchecked_loss = eqx_gn.SoftmaxCrossEntropy(check_labels=False)
    jax.block_until_ready(unchecked_loss.value(z34, labels3.at[1].set(4)))


@pytest.mark.parametrize(
    "loss, targets",
    [
        (ce, labels3),
        (eqx_gn.MeanSquaredError(), jnp.ones((3, 4))),
        (eqx_gn.AutodiffLoss(lambda z, y: jnp.mean((z - y) ** 4)), jnp.ones((3, 4))),
    ],
    ids=["ce", "mse", "autodiff"],
)
def test_curvature_is_grad_and_hvp(loss, targets):
    u = jnp.cos(jnp.arange(12.0)).reshape(3, 4)
    z = jnp.sin(jnp.arange(12.0)).reshape(3, 4)
    grad, hvp = loss.curvature(z, targets)
    np.testing.assert_allclose(grad, loss.grad(z, targets), rtol=1e-12)
    np.testing.assert_allclose(hvp(u), loss.hvp(z, targets, u), rtol=1e-12)
    np.testing.assert_allclose(hvp(2 * u), 2 * hvp(u), rtol=1e-12)


def test_mse_keeps_the_outputs_dtype_with_float64_targets():
    z = jnp.ones((3, 2), jnp.float32)
    y = np.zeros((3, 2))  # numpy float64
    loss = eqx_gn.MeanSquaredError()
    assert loss.grad(z, y).dtype == jnp.float32
    assert loss.hvp(z, y, z).dtype == jnp.float32
