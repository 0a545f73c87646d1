"""eqx_gn: Gauss-Newton optimization for Equinox models."""

from ._blocks import Blocks as Blocks
from ._gnvp import (
    QuadraticModel as QuadraticModel,
    gnvp as gnvp,
    quadratic_model as quadratic_model,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    AutodiffLoss as AutodiffLoss,
    MeanSquaredError as MeanSquaredError,
    SoftmaxCrossEntropy as SoftmaxCrossEntropy,
)
from ._sharding import (
    data_mesh as data_mesh,
    replicate as replicate,
    shard_batch as shard_batch,
)

__version__ = "0.1.0"
