import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_gn


def test_muon_adamw_routes_parameters(getkey):
    model = eqx.nn.MLP(6, 5, 12, 2, key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = jax.tree.map(
        lambda p: jax.random.normal(getkey(), p.shape, p.dtype), params
    )
    # The first layer goes to AdamW through the filter; the rest of the 2-D weights
    # to Muon; biases (1-D) to AdamW.
    first = eqx.tree_at(
        lambda m: m.layers[0], jax.tree.map(lambda _: False, model), replace=True
    )
    tx = eqx_gn.muon_adamw(0.1, adam_filter=first, max_grad_norm=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    # AdamW's first step (Nesterov, as optax's Muon configures it) is
    # -lr * (1 + b1 / (1 + b1)) * g / |g| elementwise.
    factor = 1 + 0.9 / 1.9
    for adam_leaf, g in [
        (updates.layers[0].weight, grads.layers[0].weight),
        (updates.layers[1].bias, grads.layers[1].bias),
    ]:
        np.testing.assert_allclose(adam_leaf, -0.1 * factor * jnp.sign(g), rtol=1e-4)
    # Muon's update is an (approximately) orthogonalised matrix: its singular values
    # cluster near one common value, unlike the gradient's.
    for muon_leaf, g in [
        (updates.layers[1].weight, grads.layers[1].weight),
        (updates.layers[2].weight, grads.layers[2].weight),
    ]:
        s = np.linalg.svd(np.asarray(muon_leaf), compute_uv=False)
        s_grad = np.linalg.svd(np.asarray(g), compute_uv=False)
        assert s.max() / s.min() < 2.0 < s_grad.max() / s_grad.min()


def test_muon_adamw_clips_by_global_norm(getkey):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    big = {"w": 1e3 * jnp.ones((4, 3)), "b": 1e3 * jnp.ones(3)}
    tx = eqx_gn.muon_adamw(1.0, max_grad_norm=1.0)
    clipped, _ = tx.update(big, tx.init(params), params)
    scaled = jax.tree.map(lambda g: g * 1e-6, big)
    reference, _ = tx.update(scaled, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_muon_adamw_rejects_unknown_layout():
    with pytest.raises(ValueError, match="weight_layout"):
        eqx_gn.muon_adamw(weight_layout="rows")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_muon_adamw_stacked_weight_is_per_layer(getkey, layout):
    # A (L, m, n) stacked weight (the layers of a scanned model) gets exactly the
    # updates of L separate (m, n) weights, over steps (Muon's momentum) too; the
    # layers' scales differ so a whole-stack normalisation would show.
    num_layers, m, n = 3, 5, 7
    stacked = {"w": jax.random.normal(getkey(), (num_layers, m, n)), "b": jnp.ones(n)}
    separate = {"w": [stacked["w"][i] for i in range(num_layers)], "b": stacked["b"]}
    tx = eqx_gn.muon_adamw(0.1, weight_layout=layout, max_grad_norm=None)
    state_s, state_l = tx.init(stacked), tx.init(separate)
    for _ in range(2):
        scales = jnp.asarray([0.1, 1.0, 10.0])[:, None, None]
        g = {
            "w": scales * jax.random.normal(getkey(), (num_layers, m, n)),
            "b": jax.random.normal(getkey(), (n,)),
        }
        g_l = {"w": [g["w"][i] for i in range(num_layers)], "b": g["b"]}
        up_s, state_s = tx.update(g, state_s, stacked)
        up_l, state_l = tx.update(g_l, state_l, separate)
        np.testing.assert_allclose(
            up_s["w"], jnp.stack(up_l["w"]), rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(up_s["b"], up_l["b"], rtol=1e-6)
        # Each layer's update is orthogonalised: singular values cluster.
        for i in range(num_layers):
            s = np.linalg.svd(np.asarray(up_s["w"][i]), compute_uv=False)
            assert s.max() / s.min() < 2.0
        stacked = optax.apply_updates(stacked, up_s)
        separate = optax.apply_updates(separate, up_l)
