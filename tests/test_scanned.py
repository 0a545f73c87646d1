"""Scanned layer stacks: blocks from slices of stacked leaves.

A toy model whose hidden layers are one stacked module applied with
``jax.lax.scan``: every GN product with ``Blocks.from_stacked_layers`` equals the
dense block-diagonal oracle (J by ``jax.jacfwd``, H by ``jax.hessian``, cross-layer
blocks zeroed) and the same product on the unscanned model (the layers as a tuple),
and GN steps with every solver equal the unscanned ones.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

import eqx_gn
from helpers import (
    SETTINGS,
    Problem,
    _targets,
    assert_trees_close,
    dense_gn,
    flat,
    make_loss,
    random_like_params,
    seeds,
    unravel_like_params,
)

WIDTH, IN, OUT, BATCH = 3, 2, 3, 4


class Layer(eqx.Module):
    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]

    def __init__(self, key):
        kw, kb = jax.random.split(key)
        self.weight = jax.random.normal(kw, (WIDTH, WIDTH), jnp.float64) / 2
        self.bias = 0.5 * jax.random.normal(kb, (WIDTH,), jnp.float64)

    def __call__(self, x):
        return jnp.tanh(self.weight @ x + self.bias)


class Toy(eqx.Module):
    """``inp``, hidden tanh layers (a tuple, or one stacked Layer), ``out``."""

    inp: eqx.nn.Linear
    layers: tuple[Layer, ...] | Layer
    out: eqx.nn.Linear
    scan: bool = eqx.field(static=True)

    def __init__(self, key, num_layers: int, scan: bool):
        ki, ko, *kl = jax.random.split(key, 2 + num_layers)
        self.inp = eqx.nn.Linear(IN, WIDTH, key=ki, dtype=jnp.float64)
        self.out = eqx.nn.Linear(WIDTH, OUT, key=ko, dtype=jnp.float64)
        if scan:
            self.layers = eqx.filter_vmap(Layer)(jnp.stack(kl))
        else:
            self.layers = tuple(Layer(k) for k in kl)
        self.scan = scan

    def __call__(self, x):
        x = jnp.tanh(self.inp(x))
        if self.scan:
            arrays, static = eqx.partition(self.layers, eqx.is_array)
            x, _ = jax.lax.scan(
                lambda h, a: (eqx.combine(a, static)(h), None), x, arrays
            )
        else:
            for layer in self.layers:
                x = layer(x)
        return self.out(x)


def apply(model, x):
    return jax.vmap(model)(x)


#: ``apply`` on the scanned toy, with its stack shown to eqx_gn: the layer blocks'
#: products start at their layer.
LAYER_SCAN = eqx_gn.LayerScan(
    before=lambda m, x: jax.vmap(lambda x: jnp.tanh(m.inp(x)))(x),
    layer=lambda layer, h: jax.vmap(layer)(h),
    after=lambda m, h: jax.vmap(m.out)(h),
    stack=lambda m: m.layers,
)
APPLY_FNS = {"plain": apply, "layer_scan": LAYER_SCAN}
fn_names = st.sampled_from(sorted(APPLY_FNS))


def problems(seed: int, num_layers: int, loss_kind: str):
    """The scanned and the unscanned problem: same weights, same batch."""
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (BATCH, IN), jnp.float64)
    targets = _targets(ky, loss_kind, (BATCH,), OUT, False)
    loss = make_loss(loss_kind)
    return tuple(
        Problem(apply, Toy(km, num_layers, scan), (x, targets), loss, loss_kind)
        for scan in (True, False)
    )


def stacked_blocks(model, join_out=False):
    ends = {"inp": lambda m: m.inp}
    join = None
    if join_out:
        join = {-1: subtree(model, lambda m: m.out)}
    else:
        ends["out"] = lambda m: m.out
    return eqx_gn.Blocks.from_stacked_layers(
        model,
        lambda m: m.layers,
        remainder={name: subtree(model, where) for name, where in ends.items()},
        join=join,
    )


def subtree(model, where):
    nothing = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(
        where, nothing, replace_fn=lambda n: jax.tree.map(lambda _: True, n)
    )


def flat_block_ids(model, join_out=False) -> np.ndarray:
    """The oracle's block of every flattened parameter entry of the scanned toy,
    from the model's layout alone: entry ``[i, ...]`` of a stacked leaf is layer
    ``i``; ``inp`` and ``out`` their own blocks (or ``out`` joined to the last
    layer)."""
    num_layers = model.layers.weight.shape[0]
    ids = Toy(jax.random.key(0), num_layers, True)
    ids = jax.tree.map(lambda x: np.zeros(x.shape), eqx.filter(ids, eqx.is_array))
    layer_of = lambda x: np.broadcast_to(  # noqa: E731
        np.arange(num_layers).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape
    )
    ids = eqx.tree_at(
        lambda t: (t.layers, t.inp, t.out),
        ids,
        (
            jax.tree.map(layer_of, ids.layers),
            jax.tree.map(lambda x: np.full(x.shape, num_layers), ids.inp),
            jax.tree.map(
                lambda x: np.full(x.shape, num_layers - 1 if join_out else -1),
                ids.out,
            ),
        ),
    )
    return np.asarray(ravel_pytree(ids)[0])


def unstack(scanned_tree, unscanned_like):
    """A parameter-shaped tree of the scanned toy as the unscanned toy's."""
    num_layers = len(unscanned_like.layers)
    layers = tuple(
        jax.tree.map(lambda x, i=i: x[i], scanned_tree.layers)
        for i in range(num_layers)
    )
    return eqx.tree_at(
        lambda t: (t.inp, t.layers, t.out),
        unscanned_like,
        (scanned_tree.inp, layers, scanned_tree.out),
    )


