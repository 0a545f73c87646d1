"""Cost of GN quadratic-model gradients and GN-vector products, against the gradient.

On the LLaMA-style model of ``eqx_gn.lm``, one batch of random tokens, this times
(compile and warm-up excluded, median over ``--reps`` repetitions taken round-robin
over all functions so that load drift on a shared machine hits them alike):

- ``gradient``: ``jax.value_and_grad`` of the mean cross-entropy (the baseline);
- ``forward``: the loss alone (for reference);
- ``qgrad_*``: one quadratic-model gradient ``g + G d`` at a FRESH linearization
  (``quadratic_model`` then ``value_and_grad(d)``, one jit): the cost of one inner
  step of the paper's GN, where every inner step sees a new micro-batch;
- ``gnvp_*_x1`` and ``gnvp_*_xM``: one linearization, then 1 or M chained products
  ``v <- G v / |G v|`` in a ``fori_loop``. The per-product time is
  ``(t_xM - t_x1) / (M - 1)``: the linearization, the first product and the call
  overhead cancel, leaving the marginal cost of a product at a fixed linearization
  (what CG or Hessian-free pays per iteration);
- each for the full model (``full``), the paper's layerwise partition
  (``layerwise``: embedding, each transformer block, head), and a naive layerwise
  baseline (``naive``) that calls ``jax.linearize`` once PER BLOCK on the model as a
  function of that block's parameters only (the others closed over), as one would
  write layerwise GN without a shared linearization;
- with ``--scan-layers`` the model is applied as an ``eqx_gn.LayerScan``
  (``eqx_gn.lm.apply_fn``, what the runner uses), and ``qgrad_layerwise_plain_scan``
  is the layerwise gradient of the same scanned model applied with ``apply_lm``,
  linearized whole: the general path, whose layer blocks cannot start at their layer.

Every function is compiled once with ``eqx.filter_jit(f).lower(...).compile()``;
its XLA ``memory_analysis()`` (temporaries, arguments, outputs) and
``cost_analysis()`` (FLOPs, bytes accessed) are recorded. On a GPU the running
peak of ``device.memory_stats()["peak_bytes_in_use"]`` after each function's first
call is recorded too (it cannot be reset, so it is a running maximum). The measured
FLOPs are compared with an analytic count of the ideal computation
(``analytic_flops``), which tells whether XLA really prunes the zero-tangent blocks
of the layerwise products. Ratios from each function's fastest run are printed
beside the medians as a check on noise; the load average goes into the JSON.

Writes ``benchmarks/results/gnvp_cost_<device>_<config-tag>.json``.

    python benchmarks/gnvp_cost.py                       # width 128, 4 layers
    python benchmarks/gnvp_cost.py --depth 12 --vocab 2048 --seq 64 --batch 4
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn
from eqx_gn.lm import (
    LMConfig,
    Transformer,
    apply_fn,
    apply_lm,
    count_params,
    layerwise_blocks,
)

RESULTS = Path(__file__).parent / "results"
LOSS = eqx_gn.SoftmaxCrossEntropy()
#: Targets from the project plan: (numerator, denominator, limit, applies to depth).
TARGETS = [
    ("qgrad_full / gradient", "qgrad_full", "gradient", 1.5, None),
    ("qgrad_layerwise / qgrad_full", "qgrad_layerwise", "qgrad_full", 1.5, 4),
    ("qgrad_layerwise / qgrad_full", "qgrad_layerwise", "qgrad_full", 3.0, 12),
    ("gnvp_layerwise / gnvp_full", "gnvp_layerwise", "gnvp_full", 1.5, 4),
    ("gnvp_layerwise / gnvp_full", "gnvp_layerwise", "gnvp_full", 3.0, 12),
]
#: Memory targets (issue 10): XLA's temporaries of the layerwise program at most
#: 1.5x the full one's, (numerator, denominator, limit).
MEMORY_TARGETS = [
    ("qgrad_layerwise", "qgrad_full", 1.5),
    ("gnvp_layerwise_x1", "gnvp_full_x1", 1.5),
]
#: "Layerwise at its analytic floor" (issue 10): the time ratio
#: qgrad_layerwise / qgrad_full at most this factor times the analytic FLOP ratio
#: of the ideal, pruned computation.
FLOOR_SLACK = 1.1


# --------------------------------------------------------------------- functions
def _vdot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _normalised(v):
    norm = jnp.sqrt(_vdot(v, v))
    return jax.tree.map(lambda x: x / norm, v)


def _loss(model, inputs, targets):
    return LOSS.value(apply_lm(model, inputs), targets)


def forward(model, inputs, targets, d):
    del d
    return _loss(model, inputs, targets)


def gradient(model, inputs, targets, d):
    del d
    value, grads = eqx.filter_value_and_grad(_loss)(model, inputs, targets)
    return value, eqx.filter(grads, eqx.is_inexact_array)


def make_qgrad(blocks, fn):
    def qgrad(model, inputs, targets, d):
        q = eqx_gn.quadratic_model(
            fn, model, (inputs, targets), loss=LOSS, blocks=blocks
        )
        return q.value_and_grad(d)

    return qgrad


def make_gnvps(blocks, m, fn):
    def gnvps(model, inputs, targets, v):
        q = eqx_gn.quadratic_model(
            fn, model, (inputs, targets), loss=LOSS, blocks=blocks
        )
        return jax.lax.fori_loop(0, m, lambda _, v: _normalised(q.gnvp(v)), v)

    return gnvps


def _naive_linearizations(model, inputs, blocks):
    """``jax.linearize`` once per block, in that block's parameters only."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for b in range(blocks.num_blocks):
        index = blocks.leaf_indices(b)

        def apply_b(xs, index=index):
            full = list(leaves)
            for i, x in zip(index, xs, strict=True):
                full[i] = x
            return apply_lm(
                eqx.combine(jax.tree.unflatten(treedef, full), static), inputs
            )

        primals = [leaves[i] for i in index]
        outputs, linear = jax.linearize(apply_b, primals)
        out.append((index, primals, outputs, linear))
    return out, treedef


