r"""The configuration of a training run: one description of every setting.

[`TrainConfig`][eqx_gn.lm.TrainConfig]'s settings are declared in groups, one per
job: data, model, optimization, Gauss-Newton, evaluation, run and parallelism.
Each setting carries its own description (``help``), its flag, its type (a
``Literal`` for a choice), its checks and its *role*: whether it defines what the
run computes (a resumed run must keep it) or only how the run is carried out
(output directory, checkpoints, progress, processes). The `eqx-gn` command's
options and help, and the API reference, are generated from these descriptions;
each value is checked against its own declaration, and the settings that depend
on each other are checked together after.

GN's settings are declared once, in [`GNConfig`][eqx_gn.lm.GNConfig]: the
Gauss-Newton group is made from its declarations (with GN's batches, declared
here), and a run's GN is built from one ``config.gn``. GN's settings (``blocks``,
``solver``, ``inner``) are orthogonal, and a method names a combination in one
word (`eqx_gn.lm.run._methods`).
"""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from .._errors import ConfigError, setting
from .._model import CONFIGS, ComputeDtype
from ._checks import (
    check_nonnegative,
    check_positive,
)
from ._gn_config import CG_DEFAULTS, GNConfig, gn_settings
from ._methods import (
    DEFAULT_LEARNING_RATES,
    Optimizer,
    method_name,
    parse_method,
)
from ._settings import (
    DEFINES,
    EXECUTION,
    check_value,
    declare,
    in_range,
)


def _finite(name: str, value: Any) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{setting(name)} must be finite, got {value}")


def _below_2_31(name: str, value: Any) -> None:
    if value >= 2**31:
        raise ConfigError(f"{setting(name)} must be < 2**31, got {value}")


def _not_empty(name: str, value: Any) -> None:
    if not value:
        raise ConfigError(f"{setting(name)} must name a field, got ''")


def _tokenizer(name: str, value: Any) -> None:
    if value not in ("byte", "bpe") and not Path(value).expanduser().is_file():
        raise ConfigError(
            f"{setting(name)} {value!r} is neither byte, bpe nor a tokenizer.json file"
        )


@dataclasses.dataclass(frozen=True)
class _Data:
    text: str | None = declare(
        None,
        "the corpus: a UTF-8 text file (documents separated by form feeds), or a "
        "directory or glob of shards (.txt, .jsonl, .jsonl.gz/.json.gz, .parquet); "
        "None: Shakespeare's plays, bundled",
        metavar="PATH",
    )
    text_field: str = declare(
        "text",
        "the field (JSON Lines) or column (Parquet) holding each document's text",
        metavar="NAME",
        check=_not_empty,
    )
    tokenizer: str = declare(
        "byte",
        "byte (byte-level, vocabulary 257), bpe (trained on the training split) or "
        "the path of a Hugging Face tokenizer.json (vocabulary and end-of-document "
        "token from the file)",
        metavar="byte|bpe|PATH",
        check=_tokenizer,
    )
    vocab_size: int | None = declare(
        None, "BPE vocabulary size, end-of-document token included"
    )
    val_fraction: float = declare(
        0.1,
        "fraction of the documents held out for validation",
        check=in_range(0.0, 1.0, "()"),
    )
    cache_dir: str | None = declare(
        None,
        "tokenizer and token cache; None: $EQX_GN_CACHE or ~/.cache/eqx_gn",
        role=EXECUTION,
        metavar="DIR",
    )

    def _check_group(self) -> None:
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ConfigError(
                f"the 'bpe' tokenizer needs a {setting('vocab_size')} (e.g. 1024)"
            )
        if self.tokenizer not in ("byte", "bpe") and self.vocab_size is not None:
            raise ConfigError(
                f"{setting('vocab_size')} does not apply to a tokenizer file (its "
                "vocabulary "
                "comes from the file)"
            )


@dataclasses.dataclass(frozen=True)
class _Model:
    model: str = declare(
        "tiny", "model shape, a name of eqx_gn.lm.CONFIGS", choices=tuple(CONFIGS)
    )
    seq_len: int | None = declare(None, "context length in tokens; None: the model's")
    scan_layers: bool = declare(
        False,
        "the transformer blocks as one stacked module applied with jax.lax.scan "
        "(the same function and weights; compile time flat in depth)",
    )
    compute_dtype: ComputeDtype = declare(
        "float32",
        "the dtype of the model's matrix products (bfloat16: inputs rounded to it, "
        "float32 accumulation); parameters, optimizer state, logits and the loss "
        "stay float32",
    )


