r"""The training runner of the language-model study.

``train(TrainConfig(...))`` trains one model with one optimizer and writes into
``config.out``::

    config.json      the configuration and what it resolved to (learning rate,
                     warm-up steps, model shape, mesh, corpus hash, ...)
    metrics.jsonl    one JSON record per step (see below)
    summary.json     the outcome (final and best validation loss, steps, tokens
                     and time to the target loss, ...)
    checkpoints/     orbax checkpoints (see `eqx_gn.lm._checkpoint`)

**Phases.** A run of ``steps`` optimizer steps starts with ``warmup_steps =
round(warmup_fraction * steps)`` steps of AdamW (constant ``warmup_lr``, the same
for every optimizer, as the paper's GN runs start from an AdamW-trained model),
then runs the chosen optimizer for the remaining steps:

- ``adamw``: AdamW ($\beta_2 = 0.95$), cosine decay of ``lr`` to 0;
- ``muon``: Muon on hidden matrices, AdamW on the embedding, the head and the
  1-D parameters (`eqx_gn.muon_adamw`), cosine decay of ``lr``;
- ``soap``: SOAP (`eqx_gn.baselines.soap`), cosine decay of ``lr``;
- ``gn``: full Gauss-Newton, `eqx_gn.InnerOptimizer` with the Muon/AdamW inner
  optimizer at inner learning rate ``lr`` on one global cosine schedule over all
  inner steps, warm start, `eqx_gn.GridLineSearch`;
- ``gn-layerwise``: the same on the block-diagonal GN model
  (`eqx_gn.lm.layerwise_blocks`);
- ``gn-prox``: the same with `eqx_gn.ProxLinear` (exact loss of the linearized
  model).

Every first-order update clips the gradient to global norm ``max_grad_norm``.

**Batches.** ``batch_size`` is the number of sequences per optimizer step for
every optimizer and phase. A GN step splits it into ``micro_batches`` micro-batches
(row ``r`` of the step's batch goes to micro-batch ``r mod micro_batches``, a
layout that does not depend on how many processes read the data). The line search
draws its own batches, ``ls_batches`` micro-batches of ``ls_batch_size``
sequences, from a second iterator over the training split with another seed;
their tokens are counted apart (``ls_tokens``), not in ``tokens``.

**Metrics.** Each record has ``step`` (counting all phases from 1), ``phase``
(``"warmup"`` or ``"main"``), ``tokens`` (training tokens so far), ``time_s``
(seconds spent in training steps so far: data, compute and reading the metrics,
but not compilation, evaluation or checkpoints), ``lr`` and ``train_loss`` (the
training loss at the parameters the step started from: on the step's batch for
first-order steps, on the line-search batches for GN steps). GN steps add
``loss_before``/``loss_after`` (line-search losses at the start and at the chosen
step), ``step_size``, ``predicted_decrease``/``actual_decrease`` (model and true
decrease at step size 1), ``model_start``/``model_end``, ``rejected``,
``nonfinite`` and ``ls_tokens``. Evaluation steps (every ``eval_every`` steps, the
last warm-up step and the last step) add ``val_loss``, the mean loss over
``eval_batches`` fixed validation batches of ``eval_batch_size`` sequences.

**Resuming.** With ``resume=True`` a run continues from its newest checkpoint and
ends with the same parameters, bit for bit on CPU, and the same metrics records
(but for the times) as a run that was never interrupted.

**Parallelism.** Parameters and optimizer state are replicated over a one-axis
``data`` mesh of ``data_parallel`` devices and every batch is split over it along
its sequence axis (``jax.jit`` with ``NamedSharding``; XLA inserts the
collectives). With ``distributed=True`` the run calls
``jax.distributed.initialize`` first, the mesh spans every process's devices, and
each process reads only its shard of every batch.
"""

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._gauss_newton import GaussNewton
from .._line_search import GridLineSearch
from .._losses import SoftmaxCrossEntropy
from .._optimizers import muon_adamw
from .._solvers import InnerOptimizer, ProxLinear
from ..baselines import soap
from ._checkpoint import Checkpointer
from ._data import TokenSplits, batch_iterator, prepare_splits
from ._model import (
    LMConfig,
    Transformer,
    apply_lm,
    count_params,
    embedding_and_head,
    get_config,
    layerwise_blocks,
)

