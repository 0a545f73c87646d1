"""Compile time of one layerwise Gauss-Newton step against the model's depth.

The step is ``eqx_gn.GaussNewton.step`` with ``eqx_gn.InnerOptimizer`` (Muon/AdamW
inner loop) and ``blocks=lm.layerwise_blocks(model)`` (embedding, one block per
transformer block, head), on the language model of ``eqx_gn.lm`` in its ``tiny`` shape (width 64, 4 heads,
ffn 256, context 64, byte vocabulary) at each depth.
For each depth and for the blocks kept as a Python tuple (unscanned) or stacked and
applied with ``jax.lax.scan`` (``LMConfig.scan_layers``), the time to trace, lower
and compile the jitted step (``jax.jit(...).lower(...).compile()``, nothing run),
the best of ``--reps`` after ``jax.clear_caches()``. Prints the ratios
depth 8 / depth 2; target: scanned depth 8 at most 1.5x depth 2.

Writes ``benchmarks/results/compile_time_<device>.json``.

    python benchmarks/compile_time.py            # depths 2 and 8, 2 reps
    python benchmarks/compile_time.py --quick    # depths 1 and 2, one rep, no JSON
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import equinox as eqx
import jax

import eqx_gn
from eqx_gn import lm


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 8])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--micro-batches", type=int, default=2, help="K")
    p.add_argument("--micro-batch-size", type=int, default=2, help="b")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args()


def compile_seconds(args, depth: int, scan: bool) -> float:
    config = lm.get_config(
        "tiny",
        vocab_size=args.vocab,
        width=args.width,
        depth=depth,
        heads=args.heads,
        ffn=args.ffn,
        seq_len=args.seq,
        scan_layers=scan,
    )
    model = lm.Transformer(config, jax.random.key(0))
    gn = eqx_gn.GaussNewton(
        lm.apply_fn(model),  # with scan_layers, the model's eqx_gn.LayerScan
        eqx_gn.SoftmaxCrossEntropy(),
        solver=eqx_gn.InnerOptimizer(
            learning_rate=0.02, adam_filter=lm.embedding_and_head(model)
        ),
        blocks=lm.layerwise_blocks(model),
    )
    state = gn.init(model)
    k, b = args.micro_batches, args.micro_batch_size
    tokens = jax.random.randint(jax.random.key(1), (k, b, args.seq), 0, args.vocab)
    batches = (tokens, tokens)
    params, static = eqx.partition((model, state), eqx.is_array)

    def step(params, batches):
        model, state = eqx.combine(params, static)
        return gn.step(model, state, batches, batches)

    best = None
    for _ in range(args.reps):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = jax.jit(step).lower(params, batches)
        mid = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
        times = {"total": end - start, "lower": mid - start, "compile": end - mid}
        if best is None or times["total"] < best["total"]:
            best = times
    return best


def main():
    args = parse()
    load_before = os.getloadavg()
    if args.quick:
        args.depths, args.reps = [1, 2], 1
    rows = {}
    for scan in (False, True):
        name = "scanned" if scan else "unscanned"
        rows[name] = {}
        for depth in args.depths:
            t = compile_seconds(args, depth, scan)
            rows[name][str(depth)] = t
            print(
                f"{name:>9} depth {depth:>2}: {t['total']:6.2f} s (trace and lower "
                f"{t['lower']:.2f} s, XLA compile {t['compile']:.2f} s)",
                flush=True,
            )
    lo, hi = str(min(args.depths)), str(max(args.depths))
    ratios = {name: r[hi]["total"] / r[lo]["total"] for name, r in rows.items()}
    for name, ratio in ratios.items():
        print(f"{name:>9} depth {hi} / depth {lo}: {ratio:.2f}x")
    if args.quick:
        return
    device = jax.devices()[0].platform
    result = {
        "what": "seconds to trace, lower and compile one layerwise GN step "
        "(GaussNewton.step, InnerOptimizer, lm.layerwise_blocks), best of reps",
        "compile_seconds": rows,
        "ratio_deepest_to_shallowest": ratios,
        "target": "scanned ratio <= 1.5",
        "args": vars(args),
        "device": device,
        "jax": jax.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        # Other jobs on the machine slow compiles down unevenly: the 1-minute load
        # average before and after the run says how busy it was.
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out) / f"compile_time_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
