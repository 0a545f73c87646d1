r"""Gauss-Newton as the runner trains it, from one typed configuration.

[`GNConfig`][eqx_gn.lm.GNConfig] holds every setting the `eqx_gn.GaussNewton` of a
run is built from, checks them where they are declared, and builds it for a model
(`GNConfig.build`). The runner, the study and the `eqx-gn` command all build GN
through it: a run's [`TrainConfig`][eqx_gn.lm.TrainConfig] gives its own as
``config.gn``.
"""

import dataclasses
import typing

from ... import (
    CG,
    AdaptiveTrust,
    FixedTrust,
    GaussNewton,
    GridLineSearch,
    InnerOptimizer,
    LevenbergMarquardt,
    ProxLinear,
    TrueLossInner,
    UnitStep,
)
from .._errors import ConfigError, setting
from .._model import (
    COMPUTE_DTYPES,
    ComputeDtype,
    Transformer,
    apply_fn,
    layerwise_blocks,
)
from ._checks import (
    check_choice,
    check_integer,
    check_nonnegative,
    check_positive,
    check_range,
)
from ._methods import (
    GN_INNER_LEARNING_RATES,
    BlockPartition,
    CGPreconditioner,
    Inner,
    InnerStep,
    LineSearch,
    Solver,
    TrustRule,
    default_inner_step,
    default_line_search,
    default_trust,
    method_name,
    model_step_fraction,
)
from ._phase_optimizers import LM_LOSS, first_order
from ._settings import check_value, declare, in_range, is_declared

#: The smallest step the adaptive rule's line search tries past its grid: from the
#: default grid's smallest step 2^-3.5, at most 7 halvings.
MIN_STEP_SIZE = 2.0**-10


