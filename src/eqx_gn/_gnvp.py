r"""Gauss-Newton-vector products and the GN quadratic model.

At parameters $\theta_0$ and a batch, let $z_0 = f(\theta_0, x)$ be the outputs,
$J = \partial f / \partial\theta$ at $\theta_0$, $g_0 = \nabla_z L(z_0)$ and
$H = \nabla_z^2 L(z_0)$. The GN quadratic model of the loss is

$$q(d) = L(z_0) + g_0^\top J d + \tfrac12 (J d)^\top H (J d),
\qquad \nabla q(d) = J^\top (g_0 + H J d) = g + G d,$$

with $G = J^\top H J$. For a partition of the parameters into blocks
$d = (d_1, \dots, d_n)$, the block-diagonal (layerwise) model keeps only the
diagonal blocks $G_{bb} = J_b^\top H J_b$:

$$q(d) = L(z_0) + g_0^\top J d + \tfrac12 \sum_b (J_b d_b)^\top H (J_b d_b).$$

Both come from one code path: the model is linearized once (``jax.linearize``:
one forward pass whose residuals every later product reuses), and for each block
the tangent map is restricted to that block's parameters. The other blocks'
tangents are symbolic zeros, so the restricted tangent pass and its transpose
(``jax.linear_transpose``) only touch the part of the network downstream of the
block, and a single block equals the plain full product. A model given as an
[`eqx_gn.LayerScan`][] is linearized in parts (``_layer_scan``), so that the blocks
of its scanned layers can start at their layer too.
"""

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Scalar

from ._blocks import Blocks
from ._custom_types import ApplyFn, AxisName, Batch, Model, Params, typecheck
from ._layer_scan import (
    LayerScan,
    StackLinearization,
    linearize_layer_scan,
    stack_leaves,
)
from ._losses import AbstractLoss
from ._misc import describe_leaves, first_line, tree_vdot
from ._sharding import as_varying, psum


def check_like_params(tree: Any, params: Params, what: str) -> list[Array]:
    """The leaves of ``tree``, after checking it has the structure, shapes and dtypes
    of ``params``; the error names the first leaf that differs."""
    ref, ref_def = jax.tree_util.tree_flatten_with_path(params)
    try:
        got, got_def = jax.tree_util.tree_flatten_with_path(tree)
    except Exception as e:  # pragma: no cover - flattening arbitrary objects
        raise ValueError(f"{what} is not a PyTree: {e}") from e
    if got_def != ref_def:
        ref_paths = [jax.tree_util.keystr(p) for p, _ in ref]
        got_paths = [jax.tree_util.keystr(p) for p, _ in got]
        missing = [p for p in ref_paths if p not in got_paths]
        extra = [p for p in got_paths if p not in ref_paths]
        detail = []
        if missing:
            detail.append(f"missing leaves {missing[:5]}")
        if extra:
            detail.append(f"unexpected leaves {extra[:5]}")
        raise ValueError(
            f"{what} must have the structure of eqx.filter(model, eqx.is_inexact_array)"
            + (
                ": " + "; ".join(detail)
                if detail
                else f"; got {got_def}, expected {ref_def}"
            )
            + "."
        )
    leaves = []
    for (path, r), (_, g) in zip(ref, got, strict=True):
        shape, dtype = jnp.shape(g), jnp.result_type(g)
        if shape != r.shape or dtype != r.dtype:
            raise ValueError(
                f"{what} leaf {jax.tree_util.keystr(path)} has shape {shape} and dtype "
                f"{dtype}; the parameter has shape {r.shape} and dtype {r.dtype}."
            )
        leaves.append(g)
    return leaves


def _after(leaves: list[Array], done: tuple[Array, list[Array]]) -> list[Array]:
    """``leaves`` unchanged, but computable only once ``done = (value, cotangents)``
    of the previous block exists.

    XLA is free to run independent blocks in any order, and left alone it ran every
    block's tangent pass before any transpose, holding every block's output-sized
    tangents at once (2x the full product's temporaries at 12 layers, on CPU).
    An ``optimization_barrier`` did not change XLA's CPU schedule, so
    this adds an exact zero computed from ``done``: a NaN test of the value and of
    the smallest cotangent's sum, as 0 or 1, times 0. It is 0 whatever ``done``
    holds, NaNs included, so the leaves keep their values (a ``-0.0`` becomes
    ``+0.0``).
    """
    value, cotangents = done
    smallest = min(cotangents, key=lambda x: x.size)
    flag = jnp.isnan(value) | jnp.isnan(jnp.sum(smallest))
    zero = flag.astype(leaves[0].dtype) * 0
    return [leaves[0] + zero, *leaves[1:]]


