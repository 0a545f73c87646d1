"""Shared problem zoo and dense references for the tests.

Everything here is independent of eqx_gn's maths: reference losses are plain
``jnp``/optax, and the GN matrix is built densely from ``jax.jacfwd`` of the
flattened outputs and ``jax.hessian`` of the reference loss value.
"""

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int

import eqx_gn

# Every hypothesis example compiles, so examples are few and unhurried. No example
# database: the suite must not write files, and a seed is printed on failure.
SETTINGS = hypothesis.settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

RTOL = 1e-9
ATOL = 1e-11

seeds = hypothesis.strategies.integers(0, 2**31 - 1)


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Leafwise ``assert_allclose``, after checking both trees have one structure."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{a_def} != {e_def}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert jnp.shape(a) == jnp.shape(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------- models
def make_mlp(key, in_size: int, out_size: int, width: int, depth: int) -> eqx.nn.MLP:
    """A float64 MLP with a smooth activation (so no Jacobian is degenerate)."""
    return eqx.nn.MLP(
        in_size,
        out_size,
        width,
        depth,
        activation=jnp.tanh,
        dtype=jnp.float64,
        key=key,
    )


def apply_mlp(model: eqx.nn.MLP, x: Float[Array, "batch features"]):
    return jax.vmap(model)(x)


