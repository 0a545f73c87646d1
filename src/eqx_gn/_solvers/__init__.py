from .abstract import (
    AbstractGNSolver as AbstractGNSolver,
    GNProblem as GNProblem,
    GNSolution as GNSolution,
    SolverStats as SolverStats,
)
from .cg import CG as CG, CGState as CGState
from .inner import (
    InnerOptimizer as InnerOptimizer,
    InnerState as InnerState,
    ProxLinear as ProxLinear,
    TrueLossInner as TrueLossInner,
)