#: The optimizers `train` knows, in the order the CLI lists them.
OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "soap", "gn", "gn-layerwise", "gn-prox")
#: The Gauss-Newton ones among them.
GN_OPTIMIZERS: tuple[str, ...] = ("gn", "gn-layerwise", "gn-prox")
#: The learning rate of each optimizer when ``TrainConfig.lr`` is ``None`` (the inner
#: learning rate for GN): the best of two or three values tried with the defaults
#: (tiny model, bundled Shakespeare, 200 steps of 64 sequences of 64 bytes).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "adamw": 3e-3,
    "muon": 5e-2,
    "soap": 1e-2,
    "gn": 3e-2,
    "gn-layerwise": 3e-2,
    "gn-prox": 3e-2,
}

# Fields that say how a run is carried out, not what it computes: a resumed run
# may change them.
_EXECUTION_FIELDS = frozenset(
    {
        "out",
        "cache_dir",
        "checkpoint_every",
        "resume",
        "overwrite",
        "progress",
        "stop_after",
        "data_parallel",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)

# Fields that choose the data or evaluation but leave the compiled training step
# unchanged.
_DATA_FIELDS = frozenset(
    {"text", "val_fraction", "seed", "eval_every", "eval_batches", "target_loss"}
)

# Compiled step functions, shared by the runs of one process (a comparison, a
# resumed run, tests) whose steps compute the same thing.
_COMPILED: dict[tuple, Callable] = {}
_MAX_COMPILED = 32

_LOSS = SoftmaxCrossEntropy()
_DATA = "data"


class ConfigError(ValueError):
    """A bad configuration, or input data that cannot be used, found before any
    training step runs. The message is one line that says what to change."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (see the module docstring).

    **Data:** ``text`` (a UTF-8 file or a directory of ``.txt`` files; ``None``
    for the bundled Shakespeare plays), ``tokenizer`` (``"byte"`` or ``"bpe"``),
    ``vocab_size`` (BPE only), ``val_fraction``, ``cache_dir`` (tokenizer and
    token cache; default ``$EQX_GN_CACHE`` or ``~/.cache/eqx_gn``).

    **Model:** ``model`` (a name of `eqx_gn.lm.get_config`; its vocabulary is set
    to the tokenizer's), ``seq_len`` (``None``: the model's).

    **Optimization:** ``optimizer`` (one of ``OPTIMIZERS``), ``steps`` (all
    optimizer steps, warm-up included), ``batch_size`` (sequences per step),
    ``micro_batches`` (GN: inner steps per outer step), ``ls_batches`` and
    ``ls_batch_size`` (GN line search; ``None``: the micro-batch size),
    ``ls_grid`` (step sizes tried by the line search), ``lr`` (``None``: from
    ``DEFAULT_LEARNING_RATES``), ``weight_decay``, ``b2`` (AdamW's second-moment
    decay), ``max_grad_norm``, ``warmup_fraction``, ``warmup_lr``.

    **Evaluation:** ``eval_every`` (steps; 0: only after the warm-up and at the
    end), ``eval_batches``, ``eval_batch_size``, ``target_loss`` (stop when the
    validation loss reaches it).

    **Run:** ``seed``, ``out`` (output directory), ``checkpoint_every`` (steps; 0:
    only at the end), ``resume`` (continue the run in ``out``), ``overwrite``
    (delete the run in ``out`` first), ``progress`` (a tqdm bar), ``stop_after``
    (debugging: return after this step as if killed, without a final checkpoint).

    **Parallelism:** ``data_parallel`` (devices of the ``data`` mesh; ``None``: 1,
    or all devices with ``distributed``), ``distributed`` with
    ``coordinator_address``, ``num_processes``, ``process_id`` (``None``: left to
    ``jax.distributed.initialize``, which reads ``JAX_COORDINATOR_ADDRESS`` and
    cluster environments).

    **Raises:** `ConfigError` for a value out of range or inconsistent with another.
    """

    # Data
    text: str | None = None
    tokenizer: str = "byte"
    vocab_size: int | None = None
    val_fraction: float = 0.1
    cache_dir: str | None = None
    # Model
    model: str = "tiny"
    seq_len: int | None = None
    # Optimization
    optimizer: str = "gn"
    steps: int = 200
    batch_size: int = 64
    micro_batches: int = 8
    ls_batches: int = 2
    ls_batch_size: int | None = None
    ls_grid: int = 8
    lr: float | None = None
    weight_decay: float = 0.0
    b2: float = 0.95
    max_grad_norm: float = 1.0
    warmup_fraction: float = 0.1
    warmup_lr: float = 3e-3
    # Evaluation
    eval_every: int = 20
    eval_batches: int = 8
    eval_batch_size: int = 32
    target_loss: float | None = None
    # Run
    seed: int = 0
    out: str = "runs/eqx-gn"
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    stop_after: int | None = None
    # Parallelism
    data_parallel: int | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        def positive(name, allow_none=False, allow_zero=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            low = 0 if allow_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

        for name in ("steps", "batch_size", "micro_batches", "ls_batches", "ls_grid"):
            positive(name)
        for name in ("eval_batches", "eval_batch_size"):
            positive(name)
        for name in ("eval_every", "checkpoint_every", "seed"):
            positive(name, allow_zero=True)
        for name in ("ls_batch_size", "seq_len", "vocab_size", "data_parallel"):
            positive(name, allow_none=True)
        positive("num_processes", allow_none=True)
        positive("stop_after", allow_none=True)
        if self.process_id is not None:
            positive("process_id", allow_zero=True)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of "
                f"{', '.join(OPTIMIZERS)}"
            )
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(
                f"unknown tokenizer {self.tokenizer!r}; choose 'byte' or 'bpe'"
            )
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ConfigError("the 'bpe' tokenizer needs a vocab_size (e.g. 1024)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"val_fraction must be in (0, 1), got {self.val_fraction}"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(
                f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )
        for name in ("lr", "warmup_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.b2 < 1.0:
            raise ConfigError(f"b2 must be in [0, 1), got {self.b2}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise ConfigError(f"target_loss must be finite, got {self.target_loss}")
        if self.seed >= 2**31:
            raise ConfigError(f"seed must be < 2**31, got {self.seed}")
        if self.is_gn and self.batch_size % self.micro_batches:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by micro_batches="
                f"{self.micro_batches}: GN splits each step's batch into "
                "micro_batches equal micro-batches"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other")

    @property
    def is_gn(self) -> bool:
        """Whether the main phase runs a Gauss-Newton optimizer."""
        return self.optimizer in GN_OPTIMIZERS

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default."""
        return DEFAULT_LEARNING_RATES[self.optimizer] if self.lr is None else self.lr

    @property
    def warmup_steps(self) -> int:
        """AdamW steps before the main phase: ``round(warmup_fraction * steps)``, at
        least 1 when ``warmup_fraction > 0``, and always leaving one main step."""
        if self.warmup_fraction == 0 or self.steps < 2:
            return 0
        return min(self.steps - 1, max(1, round(self.warmup_fraction * self.steps)))

    @property
    def main_steps(self) -> int:
        """Steps of the chosen optimizer: ``steps - warmup_steps``."""
        return self.steps - self.warmup_steps

    @property
    def micro_batch_size(self) -> int:
        """GN: sequences per micro-batch, ``batch_size // micro_batches``."""
        return self.batch_size // self.micro_batches

    @property
    def line_search_batch_size(self) -> int:
        """Sequences per line-search batch: ``ls_batch_size`` or the micro-batch
        size."""
        if self.ls_batch_size is not None:
            return self.ls_batch_size
        return self.micro_batch_size if self.is_gn else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# Jitted steps
# ---------------------------------------------------------------------------


def _inputs_targets(tokens):
    return tokens[..., :-1], tokens[..., 1:]


def _lm_loss(model, inputs, targets):
    return _LOSS.value(apply_lm(model, inputs), targets)


def _constrain(tree, sharding):
    # Outputs keep the inputs' (replicated) sharding, so the compiled step can take
    # its own outputs back.
    return jax.tree.map(
        lambda x: (
            jax.lax.with_sharding_constraint(x, sharding) if eqx.is_array(x) else x
        ),
        tree,
    )


def _next_key(key_data):
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key_data))[0])


