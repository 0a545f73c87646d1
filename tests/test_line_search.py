import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import eqx_gn

FLOATS = st.floats(-10.0, 10.0, allow_nan=False)


def _grid_function(values):
    """phi(s) taking the given values on the default grid, by table lookup."""
    grid = eqx_gn.GridLineSearch(grid_size=len(values)).grid
    table = jnp.asarray(values)

    def phi(s):
        return table[jnp.argmin(jnp.abs(grid - s))]

    return phi


@settings(max_examples=25, deadline=None)
@given(st.lists(FLOATS, min_size=1, max_size=10), FLOATS)
def test_grid_returns_best_point_of_its_grid(values, phi0):
    search = eqx_gn.GridLineSearch(grid_size=len(values))
    step, stats = jax.jit(lambda p0: search.search(_grid_function(values), p0))(
        jnp.asarray(phi0)
    )
    grid = np.asarray(search.grid)
    below = [i for i, v in enumerate(values) if v < phi0]
    if below:
        best = min(below, key=lambda i: (values[i], i))
        assert step == pytest.approx(grid[best])
        assert stats.loss_after == pytest.approx(values[best])
    else:
        assert step == 0.0
        assert stats.loss_after == pytest.approx(phi0)
    assert stats.loss_at_unit_step == pytest.approx(values[0])
    assert int(stats.num_evaluations) == len(values)


def test_grid_never_accepts_nonfinite_or_worse():
    search = eqx_gn.GridLineSearch(grid_size=4)
    step, _ = search.search(
        _grid_function([jnp.nan, jnp.inf, 3.0, 2.0]), jnp.asarray(1.0)
    )
    assert step == 0.0
    step, _ = search.search(_grid_function([jnp.nan, 0.5, 3.0, 2.0]), jnp.asarray(1.0))
    assert step == pytest.approx(float(search.grid[1]))
    step, _ = search.search(_grid_function([0.0, 0.0, 0.0, 0.0]), jnp.asarray(jnp.nan))
    assert step == 0.0


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 2.0), st.floats(0.1, 5.0), st.integers(1, 10))
def test_stop_on_increase_keeps_the_grid_decision_on_unimodal_profiles(
    minimiser, curvature, grid_size
):
    def phi(s):
        return curvature * (s - minimiser) ** 2

    phi0 = jnp.asarray(curvature * minimiser**2)
    full = eqx_gn.GridLineSearch(grid_size=grid_size)
    walk = eqx_gn.GridLineSearch(grid_size=grid_size, stop_on_increase=True)
    s_full, stats_full = full.search(phi, phi0)
    s_walk, stats_walk = jax.jit(lambda p: walk.search(phi, p))(phi0)
    assert s_walk == pytest.approx(float(s_full))
    assert stats_walk.loss_after == pytest.approx(float(stats_full.loss_after))
    assert int(stats_walk.num_evaluations) <= grid_size


def test_stop_on_increase_evaluates_few_points_when_unit_step_is_best():
    walk = eqx_gn.GridLineSearch(grid_size=8, stop_on_increase=True)
    step, stats = walk.search(lambda s: (s - 1.5) ** 2, jnp.asarray(2.25))
    assert step == 1.0
    assert int(stats.num_evaluations) == 2


def _unimodal(draw_gaps, minimum, low):
    """Values on the grid falling to ``low`` at index ``minimum``, then rising."""
    values = [0.0] * len(draw_gaps)
    values[minimum] = low
    for i in range(minimum - 1, -1, -1):
        values[i] = values[i + 1] + draw_gaps[i]
    for i in range(minimum + 1, len(draw_gaps)):
        values[i] = values[i - 1] + draw_gaps[i]
    return values


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_warm_start_keeps_the_grid_decision_on_unimodal_profiles(data):
    n = data.draw(st.integers(1, 10))
    gaps = data.draw(st.lists(st.floats(0.01, 3.0), min_size=n, max_size=n))
    values = _unimodal(gaps, data.draw(st.integers(0, n - 1)), data.draw(FLOATS))
    phi0 = jnp.asarray(data.draw(FLOATS))
    grid = np.asarray(eqx_gn.GridLineSearch(grid_size=n).grid)
    previous = data.draw(
        st.sampled_from([None, 0.0, *map(float, grid), 0.3, 5.0, 1e-9])
    )
    full = eqx_gn.GridLineSearch(grid_size=n)
    warm = eqx_gn.GridLineSearch(grid_size=n, stop_on_increase=True, warm_start=True)
    phi = _grid_function(values)
    s_full, stats_full = full.search(phi, phi0)
    hint = None if previous is None else jnp.asarray(previous, phi0.dtype)
    s_warm, stats_warm = jax.jit(lambda p, h: warm.search(phi, p, previous=h))(
        phi0, hint
    )
    assert float(s_warm) == pytest.approx(float(s_full))
    assert float(stats_warm.loss_after) == pytest.approx(float(stats_full.loss_after))
    assert 1 <= int(stats_warm.num_evaluations) <= n
    unit = float(stats_warm.loss_at_unit_step)
    assert np.isnan(unit) or unit == pytest.approx(values[0])


