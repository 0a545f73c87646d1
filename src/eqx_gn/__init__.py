"""eqx_gn: Gauss-Newton optimization for Equinox models."""

from ._batches import mean_loss as mean_loss
from ._blocks import Blocks as Blocks
from ._curvature import (
    CurvatureOperator as CurvatureOperator,
    Eigenpairs as Eigenpairs,
    SpectralDensity as SpectralDensity,
    TraceEstimate as TraceEstimate,
    curvature_operator as curvature_operator,
    eigenpairs as eigenpairs,
    spectral_density as spectral_density,
    trace_estimate as trace_estimate,
)
from ._gauss_newton import (
    GaussNewton as GaussNewton,
    GNState as GNState,
    GNStats as GNStats,
)
from ._gnvp import (
    QuadraticModel as QuadraticModel,
    gnvp as gnvp,
    quadratic_model as quadratic_model,
)
from ._layer_scan import LayerScan as LayerScan
from ._line_search import (
    AbstractLineSearch as AbstractLineSearch,
    BacktrackingArmijo as BacktrackingArmijo,
    GridLineSearch as GridLineSearch,
    LineSearchStats as LineSearchStats,
    UnitStep as UnitStep,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    AutodiffLoss as AutodiffLoss,
    MeanSquaredError as MeanSquaredError,
    SoftmaxCrossEntropy as SoftmaxCrossEntropy,
)
from ._optax import GNOptaxState as GNOptaxState, as_optax as as_optax
from ._optimizers import muon_adamw as muon_adamw
from ._schedules import cosine_decay as cosine_decay
from ._sharding import (
    data_mesh as data_mesh,
    replicate as replicate,
    shard_batch as shard_batch,
)
from ._solvers import (
    CG as CG,
    AbstractGNSolver as AbstractGNSolver,
    CGState as CGState,
    GNProblem as GNProblem,
    GNSolution as GNSolution,
    InnerOptimizer as InnerOptimizer,
    InnerState as InnerState,
    ProxLinear as ProxLinear,
    SolverStats as SolverStats,
    TrueLossInner as TrueLossInner,
)
from ._trust import (
    AbstractTrustRule as AbstractTrustRule,
    AdaptiveTrust as AdaptiveTrust,
    FixedTrust as FixedTrust,
    LevenbergMarquardt as LevenbergMarquardt,
)

__version__ = "0.1.0"