@eqx.filter_jit
def _first_order_step(optimizer, model, opt_state, key_data, batch, sharding):
    inputs, targets = _inputs_targets(batch)
    loss, grads = eqx.filter_value_and_grad(_lm_loss)(model, inputs, targets)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    out = (model, opt_state, _next_key(key_data), {"train_loss": loss})
    return _constrain(out, sharding)


#: The GN statistics in each GN step's metrics record, in this order.
_GN_METRICS = (
    "step_size",
    "loss_before",
    "loss_after",
    "predicted_decrease",
    "actual_decrease",
    "model_start",
    "model_end",
    "rejected",
    "nonfinite",
)


@eqx.filter_jit
def _gn_step(gn, model, gn_state, key_data, batches, ls_batches, sharding):
    model, gn_state, stats = gn.step(
        model, gn_state, _inputs_targets(batches), _inputs_targets(ls_batches)
    )
    metrics = {
        "train_loss": stats.loss_before,
        "loss_before": stats.loss_before,
        "loss_after": stats.loss_after,
        "step_size": stats.step_size,
        "predicted_decrease": stats.predicted_decrease,
        "actual_decrease": stats.actual_decrease,
        "model_start": stats.model_start,
        "model_end": stats.model_end,
        "rejected": stats.rejected,
        "nonfinite": stats.nonfinite,
    }
    out = (model, gn_state, _next_key(key_data), metrics)
    return _constrain(out, sharding)


