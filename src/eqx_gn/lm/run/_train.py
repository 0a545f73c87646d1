r"""The training loop of the language-model study.

``train(TrainConfig(...))`` trains one model with one optimizer and writes into
``config.out`` (see `eqx_gn.lm.run._run_dir` for what it may overwrite)::

    config.json      the configuration and what it resolved to (learning rate,
                     warm-up steps, model shape, mesh, corpus hash, ...)
    metrics.jsonl    one JSON record per step (see below)
    summary.json     the outcome (final and best validation loss, steps, tokens
                     and time to the target loss, ...)
    checkpoints/     verified orbax checkpoints (see `eqx_gn.lm.run._checkpoint`)

**Phases.** A run of ``steps`` optimizer steps starts with ``warmup_steps`` steps of
AdamW, then runs the chosen optimizer (`eqx_gn.lm.run._recipes`).

**Batches.** ``batch_size`` is the number of sequences per optimizer step for
every optimizer and phase. A GN step splits it into ``micro_batches``
micro-batches (`eqx_gn.lm.data._pipeline.GlobalBatches.stacked`). The line search draws
its own batches, ``ls_batches`` micro-batches of ``ls_batch_size`` sequences, from
a second iterator over the training split with another seed; their tokens are
counted apart (``ls_tokens``) and in ``tokens_read``. With ``grad_accumulation =
A``, a first-order main step averages the gradients of ``A`` micro-batches laid
out as GN's (the same step, in smaller passes).

**Metrics.** Each record has ``step`` (counting all phases from 1), ``phase``
(``"warmup"`` or ``"main"``), ``tokens`` (training tokens of the optimizer steps
so far), ``time_s`` (seconds spent in training steps so far: data, compute and
reading the metrics, but not compilation, evaluation or checkpoints), ``lr`` and
``train_loss`` (the training loss at the parameters the step started from: on the
step's batch for first-order steps, on the line-search batches for GN steps). GN
steps add ``loss_before``/``loss_after`` (line-search losses at the start and at
the chosen step), ``step_size``, ``predicted_decrease``/``actual_decrease``
(model and true decrease at step size 1), ``model_start``/``model_end``,
``damping``, ``rejected``, ``nonfinite``, ``line_search_evaluations`` (losses
evaluated by the line search, each on all its batches, besides the one at the
start) and ``ls_tokens`` (line-search tokens so far); ``actual_decrease`` is NaN
when the line search did not evaluate step size 1 (the warm walk). Evaluation
steps (every ``eval_every`` steps, the last warm-up step and the last step) add
``val_loss``, the mean loss over ``eval_batches`` fixed validation batches of
``eval_batch_size`` sequences. With ``curvature_every = N``, every ``N``-th step
adds ``curvature_top`` (the 3 largest eigenvalues of the full GN matrix, by 20
Lanczos steps, `eqx_gn.eigenpairs`), ``curvature_trace`` and
``curvature_trace_stderr`` (8 Hutchinson probes, `eqx_gn.trace_estimate`), at the
step's new parameters on the first validation batch (timed with the evaluations).
A layerwise GN run (``blocks="layerwise"``, its warm-up steps too) estimates the
trace on its block-diagonal GN matrix (the same trace, less variance) and adds
``curvature_blocks`` (the block names of `eqx_gn.lm.layerwise_blocks`:
``embedding``, ``block0``, ..., ``head``), ``curvature_block_traces`` and
``curvature_block_trace_stderrs`` in that order; the block traces sum to
``curvature_trace``.

**Steps to a target.** With ``target_loss``, the run stops at the first evaluation
that reaches it. ``eval_resolution = R`` adds evaluations whenever ``R`` times the
step has passed since the last one, and at every step once the line through the
last two evaluations reaches the target within two such spacings, so the count is
exact to one step (the summary's ``resolution`` says what it was).
``give_up_after`` ends a run that has not reached the target by that step (the
study's tuning: a run slower than the best so far need not finish).

**Resuming.** With ``resume=True`` a run continues from its newest intact
checkpoint and ends with the same parameters, bit for bit on CPU, and the same
metrics records (but for the times) as a run that was never interrupted. It is
refused when a setting that defines the run resolves to another value, or the
corpus's digest changed; on a finished run it changes no file.

**Divergence.** A non-finite training loss, or non-finite parameters about to be
checkpointed, end the run at that step with `Diverged` (one line: the step, the
last good checkpoint, what to try). The metrics up to that step stay, nothing
non-finite is checkpointed, and the summary records the step as ``diverged_at``.
"""