layer_counts = st.integers(1, 4)
loss_kinds = st.sampled_from(["ce", "mse"])


@SETTINGS
@given(seeds, layer_counts, loss_kinds, st.booleans(), fn_names)
def test_scanned_products_equal_dense_block_diagonal(
    seed, num_layers, loss_kind, join_out, fn_name
):
    apply = APPLY_FNS[fn_name]
    scanned, _ = problems(seed, num_layers, loss_kind)
    blocks = stacked_blocks(scanned.model, join_out)
    ids = flat_block_ids(scanned.model, join_out)
    dense = dense_gn(scanned)
    dense_bd = np.where(ids[:, None] == ids[None, :], dense, 0.0)
    if num_layers > 1:  # the oracle drops cross-layer curvature that exists
        assert np.abs(dense - dense_bd).max() > 1e-8
    v = random_like_params(jax.random.key(seed + 1), scanned.model)
    got = eqx_gn.gnvp(
        apply, scanned.model, scanned.batch, v, loss=scanned.loss, blocks=blocks
    )
    unravel = unravel_like_params(scanned.model)
    assert_trees_close(got, unravel(dense_bd @ flat(v)))
    # The quadratic model: q(d) = L0 + g.d + d.G_bd d / 2 and its gradient.
    q = eqx_gn.quadratic_model(
        apply, scanned.model, scanned.batch, loss=scanned.loss, blocks=blocks
    )
    g = np.asarray(flat(jax.grad(scanned.true_loss)(scanned.params)))
    value, grad = q.value_and_grad(v)
    d = flat(v)
    expected = scanned.true_loss(scanned.params) + g @ d + 0.5 * d @ dense_bd @ d
    np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-11)
    assert_trees_close(grad, unravel(g + dense_bd @ d))
    # The loss gradient and the full (one-block) product, through the same parts.
    assert_trees_close(q.gradient(), unravel(g))
    full = eqx_gn.gnvp(apply, scanned.model, scanned.batch, v, loss=scanned.loss)
    assert_trees_close(full, unravel(dense @ flat(v)))
    if fn_name == "layer_scan":  # the layer blocks took the path that starts at l
        leaves = tuple(i for i, ls in enumerate(blocks.layer_blocks) if ls)
        joined = tuple(
            i for i, b in enumerate(blocks.leaf_block) if 0 <= b < num_layers
        )
        assert q.stack.fast(leaves, joined)