@pytest.mark.parametrize("best", [1, 4, 6])
def test_warm_start_from_the_best_point_takes_three_evaluations(best):
    # Counted by phi itself, not by the search's own statistics. The loss rises
    # faster towards small steps, so the way up must compare with the start.
    values = _unimodal([1.0 if i < best else 2.0 for i in range(8)], best, -5.0)
    warm = eqx_gn.GridLineSearch(grid_size=8, stop_on_increase=True, warm_start=True)
    calls = []
    table = _grid_function(values)

    def phi(s):
        calls.append(float(s))
        return table(s)

    with jax.disable_jit():
        step, stats = warm.search(phi, jnp.asarray(0.0), previous=warm.grid[best])
    grid = np.asarray(warm.grid)
    assert float(step) == pytest.approx(grid[best])
    assert calls == pytest.approx([grid[best], grid[best + 1], grid[best - 1]])
    assert int(stats.num_evaluations) == 3
    unit = float(stats.loss_at_unit_step)
    assert unit == values[0] if best == 1 else np.isnan(unit)


def test_warm_start_after_a_rejection_starts_at_the_smallest_step():
    values = _unimodal([1.0] * 8, 5, -5.0)
    warm = eqx_gn.GridLineSearch(grid_size=8, stop_on_increase=True, warm_start=True)
    calls = []
    table = _grid_function(values)

    def phi(s):
        calls.append(float(s))
        return table(s)

    with jax.disable_jit():
        step, _ = warm.search(phi, jnp.asarray(0.0), previous=jnp.asarray(0.0))
    grid = np.asarray(warm.grid)
    assert float(step) == pytest.approx(grid[5])
    assert calls == pytest.approx([grid[7], grid[6], grid[5], grid[4]])


def test_warm_start_needs_the_walk():
    with pytest.raises(ValueError, match="warm_start=True needs stop_on_increase"):
        eqx_gn.GridLineSearch(warm_start=True)


SEARCHES = {
    "grid": dict(),
    "walk": dict(stop_on_increase=True),
    "warm": dict(stop_on_increase=True, warm_start=True),
}


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(sorted(SEARCHES)),
    st.floats(1e-5, 0.5),
    st.floats(0.1, 10.0),
    st.sampled_from([None, 0.0, 1.0, 0.3, 0.09]),
    st.sampled_from([1e-4, 2**-10, 0.02]),
)
def test_past_the_grid_the_step_halves_until_the_loss_falls(
    kind, root, curvature, previous, floor
):
    # phi falls only on (0, root): with root below the grid's smallest step every
    # grid point raises the loss. The oracle: the first of g/2, g/4, ... (g the
    # smallest grid point, each >= floor) inside (0, root); the grid's own choice
    # when it has one.
    def phi(s):
        return 1.0 + curvature * s * (s - root)

    plain = eqx_gn.GridLineSearch(**SEARCHES[kind])
    search = eqx_gn.GridLineSearch(**SEARCHES[kind], min_step_size=floor)
    prev = None if previous is None else jnp.asarray(previous)
    phi0 = jnp.asarray(1.0)
    step, stats = jax.jit(lambda p: search.search(phi, phi0, previous=p))(prev)
    step0, stats0 = jax.jit(lambda p: plain.search(phi, phi0, previous=p))(prev)
    if float(step0) > 0:  # the grid decides; nothing past it is evaluated
        assert float(step) == float(step0)
        assert int(stats.num_evaluations) == int(stats0.num_evaluations)
        return
    candidates = []
    s = float(search.grid[-1])
    while s / 2 >= floor:
        s /= 2
        candidates.append(s)
    inside = [i for i, c in enumerate(candidates) if c < root and phi(c) < 1.0]
    extra = inside[0] + 1 if inside else len(candidates)
    assert int(stats.num_evaluations) == int(stats0.num_evaluations) + extra
    if inside:
        assert float(step) == pytest.approx(candidates[inside[0]], rel=1e-12)
        assert float(stats.loss_after) == pytest.approx(phi(float(step)))
        assert float(stats.loss_after) < 1.0
    else:
        assert float(step) == 0.0
        assert float(stats.loss_after) == 1.0