def _naive_products(lins, treedef, targets, d, with_gradient):
    d_leaves = jax.tree.leaves(d)
    result = [None] * len(d_leaves)
    value = jnp.zeros((), jnp.float32)
    for index, primals, outputs, linear in lins:
        u = linear([d_leaves[i] for i in index])
        hu = LOSS.hvp(outputs, targets, u)
        if with_gradient:
            g0 = LOSS.grad(outputs, targets)
            value = value + _vdot(g0, u) + 0.5 * _vdot(u, hu)
            hu = g0 + hu
        (ct,) = jax.linear_transpose(linear, primals)(hu)
        for i, x in zip(index, ct, strict=True):
            result[i] = x
    return value, jax.tree.unflatten(treedef, result)


def make_naive_qgrad(blocks):
    def naive_qgrad(model, inputs, targets, d):
        lins, treedef = _naive_linearizations(model, inputs, blocks)
        value, grad = _naive_products(lins, treedef, targets, d, True)
        return LOSS.value(lins[0][2], targets) + value, grad

    return naive_qgrad


def make_naive_gnvps(blocks, m):
    def naive_gnvps(model, inputs, targets, v):
        lins, treedef = _naive_linearizations(model, inputs, blocks)

        def body(_, v):
            return _normalised(_naive_products(lins, treedef, targets, v, False)[1])

        return jax.lax.fori_loop(0, m, body, v)

    return naive_gnvps


