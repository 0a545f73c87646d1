r"""Shampoo (Gupta, Koren & Singer 2018) with grafting and momentum as its
large-scale version uses them (Anil et al. 2020).

The maths and the sources of each choice are in
[`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._soap import PerAxis, accumulate, rotate, rotated_axes, state_dtype


class ScaleByShampooState(NamedTuple):
    """State of [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].

    Every field except ``count`` has the structure of the parameters, with each
    parameter replaced by what is listed (``None`` entries are empty PyTree
    nodes, so the state flattens to arrays only).

    Attributes:
        count: the number of updates made so far.
        mu: momentum of the grafted direction, like the parameter.
        nu: the grafting optimizer's second moment, like the parameter.
        factors: one entry per axis: the Shampoo statistic of that axis, shape
            ``(d, d)``, or ``None`` for an axis that is not preconditioned.
        roots: like ``factors``: the inverse root of each statistic in use.
    """

    count: Int[Array, ""]
    mu: PyTree[Float[Array, "..."]]
    nu: PyTree[Float[Array, "..."]]
    factors: PyTree[PerAxis]
    roots: PyTree[PerAxis]


def _inverse_roots(factors: PerAxis, matrix_eps: float) -> PerAxis:
    r"""$(F + \epsilon\,\lambda_{\max} I)^{-1/(2r)}$ of each of the $r$
    statistics, by a symmetric eigendecomposition; eigenvalues below 0 (rounding)
    count as 0, and an all-zero statistic gives the identity."""
    r = sum(f is not None for f in factors)
    roots = []
    for f in factors:
        if f is None:
            roots.append(None)
            continue
        w, v = jnp.linalg.eigh(f)
        w = jnp.maximum(w, 0.0)
        top = jnp.max(w)
        damped = w + matrix_eps * top
        power = jnp.where(top > 0, damped, 1.0) ** (-1.0 / (2 * r))
        roots.append((v * power[None, :]) @ v.T)
    return tuple(roots)


def scale_by_shampoo(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    matrix_eps: float = 1e-5,
) -> optax.GradientTransformation:
    r"""Shampoo's preconditioned direction, grafted onto Adam's step size, with
    momentum.

    For a parameter with $r$ preconditioned axes (every axis of at most
    ``max_precond_dim`` entries, for parameters of two or more axes) and gradient
    $G$, at call $t$:

    $$
    \begin{aligned}
    F_i &\leftarrow \beta_2 F_i + (1-\beta_2)\, G_{(i)} G_{(i)}^\top
        &&\text{(per-axis statistics; } G_{(i)}\text{: the axis-}i\text{ unfolding)} \\
    P_i &= (F_i + \epsilon_F \lambda_{\max}(F_i) I)^{-1/(2r)}
        &&\text{(refreshed every } f \text{ calls, and at the first)} \\
    S &= G \times_1 P_1 \cdots \times_r P_r
        &&\text{(Shampoo's direction)} \\
    V &\leftarrow \beta_2 V + (1-\beta_2)\, G^2,\quad
        A = G / (\sqrt{V/(1-\beta_2^t)} + \epsilon) &&\text{(the graft: RMSProp/Adam)} \\
    D &= S\, \lVert A \rVert_F / \lVert S \rVert_F &&\text{(grafting)} \\
    M &\leftarrow \beta_1 M + (1-\beta_1) D,\quad U = M / (1 - \beta_1^t)
        &&\text{(momentum; the update is } U\text{)}
    \end{aligned}
    $$

    Sources of each choice:

    - **Statistics and roots**: Gupta et al. 2018 (Algorithm 2, order-$k$
      tensors: exponent $-1/(2k)$, here $k = r$, the preconditioned axes, so a
      parameter with one axis skipped is preconditioned one-sided with
      $-1/2$, as full-matrix AdaGrad on that side); the exponential moving
      average ($\beta_2$) instead of the sum, and recomputing the roots only
      every ``precondition_frequency`` calls, from Anil et al. 2020 (sections 3-5).
      Roots by a float32 (or wider) symmetric eigendecomposition, damped by
      $\epsilon_F$ relative to the largest eigenvalue (Anil et al. add a
      fixed $\epsilon I$; relative damping makes it scale-free).
    - **Grafting**: layer-wise (here, per parameter) grafting of the step size of
      a diagonal method onto Shampoo's direction (Agarwal et al. 2020,
      "Disentangling adaptive gradient methods from learning rates"; Anil et al.
      graft AdaGrad/Adam): each parameter moves as far as Adam without momentum
      would, in Shampoo's direction. A parameter with no preconditioned axis
      (biases, norms, axes longer than ``max_precond_dim``) takes the graft's
      direction $A$.
    - **Momentum** on the grafted direction, bias-corrected (Anil et al. apply
      momentum after preconditioning and grafting).

    Args:
        b1: decay $\beta_1$ of the momentum.
        b2: decay $\beta_2$ of the statistics and of the graft's second moment.
        eps: $\epsilon$ of the graft's denominator.
        precondition_frequency: $f$, calls between two refreshes of the roots.
        max_precond_dim: an axis longer than this is not preconditioned.
        matrix_eps: $\epsilon_F$, the statistics' damping relative to their
            largest eigenvalue.

    Returns:
        An `optax.GradientTransformation` whose state is a
        [`ScaleByShampooState`][eqx_gn.baselines.ScaleByShampooState] (arrays
        only; the refresh is a `lax.cond` on ``count``, so ``update`` jits).
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    if eps < 0 or matrix_eps < 0:
        raise ValueError(f"eps and matrix_eps must be >= 0, got {eps}, {matrix_eps}.")
    if precondition_frequency < 1:
        raise ValueError(
            f"precondition_frequency must be at least 1, got {precondition_frequency}."
        )
    if max_precond_dim < 0:
        raise ValueError(f"max_precond_dim must be >= 0, got {max_precond_dim}.")

    def init_fn(params):
        def per_axis(p):
            dtype = state_dtype(p.dtype)
            rotated = rotated_axes(p.shape, max_precond_dim)
            return tuple(
                jnp.zeros((d, d), dtype) if r else None
                for d, r in zip(p.shape, rotated, strict=True)
            )

        def like(p):
            return jnp.zeros(p.shape, state_dtype(p.dtype))

        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(like, params),
            nu=jax.tree.map(like, params),
            factors=jax.tree.map(per_axis, params),
            roots=jax.tree.map(per_axis, params),
        )

    def update_fn(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        mu = treedef.flatten_up_to(state.mu)
        nu = treedef.flatten_up_to(state.nu)
        factors = treedef.flatten_up_to(state.factors)
        roots = treedef.flatten_up_to(state.roots)
        count = optax.safe_increment(state.count)  # t, this call's number
        factors = [accumulate(g, f, b2) for g, f in zip(grads, factors, strict=True)]
        roots = jax.lax.cond(
            state.count % precondition_frequency == 0,
            lambda fs, _: [_inverse_roots(f, matrix_eps) for f in fs],
            lambda _, rs: rs,
            factors,
            roots,
        )
        bc1 = 1 - b1 ** count.astype(jnp.float32)
        bc2 = 1 - b2 ** count.astype(jnp.float32)
        out, new_mu, new_nu = [], [], []
        for g, m, v, p in zip(grads, mu, nu, roots, strict=True):
            g_state = g.astype(m.dtype)
            v = b2 * v + (1 - b2) * g_state * g_state
            graft = g_state / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)
            if any(x is not None for x in p):
                s = rotate(g_state, p, back=False)  # each P_i symmetric
                norm = jnp.linalg.norm(s)
                scale = jnp.where(norm > 0, jnp.linalg.norm(graft) / norm, 0.0)
                direction = s * scale
            else:
                direction = graft
            m = b1 * m + (1 - b1) * direction
            out.append((m / bc1.astype(m.dtype)).astype(g.dtype))
            new_mu.append(m)
            new_nu.append(v)
        new_state = ScaleByShampooState(
            count=count,
            mu=treedef.unflatten(new_mu),
            nu=treedef.unflatten(new_nu),
            factors=treedef.unflatten(factors),
            roots=treedef.unflatten(roots),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    matrix_eps: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    r"""The Shampoo optimizer with Adam grafting and momentum:
    `optax.chain(scale_by_shampoo(...), optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate))`; the parameters move by
    $-\eta\,(U_t + \lambda W)$, $U_t$ the update of
    [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo] (where the maths and
    the sources are).

    Args:
        learning_rate: $\eta$, a float or an optax schedule of the call count.
        b1: as in [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        b2: as in [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        eps: as in [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        precondition_frequency: as in
            [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        max_precond_dim: as in
            [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        matrix_eps: as in [`scale_by_shampoo`][eqx_gn.baselines.scale_by_shampoo].
        weight_decay: $\lambda$, decoupled weight decay (needs ``params``).
    """
    return optax.chain(
        scale_by_shampoo(
            b1, b2, eps, precondition_frequency, max_precond_dim, matrix_eps
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
