r"""The paper's LLaMA-style decoder-only language model, in Equinox.

Token embedding, ``depth`` pre-norm transformer blocks, a final RMSNorm and an
untied output head. Each block is

$$x \leftarrow x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad
  x \leftarrow x + W_2\,\mathrm{gelu}(W_1\,\mathrm{RMSNorm}(x)),$$

with causal multi-head attention whose queries and keys are rotated by RoPE. There
are no biases anywhere; RMSNorm has a learnable scale. Matrices are stored
``(fan_out, fan_in)``, as in ``eqx.nn.Linear``, and applied as ``x @ weight.T``.

By default the blocks are a Python tuple of
[`TransformerBlock`][eqx_gn.lm.TransformerBlock] modules, so that each block is its
own subtree and the layerwise partition of the paper is a plain Equinox filter. With
``LMConfig.scan_layers`` they are one ``TransformerBlock`` whose arrays have a
leading ``depth`` axis (the same weights, stacked), applied with ``jax.lax.scan``:
the model is traced and compiled once per block instead of ``depth`` times, so
compile time does not grow with depth. [`layerwise_blocks`][eqx_gn.lm.layerwise_blocks]
gives the same partition for both.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer, PRNGKeyArray, PyTree

from .. import Blocks, LayerScan

#: ``fn(model, inputs) -> outputs``, as eqx_gn takes it.
ApplyFn = Callable[[Any, Any], Any]

#: The standard deviation of the normal initialisation of every matrix.
INIT_STD = 0.02

#: The dtypes a model's matrix products may be computed in (``compute_dtype``).
ComputeDtype = Literal["float32", "bfloat16"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)


def _product(spec: str, a: Array, b: Array, compute_dtype: str | None) -> Array:
    r"""``jnp.einsum(spec, a, b)`` with ``a`` and ``b`` rounded to ``compute_dtype``
    and the products accumulated, and returned, in their own dtype.

    In bfloat16 (8 significant bits, unit roundoff $u = 2^{-8}$) each input is
    rounded once, so each term $a_i b_i$ is within about $2u$ of the exact one while
    the sum stays float32. ``None`` leaves the product as it is.
    """
    if compute_dtype is None:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(
        spec,
        a.astype(compute_dtype),
        b.astype(compute_dtype),
        preferred_element_type=jnp.result_type(a, b),
    )


class LMConfig(eqx.Module):
    """The shape of a [`Transformer`][eqx_gn.lm.Transformer].

    A Module whose fields are all static: it has no PyTree leaves, so a model can
    carry it without it ever being mistaken for a parameter. Named configurations
    come from [`get_config`][eqx_gn.lm.get_config].
    """

    vocab_size: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    ffn: int = eqx.field(static=True)
    seq_len: int = eqx.field(static=True)
    rope_base: float = eqx.field(default=10000.0, static=True)
    norm_eps: float = eqx.field(default=1e-6, static=True)
    scan_layers: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        if not isinstance(self.scan_layers, bool):
            raise ValueError(
                f"LMConfig.scan_layers must be a bool, got {self.scan_layers!r}."
            )
        for name in ("vocab_size", "width", "depth", "heads", "ffn", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"LMConfig.{name} must be a positive int, got {value!r}."
                )
        if self.width % self.heads:
            raise ValueError(
                f"LMConfig: width {self.width} is not divisible by heads {self.heads}."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LMConfig: RoPE needs an even head dimension, got width / heads = "
                f"{self.head_dim}."
            )
        if self.rope_base <= 0 or self.norm_eps <= 0:
            raise ValueError("LMConfig: rope_base and norm_eps must be positive.")

    @property
    def head_dim(self) -> int:
        """``width // heads``."""
        return self.width // self.heads

    @property
    def num_params(self) -> int:
        """The number of parameters of a model of this shape (no model is built)."""
        w, f = self.width, self.ffn
        block = 4 * w * w + 2 * w * f + 2 * w
        return 2 * self.vocab_size * w + self.depth * block + w


