"""Every public entry point under ``jax.set_mesh`` with ``AxisType.Explicit`` axes.

A 2x4 mesh ('data', 'fsdp'): the examples of every batch split over 'data', the
parameters replicated or split over 'fsdp'. Each result must equal the one-device
result (float64, 1e-9) and keep the parameters' shardings; the same on an
``AxisType.Auto`` mesh. The model is written the way a user writes one for an
explicit mesh: plain ``x @ W`` on batch-split activations, and a weight split over
'fsdp' along a contracted axis gathered first (``reshard(w, P())``, as FSDP does).
Its output layer is split over the classes, so the losses see logits split over
'fsdp' too.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, reshard
from jaxtyping import Array

import eqx_gn

# Collectives over 8 simulated CPU devices: run apart from other load.
pytestmark = pytest.mark.multidevice

D_IN, WIDTH, HIDDEN, CLASSES = 4, 8, 16, 4


def _explicit_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    assert set(mesh.axis_types) == {AxisType.Explicit}  # jax.make_mesh's default
    return mesh


def _auto_mesh():
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _gather(w):
    """All of ``w`` on every device, when the current mesh is explicit."""
    mesh = jax.sharding.get_abstract_mesh()
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return reshard(w, P())
    return w


class ResBlock(eqx.Module):
    w1: Array
    b1: Array
    w2: Array

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (WIDTH, HIDDEN), jnp.float64) / WIDTH**0.5
        self.b1 = jnp.linspace(-0.1, 0.1, HIDDEN)
        self.w2 = jax.random.normal(k2, (HIDDEN, WIDTH), jnp.float64) / HIDDEN**0.5

    def __call__(self, h):
        return h + jnp.tanh(h @ _gather(self.w1) + self.b1[None, :]) @ _gather(self.w2)


class ResMLP(eqx.Module):
    w_in: Array
    blocks: list[ResBlock]
    w_out: Array

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.w_in = jax.random.normal(k1, (D_IN, WIDTH), jnp.float64) / D_IN**0.5
        self.blocks = [ResBlock(k2), ResBlock(k3)]
        self.w_out = jax.random.normal(k4, (WIDTH, CLASSES), jnp.float64) / 2


def apply(model, x):
    """Batched: ``x`` is (examples, D_IN)."""
    h = x @ model.w_in
    for block in model.blocks:
        h = block(h)
    return h @ model.w_out


# 'fsdp' splits every parameter along one axis (4 divides each size).
FSDP = {
    "w_in": P(None, "fsdp"),
    "w1": P("fsdp", None),
    "b1": P("fsdp"),
    "w2": P(None, "fsdp"),
    "w_out": P(None, "fsdp"),
}


def _param_specs(model, layout):
    def spec(path, x):
        if layout == "replicated":
            return P()
        return FSDP[path[-1].name]

    return jax.tree_util.tree_map_with_path(
        spec, eqx.filter(model, eqx.is_inexact_array)
    )


def _place(tree, specs, mesh, explicit):
    """``tree`` on ``mesh`` with the given specs (explicit: by ``reshard``)."""
    if explicit:
        return jax.tree.map(reshard, tree, specs)
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
    )


def _place_model(model, layout, mesh, explicit):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return eqx.combine(
        _place(params, _param_specs(model, layout), mesh, explicit), static
    )


def _place_batch(batch, spec, mesh, explicit):
    specs = jax.tree.map(lambda _: spec, batch)
    return _place(batch, specs, mesh, explicit)


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    model = ResMLP(k1)
    x = jax.random.normal(k2, (5, 16, D_IN), jnp.float64)
    teacher = ResMLP(k3)
    y = jnp.argmax(jax.vmap(lambda xs: apply(teacher, xs))(x), axis=-1)
    # A padding mask with a different number of live positions on every shard.
    w = (jax.random.uniform(k4, (5, 16)) > 0.3).astype(jnp.float64)
    return model, (x[:3], (y[:3], w[:3])), (x[3:], (y[3:], w[3:]))


def _assert_same(a, b, rtol=1e-9, atol=1e-12):
    a, b = eqx.filter((a, b), eqx.is_array)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _spec(spec, ndim):
    """``spec`` padded with ``None`` to ``ndim`` entries (``P()`` == ``P(None)``)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _specs_of(tree):
    """The padded specs of the leaves of ``tree``, as their types carry them."""
    return [
        _spec(jax.typeof(x).sharding.spec, jnp.ndim(x)) for x in jax.tree.leaves(tree)
    ]


