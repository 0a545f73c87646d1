"""Cost of the curvature tools against one gradient, on ``eqx_gn.lm``'s tiny model.

On one batch of random tokens this times (compile and warm-up excluded, median over
``--reps`` repetitions taken round-robin over all functions, so that load drift on a
shared machine hits them alike):

- ``gradient``: ``jax.value_and_grad`` of the mean cross-entropy (the baseline);
- ``gnvp_xM``: one linearization, then M chained GN-vector products in a
  ``fori_loop`` (the bare product, as in ``gnvp_cost.py``);
- ``lanczos_xM``: ``eqx_gn.eigenpairs`` with M iterations (full
  reorthogonalization, Ritz vectors of the top 5);
- ``hutchinson_xM``: ``eqx_gn.trace_estimate`` with M probes;
- full GN and the paper's layerwise partition (``_layerwise``).

The marginal cost of one Lanczos iteration (or one probe, or one product) is
``(t_xM2 - t_xM1) / (M2 - M1)``: the linearization, the final eigen-decomposition
and the call overhead cancel. One Lanczos iteration is one GN-vector product by
construction (the scan's body calls the product once; counted at trace time below)
plus its reorthogonalization against the basis, O(M n) flops.

Writes ``benchmarks/results/curvature_cost_<device>_tiny.json``.

    python benchmarks/curvature_cost.py
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn
from eqx_gn.lm import Transformer, apply_lm, count_params, get_config, layerwise_blocks

RESULTS = Path(__file__).parent / "results"
LOSS = eqx_gn.SoftmaxCrossEntropy()


def _loss(model, inputs, targets):
    return LOSS.value(apply_lm(model, inputs), targets)


def gradient(model, batch):
    return eqx.filter_value_and_grad(_loss)(model, *batch)


def make_gnvps(blocks, m):
    def gnvps(model, batch):
        q = eqx_gn.quadratic_model(apply_lm, model, batch, loss=LOSS, blocks=blocks)
        v = jax.tree.map(jnp.ones_like, q.params)

        def body(_, v):
            gv = q.gnvp(v)
            norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(gv)))
            return jax.tree.map(lambda x: x / norm, gv)

        return jax.lax.fori_loop(0, m, body, v)

    return gnvps


def make_lanczos(blocks, m):
    def lanczos(model, batch):
        return eqx_gn.eigenpairs(
            apply_lm,
            model,
            batch,
            loss=LOSS,
            key=jax.random.key(0),
            num_iterations=m,
            num_eigenvalues=min(5, m),
            blocks=blocks,
        )

    return lanczos


def make_hutchinson(blocks, m):
    def hutchinson(model, batch):
        return eqx_gn.trace_estimate(
            apply_lm,
            model,
            batch,
            loss=LOSS,
            key=jax.random.key(0),
            num_probes=m,
            blocks=blocks,
        )

    return hutchinson


def products_per_lanczos_iteration(model, batch, m: int) -> float:
    """GN-vector products traced per Lanczos iteration: the scan's body is traced
    once, so this counts ``CurvatureOperator.mv`` calls in one trace."""
    calls = []
    original = eqx_gn.CurvatureOperator.mv

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    eqx_gn.CurvatureOperator.mv = counting
    try:
        jax.eval_shape(make_lanczos(None, m), model, batch)
    finally:
        eqx_gn.CurvatureOperator.mv = original
    return float(len(calls))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--m1", type=int, default=5)
    parser.add_argument("--m2", type=int, default=25)
    args = parser.parse_args()

    config = get_config("tiny")
    model = Transformer(config, jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    shape = (args.batch, config.seq_len)
    batch = (
        jax.random.randint(kx, shape, 0, config.vocab_size),
        jax.random.randint(ky, shape, 0, config.vocab_size),
    )
    # Before anything is compiled: a cached trace would not call the product.
    products = products_per_lanczos_iteration(model, batch, args.m2)
    layerwise = layerwise_blocks(model)
    fns = {"gradient": gradient}
    for name, blocks in (("", None), ("_layerwise", layerwise)):
        for m in (args.m1, args.m2):
            fns[f"gnvp{name}_x{m}"] = make_gnvps(blocks, m)
            fns[f"lanczos{name}_x{m}"] = make_lanczos(blocks, m)
            fns[f"hutchinson{name}_x{m}"] = make_hutchinson(blocks, m)

    compiled = {}
    for name, f in fns.items():
        start = time.perf_counter()
        compiled[name] = eqx.filter_jit(f).lower(model, batch).compile()
        jax.block_until_ready(compiled[name](model, batch))
        print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)

    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, f in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(f(model, batch))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    grad = median["gradient"]

    def marginal(prefix):
        dm = args.m2 - args.m1
        return (median[f"{prefix}_x{args.m2}"] - median[f"{prefix}_x{args.m1}"]) / dm

    per = {}
    for name in ("", "_layerwise"):
        for kind in ("gnvp", "lanczos", "hutchinson"):
            per[f"{kind}{name}"] = marginal(f"{kind}{name}")
    ratios = {f"{k} / gradient": v / grad for k, v in per.items()}
    ratios["lanczos / gnvp"] = per["lanczos"] / per["gnvp"]
    ratios["lanczos_layerwise / gnvp_layerwise"] = (
        per["lanczos_layerwise"] / per["gnvp_layerwise"]
    )
    result = {
        "benchmark": "curvature_cost",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "load_average": os.getloadavg(),
        "config": {
            "model": "tiny",
            "vocab_size": config.vocab_size,
            "width": config.width,
            "depth": config.depth,
            "seq_len": config.seq_len,
            "batch": args.batch,
            "params": count_params(model),
            "dtype": "float32",
            "m1": args.m1,
            "m2": args.m2,
            "reps": args.reps,
        },
        "gnvp_products_per_lanczos_iteration": products,
        "median_s": median,
        "min_s": {name: min(ts) for name, ts in times.items()},
        "per_iteration_s": per,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    device = jax.devices()[0].platform
    path = RESULTS / f"curvature_cost_{device}_tiny.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"per_iteration_s": per, "ratios": ratios}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