@eqx.filter_jit
def _init_opt_state(optimizer, model, sharding):
    if isinstance(optimizer, GaussNewton):
        state = optimizer.init(model)
    else:
        state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    return _constrain(state, sharding)


@eqx.filter_jit
def _eval_loss(model, batches, sharding):
    def one(batch):
        return _lm_loss(model, *_inputs_targets(batch))

    return _constrain(jnp.mean(jax.lax.map(one, batches)), sharding)


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def _warmup_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            config.warmup_lr, b1=0.9, b2=config.b2, weight_decay=config.weight_decay
        ),
    )


def _cosine(config: TrainConfig) -> optax.Schedule:
    return optax.cosine_decay_schedule(config.learning_rate, config.main_steps)


def _first_order_optimizer(config: TrainConfig, model) -> optax.GradientTransformation:
    schedule = _cosine(config)
    if config.optimizer == "adamw":
        inner = optax.adamw(
            schedule, b1=0.9, b2=config.b2, weight_decay=config.weight_decay
        )
    elif config.optimizer == "muon":
        return muon_adamw(
            schedule,
            adam_filter=embedding_and_head(model),
            adam_b2=config.b2,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
        )
    elif config.optimizer == "soap":
        inner = soap(schedule, weight_decay=config.weight_decay)
    else:  # pragma: no cover - guarded by TrainConfig
        raise AssertionError(config.optimizer)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), inner)


def _gauss_newton(config: TrainConfig, model) -> GaussNewton:
    inner = muon_adamw(
        1.0,
        adam_filter=embedding_and_head(model),
        adam_b2=config.b2,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )
    solver_cls = ProxLinear if config.optimizer == "gn-prox" else InnerOptimizer
    solver = solver_cls(
        inner,
        learning_rate=config.learning_rate,
        schedule="global_cosine",
        total_steps=config.main_steps,
        warm_start=True,
    )
    blocks = layerwise_blocks(model) if config.optimizer == "gn-layerwise" else None
    return GaussNewton(
        apply_lm,
        _LOSS,
        solver=solver,
        line_search=GridLineSearch(grid_size=config.ls_grid),
        blocks=blocks,
    )


def _learning_rate_at(config: TrainConfig, step: int) -> float:
    """The (peak inner, for GN) learning rate of global step ``step`` (from 1)."""
    if step <= config.warmup_steps:
        return config.warmup_lr
    fraction = (step - config.warmup_steps - 1) / config.main_steps
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * fraction))


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _initialize_distributed(config: TrainConfig) -> None:
    if jax.distributed.is_initialized():
        return
    # Collectives between CPU processes need gloo; GPU and TPU ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    except (RuntimeError, ValueError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"jax.distributed.initialize failed: {message}") from e


def _make_mesh(config: TrainConfig) -> Mesh:
    devices = jax.devices()
    if config.data_parallel is None:
        n = len(devices) if jax.process_count() > 1 else 1
    else:
        n = config.data_parallel
    if n > len(devices):
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (
                f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                "before starting"
            )
        raise ConfigError(
            f"data_parallel={n} but only {len(devices)} devices are visible "
            f"({jax.default_backend()} backend){hint}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(
            f"a multi-process run shards data over all {len(devices)} devices; "
            f"got data_parallel={n}"
        )
    return Mesh(np.asarray(devices[:n]), (_DATA,))