#: Named configurations. ``tiny``, ``prototype`` and ``small`` are byte-level
#: (vocabulary 257: 256 bytes and the end-of-document id of ``ByteTokenizer``) and
#: meant for CPU tests and quick experiments; ``prototype`` is the 0.85M-parameter
#: model of the paper notes' Shakespeare prototype; ``45m`` and ``150m`` are the
#: paper's models (T5 vocabulary of 32000, context 1024).
CONFIGS: dict[str, LMConfig] = {
    "tiny": LMConfig(vocab_size=257, width=64, depth=2, heads=4, ffn=256, seq_len=64),
    "prototype": LMConfig(
        vocab_size=257, width=128, depth=4, heads=4, ffn=512, seq_len=128
    ),
    "small": LMConfig(
        vocab_size=257, width=256, depth=4, heads=4, ffn=1024, seq_len=256
    ),
    "45m": LMConfig(
        vocab_size=32000, width=512, depth=4, heads=8, ffn=2048, seq_len=1024
    ),
    "150m": LMConfig(
        vocab_size=32000, width=768, depth=12, heads=16, ffn=3072, seq_len=1024
    ),
}


def get_config(name: str, **overrides) -> LMConfig:
    """The named configuration (a key of ``CONFIGS``), with ``overrides`` applied.

    ``get_config("tiny", vocab_size=512, seq_len=32)`` is the tiny model with a larger
    vocabulary and a shorter context; ``get_config("tiny", scan_layers=True)`` stacks
    its blocks and scans over them.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}.")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown LMConfig fields {unknown}; the fields are {sorted(fields)}."
        )
    return dataclasses.replace(CONFIGS[name], **overrides)


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> Array:
    return INIT_STD * jax.random.normal(key, shape, dtype)


class Linear(eqx.Module):
    """A bias-free linear map ``x @ weight.T``.

    The weight is stored ``(fan_out, fan_in)``, as in ``eqx.nn.Linear``, which is the
    layout [`eqx_gn.muon_adamw`][] orthogonalises for. With ``compute_dtype``
    (``"bfloat16"``) the product rounds ``x`` and the weight to it and accumulates
    in their own dtype, which is also the output's.
    """

    weight: Float[Array, "fan_out fan_in"]

    def __init__(self, fan_in: int, fan_out: int, *, key: PRNGKeyArray, dtype):
        self.weight = _normal(key, (fan_out, fan_in), dtype)

    def __call__(
        self, x: Float[Array, "*batch fan_in"], *, compute_dtype: str | None = None
    ) -> Float[Array, "*batch fan_out"]:
        if compute_dtype is None:
            return x @ self.weight.T
        return _product("...i,oi->...o", x, self.weight, compute_dtype)


class Embedding(eqx.Module):
    """A token embedding table."""

    weight: Float[Array, "vocab width"]

    def __init__(self, vocab_size: int, width: int, *, key: PRNGKeyArray, dtype):
        self.weight = _normal(key, (vocab_size, width), dtype)

    def __call__(self, tokens: Integer[Array, " seq"]) -> Float[Array, "seq width"]:
        return jnp.take(self.weight, tokens, axis=0)


class RMSNorm(eqx.Module):
    r"""$x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot s$ with a learnable scale $s$."""

    scale: Float[Array, " width"]
    eps: float = eqx.field(static=True)

    def __init__(self, width: int, *, eps: float, dtype):
        self.scale = jnp.ones((width,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * inv * self.scale[None, :]


def rope_angles(
    positions: Int[Array, " seq"] | Float[Array, " seq"], head_dim: int, base: float
) -> Float[Array, "seq half"]:
    r"""RoPE rotation angles $p\,\omega_i$, $\omega_i = \mathrm{base}^{-2i/d}$, in float32."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    return positions.astype(jnp.float32)[:, None] * inv_freq[None, :]