def _split_batch(batch) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple) and len(batch) == 2):
        raise ValueError(
            "batch must be a pair (inputs, targets), got "
            + (
                f"a tuple of length {len(batch)}."
                if isinstance(batch, tuple)
                else f"{type(batch).__name__}."
            )
        )
    return batch


@final
class QuadraticModel(eqx.Module):
    r"""The GN quadratic model of a loss at $\theta_0$ on one batch.

    Built by [`eqx_gn.quadratic_model`][]. It holds one linearization of the model and
    reuses it for every product: no method runs the model forward again. Vectors
    ``d`` have the structure of ``eqx.filter(model, eqx.is_inexact_array)``.
    """

    outputs: PyTree[Array]
    targets: Any
    loss: AbstractLoss
    blocks: Blocks
    loss_value: Scalar
    params: Params
    linear_map: Callable
    axis_name: AxisName = eqx.field(static=True)
    stack: StackLinearization | None = None

    # ------------------------------------------------------------ internals
    def _block_maps(self, b: int):
        """``(members, whole, linear_b)``: block ``b``'s ``(leaf, index)`` members
        (see [`Blocks.members`][eqx_gn.Blocks.members]), whether it holds every
        parameter whole, and the tangent map restricted to it.

        ``linear_b`` takes one tangent per member: the whole leaf, or for a slice
        ``leaf[i]`` of a stacked leaf the slice, scattered into zeros at ``i`` (its
        transpose takes slice ``i`` of the full cotangent).

        The one-block fast path (``whole=True``, full GN): the restriction is the
        linear map itself, so no zero tangents are built and ``_per_block`` calls
        it directly instead of through ``jax.jvp``. The general path would give the
        same numbers, but its JVP-of-a-linear-map trick (needed to prune the other
        blocks) costs a second trace of the tangent pass and a dead primal half
        that only ``jit`` removes; outside ``jit`` (eager ``gnvp`` calls, tests) it
        would actually run.
        """
        leaves, treedef = jax.tree.flatten(self.params)
        members = self.blocks.members(b)
        if len(members) == len(leaves) and all(i is None for _, i in members):
            return (
                members,
                True,
                lambda xs: self.linear_map(jax.tree.unflatten(treedef, xs)),
            )

        def linear_b(xs):
            full = [jnp.zeros_like(x) for x in leaves]
            for (j, i), x in zip(members, xs, strict=True):
                full[j] = x if i is None else full[j].at[i].set(x)
            return self.linear_map(jax.tree.unflatten(treedef, full))

        return members, False, linear_b

    def _layer_groups(self):
        """The blocks of each stacked module that ``_per_block`` computes in one
        ``jax.vmap`` over the layer index: ``(layers, stacked, joined)`` with
        ``layers[i]`` the block of layer ``i``, ``stacked`` the stacked leaves (every
        layer block holds slice ``i`` of each) and ``joined`` the whole leaves some
        layer block also holds. Every other block is computed on its own."""
        blocks = self.blocks
        groups = {}
        for j, layers in enumerate(blocks.layer_blocks):
            if layers is not None:
                groups.setdefault(layers, []).append(j)
        out = []
        for layers, stacked in groups.items():
            if len(set(layers)) != len(layers):  # pragma: no cover - not built
                continue
            shared = [
                j
                for j, ls in enumerate(blocks.layer_blocks)
                if ls is not None and set(ls) & set(layers)
            ]
            if sorted(shared) != sorted(stacked):  # pragma: no cover - not built
                continue
            joined = [j for j, o in enumerate(blocks.leaf_block) if o in layers]
            out.append((layers, tuple(stacked), tuple(joined)))
        return out

    def _gates(self, layers, joined) -> list[Array]:
        """``gates[k][i]``: whether joined leaf ``joined[k]`` is in layer ``i``'s
        block, as 0 or 1."""
        return [
            jnp.asarray(
                [self.blocks.leaf_block[j] == b for b in layers],
                dtype=self.loss_value.dtype,
            )
            for j in joined
        ]

    def _per_layer(self, d_leaves, layers, stacked, joined, output_fn):
        """The blocks of one stacked module, one layer after another in a
        ``jax.lax.map`` over the layer index ``i``: the tangent is slice ``i`` of the
        stacked leaves' ``d`` (one-hot along their leading axis) and the joined whole
        leaves of layer ``i``'s block. Returns the summed values and the cotangents of
        ``stacked`` and ``joined``.

        Inside a scan linearized whole the zero layers cannot be pruned, so this is
        ``L`` full tangent passes (the unscanned model's pruned passes cost about half
        as much), but one traced program whatever ``L``. A model given as a
        ``LayerScan`` takes ``StackLinearization.per_layer`` instead, which starts
        each pass at its layer. The layers go one at a time, not in a
        ``vmap``: a ``vmap`` held ``L`` tangent passes in memory at once (4.7x the
        full product's temporaries at 12 layers, against 1.3x this way).
        """
        leaves, treedef = jax.tree.flatten(self.params)
        num_layers = len(layers)
        gates = self._gates(layers, joined)

        def one_layer(i, xs_stacked, gates_i):
            def linear_i(xs):
                xs_s, xs_j = xs
                full = [jnp.zeros_like(x) for x in leaves]
                for j, x in zip(stacked, xs_s, strict=True):
                    hot = (jnp.arange(num_layers) == i).astype(x.dtype)
                    full[j] = hot.reshape((num_layers,) + (1,) * x.ndim) * x[None]
                for j, x, g in zip(joined, xs_j, gates_i, strict=True):
                    full[j] = g.astype(x.dtype) * x
                return self.linear_map(jax.tree.unflatten(treedef, full))

            xs = (xs_stacked, [d_leaves[j] for j in joined])
            # As in _per_block: the JVP of the linear map prunes the zero leaves.
            _, u = jax.jvp(linear_i, (xs,), (xs,))
            value, r = output_fn(u)
            (ct,) = jax.linear_transpose(linear_i, xs)(r)
            return value, ct

        values, (ct_s, ct_j) = jax.lax.map(
            lambda args: one_layer(*args),
            (jnp.arange(num_layers), [d_leaves[j] for j in stacked], gates),
        )
        return jnp.sum(values), list(ct_s), [c.sum(axis=0) for c in ct_j]

    def _per_block(self, d: Any, output_fn, what: str, local_values: bool):
        """Sum over blocks of ``output_fn(J_b d_b) -> (value, r_b)``, and the
        param-space vector whose block b is ``J_b^T r_b``. With ``local_values``,
        the values are per-shard partial sums, summed over the axis once at the end.
        The layer blocks of a stacked module are computed together (``_per_layer``).
        """
        d_leaves = as_varying(check_like_params(d, self.params, what), self.axis_name)
        out = [None] * len(d_leaves)
        total = jnp.zeros((), self.loss_value.dtype)
        done = None
        in_groups = set()
        for layers, stacked, joined in self._layer_groups():
            in_groups.update(layers)
            if self.stack is not None and self.stack.fast(stacked, joined):
                value, ct_s, ct_j = self.stack.per_layer(
                    self.params,
                    d_leaves,
                    stacked,
                    joined,
                    self._gates(layers, joined),
                    output_fn,
                )
            else:
                value, ct_s, ct_j = self._per_layer(
                    d_leaves, layers, stacked, joined, output_fn
                )
            for j, x in zip(stacked + joined, ct_s + ct_j, strict=True):
                out[j] = x
            total = total + value
            done = (value, ct_s + ct_j)
        for b in range(self.blocks.num_blocks):
            if b in in_groups:
                continue
            members, whole, linear_b = self._block_maps(b)
            d_b = [d_leaves[j] if i is None else d_leaves[j][i] for j, i in members]
            if done is not None:
                d_b = _after(d_b, done)
            if whole:
                u_b = linear_b(d_b)
            else:
                # linear_b is linear, so its JVP at any point is linear_b(d_b). The
                # JVP sees the other blocks' tangents as symbolic zeros and prunes
                # them; its primal half is dead code that jit removes.
                _, u_b = jax.jvp(linear_b, (d_b,), (d_b,))
            value_b, r_b = output_fn(u_b)
            (ct_b,) = jax.linear_transpose(linear_b, d_b)(r_b)
            for (j, i), x in zip(members, ct_b, strict=True):
                if i is None:
                    out[j] = x
                else:  # pragma: no cover - stacked blocks go through _per_layer
                    acc = jnp.zeros_like(d_leaves[j]) if out[j] is None else out[j]
                    out[j] = acc.at[i].set(x)
            total = total + value_b
            done = (value_b, ct_b)
        out = psum(out, self.axis_name)
        if local_values:
            total = psum(total, self.axis_name)
        return total, jax.tree.unflatten(jax.tree.structure(self.params), out)

    def _curvature(self):
        return self.loss.curvature(self.outputs, self.targets, axis_name=self.axis_name)

    # --------------------------------------------------------------- public
    @typecheck
    def jvp(self, d: Params) -> PyTree[Array]:
        r"""The output-space tangent $J d$ (full Jacobian, all blocks)."""
        leaves = as_varying(check_like_params(d, self.params, "d"), self.axis_name)
        return self.linear_map(
            jax.tree.unflatten(jax.tree.structure(self.params), leaves)
        )

    @typecheck
    def gradient(self) -> Params:
        r"""The loss gradient $g = J^\top g_0$ at $\theta_0$ (equal to ``jax.grad``)."""
        g0 = self.loss.grad(self.outputs, self.targets, axis_name=self.axis_name)
        primals = as_varying(self.params, self.axis_name)
        (g,) = jax.linear_transpose(self.linear_map, primals)(g0)
        return psum(g, self.axis_name)

    @typecheck
    def gnvp(self, v: Params) -> Params:
        r"""The GN-vector product $G v$ (block-diagonal when there are several blocks)."""

        _, hvp = self._curvature()

        def output_fn(u):
            return jnp.zeros((), self.loss_value.dtype), hvp(u)

        return self._per_block(v, output_fn, "tangent", local_values=True)[1]

    @typecheck
    def curvature(self, v: Params) -> Scalar:
        r"""$v^\top G v$, the model's curvature along $v$ (block-diagonal $G$ when
        there are several blocks): one tangent pass per block and no transpose,
        so it costs about a third of [`gnvp`][eqx_gn.QuadraticModel.gnvp]."""
        _, hvp = self._curvature()

        def output_fn(u):
            # Only the value is used: the zero cotangent's transpose is dead code
            # that jit removes.
            return tree_vdot(u, hvp(u)), jax.tree.map(jnp.zeros_like, u)

        return self._per_block(v, output_fn, "v", local_values=True)[0]

    @typecheck
    def value_and_grad(self, d: Params) -> tuple[Scalar, Params]:
        r"""$q(d)$ and $\nabla q(d) = g + G d$, sharing one tangent pass per block."""
        g0, hvp = self._curvature()

        def output_fn(u):
            hu = hvp(u)
            value = tree_vdot(g0, u) + 0.5 * tree_vdot(u, hu)
            return value, jax.tree.map(jnp.add, g0, hu)

        value, grad = self._per_block(d, output_fn, "d", local_values=True)
        return self.loss_value + value, grad

    @typecheck
    def value(self, d: Params) -> Scalar:
        r"""$q(d)$."""
        return self.value_and_grad(d)[0]

    @typecheck
    def grad(self, d: Params) -> Params:
        r"""$\nabla q(d) = g + G d$."""
        return self.value_and_grad(d)[1]

    @typecheck
    def linearized_loss_value_and_grad(self, d: Params) -> tuple[Scalar, Params]:
        r"""The loss of the linearized model and its gradient (the prox-linear model).

        $$\ell(d) = L(z_0 + J d), \qquad \nabla \ell(d) = J^\top \nabla L(z_0 + J d);$$

        with several blocks, $\ell(d) = L(z_0) + \sum_b [L(z_0 + J_b d_b) - L(z_0)]$.
        """

        def output_fn(u):
            z = jax.tree.map(jnp.add, self.outputs, u)
            value = self.loss.value(z, self.targets, axis_name=self.axis_name)
            grad = self.loss.grad(z, self.targets, axis_name=self.axis_name)
            return value - self.loss_value, grad

        value, grad = self._per_block(d, output_fn, "d", local_values=False)
        return self.loss_value + value, grad


