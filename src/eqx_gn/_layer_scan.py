r"""Apply functions that show eqx_gn their scanned layer stack.

A model whose layers are one stacked module applied with ``jax.lax.scan`` is
linearized, by ``jax.linearize``, as one opaque linear map: the tangent pass of
layer $l$'s block then runs through all $L$ layers, because a scan cannot skip the
zero tangents of the layers before $l$. A [`LayerScan`][eqx_gn.LayerScan] gives the
model's function in three parts around the stack,

$$f(\theta, x) = \mathrm{after}\big(\theta,\ \ell_{L-1} \circ \dots \circ \ell_0
(\mathrm{before}(\theta, x))\big), \qquad \ell_k = \mathrm{layer}(\theta_k, \cdot),$$

so that the quadratic model can linearize each layer on its own and start layer
$l$'s tangent pass at layer $l$: its products cost the layers from $l$ on, not all
$L$ (the unscanned model's pruned cost), and still trace one program whatever $L$.
"""

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from ._blocks import filter_mask
from ._custom_types import Model
from ._misc import first_line


@final
class LayerScan(eqx.Module):
    r"""An apply function ``fn(model, inputs)`` whose layer stack eqx_gn can see.

    ``fn(model, inputs)`` computes ``before(model, inputs)``, applies
    ``layer(layer_i, carry)`` for each layer ``layer_i`` of the stacked module
    ``stack(model)`` in a ``jax.lax.scan``, and returns ``after(model, carry)``.
    ``stack(model)`` is the stacked module whose inexact-array leaves all have the
    leading layer axis, the one [`eqx_gn.Blocks.from_stacked_layers`][] takes.

    Use it wherever an apply function goes (``GaussNewton(fn, ...)``,
    [`eqx_gn.quadratic_model`][], [`eqx_gn.gnvp`][]): every product equals the same
    product of the plain function. With layerwise blocks built by
    ``Blocks.from_stacked_layers(model, stack)``, the per-layer products start their
    tangent pass at their own layer instead of running through the whole stack,
    about half the cost at depth 12. That needs ``before`` not to read the stacked
    weights nor the parameters ``join`` adds to a layer's block, and ``after`` not
    to read the stacked weights; otherwise the products take the general path (the
    same numbers, at the general cost).

    ```python
    fn = eqx_gn.LayerScan(
        before=lambda m, x: jax.vmap(m.inp)(x),
        layer=lambda layer, h: jax.vmap(layer)(h),
        after=lambda m, h: jax.vmap(m.out)(h),
        stack=lambda m: m.layers,
    )
    ```
    """

    before: Callable[[Any, Any], Any]
    layer: Callable[[Any, Any], Any]
    after: Callable[[Any, Any], Any]
    stack: Callable[[Any], Any]

    def __call__(self, model: Model, inputs: Any) -> Any:
        carry = self.before(model, inputs)
        arrays, static = eqx.partition(self.stack(model), eqx.is_array)

        def step(carry, arrays_k):
            return self.layer(eqx.combine(arrays_k, static), carry), None

        carry, _ = jax.lax.scan(step, carry, arrays)
        return self.after(model, carry)


def _reads(fn: Callable, *args) -> set[int]:
    """Which of ``fn``'s flattened array arguments its jaxpr reads (conservatively:
    used by any equation, or returned)."""
    closed = jax.make_jaxpr(fn)(*args)
    used = set()
    for eqn in closed.jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, jex.Literal))
    used.update(v for v in closed.jaxpr.outvars if not isinstance(v, jex.Literal))
    return {i for i, v in enumerate(closed.jaxpr.invars) if v in used}


def _prune(linear: Callable, x: Any) -> Any:
    """``linear(x)`` for a linear ``linear``, as its JVP at ``x``: zero tangents
    that ``linear`` builds inside are symbolic, so their paths are not computed
    (the primal half is dead code that ``jit`` removes)."""
    return jax.jvp(linear, (x,), (x,))[1]


