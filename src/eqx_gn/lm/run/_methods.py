"""Methods: the optimizers of a run's main phase and, for Gauss-Newton, its
settings, named in one word.

``optimizer="gn"`` chooses Gauss-Newton; ``blocks`` (``"full"`` or ``"layerwise"``)
chooses the partition of the parameters and ``solver`` (``"inner"``, ``"prox"``,
``"trueloss"`` or ``"cg"``) the subproblem solver, and ``inner`` (``"muon"``,
``"adamw"``, ``"soap"``, ``"shampoo"`` or ``"psgd"``) the optax optimizer the inner,
prox and trueloss solvers run. Every combination trains, except ``trueloss`` with
``layerwise`` (the true loss has no curvature to split into blocks). A *method*
names a combination in one word for comparisons and studies: ``gn``,
``gn-layerwise``, ``gn-prox``, ``gn-trueloss``, ``gn-layerwise-cg``,
``gn-layerwise-soap``, ... (the non-default settings after ``gn``, joined by
``-``); its *label* is the same with spaces (``"gn layerwise soap"``).
"""

from typing import Literal, get_args

from .._errors import ConfigError

#: The optimizers of the main phase, in the order the CLI lists them.
Optimizer = Literal["adamw", "muon", "soap", "shampoo", "psgd", "gn"]
#: The block partitions of GN: one block, or one block per layer.
BlockPartition = Literal["full", "layerwise"]
#: The solvers of the GN subproblem: `eqx_gn.InnerOptimizer` (the paper's),
#: `eqx_gn.ProxLinear`, `eqx_gn.CG`, and the ablation with no curvature model,
#: `eqx_gn.TrueLossInner` (the same inner steps on the true loss).
Solver = Literal["inner", "prox", "cg", "trueloss"]
#: The optimizers GN's inner, prox and trueloss solvers run on their model: the
#: paper's Muon for hidden matrices with AdamW for the rest (the default), AdamW,
#: SOAP, Shampoo or PSGD-Kron, each as its first-order method is built.
Inner = Literal["muon", "adamw", "soap", "shampoo", "psgd"]
#: GN's line searches: the exhaustive grid (the paper's), the walk from the last
#: step's choice (`eqx_gn.GridLineSearch` with ``warm_start=True``) and none
#: (`eqx_gn.UnitStep`).
LineSearch = Literal["grid", "warm", "none"]
#: GN's trust rules: ``adaptive`` (`eqx_gn.AdaptiveTrust`), ``levenberg-marquardt``
#: (`eqx_gn.LevenbergMarquardt`), each with a line search that halves the step past
#: its grid before it rejects, and ``fixed`` (the paper's: `eqx_gn.FixedTrust` and
#: the grid alone).
TrustRule = Literal["adaptive", "levenberg-marquardt", "fixed"]

#: The values of each choice above, in order.
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
BLOCKS: tuple[str, ...] = get_args(BlockPartition)
SOLVERS: tuple[str, ...] = get_args(Solver)
INNERS: tuple[str, ...] = get_args(Inner)
LINE_SEARCHES: tuple[str, ...] = get_args(LineSearch)
TRUST_RULES: tuple[str, ...] = get_args(TrustRule)
#: How long GN's inner updates are (solvers inner and prox): ``"model"`` scales each
#: by the minimiser of its micro-batch's quadratic model along it, times ``lr``
#: (`eqx_gn.InnerOptimizer` with ``step_length="model"``); ``"lr"`` by the learning
#: rate alone (the paper's).
InnerStep = Literal["model", "lr"]
INNER_STEPS: tuple[str, ...] = get_args(InnerStep)
#: CG's preconditioner (solver cg): Martens' diagonal one (`eqx_gn.CG`'s
#: ``preconditioner="diagonal"``) or none.
CGPreconditioner = Literal["diagonal", "none"]
CG_PRECONDITIONERS: tuple[str, ...] = get_args(CGPreconditioner)
#: The micro-batch, in tokens, from which GN's inner steps take the model's step
#: whole (see `model_step_fraction`).
GN_FULL_STEP_TOKENS = 768


def model_step_fraction(micro_batch_tokens: int | None) -> float:
    r"""GN's ``lr`` with ``inner_step="model"`` when ``lr`` is ``None``: the fraction
    of the model's step taken, $\min(1, \text{tokens} / 768)$ for micro-batches of
    ``micro_batch_tokens`` tokens (1 where the size is not known), the same for
    every inner optimizer.

    One micro-batch's exact minimiser overshoots what the next micro-batch
    agrees with when the micro-batch holds few tokens, as a first-order method's
    best rate falls with its batch (the linear scaling rule below a critical
    batch). Measured on ``tiny`` (``benchmarks/default_gn.py``,
    ``benchmarks/results/default_gn_tiny.json``): micro-batches of 4 sequences of
    64 bytes (256 tokens) prefer 1/3 (1/9 and 1 slower), those of 16 and 32
    sequences 1 (0.58 slower)."""
    if micro_batch_tokens is None:
        return 1.0
    return min(1.0, micro_batch_tokens / GN_FULL_STEP_TOKENS)


