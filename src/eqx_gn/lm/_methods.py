"""Methods: the optimizers of a run's main phase and, for Gauss-Newton, its
settings, named in one word.

``optimizer="gn"`` chooses Gauss-Newton; ``blocks`` (``"full"`` or ``"layerwise"``)
chooses the partition of the parameters and ``solver`` (``"inner"``, ``"prox"`` or
``"cg"``) the subproblem solver, and ``inner`` (``"muon"``, ``"adamw"``, ``"soap"``,
``"shampoo"`` or ``"psgd"``) the optax optimizer the inner and prox solvers run on the quadratic
model. Every combination trains. A *method* names a combination in one word for
comparisons and studies: ``gn``, ``gn-layerwise``, ``gn-prox``, ``gn-layerwise-cg``,
``gn-layerwise-soap``, ... (the non-default settings after ``gn``, joined by
``-``); its *label* is the same with spaces (``"gn layerwise soap"``).
"""

from ._errors import ConfigError

#: The optimizers of the main phase, in the order the CLI lists them.
OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "soap", "shampoo", "psgd", "gn")
#: The block partitions of GN: one block, or one block per layer.
BLOCKS: tuple[str, ...] = ("full", "layerwise")
#: The solvers of the GN subproblem: `eqx_gn.InnerOptimizer` (the paper's),
#: `eqx_gn.ProxLinear` and `eqx_gn.CG`.
SOLVERS: tuple[str, ...] = ("inner", "prox", "cg")
#: The optimizers GN's inner and prox solvers run on the quadratic model: the
#: paper's Muon for hidden matrices with AdamW for the rest (the default), AdamW,
#: SOAP, Shampoo or PSGD-Kron, each as its first-order recipe builds it.
INNERS: tuple[str, ...] = ("muon", "adamw", "soap", "shampoo", "psgd")
#: GN's line searches: the exhaustive grid (the paper's) and the walk from the
#: last step's choice (`eqx_gn.GridLineSearch` with ``warm_start=True``).
LINE_SEARCHES: tuple[str, ...] = ("grid", "warm", "none")
#: GN's trust rules: ``adaptive`` (`eqx_gn.AdaptiveTrust`), ``levenberg-marquardt``
#: (`eqx_gn.LevenbergMarquardt`), each with a line search that halves the step past
#: its grid before it rejects, and ``fixed`` (the paper's: `eqx_gn.FixedTrust` and
#: the grid alone).
TRUST_RULES: tuple[str, ...] = ("adaptive", "levenberg-marquardt", "fixed")
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


def parse_method(method: str) -> dict[str, str]:
    """``optimizer``, ``blocks``, ``solver`` and ``inner`` of a method name.

    ``"adamw"``, ``"muon"``, ``"soap"``, ``"shampoo"``, ``"psgd"``, or ``"gn"``
    followed by any of ``-layerwise``/``-full``, ``-inner``/``-prox``/``-cg`` and
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
            "optimizer is for the inner and prox solvers)"
        )
    return values
