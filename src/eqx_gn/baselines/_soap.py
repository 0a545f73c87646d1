"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner.

The maths, and where this differs from the reference implementation, are in
[`scale_by_soap`][eqx_gn.baselines.scale_by_soap].
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

#: Per parameter: one entry per axis, a square matrix or ``None`` (axis not rotated).
PerAxis = tuple[Float[Array, "_ _"] | None, ...]

_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleBySoapState(NamedTuple):
    """State of [`scale_by_soap`][eqx_gn.baselines.scale_by_soap].

    Every field except ``count`` has the structure of the parameters, with each
    parameter replaced by what is listed. ``None`` entries are empty PyTree nodes,
    so the state flattens to arrays only.

    Attributes:
        count: the number of updates made so far (the first makes no Adam step).
        mu: first moment $M$ in the original basis, like the parameter.
        nu: second moment $V$ in the rotated basis, like the parameter.
        factors: a tuple with one entry per axis of the parameter: the Shampoo
            factor ($L$, $R$, ...) of that axis, shape ``(d, d)``, or ``None`` for an
            axis that is not rotated (longer than ``max_precond_dim``, or the
            parameter has fewer than two axes).
        bases: like ``factors``: the orthogonal eigenbasis estimate $Q$ of each
            factor, or ``None``.
    """

    count: Int[Array, ""]
    mu: PyTree[Float[Array, "..."]]
    nu: PyTree[Float[Array, "..."]]
    factors: PyTree[PerAxis]
    bases: PyTree[PerAxis]


def state_dtype(dtype) -> jnp.dtype:
    # Statistics and eigenbases of low-precision parameters are kept in float32.
    return jnp.promote_types(dtype, jnp.float32)


def rotated_axes(shape: tuple[int, ...], max_precond_dim: int) -> tuple[bool, ...]:
    if len(shape) < 2:
        return (False,) * len(shape)
    return tuple(d <= max_precond_dim for d in shape)


def _unfolding_gram(g: Float[Array, "..."], axis: int) -> Float[Array, "d d"]:
    """$G_{(i)} G_{(i)}^\\top$: contract every axis but ``axis``."""
    others = tuple(i for i in range(g.ndim) if i != axis)
    return jnp.tensordot(g, g, axes=(others, others), precision=_HIGHEST)


def rotate(
    x: Float[Array, "..."], bases: PerAxis, *, back: bool
) -> Float[Array, "..."]:
    """Into the eigenbasis ($Q^\\top$ along each axis) or ``back`` out of it ($Q$)."""
    for axis, q in enumerate(bases):
        if q is None:
            continue
        # tensordot puts the new axis last; move it back to where it was.
        x = jnp.tensordot(x, q, axes=((axis,), (1 if back else 0,)), precision=_HIGHEST)
        x = jnp.moveaxis(x, -1, axis)
    return x


def accumulate(g: Float[Array, "..."], factors: PerAxis, beta: float) -> PerAxis:
    return tuple(
        None
        if f is None
        else beta * f + (1 - beta) * _unfolding_gram(g.astype(f.dtype), axis)
        for axis, f in enumerate(factors)
    )


def _eigenbasis(factors: PerAxis) -> PerAxis:
    """Exact eigenvectors, columns ordered by descending eigenvalue."""
    return tuple(None if f is None else jnp.linalg.eigh(f)[1][:, ::-1] for f in factors)


