"""Wrong inputs to every public entry point give a one-line error that says what is
wrong (the leaf, its shape, the expected layout), never a deep JAX traceback.

Each case is an input that passes the type annotations (so beartype lets it
through) and, without eqx_gn's own check, fails somewhere inside JAX with a
message that does not name the user's leaf (or, for the tangent of
``MeanSquaredError.hvp``, silently broadcasts to a wrong answer).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_gn


def apply(model, x):
    return jax.vmap(model)(x)


def one_line(info, *needles):
    """The error is one line and mentions every needle."""
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture
def setup(getkey):
    model = eqx.nn.MLP(3, 4, 8, 1, key=getkey(), dtype=jnp.float64)
    x = jax.random.normal(getkey(), (2, 16, 3))
    y = jax.random.randint(getkey(), (2, 16), 0, 4)
    return model, (x, y), eqx_gn.SoftmaxCrossEntropy()


NO_AXIS = ("of shape (3,)", "leading axis of K micro-batches", "(K, B, ...)")


# ------------------------------------------------------- stacked micro-batches
def test_step_names_a_batch_without_the_micro_batch_axis(setup):
    model, (x, y), loss = setup
    gn = eqx_gn.GaussNewton(apply, loss)
    with pytest.raises(ValueError) as info:
        gn.step(model, gn.init(model), (x[0], y[0]), (x, y))
    one_line(info, "batches", *NO_AXIS)
    with pytest.raises(ValueError) as info:
        gn.solve(model, gn.init(model), (x[0], y[0]))
    one_line(info, "batches", *NO_AXIS)


def test_line_search_objective_names_a_batch_without_the_micro_batch_axis(setup):
    model, (x, y), loss = setup
    gn = eqx_gn.GaussNewton(apply, loss)
    direction = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    with pytest.raises(ValueError) as info:
        gn.line_search_objective(model, direction, (x[0], y[0]))
    one_line(info, "line_search_batches", *NO_AXIS)


def test_mean_loss_names_a_batch_without_the_micro_batch_axis(setup):
    model, (x, y), loss = setup
    with pytest.raises(ValueError) as info:
        eqx_gn.mean_loss(apply, loss, model, (x[0], y[0]))
    one_line(info, "batches", *NO_AXIS)


@pytest.mark.parametrize(
    "solver",
    [eqx_gn.InnerOptimizer(), eqx_gn.ProxLinear(), eqx_gn.CG()],
    ids=["inner", "prox", "cg"],
)
def test_each_solver_names_a_batch_without_the_micro_batch_axis(setup, solver):
    model, (x, y), loss = setup
    problem = eqx_gn.GNProblem(apply, loss, None, None)
    with pytest.raises(ValueError) as info:
        solver.solve(problem, model, (x[0], y[0]), solver.init(model), jnp.asarray(0))
    one_line(info, "batches", *NO_AXIS)


def test_step_names_targets_that_do_not_fit_the_outputs(setup):
    model, (x, y), loss = setup
    gn = eqx_gn.GaussNewton(apply, loss)
    with pytest.raises(ValueError) as info:
        gn.step(model, gn.init(model), (x, y[:, :, None]), (x, y))
    one_line(info, "the loss does not fit", "(16, 4)", "(16, 1)")


@pytest.mark.parametrize(
    "targets, needles",
    [
        ("float", ("targets must be integer class labels", "float64")),
        ("one-hot", ("integer class labels", "one-hot targets?", "jnp.argmax")),
    ],
)
def test_step_names_float_or_one_hot_targets(setup, targets, needles):
    model, (x, y), loss = setup
    bad = y.astype(jnp.float64) if targets == "float" else jax.nn.one_hot(y, 4)
    gn = eqx_gn.GaussNewton(apply, loss)
    with pytest.raises(ValueError) as info:
        gn.step(model, gn.init(model), (x, bad), (x, y))
    one_line(info, "the loss does not fit", *needles)


def test_step_names_outputs_without_a_class_axis(setup):
    model, (x, y), loss = setup
    gn = eqx_gn.GaussNewton(lambda m, x: apply(m, x)[:, 0], loss)  # (B,) outputs
    with pytest.raises(ValueError) as info:
        gn.step(model, gn.init(model), (x, y), (x, y))
    one_line(info, "the labels have the outputs' shape (16,)", "lack the class axis")


@pytest.mark.parametrize("tangent", ["int32", "model"])
def test_gnvp_names_a_tangent_that_is_not_float_parameters(setup, tangent):
    # Caught by the type check at the boundary: one line naming the argument and
    # the first leaf that is not a float array, not the model printed twice.
    model, (x, y), loss = setup
    params = eqx.filter(model, eqx.is_inexact_array)
    v = (
        jax.tree.map(lambda p: jnp.ones(p.shape, jnp.int32), params)
        if tangent == "int32"
        else model
    )
    with pytest.raises(TypeError) as info:
        eqx_gn.gnvp(apply, model, (x[0], y[0]), v, loss=loss)
    leaf = ".layers[0].weight is int32[8, 3]" if tangent == "int32" else ".activation"
    one_line(info, "gnvp: tangent must be PyTree[Float[Array", leaf)
    assert len(str(info.value)) < 300


# ----------------------------------------------------------- GaussNewton parts
def test_init_names_blocks_of_another_model(setup, getkey):
    model, _, loss = setup
    other = eqx.nn.MLP(3, 4, 8, 2, key=getkey())
    gn = eqx_gn.GaussNewton(
        apply, loss, blocks=eqx_gn.Blocks.from_layers(other, lambda m: m.layers)
    )
    with pytest.raises(ValueError) as info:
        gn.init(model)
    one_line(info, "another structure", ".layers[2]")


def test_accept_names_a_direction_of_the_wrong_shape(setup):
    model, batches, loss = setup
    gn = eqx_gn.GaussNewton(apply, loss)
    state = gn.init(model)
    solution = gn.solve(model, state, batches)
    phi = gn.line_search_objective(model, solution.direction, batches)
    step_size, ls_stats = gn.search(phi, solution.stats.model_end.dtype)
    bad = eqx.tree_at(lambda s: s.direction.layers[0].bias, solution, jnp.zeros(3))
    with pytest.raises(ValueError) as info:
        gn.accept(model, state, bad, step_size, ls_stats)
    one_line(info, "direction leaf .layers[0].bias", "(3,)", "(8,)")


def test_search_names_a_non_scalar_objective(setup):
    _, _, loss = setup
    gn = eqx_gn.GaussNewton(apply, loss)
    with pytest.raises(ValueError) as info:
        gn.search(lambda s: s * jnp.ones(3), jnp.float64)
    one_line(info, "GaussNewton.search", "scalar", "(3,)")


@pytest.mark.parametrize(
    "search",
    [
        eqx_gn.GridLineSearch(),
        eqx_gn.GridLineSearch(stop_on_increase=True),
        eqx_gn.BacktrackingArmijo(),
    ],
    ids=["grid", "walk", "armijo"],
)
def test_each_line_search_names_a_non_scalar_phi(search):
    def phi(s):  # a per-example loss, not averaged
        return (s - 0.5) ** 2 * jnp.ones(3)

    with pytest.raises(ValueError) as info:
        search.search(phi, jnp.asarray(1.0), jnp.asarray(-1.0))
    one_line(info, type(search).__name__, "scalar", "(3,)")


# --------------------------------------------------------- products and models
def test_gnvp_names_a_tangent_leaf_of_the_wrong_shape(setup):
    model, (x, y), loss = setup
    params = eqx.filter(model, eqx.is_inexact_array)
    tangent = jax.tree.map(jnp.ones_like, params)
    tangent = eqx.tree_at(lambda t: t.layers[1].weight, tangent, jnp.ones((4, 9)))
    with pytest.raises(ValueError) as info:
        eqx_gn.gnvp(apply, model, (x[0], y[0]), tangent, loss=loss)
    one_line(info, "tangent leaf .layers[1].weight", "(4, 9)", "(4, 8)")


def test_quadratic_model_names_a_stacked_batch(setup):
    model, (x, y), loss = setup
    with pytest.raises(ValueError) as info:
        eqx_gn.quadratic_model(apply, model, (x, y), loss=loss)
    one_line(info, "quadratic_model", "inputs of shape (2, 16, 3)", "one batch")


# ---------------------------------------------------------------------- Blocks
def test_from_filters_names_a_spec_that_is_not_a_prefix(setup):
    model, _, _ = setup
    with pytest.raises(ValueError) as info:
        eqx_gn.Blocks.from_filters(model, [{"layers": True}])
    one_line(info, "filter spec is not a prefix of the model", "dict")


def test_from_layers_names_a_layer_outside_the_model(setup):
    model, _, _ = setup
    with pytest.raises(ValueError) as info:
        eqx_gn.Blocks.from_layers(model, lambda m: [m.layers[0], jnp.ones(3)])
    one_line(info, "layers(model)[1]", "not a part of the model")


def test_full_names_a_model_without_parameters():
    with pytest.raises(ValueError) as info:
        eqx_gn.Blocks.full({"step": jnp.asarray(3)})
    one_line(info, "no inexact-array leaves")


# ---------------------------------------------------------------------- losses
def test_mean_squared_error_hvp_names_a_tangent_of_the_wrong_shape():
    outputs, targets = jnp.zeros((5, 3)), jnp.ones((5, 3))
    with pytest.raises(ValueError) as info:
        # (5, 1) would broadcast against (5, 3) without the check.
        eqx_gn.MeanSquaredError().hvp(outputs, targets, jnp.ones((5, 1)))
    one_line(info, "MeanSquaredError.hvp", "(5, 1)", "(5, 3)")


def test_autodiff_loss_hvp_names_a_tangent_of_the_wrong_structure():
    loss = eqx_gn.AutodiffLoss(lambda z, t: jnp.mean((z["a"] - t) ** 2))
    outputs, targets = {"a": jnp.zeros((5, 3))}, jnp.ones((5, 3))
    with pytest.raises(ValueError) as info:
        loss.hvp(outputs, targets, {"a": jnp.ones((5, 2))})
    one_line(info, "AutodiffLoss.hvp", "(5, 2)", "(5, 3)")