@dataclasses.dataclass(frozen=True)
class _Optimization:
    optimizer: Optimizer = declare("gn", "the optimizer after the warm-up")
    steps: int = declare(200, "optimizer steps, warm-up included")
    batch_size: int = declare(64, "sequences per optimizer step, for every optimizer")
    grad_accumulation: int = declare(
        1,
        "first-order optimizers: micro-batches per step whose gradients are "
        "averaged (the same step in smaller passes, GN's layout with K); must divide "
        "batch_size",
        metavar="A",
    )
    lr: float | None = declare(
        None,
        "peak learning rate of a first-order optimizer, or GN's inner learning rate "
        "(solvers inner, prox and trueloss); cosine decay to 0; None: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items()),
        check=check_positive,
    )
    weight_decay: float = declare(
        0.0, "decoupled weight decay", check=check_nonnegative
    )
    b2: float = declare(
        0.95, "AdamW's second-moment decay", check=in_range(0.0, 1.0, "[)")
    )
    max_grad_norm: float = declare(
        1.0, "clip gradients to this global norm", check=check_positive
    )
    warmup_fraction: float = declare(
        0.1,
        "fraction of the steps trained with AdamW first",
        check=in_range(0.0, 1.0, "[)"),
    )
    warmup_lr: float = declare(
        3e-3, "the warm-up's AdamW learning rate", check=check_positive
    )

    def _check_group(self) -> None:
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(
                f"{setting('batch_size', self.batch_size)} is not divisible by "
                f"{setting('grad_accumulation', self.grad_accumulation)}"
            )


@dataclasses.dataclass(frozen=True)
class _GaussNewtonData:
    # GN's batches: how the runner feeds GN, declared here; GN's own settings
    # are declared once, in GNConfig.
    micro_batches: int = declare(
        8,
        "GN: micro-batches per outer step (inner steps); must divide batch_size",
        metavar="K",
    )
    ls_batches: int = declare(2, "GN: line-search batches per step")
    ls_batch_size: int | None = declare(
        None, "GN: sequences per line-search batch; None: the micro-batch size"
    )