def _check_divisible(config: TrainConfig, devices: int) -> None:
    sizes = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    if config.is_gn:
        sizes["batch_size / micro_batches"] = config.micro_batch_size
        sizes["ls_batch_size"] = config.line_search_batch_size
    for name, size in sizes.items():
        if size % devices:
            raise ConfigError(
                f"{name}={size} is not divisible by the {devices} devices of the "
                "data mesh"
            )


@functools.lru_cache(maxsize=8)
def _initializer(model_config: LMConfig, sharding: NamedSharding) -> Callable:
    """``seed -> (params, key_data)``, jitted with replicated outputs."""

    def init(seed):
        key = jax.random.key(seed)
        params = eqx.filter(Transformer(model_config, key), eqx.is_array)
        return params, jax.random.key_data(jax.random.fold_in(key, 1))

    return jax.jit(init, out_shardings=sharding)


@functools.lru_cache(maxsize=4)
def _default_corpus_splits(
    tokenizer: str, vocab_size: int | None, val_fraction: float, cache_dir: str | None
) -> TokenSplits:
    # Reading the bundled plays takes seconds; they do not change while a process
    # runs (a comparison, a sweep, tests), so their splits are kept.
    return prepare_splits(
        None,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
    )


def _splits(config: TrainConfig) -> TokenSplits:
    if config.text is None:
        return _default_corpus_splits(
            config.tokenizer, config.vocab_size, config.val_fraction, config.cache_dir
        )
    return prepare_splits(
        config.text,
        tokenizer=config.tokenizer,
        vocab_size=config.vocab_size,
        val_fraction=config.val_fraction,
        cache_dir=config.cache_dir,
    )