import dataclasses
import functools
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ... import Blocks
from .._errors import ConfigError, Diverged, setting
from .._model import (
    LMConfig,
    Transformer,
    apply_lm_in,
    count_params,
    get_config,
    layerwise_blocks,
)
from ..data._pipeline import GlobalBatches, batch_iterator
from ..data._token_cache import cached_splits
from ._checkpoint import Checkpointer, CheckpointError
from ._config import TrainConfig
from ._console import corpus_name, eval_line, start_line
from ._parallel import (
    BATCH_AXES,
    StateLayout,
    initialize_distributed,
    make_mesh,
    sync,
)
from ._recipes import compile_key, compute_dtype_of, learning_rate_at, phase_recipe
from ._run_dir import RunDirectory, read_run_config
from ._steps import (
    COMPILED,
    GN_METRICS,
    curvature_record,
    eval_loss,
    first_order_step,
    gn_step,
    init_opt_state,
    json_ready,
)

#: The seed offset of the line-search batches' iterator.
_LS_SEED_OFFSET = 1_000_003


#: Set (by ``eqx-gn train``'s Ctrl-C handler) to stop the run before its next step:
#: a stop between steps never cuts a checkpoint write short. ``STEPPING`` is set
#: while the training loop runs (before it, an interrupt may stop at once).
STOP_REQUESTED = threading.Event()
STEPPING = threading.Event()


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is finite (one scalar)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@functools.lru_cache(maxsize=8)
def _initializer(model_config: LMConfig, layout: StateLayout) -> Callable:
    """``seed -> (params, key_data)``, jitted with outputs laid out by ``layout``."""

    def init(seed):
        key = jax.random.key(seed)
        params = eqx.filter(Transformer(model_config, key), eqx.is_array)
        return params, jax.random.key_data(jax.random.fold_in(key, 1))

    shapes = jax.eval_shape(init, jnp.zeros((), jnp.int32))
    return jax.jit(init, out_shardings=layout.shardings(shapes))


def _children(path: Path) -> list[Path]:
    """The entries of the directory ``path`` (none if it does not exist)."""
    return list(path.iterdir()) if path.is_dir() else []


@dataclasses.dataclass
class _Counters:
    """What a checkpoint's meta keeps of the loop's progress."""

    step: int = 0
    tokens: int = 0
    ls_tokens: int = 0
    rejected_steps: int = 0
    time_s: float = 0.0
    metrics_offset: int = 0
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    last_train_loss: float | None = None
    target_step: int | None = None
    target_tokens: int | None = None
    target_time_s: float | None = None
    # The last two evaluations (step, loss), for `eval_resolution`.
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    eval_losses: list[float] = dataclasses.field(default_factory=list)
    eval_each_step: bool = False
    gave_up_at: int | None = None


def _due_for_resolution(config: TrainConfig, counters: _Counters, step: int) -> bool:
    """Whether ``eval_resolution`` asks for an evaluation at ``step``: the steps
    since the last evaluation reach ``R * step``, or the line through the last two
    evaluations reaches the target within two such spacings (from then on every
    step, so that the first step at or below the target is found exactly; a loss
    curve that flattens crosses later than the line says, never earlier)."""
    r = config.eval_resolution
    if not r or config.target_loss is None:
        return False
    if counters.eval_each_step:
        return True
    spacing = max(1.0, r * step)
    # Before any evaluation (no warm-up, no eval_every), count from the start.
    last = counters.eval_steps[-1] if counters.eval_steps else 0
    if step - last >= spacing:
        return True
    if len(counters.eval_steps) < 2:
        return False
    (s0, s1), (l0, l1) = counters.eval_steps, counters.eval_losses
    if not (math.isfinite(l0) and math.isfinite(l1)):
        return False
    slope = (l0 - l1) / max(s1 - s0, 1)  # loss drop per step
    gap = l1 - config.target_loss
    counters.eval_each_step = slope > 0 and gap <= slope * (step - s1 + 2 * spacing)
    return counters.eval_each_step