def _gauss_newton_group() -> type:
    """The Gauss-Newton group: GN's settings as `GNConfig` declares them, the
    batches after the inner step."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in gn_settings()
    ]
    batches = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(_GaussNewtonData)
    ]
    at = 1 + [name for name, _, _ in fields].index("inner_step")
    return dataclasses.make_dataclass(
        "_GaussNewton", fields[:at] + batches + fields[at:], frozen=True
    )


_GaussNewton = _gauss_newton_group()


@dataclasses.dataclass(frozen=True)
class _Evaluation:
    eval_every: int = declare(
        20,
        "steps between validation evaluations; 0: only after the warm-up and at "
        "the end",
        minimum=0,
    )
    eval_batches: int = declare(8, "fixed validation batches")
    eval_batch_size: int = declare(32, "sequences per validation batch")
    target_loss: float | None = declare(
        None,
        "stop when the validation loss reaches it; report steps, tokens and time "
        "to reach it",
        metavar="LOSS",
        check=_finite,
    )
    eval_resolution: float = declare(
        0.0,
        "with target_loss: also evaluate whenever the steps since the last "
        "evaluation reach this fraction of the step, and at every step once the "
        "last two evaluations, extrapolated, reach the target within two such "
        "spacings: steps to the target are then exact to one step, or at worst to "
        "this fraction of them; 0: off",
        metavar="R",
        check=check_nonnegative,
    )
    curvature_every: int = declare(
        0,
        "steps between curvature records in metrics.jsonl: the 3 largest "
        "eigenvalues of the full GN matrix (20 Lanczos steps) and its trace "
        "(8 Hutchinson probes; per layerwise block with blocks layerwise) on the "
        "first validation batch; 0: off",
        minimum=0,
    )
    give_up_after: int | None = declare(
        None,
        "with target_loss: end the run at this step if the target is not reached "
        "by then (the schedule stays that of steps; the summary records "
        "gave_up_at); None: never",
        metavar="STEP",
    )

    def _check_group(self) -> None:
        for name in ("eval_resolution", "give_up_after"):
            if getattr(self, name) and self.target_loss is None:
                raise ConfigError(f"{setting(name)} needs a {setting('target_loss')}")


@dataclasses.dataclass(frozen=True)
class _Run:
    seed: int = declare(
        0, "random seed (model and data order)", minimum=0, check=_below_2_31
    )
    out: str = declare(
        "runs/eqx-gn",
        "the output directory (eqx-gn train's default: runs/METHOD-DATE-TIME); "
        "one holding a run needs resume or overwrite, and other files in it are "
        "left alone",
        role=EXECUTION,
        metavar="DIR",
    )
    init_from: str | None = declare(
        None,
        "start from the model parameters of the newest intact checkpoint in this "
        "run directory (a finished run's final ones) instead of new ones; the "
        "optimizer, its learning-rate schedule (warm-up included) and the data "
        "order start anew: how to train a finished run for more steps",
        metavar="DIR",
    )
    checkpoint_every: int = declare(
        50, "steps between checkpoints; 0: only at the end", role=EXECUTION, minimum=0
    )
    resume: bool = declare(
        False,
        "continue the run in out from its newest good checkpoint (a run without "
        "one starts from step 0)",
        role=EXECUTION,
    )
    overwrite: bool = declare(
        False, "delete the eqx-gn run in out and start over", role=EXECUTION
    )
    progress: bool = declare(
        True,
        "a line per evaluation instead of a progress bar (--no-progress, "
        "progress=False); without a terminal (a job log) there is no bar either",
        role=EXECUTION,
        flag="--no-progress",
    )
    stop_after: int | None = declare(
        None,
        "debugging: return after this step as if killed",
        role=EXECUTION,
        hidden=True,
    )

    def _check_group(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError(
                f"{setting('resume')} and {setting('overwrite')} exclude each other"
            )


@dataclasses.dataclass(frozen=True)
class _Parallelism:
    data_parallel: int | None = declare(
        None,
        "devices of the mesh's data axis, every batch split over data x fsdp (the "
        "command line's --mesh data=N,fsdp=M sets both); None: 1, or all devices "
        "over fsdp with distributed",
        role=EXECUTION,
        flag="--mesh",
        metavar="data=N,fsdp=M",
    )
    fsdp: int = declare(
        1,
        "devices of the mesh's fsdp axis: parameters and optimizer state are "
        "sharded along it (each array along its largest dimension that M divides), "
        "batches over data x fsdp",
        role=EXECUTION,
        hidden=True,
    )
    distributed: bool = declare(
        False,
        "multi-process run: call jax.distributed.initialize first",
        role=EXECUTION,
    )
    coordinator_address: str | None = declare(
        None,
        "the coordinator (process 0); None: $JAX_COORDINATOR_ADDRESS",
        role=EXECUTION,
        metavar="HOST:PORT",
    )
    num_processes: int | None = declare(
        None, "number of processes; None: $JAX_NUM_PROCESSES", role=EXECUTION
    )
    process_id: int | None = declare(
        None,
        "this process's index; None: $JAX_PROCESS_ID",
        role=EXECUTION,
        metavar="I",
        minimum=0,
    )


#: The groups of settings, in the order the command line lists them.
GROUPS: dict[str, type] = {
    "data": _Data,
    "model": _Model,
    "optimization": _Optimization,
    "gauss-newton": _GaussNewton,
    "evaluation": _Evaluation,
    "run": _Run,
    "parallelism": _Parallelism,
}


# The class checks its own values (a choice outside its Literal included) and
# names the bad setting in one line: a runtime type checker would raise first.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TrainConfig(
    _Parallelism, _Run, _Evaluation, _GaussNewton, _Optimization, _Model, _Data
):
    """Everything that defines a training run.

    A run of ``steps`` optimizer steps starts with ``round(warmup_fraction *
    steps)`` steps of AdamW (the same warm-up for every optimizer, as the paper's
    GN runs start from an AdamW-trained model), then runs ``optimizer``.
    ``batch_size`` sequences make one optimizer step for every optimizer; a GN step
    splits them into ``micro_batches`` micro-batches (one inner step each, or one
    CG system over all of them) and draws its line-search batches apart. GN
    itself is built from `gn`, one [`GNConfig`][eqx_gn.lm.GNConfig].

    The settings are declared in groups (data, model, optimization, Gauss-Newton,
    evaluation, run, parallelism) and given flat: ``TrainConfig(batch_size=64,
    blocks="layerwise")``. Each field's description below is also its ``eqx-gn
    train --help`` entry.

    **Raises:** [`ConfigError`][eqx_gn.lm.ConfigError] for a value out of range or
    inconsistent with another.
    """

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_value(field, getattr(self, field.name))
        for group in GROUPS.values():
            check = vars(group).get("_check_group")
            if check is not None:
                check(self)
        self._check_gauss_newton()

    def _check_gauss_newton(self) -> None:
        if not self.is_gn:
            for name in GN_ONLY:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise ConfigError(
                        f"{setting(name)} applies to optimizer 'gn' only, not "
                        f"{self.optimizer!r}"
                    )
            return
        self.gn  # noqa: B018 - GNConfig checks the settings that depend on the solver
        if self.batch_size % self.micro_batches:
            raise ConfigError(
                f"{setting('batch_size', self.batch_size)} is not divisible by "
                f"{setting('micro_batches', self.micro_batches)}: GN splits each "
                f"step's batch into {setting('micro_batches')} equal micro-batches"
            )
        if self.grad_accumulation != 1:
            raise ConfigError(
                f"{setting('grad_accumulation')} applies to first-order optimizers; "
                f"GN splits its batch into {setting('micro_batches')}"
            )

    # -- derived values
    @property
    def is_gn(self) -> bool:
        """Whether the main phase runs Gauss-Newton."""
        return self.optimizer == "gn"

    @property
    def gn(self) -> GNConfig | None:
        """The run's Gauss-Newton, from its settings of the same names (over the
        `main_steps`), every default resolved (``lr``, ``line_search``,
        ``trust``); ``None`` for the other optimizers."""
        if not self.is_gn:
            return None
        given = GNConfig(
            steps=self.main_steps,
            **{name: getattr(self, name) for name in _GN_CONFIG_SETTINGS},
        )
        return dataclasses.replace(given, lr=given.learning_rate)

    @property
    def method(self) -> str:
        """The method's name: the optimizer, and for GN its non-default settings
        (``"gn-layerwise-prox"``)."""
        return method_name(self.optimizer, self.blocks, self.solver, self.inner)

    @property
    def label(self) -> str:
        """The method's name for tables and plots (``"gn layerwise prox"``)."""
        return self.method.replace("-", " ")

    @property
    def line_search_rule(self) -> str | None:
        """GN's line search, ``line_search`` or its default: ``"warm"``, or
        ``"grid"`` with solver cg; ``None`` for the other optimizers."""
        return self.gn.line_search if self.is_gn else None

    @property
    def inner_step_rule(self) -> str | None:
        """GN's inner step length, ``inner_step`` or its default: ``"model"``, or
        ``"lr"`` with solver trueloss; ``None`` for CG and the other optimizers."""
        return self.gn.inner_step if self.is_gn else None

    @property
    def trust_rule(self) -> str | None:
        """GN's trust rule, ``trust`` or its default: ``"fixed"``, or
        ``"levenberg-marquardt"`` with solver cg; ``None`` for the other
        optimizers."""
        return self.gn.trust if self.is_gn else None

    @property
    def learning_rate(self) -> float | None:
        """``lr``, or the optimizer's default; ``None`` for GN with CG (no learning
        rate)."""
        if self.is_gn:
            return self.gn.lr
        if self.lr is not None:
            return self.lr
        return DEFAULT_LEARNING_RATES[self.optimizer]

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
    def micro_batch_tokens(self) -> int:
        """GN: tokens per micro-batch, `micro_batch_size` times the context
        length (``seq_len``, or the model's)."""
        seq_len = (
            self.seq_len if self.seq_len is not None else CONFIGS[self.model].seq_len
        )
        return self.micro_batch_size * seq_len

    @property
    def line_search_batch_size(self) -> int:
        """Sequences per line-search batch: ``ls_batch_size`` or the micro-batch
        size."""
        if self.ls_batch_size is not None:
            return self.ls_batch_size
        return self.micro_batch_size if self.is_gn else self.batch_size

    # -- conversions
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict`; unknown keys are an error. A configuration
        saved before ``blocks`` and ``solver`` existed (optimizer ``gn-layerwise``
        or ``gn-prox``) is read as the same method, and a GN configuration saved
        before ``trust`` existed as the rule it ran: ``"fixed"``, or
        ``"levenberg-marquardt"`` with solver cg (CG's damping followed it), and
        one saved before ``inner_step`` existed as the learning-rate steps it ran
        (``"lr"``, under the then default rule ``"adaptive"``); a CG run saved
        before its preconditioner and warm start existed as plain CG from zero, and
        a run of any other method with today's CG settings (its own were the
        defaults of its time)."""
        values = dict(values)
        if str(values.get("optimizer", "")).startswith("gn-"):
            values.update(parse_method(values["optimizer"]))
        cg = values.get("optimizer") == "gn" and values.get("solver") == "cg"
        if values.get("optimizer") == "gn" and "trust" not in values:
            values["trust"] = "levenberg-marquardt" if cg else "fixed"
        if not cg:
            # A run of another solver or optimizer had CG's settings at their
            # defaults of the time (any other value was refused), which may have
            # changed since (the damping's did): it reads today's.
            for name in CG_DEFAULTS:
                values.pop(name, None)
        if cg and "cg_preconditioner" not in values:
            # Saved before CG had a preconditioner and a warm start: plain CG
            # from zero.
            values["cg_preconditioner"] = "none"
            values.setdefault("cg_warm_start", 0.0)
        inner_loop = values.get("solver", "inner") != "cg"
        if (
            values.get("optimizer") == "gn"
            and "inner_step" not in values
            and inner_loop
        ):
            # Saved before inner_step existed: inner steps of the learning rate,
            # under the trust rule that was then the default.
            values["inner_step"] = "lr"
            if values.get("trust") is None:
                values["trust"] = "adaptive"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def with_method(self, method: str) -> "TrainConfig":
        """A copy running ``method`` (see `parse_method`)."""
        return self.replace(**parse_method(method))

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """The fields that define the run (not how it is carried out) whose
        resolved values (``lr`` as `learning_rate`, ``line_search`` as
        `line_search_rule`, ...: the values the run uses) differ from ``other``'s,
        as ``{name: (other's, self's)}``."""
        return {
            f.name: (other.resolved(f.name), self.resolved(f.name))
            for f in dataclasses.fields(self)
            if f.metadata["role"] == DEFINES
            and other.resolved(f.name) != self.resolved(f.name)
        }

    def resolved(self, name: str) -> Any:
        """The value setting ``name`` resolves to: its default where ``None``
        stands for one (``lr``, ``line_search``, ``trust``, ``ls_batch_size``), the
        field itself otherwise."""
        return getattr(self, _RESOLVED.get(name, name))


#: The settings whose ``None`` stands for a default, and the property giving it.
_RESOLVED = {
    "lr": "learning_rate",
    "line_search": "line_search_rule",
    "trust": "trust_rule",
    "inner_step": "inner_step_rule",
    "ls_batch_size": "line_search_batch_size",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
#: The settings of GN only (GNConfig's): at their defaults for the other
#: optimizers.
GN_ONLY = tuple(f.name for f in gn_settings())
#: GNConfig's fields that are settings or properties of the same name (all but
#: ``steps``, which is the run's `main_steps`).
_GN_CONFIG_SETTINGS = tuple(
    f.name for f in dataclasses.fields(GNConfig) if f.name != "steps"
)
_GROUP_OF = {
    f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
}


def settings() -> tuple[dataclasses.Field, ...]:
    """The fields of `TrainConfig`, in their groups' order, each with its
    ``metadata``: ``help``, ``role``, ``metavar``, ``flag``, ``choices``,
    ``minimum``, ``check`` and ``hidden``."""
    return dataclasses.fields(TrainConfig)


def group_of(field: dataclasses.Field) -> str:
    """The group a setting is declared in (``"data"``, ``"gauss-newton"``, ...)."""
    return _GROUP_OF[field.name]


def _check_value(field: dataclasses.Field, value: Any) -> None:
    hint = ""
    if field.name == "optimizer" and str(value).startswith("gn-"):
        method = parse_method(value)
        hint = (
            f" ({value} is {setting('optimizer', 'gn')} with "
            f"{setting('blocks', method['blocks'])}, "
            f"{setting('solver', method['solver'])})"
        )
    check_value(field, value, hint)


def describe(field: dataclasses.Field) -> tuple[str, str | None]:
    """A setting's description and the text of its default (``None`` when it has
    none worth showing); a help ending in ``"; None: ..."`` says what ``None``
    means."""
    text, _, when_none = field.metadata["help"].partition("; None: ")
    if field.default is None:
        return text, when_none or None
    if isinstance(field.default, bool):
        return text, None
    return text, f"{field.default:g}" if isinstance(field.default, float) else str(
        field.default
    )


def _document_settings() -> None:
    # The one description of each setting also goes into the class docstring, so
    # help(TrainConfig) and the API reference list them as the command line does.
    lines = ["", "**Settings:**"]
    group = None
    for field in dataclasses.fields(TrainConfig):
        if group_of(field) != group:
            group = group_of(field)
            lines += ["", f"*{group}:*", ""]
        if not field.metadata["hidden"]:
            text, default = describe(field)
            if default is not None:
                text += f" (default: {default})"
            lines.append(f"- ``{field.name}``: {text}.")
    TrainConfig.__doc__ = (
        (TrainConfig.__doc__ or "").rstrip()
        + "\n"
        + "\n".join("    " + line if line else "" for line in lines)
    )
    TrainConfig.__doc_generated__ = True


_document_settings()