def _expected_specs(model, layout):
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    specs = jax.tree.leaves(_param_specs(model, layout))
    return [_spec(s, p.ndim) for s, p in zip(specs, params, strict=True)]


def _layer_blocks(model):
    return eqx_gn.Blocks.from_layers(model, lambda m: m.blocks)


SOLVERS = {
    # Adam on the inner loop; the default Muon needs whole matrices (see below).
    "inner": lambda: eqx_gn.InnerOptimizer(optax.adam(1.0), learning_rate=0.02),
    "cg": lambda: eqx_gn.CG(max_iterations=8),
    "prox": lambda: eqx_gn.ProxLinear(optax.adam(1.0), learning_rate=0.02),
    "trueloss": lambda: eqx_gn.TrueLossInner(optax.adam(1.0), learning_rate=0.02),
}


def _two_steps(gn, model, batches, ls_batches):
    step = eqx.filter_jit(gn.step)
    state = gn.init(model)
    stats = []
    for _ in range(2):
        model, state, s = step(model, state, batches, ls_batches)
        stats.append(s)
    return model, state, stats


def test_plain_grad_of_the_model_works_on_the_explicit_mesh():
    """The premise: the test model is valid explicit-sharding user code (plain
    ``jax.grad`` of a hand-written mean cross-entropy, no eqx_gn involved)."""
    model, (x, (y, _)), _ = _problem()

    def value(m, x, y):
        logp = jax.nn.log_softmax(apply(m, x), axis=-1)
        return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(y, CLASSES), axis=-1))

    reference = jax.jit(jax.grad(value))(model, x[0], y[0])
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        m = _place_model(model, "fsdp", mesh, True)
        xs, ys = _place_batch((x[0], y[0]), P("data"), mesh, True)
        grad = jax.jit(jax.grad(value))(m, xs, ys)
    _assert_same(reference, grad)


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_explicit_mesh_step_equals_one_device(solver, layerwise, layout):
    model, batches, ls_batches = _problem()
    blocks = _layer_blocks(model) if layerwise else None
    loss = eqx_gn.SoftmaxCrossEntropy()
    gn = eqx_gn.GaussNewton(apply, loss, solver=SOLVERS[solver](), blocks=blocks)
    reference = _two_steps(gn, model, batches, ls_batches)
    # The steps really move: the reference is no trivial rejection.
    assert all(float(s.step_size) > 0 for s in reference[2])

    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        m = _place_model(model, layout, mesh, True)
        b = _place_batch(batches, P(None, "data"), mesh, True)
        lb = _place_batch(ls_batches, P(None, "data"), mesh, True)
        sharded = _two_steps(gn, m, b, lb)
    _assert_same(reference, sharded)
    params = eqx.filter(sharded[0], eqx.is_inexact_array)
    assert _specs_of(params) == _expected_specs(model, layout)


LINE_SEARCHES = {
    "grid": eqx_gn.GridLineSearch,
    "grid_walk": lambda: eqx_gn.GridLineSearch(stop_on_increase=True),
    "armijo": eqx_gn.BacktrackingArmijo,
    "unit": eqx_gn.UnitStep,
}


@pytest.mark.parametrize("line_search", sorted(LINE_SEARCHES))
def test_explicit_mesh_line_searches(line_search):
    model, batches, ls_batches = _problem()
    gn = eqx_gn.GaussNewton(
        apply,
        eqx_gn.SoftmaxCrossEntropy(),
        solver=eqx_gn.CG(max_iterations=8),
        line_search=LINE_SEARCHES[line_search](),
        blocks=_layer_blocks(model),
    )
    reference = _two_steps(gn, model, batches, ls_batches)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        m = _place_model(model, "fsdp", mesh, True)
        b = _place_batch(batches, P(None, "data"), mesh, True)
        lb = _place_batch(ls_batches, P(None, "data"), mesh, True)
        sharded = _two_steps(gn, m, b, lb)
    _assert_same(reference, sharded)
    assert [float(s.line_search_evaluations) for s in sharded[2]] == [
        float(s.line_search_evaluations) for s in reference[2]
    ]


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_explicit_mesh_default_inner_optimizer(layout):
    """The default inner optimizer (Muon + AdamW): with parameters split over
    'fsdp', Muon gathers each matrix whole for its Newton-Schulz iteration."""
    model, batches, ls_batches = _problem()
    gn = eqx_gn.GaussNewton(
        apply,
        eqx_gn.SoftmaxCrossEntropy(),
        solver=eqx_gn.InnerOptimizer(learning_rate=0.02),
    )
    reference = _two_steps(gn, model, batches, ls_batches)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        m = _place_model(model, layout, mesh, True)
        b = _place_batch(batches, P(None, "data"), mesh, True)
        lb = _place_batch(ls_batches, P(None, "data"), mesh, True)
        sharded = _two_steps(gn, m, b, lb)
    _assert_same(reference, sharded)