@typecheck
def quadratic_model(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    *,
    loss: AbstractLoss,
    blocks: Blocks | None = None,
    axis_name: AxisName = None,
) -> QuadraticModel:
    r"""Linearize ``fn(model, inputs)`` once at ``model`` and return the GN quadratic
    model of ``loss`` on ``batch = (inputs, targets)``.

    **Arguments:**

    - ``fn``: applies the model, ``fn(model, inputs) -> outputs``.
    - ``model``: the Equinox model at the linearization point $\theta_0$; its
      parameters are its ``eqx.is_inexact_array`` leaves.
    - ``batch``: ``(inputs, targets)``.
    - ``loss``: an [`eqx_gn.AbstractLoss`][], a mean over positions.
    - ``blocks``: an [`eqx_gn.Blocks`][] partition for the block-diagonal
      (layerwise) model; ``None`` for the full one.
    - ``axis_name``: inside ``shard_map``/``pmap`` over a batch axis, its name;
      products are then summed over the shards exactly once.
    """
    inputs, targets = _split_batch(batch)
    if blocks is None:
        blocks = Blocks.full(model)
    else:
        blocks.check_model(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = as_varying(params, axis_name)

    def apply(p):
        return fn(eqx.combine(p, static), inputs)

    if isinstance(fn, LayerScan):
        positions = stack_leaves(fn, params, static)
    try:
        if isinstance(fn, LayerScan):
            outputs, stack = linearize_layer_scan(fn, positions, params, static, inputs)
            linear_map = stack.linear_map
        else:
            outputs, linear_map = jax.linearize(apply, params)
            stack = None
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"quadratic_model: fn(model, inputs) failed on "
            f"{describe_leaves(inputs, 'inputs')} ({first_line(e)}); batch is one "
            "batch (inputs, targets), not a stack of micro-batches."
        ) from e
    loss_value = loss.value(outputs, targets, axis_name=axis_name)
    return QuadraticModel(
        outputs=outputs,
        targets=targets,
        loss=loss,
        blocks=blocks,
        loss_value=loss_value,
        params=params,
        linear_map=linear_map,
        axis_name=axis_name,
        stack=stack,
    )


