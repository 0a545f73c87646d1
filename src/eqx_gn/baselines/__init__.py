"""Optax transformations that optax lacks, used as baselines."""

from ._shampoo import (
    ScaleByShampooState as ScaleByShampooState,
    scale_by_shampoo as scale_by_shampoo,
    shampoo as shampoo,
)
from ._soap import (
    ScaleBySoapState as ScaleBySoapState,
    scale_by_soap as scale_by_soap,
    soap as soap,
)
