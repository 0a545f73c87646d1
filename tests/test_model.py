"""The LLaMA-style language model of eqx_gn.lm."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_gn
from eqx_gn.lm import (
    APPLY_SCANNED,
    CONFIGS,
    LMConfig,
    Transformer,
    apply_fn,
    apply_lm,
    apply_rope,
    count_params,
    embedding_and_head,
    get_config,
    layerwise_blocks,
)
from helpers import raises_invalid


def _tiny(**overrides):
    return get_config("tiny", **overrides)


_apply = eqx.filter_jit(apply_lm)
_call = eqx.filter_jit(lambda model, tokens: model(tokens))


def _tokens(key, shape, vocab):
    return jax.random.randint(key, shape, 0, vocab)


def test_apply_shapes_and_dtypes(getkey):
    config = _tiny()
    model = Transformer(config, getkey())
    tokens = _tokens(getkey(), (3, 16), config.vocab_size)
    logits = _apply(model, tokens)
    assert logits.shape == (3, 16, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model))
    np.testing.assert_allclose(logits[1], _call(model, tokens[1]), rtol=1e-5, atol=1e-6)
    # At initialisation the predictions are close to uniform.
    entropy_gap = jnp.abs(jax.nn.logsumexp(logits, -1) - jnp.log(config.vocab_size))
    assert float(jnp.max(entropy_gap)) < 0.5

    model64 = Transformer(config, getkey(), dtype=jnp.float64)
    assert _apply(model64, tokens).dtype == jnp.float64


def test_no_biases_and_init(getkey):
    config = _tiny()
    model = Transformer(config, getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        assert "bias" not in name
        if x.ndim == 1:  # RMSNorm scales only
            assert name.endswith(".scale")
            np.testing.assert_array_equal(x, 1.0)
        else:
            assert x.ndim == 2
            assert 0.015 < float(jnp.std(x)) < 0.025, name
    assert model.embedding.weight.shape == (config.vocab_size, config.width)
    assert model.head.weight.shape == (config.vocab_size, config.width)
    assert len(model.blocks) == config.depth
    assert isinstance(model.blocks, tuple)


def test_causality(getkey):
    config = _tiny()
    model = Transformer(config, getkey(), dtype=jnp.float64)
    seq, t = 24, 13
    tokens = _tokens(getkey(), (seq,), config.vocab_size)
    changed = tokens.at[t].set((tokens[t] + 1) % config.vocab_size)
    later = tokens.at[t:].set((tokens[t:] + 7) % config.vocab_size)
    base = _call(model, tokens)
    for other in (changed, later):
        out = _call(model, other)
        np.testing.assert_allclose(out[:t], base[:t], rtol=0, atol=1e-12)
        assert float(jnp.max(jnp.abs(out[t] - base[t]))) > 1e-3
    # Every position sees the ones before it: changing token 0 changes all logits.
    first = _call(model, tokens.at[0].set((tokens[0] + 1) % config.vocab_size))
    assert bool(jnp.all(jnp.max(jnp.abs(first - base), axis=-1) > 1e-6))


def test_sequence_checks(getkey):
    config = _tiny(seq_len=8)
    model = Transformer(config, getkey())
    with pytest.raises(ValueError, match="exceeds the context"):
        model(jnp.zeros((9,), jnp.int32))
    # A ValueError, or the runtime type checker's TypeError when it is on.
    with pytest.raises((ValueError, TypeError)):
        model(jnp.zeros((2, 4), jnp.int32))
    with pytest.raises((ValueError, TypeError)):
        apply_lm(model, jnp.zeros((4,), jnp.int32))
    assert model(jnp.zeros((5,), jnp.int32)).shape == (5, config.vocab_size)


def test_rope_relative_positions(getkey):
    seq, heads, head_dim = 10, 3, 16
    q = jax.random.normal(getkey(), (seq, heads, head_dim), jnp.float64)
    k = jax.random.normal(getkey(), (seq, heads, head_dim), jnp.float64)
    positions = jnp.arange(seq)

    def scores(qpos, kpos):
        rq, rk = apply_rope(q, qpos), apply_rope(k, kpos)
        return jnp.einsum("qhd,khd->hqk", rq, rk)

    base = scores(positions, positions)
    for shift in (1, 5, 123):
        shifted = scores(positions + shift, positions + shift)
        np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-5)
    # Not a trivial map: moving only the keys changes the scores ...
    moved = scores(positions, positions + 3)
    assert float(jnp.max(jnp.abs(moved - base))) > 1e-2
    # ... it is a rotation (norm-preserving), and the identity at position 0.
    rotated = apply_rope(q, positions + 7)
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-6
    )
    np.testing.assert_allclose(apply_rope(q, jnp.zeros_like(positions)), q, atol=1e-7)


def test_named_configs_without_allocating():
    expected = {
        "45m": dict(
            vocab_size=32000, width=512, depth=4, heads=8, ffn=2048, seq_len=1024
        ),
        "150m": dict(
            vocab_size=32000, width=768, depth=12, heads=16, ffn=3072, seq_len=1024
        ),
    }
    for name, fields in expected.items():
        config = get_config(name)
        for field, value in fields.items():
            assert getattr(config, field) == value
        shapes = eqx.filter_eval_shape(Transformer, config, jax.random.key(0))
        assert count_params(shapes) == config.num_params
        assert shapes.embedding.weight.shape == (32000, config.width)
        assert shapes.blocks[0].mlp.w1.weight.shape == (config.ffn, config.width)
        assert shapes.embedding.weight.dtype == jnp.float32
        logits = eqx.filter_eval_shape(
            apply_lm, shapes, jax.ShapeDtypeStruct((2, 1024), jnp.int32)
        )
        assert logits.shape == (2, 1024, 32000)
    assert 44e6 < get_config("45m").num_params < 46e6
    assert 130e6 < get_config("150m").num_params < 150e6
    assert get_config("tiny").num_params < 250_000
    assert 1e6 < get_config("small").num_params < 10e6
    for name, config in CONFIGS.items():
        assert get_config(name) == config


def test_count_params_matches_config(getkey):
    config = _tiny(depth=3, ffn=96)
    model = Transformer(config, getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    assert count_params(model) == config.num_params
    assert count_params(model) == sum(x.size for x in jax.tree.leaves(params))


def test_get_config_overrides_and_errors():
    config = get_config("tiny", vocab_size=300, seq_len=32)
    assert (config.vocab_size, config.seq_len) == (300, 32)
    assert config.width == CONFIGS["tiny"].width
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        get_config("tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", heads=3)
    with pytest.raises(ValueError, match="even head dimension"):
        LMConfig(vocab_size=8, width=12, depth=1, heads=4, ffn=8, seq_len=4)
    with pytest.raises(ValueError, match="positive int"):
        get_config("tiny", depth=0)
    # The config has no leaves: it can never be mistaken for a parameter.
    assert jax.tree.leaves(config) == []


def test_layerwise_blocks_partition(getkey):
    config = _tiny(depth=3)
    model = Transformer(config, getkey())
    blocks = layerwise_blocks(model)
    assert blocks.names == ("embedding", "block0", "block1", "block2", "head")
    assert blocks.num_blocks == config.depth + 2
    assert blocks.paths("embedding") == (".embedding.weight",)
    assert blocks.paths("head") == (".head.weight",)
    for i in range(config.depth):
        paths = blocks.paths(f"block{i}")
        assert all(
            p.startswith(f".blocks[{i}].") for p in paths if p != ".final_norm.scale"
        )
        assert len([p for p in paths if p.startswith(f".blocks[{i}].")]) == 8
    assert ".final_norm.scale" in blocks.paths("block2")
    assert ".final_norm.scale" not in blocks.paths("block1")
    assert ".final_norm.scale" not in blocks.paths("head")
    blocks.check_model(model)
    mask = blocks.mask("block2")
    assert bool(mask.final_norm.scale) and bool(mask.blocks[2].mlp.w2.weight)
    assert not bool(mask.blocks[1].mlp.w2.weight)


def test_layerwise_quadratic_model_gradient(getkey):
    """The model plugs into eqx_gn: at d = 0 the layerwise model's gradient is the
    loss gradient."""
    config = _tiny(depth=2, seq_len=12)
    model = Transformer(config, getkey(), dtype=jnp.float64)
    tokens = _tokens(getkey(), (2, 13), config.vocab_size)
    batch = (tokens[:, :-1], tokens[:, 1:])
    loss = eqx_gn.SoftmaxCrossEntropy()
    blocks = layerwise_blocks(model)

    @eqx.filter_jit
    def both(model):
        q = eqx_gn.quadratic_model(apply_lm, model, batch, loss=loss, blocks=blocks)
        zero = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        value, grad = q.value_and_grad(zero)

        def true_loss(m):
            return loss.value(apply_lm(m, batch[0]), batch[1])

        true_value, true_grad = eqx.filter_value_and_grad(true_loss)(model)
        return value, grad, true_value, eqx.filter(true_grad, eqx.is_inexact_array)

    value, grad, true_value, true_grad = both(model)
    np.testing.assert_allclose(value, true_value, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(true_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ scanned layers
_SMALL = dict(vocab_size=13, width=16, heads=2, ffn=24, seq_len=8)


def _stack_like(tree, scanned):
    """An unscanned model's parameter-shaped tree, with its blocks stacked, in the
    structure of the scanned model's."""
    return eqx.tree_at(
        lambda t: (t.embedding, t.blocks, t.final_norm, t.head),
        eqx.filter(scanned, eqx.is_inexact_array),
        (
            tree.embedding,
            jax.tree.map(lambda *xs: jnp.stack(xs), *tree.blocks),
            tree.final_norm,
            tree.head,
        ),
    )