# The class checks its own values (a choice outside its Literal included) and
# names the bad setting in one line: a runtime type checker would raise first.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class GNConfig:
    r"""One typed description of Gauss-Newton on the language model.

    `build` gives an `eqx_gn.GaussNewton` on next-token cross-entropy: the
    ``blocks`` partition (`eqx_gn.Blocks.full`, or one block per layer,
    `eqx_gn.lm.layerwise_blocks`); the ``solver``: `eqx_gn.InnerOptimizer` (the
    paper's), `eqx_gn.ProxLinear` or `eqx_gn.TrueLossInner` (the ablation: the
    same inner steps on the true loss, no curvature model; full blocks only), each
    running the ``inner`` optimizer (built as
    its first-order method is, $\beta_2$ = ``b2``, weight decay, clipping to
    ``max_grad_norm``) at inner learning rate ``lr`` on one global cosine over
    the inner steps of ``steps`` outer steps, warm-started; or `eqx_gn.CG` with
    ``cg_iterations`` iterations from damping ``cg_damping``, preconditioned by
    ``cg_preconditioner`` and started from the previous solution times
    ``cg_warm_start`` (0: from zero); the line search:
    `eqx_gn.GridLineSearch` over ``ls_grid`` step sizes, exhaustive (``"grid"``)
    or walked from the last step's choice (``"warm"``), or `eqx_gn.UnitStep`
    (``"none"``); and the ``trust`` rule: `eqx_gn.AdaptiveTrust`,
    `eqx_gn.LevenbergMarquardt` (each with a search that halves the step past its
    grid down to `MIN_STEP_SIZE` before it rejects) or `eqx_gn.FixedTrust` (the
    paper's fixed subproblem and grid).

    ``line_search`` and ``trust`` given as ``None`` take their default for the
    solver (``"warm"`` and ``"fixed"``; ``"grid"`` and
    ``"levenberg-marquardt"`` with CG), so two equal configurations build the
    same optimizer. ``inner_step`` ``"model"`` (the default) scales each inner
    update by the minimiser of its micro-batch's quadratic model along it
    (`eqx_gn.InnerOptimizer`'s ``step_length="model"``), and ``lr`` is then the
    fraction of that step taken; ``"lr"`` is the paper's learning rate. ``lr``
    ``None`` is the default (`learning_rate`): with the model's step,
    `eqx_gn.lm.model_step_fraction` of ``micro_batch_tokens`` (a run's: its
    sequences per micro-batch times their length), which sets no other part of
    the optimizer.

    **Raises:** [`ConfigError`][eqx_gn.lm.ConfigError], one line naming the
    setting, for a value out of range or a setting its solver does not use.
    """

    steps: int
    # GN's settings, declared here once: `TrainConfig`'s Gauss-Newton group, the
    # command's flags and their help are made from these declarations.
    blocks: BlockPartition = declare(
        "full",
        "GN: the full GN matrix, or its block diagonal with one block per layer "
        "(embedding, each transformer block, head)",
    )
    solver: Solver = declare(
        "inner",
        "GN: the subproblem solver: inner Muon/AdamW steps on the quadratic model "
        "(the paper's), the same on the linearized loss (prox-linear), the same on "
        "the true loss (trueloss: the ablation with no curvature model; blocks full "
        "only), or conjugate gradient with Levenberg-Marquardt damping",
    )
    inner: Inner = declare(
        "muon",
        "GN with the inner, prox or trueloss solver: the optimizer its inner steps "
        "run on its model: Muon for hidden matrices with AdamW for the rest (the "
        "paper's), AdamW, SOAP, Shampoo or PSGD-Kron, each built as its first-order "
        "method is",
    )
    inner_step: InnerStep | None = declare(
        None,
        "GN with the inner or prox solver: the length of each inner update: "
        "'model' takes the minimiser of its micro-batch's quadratic model along it, "
        "times --lr (default min(1, micro-batch tokens / 768): the whole step from "
        "768 tokens per micro-batch, in proportion below); 'lr' the "
        "learning rate alone (the paper's, --lr default by inner optimizer); "
        "None: model, or lr with solver trueloss (the ablation has no model)",
    )
    ls_grid: int = declare(
        8, "GN: step sizes 1, 2^-1/2, 2^-1, ... tried by the line search"
    )
    line_search: LineSearch | None = declare(
        None,
        "GN: 'grid' evaluates the loss at every step size of the grid and takes "
        "the best (the paper's); 'warm' walks the grid from the last step's "
        "choice while the loss falls (the same choice when the loss is unimodal "
        "along the grid, in about 3 evaluations instead of ls_grid); 'none' takes "
        "the solver's step whole (step size 1; one loss evaluation, and a "
        "non-finite loss is still rejected); None: warm, "
        "or grid with solver cg",
    )
    trust: TrustRule | None = declare(
        None,
        "GN: 'adaptive' scales the next subproblem (the inner learning rate, or "
        "CG's damping) by the step the line search chose, shrinking it after a "
        "step cut below 1/4 and growing it after full ones; 'levenberg-marquardt' "
        "scales it by the ratio of the true to the predicted decrease of the "
        "solver's direction on the solver's own data; "
        "with both the line search halves the step past its grid (to 2^-10) "
        "before it rejects; 'fixed' is the paper's rule (a fixed subproblem, the "
        "grid alone); None: fixed (the inner steps' lengths come from the model: "
        "see --inner-step), or levenberg-marquardt with solver cg",
    )
    # The damping's start: the best of 1e-4 to 1 on ``tiny`` at 256 sequences and
    # K = 64, second at K = 8 (where 1e-2 was best; ``benchmarks/cg_vs_inner.py``);
    # `eqx_gn.CG`'s own default stays 1e-3.
    cg_damping: float = declare(
        1e-1,
        "GN with solver cg: the damping at trust scale 1 (the start; the trust rule "
        "divides it by its scale)",
        check=check_positive,
        solver="cg",
    )
    cg_iterations: int = declare(
        20, "GN with solver cg: CG iterations per outer step", solver="cg"
    )
    cg_preconditioner: CGPreconditioner = declare(
        "diagonal",
        "GN with solver cg: 'diagonal' is Martens' (F + 1e-3 mean F)^0.75, F the "
        "mean square of the micro-batches' gradients (one more backward pass per "
        "micro-batch); 'none' is plain CG",
        solver="cg",
    )
    cg_warm_start: float = declare(
        0.95,
        "GN with solver cg: CG starts from the previous step's solution times X "
        "(Martens' 0.95); 0 starts it from zero",
        metavar="X",
        check=in_range(0.0, 1.0, "[]"),
        solver="cg",
    )
    # Settings of the run's other groups that GN is built with.
    lr: float | None = None
    b2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    compute_dtype: ComputeDtype = "float32"
    # What the default fraction of the model's step depends on (None: unknown,
    # the whole step); no setting of its own: a run's micro-batch gives it.
    micro_batch_tokens: int | None = None

    def __post_init__(self):
        for field in gn_settings():
            check_value(field, getattr(self, field.name))
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        # The defaults of the search, the trust rule and the inner step depend on
        # the solver: resolved here, once.
        if self.line_search is None:
            object.__setattr__(self, "line_search", default_line_search(self.solver))
        if self.trust is None:
            object.__setattr__(self, "trust", default_trust(self.solver))
        if self.inner_step is None and self.solver != "cg":
            step = default_inner_step(self.solver)
            object.__setattr__(self, "inner_step", step)
        if self.solver == "trueloss" and self.blocks != "full":
            raise ConfigError(
                f"{setting('blocks')} applies to GN's curvature model, which solver "
                f"'trueloss' does not have: it needs {setting('blocks', 'full')}"
            )
        self._check_solver_settings()
        check_integer("steps", self.steps)
        check_range("b2", self.b2, 0.0, 1.0, "[)")
        check_nonnegative("weight_decay", self.weight_decay)
        check_positive("max_grad_norm", self.max_grad_norm)

    @property
    def method(self) -> str:
        """The method's one-word name (``"gn-layerwise-soap"``)."""
        return method_name("gn", self.blocks, self.solver, self.inner)

    @property
    def learning_rate(self) -> float | None:
        """``lr``, or the inner optimizer's default (`eqx_gn.lm` tunes them in
        ``benchmarks/inner_lr_sweep.py``); ``None`` for CG (no learning rate)."""
        if self.solver == "cg":
            return None
        if self.lr is not None:
            return self.lr
        if self.inner_step == "model":
            return model_step_fraction(self.micro_batch_tokens)
        return GN_INNER_LEARNING_RATES[self.inner]

    def build(self, model: Transformer) -> GaussNewton:
        """The `eqx_gn.GaussNewton` of these settings for ``model``."""
        trust = {
            "adaptive": AdaptiveTrust,
            "levenberg-marquardt": LevenbergMarquardt,
            "fixed": FixedTrust,
        }[self.trust]()
        if self.solver == "cg":
            solver = CG(
                max_iterations=self.cg_iterations,
                damping=self.cg_damping,
                preconditioner=self.cg_preconditioner,
                warm_start=self.cg_warm_start > 0,
                warm_start_decay=self.cg_warm_start,
            )
        else:
            # The inner optimizer at unit learning rate, built as its first-order
            # method is: the solver's learning rate and schedule scale its updates.
            inner = first_order(
                self.inner, 1.0, model, self.b2, self.weight_decay, self.max_grad_norm
            )
            solver_cls = {
                "inner": InnerOptimizer,
                "prox": ProxLinear,
                "trueloss": TrueLossInner,
            }[self.solver]
            solver = solver_cls(
                inner,
                learning_rate=self.learning_rate,
                schedule="global_cosine",
                total_steps=self.steps,
                warm_start=True,
                step_length="model" if self.inner_step == "model" else "learning_rate",
            )
        if self.line_search == "none":
            line_search = UnitStep()
        else:
            shortens = self.trust != "fixed"
            line_search = GridLineSearch(
                grid_size=self.ls_grid,
                stop_on_increase=self.line_search == "warm",
                warm_start=self.line_search == "warm",
                min_step_size=min(MIN_STEP_SIZE, 0.5 * 2.0 ** (-(self.ls_grid - 1) / 2))
                if shortens
                else None,
            )
        compute_dtype = None if self.compute_dtype == "float32" else self.compute_dtype
        return GaussNewton(
            apply_fn(model, compute_dtype),
            LM_LOSS,
            solver=solver,
            line_search=line_search,
            blocks=layerwise_blocks(model) if self.blocks == "layerwise" else None,
            trust=trust,
        )

    def _check_solver_settings(self) -> None:
        """The settings that depend on GN's solver: CG has no inner optimizer and
        no learning rate, and only CG's settings (declared with ``solver="cg"``)
        may leave their defaults with it."""
        if self.solver == "cg":
            if self.inner != "muon":
                raise ConfigError(
                    f"{setting('inner')} applies to GN's inner, prox and trueloss "
                    "solvers, not 'cg' (CG has no inner optimizer)"
                )
            if self.inner_step is not None:
                raise ConfigError(
                    f"{setting('inner_step')} applies to GN's inner and prox "
                    "solvers, not 'cg' (CG chooses its own step lengths)"
                )
            if self.lr is not None:
                raise ConfigError(
                    f"{setting('lr')} does not apply to solver 'cg' (CG has no "
                    "learning rate; its step comes from the damped GN system: set "
                    f"{setting('cg_damping')})"
                )
            return
        if self.solver == "trueloss" and self.inner_step == "model":
            raise ConfigError(
                f"{setting('inner_step', 'model')} needs GN's curvature model, which "
                "solver 'trueloss' does not have (the ablation takes its steps from "
                f"{setting('lr')})"
            )
        for name, default in CG_DEFAULTS.items():
            if getattr(self, name) != default:
                raise ConfigError(f"{setting(name)} applies to solver 'cg' only")
        if self.lr is not None:
            check_positive("lr", self.lr)


def gn_settings() -> tuple[dataclasses.Field, ...]:
    """GN's settings, as `GNConfig` declares them (`declare`): the fields of
    `TrainConfig`'s Gauss-Newton group that GN is built from."""
    return tuple(f for f in dataclasses.fields(GNConfig) if is_declared(f))


#: CG's settings at their defaults: any other value needs solver ``cg``.
CG_DEFAULTS = {f.name: f.default for f in gn_settings() if f.metadata["solver"] == "cg"}
