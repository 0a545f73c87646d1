r"""Partitions of a model's parameters into named blocks.

A [`Blocks`][eqx_gn.Blocks] is the only thing that tells full GN (one block) from
layerwise GN (one block per layer): the GN matrix restricted to a partition
$\{B_1, \dots, B_n\}$ keeps the diagonal blocks $G_{bb} = J_b^\top H J_b$ and drops
the cross terms.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._custom_types import FilterSpec, Model, typecheck
from ._misc import first_line, is_none


def _params_with_paths(model: Model) -> tuple[list[str], Any]:
    """Paths of the parameter leaves, and the treedef of the filtered model."""
    params = eqx.filter(model, eqx.is_inexact_array)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in with_paths], treedef


def _remainder_masks(
    model: Model, remainder: dict[str, FilterSpec] | None, taken: np.ndarray
) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Each remainder block's mask (what its spec selects that no block before it
    took), in order, and every leaf taken after them; ``ValueError`` for a
    remainder block that selects nothing new."""
    blocks, taken = [], taken.copy()
    for name, spec in (remainder or {}).items():
        mask = filter_mask(model, spec) & ~taken
        if not mask.any():
            raise ValueError(
                f"remainder block {name!r} selects no parameter outside the layers."
            )
        blocks.append((name, mask))
        taken |= mask
    return blocks, taken


def filter_mask(model: Model, spec: FilterSpec) -> np.ndarray:
    """Which parameter leaves (in flatten order) a filter spec selects."""
    params = eqx.filter(model, eqx.is_inexact_array)
    try:
        selected = eqx.filter(model, spec)
    except ValueError as e:
        raise ValueError(
            "Blocks: a filter spec is not a prefix of the model "
            f"({type(e).__name__}: {' '.join(str(e).split())})."
        ) from e
    # Flatten keeping None so that both trees line up leaf for leaf.
    p = jax.tree.leaves(params, is_leaf=is_none)
    s = jax.tree.leaves(selected, is_leaf=is_none)
    if len(p) != len(s):  # pragma: no cover - eqx.filter preserves structure
        raise ValueError("filter spec changed the structure of the model")
    return np.asarray(
        [sel is not None for par, sel in zip(p, s, strict=True) if par is not None],
        dtype=bool,
    )