LOSSES = {
    "softmax_ce": lambda: (eqx_gn.SoftmaxCrossEntropy(), "labels"),
    "softmax_ce_weighted": lambda: (eqx_gn.SoftmaxCrossEntropy(), "weighted"),
    "mse": lambda: (eqx_gn.MeanSquaredError(), "values"),
    "mse_weighted": lambda: (eqx_gn.MeanSquaredError(), "weighted_values"),
    "autodiff": lambda: (
        eqx_gn.AutodiffLoss(lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))),
        "values",
    ),
}


def _targets(kind, batch):
    x, (y, w) = batch
    values = jnp.cos(jnp.arange(CLASSES)[None, :] + x[:, :1] * 3.0)
    return {
        "labels": y,
        "weighted": (y, w),
        "values": values,
        "weighted_values": (values, w),
    }[kind]


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_explicit_mesh_quadratic_model_and_gnvp(loss_name, layerwise, layout):
    """Every QuadraticModel method, gnvp and mean_loss on one batch split over
    'data' equal the one-device ones."""
    model, batches, _ = _problem()
    loss, kind = LOSSES[loss_name]()
    first = jax.tree.map(lambda a: a[0], batches)  # one batch of 16 examples
    batch = (first[0], _targets(kind, first))
    blocks = _layer_blocks(model) if layerwise else None
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, p.shape, p.dtype)
            for k, p in zip(keys, leaves, strict=True)
        ],
    )

    @eqx.filter_jit
    def everything(model, batch, v):
        q = eqx_gn.quadratic_model(apply, model, batch, loss=loss, blocks=blocks)
        stacked = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), batch)
        return (
            q.loss_value,
            q.jvp(v),
            q.gradient(),
            q.gnvp(v),
            q.value_and_grad(v),
            q.linearized_loss_value_and_grad(v),
            eqx_gn.gnvp(apply, model, batch, v, loss=loss, blocks=blocks),
            eqx_gn.mean_loss(apply, loss, model, stacked),
        )

    reference = everything(model, batch, v)
    mesh = _explicit_mesh()
    specs = _param_specs(model, layout)
    with jax.set_mesh(mesh):
        m = _place_model(model, layout, mesh, True)
        b = _place_batch(batch, P("data"), mesh, True)
        vs = _place(v, specs, mesh, True)
        sharded = everything(m, b, vs)
    _assert_same(reference, sharded)
    # Parameter-space results keep the parameters' shardings.
    for result in (sharded[2], sharded[3], sharded[4][1], sharded[5][1], sharded[6]):
        assert _specs_of(result) == _expected_specs(model, layout)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_auto_mesh_step_equals_one_device_and_keeps_shardings(solver):
    """Auto axes keep working: parameters split over 'fsdp', no jax.set_mesh."""
    model, batches, ls_batches = _problem()
    gn = eqx_gn.GaussNewton(
        apply, eqx_gn.SoftmaxCrossEntropy(), solver=SOLVERS[solver]()
    )
    reference = _two_steps(gn, model, batches, ls_batches)
    mesh = _auto_mesh()
    m = _place_model(model, "fsdp", mesh, False)
    b = _place_batch(batches, P(None, "data"), mesh, False)
    lb = _place_batch(ls_batches, P(None, "data"), mesh, False)
    sharded = _two_steps(gn, m, b, lb)
    _assert_same(reference, sharded)
    params = eqx.filter(sharded[0], eqx.is_inexact_array)
    got = [_spec(x.sharding.spec, x.ndim) for x in jax.tree.leaves(params)]
    assert got == _expected_specs(model, "fsdp")