def apply_rope(
    x: Float[Array, "seq heads head_dim"],
    positions: Int[Array, " seq"] | Float[Array, " seq"],
    base: float = 10000.0,
) -> Float[Array, "seq heads head_dim"]:
    r"""Rotate each head vector of ``x`` by its position (rotary embedding).

    The head dimension is split into halves $(x_1, x_2)$ and pair $i$ is rotated by
    the angle $p\,\omega_i$. Rotations compose, so the score of a query at position
    $m$ and a key at position $n$ depends only on $m - n$.
    """
    head_dim = x.shape[-1]
    angles = rope_angles(positions, head_dim, base)
    cos = jnp.cos(angles).astype(x.dtype)[:, None, :]
    sin = jnp.sin(angles).astype(x.dtype)[:, None, :]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(eqx.Module):
    """Causal multi-head self-attention with RoPE, no biases."""

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    heads: int = eqx.field(static=True)
    rope_base: float = eqx.field(static=True)

    def __init__(self, config: LMConfig, *, key: PRNGKeyArray, dtype):
        kq, kk, kv, ko = jax.random.split(key, 4)
        w = config.width
        self.wq = Linear(w, w, key=kq, dtype=dtype)
        self.wk = Linear(w, w, key=kk, dtype=dtype)
        self.wv = Linear(w, w, key=kv, dtype=dtype)
        self.wo = Linear(w, w, key=ko, dtype=dtype)
        self.heads = config.heads
        self.rope_base = config.rope_base

    def __call__(
        self, x: Float[Array, "seq width"], *, compute_dtype: str | None = None
    ) -> Float[Array, "seq width"]:
        seq, width = x.shape
        head_dim = width // self.heads
        shape = (seq, self.heads, head_dim)
        positions = jnp.arange(seq)
        cd = compute_dtype
        q = self.wq(x, compute_dtype=cd).reshape(shape)
        k = self.wk(x, compute_dtype=cd).reshape(shape)
        v = self.wv(x, compute_dtype=cd).reshape(shape)
        q = apply_rope(q, positions, self.rope_base)
        k = apply_rope(k, positions, self.rope_base)
        scores = _product("qhd,khd->hqk", q, k, cd) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        scores = jnp.where(causal[None, :, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = _product("hqk,khd->qhd", weights, v, cd).reshape(seq, width)
        return self.wo(out, compute_dtype=cd)


class MLP(eqx.Module):
    r"""$W_2\,\mathrm{gelu}(W_1 x)$ (tanh-approximate GELU), no biases."""

    w1: Linear
    w2: Linear

    def __init__(self, config: LMConfig, *, key: PRNGKeyArray, dtype):
        k1, k2 = jax.random.split(key)
        self.w1 = Linear(config.width, config.ffn, key=k1, dtype=dtype)
        self.w2 = Linear(config.ffn, config.width, key=k2, dtype=dtype)

    def __call__(
        self, x: Float[Array, "seq width"], *, compute_dtype: str | None = None
    ) -> Float[Array, "seq width"]:
        hidden = jax.nn.gelu(self.w1(x, compute_dtype=compute_dtype))
        return self.w2(hidden, compute_dtype=compute_dtype)


class TransformerBlock(eqx.Module):
    """One pre-norm block: attention and MLP, each behind an RMSNorm and a residual."""

    attention_norm: RMSNorm
    attention: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    def __init__(self, config: LMConfig, *, key: PRNGKeyArray, dtype):
        ka, km = jax.random.split(key)
        self.attention_norm = RMSNorm(config.width, eps=config.norm_eps, dtype=dtype)
        self.attention = Attention(config, key=ka, dtype=dtype)
        self.mlp_norm = RMSNorm(config.width, eps=config.norm_eps, dtype=dtype)
        self.mlp = MLP(config, key=km, dtype=dtype)

    def __call__(
        self, x: Float[Array, "seq width"], *, compute_dtype: str | None = None
    ) -> Float[Array, "seq width"]:
        cd = compute_dtype
        x = x + self.attention(self.attention_norm(x), compute_dtype=cd)
        return x + self.mlp(self.mlp_norm(x), compute_dtype=cd)


class Transformer(eqx.Module):
    """The decoder-only language model.

    ``Transformer(config, key)`` initialises every matrix from
    $\\mathcal N(0, 0.02^2)$ and every RMSNorm scale to one, in ``dtype`` (float32
    by default). Calling it on one sequence of token ids gives next-token logits;
    [`apply_lm`][eqx_gn.lm.apply_lm] applies it to a batch.

    ``compute_dtype`` (``None``, ``"float32"`` or ``"bfloat16"``: mixed precision)
    is the dtype of the matrix products: every linear map and both attention
    products round their inputs to it and accumulate in the parameters' dtype.
    Norms, softmax, the residual stream and the logits keep the parameters' dtype,
    so with float32 parameters the loss and, in a GN product, its Hessian are
    float32. ``None``: the parameters' dtype throughout.

    ``blocks`` is a tuple of ``depth`` blocks, or with ``config.scan_layers`` one
    block whose arrays are the same blocks' arrays stacked along a leading axis
    (``blocks.mlp.w1.weight`` has shape ``(depth, ffn, width)``), applied with
    ``jax.lax.scan``. The same key gives the same weights, and the same function,
    either way.
    """

    embedding: Embedding
    blocks: tuple[TransformerBlock, ...] | TransformerBlock
    final_norm: RMSNorm
    head: Linear
    config: LMConfig

    def __init__(self, config: LMConfig, key: PRNGKeyArray, *, dtype=jnp.float32):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"Transformer: dtype must be floating, got {dtype}.")
        ke, kh, *kb = jax.random.split(key, 2 + config.depth)
        self.embedding = Embedding(config.vocab_size, config.width, key=ke, dtype=dtype)
        if config.scan_layers:
            self.blocks = eqx.filter_vmap(
                lambda k: TransformerBlock(config, key=k, dtype=dtype)
            )(jnp.stack(kb))
        else:
            self.blocks = tuple(
                TransformerBlock(config, key=k, dtype=dtype) for k in kb
            )
        self.final_norm = RMSNorm(config.width, eps=config.norm_eps, dtype=dtype)
        self.head = Linear(config.width, config.vocab_size, key=kh, dtype=dtype)
        self.config = config

    def __call__(
        self,
        tokens: Integer[Array | np.ndarray, " seq"],
        *,
        compute_dtype: str | None = None,
    ) -> Float[Array, "seq vocab"]:
        _check_compute_dtype(compute_dtype)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(
                f"Transformer takes one sequence of shape (seq,), got {tokens.shape}; "
                "use apply_lm for a batch."
            )
        if tokens.shape[0] > self.config.seq_len:
            raise ValueError(
                f"sequence of length {tokens.shape[0]} exceeds the context "
                f"seq_len={self.config.seq_len}."
            )
        x = self.embedding(tokens)
        if self.config.scan_layers:
            arrays, static = eqx.partition(self.blocks, eqx.is_array)

            def layer(x, arrays_i):
                block = eqx.combine(arrays_i, static)
                return block(x, compute_dtype=compute_dtype), None

            x, _ = jax.lax.scan(layer, x, arrays)
        else:
            for block in self.blocks:
                x = block(x, compute_dtype=compute_dtype)
        return self.head(self.final_norm(x), compute_dtype=compute_dtype)


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be None or one of {', '.join(COMPUTE_DTYPES)}; "
            f"got {compute_dtype!r}."
        )