def _format_paths(paths: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    more = len(paths) - limit
    return shown + (f" and {more} more" if more > 0 else "")


@final
class Blocks(eqx.Module):
    """A disjoint, covering partition of a model's parameters into named blocks.

    The parameters are the model's ``eqx.is_inexact_array`` leaves. Build one with
    [`Blocks.full`][eqx_gn.Blocks.full], [`Blocks.from_filters`][eqx_gn.Blocks.from_filters],
    [`Blocks.from_layers`][eqx_gn.Blocks.from_layers] or, for a stack of layers
    stored as one module whose leaves have a leading layer axis (applied with
    ``jax.lax.scan``), [`Blocks.from_stacked_layers`][eqx_gn.Blocks.from_stacked_layers];
    every constructor checks that the blocks are non-empty, disjoint and cover every
    parameter, and names the offending leaves by their path when they are not.

    A block holds whole leaves and, for stacked leaves, slices ``leaf[i]`` along the
    leading axis. ``leaf_block[j]`` is the block of whole leaf ``j``, or ``-1`` for a
    stacked leaf, whose slices' blocks are ``layer_blocks[j]`` (one per index along
    the leading axis; ``None`` for whole leaves).

    ```python
    model = eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0))
    full = eqx_gn.Blocks.full(model)  # one block: full GN
    layerwise = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)  # 3 blocks
    gn = eqx_gn.GaussNewton(apply, eqx_gn.SoftmaxCrossEntropy(), blocks=layerwise)
    ```
    """

    names: tuple[str, ...] = eqx.field(static=True)
    leaf_block: tuple[int, ...] = eqx.field(static=True)
    leaf_paths: tuple[str, ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)
    layer_blocks: tuple[tuple[int, ...] | None, ...] = eqx.field(static=True)

    # ------------------------------------------------------------------ builders
    @classmethod
    @typecheck
    def full(cls, model: Model, name: str = "all") -> "Blocks":
        """One block holding every parameter: full (not layerwise) GN."""
        return cls.from_filters(model, [eqx.is_inexact_array], names=[name])

    @classmethod
    @typecheck
    def from_filters(
        cls,
        model: Model,
        filters: Sequence[FilterSpec],
        names: Sequence[str] | None = None,
    ) -> "Blocks":
        """One block per Equinox filter spec.

        Each spec is what ``eqx.filter`` takes: a callable on leaves, or a bool PyTree
        that is a prefix of ``model``. Raises ``ValueError`` when a block is empty,
        two blocks share a parameter, or a parameter is in no block.
        """
        filters = list(filters)
        if names is None:
            names = [f"block{i}" for i in range(len(filters))]
        names = [str(n) for n in names]
        if len(names) != len(filters):
            raise ValueError(f"got {len(filters)} filters but {len(names)} names.")
        if not filters:
            raise ValueError("at least one block is needed.")
        return cls._from_masks(model, [filter_mask(model, f) for f in filters], names)

    @classmethod
    @typecheck
    def from_layers(
        cls,
        model: Model,
        layers: Callable[[Model], Sequence[Any]],
        *,
        names: Sequence[str] | None = None,
        remainder: Mapping[str, FilterSpec] | None = None,
        rest: str = "rest",
    ) -> "Blocks":
        """One block per element of a sequence of submodules, plus remainder blocks.

        ``layers(model)`` returns the sequence (``lambda m: m.blocks``, say). Each
        parameter outside it goes to the first ``remainder`` filter that selects it,
        in the mapping's order (``{"embedding": lambda m: ..., "head": ...}`` as bool
        prefixes, or callables on leaves); whatever is still left forms a block named
        ``rest``.
        """
        seq = list(layers(model))
        if not seq:
            raise ValueError("layers(model) returned an empty sequence.")
        names = [f"layer{i}" for i in range(len(seq))] if names is None else list(names)
        if len(names) != len(seq):
            raise ValueError(
                f"layers(model) has {len(seq)} elements but got {len(names)} names."
            )
        nothing = jax.tree.map(lambda _: False, model)
        specs = []
        for i in range(len(seq)):
            try:
                specs.append(
                    eqx.tree_at(lambda m, i=i: layers(m)[i], nothing, replace=True)
                )
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"Blocks.from_layers: layers(model)[{i}] (a "
                    f"{type(seq[i]).__name__}) is not a part of the model "
                    f"({first_line(e)})."
                ) from e
        masks = [filter_mask(model, s) for s in specs]
        all_names = list(names)
        extra, taken = _remainder_masks(model, remainder, np.any(masks, axis=0))
        for name, mask in extra:
            masks.append(mask)
            all_names.append(name)
        if not taken.all():
            masks.append(~taken)
            all_names.append(rest)
        return cls._from_masks(model, masks, all_names)

    @classmethod
    @typecheck
    def from_stacked_layers(
        cls,
        model: Model,
        stacked: Callable[[Model], Any],
        *,
        names: Sequence[str] | None = None,
        remainder: Mapping[str, FilterSpec] | None = None,
        rest: str = "rest",
        join: Mapping[int, FilterSpec] | None = None,
    ) -> "Blocks":
        """One block per layer of a stacked module, plus remainder blocks.

        ``stacked(model)`` is a submodule whose parameters all have a leading axis of
        the same size $L$: the layers' weights stacked, applied with ``jax.lax.scan``
        (``lambda m: m.blocks``, say). Block ``i`` holds the slices ``leaf[i]`` of all
        of them, so the blocks equal ``from_layers`` on the same layers kept as a
        list. ``join`` adds parameters outside the stack to a layer's block: ``{-1:
        spec}`` puts what ``spec`` selects (an Equinox filter spec) in the last
        layer's block. Every other parameter goes to the first ``remainder`` filter
        that selects it, in the mapping's order, and whatever is still left forms a
        block named ``rest``, as in [`from_layers`][eqx_gn.Blocks.from_layers].

        ``leaf_indices``, ``mask`` and ``paths`` of a layer's block name the stacked
        leaves it holds a slice of (``paths`` with the index, ``...weight[3]``);
        ``members`` gives ``(leaf, index)`` pairs. GN products compute the $L$ layer
        blocks one after another in one ``jax.lax.map`` over the layer index, so
        compile time does not grow with $L$; apply the model through an
        [`eqx_gn.LayerScan`][] for each layer block's pass to start at its layer.
        """
        try:
            part = stacked(model)
        except Exception as e:
            raise ValueError(
                f"Blocks.from_stacked_layers: stacked(model) failed ({first_line(e)})."
            ) from e
        nothing = jax.tree.map(lambda _: False, model)
        try:
            spec = eqx.tree_at(
                stacked,
                nothing,
                replace_fn=lambda node: jax.tree.map(lambda _: True, node),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Blocks.from_stacked_layers: stacked(model) (a {type(part).__name__}) "
                f"is not a part of the model ({first_line(e)})."
            ) from e
        paths, treedef = _params_with_paths(model)
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        in_stack = filter_mask(model, spec)
        if not in_stack.any():
            raise ValueError(
                "Blocks.from_stacked_layers: stacked(model) holds no parameter."
            )
        sizes = {}
        for j in np.flatnonzero(in_stack):
            shape = leaves[j].shape
            if not shape:
                raise ValueError(
                    f"Blocks.from_stacked_layers: stacked leaf {paths[j]} is a scalar; "
                    "stacked leaves need a leading layer axis."
                )
            sizes[int(j)] = shape[0]
        first = min(sizes)
        num_layers = sizes[first]
        for j, size in sizes.items():
            if size != num_layers:
                raise ValueError(
                    f"Blocks.from_stacked_layers: stacked leaf {paths[j]} has leading "
                    f"size {size} but {paths[first]} has {num_layers}; every leaf of "
                    "stacked(model) needs the same number of layers."
                )
        if names is None:
            names = [f"layer{i}" for i in range(num_layers)]
        names = [str(n) for n in names]
        if len(names) != num_layers:
            raise ValueError(
                f"stacked(model) has {num_layers} layers but got {len(names)} names."
            )
        # Whole leaves: joined to a layer, then remainder, then rest. Blocks 0..L-1
        # are the layers.
        owner = np.full(len(paths), -1)
        taken = in_stack.copy()
        for layer, jspec in (join or {}).items():
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"join key {layer} out of range for {num_layers} stacked layers."
                )
            mask = filter_mask(model, jspec) & ~taken
            if not mask.any():
                raise ValueError(
                    f"join[{layer}] selects no parameter outside the stacked layers."
                )
            owner[mask] = layer % num_layers
            taken |= mask
        all_names = list(names)
        extra, taken = _remainder_masks(model, remainder, taken)
        for name, mask in extra:
            owner[mask] = len(all_names)
            all_names.append(name)
        if not taken.all():
            owner[~taken] = len(all_names)
            all_names.append(rest)
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"block names must be unique, got {all_names}.")
        leaf_block = tuple(
            -1 if in_stack[j] else int(owner[j]) for j in range(len(paths))
        )
        layer_blocks = tuple(
            tuple(range(num_layers)) if in_stack[j] else None for j in range(len(paths))
        )
        return cls(tuple(all_names), leaf_block, tuple(paths), treedef, layer_blocks)

    @classmethod
    def _from_masks(cls, model: Model, masks: Sequence[np.ndarray], names) -> "Blocks":
        paths, treedef = _params_with_paths(model)
        if not paths:
            raise ValueError("the model has no inexact-array leaves (no parameters).")
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"block names must be unique, got {names}.")
        masks = np.stack(masks)
        for name, mask in zip(names, masks, strict=True):
            if not mask.any():
                raise ValueError(f"block {name!r} selects no parameter.")
        counts = masks.sum(axis=0)
        if (counts > 1).any():
            lines = []
            for i in np.flatnonzero(counts > 1):
                owners = [names[b] for b in np.flatnonzero(masks[:, i])]
                lines.append(f"{paths[i]} (in {', '.join(map(repr, owners))})")
            raise ValueError("blocks overlap: " + _format_paths(lines))
        if (counts == 0).any():
            missing = [paths[i] for i in np.flatnonzero(counts == 0)]
            raise ValueError("parameters in no block: " + _format_paths(missing))
        leaf_block = tuple(int(b) for b in masks.argmax(axis=0))
        return cls(
            tuple(names), leaf_block, tuple(paths), treedef, (None,) * len(paths)
        )

    def reordered(self, names: Sequence[str]) -> "Blocks":
        """The same partition with its blocks in the order of ``names`` (the same
        names, each once): for example a stacked-layers partition whose remainder
        blocks go before and after the layers.

        **Raises:** ``ValueError`` if ``names`` are not this partition's names."""
        if sorted(names) != sorted(self.names):
            raise ValueError(f"cannot reorder blocks {self.names} as {tuple(names)}.")
        new = {self.names.index(n): k for k, n in enumerate(names)}
        return Blocks(
            tuple(names),
            tuple(-1 if b < 0 else new[b] for b in self.leaf_block),
            self.leaf_paths,
            self.treedef,
            tuple(
                None if ls is None else tuple(new[b] for b in ls)
                for ls in self.layer_blocks
            ),
        )

    # ----------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        """The number of blocks."""
        return len(self.names)

    def members(self, block: int | str) -> tuple[tuple[int, int | None], ...]:
        """``(leaf, index)`` pairs of a block: the position of each leaf (in flatten
        order of the parameters) and ``None`` when the block holds the whole leaf, or
        ``i`` when it holds the slice ``leaf[i]`` of a stacked leaf."""
        b = self._index(block)
        out = []
        for j, (owner, layers) in enumerate(
            zip(self.leaf_block, self.layer_blocks, strict=True)
        ):
            if layers is None:
                if owner == b:
                    out.append((j, None))
            else:
                out.extend((j, i) for i, o in enumerate(layers) if o == b)
        return tuple(out)

    def leaf_indices(self, block: int | str) -> tuple[int, ...]:
        """Positions (in flatten order of the parameters) of the leaves a block holds,
        wholly or (for stacked leaves) a slice of."""
        return tuple(dict.fromkeys(j for j, _ in self.members(block)))

    def mask(self, block: int | str) -> PyTree[bool]:
        """A bool PyTree over the parameters, ``True`` on the leaves ``block`` holds,
        wholly or a slice of."""
        index = set(self.leaf_indices(block))
        return jax.tree.unflatten(
            self.treedef, [j in index for j in range(len(self.leaf_block))]
        )

    def paths(self, block: int | str) -> tuple[str, ...]:
        """The paths of the parameters in ``block``; a slice of a stacked leaf is its
        path with the index, ``.blocks.mlp.w1.weight[3]``."""
        return tuple(
            self.leaf_paths[j] + ("" if i is None else f"[{i}]")
            for j, i in self.members(block)
        )

    def _index(self, block: int | str) -> int:
        if isinstance(block, str):
            if block not in self.names:
                raise KeyError(f"no block named {block!r}; blocks are {self.names}.")
            return self.names.index(block)
        if not 0 <= block < len(self.names):
            raise IndexError(
                f"block {block} out of range for {len(self.names)} blocks."
            )
        return block

    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` unless these blocks partition ``model``'s parameters."""
        paths, treedef = _params_with_paths(model)
        if treedef != self.treedef:
            extra = sorted(set(paths) - set(self.leaf_paths))
            missing = sorted(set(self.leaf_paths) - set(paths))
            detail = []
            if extra:
                detail.append("parameters not covered: " + _format_paths(extra))
            if missing:
                detail.append("leaves the model lacks: " + _format_paths(missing))
            raise ValueError(
                "these Blocks were built for a model of another structure"
                + (": " + "; ".join(detail) if detail else ".")
            )
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        for j, layers in enumerate(self.layer_blocks):
            if layers is None:
                continue
            shape = jnp.shape(leaves[j])
            if not shape or shape[0] != len(layers):
                raise ValueError(
                    f"these Blocks split {paths[j]} into {len(layers)} layers, but "
                    f"the model's leaf has shape {shape}."
                )

    def __repr__(self) -> str:
        def describe(b):
            members = self.members(b)
            whole = sum(i is None for _, i in members)
            sliced = len(members) - whole
            return f"{whole} leaves" + (f" + {sliced} slices" if sliced else "")

        inner = ", ".join(f"{n}: {describe(b)}" for b, n in enumerate(self.names))
        return f"Blocks({inner})"