def _collectives(compiled_text):
    return {
        op: len(re.findall(rf"\b{op}(-start)?\(", compiled_text))
        for op in ("all-gather", "all-to-all", "collective-permute")
    }


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_cg_moves_no_batch_data_between_devices(explicit):
    """CG concatenates the K micro-batches into one batch. With replicated
    parameters and the examples split over 'data', nothing but reductions needs
    communication: the compiled step has no all-gather, all-to-all or
    collective-permute (the (k, b) order needed all-gathers of the batch: XLA's
    "involuntary full rematerialization")."""
    model, batches, ls_batches = _problem()
    gn = eqx_gn.GaussNewton(
        apply, eqx_gn.SoftmaxCrossEntropy(), solver=eqx_gn.CG(max_iterations=4)
    )
    mesh = _explicit_mesh() if explicit else _auto_mesh()
    state = gn.init(model)
    with jax.set_mesh(mesh):
        m = _place_model(model, "replicated", mesh, explicit)
        b = _place_batch(batches, P(None, "data"), mesh, explicit)
        lb = _place_batch(ls_batches, P(None, "data"), mesh, explicit)
        text = eqx.filter_jit(gn.step).lower(m, state, b, lb).lowered.compile()
        text = text.as_text()
    assert _collectives(text) == {
        "all-gather": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }


def _scanned(model):
    """``model`` with its blocks stacked (the same weights) for ``jax.lax.scan``."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *model.blocks)
    return eqx.tree_at(lambda m: m.blocks, model, stacked)


#: ``apply`` of the scanned model, its stack shown to eqx_gn.
LAYER_SCAN = eqx_gn.LayerScan(
    before=lambda m, x: x @ m.w_in,
    layer=lambda block, h: block(h),
    after=lambda m, h: h @ m.w_out,
    stack=lambda m: m.blocks,
)


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_explicit_mesh_layer_scan_equals_one_device(layout):
    """A scanned model through an ``eqx_gn.LayerScan``, its stacked weights split
    over 'fsdp' after the layer axis: layerwise products (layer blocks starting at
    their layer) and two GN steps equal the unscanned model's on one device."""
    model, batches, ls_batches = _problem()
    scanned = _scanned(model)
    blocks = eqx_gn.Blocks.from_stacked_layers(scanned, lambda m: m.blocks)
    loss = eqx_gn.SoftmaxCrossEntropy()
    first = jax.tree.map(lambda a: a[0], batches)
    batch = (first[0], first[1][0])
    v = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape),
        eqx.filter(model, eqx.is_inexact_array),
    )

    @eqx.filter_jit
    def products(fn, model, batch, blocks, v):
        q = eqx_gn.quadratic_model(fn, model, batch, loss=loss, blocks=blocks)
        (value, grad), (prox, prox_grad) = (
            q.value_and_grad(v),
            q.linearized_loss_value_and_grad(v),
        )
        return value, prox, q.gnvp(v), grad, prox_grad

    reference = products(apply, model, batch, _layer_blocks(model), v)
    reference = reference[:2] + tuple(_scanned(r) for r in reference[2:])
    solver = SOLVERS["inner"]()
    plain = eqx_gn.GaussNewton(apply, loss, solver=solver, blocks=_layer_blocks(model))
    steps = _two_steps(plain, model, batches, ls_batches)
    gn = eqx_gn.GaussNewton(LAYER_SCAN, loss, solver=solver, blocks=blocks)
    stacked_fsdp = {"w1": P(None, "fsdp", None), "b1": P(None, "fsdp"),
                    "w2": P(None, None, "fsdp")}  # fmt: skip

    def spec(path, x):
        if layout == "replicated":
            return P()
        table = stacked_fsdp if path[0].name == "blocks" else FSDP
        return table[path[-1].name]

    specs = jax.tree_util.tree_map_with_path(
        spec, eqx.filter(scanned, eqx.is_inexact_array)
    )
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        m = _place(scanned, specs, mesh, True)
        b = _place_batch(batch, P("data"), mesh, True)
        vs = _place(_scanned(v), specs, mesh, True)
        sharded = products(LAYER_SCAN, m, b, blocks, vs)
        bs = _place_batch(batches, P(None, "data"), mesh, True)
        lbs = _place_batch(ls_batches, P(None, "data"), mesh, True)
        moved = _two_steps(gn, m, bs, lbs)
    _assert_same(reference, sharded)
    for result in sharded[2:]:
        assert _specs_of(result) == _specs_of(vs)
    _assert_same(_scanned(steps[0]), moved[0])
    assert all(float(s.step_size) > 0 for s in moved[2])
