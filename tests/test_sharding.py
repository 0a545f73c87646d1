"""Data-parallel GN products equal single-device ones, in every way JAX splits a batch.

The batch of each case is split over the 8 simulated CPU devices of conftest.py in
the three ways JAX users do it:

- ``jit``: ``eqx.filter_jit`` on a batch placed with ``NamedSharding`` over a
  ``data`` mesh axis (parameters replicated), no ``axis_name``; XLA inserts the
  collectives;
- ``shard_map``: ``jax.shard_map`` over that axis with ``axis_name="data"``, with
  ``check_vma`` on (out_specs ``P()``) and off (each device's copy returned);
- ``pmap``: ``jax.pmap`` with ``axis_name="data"`` on a batch reshaped to
  ``(8, b / 8, ...)``; every device's result is checked.

Every number (``gnvp``, the quadratic model's value and gradient, its ``gnvp`` and
``gradient``, the linearized loss and its gradient, the loss value) must equal the
single-device one in float64. Equality also proves that nothing is summed twice
(that would give 8x) and that loss normalisers are global: the weighted cases give
the shards different numbers of nonzero weights, one shard none at all.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eqx_gn import (
    AutodiffLoss,
    Blocks,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    data_mesh,
    gnvp,
    quadratic_model,
    replicate,
    shard_batch,
)
from helpers import random_like_params

# Collectives over 8 simulated CPU devices: run apart from other load (see
# scripts/test.sh), since a starved device thread aborts the process.
pytestmark = pytest.mark.multidevice

NDEV = 8
AXIS = "data"
RTOL, ATOL = 1e-10, 1e-12
# Nonzero weights per shard of 4 positions: all different counts, one shard empty.
NONZERO_PER_SHARD = (4, 1, 0, 2, 3, 4, 1, 2)


# ---------------------------------------------------------------------- models
class TinySeq(eqx.Module):
    """Tokens (seq,) -> logits (seq, vocab), with causal mixing over time."""

    embed: eqx.nn.Embedding
    mix: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, vocab, dim, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1)
        self.mix = eqx.nn.Linear(dim, dim, key=k2)
        self.head = eqx.nn.Linear(dim, vocab, key=k3)

    def __call__(self, tokens):
        h = jax.vmap(self.embed)(tokens)
        steps = jnp.arange(1, tokens.shape[0] + 1, dtype=h.dtype)[:, None]
        h = h + jnp.tanh(jax.vmap(self.mix)(jnp.cumsum(h, axis=0) / steps))
        return jax.vmap(self.head)(h)


def apply_vmapped(model, inputs):
    return jax.vmap(model)(inputs)


def _shard_mask(batch, seq=None):
    """Row mask (batch,) or (batch, seq) with NONZERO_PER_SHARD nonzeros per shard."""
    per = batch // NDEV
    rows = np.zeros((NDEV, per), bool)
    for k, n in enumerate(NONZERO_PER_SHARD):
        rows[k, :n] = True
    rows = rows.reshape(batch)
    if seq is None:
        return rows
    # Ragged sequences: row i keeps its first 1 + i % seq positions.
    lengths = 1 + np.arange(batch) % seq
    return rows[:, None] & (np.arange(seq)[None, :] < lengths[:, None])


# ----------------------------------------------------------------------- cases
def _mlp(key, out):
    return eqx.nn.MLP(5, out, width_size=8, depth=2, activation=jnp.tanh, key=key)


def case_ce_weighted_mlp(key):
    """Float weights with different nonzero counts per shard; full GN."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    b = 32
    x = jax.random.normal(k2, (b, 5))
    labels = jax.random.randint(k3, (b,), 0, 4)
    w = jnp.asarray(_shard_mask(b)) * jax.random.uniform(
        k4, (b,), minval=0.5, maxval=2.0
    )
    return _mlp(k1, 4), (x, (labels, w)), SoftmaxCrossEntropy(), None


def case_ce_mask_seq_layerwise(key):
    """(batch, seq, vocab) logits, a bool padding mask with -1 labels under it."""
    k1, k2, k3 = jax.random.split(key, 3)
    b, t, vocab = 32, 5, 7
    tokens = jax.random.randint(k2, (b, t), 0, vocab)
    mask = jnp.asarray(_shard_mask(b, t))
    labels = jnp.where(mask, jax.random.randint(k3, (b, t), 0, vocab), -1)
    model = TinySeq(vocab, 6, k1)
    blocks = Blocks.from_layers(model, lambda m: [m.embed, m.mix, m.head])
    return model, (tokens, (labels, mask)), SoftmaxCrossEntropy(), blocks