class _Training:
    """The data, state and loop of one `train` call."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.t_start = time.perf_counter()
        self.process_count = jax.process_count()
        self.primary = jax.process_index() == 0
        self.run_dir = RunDirectory(config.out, primary=self.primary)
        # A bar's carriage-return frames belong on a terminal, not in a job log.
        self.show_progress = config.progress and self.primary and _on_terminal()
        self.mesh = make_mesh(config)
        self.layout = StateLayout(self.mesh)
        self.batches = GlobalBatches(
            self.mesh, BATCH_AXES, process_count=self.process_count
        )
        self.compile_s = self.eval_s = self.checkpoint_s = 0.0
        self.compiled: dict[str, Callable] = {}
        self.counters = _Counters()
        # The checkpoint step of init_from's run that the parameters came from.
        self.init_from_step: int | None = None

    # -- data ---------------------------------------------------------------

    def _load_data(self) -> None:
        """Tokenize the corpus (or read its tokens from the cache) and set up the
        iterators: under the run lock, so that a run refused for its directory
        tokenizes nothing."""
        config = self.config
        try:
            self.splits = cached_splits(
                config.text,
                text_field=config.text_field,
                progress=self.show_progress,
                tokenizer=config.tokenizer,
                vocab_size=config.vocab_size,
                val_fraction=config.val_fraction,
                cache_dir=config.cache_dir,
            )
            self.splits.check_ids()
            overrides = {
                "vocab_size": self.splits.tokenizer.vocab_size,
                "scan_layers": config.scan_layers,
            }
            if config.seq_len is not None:
                overrides["seq_len"] = config.seq_len
            self.model_config = get_config(config.model, **overrides)
            self.seq_len = self.model_config.seq_len
            self.iterators = self._iterators()
            validation = self._iterator(self.splits.validation, config.eval_batch_size)
            self.eval_batches = self.batches.fixed(validation, config.eval_batches)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(" ".join(str(e).split())) from e

    def _iterator(self, tokens, batch_size: int, seed: int = 0):
        return batch_iterator(
            tokens,
            batch_size,
            self.seq_len,
            seed=seed,
            process_index=jax.process_index(),
            process_count=self.process_count,
        )

    def _iterators(self) -> dict[str, Any]:
        config = self.config
        train = self.splits.train
        iterators = {
            "train_iter": self._iterator(train, config.batch_size, config.seed)
        }
        if config.is_gn:
            size = config.ls_batches * config.line_search_batch_size
            seed = (config.seed + _LS_SEED_OFFSET) % 2**32
            iterators["ls_iter"] = self._iterator(train, size, seed)
        return iterators

    # -- state --------------------------------------------------------------

    def _init_model(self) -> None:
        shapes = eqx.filter_eval_shape(
            Transformer, self.model_config, jax.random.key(0)
        )
        self.static = eqx.filter(
            shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct), inverse=True
        )
        init = _initializer(self.model_config, self.layout)
        params, self.key_data = init(jnp.asarray(self.config.seed, jnp.int32))
        self.model = eqx.combine(params, self.static)
        resuming = self.config.resume and any(
            p.name.isdigit() for p in _children(self.run_dir.checkpoints)
        )
        if self.config.init_from is not None and not resuming:
            # Before the run's checkpoint directory exists: a refusal leaves none.
            self._start_from(self.config.init_from)
        # The first-order steps' and the evaluation's function (GN's recipe builds
        # its own, a LayerScan on a scanned model).
        self.apply = apply_lm_in(compute_dtype_of(self.config))

    def _compiled(self, name: str, fn: Callable, key: Any, args: tuple) -> Callable:
        if name not in self.compiled:
            full_key = (key, self.model_config, self.apply)
            compiled, seconds = COMPILED.get(fn, full_key, args)
            self.compiled[name] = compiled
            self.compile_s += seconds
        return self.compiled[name]

    def _enter_phase(self, phase: str) -> None:
        self.phase = phase
        self.recipe = phase_recipe(self.config, phase)
        self.key = compile_key(self.recipe)
        self.optimizer = self.recipe.build(self.model)
        lr = 0.0 if self.recipe.lr is None else self.recipe.lr
        self.lr = jax.device_put(jnp.asarray(lr, jnp.float32), self.layout.replicated)
        args = (self.optimizer, self.model, self.layout)
        init = self._compiled(f"{phase}-init", init_opt_state, self.key, args)
        self.opt_state = init(*args)

    def _state(self):
        return (eqx.filter(self.model, eqx.is_array), self.opt_state, self.key_data)

    def _template(self, meta: dict[str, Any]):
        """The state a checkpoint holds, as a restore template: its structure
        depends on the phase the checkpoint was written in."""
        if meta["phase"] != getattr(self, "phase", None):
            self._enter_phase(meta["phase"])
        return self._state()

    def _restore_or_start(self) -> None:
        restored = None
        if self.config.resume:
            restored = self.checkpointer.restore_latest(self._template, self.iterators)
            if restored is None and self.primary:
                sys.stderr.write(
                    f"eqx-gn: no checkpoint in {self.run_dir.path} to resume from; "
                    "starting at step 0\n"
                )
        if restored is None:
            self._enter_phase("warmup" if self.config.warmup_steps else "main")
            return
        _, meta, state = restored
        if self.config.init_from is not None:
            saved = (read_run_config(self.run_dir.path) or {}).get("resolved") or {}
            self.init_from_step = saved.get("init_from_step")
        self.counters = _Counters(**meta["counters"])
        self._template(meta)
        params, self.opt_state, self.key_data = state
        self.model = eqx.combine(params, self.static)

    def _start_from(self, path: str) -> None:
        """The model's parameters from the newest intact checkpoint of the run in
        ``path`` (``init_from``); ``init_from_step`` says which."""
        source = Path(path).expanduser().absolute()
        directory = source / "checkpoints"
        if not directory.is_dir():
            raise ConfigError(
                f"{setting('init_from', str(source))} is not a run directory with "
                "checkpoints"
            )
        checkpointer = Checkpointer(directory, read_only=True)
        try:
            params = eqx.filter(self.model, eqx.is_array)
            self.init_from_step, params = checkpointer.restore_start(params)
        except CheckpointError as error:
            raise ConfigError(f"{setting('init_from')}: {error}") from None
        finally:
            checkpointer.close()
        self.model = eqx.combine(params, self.static)

    def _diverged(self, step: int, what: str) -> Diverged:
        last = self.checkpointer.latest_step()
        where = (
            f"the last good checkpoint is step {last}"
            if last is not None
            else "no checkpoint was written"
        )
        lr = setting("lr")
        lr = f"inner learning rate ({lr})" if self.config.is_gn else lr
        return Diverged(
            f"training diverged at step {step}: {what}; {where} in "
            f"{self.run_dir.path}; start a new run with a lower {lr}"
        )

    def _save(self) -> Diverged | None:
        """Checkpoint the state, unless it is not finite: then the divergence."""
        start = time.perf_counter()
        step = self.counters.step
        if self.checkpointer.latest_step() != step:
            if not bool(_all_finite(self._state()[0])):
                return self._diverged(step, "the parameters are not finite")
            meta = {"phase": self.phase, "counters": dataclasses.asdict(self.counters)}
            self.checkpointer.save(step, self._state(), self.iterators, meta)
        self.checkpoint_s += time.perf_counter() - start
        return None

    # -- steps --------------------------------------------------------------

    def _step(self) -> dict[str, Any]:
        config = self.config
        batch = next(self.iterators["train_iter"])
        state = (self.optimizer, self.lr, self.model, self.opt_state, self.key_data)
        if self.phase == "main" and config.is_gn:
            micro = self.batches.stacked(batch, config.micro_batches)
            ls = self.batches.stacked(
                next(self.iterators["ls_iter"]), config.ls_batches
            )
            args, fn = (*state, micro, ls, self.layout), gn_step
        else:
            accumulation = config.grad_accumulation if self.phase == "main" else 1
            if accumulation > 1:
                batch = self.batches.stacked(batch, accumulation)
            else:
                batch = self.batches.flat(batch)
            args, fn = (self.apply, *state, batch, self.layout), first_order_step
        compiled = self._compiled(self.phase, fn, self.key, args)
        self.model, self.opt_state, self.key_data, metrics = compiled(*args)
        return json_ready(metrics)

    def _evaluate(self) -> float:
        start = time.perf_counter()
        args = (self.apply, self.model, self.eval_batches, self.layout)
        compiled = self._compiled("eval", eval_loss, "eval", args)
        loss = float(compiled(*args))
        self.eval_s += time.perf_counter() - start
        return loss

    def _curvature(self) -> dict[str, Any]:
        start = time.perf_counter()
        blocks = self._curvature_blocks()
        args = (self.apply, self.model, self.eval_batches, self.layout, blocks)
        key = ("curvature", None if blocks is None else blocks.names)
        compiled = self._compiled("curvature", curvature_record, key, args)
        record = dict(jax.device_get(compiled(*args)))
        out = {"curvature_top": [float(x) for x in record.pop("curvature_top")]}
        if blocks is not None:
            out["curvature_blocks"] = list(blocks.names)
            for name in ("curvature_block_traces", "curvature_block_trace_stderrs"):
                out[name] = [float(x) for x in record.pop(name)]
        self.eval_s += time.perf_counter() - start
        return out | json_ready(record)

    def _curvature_blocks(self) -> Blocks | None:
        """The layerwise partition of a layerwise GN run (also in its warm-up, so
        that every record of the run has the same fields); ``None`` otherwise."""
        config = self.config
        if config.is_gn and config.gn.blocks == "layerwise":
            return layerwise_blocks(self.model)
        return None

    # -- the loop -----------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            # The old run's files go only once the data is known to load.
            self.run_dir.prepare(self.config, clear=False)
            sync("eqx_gn_run_dir")
            self._load_data()
            if self.config.overwrite:
                self.run_dir.clear()
            self._init_model()
            self.checkpointer = Checkpointer(self.run_dir.checkpoints)
            try:
                return self._loop()
            finally:
                self.checkpointer.close()
        finally:
            self.run_dir.release()

    def _loop(self) -> dict[str, Any]:
        config = self.config
        if config.resume:
            # Before restoring: a checkpoint of another vocabulary would fail on
            # an array's shape without naming the tokenizer.
            self._check_data()
        self._restore_or_start()
        counters = self.counters
        resolved = self._resolved()
        if config.resume:
            finished = self._finished_summary()
            if finished is not None:
                return finished
        self.run_dir.write_config(config, resolved)
        metrics_file = self.run_dir.open_metrics(counters.metrics_offset, counters.step)
        tokens_per_step = config.batch_size * self.seq_len
        ls_tokens_per_step = (
            config.ls_batches * config.line_search_batch_size * self.seq_len
        )
        bar = self._progress(resolved)
        rejected_since_eval = 0
        stopped_early = False
        diverged: Diverged | None = None
        STEPPING.set()
        try:
            while (
                counters.step < config.steps
                and counters.target_step is None
                and counters.gave_up_at is None
            ):
                if STOP_REQUESTED.is_set():  # Ctrl-C, seen between two steps
                    # Checkpoint here, so that --resume continues from this step
                    # rather than from the last scheduled checkpoint (or step 0).
                    if counters.step > 0:
                        diverged = self._save()
                    if diverged is None:
                        raise KeyboardInterrupt
                    break
                step = counters.step + 1
                if self.phase == "warmup" and step > config.warmup_steps:
                    self._enter_phase("main")
                start, compile_s = time.perf_counter(), self.compile_s
                metrics = self._step()
                elapsed = time.perf_counter() - start - (self.compile_s - compile_s)
                counters.step = step
                counters.tokens += tokens_per_step
                counters.time_s += elapsed
                counters.last_train_loss = metrics["train_loss"]
                record = {
                    "step": step,
                    "phase": self.phase,
                    "tokens": counters.tokens,
                    "time_s": counters.time_s,
                    "lr": learning_rate_at(config, step),
                    "train_loss": metrics.pop("train_loss"),
                }
                if self.phase == "main" and config.is_gn:
                    counters.ls_tokens += ls_tokens_per_step
                    record |= {name: metrics[name] for name in GN_METRICS}
                    record["ls_tokens"] = counters.ls_tokens
                    counters.rejected_steps += int(metrics["rejected"])
                    rejected_since_eval += int(metrics["rejected"])
                if (
                    (config.eval_every and step % config.eval_every == 0)
                    or step == config.warmup_steps
                    or step == config.steps
                    or (config.give_up_after is not None
                        and step == config.give_up_after)
                    or _due_for_resolution(config, counters, step)
                ):  # fmt: skip
                    self._record_eval(record)
                    if bar is None and self.primary:
                        line = eval_line(
                            {**record, "rejected_since_eval": rejected_since_eval},
                            config.steps,
                        )
                        print(line, flush=True)
                    rejected_since_eval = 0
                if config.curvature_every and step % config.curvature_every == 0:
                    record |= self._curvature()
                if metrics_file is not None:
                    metrics_file.write(_json_line(record))
                    metrics_file.flush()
                    counters.metrics_offset = metrics_file.tell()
                if not math.isfinite(record["train_loss"]):
                    diverged = self._diverged(
                        step, f"the training loss is {record['train_loss']}"
                    )
                    break
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(record, tokens_per_step / elapsed))
                if (
                    config.give_up_after is not None
                    and step >= config.give_up_after
                    and counters.target_step is None
                ):
                    counters.gave_up_at = step
                finished = (
                    step == config.steps
                    or counters.target_step is not None
                    or counters.gave_up_at is not None
                )
                if finished or (
                    config.checkpoint_every and step % config.checkpoint_every == 0
                ):
                    diverged = self._save()
                    if diverged is not None:
                        break
                if config.stop_after is not None and step >= config.stop_after:
                    stopped_early = not finished
                    break
            if counters.step > 0 and not stopped_early and diverged is None:
                diverged = self._save()
        finally:
            STEPPING.clear()
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
        summary = self._summary(completed=not stopped_early and diverged is None)
        if diverged is not None:
            # Not a finished run: its last evaluation came before the divergence.
            summary["diverged_at"] = counters.step
            summary["final_val_loss"] = None
        if not stopped_early:
            self.run_dir.write_json("summary.json", summary)
        if diverged is not None:
            raise diverged
        return summary

    def _check_data(self) -> None:
        """Refuse to resume on a corpus or a tokenizer other than the ones the run
        trained on (config.json is left as it is)."""
        saved = (read_run_config(self.run_dir.path) or {}).get("resolved") or {}
        where = f"cannot resume the run in {self.run_dir.path}"
        before = saved.get("corpus_hash")
        now = self.splits.corpus_hash
        if before is not None and before != now:
            raise ConfigError(
                f"{where}: its corpus changed since it was trained (digest "
                f"{before[:12]} -> {now[:12]}); restore the corpus or start a new run"
            )
        tokenizer = self.splits.tokenizer
        source = self.config.tokenizer
        vocab = (saved.get("model_config") or {}).get("vocab_size")
        if vocab is not None and vocab != tokenizer.vocab_size:
            raise ConfigError(
                f"{where}: its tokenizer changed since it was trained ({source}: "
                f"{vocab} -> {tokenizer.vocab_size} ids); restore the tokenizer or "
                "start a new run"
            )
        digest = getattr(tokenizer, "digest", None)
        before = saved.get("tokenizer_sha256")
        if before is not None and digest is not None and before != digest:
            changed = f"digest {before[:12]} -> {digest[:12]}"
        elif saved.get("tokenizer") not in (None, tokenizer.name):
            changed = f"{saved['tokenizer']} -> {tokenizer.name}"
        else:
            return
        raise ConfigError(
            f"{where}: its tokenizer changed since it was trained ({source}: "
            f"{changed}); restore the tokenizer or start a new run"
        )

    def _finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that resume finds finished (its last step or its
        target reached, its summary written), after saying so in one line; then
        no file is changed. ``None`` for a run with steps left."""
        counters, config = self.counters, self.config
        done = (
            counters.step >= config.steps
            or counters.target_step is not None
            or counters.gave_up_at is not None
        )
        summary_file = self.run_dir.path / "summary.json"
        if not done or not summary_file.exists():
            return None
        if self.primary:
            sys.stderr.write(
                f"eqx-gn: the run in {self.run_dir.path} is finished (step "
                f"{counters.step}); nothing to resume, no file changed\n"
            )
        return json.loads(summary_file.read_text())

    def _record_eval(self, record: dict[str, Any]) -> None:
        config, counters = self.config, self.counters
        loss = self._evaluate()
        record["val_loss"] = loss
        counters.last_val_loss = loss
        counters.eval_steps = [*counters.eval_steps, record["step"]][-2:]
        counters.eval_losses = [*counters.eval_losses, loss][-2:]
        best = counters.best_val_loss
        counters.best_val_loss = loss if best is None else min(best, loss)
        if config.target_loss is not None and loss <= config.target_loss:
            counters.target_step = record["step"]
            counters.target_tokens = record["tokens"] + counters.ls_tokens
            counters.target_time_s = record["time_s"]

    def _progress(self, resolved: dict[str, Any]):
        if not self.primary:
            return None
        config = self.config
        info = {
            "label": config.label,
            "model": config.model,
            "num_params": resolved["num_params"],
            "corpus": corpus_name(config.text),
            "train_tokens": resolved["train_tokens"],
            "validation_tokens": resolved["validation_tokens"],
            "tokens_per_step": resolved["tokens_per_step"],
            "steps": config.steps,
            "devices": resolved["devices"],
        }
        print(start_line(info), flush=True)
        if not self.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=config.steps,
            initial=self.counters.step,
            desc=config.label,
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    # -- files --------------------------------------------------------------

    def _resolved(self) -> dict[str, Any]:
        config = self.config
        return {
            "method": config.method,
            "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps,
            "main_steps": config.main_steps,
            "micro_batch_size": config.micro_batch_size if config.is_gn else None,
            "ls_batch_size": config.line_search_batch_size if config.is_gn else None,
            "line_search": config.line_search_rule,
            "trust": config.trust_rule,
            "seq_len": self.seq_len,
            "tokens_per_step": config.batch_size * self.seq_len,
            "model_config": {
                f.name: getattr(self.model_config, f.name)
                for f in dataclasses.fields(self.model_config)
            },
            "num_params": count_params(self.model),
            "tokenizer": self.splits.tokenizer.name,
            "tokenizer_sha256": getattr(self.splits.tokenizer, "digest", None),
            "corpus_hash": self.splits.corpus_hash,
            "train_tokens": len(self.splits.train),
            "validation_tokens": len(self.splits.validation),
            "devices": self.mesh.devices.size,
            "mesh": dict(self.mesh.shape),
            "processes": self.process_count,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "init_from_step": self.init_from_step,
        }

    def _summary(self, completed: bool) -> dict[str, Any]:
        config, counters = self.config, self.counters
        return {
            "optimizer": config.optimizer,
            "blocks": config.blocks if config.is_gn else None,
            "solver": config.solver if config.is_gn else None,
            "inner": config.inner if config.is_gn and config.solver != "cg" else None,
            "line_search": config.line_search_rule,
            "trust": config.trust_rule,
            "method": config.method,
            "label": config.label,
            "model": config.model,
            "num_params": count_params(self.model),
            "completed": completed,
            "steps": counters.step,
            "warmup_steps": config.warmup_steps,
            "tokens": counters.tokens,
            "ls_tokens": counters.ls_tokens,
            "tokens_read": counters.tokens + counters.ls_tokens,
            "param_bytes_per_device": self.layout.bytes_per_device(
                (self.model, self.opt_state)
            ),
            "rejected_steps": counters.rejected_steps if config.is_gn else None,
            "time_s": counters.time_s,
            "compile_s": self.compile_s,
            "eval_s": self.eval_s,
            "checkpoint_s": self.checkpoint_s,
            "wall_s": time.perf_counter() - self.t_start,
            "final_val_loss": counters.last_val_loss,
            "best_val_loss": counters.best_val_loss,
            "final_train_loss": counters.last_train_loss,
            "target_loss": config.target_loss,
            "target_reached": counters.target_step is not None,
            "gave_up_at": counters.gave_up_at,
            "steps_to_target": counters.target_step,
            "tokens_to_target": counters.target_tokens,
            "time_to_target": counters.target_time_s,
            "compiled": sorted(n for n in self.compiled if not n.endswith("-init")),
            "out": str(self.run_dir.path),
            "metrics": str(self.run_dir.path / "metrics.jsonl"),
            "checkpoints": str(self.run_dir.checkpoints),
        }


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


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
    ``ls_tokens`` and ``tokens_read`` (training plus line-search tokens),
    ``rejected_steps``, ``time_s`` (training time, no compilation or evaluation),
    ``compile_s``, ``wall_s``, ``target_reached``, ``steps_to_target``,
    ``tokens_to_target`` (every token read up to then, line-search tokens
    included), ``time_to_target``, ``completed`` (False when ``stop_after`` cut the
    run short), the method's ``label`` and where the files are.

    **Raises:** [`ConfigError`][eqx_gn.lm.ConfigError] for an unusable
    configuration, output directory or corpus (before any step runs);
    [`Diverged`][eqx_gn.lm.Diverged] when the training loss or the parameters
    become non-finite (after writing the summary, with ``diverged_at``).
    """
    if config.distributed:
        initialize_distributed(config)
    STOP_REQUESTED.clear()
    return _Training(config).run()
