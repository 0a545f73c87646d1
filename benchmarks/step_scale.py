"""What sets the length of GN's step: the trust scale, the search's step size, the
model's own optimal length along the direction, and how well the inner loop solved
its subproblem, step by step (issue 34).

Trains ``tiny`` on the bundled text: an AdamW warm-up, then GN (the runner's
`eqx_gn.lm.GNConfig`, so the same solver, search and trust rule as ``eqx-gn
train``), one configuration per ``--run`` (``NAME:key=value,key=value``, keys of
GNConfig; ``lr`` and the rest as in ``eqx-gn train``). Each main step records:

- ``scale``: the trust rule's scale $t$ the subproblem was solved at, and ``s``,
  the step size the line search chose (0: rejected);
- ``predicted`` and ``actual``: the solver's predicted decrease (the quadratic model
  on its last micro-batch, $L_K(\\theta_0) - q_K(d)$) and the true decrease at
  $s = 1$ on *that same micro-batch*, $L_K(\\theta_0) - L_K(\\theta_0 + d)$, and
  their ratio ``rho_same``; ``rho_search`` is the ratio the rules read today, the
  true decrease on the line-search batches over the same prediction;
- ``alpha_model``: the model's own best length along the direction,
  $\\alpha^* = -g^\\top d / d^\\top G d$ on the line-search batches' quadratic model
  (1: the inner loop stopped where the model says to stop; below 1 it overshot);
- every ``--quality-every`` steps, ``quality``: the decrease of the quadratic model
  on the step's first 8 micro-batches that $d$ reached, over the decrease a
  reference solve of that model reaches (CG, 50 iterations, relative damping
  1e-4), and ``alpha_ref``, the reference solution's length relative to $d$.

Validation loss every ``--eval-every`` main steps (4 x 32 sequences, as the study).
Writes ``benchmarks/results/step_scale_<tag>.json`` and a figure beside it.

    python benchmarks/step_scale.py --batch-size 256 --micro-batches 64 \\
        --run adaptive: --run fixed-lr0.0073:trust=fixed,lr=0.0073
"""

import argparse
import json
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_gn
from eqx_gn import lm
from eqx_gn.lm.data._pipeline import batch_iterator, inputs_and_targets
from eqx_gn.lm.data._token_cache import cached_splits

RESULTS = Path(__file__).parent / "results"
LOSS = eqx_gn.SoftmaxCrossEntropy()


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="warm-up included")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--quality-every", type=int, default=10)
    p.add_argument("--ls-batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--run",
        action="append",
        default=[],
        help="NAME:key=value,... (GNConfig settings)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        help="instead of running: join the runs of these result files (same batch "
        "size and K) into one result file and figure named by --tag",
    )
    p.add_argument("--tag", default=None)
    return p.parse_args()


def gn_settings(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            settings[key] = value
    return name, settings


@eqx.filter_jit
def warmup_step(apply, optimizer, model, opt_state, batch):
    def loss_fn(model):
        x, y = inputs_and_targets(batch)
        return LOSS.value(apply(model, x), y)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss


@eqx.filter_jit
def evaluate(apply, model, batches):
    return eqx_gn.mean_loss(apply, LOSS, model, inputs_and_targets(batches))


def _dot(a, b):
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(x, y) for x, y in leaves)


def _true_loss(gn, model, batch):
    x, y = batch
    return LOSS.value(gn.fn(model, x), y)


@eqx.filter_jit
def diagnosed_step(gn, model, state, batches, ls_batches):
    """One GN step (exactly `GaussNewton.step`) and what it saw."""
    batches = inputs_and_targets(batches)
    ls_batches = inputs_and_targets(ls_batches)
    solution = gn.solve(model, state, batches)
    phi = gn.line_search_objective(model, solution.direction, ls_batches)
    step_size, ls_stats = gn.search(
        phi, solution.stats.model_end.dtype, previous=state.step_size
    )
    new_model, new_state, stats = gn.accept(model, state, solution, step_size, ls_stats)
    d = solution.direction
    last = jax.tree.map(lambda x: x[-1], batches)
    moved = eqx.apply_updates(model, d)
    actual_same = _true_loss(gn, model, last) - _true_loss(gn, moved, last)
    # The model's best length along d on the line-search data (all batches as one).
    merged = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), ls_batches)
    q = gn.problem.quadratic_model(model, merged)
    g = q.gradient()
    gd, dgd = _dot(g, d), q.curvature(d)
    info = {
        "scale": stats.trust_scale,
        "s": stats.step_size,
        "predicted": stats.predicted_decrease,
        "actual_same": actual_same,
        "actual_search": stats.actual_decrease,
        "true_decrease": stats.true_decrease,
        "alpha_model": -gd / dgd,
        "loss_before": stats.loss_before,
        "rejected": stats.rejected,
        "evaluations": stats.line_search_evaluations,
        "damping": stats.damping,
    }
    return new_model, new_state, info, d


