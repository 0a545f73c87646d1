"""bfloat16 matrix products against float32 (issue 23 item 3), on CPU.

1. The GN-vector product: ``||G_bf16 v - G v|| / ||G v||`` for random ``v`` on the
   ``tiny`` and ``prototype`` models (full and layerwise), in units of bfloat16's
   unit roundoff ``u = 2^-8``.
2. Steps to a target: GN on ``tiny`` (40 steps of 32 sequences of 32 tokens),
   float32 and bfloat16 on the same seeds and data, the validation loss at every
   step. The target is float32's best loss by step 24, where the curve still
   falls; the ratio is bfloat16's steps to it over float32's.

CPU timings are printed too but say nothing of a GPU (XLA's CPU backend has no
bfloat16 matrix units). Writes ``benchmarks/results/mixed_precision.json``.

    python benchmarks/mixed_precision.py [--seeds 3] [--work /tmp/mixed_precision]
"""

import argparse
import json
import shutil
import statistics
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_gn
from eqx_gn.lm import (
    TrainConfig,
    Transformer,
    apply_fn,
    get_config,
    layerwise_blocks,
    train,
)

RESULTS = Path(__file__).resolve().parent / "results"
U_BF16 = 2.0**-8
TARGET_STEP = 24


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def gnvp_errors(model_name: str, vectors: int) -> dict:
    config = get_config(model_name)
    model = Transformer(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, config.seq_len + 1), 0, 257)
    batch = (tokens[:, :-1], tokens[:, 1:])
    loss = eqx_gn.SoftmaxCrossEntropy()
    params = eqx.filter(model, eqx.is_inexact_array)
    out = {}
    for name, blocks in (("full", None), ("layerwise", layerwise_blocks(model))):
        exact_fn = eqx.filter_jit(
            lambda v, b=blocks: eqx_gn.gnvp(
                apply_fn(model), model, batch, v, loss=loss, blocks=b
            )
        )
        mixed_fn = eqx.filter_jit(
            lambda v, b=blocks: eqx_gn.gnvp(
                apply_fn(model, "bfloat16"), model, batch, v, loss=loss, blocks=b
            )
        )
        errors = []
        for i in range(vectors):
            leaves, treedef = jax.tree.flatten(params)
            keys = jax.random.split(jax.random.key(100 + i), len(leaves))
            v = jax.tree.unflatten(
                treedef,
                [
                    jax.random.normal(k, p.shape)
                    for k, p in zip(keys, leaves, strict=True)
                ],
            )
            exact, mixed = _flat(exact_fn(v)), _flat(mixed_fn(v))
            errors.append(
                float(jnp.linalg.norm(mixed - exact) / jnp.linalg.norm(exact))
            )
        out[name] = {
            "relative_errors": errors,
            "max_in_u": max(errors) / U_BF16,
            "median_in_u": statistics.median(errors) / U_BF16,
        }
        print(
            f"{model_name} {name}: GN-vector product relative error "
            f"{min(errors):.2e}-{max(errors):.2e} (max {max(errors) / U_BF16:.2f}u)"
        )
    return out


def _curve(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def steps_to_target(seed: int, work: Path) -> dict:
    common = dict(
        model="tiny",
        seq_len=32,
        steps=40,
        batch_size=32,
        micro_batches=2,
        ls_batches=1,
        warmup_fraction=0.1,
        eval_every=1,
        eval_batches=4,
        eval_batch_size=16,
        progress=False,
        seed=seed,
        overwrite=True,
        cache_dir=str(work / "cache"),
    )
    curves, summaries = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = work / f"seed{seed}-{dtype}"
        summaries[dtype] = train(
            TrainConfig(**common, compute_dtype=dtype, out=str(out))
        )
        curves[dtype] = _curve(out)
    target = min(curves["float32"][s] for s in range(1, TARGET_STEP + 1))
    steps = {
        dtype: min((s for s, v in curve.items() if v <= target), default=None)
        for dtype, curve in curves.items()
    }
    ratio = None if steps["bfloat16"] is None else steps["bfloat16"] / steps["float32"]
    print(
        f"seed {seed}: target {target:.4f}; steps float32 {steps['float32']}, "
        f"bfloat16 {steps['bfloat16']}; final losses "
        f"{curves['float32'][40]:.4f} / {curves['bfloat16'][40]:.4f}; CPU seconds "
        f"{summaries['float32']['time_s']:.1f} / {summaries['bfloat16']['time_s']:.1f}"
    )
    return {
        "seed": seed,
        "target": target,
        "steps": steps,
        "ratio": ratio,
        "final_val_loss": {d: c[40] for d, c in curves.items()},
        "cpu_train_seconds": {d: s["time_s"] for d, s in summaries.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--vectors", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mixed_precision"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result = {
        "command": "python benchmarks/mixed_precision.py "
        f"--seeds {args.seeds} --vectors {args.vectors}",
        "unit_roundoff": U_BF16,
        "device": jax.devices()[0].device_kind,
        "gnvp": {m: gnvp_errors(m, args.vectors) for m in ("tiny", "prototype")},
        "runs": [steps_to_target(seed, args.work) for seed in range(args.seeds)],
    }
    ratios = [r["ratio"] for r in result["runs"] if r["ratio"] is not None]
    result["ratio_median"] = statistics.median(ratios) if ratios else None
    result["ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    print(
        f"steps to target, bfloat16 / float32: median {result['ratio_median']}, "
        f"range {result['ratio_range']}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_precision.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