# ----------------------------------------------------------------- measurement
def _cost(compiled) -> dict:
    out = {}
    try:
        mem = compiled.memory_analysis()
        for name in (
            "temp_size_in_bytes",
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            out[name] = int(getattr(mem, name))
        out["temp_plus_arguments_bytes"] = (
            out["temp_size_in_bytes"] + out["argument_size_in_bytes"]
        )
    except Exception as e:  # pragma: no cover - backend dependent
        out["memory_analysis_error"] = repr(e)
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        out["flops"] = float(cost.get("flops", float("nan")))
        out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    except Exception as e:  # pragma: no cover - backend dependent
        out["cost_analysis_error"] = repr(e)
    return out


def _peak_bytes(device):
    stats = device.memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0))


def measure(fns: dict, args, reps: int, device) -> dict:
    results = {}
    compiled = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        c = eqx.filter_jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(c(*args))  # warm-up
        compiled[name] = c
        results[name] = {"compile_s": compile_s, **_cost(c.compiled)}
        results[name]["running_peak_bytes_in_use"] = _peak_bytes(device)
        print(f"  compiled {name:24s} in {compile_s:6.1f} s", flush=True)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[name].append(time.perf_counter() - t0)
    for name in fns:
        results[name]["times_s"] = times[name]
        results[name]["median_s"] = statistics.median(times[name])
        results[name]["min_s"] = min(times[name])
    return results


def analytic_flops(config: LMConfig, batch: int) -> dict:
    """Matmul FLOPs of the ideal computation, from the model's shapes.

    Per token, a layer's matmuls cost ``P = 4 W^2`` (projections), ``M = 2 W F``
    (MLP) and ``A = 2 T W`` (scores and values over the full T x T, which is what XLA
    computes under a causal mask) multiply-adds; the head ``W V``. The forward pass
    costs 1 unit per matmul; a tangent pass (JVP) with nonzero input and weight
    tangents 2 (``dx W + x dW``), its transpose 2. In the layerwise model, block b's
    pass only runs downstream of b: in later layers the weights carry no tangent,
    so the projections cost 1 + 1, the attention products (both operands vary) 2 +
    2; in block b itself the query/key/value projections cost 1 (no input tangent)
    + 2 (the norm scale upstream needs the input cotangent). Each block's pass also
    crosses the head (1 + 1; the head block itself 1 + 1 for its weight).
    """
    w, f, t, v, depth = (
        config.width,
        config.ffn,
        config.seq_len,
        config.vocab_size,
        config.depth,
    )
    p, m, a, head = 4 * w * w, 2 * w * f, 2 * t * w, w * v
    layer = p + m + a
    forward = depth * layer + head
    full_tangent = 4 * forward
    own = 3 * 3 * w * w + 4 * w * w + 4 * m + 4 * a
    down = 2 * p + 2 * m + 4 * a
    layerwise_tangent = (
        sum(own + (i + 1) * down for i in range(depth)) + (depth + 2) * 2 * head
    )
    scale = 2 * batch * t  # FLOPs per multiply-add, tokens
    out = {
        "forward": scale * forward,
        "gradient": scale * 3 * forward,
        "full_tangent": scale * full_tangent,
        "layerwise_tangent": scale * layerwise_tangent,
    }
    out["qgrad_full / gradient"] = (forward + full_tangent) / (3 * forward)
    out["qgrad_layerwise / qgrad_full"] = (forward + layerwise_tangent) / (
        forward + full_tangent
    )
    out["layerwise_tangent / full_tangent"] = layerwise_tangent / full_tangent
    # A scanned model linearized whole (apply_lm, not a LayerScan) prunes nothing
    # inside the scan: each layer block's pass is a full tangent pass, so is the
    # embedding's, and the head's crosses the head alone. Through an
    # eqx_gn.LayerScan the layer blocks start at their layer: the floor above.
    scanned_tangent = (depth + 1) * full_tangent + 2 * 2 * head
    out["plain scan: qgrad_layerwise / qgrad_full (no pruning)"] = (
        forward + scanned_tangent
    ) / (forward + full_tangent)
    return out