@eqx.filter_jit
@typecheck
def gnvp(
    fn: ApplyFn,
    model: Model,
    batch: Batch,
    tangent: PyTree[Float[Array, "..."]],
    *,
    loss: AbstractLoss,
    blocks: Blocks | None = None,
    axis_name: AxisName = None,
) -> PyTree[Float[Array, "..."]]:
    r"""The Gauss-Newton-vector product $G v = J^\top H J v$.

    $G$ is the GN matrix of the mean ``loss`` of ``fn(model, inputs)`` on ``batch =
    (inputs, targets)`` at ``model``; with ``blocks``, its block-diagonal part.
    ``tangent`` and the result have the structure of ``eqx.filter(model,
    eqx.is_inexact_array)``. Matrix-free: one linearization, one tangent pass and
    one transpose per block. See [`eqx_gn.quadratic_model`][] for the arguments.

    ```python
    model = eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0))
    x, y = jnp.ones((16, 8)), jnp.zeros(16, int)  # one batch
    v = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    gv = eqx_gn.gnvp(
        lambda m, x: jax.vmap(m)(x), model, (x, y), v,
        loss=eqx_gn.SoftmaxCrossEntropy(),
    )  # same structure as v
    ```
    """
    model_q = quadratic_model(
        fn, model, batch, loss=loss, blocks=blocks, axis_name=axis_name
    )
    return model_q.gnvp(tangent)