class CausalSelfAttention(eqx.Module):
    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    output: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, *, key):
        kq, kk, kv, ko = jax.random.split(key, 4)
        kw = dict(dtype=jnp.float64)
        self.query = eqx.nn.Linear(dim, dim, use_bias=False, key=kq, **kw)
        self.key = eqx.nn.Linear(dim, dim, use_bias=False, key=kk, **kw)
        self.value = eqx.nn.Linear(dim, dim, use_bias=False, key=kv, **kw)
        self.output = eqx.nn.Linear(dim, dim, key=ko, **kw)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "seq dim"], causal: Bool[Array, "seq seq"]):
        seq, dim = x.shape
        heads = self.num_heads
        split = lambda y: y.reshape(seq, heads, dim // heads)  # noqa: E731
        q = split(jax.vmap(self.query)(x))
        k = split(jax.vmap(self.key)(x))
        v = split(jax.vmap(self.value)(x))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim // heads)
        scores = jnp.where(causal[None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        mixed = jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq, dim)
        return jax.vmap(self.output)(mixed)


class TransformerBlock(eqx.Module):
    attention: CausalSelfAttention
    mlp: eqx.nn.MLP

    def __init__(self, dim: int, num_heads: int, *, key):
        ka, km = jax.random.split(key)
        self.attention = CausalSelfAttention(dim, num_heads, key=ka)
        self.mlp = make_mlp(km, dim, dim, 2 * dim, 1)

    def __call__(self, x, causal):
        x = x + self.attention(x, causal)
        return x + jax.vmap(self.mlp)(x)


class TinyTransformer(eqx.Module):
    """Embedding -> causal attention + MLP blocks -> head; logits ``(seq, vocab)``.

    ``causal`` is a bool array leaf: it is not a parameter (not inexact), so it
    exercises the parameter filter.
    """

    embedding: eqx.nn.Embedding
    position: Float[Array, "max_seq dim"]
    blocks: tuple[TransformerBlock, ...]
    head: eqx.nn.Linear
    causal: Bool[Array, "max_seq max_seq"]

    def __init__(
        self,
        *,
        vocab: int,
        dim: int,
        num_heads: int,
        num_blocks: int,
        max_seq: int,
        key,
    ):
        ke, kp, kh, *kb = jax.random.split(key, 3 + num_blocks)
        self.embedding = eqx.nn.Embedding(vocab, dim, dtype=jnp.float64, key=ke)
        self.position = 0.1 * jax.random.normal(kp, (max_seq, dim), jnp.float64)
        self.blocks = tuple(TransformerBlock(dim, num_heads, key=k) for k in kb)
        self.head = eqx.nn.Linear(dim, vocab, dtype=jnp.float64, key=kh)
        self.causal = jnp.tril(jnp.ones((max_seq, max_seq), bool))

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq vocab"]:
        seq = tokens.shape[0]
        x = jax.vmap(self.embedding)(tokens) + self.position[:seq]
        causal = self.causal[:seq, :seq]
        for block in self.blocks:
            x = block(x, causal)
        return jax.vmap(self.head)(x)


def apply_transformer(model: TinyTransformer, tokens: Int[Array, "batch seq"]):
    return jax.vmap(model)(tokens)


# ------------------------------------------------------------- reference losses
def ref_softmax_cross_entropy(logits, labels, weights=None):
    """Weighted mean of optax's integer-label cross-entropy over positions."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return jnp.mean(nll)
    w = weights.astype(logits.dtype)
    return jnp.sum(w * nll) / jnp.sum(w)


def ref_mean_squared_error(outputs, targets, weights=None, feature_ndim=1):
    """Weighted mean over positions of half the squared error over feature axes."""
    feature_axes = tuple(range(outputs.ndim - feature_ndim, outputs.ndim))
    per_position = 0.5 * jnp.sum((outputs - targets) ** 2, axis=feature_axes)
    if weights is None:
        return jnp.mean(per_position)
    w = weights.astype(outputs.dtype)
    return jnp.sum(w * per_position) / jnp.sum(w)


def soft_target_loss(logits, probs):
    """Cross-entropy against soft targets plus a log-cosh pull of the logits to 0.

    The ``AutodiffLoss`` of the zoo: convex, neither of the built-in losses, with a
    non-diagonal Hessian that (unlike cross-entropy's) depends on every logit.
    """
    logcosh = jnp.logaddexp(logits, -logits) - math.log(2.0)
    return jnp.mean(optax.softmax_cross_entropy(logits, probs)) + 0.1 * jnp.mean(
        jnp.sum(logcosh, axis=-1)
    )


def pytree_loss(outputs, targets):
    """A loss on dict outputs: ``soft_target_loss`` on the logits, half the squared
    error on a scalar value head."""
    probs, y = targets
    return soft_target_loss(outputs["logits"], probs) + 0.5 * jnp.mean(
        (outputs["value"] - y) ** 2
    )


def ref_loss_value(loss_kind: str) -> Callable[[Any, Any], Any]:
    """``value(outputs, targets)`` of the zoo's loss, independent of eqx_gn."""
    if loss_kind == "ce":

        def value(outputs, targets):
            if isinstance(targets, tuple):
                return ref_softmax_cross_entropy(outputs, *targets)
            return ref_softmax_cross_entropy(outputs, targets)

        return value
    if loss_kind == "mse":

        def value(outputs, targets):
            if isinstance(targets, tuple):
                return ref_mean_squared_error(outputs, *targets)
            return ref_mean_squared_error(outputs, targets)

        return value
    if loss_kind == "autodiff":
        return soft_target_loss
    if loss_kind == "pytree":
        return pytree_loss
    raise ValueError(loss_kind)


LOSS_KINDS = ("ce", "mse", "autodiff")
ARCHS = ("mlp", "transformer")


def make_loss(loss_kind: str) -> eqx_gn.AbstractLoss:
    return {
        "ce": eqx_gn.SoftmaxCrossEntropy(),
        "mse": eqx_gn.MeanSquaredError(),
        "autodiff": eqx_gn.AutodiffLoss(soft_target_loss),
        "pytree": eqx_gn.AutodiffLoss(pytree_loss),
    }[loss_kind]


# ----------------------------------------------------------------- problem zoo
@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, how to apply it, a batch and a loss; plus an independent loss."""

    fn: Callable
    model: Any
    batch: tuple[Any, Any]
    loss: eqx_gn.AbstractLoss
    loss_kind: str

    @property
    def inputs(self):
        return self.batch[0]

    @property
    def targets(self):
        return self.batch[1]

    @property
    def params(self):
        return eqx.filter(self.model, eqx.is_inexact_array)

    def ref_value(self, outputs):
        """The reference loss of ``outputs`` on this problem's targets."""
        return ref_loss_value(self.loss_kind)(outputs, self.targets)

    def apply_params(self, params):
        """Outputs as a function of the parameters alone."""
        static = eqx.filter(self.model, eqx.is_inexact_array, inverse=True)
        return self.fn(eqx.combine(params, static), self.inputs)

    def true_loss(self, params):
        return self.ref_value(self.apply_params(params))


def _targets(key, loss_kind: str, positions: tuple[int, ...], classes: int, weighted):
    kl, kw = jax.random.split(key)
    if loss_kind == "ce":
        labels = jax.random.randint(kl, positions, 0, classes)
        if not weighted:
            return labels
        # A padding mask: at least one real position.
        weights = jax.random.bernoulli(kw, 0.7, positions)
        weights = weights.at[(0,) * len(positions)].set(True)
        return labels, weights
    if loss_kind == "mse":
        y = jax.random.normal(kl, (*positions, classes), jnp.float64)
        if not weighted:
            return y
        return y, jax.random.uniform(kw, positions, jnp.float64, 0.1, 1.0)
    if loss_kind == "autodiff":
        return jax.nn.softmax(2 * jax.random.normal(kl, (*positions, classes)), axis=-1)
    raise ValueError(loss_kind)


def make_mlp_problem(
    seed: int,
    loss_kind: str,
    *,
    batch_size: int = 3,
    in_size: int = 3,
    out_size: int = 3,
    width: int = 4,
    depth: int = 2,
    weighted: bool = False,
) -> Problem:
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    model = make_mlp(km, in_size, out_size, width, depth)
    x = jax.random.normal(kx, (batch_size, in_size), jnp.float64)
    targets = _targets(ky, loss_kind, (batch_size,), out_size, weighted)
    return Problem(apply_mlp, model, (x, targets), make_loss(loss_kind), loss_kind)


def apply_mlp_dict(model: eqx.nn.MLP, x: Float[Array, "batch features"]):
    """An MLP whose outputs are a dict: class logits and a scalar value."""
    out = jax.vmap(model)(x)
    return {"logits": out[:, :-1], "value": out[:, -1]}


def make_pytree_output_problem(seed: int, *, batch_size: int = 3) -> Problem:
    """Outputs that are a PyTree (a dict), with an ``AutodiffLoss``."""
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    model = make_mlp(km, 3, 4, 4, 2)
    x = jax.random.normal(kx, (batch_size, 3), jnp.float64)
    probs = _targets(ky, "autodiff", (batch_size,), 3, False)
    y = jax.random.normal(ky, (batch_size,), jnp.float64)
    return Problem(
        apply_mlp_dict, model, (x, (probs, y)), make_loss("pytree"), "pytree"
    )


def make_transformer_problem(
    seed: int,
    loss_kind: str,
    *,
    batch_size: int = 2,
    seq: int = 3,
    vocab: int = 5,
    dim: int = 4,
    num_heads: int = 2,
    num_blocks: int = 1,
    weighted: bool = False,
) -> Problem:
    km, kx, ky = jax.random.split(jax.random.key(seed), 3)
    model = TinyTransformer(
        vocab=vocab,
        dim=dim,
        num_heads=num_heads,
        num_blocks=num_blocks,
        max_seq=seq,
        key=km,
    )
    tokens = jax.random.randint(kx, (batch_size, seq), 0, vocab)
    targets = _targets(ky, loss_kind, (batch_size, seq), vocab, weighted)
    return Problem(
        apply_transformer, model, (tokens, targets), make_loss(loss_kind), loss_kind
    )


def make_problem(seed: int, arch: str, loss_kind: str, **kwargs) -> Problem:
    if arch == "mlp":
        return make_mlp_problem(seed, loss_kind, **kwargs)
    if arch == "transformer":
        return make_transformer_problem(seed, loss_kind, **kwargs)
    raise ValueError(arch)


def random_like_params(key, model) -> Any:
    """A random tree with the structure, shapes and dtypes of the parameters."""
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def param_paths(model) -> list[str]:
    params = eqx.filter(model, eqx.is_inexact_array)
    return [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]


# ------------------------------------------------------------ dense references
# Module-level and jitted on (fn, loss_kind) as static arguments, so that examples
# that share shapes share compilations.
def _apply_params(fn, model, inputs, params):
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    return fn(eqx.combine(params, static), inputs)


@eqx.filter_jit
def _dense_jacobian(fn, model, inputs):
    flat, unravel = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))

    def outputs(theta):
        return ravel_pytree(_apply_params(fn, model, inputs, unravel(theta)))[0]

    return outputs(flat), jax.jacfwd(outputs)(flat)


@eqx.filter_jit
def _dense_output_hessian(fn, model, batch, loss_kind):
    inputs, targets = batch
    z0 = fn(model, inputs)
    flat, unravel = ravel_pytree(z0)
    value = ref_loss_value(loss_kind)
    return jax.hessian(lambda z: value(unravel(z), targets))(flat)


def dense_jacobian(problem: Problem):
    """``(z0, J)``: the flattened outputs and the dense Jacobian ``(outputs, params)``
    of the flattened outputs, in the ``ravel_pytree`` order of the parameters."""
    return _dense_jacobian(problem.fn, problem.model, problem.inputs)


def dense_output_hessian(problem: Problem):
    """The dense output-space Hessian of the reference loss value at ``z0``."""
    return _dense_output_hessian(
        problem.fn, problem.model, problem.batch, problem.loss_kind
    )


def dense_gn(problem: Problem) -> np.ndarray:
    """``G = J^T H J``, built densely (float64 numpy)."""
    _, jac = dense_jacobian(problem)
    hess = dense_output_hessian(problem)
    jac, hess = np.asarray(jac), np.asarray(hess)
    return jac.T @ hess @ jac


def unravel_like_params(model) -> Callable:
    """The map from a flat vector back to a parameter tree."""
    return ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[1]


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def flat_block_ids(model, leaf_block) -> np.ndarray:
    """The block of every entry of the flattened parameters."""
    params = eqx.filter(model, eqx.is_inexact_array)
    sizes = [x.size for x in jax.tree.leaves(params)]
    return np.repeat(np.asarray(leaf_block), sizes)


def block_diagonal(dense: np.ndarray, model, leaf_block) -> np.ndarray:
    """``dense`` with every entry between two different blocks zeroed."""
    ids = flat_block_ids(model, leaf_block)
    return np.where(ids[:, None] == ids[None, :], np.asarray(dense), 0.0)


# ------------------------------------------------------------------ partitions
def random_assignment(rng: np.random.Generator, num_leaves: int, num_blocks: int):
    """A random map leaf -> block with every block non-empty."""
    num_blocks = min(num_blocks, num_leaves)
    assignment = rng.integers(0, num_blocks, num_leaves)
    firsts = rng.permutation(num_leaves)[:num_blocks]
    assignment[firsts] = np.arange(num_blocks)
    return assignment


def filters_from_assignment(model, assignment, as_callable: bool = False):
    """One Equinox filter spec per block, selecting the leaves assigned to it.

    Bool PyTrees over the whole model, or callables on leaves (by identity).
    """
    paths = param_paths(model)
    owner = dict(zip(paths, assignment, strict=True))
    num_blocks = int(np.max(assignment)) + 1
    if as_callable:
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        by_block = [
            [x for x, a in zip(leaves, assignment, strict=True) if a == b]
            for b in range(num_blocks)
        ]
        return [(lambda leaf, xs=xs: any(leaf is x for x in xs)) for xs in by_block]

    def spec(b):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: bool(owner.get(jax.tree_util.keystr(p), -1) == b), model
        )

    return [spec(b) for b in range(num_blocks)]