def test_a_profile_rising_on_the_whole_grid_is_shortened_not_rejected():
    # The study's stall: every grid point (down to 2**-3.5 = 0.088) raises the loss,
    # which falls for s < 0.05. The paper's grid rejects; the floor finds s = 0.044.
    def phi(s):
        return 3.0 + 40.0 * s * (s - 0.05)

    for kind in sorted(SEARCHES):
        paper = eqx_gn.GridLineSearch(**SEARCHES[kind])
        step, stats = paper.search(phi, jnp.asarray(3.0))
        assert float(step) == 0.0, kind
        longer = eqx_gn.GridLineSearch(**SEARCHES[kind], min_step_size=2**-10)
        step, stats = longer.search(phi, jnp.asarray(3.0))
        assert float(step) == pytest.approx(2**-3.5 / 2), kind
        assert float(stats.loss_after) < 3.0


def test_past_the_grid_never_accepts_nonfinite_or_worse():
    search = eqx_gn.GridLineSearch(min_step_size=1e-6)
    # NaN everywhere but at tiny steps, where the loss is worse: rejected.
    step, stats = search.search(
        lambda s: jnp.where(s > 1e-3, jnp.nan, 2.0), jnp.asarray(1.0)
    )
    assert float(step) == 0.0 and float(stats.loss_after) == 1.0
    # inf on the grid, finite and better below it: the finite point.
    step, _ = search.search(
        lambda s: jnp.where(s > 0.05, jnp.inf, 0.5), jnp.asarray(1.0)
    )
    assert 0 < float(step) < 0.05
    # A non-finite phi(0) evaluates nothing past the grid and rejects.
    step, stats = search.search(lambda s: 0.0 * s, jnp.asarray(jnp.nan))
    assert float(step) == 0.0 and int(stats.num_evaluations) == 8


@settings(max_examples=25, deadline=None)
@given(
    st.floats(-5.0, 5.0),
    st.floats(0.05, 10.0),
    st.floats(-3.0, 3.0),
    st.floats(-0.5, 0.5),
)
def test_armijo_satisfies_its_condition_or_returns_zero(slope, curvature, cubic, shift):
    armijo = eqx_gn.BacktrackingArmijo(c=0.1)

    def phi(s):
        return (
            1.0 + slope * s + curvature * s**2 + cubic * s**3 + shift * jnp.sin(9 * s)
        )

    phi0 = phi(jnp.asarray(0.0))
    slope0 = jax.grad(phi)(jnp.asarray(0.0))
    step, stats = jax.jit(lambda: armijo.search(phi, phi0, slope0))()
    step = float(step)
    if step > 0:
        assert float(phi(step)) <= float(phi0 + armijo.c * step * slope0) + 1e-12
        assert float(phi(step)) < float(phi0)
        assert stats.loss_after == pytest.approx(float(phi(step)))
    else:
        assert stats.loss_after == pytest.approx(float(phi0))
    if float(slope0) >= 0:
        assert step == 0.0
        assert int(stats.num_evaluations) == 0


def test_armijo_needs_slope():
    with pytest.raises(ValueError, match="slope"):
        eqx_gn.BacktrackingArmijo().search(lambda s: s, jnp.asarray(0.0))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: eqx_gn.GridLineSearch(grid_size=0), "grid_size"),
        (lambda: eqx_gn.GridLineSearch(factor=1.5), "factor"),
        (lambda: eqx_gn.GridLineSearch(min_step_size=0.0), "min_step_size must"),
        (lambda: eqx_gn.GridLineSearch(min_step_size=0.1), "below the grid's"),
        (lambda: eqx_gn.BacktrackingArmijo(c=0.0), "c must"),
        (lambda: eqx_gn.BacktrackingArmijo(shrink=1.0), "shrink"),
        (lambda: eqx_gn.BacktrackingArmijo(max_steps=0), "max_steps"),
    ],
)
def test_misconfigured_line_searches_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@settings(max_examples=25, deadline=None)
@given(FLOATS, FLOATS)
def test_unit_step_takes_any_finite_step_whole(phi0, at_one):
    calls = []

    def phi(s):
        calls.append(float(s))
        return jnp.asarray(at_one) + 0.0 * s

    step, stats = eqx_gn.UnitStep().search(phi, jnp.asarray(phi0))
    # One evaluation, at s = 1; accepted even where the loss rose.
    assert calls == [1.0] and int(stats.num_evaluations) == 1
    assert float(step) == 1.0
    assert (
        float(stats.loss_after) == float(stats.loss_at_unit_step) == np.float32(at_one)
    )


@pytest.mark.parametrize(
    "at_one, phi0", [(jnp.nan, 1.0), (jnp.inf, 1.0), (0.5, jnp.nan)]
)
def test_unit_step_rejects_a_nonfinite_loss(at_one, phi0):
    step, stats = eqx_gn.UnitStep().search(
        lambda s: jnp.asarray(at_one) + 0.0 * s, jnp.asarray(phi0)
    )
    assert float(step) == 0.0
    assert float(stats.loss_after) == float(stats.loss_before) or np.isnan(phi0)
