r"""Learning-rate schedules shared by the inner solvers and the training runner."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._custom_types import RealScalarLike, typecheck


@typecheck
def cosine_decay(peak: RealScalarLike, fraction: RealScalarLike) -> Float[Array, ""]:
    r"""The cosine schedule at ``fraction`` of the way through:

    $$\eta(f) = \eta_{\max} \cdot \tfrac12 \bigl(1 + \cos(\pi \min(\max(f, 0), 1))\bigr),$$

    so $\eta(0) = \eta_{\max}$, $\eta(\tfrac12) = \tfrac12\eta_{\max}$ and
    $\eta(f) = 0$ for $f \ge 1$. Works on Python numbers and on traced scalars (under
    ``jit``/``vmap``) alike and returns a JAX scalar.

    ```python
    eqx_gn.cosine_decay(0.1, 0.5)  # Array(0.05)
    ```
    """
    fraction = jnp.clip(fraction, 0, 1)
    return jnp.asarray(peak * 0.5 * (1 + jnp.cos(jnp.pi * fraction)))