#: The learning rate of each optimizer when ``TrainConfig.lr`` is ``None`` (the inner
#: learning rate for GN's ``inner`` and ``prox`` solvers): the best of two or three
#: values tried with the defaults (tiny model, bundled Shakespeare, 200 steps of 64
#: sequences of 64 bytes).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "adamw": 3e-3,
    "muon": 5e-2,
    "soap": 1e-2,
    # Shampoo grafted onto Adam's step size: AdamW's rate (not searched).
    "shampoo": 3e-3,
    "psgd": 1e-3,
    "gn": 3e-2,
}
#: GN's inner learning rate when ``lr`` is ``None``, by inner optimizer: Muon's
#: the one above; the others' the best of 3e-3, 1e-2, ..., 1 (x3 apart) in GN runs
#: with the other defaults (tiny model, bundled Shakespeare, 60 steps of 32
#: sequences, K = 4; ``benchmarks/inner_lr_sweep.py``, results in
#: ``benchmarks/results/inner_lr_sweep_tiny.json``): over that 300x range the
#: final validation losses spread by 0.12 (AdamW), 0.08 (SOAP) and 0.05 (PSGD).
GN_INNER_LEARNING_RATES: dict[str, float] = {
    "muon": DEFAULT_LEARNING_RATES["gn"],
    "adamw": 3e-3,
    "soap": 3e-2,
    "psgd": 3e-1,
    # Not in the sweep: AdamW's, whose step size Shampoo's grafting takes.
    "shampoo": 3e-3,
}


def default_inner_step(solver: str) -> str | None:
    """GN's inner step length when none is given: ``"model"``, ``"lr"`` for the
    true-loss ablation (no model to take it from), ``None`` for CG (no inner
    steps)."""
    return {"cg": None, "trueloss": "lr"}.get(solver, "model")


def default_line_search(solver: str) -> str:
    """GN's line search when none is given: ``"warm"``, or ``"grid"`` with solver
    ``cg`` (the paper's search, as the runs CG's defaults were measured with)."""
    return "grid" if solver == "cg" else "warm"


def default_trust(solver: str) -> str:
    """GN's trust rule when none is given: ``"fixed"`` (the inner loop's steps take
    their length from the model: see ``InnerStep``), or ``"levenberg-marquardt"``
    with solver ``cg``."""
    return "levenberg-marquardt" if solver == "cg" else "fixed"


def method_name(optimizer: str, blocks: str, solver: str, inner: str) -> str:
    """A method's one-word name: the optimizer, and for GN its non-default
    settings (``"gn-layerwise-prox"``); the inverse of `parse_method`."""
    parts = [optimizer]
    if optimizer == "gn":
        parts += [
            value
            for value, default in ((blocks, "full"), (solver, "inner"), (inner, "muon"))
            if value != default
        ]
    return "-".join(parts)


def parse_method(method: str) -> dict[str, str]:
    """``optimizer``, ``blocks``, ``solver`` and ``inner`` of a method name.

    ``"adamw"``, ``"muon"``, ``"soap"``, ``"shampoo"``, ``"psgd"``, or ``"gn"``
    followed by any of ``-layerwise``/``-full``, ``-inner``/``-prox``/``-cg``/
    ``-trueloss`` and
    an inner optimizer ``-muon``/``-adamw``/``-soap``/``-shampoo``/``-psgd``
    (``"gn-layerwise-soap"``).
    """
    optimizer, *rest = method.strip().split("-")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"unknown method {method!r}: it must start with one of "
            f"{', '.join(OPTIMIZERS)}"
        )
    values = {
        "optimizer": optimizer,
        "blocks": "full",
        "solver": "inner",
        "inner": "muon",
    }
    if rest and optimizer != "gn":
        raise ConfigError(
            f"unknown method {method!r}: only gn takes settings (gn-layerwise, "
            "gn-prox, gn-cg, gn-soap, ...)"
        )
    seen = set()
    for part in rest:
        field = (
            "blocks" if part in BLOCKS
            else "solver" if part in SOLVERS
            else "inner" if part in INNERS
            else None
        )  # fmt: skip
        if field is None or field in seen:
            raise ConfigError(
                f"unknown method {method!r}: after gn- come a block partition "
                f"({'/'.join(BLOCKS)}), a solver ({'/'.join(SOLVERS)}) and an inner "
                f"optimizer ({'/'.join(INNERS)}), each at most once"
            )
        seen.add(field)
        values[field] = part
    if values["solver"] == "cg" and values["inner"] != "muon":
        raise ConfigError(
            f"unknown method {method!r}: CG has no inner optimizer (the inner "
            "optimizer is for the inner, prox and trueloss solvers)"
        )
    return values