def subtree_spec(model, where) -> Any:
    """A bool filter spec over ``model``: ``True`` on the subtree ``where(model)``
    (or on each of the subtrees, when it returns a tuple)."""
    nothing = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(where, nothing, replace_fn=lambda _: True)


# ------------------------------------------------------------- error checking
def jaxtyping_hook_active() -> bool:
    """Whether eqx_gn was imported through the jaxtyping import hook."""
    return hasattr(eqx_gn.SoftmaxCrossEntropy.value, "__wrapped__")


def raises_invalid(match: str, *, annotated: bool = False):
    """``pytest.raises`` for an invalid argument.

    eqx_gn raises ``ValueError`` whose message matches ``match``. When the input
    also violates a jaxtyping annotation (``annotated``) and the tests run under the
    jaxtyping hook, the runtime type check catches it first, with a ``TypeError``.
    """
    if annotated and jaxtyping_hook_active():
        return pytest.raises(TypeError)
    return pytest.raises(ValueError, match=match)


def psgdax_config():
    """The default JAX configuration: psgdax 0.1.1 broadcasts implicitly (the test
    suite's config raises) and mixes float64 and float32 in a ``lax.cond`` under
    ``jax_enable_x64`` (the suite enables it); users run with neither."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    stack.enter_context(jax.enable_x64(False))
    return stack


# ------------------------------------------------------------------- lm runs
# Cut-down budget on the tiny model: a few seconds of compute per run; most of a
# run's time is compilation.
SMALL = dict(
    model="tiny",
    seq_len=32,
    steps=6,
    batch_size=16,
    micro_batches=2,
    ls_batches=1,
    warmup_fraction=0.34,  # 2 AdamW steps, then 4 of the chosen optimizer
    eval_every=2,
    eval_batches=2,
    eval_batch_size=8,
    progress=False,
)


def small(tmp_path, cache_dir, name, **changes):
    """A `SMALL` run in ``tmp_path / name``, with ``changes``."""
    from eqx_gn.lm import TrainConfig

    return TrainConfig(
        **{**SMALL, "cache_dir": cache_dir, "out": str(tmp_path / name)}
    ).replace(**changes)


# A first-order run cut short and resumed in the tests that it resumes bit for bit:
# its last checkpoint before step 5 (step 4) falls in the chosen optimizer's phase.
RESUMED_RUN = dict(
    model="tiny",
    seq_len=32,
    steps=6,
    batch_size=8,
    warmup_fraction=0.34,  # 2 AdamW steps, then 4 of the chosen optimizer
    eval_every=2,
    eval_batches=1,
    eval_batch_size=4,
    checkpoint_every=2,
    progress=False,
)


def final_arrays(run_dir):
    """The newest checkpoint's step and arrays of a run directory."""
    from eqx_gn.lm import Checkpointer

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        return checkpointer.latest_step(), checkpointer.restore_arrays()
    finally:
        checkpointer.close()