@eqx.filter_jit
def solve_quality(gn, model, batches, d):
    """q(0) - q(d) over q(0) - q(d_ref) on the first 8 micro-batches as one batch,
    d_ref from 50 CG iterations at damping 1e-4 times G's scale along g."""
    batches = inputs_and_targets(batches)
    sub = jax.tree.map(lambda x: x[:8].reshape(-1, *x.shape[2:]), batches)
    q = gn.problem.quadratic_model(model, sub)
    g = q.gradient()

    gg = _dot(g, g)
    damping = 1e-4 * _dot(g, q.gnvp(g)) / gg

    def op(v):
        return jax.tree.map(lambda a, b: a + damping * b, q.gnvp(v), v)

    x = jax.tree.map(jnp.zeros_like, g)
    r = jax.tree.map(jnp.negative, g)
    p, rr = r, gg

    def body(_, carry):
        x, r, p, rr = carry
        ap = op(p)
        alpha = rr / _dot(p, ap)
        x = jax.tree.map(lambda a, b: a + alpha * b, x, p)
        r = jax.tree.map(lambda a, b: a - alpha * b, r, ap)
        rr_new = _dot(r, r)
        p = jax.tree.map(lambda a, b: a + (rr_new / rr) * b, r, p)
        return x, r, p, rr_new

    x, *_ = jax.lax.fori_loop(0, 50, body, (x, r, p, rr))
    q0 = q.loss_value
    ref = q0 - q.value(x)
    got = q0 - q.value(d)
    return got / ref, _dot(x, d) / _dot(d, d)