def _max_rel_diff(a, b) -> float:
    num = max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    den = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))
    return num / den


# ------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=None, help="default 4 * width")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--products", type=int, default=8, help="M, chained products")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="stacked blocks applied with lax.scan (layerwise blocks are slices); "
        "implies --skip-naive",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.products < 2:
        parser.error("--products must be at least 2")
    if args.scan_layers:
        args.skip_naive = True

    config = LMConfig(
        vocab_size=args.vocab,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        ffn=args.ffn or 4 * args.width,
        seq_len=args.seq,
        scan_layers=args.scan_layers,
    )
    device = jax.devices()[0]
    kmodel, kdata, kdir = jax.random.split(jax.random.key(args.seed), 3)
    model = Transformer(config, kmodel)
    tokens = jax.random.randint(kdata, (args.batch, args.seq + 1), 0, args.vocab)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(kdir, len(leaves))
    d = jax.tree.unflatten(
        treedef,
        [
            1e-3 * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    full = eqx_gn.Blocks.full(model)
    layerwise = layerwise_blocks(model)
    m = args.products

    # What the runner gives GaussNewton: apply_lm, or with --scan-layers the same
    # function as an eqx_gn.LayerScan (layer blocks start at their layer).
    fn = apply_fn(model)
    fns = {
        "forward": forward,
        "gradient": gradient,
        "qgrad_full": make_qgrad(full, fn),
        "gnvp_full_x1": make_gnvps(full, 1, fn),
        f"gnvp_full_x{m}": make_gnvps(full, m, fn),
        "qgrad_layerwise": make_qgrad(layerwise, fn),
        "gnvp_layerwise_x1": make_gnvps(layerwise, 1, fn),
        f"gnvp_layerwise_x{m}": make_gnvps(layerwise, m, fn),
    }
    if args.scan_layers:
        # The general path for comparison: the scanned model linearized whole.
        fns["qgrad_layerwise_plain_scan"] = make_qgrad(layerwise, apply_lm)
    if not args.skip_naive:
        fns |= {
            "qgrad_naive": make_naive_qgrad(layerwise),
            "gnvp_naive_x1": make_naive_gnvps(layerwise, 1),
            f"gnvp_naive_x{m}": make_naive_gnvps(layerwise, m),
        }

    print(
        f"eqx_gn gnvp cost: {config}, batch {args.batch}, "
        f"{count_params(model):,} parameters, {layerwise.num_blocks} layerwise blocks, "
        f"device {device.device_kind}, jax {jax.__version__}",
        flush=True,
    )
    if args.scan_layers:
        ours = eqx.filter_jit(make_qgrad(layerwise, fn))(model, inputs, targets, d)
        plain = eqx.filter_jit(make_qgrad(layerwise, apply_lm))(
            model, inputs, targets, d
        )
        check = _max_rel_diff(ours[1], plain[1])
        print(f"  layerwise g + G d, LayerScan vs plain scan: max rel diff {check:.2e}")
    elif not args.skip_naive:
        ours = eqx.filter_jit(make_qgrad(layerwise, fn))(model, inputs, targets, d)
        naive = eqx.filter_jit(make_naive_qgrad(layerwise))(model, inputs, targets, d)
        check = _max_rel_diff(ours[1], naive[1])
        print(f"  layerwise g + G d, ours vs naive: max rel diff {check:.2e}")
    else:
        check = None

    load_start = list(os.getloadavg())
    results = measure(fns, (model, inputs, targets, d), args.reps, device)

    # Derived timings, from the medians (and, as a check on noise, the minima).
    def summarise(stat):
        t = {name: r[stat] for name, r in results.items()}
        for kind in ("full", "layerwise", "naive"):
            if f"gnvp_{kind}_x1" in results:
                x1, xm = t[f"gnvp_{kind}_x1"], t[f"gnvp_{kind}_x{m}"]
                t[f"gnvp_{kind}"] = (xm - x1) / (m - 1)
                t[f"gnvp_{kind}_amortised"] = xm / m
        return t

    times, times_min = summarise("median_s"), summarise("min_s")
    t = times
    grad, grad_min = times["gradient"], times_min["gradient"]
    ratios_to_gradient = {
        name: value / grad for name, value in times.items() if name != "gradient"
    }
    ratios_to_gradient_min = {
        name: value / grad_min
        for name, value in times_min.items()
        if name != "gradient"
    }
    other_ratios = {
        "qgrad_layerwise / qgrad_full": t["qgrad_layerwise"] / t["qgrad_full"],
        "gnvp_layerwise / gnvp_full": t["gnvp_layerwise"] / t["gnvp_full"],
    }
    if "qgrad_naive" in t:
        other_ratios |= {
            "qgrad_layerwise / qgrad_naive": t["qgrad_layerwise"] / t["qgrad_naive"],
            "gnvp_layerwise / gnvp_naive": t["gnvp_layerwise"] / t["gnvp_naive"],
        }
    flops = {name: r.get("flops") for name, r in results.items()}
    flop_ratios = {}
    if all(v is not None and math.isfinite(v) for v in flops.values()):
        flop_ratios = {
            "qgrad_full / gradient": flops["qgrad_full"] / flops["gradient"],
            "qgrad_layerwise / qgrad_full": flops["qgrad_layerwise"]
            / flops["qgrad_full"],
            "gradient / forward": flops["gradient"] / flops["forward"],
            "gnvp_layerwise_x1 / gnvp_full_x1": flops["gnvp_layerwise_x1"]
            / flops["gnvp_full_x1"],
            "(gnvp_layerwise_x1 - forward) / (gnvp_full_x1 - forward)": (
                flops["gnvp_layerwise_x1"] - flops["forward"]
            )
            / (flops["gnvp_full_x1"] - flops["forward"]),
        }
        if "qgrad_naive" in flops:
            flop_ratios["qgrad_naive / qgrad_layerwise"] = (
                flops["qgrad_naive"] / flops["qgrad_layerwise"]
            )
    analytic = analytic_flops(config, args.batch)
    if flop_ratios:
        flop_ratios["measured tangent / analytic, full"] = (
            flops["gnvp_full_x1"] - flops["forward"]
        ) / analytic["full_tangent"]
        flop_ratios["measured tangent / analytic, layerwise"] = (
            flops["gnvp_layerwise_x1"] - flops["forward"]
        ) / analytic["layerwise_tangent"]
    targets_out = []
    for label, num, den, limit, depth in TARGETS:
        if depth is not None and depth != args.depth:
            continue
        ratio = times[num] / times[den]
        targets_out.append(
            {"ratio": label, "value": ratio, "target": limit, "met": ratio <= limit}
        )
    floor = analytic["qgrad_layerwise / qgrad_full"]
    ratio = times["qgrad_layerwise"] / times["qgrad_full"]
    targets_out.append(
        {
            "ratio": "qgrad_layerwise / qgrad_full at the analytic floor "
            f"({FLOOR_SLACK:g} x {floor:.2f})",
            "value": ratio,
            "target": FLOOR_SLACK * floor,
            "met": ratio <= FLOOR_SLACK * floor,
        }
    )
    for num, den, limit in MEMORY_TARGETS:
        a = results[num].get("temp_size_in_bytes")
        b = results[den].get("temp_size_in_bytes")
        if a is not None and b:
            targets_out.append(
                {
                    "ratio": f"temp memory {num} / {den}",
                    "value": a / b,
                    "target": limit,
                    "met": a / b <= limit,
                }
            )

    # Report.
    print(
        f"\nmedian of {args.reps} runs; x grad = time / gradient time ({grad * 1e3:.1f} ms);"
        " (min): the same from the fastest run of each"
    )
    on_gpu = any(r.get("running_peak_bytes_in_use") for r in results.values())
    print(
        f"  {'function':28s} {'ms':>9s} {'x grad':>7s} {'(min)':>6s} {'GFLOP':>8s}"
        f" {'temp MiB':>9s}"
        f" {'temp+args MiB':>13s}" + (f" {'peak MiB':>9s}" if on_gpu else "")
    )
    for name in times:
        r = results.get(name, {})
        cols = [
            f"  {name:28s} {times[name] * 1e3:9.1f} {times[name] / grad:7.2f}"
            f" {times_min[name] / grad_min:6.2f}"
        ]
        for key, width, unit in (
            ("flops", 8, 1e9),
            ("temp_size_in_bytes", 9, 2**20),
            ("temp_plus_arguments_bytes", 13, 2**20),
        ) + ((("running_peak_bytes_in_use", 9, 2**20),) if on_gpu else ()):
            value = r.get(key)
            cols.append(
                f"{value / unit:{width}.{2 if key == 'flops' else 1}f}"
                if value is not None
                else " " * width
            )
        print(" ".join(cols))
    print(
        f"  (gnvp_<kind>: per product, (t_x{m} - t_x1) / {m - 1}; _amortised: t_x{m} / {m})"
    )
    for label, value in other_ratios.items():
        print(f"  {label:40s} {value:6.2f}")
    if flop_ratios:
        print("FLOP ratios (XLA cost_analysis):")
        for label, value in flop_ratios.items():
            print(f"  {label:60s} {value:6.2f}")
    print("analytic matmul-FLOP model (ideal pruning; see analytic_flops):")
    for label, value in analytic.items():
        if "/" in label:
            print(f"  {label:60s} {value:6.2f}")
    print("targets:")
    for tg in targets_out:
        status = "met" if tg["met"] else "MISSED"
        print(f"  {tg['ratio']:58s} {tg['value']:5.2f} <= {tg['target']:.2f}: {status}")

    tag = (
        f"w{args.width}_d{args.depth}_h{args.heads}_f{config.ffn}_v{args.vocab}"
        f"_s{args.seq}_b{args.batch}" + ("_scan" if args.scan_layers else "")
    )
    kind = device.platform if device.platform == "cpu" else device.device_kind
    kind = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    path = args.out or RESULTS / f"gnvp_cost_{kind}_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "gnvp_cost",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "equinox_version": eqx.__version__,
        "python": platform.python_version(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "flags": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "config": {
            f: getattr(config, f)
            for f in ("vocab_size", "width", "depth", "heads", "ffn", "seq_len")
        },
        "num_params": count_params(model),
        "num_layerwise_blocks": layerwise.num_blocks,
        "layerwise_block_names": list(layerwise.names),
        "tokens_per_batch": args.batch * args.seq,
        "ours_vs_naive_max_rel_diff": None if args.scan_layers else check,
        "layer_scan_vs_plain_scan_max_rel_diff": check if args.scan_layers else None,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "median_s": times,
        "min_s": times_min,
        "ratios_to_gradient": ratios_to_gradient,
        "ratios_to_gradient_min": ratios_to_gradient_min,
        "ratios": other_ratios,
        "flop_ratios": flop_ratios,
        "analytic_flops": analytic,
        "targets": targets_out,
        "per_function": results,
        "notes": (
            f"gnvp_<kind> = (t(linearize + {m} chained products) - t(linearize + 1 "
            f"product)) / {m - 1}: the marginal cost of one product at a fixed "
            "linearization. qgrad_<kind>: one fresh linearization plus one g + G d. "
            "naive: jax.linearize once per block in that block's parameters only. "
            "running_peak_bytes_in_use is a running maximum over the run (GPU only). "
            "XLA's cost_analysis counts a while-loop body once, so the flops of "
            "gnvp_*_x1 and gnvp_*_xM are about equal: linearization + one product."
        ),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
