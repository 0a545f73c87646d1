"""Optax transformations that optax lacks, used as baselines."""

from ._soap import (
    ScaleBySoapState as ScaleBySoapState,
    scale_by_soap as scale_by_soap,
    soap as soap,
)