def test_scanned_model_is_the_same_function(getkey):
    key = getkey()
    config = _tiny(depth=3, **_SMALL)
    plain = Transformer(config, key)
    scanned = Transformer(_tiny(depth=3, scan_layers=True, **_SMALL), key)
    assert get_config("tiny", scan_layers=True).scan_layers
    assert scanned.blocks.mlp.w1.weight.shape == (3, config.ffn, config.width)
    assert count_params(scanned) == count_params(plain) == config.num_params
    # Same key: the same weights, stacked (exactly).
    stacked = _stack_like(eqx.filter(plain, eqx.is_inexact_array), scanned)
    for a, b in zip(
        jax.tree.leaves(stacked),
        jax.tree.leaves(eqx.filter(scanned, eqx.is_inexact_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    tokens = _tokens(getkey(), (2, 8), config.vocab_size)
    np.testing.assert_allclose(
        _apply(scanned, tokens), _apply(plain, tokens), rtol=1e-6, atol=1e-6
    )
    with raises_invalid("scan_layers must be a bool", annotated=True):
        get_config("tiny", scan_layers=1)


def test_scanned_layerwise_blocks_and_gnvp_equal_unscanned(getkey):
    key = getkey()
    plain = Transformer(_tiny(depth=3, **_SMALL), key, dtype=jnp.float64)
    scanned = Transformer(
        _tiny(depth=3, scan_layers=True, **_SMALL), key, dtype=jnp.float64
    )
    blocks_p, blocks_s = layerwise_blocks(plain), layerwise_blocks(scanned)
    names = ("embedding", "block0", "block1", "block2", "head")
    assert blocks_p.names == blocks_s.names == names
    blocks_s.check_model(scanned)
    # The same parameters in every block: block i holds slice i of every stacked
    # leaf, the last block also the final norm.
    for name in names:
        expected = [
            p.replace(f".blocks[{name[-1]}]", ".blocks") + f"[{name[-1]}]"
            if p.startswith(".blocks[")
            else p
            for p in blocks_p.paths(name)
        ]
        assert sorted(blocks_s.paths(name)) == sorted(expected)
    tokens = _tokens(getkey(), (2, 9), 13)
    batch = (tokens[:, :-1], tokens[:, 1:])
    loss = eqx_gn.SoftmaxCrossEntropy()
    params = eqx.filter(plain, eqx.is_inexact_array)
    keys = iter(jax.random.split(getkey(), len(jax.tree.leaves(params))))
    v = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), params)
    # apply_fn(scanned) is the LayerScan whose layer blocks start at their layer;
    # apply_lm on the scanned model takes the general path. Both equal unscanned.
    assert apply_fn(plain) is apply_lm and apply_fn(scanned) is APPLY_SCANNED
    np.testing.assert_allclose(
        APPLY_SCANNED(scanned, batch[0]), apply_lm(scanned, batch[0]), rtol=1e-12
    )
    for fn in (apply_lm, APPLY_SCANNED):
        for b_p, b_s in [(blocks_p, blocks_s), (None, None)]:
            got = eqx_gn.gnvp(
                fn, scanned, batch, _stack_like(v, scanned), loss=loss, blocks=b_s
            )
            want = eqx_gn.gnvp(apply_lm, plain, batch, v, loss=loss, blocks=b_p)
            for a, b in zip(
                jax.tree.leaves(got),
                jax.tree.leaves(_stack_like(want, scanned)),
                strict=True,
            ):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    q = eqx_gn.quadratic_model(
        APPLY_SCANNED, scanned, batch, loss=loss, blocks=blocks_s
    )
    stacked = tuple(i for i, ls in enumerate(blocks_s.layer_blocks) if ls)
    norm = tuple(i for i, p in enumerate(blocks_s.leaf_paths) if "final_norm" in p)
    assert norm and q.stack.fast(stacked, norm)
    with pytest.raises(ValueError, match="tokens of shape"):
        APPLY_SCANNED(scanned, batch[0][0])


def test_embedding_and_head_on_scanned_model(getkey):
    scanned = Transformer(_tiny(depth=2, scan_layers=True, **_SMALL), getkey())
    spec = embedding_and_head(scanned)
    selected = eqx.filter(eqx.filter(scanned, eqx.is_inexact_array), spec)
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(selected)[0]
    ]
    # The embedding, the head and the stacked norm scales (one vector per layer);
    # every stacked matrix is left to Muon.
    assert sorted(paths) == [
        ".blocks.attention_norm.scale",
        ".blocks.mlp_norm.scale",
        ".embedding.weight",
        ".head.weight",
    ]
    plain = Transformer(_tiny(depth=2, **_SMALL), getkey())
    selected = eqx.filter(
        eqx.filter(plain, eqx.is_inexact_array), embedding_and_head(plain)
    )
    assert len(jax.tree.leaves(selected)) == 2
