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
    BLOCKS,
    CG_PRECONDITIONERS,
    GN_INNER_LEARNING_RATES,
    INNER_STEPS,
    INNERS,
    LINE_SEARCHES,
    SOLVERS,
    TRUST_RULES,
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

#: The smallest step the adaptive rule's line search tries past its grid: from the
#: default grid's smallest step 2^-3.5, at most 7 halvings.
MIN_STEP_SIZE = 2.0**-10
#: CG's settings at their defaults: any other value needs solver ``cg``. The
#: damping's start is the best of 1e-4 to 1 on ``tiny`` at 256 sequences
#: (``benchmarks/cg_vs_inner.py``); `eqx_gn.CG`'s own default stays 1e-3.
CG_DEFAULTS = {
    "cg_damping": 1e-1,
    "cg_iterations": 20,
    "cg_preconditioner": "diagonal",
    "cg_warm_start": 0.95,
}


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
    blocks: BlockPartition = "full"
    solver: Solver = "inner"
    inner: Inner = "muon"
    inner_step: InnerStep | None = None
    lr: float | None = None
    ls_grid: int = 8
    line_search: LineSearch | None = None
    trust: TrustRule | None = None
    cg_damping: float = CG_DEFAULTS["cg_damping"]
    cg_iterations: int = CG_DEFAULTS["cg_iterations"]
    cg_preconditioner: CGPreconditioner = CG_DEFAULTS["cg_preconditioner"]
    cg_warm_start: float = CG_DEFAULTS["cg_warm_start"]
    b2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    compute_dtype: ComputeDtype = "float32"
    # What the default fraction of the model's step depends on (None: unknown,
    # the whole step); no setting of its own: a run's micro-batch gives it.
    micro_batch_tokens: int | None = None

    def __post_init__(self):
        check_choice("blocks", self.blocks, BLOCKS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("inner", self.inner, INNERS)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        # The defaults of the search and the trust rule depend on the solver.
        if self.line_search is None:
            object.__setattr__(self, "line_search", default_line_search(self.solver))
        if self.trust is None:
            object.__setattr__(self, "trust", default_trust(self.solver))
        if self.inner_step is None and self.solver != "cg":
            step = default_inner_step(self.solver)
            object.__setattr__(self, "inner_step", step)
        if self.inner_step is not None:
            check_choice("inner_step", self.inner_step, INNER_STEPS)
        check_choice("line_search", self.line_search, LINE_SEARCHES)
        check_choice("trust", self.trust, TRUST_RULES)
        if self.solver == "trueloss" and self.blocks != "full":
            raise ConfigError(
                f"{setting('blocks')} applies to GN's curvature model, which solver "
                f"'trueloss' does not have: it needs {setting('blocks', 'full')}"
            )
        check_gn_settings(
            self.solver,
            inner=self.inner,
            inner_step=self.inner_step,
            lr=self.lr,
            cg_damping=self.cg_damping,
            cg_iterations=self.cg_iterations,
            cg_preconditioner=self.cg_preconditioner,
            cg_warm_start=self.cg_warm_start,
        )
        for name in ("steps", "ls_grid"):
            check_integer(name, getattr(self, name))
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


def check_gn_settings(
    solver: str,
    *,
    inner: str,
    lr: float | None,
    cg_damping: float,
    cg_iterations: int,
    cg_preconditioner: str = CG_DEFAULTS["cg_preconditioner"],
    cg_warm_start: float = CG_DEFAULTS["cg_warm_start"],
    inner_step: str | None = None,
) -> None:
    """The settings that depend on GN's solver: CG has no inner optimizer and no
    learning rate, and only CG has a damping, an iteration count, a
    preconditioner and a warm start."""
    if solver == "cg":
        if inner != "muon":
            raise ConfigError(
                f"{setting('inner')} applies to GN's inner, prox and trueloss "
                "solvers, not 'cg' (CG has no inner optimizer)"
            )
        if inner_step is not None:
            raise ConfigError(
                f"{setting('inner_step')} applies to GN's inner and prox solvers, "
                "not 'cg' (CG chooses its own step lengths)"
            )
        if lr is not None:
            raise ConfigError(
                f"{setting('lr')} does not apply to solver 'cg' (CG has no learning "
                f"rate; its step comes from the damped GN system: set "
                f"{setting('cg_damping')})"
            )
        check_positive("cg_damping", cg_damping)
        check_integer("cg_iterations", cg_iterations)
        check_choice("cg_preconditioner", cg_preconditioner, CG_PRECONDITIONERS)
        check_range("cg_warm_start", cg_warm_start, 0.0, 1.0, "[]")
        return
    if solver == "trueloss" and inner_step == "model":
        raise ConfigError(
            f"{setting('inner_step', 'model')} needs GN's curvature model, which "
            "solver 'trueloss' does not have (the ablation takes its steps from "
            f"{setting('lr')})"
        )
    cg = {
        "cg_damping": cg_damping,
        "cg_iterations": cg_iterations,
        "cg_preconditioner": cg_preconditioner,
        "cg_warm_start": cg_warm_start,
    }
    for name, value in cg.items():
        if value != CG_DEFAULTS[name]:
            raise ConfigError(f"{setting(name)} applies to solver 'cg' only")
    if lr is not None:
        check_positive("lr", lr)
