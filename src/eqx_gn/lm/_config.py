r"""The configuration of a training run: one description of every setting.

Each field of [`TrainConfig`][eqx_gn.lm.TrainConfig] carries its own description
(``help``), its command-line group and flag, and its *role*: whether it defines
what the run computes (a resumed run must keep it) or only how the run is carried
out (output directory, checkpoints, progress, processes). The `eqx-gn` command's
options and help, and the API reference, are generated from these descriptions.

GN's settings (``blocks``, ``solver``) are orthogonal, and a method names a
combination in one word (`eqx_gn.lm._methods`).
"""

import dataclasses
import math
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._methods import (
    BLOCKS,
    DEFAULT_LEARNING_RATES,
    GN_INNER_LEARNING_RATES,
    INNERS,
    LINE_SEARCHES,
    OPTIMIZERS,
    SOLVERS,
    TRUST_RULES,
    parse_method,
)
from ._model import COMPUTE_DTYPES, CONFIGS

#: A field defines the run: a resumed run must keep it.
DEFINES = "defines"
#: A field says how the run is carried out: a resumed run may change it.
EXECUTION = "execution"


def _setting(
    default: Any,
    help: str,
    *,
    group: str,
    role: str = DEFINES,
    metavar: str | None = None,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    hidden: bool = False,
) -> Any:
    metadata = {
        "help": help,
        "group": group,
        "role": role,
        "metavar": metavar,
        "flag": flag,
        "choices": choices,
        "hidden": hidden,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    A run of ``steps`` optimizer steps starts with ``round(warmup_fraction *
    steps)`` steps of AdamW (the same warm-up for every optimizer, as the paper's
    GN runs start from an AdamW-trained model), then runs ``optimizer``.
    ``batch_size`` sequences make one optimizer step for every optimizer; a GN step
    splits them into ``micro_batches`` micro-batches (one inner step each, or one
    CG system over all of them) and draws its line-search batches apart.

    Each field's description below is also its ``eqx-gn train --help`` entry.

    **Raises:** [`ConfigError`][eqx_gn.lm.ConfigError] for a value out of range or
    inconsistent with another.
    """

    # -- data
    text: str | None = _setting(
        None,
        "the corpus: a UTF-8 text file (documents separated by form feeds), or a "
        "directory or glob of shards (.txt, .jsonl, .jsonl.gz/.json.gz, .parquet); "
        "None: Shakespeare's plays, bundled",
        group="data",
        metavar="PATH",
    )
    text_field: str = _setting(
        "text",
        "the field (JSON Lines) or column (Parquet) holding each document's text",
        group="data",
        metavar="NAME",
    )
    tokenizer: str = _setting(
        "byte",
        "byte (byte-level, vocabulary 257), bpe (trained on the training split) or "
        "the path of a Hugging Face tokenizer.json (vocabulary and end-of-document "
        "token from the file)",
        group="data",
        metavar="byte|bpe|PATH",
    )
    vocab_size: int | None = _setting(
        None, "BPE vocabulary size, end-of-document token included", group="data"
    )
    val_fraction: float = _setting(
        0.1, "fraction of the documents held out for validation", group="data"
    )
    cache_dir: str | None = _setting(
        None,
        "tokenizer and token cache; None: $EQX_GN_CACHE or ~/.cache/eqx_gn",
        group="data",
        role=EXECUTION,
        metavar="DIR",
    )
    # -- model
    model: str = _setting(
        "tiny",
        "model shape, a name of eqx_gn.lm.CONFIGS",
        group="model",
        choices=tuple(CONFIGS),
    )
    seq_len: int | None = _setting(
        None, "context length in tokens; None: the model's", group="model"
    )
    scan_layers: bool = _setting(
        False,
        "the transformer blocks as one stacked module applied with jax.lax.scan "
        "(the same function and weights; compile time flat in depth)",
        group="model",
    )
    compute_dtype: str = _setting(
        "float32",
        "the dtype of the model's matrix products (bfloat16: inputs rounded to it, "
        "float32 accumulation); parameters, optimizer state, logits and the loss "
        "stay float32",
        group="model",
        choices=COMPUTE_DTYPES,
    )
    # -- optimization
    optimizer: str = _setting(
        "gn",
        "the optimizer after the warm-up",
        group="optimization",
        choices=OPTIMIZERS,
    )
    blocks: str = _setting(
        "full",
        "GN: the full GN matrix, or its block diagonal with one block per layer "
        "(embedding, each transformer block, head)",
        group="optimization",
        choices=BLOCKS,
    )
    solver: str = _setting(
        "inner",
        "GN: the subproblem solver: inner Muon/AdamW steps on the quadratic model "
        "(the paper's), the same on the linearized loss (prox-linear), or conjugate "
        "gradient with Levenberg-Marquardt damping",
        group="optimization",
        choices=SOLVERS,
    )
    inner: str = _setting(
        "muon",
        "GN with the inner or prox solver: the optimizer its inner steps run on "
        "the quadratic model: Muon for hidden matrices with AdamW for the rest (the "
        "paper's), AdamW, SOAP or PSGD-Kron, each built as its first-order method "
        "is",
        group="optimization",
        choices=INNERS,
    )
    steps: int = _setting(
        200, "optimizer steps, warm-up included", group="optimization"
    )
    batch_size: int = _setting(
        64, "sequences per optimizer step, for every optimizer", group="optimization"
    )
    micro_batches: int = _setting(
        8,
        "GN: micro-batches per outer step (inner steps); must divide batch_size",
        group="optimization",
        metavar="K",
    )
    grad_accumulation: int = _setting(
        1,
        "first-order optimizers: micro-batches per step whose gradients are "
        "averaged (the same step in smaller passes, GN's layout with K); must divide "
        "batch_size",
        group="optimization",
        metavar="A",
    )
    ls_batches: int = _setting(
        2, "GN: line-search batches per step", group="optimization"
    )
    ls_batch_size: int | None = _setting(
        None,
        "GN: sequences per line-search batch; None: the micro-batch size",
        group="optimization",
    )
    ls_grid: int = _setting(
        8,
        "GN: step sizes 1, 2^-1/2, 2^-1, ... tried by the line search",
        group="optimization",
    )
    line_search: str | None = _setting(
        None,
        "GN: 'grid' evaluates the loss at every step size of the grid and takes "
        "the best (the paper's); 'warm' walks the grid from the last step's "
        "choice while the loss falls (the same choice when the loss is unimodal "
        "along the grid, in about 3 evaluations instead of ls_grid); 'none' takes "
        "the solver's step whole (step size 1; one loss evaluation, and a "
        "non-finite loss is still rejected); None: warm, "
        "or grid with solver cg (its Levenberg-Marquardt damping reads the loss at "
        "step size 1, which the grid always evaluates)",
        group="optimization",
        choices=LINE_SEARCHES,
    )
    trust: str | None = _setting(
        None,
        "GN: 'adaptive' scales the next subproblem (the inner learning rate, or "
        "CG's damping) by the step the line search chose, shrinking it after a "
        "step cut below 1/4 and growing it after full ones; 'levenberg-marquardt' "
        "scales it by the ratio of actual to predicted decrease at step size 1; "
        "with both the line search halves the step past its grid (to 2^-10) "
        "before it rejects; 'fixed' is the paper's rule (a fixed subproblem, the "
        "grid alone); None: adaptive, or levenberg-marquardt with solver cg",
        group="optimization",
        choices=TRUST_RULES,
    )
    lr: float | None = _setting(
        None,
        "peak learning rate of a first-order optimizer, or GN's inner learning rate "
        "(solvers inner and prox); cosine decay to 0; None: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items()),
        group="optimization",
    )
    cg_damping: float = _setting(
        1e-3,
        "GN with solver cg: the damping at trust scale 1 (the start; the trust rule "
        "divides it by its scale)",
        group="optimization",
    )
    cg_iterations: int = _setting(
        20, "GN with solver cg: CG iterations per outer step", group="optimization"
    )
    weight_decay: float = _setting(0.0, "decoupled weight decay", group="optimization")
    b2: float = _setting(0.95, "AdamW's second-moment decay", group="optimization")
    max_grad_norm: float = _setting(
        1.0, "clip gradients to this global norm", group="optimization"
    )
    warmup_fraction: float = _setting(
        0.1, "fraction of the steps trained with AdamW first", group="optimization"
    )
    warmup_lr: float = _setting(
        3e-3, "the warm-up's AdamW learning rate", group="optimization"
    )
    # -- evaluation
    eval_every: int = _setting(
        20,
        "steps between validation evaluations; 0: only after the warm-up and at "
        "the end",
        group="evaluation",
    )
    eval_batches: int = _setting(8, "fixed validation batches", group="evaluation")
    eval_batch_size: int = _setting(
        32, "sequences per validation batch", group="evaluation"
    )
    target_loss: float | None = _setting(
        None,
        "stop when the validation loss reaches it; report steps, tokens and time "
        "to reach it",
        group="evaluation",
        metavar="LOSS",
    )
    eval_resolution: float = _setting(
        0.0,
        "with target_loss: also evaluate whenever the steps since the last "
        "evaluation reach this fraction of the step, and at every step once the "
        "last two evaluations, extrapolated, reach the target within two such "
        "spacings: steps to the target are then exact to one step, or at worst to "
        "this fraction of them; 0: off",
        group="evaluation",
        metavar="R",
    )
    give_up_after: int | None = _setting(
        None,
        "with target_loss: end the run at this step if the target is not reached "
        "by then (the schedule stays that of steps; the summary records "
        "gave_up_at); None: never",
        group="evaluation",
        metavar="STEP",
    )
    # -- run
    seed: int = _setting(0, "random seed (model and data order)", group="run")
    out: str = _setting(
        "runs/eqx-gn",
        "the output directory (eqx-gn train's default: runs/METHOD-DATE-TIME); "
        "one holding a run needs resume or overwrite, and other files in it are "
        "left alone",
        group="run",
        role=EXECUTION,
        metavar="DIR",
    )
    checkpoint_every: int = _setting(
        50, "steps between checkpoints; 0: only at the end", group="run", role=EXECUTION
    )
    resume: bool = _setting(
        False,
        "continue the run in out from its newest good checkpoint (a run without "
        "one starts from step 0)",
        group="run",
        role=EXECUTION,
    )
    overwrite: bool = _setting(
        False,
        "delete the eqx-gn run in out and start over",
        group="run",
        role=EXECUTION,
    )
    progress: bool = _setting(
        True,
        "True: a progress bar; False (--no-progress): a line per evaluation",
        group="run",
        role=EXECUTION,
        flag="--no-progress",
    )
    stop_after: int | None = _setting(
        None,
        "debugging: return after this step as if killed",
        group="run",
        role=EXECUTION,
        hidden=True,
    )
    # -- parallelism
    data_parallel: int | None = _setting(
        None,
        "devices of the mesh's data axis, every batch split over data x fsdp (the "
        "command line's --mesh data=N,fsdp=M sets both); None: 1, or all devices "
        "over fsdp with distributed",
        group="parallelism",
        role=EXECUTION,
        flag="--mesh",
        metavar="data=N,fsdp=M",
    )
    fsdp: int = _setting(
        1,
        "devices of the mesh's fsdp axis: parameters and optimizer state are "
        "sharded along it (each array along its largest dimension that M divides), "
        "batches over data x fsdp",
        group="parallelism",
        role=EXECUTION,
        hidden=True,
    )
    distributed: bool = _setting(
        False,
        "multi-process run: call jax.distributed.initialize first",
        group="parallelism",
        role=EXECUTION,
    )
    coordinator_address: str | None = _setting(
        None,
        "the coordinator (process 0); None: $JAX_COORDINATOR_ADDRESS",
        group="parallelism",
        role=EXECUTION,
        metavar="HOST:PORT",
    )
    num_processes: int | None = _setting(
        None,
        "number of processes; None: $JAX_NUM_PROCESSES",
        group="parallelism",
        role=EXECUTION,
    )
    process_id: int | None = _setting(
        None,
        "this process's index; None: $JAX_PROCESS_ID",
        group="parallelism",
        role=EXECUTION,
        metavar="I",
    )

    def __post_init__(self):
        _validate(self)

    # -- derived values
    @property
    def is_gn(self) -> bool:
        """Whether the main phase runs Gauss-Newton."""
        return self.optimizer == "gn"

    @property
    def method(self) -> str:
        """The method's name: the optimizer, and for GN its non-default settings
        (``"gn-layerwise-prox"``)."""
        parts = [self.optimizer]
        if self.is_gn:
            if self.blocks != "full":
                parts.append(self.blocks)
            if self.solver != "inner":
                parts.append(self.solver)
            if self.inner != "muon":
                parts.append(self.inner)
        return "-".join(parts)

    @property
    def label(self) -> str:
        """The method's name for tables and plots (``"gn layerwise prox"``)."""
        return self.method.replace("-", " ")

    @property
    def line_search_rule(self) -> str | None:
        """GN's line search, ``line_search`` or its default: ``"warm"``, or
        ``"grid"`` with solver cg; ``None`` for the other optimizers."""
        if not self.is_gn:
            return None
        if self.line_search is not None:
            return self.line_search
        return "grid" if self.solver == "cg" else "warm"

    @property
    def trust_rule(self) -> str | None:
        """GN's trust rule, ``trust`` or its default: ``"adaptive"``, or
        ``"levenberg-marquardt"`` with solver cg; ``None`` for the other
        optimizers."""
        if not self.is_gn:
            return None
        if self.trust is not None:
            return self.trust
        return "levenberg-marquardt" if self.solver == "cg" else "adaptive"

    @property
    def learning_rate(self) -> float | None:
        """``lr``, or the optimizer's default; ``None`` for GN with CG (no learning
        rate)."""
        if self.is_gn and self.solver == "cg":
            return None
        if self.lr is not None:
            return self.lr
        if self.is_gn:
            return GN_INNER_LEARNING_RATES[self.inner]
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
        ``"levenberg-marquardt"`` with solver cg (CG's damping followed it)."""
        values = dict(values)
        if str(values.get("optimizer", "")).startswith("gn-"):
            values.update(parse_method(values["optimizer"]))
        if values.get("optimizer") == "gn" and "trust" not in values:
            cg = values.get("solver") == "cg"
            values["trust"] = "levenberg-marquardt" if cg else "fixed"
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
    "ls_batch_size": "line_search_batch_size",
}


def settings() -> tuple[dataclasses.Field, ...]:
    """The fields of `TrainConfig`, each with its ``metadata``: ``help``, ``group``,
    ``role``, ``metavar``, ``flag``, ``choices`` and ``hidden``."""
    return dataclasses.fields(TrainConfig)


def _validate(config: TrainConfig) -> None:
    def integer(name, low=1, allow_none=False):
        value = getattr(config, name)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

    for name in ("steps", "batch_size", "micro_batches", "ls_batches", "ls_grid"):
        integer(name)
    integer("grad_accumulation")
    integer("fsdp")
    for name in ("eval_batches", "eval_batch_size", "cg_iterations"):
        integer(name)
    for name in ("eval_every", "checkpoint_every", "seed"):
        integer(name, low=0)
    for name in ("ls_batch_size", "seq_len", "vocab_size", "data_parallel"):
        integer(name, allow_none=True)
    integer("num_processes", allow_none=True)
    integer("stop_after", allow_none=True)
    integer("give_up_after", allow_none=True)
    integer("process_id", low=0, allow_none=True)
    if config.tokenizer not in ("byte", "bpe"):
        if not Path(config.tokenizer).expanduser().is_file():
            raise ConfigError(
                f"tokenizer {config.tokenizer!r} is neither byte, bpe nor a "
                "tokenizer.json file"
            )
        if config.vocab_size is not None:
            raise ConfigError(
                "vocab_size does not apply to a tokenizer file (its vocabulary "
                "comes from the file)"
            )
    if not config.text_field:
        raise ConfigError("text_field must name a field, got ''")
    for name in (
        "model",
        "compute_dtype",
        "optimizer",
        "blocks",
        "solver",
        "inner",
        "line_search",
        "trust",
    ):
        choices = dataclasses.fields(TrainConfig)[_INDEX[name]].metadata["choices"]
        value = getattr(config, name)
        if value is None and name in ("line_search", "trust"):
            continue
        if value not in choices:
            hint = ""
            if name == "optimizer" and str(value).startswith("gn-"):
                settings = parse_method(value)
                hint = (
                    f" ({value} is optimizer='gn' with blocks="
                    f"{settings['blocks']!r}, solver={settings['solver']!r})"
                )
            raise ConfigError(
                f"unknown {name} {value!r}; choose one of {', '.join(choices)}{hint}"
            )
    if not config.is_gn:
        for name in (
            "blocks",
            "solver",
            "inner",
            "cg_damping",
            "cg_iterations",
            "line_search",
            "trust",
        ):
            if getattr(config, name) != _DEFAULTS[name]:
                raise ConfigError(
                    f"{name} applies to optimizer 'gn' only, not {config.optimizer!r}"
                )
    elif config.solver == "cg":
        if config.inner != _DEFAULTS["inner"]:
            raise ConfigError(
                "inner applies to GN's inner and prox solvers, not 'cg' (CG has no "
                "inner optimizer)"
            )
        if config.lr is not None:
            raise ConfigError(
                "lr does not apply to solver 'cg' (CG has no learning rate; its "
                "step comes from the damped GN system: set cg_damping)"
            )
    else:
        for name in ("cg_damping", "cg_iterations"):
            if getattr(config, name) != _DEFAULTS[name]:
                raise ConfigError(f"{name} applies to solver 'cg' only")
    if config.tokenizer == "bpe" and config.vocab_size is None:
        raise ConfigError("the 'bpe' tokenizer needs a vocab_size (e.g. 1024)")
    if not 0.0 < config.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {config.val_fraction}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise ConfigError(
            f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}"
        )
    for name in ("lr", "warmup_lr", "cg_damping"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be > 0, got {value}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.b2 < 1.0:
        raise ConfigError(f"b2 must be in [0, 1), got {config.b2}")
    if not config.max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm must be > 0, got {config.max_grad_norm}")
    if config.target_loss is not None and not math.isfinite(config.target_loss):
        raise ConfigError(f"target_loss must be finite, got {config.target_loss}")
    if not (math.isfinite(config.eval_resolution) and config.eval_resolution >= 0):
        raise ConfigError(f"eval_resolution must be >= 0, got {config.eval_resolution}")
    for name in ("eval_resolution", "give_up_after"):
        if getattr(config, name) and config.target_loss is None:
            raise ConfigError(f"{name} needs a target_loss")
    if config.seed >= 2**31:
        raise ConfigError(f"seed must be < 2**31, got {config.seed}")
    if config.is_gn and config.batch_size % config.micro_batches:
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by micro_batches="
            f"{config.micro_batches}: GN splits each step's batch into "
            "micro_batches equal micro-batches"
        )
    if config.is_gn and config.grad_accumulation != 1:
        raise ConfigError(
            "grad_accumulation applies to first-order optimizers; GN splits its "
            "batch into micro_batches"
        )
    if config.batch_size % config.grad_accumulation:
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by grad_accumulation="
            f"{config.grad_accumulation}"
        )
    if config.resume and config.overwrite:
        raise ConfigError("resume and overwrite exclude each other")


_INDEX = {f.name: i for i, f in enumerate(dataclasses.fields(TrainConfig))}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


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
    lines = ["", "**Settings:**", ""]
    for field in dataclasses.fields(TrainConfig):
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
