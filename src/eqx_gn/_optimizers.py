"""The optax optimizers the paper uses, for Equinox parameter trees."""

import equinox as eqx
import jax
import optax
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from ._custom_types import FilterSpec
from ._misc import is_none
from ._sharding import has_explicit_axes


def _on_whole_arrays(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """``inner`` on whole (replicated) copies of explicitly sharded leaves, its
    updates put back onto each leaf's sharding.

    Muon's Newton-Schulz iteration multiplies a matrix by its transpose, which is
    ambiguous on an explicit-sharding mesh when the matrix is split (FSDP), so the
    matrix is gathered first, as FSDP gathers weights for a layer's computation.
    Its state is then replicated. Without explicit axes this changes nothing.
    """

    def gather(tree):
        return jax.tree.map(
            lambda x: jax.sharding.reshard(x, P()) if has_explicit_axes(x) else x,
            tree,
        )

    def init(params):
        return inner.init(gather(params))

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        specs = [
            jax.typeof(u).sharding.spec if has_explicit_axes(u) else None
            for u in leaves
        ]
        params = None if params is None else gather(params)
        new, state = inner.update(gather(updates), state, params)
        new_leaves = [
            u if spec is None else jax.sharding.reshard(u, spec)
            for u, spec in zip(jax.tree.leaves(new), specs, strict=True)
        ]
        return jax.tree.unflatten(treedef, new_leaves), state

    return optax.GradientTransformation(init, update)


def _muon_dimension_numbers(adam_filter: FilterSpec | None, reduction: int):
    # Axes counted from the end: a 3-D leaf (L, ., .) is L stacked matrices, and
    # optax treats every axis that is neither the reduction nor the output axis as a
    # batch axis, orthogonalising (and scaling) each layer's matrix on its own.
    dims = MuonDimensionNumbers(
        reduction_axis=reduction - 2, output_axis=-1 - reduction
    )

    def dimension_numbers(params):
        if adam_filter is None:
            to_adam = jax.tree.map(lambda _: False, params)
        else:
            selected = eqx.filter(params, adam_filter)
            to_adam = jax.tree.map(
                lambda p, s: p is not None and s is not None,
                params,
                selected,
                is_leaf=is_none,
            )
        return jax.tree.map(
            lambda p, a: (
                dims if (p is not None and p.ndim in (2, 3) and not a) else None
            ),
            params,
            to_adam,
            is_leaf=is_none,
        )

    return dimension_numbers


def muon_adamw(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    adam_filter: FilterSpec | None = None,
    momentum: float = 0.95,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    weight_layout: str = "out_in",
) -> optax.GradientTransformation:
    """Muon on weight matrices, AdamW on everything else.

    Muon (``optax.contrib.muon``: Nesterov momentum orthogonalised by a Newton-Schulz
    iteration) updates every 2-D parameter that ``adam_filter`` does not select, and
    every 3-D one as a stack of matrices along its leading axis (the stacked layers
    of a scanned model, e.g. ``LMConfig.scan_layers``): each layer's matrix is
    orthogonalised and scaled on its own, as if it were a separate 2-D parameter
    (a stacked vector, ``(L, n)``, looks like a matrix: select it with
    ``adam_filter``, as [`eqx_gn.lm.embedding_and_head`][] does for a scanned model);
    AdamW updates 1-D parameters (norm scales, biases) and whatever ``adam_filter``
    selects (an Equinox filter spec over the parameters, e.g. the embedding and the
    output head, as in the paper). Gradients are first clipped to global norm
    ``max_grad_norm`` (``None`` for no clipping). ``weight_layout`` says how 2-D
    weights are stored: ``"out_in"`` (``eqx.nn.Linear``'s ``(out, in)``, the
    default) or ``"in_out"`` (``x @ W`` layouts); Muon's shape-dependent scale
    depends on it. On an explicit-sharding mesh, each sharded matrix is gathered
    whole for the Newton-Schulz iteration and its update split again afterwards.
    """
    if weight_layout not in ("out_in", "in_out"):
        raise ValueError(
            f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}."
        )
    reduction = 1 if weight_layout == "out_in" else 0
    muon = optax.contrib.muon(
        learning_rate,
        beta=momentum,
        weight_decay=weight_decay,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_weight_decay=weight_decay,
        muon_weight_dimension_numbers=_muon_dimension_numbers(adam_filter, reduction),
    )
    muon = _on_whole_arrays(muon)
    if max_grad_norm is None:
        return muon
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), muon)