def apply_lm(
    model: Transformer,
    tokens: Integer[Array | np.ndarray, "batch seq"],
    *,
    compute_dtype: str | None = None,
) -> Float[Array, "batch seq vocab"]:
    """Logits for a batch of sequences: the ``fn(model, inputs)`` of eqx_gn
    (``compute_dtype``: see [`Transformer`][eqx_gn.lm.Transformer])."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(
            f"apply_lm takes tokens of shape (batch, seq), got {tokens.shape}."
        )
    return jax.vmap(lambda t: model(t, compute_dtype=compute_dtype))(tokens)


def _embed(model: Transformer, tokens) -> Float[Array, "batch seq width"]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(
            f"apply_lm takes tokens of shape (batch, seq), got {tokens.shape}."
        )
    if tokens.shape[1] > model.config.seq_len:
        raise ValueError(
            f"sequence of length {tokens.shape[1]} exceeds the context "
            f"seq_len={model.config.seq_len}."
        )
    return jax.vmap(model.embedding)(tokens)


def _block(
    block: TransformerBlock,
    x: Float[Array, "batch seq width"],
    *,
    compute_dtype: str | None = None,
):
    return jax.vmap(lambda h: block(h, compute_dtype=compute_dtype))(x)


def _final(
    model: Transformer,
    x: Float[Array, "batch seq width"],
    *,
    compute_dtype: str | None = None,
):
    def final(h):
        return model.head(model.final_norm(h), compute_dtype=compute_dtype)

    return jax.vmap(final)(x)


def _stack(model: Transformer) -> TransformerBlock:
    return model.blocks


#: [`apply_lm`][eqx_gn.lm.apply_lm] of a model with ``scan_layers``, as an
#: [`eqx_gn.LayerScan`][]: embedding, the stacked blocks, final norm and head.
APPLY_SCANNED: LayerScan = LayerScan(
    before=_embed, layer=_block, after=_final, stack=_stack
)


class _InComputeDtype(eqx.Module):
    """``fn(*args, compute_dtype=compute_dtype)``: a hashable apply function, equal
    to another of the same ``fn`` and dtype (so ``jit`` compiles it once)."""

    fn: Callable = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)

    def __call__(self, *args):
        return self.fn(*args, compute_dtype=self.compute_dtype)


def apply_lm_in(compute_dtype: str | None) -> ApplyFn:
    """[`apply_lm`][eqx_gn.lm.apply_lm] with ``compute_dtype`` (``apply_lm`` itself
    for ``None``), as a hashable function of ``(model, tokens)``."""
    _check_compute_dtype(compute_dtype)
    return (
        apply_lm if compute_dtype is None else _InComputeDtype(apply_lm, compute_dtype)
    )


def apply_fn(model: Transformer, compute_dtype: str | None = None) -> ApplyFn:
    """The ``fn(model, inputs)`` to give eqx_gn for ``model``:
    [`apply_lm`][eqx_gn.lm.apply_lm], or with ``scan_layers`` the same function as an
    [`eqx_gn.LayerScan`][] (``APPLY_SCANNED``), whose layerwise products start each
    layer's tangent pass at its layer.

    With ``compute_dtype`` (``"bfloat16"``) the same function computes its matrix
    products in that dtype (see [`Transformer`][eqx_gn.lm.Transformer]); the
    model, its parameters and their tree structure are unchanged, so one model
    can be applied in either precision.
    """
    _check_compute_dtype(compute_dtype)
    if compute_dtype is None:
        return APPLY_SCANNED if model.config.scan_layers else apply_lm
    if model.config.scan_layers:
        return LayerScan(
            before=_embed,
            layer=_InComputeDtype(_block, compute_dtype),
            after=_InComputeDtype(_final, compute_dtype),
            stack=_stack,
        )
    return apply_lm_in(compute_dtype)


def layerwise_blocks(model: Transformer) -> Blocks:
    """The paper's layerwise partition of a [`Transformer`][eqx_gn.lm.Transformer].

    Blocks ``embedding``, ``block0``, ..., ``block{depth-1}``, ``head``: one per
    transformer block (attention, MLP and their norms), with the final RMSNorm in
    the last transformer block's group. ``depth + 2`` blocks in all. On a model with
    ``scan_layers``, block ``block{i}`` holds slice ``i`` of every stacked array
    ([`eqx_gn.Blocks.from_stacked_layers`][]), so both give the same partition.
    """
    nothing = jax.tree.map(lambda _: False, model)

    def only(where):
        return eqx.tree_at(
            where, nothing, replace_fn=lambda node: jax.tree.map(lambda _: True, node)
        )

    depth = model.config.depth
    names = ["embedding", *(f"block{i}" for i in range(depth)), "head"]
    if model.config.scan_layers:
        return Blocks.from_stacked_layers(
            model,
            lambda m: m.blocks,
            names=names[1:-1],
            remainder={
                "embedding": only(lambda m: m.embedding),
                "head": only(lambda m: m.head),
            },
            join={-1: only(lambda m: m.final_norm)},
        ).reordered(names)
    specs = [only(lambda m: m.embedding)]
    specs += [only(lambda m, i=i: m.blocks[i]) for i in range(depth - 1)]
    specs.append(only(lambda m: (m.blocks[-1], m.final_norm)))
    specs.append(only(lambda m: m.head))
    return Blocks.from_filters(model, specs, names=names)


def _is_param(x) -> bool:
    return (
        hasattr(x, "shape")
        and hasattr(x, "dtype")
        and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def count_params(model: PyTree) -> int:
    """The number of parameters (inexact-array entries) of ``model``.

    Works on real models and on the ``jax.ShapeDtypeStruct`` trees that
    ``jax.eval_shape`` / ``eqx.filter_eval_shape`` return, so the big configurations
    can be counted without allocating them.
    """
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model) if _is_param(x))


def embedding_and_head(model: Transformer) -> PyTree[bool]:
    """A filter spec selecting the embedding and the output head.

    The paper's optimizers treat these 2-D matrices like vectors: AdamW, not Muon.
    Pass it as ``adam_filter`` to [`eqx_gn.muon_adamw`][] or
    [`eqx_gn.InnerOptimizer`][]. On a model with ``scan_layers`` it also selects the
    stacked RMSNorm scales: 2-D arrays ``(depth, width)`` that are one vector per
    layer (AdamW, as in the unscanned model), not a matrix for Muon.
    """
    nothing = jax.tree.map(lambda _: False, model)
    where = (
        (lambda m: (m.embedding, m.head, m.blocks.attention_norm, m.blocks.mlp_norm))
        if model.config.scan_layers
        else (lambda m: (m.embedding, m.head))
    )
    return eqx.tree_at(
        where, nothing, replace_fn=lambda node: jax.tree.map(lambda _: True, node)
    )