def _power_qr(
    factors: PerAxis, bases: PerAxis, nu: Float[Array, "..."]
) -> tuple[PerAxis, Float[Array, "..."]]:
    """One power-iteration step + QR per factor; ``nu`` permuted to match."""
    new_bases = []
    for axis, (f, q) in enumerate(zip(factors, bases, strict=True)):
        if q is None:
            new_bases.append(None)
            continue
        fq = jnp.matmul(f, q, precision=_HIGHEST)
        estimated_eigenvalues = jnp.sum(q * fq, axis=0)  # diag(Q^T F Q)
        order = jnp.argsort(-estimated_eigenvalues, stable=True)
        nu = jnp.take(nu, order, axis=axis)
        new_bases.append(jnp.linalg.qr(fq[:, order])[0])
    return tuple(new_bases), nu


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    shampoo_beta: float | None = None,
) -> optax.GradientTransformation:
    r"""SOAP's preconditioning: Adam in Shampoo's eigenbasis, without learning rate.

    For a matrix parameter $W \in \mathbb{R}^{m \times n}$ with gradient $G_t$, SOAP
    keeps Shampoo's two Kronecker factors

    $$L_t = \beta_s L_{t-1} + (1 - \beta_s)\, G_t G_t^\top, \qquad
    R_t = \beta_s R_{t-1} + (1 - \beta_s)\, G_t^\top G_t,$$

    and orthogonal $Q_L \in \mathbb{R}^{m \times m}$, $Q_R \in \mathbb{R}^{n \times n}$
    that estimate their eigenvectors. Adam runs in the rotated coordinates
    $W' = Q_L^\top W Q_R$, where Shampoo's preconditioner is (close to) diagonal:

    $$\begin{aligned}
    G'_t &= Q_L^\top G_t Q_R, \\
    M_t &= \beta_1 M_{t-1} + (1 - \beta_1)\, G_t
        &&\text{(first moment, original basis)}, \\
    V_t &= \beta_2 V_{t-1} + (1 - \beta_2)\, G'_t \odot G'_t
        &&\text{(second moment, rotated basis)}, \\
    N'_t &= \frac{Q_L^\top M_t Q_R \,/\, (1 - \beta_1^k)}
        {\sqrt{V_t / (1 - \beta_2^k)} + \epsilon}, \\
    U_t &= Q_L N'_t Q_R^\top,
    \end{aligned}$$

    with $k$ the number of Adam steps so far, this one included. $U_t$ is what this
    transformation returns; [`soap`][eqx_gn.baselines.soap] moves the parameters by
    $-\eta\,(U_t + \lambda W)$. The factors absorb $G_t$ after the Adam step, so
    the rotation used at a step never depends on that step's gradient.

    **Eigenbasis.** The first call forms the factors from $G_1$, sets $Q_L, Q_R$ to
    their exact eigenvectors (`eigh`, eigenvalues descending), makes no Adam step
    and returns zeros, as the reference implementation does. After every
    `precondition_frequency`-th Adam step $k$ (calls $f + 1, 2f + 1, \dots$) each
    $Q$ is refreshed by one step of power iteration and a QR decomposition:

    $$d = \operatorname{diag}(Q^\top P Q), \quad \pi = \operatorname{argsort}(-d),
    \quad Q \leftarrow \operatorname{qr}(P\, Q_{:, \pi}), \quad
    V \leftarrow V_{\pi} \text{ along that axis},$$

    for $P \in \{L, R\}$. The sort keeps each entry of $V$ with the direction it
    was estimated for; $M$ lives in the original basis and needs no change.

    **Other shapes.** An $n$-D parameter has one factor per axis, built from the
    mode-$i$ unfolding ($G_{(i)} G_{(i)}^\top$), and is rotated along every axis.
    An axis longer than `max_precond_dim` gets no factor and is not rotated
    ($Q = I$). 1-D and scalar parameters are never rotated: they get plain Adam
    (after the first call, whose update is zero for every parameter).

    **Differences from the reference** (`nikhilvyas/SOAP`): $\epsilon$ is added to
    $\sqrt{\hat V}$ after bias correction (optax's convention, so that with
    $Q = I$ the later calls are `optax.adam`'s to rounding; the reference's
    equivalent is $\epsilon / \sqrt{1 - \beta_2^k}$); in
    [`soap`][eqx_gn.baselines.soap] weight decay follows `optax.adamw` (applied to
    the parameters before the step, on every call including the first; the
    reference decays after the step and not on the first call). Merging of small
    axes and `precondition_1d` are not implemented. Statistics and bases of
    parameters in a dtype narrower than float32 are kept in float32.

    Args:
        b1: decay $\beta_1$ of the first moment $M$.
        b2: decay $\beta_2$ of the second moment $V$ (rotated basis).
        eps: $\epsilon$, added to $\sqrt{\hat V}$ in the denominator.
        precondition_frequency: $f$; the eigenbases are refreshed after every
            $f$-th Adam step.
        max_precond_dim: an axis longer than this gets no factor and is not
            rotated; `0` turns every rotation off (plain Adam after the first call).
        shampoo_beta: decay $\beta_s$ of the Shampoo factors; `None` means `b2`.

    Returns:
        An `optax.GradientTransformation` whose state is a
        [`ScaleBySoapState`][eqx_gn.baselines.ScaleBySoapState]; all of it is
        arrays, and the first-call and refresh decisions are `lax.cond`s on its
        `count`, so `update` can be jitted.
    """
    if shampoo_beta is None:
        shampoo_beta = b2
    for name, value in (("b1", b1), ("b2", b2), ("shampoo_beta", shampoo_beta)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}.")
    if precondition_frequency < 1:
        raise ValueError(
            f"precondition_frequency must be at least 1, got {precondition_frequency}."
        )
    if max_precond_dim < 0:
        raise ValueError(
            f"max_precond_dim must be non-negative, got {max_precond_dim}."
        )

    def init_fn(params):
        def per_axis(p):
            dtype = state_dtype(p.dtype)
            rotated = rotated_axes(p.shape, max_precond_dim)
            return tuple(
                jnp.zeros((d, d), dtype) if r else None
                for d, r in zip(p.shape, rotated, strict=True)
            )

        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros(p.shape, state_dtype(p.dtype)), params),
            nu=jax.tree.map(lambda p: jnp.zeros(p.shape, state_dtype(p.dtype)), params),
            factors=jax.tree.map(per_axis, params),
            bases=jax.tree.map(per_axis, params),
        )

    def update_fn(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        mu = treedef.flatten_up_to(state.mu)
        nu = treedef.flatten_up_to(state.nu)
        factors = treedef.flatten_up_to(state.factors)
        bases = treedef.flatten_up_to(state.bases)
        count = optax.safe_increment(state.count)

        def first_call(operand):
            mu, nu, factors, _ = operand
            factors = [
                accumulate(g, f, shampoo_beta)
                for g, f in zip(grads, factors, strict=True)
            ]
            bases = [_eigenbasis(f) for f in factors]
            out = [jnp.zeros_like(g) for g in grads]
            return out, mu, nu, factors, bases

        def adam_call(operand):
            mu, nu, factors, bases = operand
            k = state.count  # Adam steps taken, including this one
            bc1, bc2 = 1 - b1**k, 1 - b2**k
            out, new_mu, new_nu = [], [], []
            for g, m, v, q in zip(grads, mu, nu, bases, strict=True):
                g_state = g.astype(m.dtype)
                m = b1 * m + (1 - b1) * g_state
                g_rot = rotate(g_state, q, back=False)
                v = b2 * v + (1 - b2) * g_rot * g_rot
                m_hat = rotate(m, q, back=False) / bc1.astype(m.dtype)
                v_hat = v / bc2.astype(v.dtype)
                u = rotate(m_hat / (jnp.sqrt(v_hat) + eps), q, back=True)
                out.append(u.astype(g.dtype))
                new_mu.append(m)
                new_nu.append(v)
            factors = [
                accumulate(g, f, shampoo_beta)
                for g, f in zip(grads, factors, strict=True)
            ]

            def refresh(operand):
                factors, bases, nu = operand
                refreshed = [
                    _power_qr(f, q, v)
                    for f, q, v in zip(factors, bases, nu, strict=True)
                ]
                return [b for b, _ in refreshed], [v for _, v in refreshed]

            def keep(operand):
                _, bases, nu = operand
                return bases, nu

            bases, new_nu = jax.lax.cond(
                k % precondition_frequency == 0, refresh, keep, (factors, bases, new_nu)
            )
            return out, new_mu, new_nu, factors, bases

        out, mu, nu, factors, bases = jax.lax.cond(
            state.count == 0, first_call, adam_call, (mu, nu, factors, bases)
        )
        new_state = ScaleBySoapState(
            count=count,
            mu=treedef.unflatten(mu),
            nu=treedef.unflatten(nu),
            factors=treedef.unflatten(factors),
            bases=treedef.unflatten(bases),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    shampoo_beta: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The SOAP optimizer (Vyas et al. 2024): Adam in Shampoo's eigenbasis.

    `optax.chain(scale_by_soap(...), optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate))`: the parameters move by
    $-\eta\,(U_t + \lambda W)$, with $U_t$ the update of
    [`scale_by_soap`][eqx_gn.baselines.scale_by_soap] (where the maths is). The
    defaults are the reference's, except `weight_decay` (0 here, 0.01 there). The
    first call makes no Adam step (its update is
    $-\eta \lambda W$); with every rotation off (`max_precond_dim=0`) the
    later calls are exactly `optax.adamw`'s.

    Args:
        learning_rate: $\eta$, a float or an optax schedule of the call count.
        b1: decay of the first moment.
        b2: decay of the second moment (in the rotated basis).
        eps: added to $\sqrt{\hat V}$ in the denominator.
        weight_decay: $\lambda$, decoupled weight decay (needs `params` in
            `update`).
        precondition_frequency: the eigenbases are refreshed (power iteration +
            QR) after every `precondition_frequency`-th Adam step.
        max_precond_dim: an axis longer than this is not rotated.
        shampoo_beta: decay of the Shampoo factors; `None` means `b2`.

    Returns:
        An `optax.GradientTransformationExtraArgs`; its state is a tuple whose
        first element is a [`ScaleBySoapState`][eqx_gn.baselines.ScaleBySoapState].
    """
    return optax.chain(
        scale_by_soap(
            b1=b1,
            b2=b2,
            eps=eps,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            shampoo_beta=shampoo_beta,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