def _json_ready(tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        value = np.asarray(value)
        out[name] = bool(value) if value.dtype == bool else float(value)
    return out


class _Runner:
    """The state and the loop of one `train` call."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.t_start = time.perf_counter()
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.primary = self.process_index == 0
        self.out = Path(config.out).expanduser().absolute()
        self.mesh = _make_mesh(config)
        self.devices = self.mesh.devices.size
        _check_divisible(config, self.devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        try:
            self.splits = _splits(config)
            overrides = {"vocab_size": self.splits.tokenizer.vocab_size}
            if config.seq_len is not None:
                overrides["seq_len"] = config.seq_len
            self.model_config = get_config(config.model, **overrides)
            self.seq_len = self.model_config.seq_len
            self._make_iterators()
            self.eval_batches = self._eval_batches()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(" ".join(str(e).split())) from e
        self.compile_s = 0.0
        self.eval_s = 0.0
        self.checkpoint_s = 0.0
        self.compiled: dict[str, Callable] = {}

    # -- data -------------------------------------------------------------

    def _iterator(self, tokens, batch_size, seed, shuffle=True):
        return batch_iterator(
            tokens,
            batch_size,
            self.seq_len,
            seed=seed,
            shuffle=shuffle,
            process_index=self.process_index,
            process_count=self.process_count,
        )

    def _make_iterators(self):
        config = self.config
        self.train_iter = self._iterator(
            self.splits.train, config.batch_size, config.seed
        )
        self.iterators = {"train_iter": self.train_iter}
        if config.is_gn:
            self.ls_iter = self._iterator(
                self.splits.train,
                config.ls_batches * config.line_search_batch_size,
                (config.seed + 1_000_003) % 2**32,
            )
            self.iterators["ls_iter"] = self.ls_iter

    def _global(self, local: np.ndarray, spec: PartitionSpec, shape) -> jax.Array:
        return jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, spec), np.ascontiguousarray(local), shape
        )

    def _flat_batch(self, local):
        shape = (self.config.batch_size, self.seq_len + 1)
        return self._global(local, PartitionSpec(_DATA, None), shape)

    def _stacked(self, local, count):
        # Row r of the (global) batch goes to micro-batch r mod count; see the module
        # docstring. Each process holds a contiguous block of rows whose length is a
        # multiple of count, so its share of every micro-batch is a contiguous block
        # too, and processes are in mesh order.
        rows = local.shape[0]
        stacked = local.reshape(rows // count, count, -1).transpose(1, 0, 2)
        shape = (count, rows * self.process_count // count, self.seq_len + 1)
        return self._global(stacked, PartitionSpec(None, _DATA, None), shape)

    def _eval_batches(self):
        config = self.config
        # Fixed batches: the same for every run on this corpus and seq_len.
        iterator = self._iterator(self.splits.validation, config.eval_batch_size, 0)
        local = np.stack([next(iterator) for _ in range(config.eval_batches)])
        shape = (config.eval_batches, config.eval_batch_size, self.seq_len + 1)
        return self._global(local, PartitionSpec(None, _DATA, None), shape)

    # -- state ------------------------------------------------------------

    def _init_model(self):
        shapes = eqx.filter_eval_shape(
            Transformer, self.model_config, jax.random.key(0)
        )
        self.static = eqx.filter(
            shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct), inverse=True
        )
        init = _initializer(self.model_config, self.replicated)
        params, self.key_data = init(jnp.asarray(self.config.seed, jnp.int32))
        self.model = eqx.combine(params, self.static)

    def _phase_optimizer(self, phase: str):
        if phase == "warmup":
            return _warmup_optimizer(self.config)
        if self.config.is_gn:
            return _gauss_newton(self.config, self.model)
        return _first_order_optimizer(self.config, self.model)

    def _enter_phase(self, phase: str):
        self.phase = phase
        self.optimizer = self._phase_optimizer(phase)
        args = (self.optimizer, self.model, self.replicated)
        init = self._compiled(f"{phase}-init", phase, _init_opt_state, *args)
        self.opt_state = init(*args)

    def _state(self):
        return (eqx.filter(self.model, eqx.is_array), self.opt_state, self.key_data)

    # -- compiled functions -----------------------------------------------

    def _compiled(self, name: str, kind: str, fn, *args) -> Callable:
        """``fn`` compiled for ``args``: once per run, and once per process for all
        runs whose configuration gives ``kind`` (``"warmup"``, ``"main"`` or
        ``"eval"``) the same computation."""
        if name not in self.compiled:
            key = (name, *self._compile_key(kind))
            start = time.perf_counter()
            if key not in _COMPILED:
                if len(_COMPILED) >= _MAX_COMPILED:
                    _COMPILED.pop(next(iter(_COMPILED)))
                _COMPILED[key] = fn.lower(*args).compile()
            self.compiled[name] = _COMPILED[key]
            self.compile_s += time.perf_counter() - start
        return self.compiled[name]

    def _compile_key(self, kind: str) -> tuple:
        # Everything the function computes depends on: the configuration fields
        # that shape the step (not the data, the seed or the run's bookkeeping), the
        # model and the mesh.
        config = self.config
        if kind == "eval":
            fields = ["eval_batches", "eval_batch_size"]
        elif kind == "warmup":
            fields = ["batch_size", "warmup_lr", "b2", "weight_decay", "max_grad_norm"]
        else:
            skip = _EXECUTION_FIELDS | _DATA_FIELDS
            fields = sorted(f for f in config.to_dict() if f not in skip)
        values = tuple((f, getattr(config, f)) for f in fields)
        x64 = jax.config.jax_enable_x64
        return (values, self.model_config, self.replicated, x64)

    def _step(self, step: int) -> dict[str, Any]:
        config = self.config
        gn_step = self.phase == "main" and config.is_gn
        batch = next(self.train_iter)
        if gn_step:
            batches = self._stacked(batch, config.micro_batches)
            ls_batches = self._stacked(next(self.ls_iter), config.ls_batches)
            args = (
                self.optimizer,
                self.model,
                self.opt_state,
                self.key_data,
                batches,
                ls_batches,
                self.replicated,
            )
            fn = _gn_step
        else:
            args = (
                self.optimizer,
                self.model,
                self.opt_state,
                self.key_data,
                self._flat_batch(batch),
                self.replicated,
            )
            fn = _first_order_step
        compiled = self._compiled(self.phase, self.phase, fn, *args)
        self.model, self.opt_state, self.key_data, metrics = compiled(*args)
        return _json_ready(metrics)

    def _evaluate(self) -> float:
        start = time.perf_counter()
        args = (self.model, self.eval_batches, self.replicated)
        compiled = self._compiled("eval", "eval", _eval_loss, *args)
        loss = float(np.asarray(compiled(*args)))
        self.eval_s += time.perf_counter() - start
        return loss

    # -- files ------------------------------------------------------------

    def _resolved(self) -> dict[str, Any]:
        config = self.config
        return {
            "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps,
            "main_steps": config.main_steps,
            "micro_batch_size": config.micro_batch_size if config.is_gn else None,
            "ls_batch_size": config.line_search_batch_size if config.is_gn else None,
            "seq_len": self.seq_len,
            "tokens_per_step": config.batch_size * self.seq_len,
            "model_config": {
                f.name: getattr(self.model_config, f.name)
                for f in dataclasses.fields(self.model_config)
            },
            "num_params": count_params(self.model),
            "tokenizer": self.splits.tokenizer.name,
            "corpus_hash": self.splits.corpus_hash,
            "train_tokens": len(self.splits.train),
            "validation_tokens": len(self.splits.validation),
            "devices": self.devices,
            "processes": self.process_count,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
        }

    def _check_previous_run(self) -> None:
        """Refuse to mix runs in one directory; check a resumed run's config."""
        config = self.config
        config_file = self.out / "config.json"
        if config.overwrite:
            if self.primary:
                for name in ("checkpoints", "metrics.jsonl", "summary.json"):
                    path = self.out / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            self._sync("eqx_gn_overwrite")
            return
        if not config_file.exists():
            return
        if not config.resume:
            raise ConfigError(
                f"{self.out} already holds a run; pass resume to continue it, "
                "overwrite to start over, or choose another output directory"
            )
        saved = json.loads(config_file.read_text())["config"]
        current = config.to_dict()
        changed = sorted(
            name
            for name in current
            if name not in _EXECUTION_FIELDS and saved.get(name) != current[name]
        )
        if changed:
            details = ", ".join(
                f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed
            )
            raise ConfigError(
                f"cannot resume the run in {self.out} with a different configuration "
                f"({details})"
            )

    def _sync(self, name: str) -> None:
        if self.process_count > 1:
            multihost_utils.sync_global_devices(name)

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        if self.primary:
            path = self.out / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(json.dumps(value, indent=2) + "\n")
            tmp.replace(path)

    # -- the loop ---------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.primary:
            self.out.mkdir(parents=True, exist_ok=True)
        self._sync("eqx_gn_mkdir")
        self._check_previous_run()
        self._init_model()
        self.checkpointer = Checkpointer(self.out / "checkpoints")
        try:
            return self._run()
        finally:
            self.checkpointer.close()

    def _restore_or_start(self) -> None:
        config = self.config
        self.counters = {
            "step": 0,
            "tokens": 0,
            "ls_tokens": 0,
            "time_s": 0.0,
            "metrics_offset": 0,
            "last_val_loss": None,
            "best_val_loss": None,
            "last_train_loss": None,
            "target_step": None,
            "target_tokens": None,
            "target_time_s": None,
        }
        latest = self.checkpointer.latest_step() if config.resume else None
        if latest is None:
            self._enter_phase("warmup" if config.warmup_steps else "main")
            return
        meta = self.checkpointer.restore_meta(latest)
        self.counters.update(meta["counters"])
        self._enter_phase(meta["phase"])
        params, self.opt_state, self.key_data = self.checkpointer.restore(
            latest, self._state(), self.iterators
        )
        self.model = eqx.combine(params, self.static)

    def _save(self) -> None:
        start = time.perf_counter()
        step = self.counters["step"]
        if self.checkpointer.latest_step() != step:
            meta = {"phase": self.phase, "counters": self.counters}
            self.checkpointer.save(step, self._state(), self.iterators, meta)
        self.checkpoint_s += time.perf_counter() - start

    def _run(self) -> dict[str, Any]:
        config = self.config
        self._restore_or_start()
        counters = self.counters
        self._write_json(
            "config.json", {"config": config.to_dict(), "resolved": self._resolved()}
        )
        metrics_file = None
        if self.primary:
            path = self.out / "metrics.jsonl"
            with open(path, "a") as f:
                f.truncate(counters["metrics_offset"])
            metrics_file = open(path, "a")  # noqa: SIM115
        tokens_per_step = config.batch_size * self.seq_len
        ls_tokens_per_step = (
            config.ls_batches * config.line_search_batch_size * self.seq_len
        )
        bar = _progress_bar(config, counters["step"], self.primary)
        stopped_early = False
        try:
            while counters["step"] < config.steps and counters["target_step"] is None:
                step = counters["step"] + 1
                if self.phase == "warmup" and step > config.warmup_steps:
                    self._enter_phase("main")
                start, compile_s = time.perf_counter(), self.compile_s
                metrics = self._step(step)
                elapsed = time.perf_counter() - start - (self.compile_s - compile_s)
                counters["step"] = step
                counters["tokens"] += tokens_per_step
                counters["time_s"] += elapsed
                counters["last_train_loss"] = metrics["train_loss"]
                record = {
                    "step": step,
                    "phase": self.phase,
                    "tokens": counters["tokens"],
                    "time_s": counters["time_s"],
                    "lr": _learning_rate_at(config, step),
                    "train_loss": metrics.pop("train_loss"),
                }
                if self.phase == "main" and config.is_gn:
                    counters["ls_tokens"] += ls_tokens_per_step
                    record.update({name: metrics[name] for name in _GN_METRICS})
                    record["ls_tokens"] = counters["ls_tokens"]
                if (
                    (config.eval_every and step % config.eval_every == 0)
                    or step == config.warmup_steps
                    or step == config.steps
                ):
                    self._record_eval(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    counters["metrics_offset"] = metrics_file.tell()
                if bar is not None:
                    bar.update(1)
                    speed = tokens_per_step / max(elapsed, 1e-9)
                    bar.set_postfix_str(_postfix(record, speed))
                finished = step == config.steps or counters["target_step"] is not None
                if finished or (
                    config.checkpoint_every and step % config.checkpoint_every == 0
                ):
                    self._save()
                if config.stop_after is not None and step >= config.stop_after:
                    stopped_early = not finished
                    break
            if counters["step"] > 0 and not stopped_early:
                self._save()
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
        summary = self._summary(completed=not stopped_early)
        if not stopped_early:
            self._write_json("summary.json", summary)
        return summary

    def _record_eval(self, record: dict[str, Any]) -> None:
        config, counters = self.config, self.counters
        loss = self._evaluate()
        record["val_loss"] = loss
        counters["last_val_loss"] = loss
        best = counters["best_val_loss"]
        counters["best_val_loss"] = loss if best is None else min(best, loss)
        if config.target_loss is not None and loss <= config.target_loss:
            counters["target_step"] = record["step"]
            counters["target_tokens"] = record["tokens"]
            counters["target_time_s"] = record["time_s"]

    def _summary(self, completed: bool) -> dict[str, Any]:
        config, counters = self.config, self.counters
        return {
            "optimizer": config.optimizer,
            "model": config.model,
            "num_params": count_params(self.model),
            "completed": completed,
            "steps": counters["step"],
            "warmup_steps": config.warmup_steps,
            "tokens": counters["tokens"],
            "ls_tokens": counters["ls_tokens"],
            "time_s": counters["time_s"],
            "compile_s": self.compile_s,
            "eval_s": self.eval_s,
            "checkpoint_s": self.checkpoint_s,
            "wall_s": time.perf_counter() - self.t_start,
            "final_val_loss": counters["last_val_loss"],
            "best_val_loss": counters["best_val_loss"],
            "final_train_loss": counters["last_train_loss"],
            "target_loss": config.target_loss,
            "target_reached": counters["target_step"] is not None,
            "steps_to_target": counters["target_step"],
            "tokens_to_target": counters["target_tokens"],
            "time_to_target": counters["target_time_s"],
            "compiled": sorted(n for n in self.compiled if not n.endswith("-init")),
            "out": str(self.out),
            "metrics": str(self.out / "metrics.jsonl"),
            "checkpoints": str(self.out / "checkpoints"),
        }


def _progress_bar(config: TrainConfig, initial: int, primary: bool):
    if not (config.progress and primary):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=initial,
        desc=config.optimizer,
        unit="step",
        dynamic_ncols=True,
        leave=True,
    )


def _postfix(record: dict[str, Any], tokens_per_second: float) -> str:
    parts = [f"loss {record['train_loss']:.3f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.3f}")
    parts.append(f"{tokens_per_second:,.0f} tok/s")
    return ", ".join(parts)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or, with ``config.resume``, continue) the training run ``config``.

    Writes ``config.json``, ``metrics.jsonl``, ``summary.json`` and checkpoints into
    ``config.out`` (on the first process only, but for checkpoints) and returns the
    summary: ``final_val_loss``, ``best_val_loss``, ``steps``, ``tokens``,
    ``ls_tokens``, ``time_s`` (training time, no compilation or evaluation),
    ``compile_s``, ``wall_s``, ``target_reached``, ``steps_to_target``,
    ``tokens_to_target``, ``time_to_target``, ``completed`` (False when
    ``stop_after`` cut the run short) and where the files are.

    **Raises:** `ConfigError` for an unusable configuration or corpus (before any
    step runs).
    """
    if config.distributed:
        _initialize_distributed(config)
    return _Runner(config).run()