def run(args, splits, name, settings, warm_model, eval_batches, seq_len):
    main_steps = args.steps - round(args.warmup_fraction * args.steps)
    settings = dict(settings)
    step_length = settings.pop("step_length", None)
    config = lm.GNConfig(steps=main_steps, **settings)
    gn = config.build(warm_model)
    if step_length is not None:
        old = gn.solver
        solver = type(old)(
            old.optimizer,
            learning_rate=old.learning_rate,
            schedule=old.schedule,
            total_steps=old.total_steps,
            warm_start=old.warm_start,
            step_length=step_length,
        )
        gn = eqx.tree_at(lambda g: g.solver, gn, solver)
    state = gn.init(warm_model)
    model = warm_model
    b, k = args.batch_size, args.micro_batches
    train = batch_iterator(splits.train, b, seq_len, seed=args.seed + 1)
    ls = batch_iterator(
        splits.train, args.ls_batches * (b // k), seq_len, seed=args.seed + 7
    )
    apply = gn.fn
    records, evals = [], []
    t0 = time.perf_counter()
    for step in range(1, main_steps + 1):
        batch = jnp.asarray(next(train)).reshape(k, b // k, -1)
        ls_batch = jnp.asarray(next(ls)).reshape(args.ls_batches, b // k, -1)
        before = model
        model, state, info, d = diagnosed_step(gn, model, state, batch, ls_batch)
        rec = {key: float(v) for key, v in info.items()}
        rec["step"] = step
        rec["rho_same"] = rec["actual_same"] / rec["predicted"]
        rec["rho_search"] = rec["actual_search"] / rec["predicted"]
        if args.quality_every and step % args.quality_every == 1:
            quality, alpha_ref = map(float, solve_quality(gn, before, batch, d))
            rec |= {"quality": quality, "alpha_ref": alpha_ref}
        records.append(rec)
        if step % args.eval_every == 0 or step == main_steps:
            val = float(evaluate(apply, model, eval_batches))
            evals.append({"step": step, "val_loss": val})
            print(
                f"{name} step {step}: val {val:.4f} scale {rec['scale']:.3g} "
                f"s {rec['s']:.3g} alpha* {rec['alpha_model']:.3g} "
                f"rho same {rec['rho_same']:.3g} search {rec['rho_search']:.3g}"
                + (f" quality {rec['quality']:.3g}" if "quality" in rec else ""),
                flush=True,
            )
    return {
        "settings": settings,
        "gn": {
            "solver": config.solver,
            "trust": config.trust,
            "line_search": config.line_search,
            "lr": config.learning_rate,
        },
        "steps": records,
        "evals": evals,
        "seconds": time.perf_counter() - t0,
    }


def figure(result: dict, out: Path) -> None:
    """Validation loss, trust scale, chosen step size and the model's best length
    along d over the main steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, run in result["runs"].items():
        steps = [r["step"] for r in run["steps"]]
        evals = run["evals"]
        axes[0].plot(
            [e["step"] for e in evals], [e["val_loss"] for e in evals], label=name
        )
        axes[1].plot(steps, [r["scale"] for r in run["steps"]], label=name)
        axes[2].plot(
            steps, [max(r["s"], 1e-3) for r in run["steps"]], ".", ms=3, label=name
        )
        axes[3].plot(
            steps,
            [min(max(r["alpha_model"], 1e-3), 1e2) for r in run["steps"]],
            ".",
            ms=3,
            label=name,
        )
    titles = (
        "validation loss",
        "trust scale t",
        "chosen step size s (rejected: 1e-3)",
        "model's best length along d (ls data)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("main step")
    for ax in axes[1:]:
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"tiny, {result['batch_size']} sequences, K = {result['micro_batches']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def combine(paths: list[Path], tag: str) -> None:
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    for r in results[1:]:
        if (r["batch_size"], r["micro_batches"]) != (
            first["batch_size"],
            first["micro_batches"],
        ):
            raise SystemExit(f"--combine: {paths} differ in batch size or K")
    result = dict(first)
    result["command"] = [r["command"] for r in results]
    result["combined_from"] = [p.name for p in paths]
    result["runs"] = {n: run for r in results for n, run in r["runs"].items()}
    out = RESULTS / f"step_scale_{tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    figure(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main():
    args = parse()
    if args.combine:
        combine(args.combine, args.tag or "combined")
        return
    if not args.run:
        raise SystemExit("give at least one --run NAME:settings (or --combine)")
    splits = cached_splits(None)
    model_config = lm.get_config("tiny", vocab_size=splits.tokenizer.vocab_size)
    seq_len = model_config.seq_len
    model = lm.Transformer(model_config, jax.random.key(args.seed))
    apply = lm.apply_fn(model)
    val = batch_iterator(splits.validation, 32, seq_len, seed=0)
    eval_batches = jnp.stack([jnp.asarray(next(val)) for _ in range(4)])
    warmup = round(args.warmup_fraction * args.steps)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(3e-3, b1=0.9, b2=0.95)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    train = batch_iterator(splits.train, args.batch_size, seq_len, seed=args.seed)
    for _ in range(warmup):
        batch = jnp.asarray(next(train))
        model, opt_state, _ = warmup_step(apply, optimizer, model, opt_state, batch)
    print(
        f"warm-up: {warmup} steps, val {float(evaluate(apply, model, eval_batches)):.4f}"
    )
    runs = {}
    for spec in args.run:
        name, settings = gn_settings(spec)
        runs[name] = run(args, splits, name, settings, model, eval_batches, seq_len)
    tag = args.tag or f"b{args.batch_size}_k{args.micro_batches}"
    result = {
        "what": "GN's step scale, step by step (issue 34): trust scale, chosen step "
        "size, the model's best length along d, rho on the same and on the search's "
        "data, and the inner solve's quality against a reference CG solve",
        "command": "python benchmarks/step_scale.py "
        + " ".join(
            [
                f"--batch-size {args.batch_size}",
                f"--micro-batches {args.micro_batches}",
                f"--steps {args.steps}",
            ]
            + [f"--run {r}" for r in args.run]
        ),
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}",
        "batch_size": args.batch_size,
        "micro_batches": args.micro_batches,
        "warmup_steps": warmup,
        "runs": runs,
    }
    out = RESULTS / f"step_scale_{tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    figure(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