@SETTINGS
@given(seeds, layer_counts, loss_kinds, fn_names)
def test_scanned_products_equal_unscanned(seed, num_layers, loss_kind, fn_name):
    apply_s = APPLY_FNS[fn_name]
    scanned, plain = problems(seed, num_layers, loss_kind)
    blocks_s = stacked_blocks(scanned.model)
    blocks_p = eqx_gn.Blocks.from_layers(
        plain.model,
        lambda m: m.layers,
        remainder={
            "inp": subtree(plain.model, lambda m: m.inp),
            "out": subtree(plain.model, lambda m: m.out),
        },
    )
    v = random_like_params(jax.random.key(seed + 1), scanned.model)
    v_p = unstack(v, plain.params)
    q_s = eqx_gn.quadratic_model(
        apply_s, scanned.model, scanned.batch, loss=scanned.loss, blocks=blocks_s
    )
    q_p = eqx_gn.quadratic_model(
        apply, plain.model, plain.batch, loss=plain.loss, blocks=blocks_p
    )
    assert_trees_close(unstack(q_s.gnvp(v), plain.params), q_p.gnvp(v_p))
    for method in ("value_and_grad", "linearized_loss_value_and_grad"):
        value_s, grad_s = getattr(q_s, method)(v)
        value_p, grad_p = getattr(q_p, method)(v_p)
        np.testing.assert_allclose(value_s, value_p, rtol=1e-10)
        assert_trees_close(unstack(grad_s, plain.params), grad_p)


def _gn(solver, blocks, fn=apply):
    return eqx_gn.GaussNewton(
        fn, eqx_gn.MeanSquaredError(), solver=solver, blocks=blocks
    )


@pytest.mark.parametrize("fn_name", sorted(APPLY_FNS))
@pytest.mark.parametrize("solver", ["inner", "cg", "prox"])
def test_gn_steps_on_scanned_equal_unscanned(solver, fn_name):
    num_layers, k = 3, 2
    scanned, plain = problems(0, num_layers, "mse")
    kx, ky = jax.random.split(jax.random.key(7))
    batches = (
        jax.random.normal(kx, (k, BATCH, IN), jnp.float64),
        jax.random.normal(ky, (k, BATCH, OUT), jnp.float64),
    )

    def make_solver(model):
        # Muon on the (stacked) weight matrices, AdamW on the rest: the stacked
        # biases (L, width) are vectors per layer, so adam_filter selects them.
        adam = (
            subtree(model, lambda m: (m.inp, m.out, m.layers.bias))
            if (model.scan)
            else subtree(model, lambda m: (m.inp, m.out))
        )
        optimizer = eqx_gn.muon_adamw(adam_filter=adam)
        if solver == "inner":
            return eqx_gn.InnerOptimizer(optimizer, learning_rate=0.05)
        if solver == "prox":
            return eqx_gn.ProxLinear(optimizer, learning_rate=0.05)
        return eqx_gn.CG(max_iterations=5)

    blocks_p = eqx_gn.Blocks.from_layers(
        plain.model,
        lambda m: m.layers,
        remainder={
            "inp": subtree(plain.model, lambda m: m.inp),
            "out": subtree(plain.model, lambda m: m.out),
        },
    )
    gn_s = _gn(
        make_solver(scanned.model), stacked_blocks(scanned.model), APPLY_FNS[fn_name]
    )
    gn_p = _gn(make_solver(plain.model), blocks_p)
    model_s, model_p = scanned.model, plain.model
    state_s, state_p = gn_s.init(model_s), gn_p.init(model_p)
    for _ in range(2):
        model_s, state_s, stats_s = eqx.filter_jit(gn_s.step)(
            model_s, state_s, batches, batches
        )
        model_p, state_p, stats_p = eqx.filter_jit(gn_p.step)(
            model_p, state_p, batches, batches
        )
        np.testing.assert_allclose(stats_s.step_size, stats_p.step_size)
        assert stats_p.step_size > 0
        assert_trees_close(
            unstack(
                eqx.filter(model_s, eqx.is_array), eqx.filter(model_p, eqx.is_array)
            ),
            eqx.filter(model_p, eqx.is_array),
            rtol=1e-8,
            atol=1e-10,
        )