@final
class StackLinearization(eqx.Module):
    """A [`LayerScan`][eqx_gn.LayerScan] model linearized in parts: ``before`` and
    ``after`` as linear maps of the parameters (and, for ``after``, the carry), and
    each layer's linear map ``(carry, layer params) -> carry`` closure-converted, its
    residuals stacked along the layer axis."""

    linear_before: Callable
    linear_after: Callable
    residuals: Any
    layer_static: Any = eqx.field(static=True)
    carry: Any  # the carry entering the stack: zeros of its shapes and shardings
    stack_treedef: Any = eqx.field(static=True)
    stack_leaves: tuple[int, ...] = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    before_reads: frozenset[int] = eqx.field(static=True)
    after_reads: frozenset[int] = eqx.field(static=True)

    def _layer(self, k) -> Callable:
        """Layer ``k``'s linear map ``(carry tangent, layer params tangent)``."""
        res_k = jax.tree.map(lambda r: r[k], self.residuals)
        return eqx.combine(res_k, self.layer_static)

    def _stack_tree(self, leaves: list) -> Any:
        return jax.tree.unflatten(self.stack_treedef, leaves)

    def linear_map(self, d: Any) -> Any:
        """$J d$ through the parts: the whole model's tangent map."""
        leaves = jax.tree.leaves(d)
        t = self.linear_before(d)
        d_stack = self._stack_tree([leaves[j] for j in self.stack_leaves])

        def step(t, xs):
            # The residuals go in as scanned inputs, not indexed by the layer: a
            # transposed scan would keep the indexed slices as a second copy.
            res_k, d_k = xs
            return eqx.combine(res_k, self.layer_static)(t, d_k), None

        t, _ = jax.lax.scan(step, t, (self.residuals, d_stack))
        return self.linear_after(d, t)

    def fast(self, stacked: tuple[int, ...], joined: tuple[int, ...]) -> bool:
        """Whether the layer blocks of ``stacked`` (with ``joined`` whole leaves) can
        start at their layer: the blocks' stacked leaves are this stack's, and
        neither ``before`` nor ``after`` reads them, nor ``before`` the joined."""
        stack = set(self.stack_leaves)
        return (
            tuple(stacked) == self.stack_leaves
            and not stack & (self.before_reads | self.after_reads)
            and not set(joined) & self.before_reads
        )

    def per_layer(self, params, d_leaves, stacked, joined, gates, output_fn):
        """The layer blocks, one after another (``jax.lax.map`` over ``l``): layer
        ``l``'s tangent starts at layer ``l`` and runs through layers ``l+1..L-1``
        and ``after`` (with the joined leaves of ``l``'s block, gated); the
        transpose runs back to layer ``l``. ``params`` are the parameters (for
        zeros), ``stacked`` must equal ``stack_leaves``. Returns the summed values
        and the cotangents of ``stacked`` and ``joined``, as
        ``QuadraticModel._per_layer`` does."""
        assert tuple(stacked) == self.stack_leaves
        leaves, treedef = jax.tree.flatten(params)
        zero_carry = jax.tree.map(jnp.zeros_like, self.carry)

        def after_map(gates_l):
            def linear(xs_j, t):
                full = [jnp.zeros_like(x) for x in leaves]
                for j, x, g in zip(joined, xs_j, gates_l, strict=True):
                    full[j] = g.astype(x.dtype) * x
                return self.linear_after(jax.tree.unflatten(treedef, full), t)

            return linear

        def branch_index(k, layer):
            # 0 before layer l (the tangent is still zero), 1 at l, 2 after it.
            return (k >= layer).astype(jnp.int32) + (k > layer).astype(jnp.int32)

        def one_layer(args):
            layer, v_leaves, gates_l = args
            v = self._stack_tree(v_leaves)
            zero_v = jax.tree.map(jnp.zeros_like, v)

            def forward(t, k):
                lin = self._layer(k)
                branches = [
                    lambda: t,
                    lambda: _prune(lambda x: lin(zero_carry, x), v),
                    lambda: _prune(lambda x: lin(x, zero_v), t),
                ]
                return jax.lax.switch(branch_index(k, layer), branches), None

            t, _ = jax.lax.scan(forward, zero_carry, jnp.arange(self.num_layers))
            linear = after_map(gates_l)
            xs_j = [d_leaves[j] for j in joined]
            u = jax.jvp(linear, (xs_j, t), (xs_j, t))[1]
            value, r = output_fn(u)
            ct_j, ct_t = jax.linear_transpose(linear, xs_j, t)(r)

            def backward(carry, k):
                ct_t, ct_v = carry
                lin = self._layer(k)

                def into():
                    (ct,) = jax.linear_transpose(lambda x: lin(zero_carry, x), v)(ct_t)
                    return ct_t, ct

                def through():
                    (ct,) = jax.linear_transpose(lambda x: lin(x, zero_v), t)(ct_t)
                    return ct, ct_v

                branches = [lambda: (ct_t, ct_v), into, through]
                return jax.lax.switch(branch_index(k, layer), branches), None

            (_, ct_v), _ = jax.lax.scan(
                backward, (ct_t, zero_v), jnp.arange(self.num_layers), reverse=True
            )
            return value, jax.tree.leaves(ct_v), ct_j

        values, ct_s, ct_j = jax.lax.map(
            one_layer,
            (jnp.arange(self.num_layers), [d_leaves[j] for j in stacked], gates),
        )
        return jnp.sum(values), list(ct_s), [c.sum(axis=0) for c in ct_j]


