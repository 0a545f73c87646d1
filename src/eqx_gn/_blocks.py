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
import numpy as np
from jaxtyping import PyTree

from ._custom_types import FilterSpec, Model, typecheck
from ._misc import first_line, is_none


def _params_with_paths(model: Model) -> tuple[list[str], Any]:
    """Paths of the parameter leaves, and the treedef of the filtered model."""
    params = eqx.filter(model, eqx.is_inexact_array)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in with_paths], treedef


def _filter_mask(model: Model, spec: FilterSpec) -> np.ndarray:
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
    [`Blocks.full`][eqx_gn.Blocks.full], [`Blocks.from_filters`][eqx_gn.Blocks.from_filters]
    or [`Blocks.from_layers`][eqx_gn.Blocks.from_layers]; every constructor checks
    that the blocks are non-empty, disjoint and cover every parameter, and names the
    offending leaves by their path when they are not.

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
        return cls._from_masks(model, [_filter_mask(model, f) for f in filters], names)

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
        masks = [_filter_mask(model, s) for s in specs]
        taken = np.any(masks, axis=0)
        all_names = list(names)
        for name, spec in (remainder or {}).items():
            mask = _filter_mask(model, spec) & ~taken
            if not mask.any():
                raise ValueError(
                    f"remainder block {name!r} selects no parameter outside the layers."
                )
            masks.append(mask)
            all_names.append(name)
            taken |= mask
        if not taken.all():
            masks.append(~taken)
            all_names.append(rest)
        return cls._from_masks(model, masks, all_names)

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
        return cls(tuple(names), leaf_block, tuple(paths), treedef)

    # ----------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        """The number of blocks."""
        return len(self.names)

    def leaf_indices(self, block: int | str) -> tuple[int, ...]:
        """Positions (in flatten order of the parameters) of a block's leaves."""
        b = self._index(block)
        return tuple(i for i, owner in enumerate(self.leaf_block) if owner == b)

    def mask(self, block: int | str) -> PyTree[bool]:
        """A bool PyTree over the parameters, ``True`` on the leaves of ``block``."""
        b = self._index(block)
        return jax.tree.unflatten(
            self.treedef, [owner == b for owner in self.leaf_block]
        )

    def paths(self, block: int | str) -> tuple[str, ...]:
        """The paths of the parameters in ``block``."""
        return tuple(self.leaf_paths[i] for i in self.leaf_indices(block))

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

    def __repr__(self) -> str:
        sizes = [len(self.leaf_indices(b)) for b in range(self.num_blocks)]
        inner = ", ".join(
            f"{n}: {s} leaves" for n, s in zip(self.names, sizes, strict=True)
        )
        return f"Blocks({inner})"