# Collectives over 8 simulated CPU devices: run apart from other load (see
# scripts/test.sh), since a starved device thread aborts the process.
@pytest.mark.multidevice
@pytest.mark.parametrize("fn_name", sorted(APPLY_FNS))
def test_scanned_layer_blocks_under_shard_map(fn_name):
    """The layer blocks inside shard_map (checked varying axes) sum the shards once:
    the same numbers as on one device, and as ``apply`` on one device."""
    from jax.sharding import PartitionSpec as P

    num_layers, batch_size = 3, 16
    km, kx, ky = jax.random.split(jax.random.key(3), 3)
    model = Toy(km, num_layers, True)
    batch = (
        jax.random.normal(kx, (batch_size, IN), jnp.float64),
        jax.random.randint(ky, (batch_size,), 0, OUT),
    )
    loss = eqx_gn.SoftmaxCrossEntropy()
    blocks = stacked_blocks(model, join_out=True)
    v = random_like_params(jax.random.key(5), model)

    def products(model, batch, v, axis_name=None):
        q = eqx_gn.quadratic_model(
            fn, model, batch, loss=loss, blocks=blocks, axis_name=axis_name
        )
        return q.gnvp(v), q.value_and_grad(v), q.linearized_loss_value_and_grad(v)

    fn = APPLY_FNS[fn_name]

    arrays, static = eqx.partition(model, eqx.is_array)
    mesh = eqx_gn.data_mesh(8)
    sharded = jax.jit(
        jax.shard_map(
            lambda a, b, v: products(eqx.combine(a, static), b, v, "data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P()),
            out_specs=P(),
        )
    )(arrays, batch, v)
    single = jax.jit(lambda a, b, v: products(eqx.combine(a, static), b, v))(
        arrays, batch, v
    )
    assert_trees_close(sharded, single)
    fn = apply
    assert_trees_close(single, products(model, batch, v))


def test_layer_scan_when_before_reads_a_joined_leaf():
    """``join`` puts ``inp`` (read before the stack) in layer 0's block: the layer
    blocks cannot start at their layer, so the products take the general path, and
    still equal ``apply``'s."""
    scanned, _ = problems(2, 3, "ce")
    model = scanned.model
    blocks = eqx_gn.Blocks.from_stacked_layers(
        model,
        lambda m: m.layers,
        remainder={"out": subtree(model, lambda m: m.out)},
        join={0: subtree(model, lambda m: m.inp)},
    )
    v = random_like_params(jax.random.key(4), model)
    q_p = eqx_gn.quadratic_model(
        apply, model, scanned.batch, loss=scanned.loss, blocks=blocks
    )
    q_s = eqx_gn.quadratic_model(
        LAYER_SCAN, model, scanned.batch, loss=scanned.loss, blocks=blocks
    )
    leaves = tuple(i for i, ls in enumerate(blocks.layer_blocks) if ls)
    inp = tuple(i for i, b in enumerate(blocks.leaf_block) if b == 0)
    assert inp and not q_s.stack.fast(leaves, inp)
    assert_trees_close(q_s.gnvp(v), q_p.gnvp(v))
    assert_trees_close(q_s.value_and_grad(v), q_p.value_and_grad(v))


@pytest.mark.parametrize(
    "stack, message",
    [
        (lambda m: m.inp.weight[0], "stack(model) is not a part of the model"),
        (lambda m: (m.inp, m.layers), "same leading (layer) axis"),
    ],
)
def test_layer_scan_bad_stack_is_one_line(stack, message):
    scanned, _ = problems(0, 2, "ce")
    fn = eqx.tree_at(lambda f: f.stack, LAYER_SCAN, stack)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        eqx_gn.quadratic_model(fn, scanned.model, scanned.batch, loss=scanned.loss)
    assert "\n" not in str(info.value)