def stack_leaves(fn: LayerScan, params: Any, static: Any) -> tuple[int, ...]:
    """The positions, in flatten order of ``params``, of the parameters of
    ``fn.stack(model)``, after checking that they share a leading layer axis."""
    model = eqx.combine(params, static)
    nothing = jax.tree.map(lambda _: False, model)
    try:
        spec = eqx.tree_at(
            fn.stack,
            nothing,
            replace_fn=lambda node: jax.tree.map(lambda _: True, node),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"LayerScan: stack(model) is not a part of the model ({first_line(e)})."
        ) from e
    positions = tuple(int(j) for j in np.flatnonzero(filter_mask(model, spec)))
    leaves = jax.tree.leaves(params)
    sizes = {leaves[j].shape[0] if leaves[j].ndim else None for j in positions}
    if not positions or len(sizes) != 1 or None in sizes:
        raise ValueError(
            "LayerScan: stack(model) must hold parameters that all have the same "
            f"leading (layer) axis; their leading sizes are {sorted(sizes, key=str)}."
        )
    return positions


def linearize_layer_scan(
    fn: LayerScan, positions: tuple[int, ...], params: Any, static: Any, inputs: Any
) -> tuple[Any, StackLinearization]:
    """``(outputs, StackLinearization)``: ``fn`` linearized at ``params`` (the
    model's inexact arrays; ``static`` the rest) on ``inputs``, in parts;
    ``positions`` from ``stack_leaves``."""
    leaves = jax.tree.leaves(params)
    model = eqx.combine(params, static)
    arrays, layer_static = eqx.partition(fn.stack(model), eqx.is_array)
    theta, other = eqx.partition(arrays, eqx.is_inexact_array)

    def before(p):
        return fn.before(eqx.combine(p, static), inputs)

    carry, linear_before = jax.linearize(before, params)
    statics = []

    def step(carry, xs):
        theta_k, other_k = xs

        def layer(c, th):
            return fn.layer(eqx.combine(th, other_k, layer_static), c)

        out, linear = jax.linearize(layer, carry, theta_k)
        converted = eqx.filter_closure_convert(linear, carry, theta_k)
        residuals_k, converted_static = eqx.partition(converted, eqx.is_array)
        statics.append(converted_static)
        return out, residuals_k

    last, residuals = jax.lax.scan(step, carry, (theta, other))

    def after(p, c):
        return fn.after(eqx.combine(p, static), c)

    outputs, linear_after = jax.linearize(after, params, last)
    num_leaves = len(leaves)
    stack = StackLinearization(
        linear_before=linear_before,
        linear_after=linear_after,
        residuals=residuals,
        layer_static=statics[-1],
        carry=carry,
        stack_treedef=jax.tree.structure(theta),
        stack_leaves=positions,
        num_layers=leaves[positions[0]].shape[0],
        before_reads=frozenset(_reads(linear_before, params)),
        after_reads=frozenset(
            i for i in _reads(linear_after, params, last) if i < num_leaves
        ),
    )
    return outputs, stack
