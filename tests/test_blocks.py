"""Blocks: partitions of the parameters, their queries and their errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import eqx_gn
from helpers import (
    SETTINGS,
    TinyTransformer,
    filters_from_assignment,
    make_mlp,
    param_paths,
    random_assignment,
    seeds,
    subtree_spec,
)


def _mlp(depth=2, key=0):
    return make_mlp(jax.random.key(key), 2, 3, 4, depth)


def _transformer(num_blocks=2, num_heads=2):
    return TinyTransformer(
        vocab=5,
        dim=4,
        num_heads=num_heads,
        num_blocks=num_blocks,
        max_seq=3,
        key=jax.random.key(0),
    )


def _expected_mask(model, selected: set[str]):
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: jax.tree_util.keystr(p) in selected, params
    )


def test_full_is_one_block_of_every_parameter():
    model = _transformer()
    blocks = eqx_gn.Blocks.full(model)
    paths = param_paths(model)
    assert blocks.names == ("all",)
    assert blocks.num_blocks == 1
    assert blocks.paths(0) == blocks.paths("all") == tuple(paths)
    assert blocks.leaf_indices("all") == tuple(range(len(paths)))
    assert jax.tree.all(blocks.mask(0))
    assert jax.tree.structure(blocks.mask(0)) == jax.tree.structure(
        eqx.filter(model, eqx.is_inexact_array)
    )
    assert eqx_gn.Blocks.full(model, name="everything").names == ("everything",)


def test_non_inexact_leaves_are_not_parameters():
    model = _transformer()
    paths = eqx_gn.Blocks.full(model).paths(0)
    assert ".causal" not in paths  # a bool array leaf
    assert ".position" in paths
    assert ".embedding.weight" in paths
    assert all(not p.startswith(".blocks[0].attention.num_heads") for p in paths)


@SETTINGS
@given(
    seed=seeds,
    num_blocks=st.integers(1, 5),
    arch=st.sampled_from(["mlp", "transformer"]),
    as_callable=st.booleans(),
)
def test_from_filters_random_partition(seed, num_blocks, arch, as_callable):
    model = _mlp(depth=3) if arch == "mlp" else _transformer()
    paths = param_paths(model)
    rng = np.random.default_rng(seed)
    assignment = random_assignment(rng, len(paths), num_blocks)
    filters = filters_from_assignment(model, assignment, as_callable=as_callable)
    blocks = eqx_gn.Blocks.from_filters(model, filters)
    n = len(filters)
    assert blocks.names == tuple(f"block{b}" for b in range(n))
    assert blocks.leaf_block == tuple(int(a) for a in assignment)
    for b in range(n):
        expected = tuple(p for p, a in zip(paths, assignment, strict=True) if a == b)
        assert blocks.paths(b) == blocks.paths(f"block{b}") == expected
        assert blocks.leaf_indices(b) == tuple(np.flatnonzero(assignment == b))
        got_mask = blocks.mask(b)
        assert jax.tree.structure(got_mask) == jax.tree.structure(
            _expected_mask(model, set(expected))
        )
        assert jax.tree.leaves(got_mask) == jax.tree.leaves(
            _expected_mask(model, set(expected))
        )
    blocks.check_model(model)


def test_from_filters_with_names_and_bool_prefixes():
    model = _mlp(depth=2)
    first = subtree_spec(model, lambda m: m.layers[0])
    rest = subtree_spec(model, lambda m: m.layers[1:])
    blocks = eqx_gn.Blocks.from_filters(model, [first, rest], names=["in", "hidden"])
    assert blocks.names == ("in", "hidden")
    assert blocks.paths("in") == (".layers[0].weight", ".layers[0].bias")
    assert blocks.paths("hidden") == (
        ".layers[1].weight",
        ".layers[1].bias",
        ".layers[2].weight",
        ".layers[2].bias",
    )
    assert "in: 2 leaves" in repr(blocks) and "hidden: 4 leaves" in repr(blocks)


def test_reordered_is_the_same_partition_with_its_blocks_in_a_new_order():
    model = _mlp(depth=3)
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
    order = ["layer2", "layer0", "layer3", "layer1"]
    moved = blocks.reordered(order)
    assert moved.names == tuple(order)
    for name in order:
        assert moved.paths(name) == blocks.paths(name)
        assert moved.members(name) == blocks.members(name)
    with pytest.raises(ValueError, match="cannot reorder blocks"):
        blocks.reordered(["layer0", "layer1", "layer2"])


def test_from_layers_mlp():
    model = _mlp(depth=3)
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
    assert blocks.names == ("layer0", "layer1", "layer2", "layer3")
    for i in range(4):
        assert blocks.paths(i) == (f".layers[{i}].weight", f".layers[{i}].bias")


def test_from_layers_with_remainder():
    model = _transformer(num_blocks=2)
    remainder = {
        "embedding": subtree_spec(model, lambda m: m.embedding),
        "head": lambda x: x is model.head.weight or x is model.head.bias,
    }
    blocks = eqx_gn.Blocks.from_layers(
        model, lambda m: m.blocks, names=["b0", "b1"], remainder=remainder
    )
    assert blocks.names == ("b0", "b1", "embedding", "head", "rest")
    assert blocks.paths("embedding") == (".embedding.weight",)
    assert blocks.paths("head") == (".head.weight", ".head.bias")
    assert blocks.paths("rest") == (".position",)
    for i in range(2):
        paths = blocks.paths(f"b{i}")
        assert paths and all(p.startswith(f".blocks[{i}].") for p in paths)
    all_paths = [p for b in range(blocks.num_blocks) for p in blocks.paths(b)]
    assert sorted(all_paths) == sorted(param_paths(model))


def test_from_layers_remainder_takes_only_what_layers_left():
    model = _transformer(num_blocks=1)
    blocks = eqx_gn.Blocks.from_layers(
        model,
        lambda m: m.blocks,
        remainder={"others": eqx.is_inexact_array},
        rest="unused",
    )
    # Every parameter outside the layers is in "others", so there is no rest block.
    assert blocks.names == ("layer0", "others")
    assert set(blocks.paths("others")) == {
        ".embedding.weight",
        ".position",
        ".head.weight",
        ".head.bias",
    }


def test_from_layers_rest_name():
    model = _transformer(num_blocks=1)
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: m.blocks, rest="outer")
    assert blocks.names == ("layer0", "outer")


# --------------------------------------------------------------------- errors
def test_overlapping_filters_name_the_shared_leaves():
    model = _mlp()
    with pytest.raises(ValueError, match="overlap") as info:
        eqx_gn.Blocks.from_filters(
            model,
            [eqx.is_inexact_array, subtree_spec(model, lambda m: m.layers[0])],
            names=["everything", "first"],
        )
    message = str(info.value)
    assert ".layers[0].weight" in message and ".layers[0].bias" in message
    assert "'everything'" in message and "'first'" in message
    assert ".layers[1].weight" not in message


def test_parameters_in_no_block_are_named():
    model = _mlp()
    with pytest.raises(ValueError, match="in no block") as info:
        eqx_gn.Blocks.from_filters(model, [subtree_spec(model, lambda m: m.layers[1:])])
    message = str(info.value)
    assert ".layers[0].weight" in message and ".layers[0].bias" in message
    assert ".layers[1].weight" not in message


def test_many_missing_parameters_are_summarised():
    model = _mlp(depth=6)
    with pytest.raises(ValueError, match=r"and \d+ more"):
        eqx_gn.Blocks.from_filters(model, [subtree_spec(model, lambda m: m.layers[-1])])


def test_empty_block_is_named():
    model = _mlp()
    with pytest.raises(ValueError, match="'nothing' selects no parameter"):
        eqx_gn.Blocks.from_filters(
            model, [eqx.is_inexact_array, lambda x: False], names=["all", "nothing"]
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(filters=[]), "at least one block"),
        (
            dict(filters=[eqx.is_inexact_array], names=["a", "b"]),
            "1 filters but 2 names",
        ),
        (
            dict(filters=[eqx.is_inexact_array, lambda x: False], names=["a", "a"]),
            "must be unique",
        ),
    ],
)
def test_from_filters_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eqx_gn.Blocks.from_filters(_mlp(), **kwargs)


def test_model_without_parameters():
    model = (jnp.arange(3), "static")
    with pytest.raises(ValueError, match="no parameters"):
        eqx_gn.Blocks.full(model)


def test_from_layers_errors():
    model = _transformer(num_blocks=2)
    with pytest.raises(ValueError, match="empty sequence"):
        eqx_gn.Blocks.from_layers(model, lambda m: ())
    with pytest.raises(ValueError, match="2 elements but got 1 names"):
        eqx_gn.Blocks.from_layers(model, lambda m: m.blocks, names=["only"])
    with pytest.raises(ValueError, match="'again' selects no parameter outside"):
        eqx_gn.Blocks.from_layers(
            model,
            lambda m: m.blocks,
            remainder={"again": subtree_spec(model, lambda m: m.blocks[0])},
        )


def test_unknown_block():
    blocks = eqx_gn.Blocks.from_layers(_mlp(), lambda m: m.layers)
    with pytest.raises(KeyError, match="no block named 'missing'"):
        blocks.mask("missing")
    with pytest.raises(IndexError, match="out of range"):
        blocks.paths(3)
    with pytest.raises(IndexError, match="out of range"):
        blocks.leaf_indices(-1)


# ---------------------------------------------------------------- check_model
def test_check_model_accepts_same_structure_other_values():
    blocks = eqx_gn.Blocks.from_layers(_mlp(key=0), lambda m: m.layers)
    blocks.check_model(_mlp(key=1))
    params, static = eqx.partition(_mlp(key=0), eqx.is_inexact_array)
    blocks.check_model(eqx.combine(jax.tree.map(lambda x: x + 1, params), static))


def test_check_model_names_extra_and_missing_leaves():
    small = eqx_gn.Blocks.full(_mlp(depth=1))
    with pytest.raises(ValueError, match="another structure") as info:
        small.check_model(_mlp(depth=3))
    message = str(info.value)
    assert "parameters not covered" in message
    assert ".layers[2].weight" in message and ".layers[3].bias" in message
    big = eqx_gn.Blocks.full(_mlp(depth=3))
    with pytest.raises(ValueError, match="leaves the model lacks") as info:
        big.check_model(_mlp(depth=1))
    assert ".layers[3].weight" in str(info.value)


def test_check_model_same_paths_other_static_structure():
    blocks = eqx_gn.Blocks.full(_transformer(num_heads=2))
    with pytest.raises(ValueError, match="another structure"):
        blocks.check_model(_transformer(num_heads=1))


def test_quadratic_model_checks_blocks_against_the_model():
    model = _mlp(depth=2)
    blocks = eqx_gn.Blocks.full(_mlp(depth=1))
    x, y = jnp.zeros((2, 2)), jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="another structure"):
        eqx_gn.quadratic_model(
            lambda m, x: jax.vmap(m)(x),
            model,
            (x, y),
            loss=eqx_gn.MeanSquaredError(),
            blocks=blocks,
        )


def test_blocks_are_static_under_jit():
    """A Blocks has no array leaves: it can be passed through ``filter_jit``."""
    model = _mlp()
    blocks = eqx_gn.Blocks.from_layers(model, lambda m: m.layers)
    assert jax.tree.leaves(blocks) == []

    @eqx.filter_jit
    def first_leaf_sum(blocks, model):
        params = eqx.filter(model, eqx.is_inexact_array)
        chosen = eqx.filter(params, blocks.mask(0))
        return sum(jnp.sum(x) for x in jax.tree.leaves(chosen))

    expected = jnp.sum(model.layers[0].weight) + jnp.sum(model.layers[0].bias)
    np.testing.assert_allclose(first_leaf_sum(blocks, model), expected)


def test_from_layers_rejects_duplicate_block_names(getkey):
    model = eqx.nn.MLP(2, 2, 4, 1, key=getkey())
    with pytest.raises(ValueError, match="unique"):
        eqx_gn.Blocks.from_layers(model, lambda m: m.layers[:1], rest="layer0")


# ------------------------------------------------------------- stacked layers
class _Layer(eqx.Module):
    weight: jax.Array
    bias: jax.Array


class _Stacked(eqx.Module):
    inp: jax.Array
    layers: _Layer
    out: jax.Array


def _stacked(num_layers=3, bias_layers=None):
    bias_layers = num_layers if bias_layers is None else bias_layers
    return _Stacked(
        inp=jnp.ones((2, 3)),
        layers=_Layer(jnp.ones((num_layers, 3, 3)), jnp.ones((bias_layers, 3))),
        out=jnp.ones(3),
    )


def test_from_stacked_layers_queries():
    model = _stacked()
    blocks = eqx_gn.Blocks.from_stacked_layers(
        model,
        lambda m: m.layers,
        remainder={"inp": subtree_spec(model, lambda m: m.inp)},
    )
    # Leaves in flatten order: inp (0), layers.weight (1), layers.bias (2), out (3).
    assert blocks.names == ("layer0", "layer1", "layer2", "inp", "rest")
    assert blocks.members("layer1") == ((1, 1), (2, 1))
    assert blocks.members("inp") == ((0, None),)
    assert blocks.members("rest") == ((3, None),)
    assert blocks.leaf_indices("layer2") == (1, 2)
    assert blocks.paths("layer2") == (".layers.weight[2]", ".layers.bias[2]")
    assert blocks.paths("rest") == (".out",)
    assert jax.tree.leaves(blocks.mask("layer0")) == [False, True, True, False]
    assert blocks.leaf_block == (3, -1, -1, 4)
    assert blocks.layer_blocks == (None, (0, 1, 2), (0, 1, 2), None)
    assert "layer0: 0 leaves + 2 slices" in repr(blocks)
    blocks.check_model(model)
    # join puts parameters outside the stack into a layer's block.
    joined = eqx_gn.Blocks.from_stacked_layers(
        model,
        lambda m: m.layers,
        names=["a", "b", "c"],
        join={-1: subtree_spec(model, lambda m: m.out)},
    )
    assert joined.names == ("a", "b", "c", "rest")
    assert joined.paths("c") == (".layers.weight[2]", ".layers.bias[2]", ".out")
    assert joined.paths("rest") == (".inp",)


def test_from_stacked_layers_errors():
    model = _stacked()
    build = eqx_gn.Blocks.from_stacked_layers
    with pytest.raises(ValueError, match=r"\.layers\.bias has leading size 2"):
        build(_stacked(bias_layers=2), lambda m: m.layers)
    with pytest.raises(ValueError, match=r"stacked leaf \.layers is a scalar"):
        build(_Stacked(jnp.ones(2), jnp.asarray(1.0), jnp.ones(1)), lambda m: m.layers)
    with pytest.raises(ValueError, match="holds no parameter"):
        build(_Stacked(jnp.ones(2), jnp.arange(3), jnp.ones(1)), lambda m: m.layers)
    with pytest.raises(ValueError, match="3 layers but got 2 names"):
        build(model, lambda m: m.layers, names=["a", "b"])
    with pytest.raises(ValueError, match="join key 3 out of range"):
        build(model, lambda m: m.layers, join={3: subtree_spec(model, lambda m: m.out)})
    with pytest.raises(ValueError, match=r"join\[0\] selects no parameter outside"):
        build(
            model, lambda m: m.layers, join={0: subtree_spec(model, lambda m: m.layers)}
        )
    with pytest.raises(ValueError, match="is not a part of the model"):
        build(model, lambda m: jnp.ones(3))
    with pytest.raises(ValueError, match=r"stacked\(model\) failed"):
        build(model, lambda m: m.nothing)
    with pytest.raises(ValueError, match="names must be unique"):
        build(model, lambda m: m.layers, names=["a", "b", "rest"])
    blocks = build(model, lambda m: m.layers)
    with pytest.raises(ValueError, match=r"split \.layers\.weight into 3 layers"):
        blocks.check_model(_stacked(num_layers=4))


def test_stacked_blocks_are_static_under_jit():
    model = _stacked()
    blocks = eqx_gn.Blocks.from_stacked_layers(model, lambda m: m.layers)
    assert jax.tree.leaves(blocks) == []
    assert hash(blocks) == hash(
        eqx_gn.Blocks.from_stacked_layers(model, lambda m: m.layers)
    )