def case_mse_weighted_mlp_layerwise(key):
    """Weighted MSE, layerwise blocks from the MLP's layers."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    b = 32
    x = jax.random.normal(k2, (b, 5))
    y = jax.random.normal(k3, (b, 3))
    w = jnp.asarray(_shard_mask(b)) * jax.random.uniform(
        k4, (b,), minval=0.5, maxval=2.0
    )
    model = _mlp(k1, 3)
    blocks = Blocks.from_layers(model, lambda m: m.layers)
    assert blocks.num_blocks == 3
    return model, (x, (y, w)), MeanSquaredError(), blocks


def _log_cosh_mean(z, y):
    return jnp.mean(jnp.log(jnp.cosh(z - y)))


def case_autodiff_mlp(key):
    """AutodiffLoss (a mean of log-cosh): shards hold equally many positions."""
    k1, k2, k3 = jax.random.split(key, 3)
    b = 32
    x = jax.random.normal(k2, (b, 5))
    y = jax.random.normal(k3, (b, 3))
    return _mlp(k1, 3), (x, y), AutodiffLoss(_log_cosh_mean), None


def case_mse_mlp(key):
    """Unweighted MSE (the normaliser is the global count of positions); full GN."""
    k1, k2, k3 = jax.random.split(key, 3)
    b = 32
    x = jax.random.normal(k2, (b, 5))
    y = jax.random.normal(k3, (b, 3))
    return _mlp(k1, 3), (x, y), MeanSquaredError(), None


CASES = {
    "ce_weighted_mlp": case_ce_weighted_mlp,
    "ce_mask_seq_layerwise": case_ce_mask_seq_layerwise,
    "mse_weighted_mlp_layerwise": case_mse_weighted_mlp_layerwise,
    "mse_mlp": case_mse_mlp,
    "autodiff_mlp": case_autodiff_mlp,
}


@functools.cache
def setup(name):
    """(model, batch, v, d, loss, blocks, single-device results) of one case."""
    key = jax.random.key(sum(map(ord, name)))
    k_case, k_v, k_d = jax.random.split(key, 3)
    model, batch, loss, blocks = CASES[name](k_case)
    params = eqx.filter(model, eqx.is_inexact_array)
    v = random_like_params(k_v, params)
    d = jax.tree.map(lambda x: 0.1 * x, random_like_params(k_d, params))
    ref = _compute_jit(model, batch, v, d, loss=loss, blocks=blocks, axis_name=None)
    ref = jax.device_get(ref)
    return model, batch, v, d, loss, blocks, ref


# --------------------------------------------------------------- computations
def compute(model, batch, v, d, *, loss, blocks, axis_name):
    """Everything the GN machinery gives, for one (shard of a) batch."""
    q = quadratic_model(
        apply_vmapped, model, batch, loss=loss, blocks=blocks, axis_name=axis_name
    )
    q_value, q_grad = q.value_and_grad(d)
    lin_value, lin_grad = q.linearized_loss_value_and_grad(d)
    return {
        "gnvp": gnvp(
            apply_vmapped,
            model,
            batch,
            v,
            loss=loss,
            blocks=blocks,
            axis_name=axis_name,
        ),
        "q_gnvp": q.gnvp(v),
        "gradient": q.gradient(),
        "q_value": q_value,
        "q_grad": q_grad,
        "lin_value": lin_value,
        "lin_grad": lin_grad,
        "loss": q.loss_value,
    }


_compute_jit = eqx.filter_jit(compute)


def run_jit(model, batch, v, d, loss, blocks):
    mesh = data_mesh(NDEV)
    sharded = shard_batch(batch, mesh)
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding.spec[0] == AXIS
        assert len(leaf.addressable_shards) == NDEV
        assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // NDEV
    model, v, d = replicate((model, v, d), mesh)
    out = _compute_jit(model, sharded, v, d, loss=loss, blocks=blocks, axis_name=None)
    # Results land replicated, like the parameters: check every device's copy.
    for leaf in jax.tree.leaves(out):
        assert leaf.is_fully_replicated, leaf.sharding
    return [
        jax.tree.map(lambda x, i=i: x.addressable_shards[i].data, out)
        for i in range(NDEV)
    ]


def _split_static(model, loss):
    """shard_map and pmap take arrays only: close over the rest."""
    arrays, static = eqx.partition((model, loss), eqx.is_array)
    return arrays, static


def run_shard_map(model, batch, v, d, loss, blocks, *, check_vma):
    mesh = data_mesh(NDEV)
    arrays, static = _split_static(model, loss)

    def body(arrays, batch, v, d):
        model, loss = eqx.combine(arrays, static)
        out = compute(model, batch, v, d, loss=loss, blocks=blocks, axis_name=AXIS)
        if check_vma:
            return out
        # Unchecked: out_specs P() would silently return one device's copy, so
        # return every device's copy along a new leading axis and check them all.
        return jax.tree.map(lambda x: x[None], out)

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(), P()),
        out_specs=P() if check_vma else P(AXIS),
        check_vma=check_vma,
    )
    out = jax.jit(f)(arrays, batch, v, d)
    if check_vma:
        return [out]
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(NDEV)]


def run_pmap(model, batch, v, d, loss, blocks):
    arrays, static = _split_static(model, loss)

    def body(arrays, batch, v, d):
        model, loss = eqx.combine(arrays, static)
        return compute(model, batch, v, d, loss=loss, blocks=blocks, axis_name=AXIS)

    stacked = jax.tree.map(
        lambda x: x.reshape(NDEV, x.shape[0] // NDEV, *x.shape[1:]), batch
    )
    out = jax.pmap(body, axis_name=AXIS, in_axes=(None, 0, None, None))(
        arrays, stacked, v, d
    )
    for leaf in jax.tree.leaves(out):
        assert leaf.shape[0] == NDEV
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(NDEV)]


MODES = {
    "jit_named_sharding": run_jit,
    "shard_map": functools.partial(run_shard_map, check_vma=True),
    "shard_map_no_vma": functools.partial(run_shard_map, check_vma=False),
    "pmap": run_pmap,
}


def assert_trees_close(got, want, where):
    got_flat = jax.tree_util.tree_flatten_with_path(got)[0]
    want_flat, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert jax.tree.structure(got) == want_def, where
    for (path, g), (_, w) in zip(got_flat, want_flat, strict=True):
        g = np.asarray(g)
        assert g.dtype == np.float64, (where, jax.tree_util.keystr(path))
        np.testing.assert_allclose(
            g, w, rtol=RTOL, atol=ATOL, err_msg=f"{where}{jax.tree_util.keystr(path)}"
        )


# ----------------------------------------------------------------------- tests
def test_eight_devices():
    assert len(jax.devices()) == NDEV
    assert jax.config.jax_enable_x64


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_single_device(name, mode):
    model, batch, v, d, loss, blocks, ref = setup(name)
    results = MODES[mode](model, batch, v, d, loss, blocks)
    for i, out in enumerate(results):
        assert_trees_close(jax.device_get(out), ref, f"{name}/{mode}/device{i}: ")


def test_reference_is_the_weighted_mean():
    """The single-device reference is itself right: its loss is the global weighted
    mean, and its gradient is jax.grad of it. A per-shard normaliser would give a
    different number, so the sharded equality above has teeth."""
    model, (x, (labels, w)), _, _, loss, _, ref = setup("ce_weighted_mlp")
    logp = np.asarray(jax.nn.log_softmax(jax.vmap(model)(x), axis=-1))
    nll = -logp[np.arange(len(labels)), np.asarray(labels)]
    w = np.asarray(w)
    np.testing.assert_allclose(ref["loss"], np.sum(w * nll) / np.sum(w), rtol=1e-12)

    counts = (w.reshape(NDEV, -1) > 0).sum(axis=1)
    assert sorted(set(counts.tolist())) == [0, 1, 2, 3, 4]
    shard_w, shard_nll = w.reshape(NDEV, -1), nll.reshape(NDEV, -1)
    live = shard_w.sum(axis=1) > 0
    per_shard = (shard_w * shard_nll).sum(axis=1)[live] / shard_w.sum(axis=1)[live]
    assert abs(per_shard.mean() - ref["loss"]) > 1e-3

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def true_loss(p):
        return loss.value(jax.vmap(eqx.combine(p, static))(x), (labels, jnp.asarray(w)))

    assert_trees_close(ref["gradient"], jax.grad(true_loss)(params), "jax.grad: ")


def test_omitting_axis_name_in_shard_map_is_wrong():
    """Inside shard_map the parameters are replicated, so without axis_name JAX's own
    transpose sums the per-shard products (each normalised by its shard): with equal
    shards the GN product comes out NUM_DEVICES times too large. This is why
    axis_name is required there, and shows the equality tests can tell 8x apart."""
    model, batch, v, _, loss, _, ref = setup("autodiff_mlp")
    arrays, static = _split_static(model, loss)

    def body(arrays, batch, v):
        model, loss = eqx.combine(arrays, static)
        return gnvp(apply_vmapped, model, batch, v, loss=loss, axis_name=None)

    f = jax.shard_map(
        body, mesh=data_mesh(NDEV), in_specs=(P(), P(AXIS), P()), out_specs=P()
    )
    wrong = jax.device_get(jax.jit(f)(arrays, batch, v))
    assert_trees_close(
        wrong, jax.tree.map(lambda x: NDEV * x, ref["gnvp"]), "without axis_name: "
    )
