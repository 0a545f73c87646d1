"""Wall-clock of one Gauss-Newton outer step against one AdamW step, and what a
cheaper line search does to the step sizes chosen.

Part 1 (cost). On the LLaMA-style model of ``eqx_gn.lm`` and real text (the bundled
Shakespeare corpus, byte tokens), every optimizer step sees the same training
tokens: K micro-batches of b sequences (AdamW takes them as one batch of K*b).
Timed, compile excluded, median over ``--reps`` steps taken round-robin:

- ``adamw``: value_and_grad on K*b sequences + the AdamW update;
- ``adamw_micro``: the same step with the gradient accumulated over the K
  micro-batches of b sequences (GN's data layout; the same gradient);
- ``gn_solve``: ``GaussNewton.solve`` alone (K quadratic-model gradients at fresh
  linearizations + K Muon/AdamW inner updates);
- ``gn_search``: ``GaussNewton.line_search_objective`` + ``GaussNewton.search``
  alone (the paper's 8-point grid on ``--ls-batches`` micro-batches) for a fixed
  direction;
- ``gn_accept``: ``GaussNewton.accept`` alone (the parameter update and the
  solver's state);
- ``gn_qgrads`` and ``gn_inner_updates``: the two halves of ``gn_solve`` on their
  own, K quadratic-model gradients at fresh linearizations (``quadratic_model``
  then ``value_and_grad``, in a ``lax.map`` over the micro-batches) and K updates
  of the inner optimizer (Muon's Newton-Schulz on every hidden matrix, AdamW on
  the rest);
- ``gn_paper``: a full GN step with the paper's line search: 8 grid points, each
  on ``--ls-batches`` (default K) fresh micro-batches;
- ``gn_cheap``: the same step with ``GridLineSearch(stop_on_increase=True)`` on
  ``--cheap-ls-batches`` (default K/4) fresh micro-batches;
- ``gn_layerwise_cheap``: layerwise GN (embedding, each block, head), cheap search;
- ``gn_warm``: the step with ``GridLineSearch(stop_on_increase=True,
  warm_start=True)`` on the paper's M batches: the walk starts at the last step's
  choice (the exhaustive grid's choice whenever the loss is unimodal along the grid);
- ``gn_layerwise_warm``: layerwise GN with the warm walk on M batches.

Ratios are to ``adamw``, and (``x best``) to the faster of ``adamw`` and
``adamw_micro``. Targets: full GN step at most 2x AdamW's best (the paper reports
4-5x).

Part 1 runs after part 2, at the point part 2's run reached (its model and GN state,
the last step size included), so that the warm walk starts where it would in a real
run; every repetition starts from that same point.

Part 2 (decisions). Along one real GN run (AdamW warm-up, then ``--decision-steps``
GN steps advanced with the paper's choice), every candidate line search sees the
SAME direction at every step (and, as ``previous``, the paper's last step size); the
table reports how often each picks the paper's step size, and the loss its choice
gives on the paper's batches relative to the paper's choice.

Writes ``benchmarks/results/step_cost_<device>_<tag>.json``.

    python benchmarks/step_cost.py                 # tiny model, K=8 of 8 sequences
    python benchmarks/step_cost.py --quick         # a smoke run (seconds, no JSON)
    python benchmarks/step_cost.py --model 45m --tokenizer bpe --scan-layers \
        --seq 1024 --micro-batches 8 --micro-batch-size 8   # the paper's 45m step

Every GN piece is timed through the public stages of ``GaussNewton.step``
(``solve``, ``line_search_objective`` with ``search``, ``accept``); nothing here
re-implements the step.
"""

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_gn
from eqx_gn import lm


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument(
        "--tokenizer",
        choices=("byte", "bpe"),
        default="byte",
        help="bpe: a BPE tokenizer of the model's vocab_size, trained on the "
        "bundled plays (the 45m and 150m shapes need it)",
    )
    p.add_argument(
        "--scan-layers", action="store_true", help="stacked blocks applied with scan"
    )
    p.add_argument("--micro-batches", type=int, default=8, help="K")
    p.add_argument("--micro-batch-size", type=int, default=8, help="b")
    p.add_argument("--ls-batches", type=int, help="paper's search batches (default K)")
    p.add_argument(
        "--cheap-ls-batches", type=int, help="cheap search batches (default K/4)"
    )
    p.add_argument("--inner-lr", type=float, default=0.02)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--decision-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the dtype of every method's matrix products (lm.apply_fn)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: K=2, b=2, seq 16, 1 rep, 2 warm-up and 2 decision steps; "
        "writes no JSON",
    )
    args = p.parse_args()
    if args.quick:
        args.micro_batches, args.micro_batch_size, args.seq = 2, 2, 16
        args.reps, args.warmup_steps, args.decision_steps = 1, 2, 2
    return args


def main():
    args = parse()
    k, b = args.micro_batches, args.micro_batch_size
    m_paper = args.ls_batches or k
    m_cheap = args.cheap_ls_batches or max(1, k // 4)
    overrides = {
        name: getattr(args, name)
        for name in ("width", "depth", "heads", "ffn")
        if getattr(args, name) is not None
    }
    config = lm.get_config(
        args.model, seq_len=args.seq, scan_layers=args.scan_layers, **overrides
    )
    model = lm.Transformer(config, jax.random.key(args.seed))
    apply = lm.apply_fn(
        model, None if args.compute_dtype == "float32" else args.compute_dtype
    )
    splits = lm.prepare_splits(
        tokenizer=args.tokenizer,
        vocab_size=config.vocab_size if args.tokenizer == "bpe" else None,
    )
    if splits.tokenizer.vocab_size != config.vocab_size:
        raise SystemExit(
            f"step_cost: the {args.tokenizer} tokenizer has {splits.tokenizer.vocab_size}"
            f" tokens but the model's vocab_size is {config.vocab_size}; use "
            "--tokenizer bpe for a model with another vocabulary"
        )
    train = lm.batch_iterator(splits.train, k * b, args.seq, seed=args.seed)
    search = lm.batch_iterator(
        splits.train, max(m_paper, m_cheap) * b, args.seq, seed=args.seed + 1
    )

    def stack(batch, n):
        x, y = lm.inputs_and_targets(batch)
        return jnp.asarray(x).reshape(n, -1, args.seq), jnp.asarray(y).reshape(
            n, -1, args.seq
        )

    loss = eqx_gn.SoftmaxCrossEntropy()
    adam_filter = lm.embedding_and_head(model)

    # ---------------------------------------------------------------- AdamW
    adamw = optax.adamw(1e-3, b2=0.95)

    @eqx.filter_jit
    def adamw_step(model, opt_state, x, y):
        value, grad = eqx.filter_value_and_grad(lambda m: loss.value(apply(m, x), y))(
            model
        )
        updates, opt_state = adamw.update(
            grad, opt_state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), opt_state, value

    @eqx.filter_jit
    def adamw_micro_step(model, opt_state, xs, ys):
        # The same gradient from the same K micro-batches GN reads (the mean of
        # equal-sized micro-batch means), accumulated in a scan: AdamW in GN's
        # data layout.
        def one(total, batch):
            x, y = batch
            value, grad = eqx.filter_value_and_grad(
                lambda m: loss.value(apply(m, x), y)
            )(model)
            grad = eqx.filter(grad, eqx.is_inexact_array)
            return jax.tree.map(jnp.add, total, (value, grad)), None

        params = eqx.filter(model, eqx.is_inexact_array)
        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (value, grad), _ = jax.lax.scan(one, zero, (xs, ys))
        value, grad = jax.tree.map(lambda a: a / xs.shape[0], (value, grad))
        updates, opt_state = adamw.update(grad, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value

    opt_state = adamw.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(args.warmup_steps):  # a realistic point, not the random init
        x, y = stack(next(train), 1)
        model, opt_state, _ = adamw_step(model, opt_state, x[0], y[0])

    def gn_with(line_search, blocks=None):
        solver = eqx_gn.InnerOptimizer(
            learning_rate=args.inner_lr, adam_filter=adam_filter
        )
        return eqx_gn.GaussNewton(
            apply,  # what the runner uses (a LayerScan if scanned)
            loss,
            solver=solver,
            line_search=line_search,
            blocks=blocks,
        )

    paper = eqx_gn.GridLineSearch(grid_size=8)
    cheap = eqx_gn.GridLineSearch(grid_size=8, stop_on_increase=True)
    warm = eqx_gn.GridLineSearch(grid_size=8, stop_on_increase=True, warm_start=True)
    layerwise = lm.layerwise_blocks(model)
    variants = {
        "gn_paper": (gn_with(paper), m_paper),
        "gn_cheap": (gn_with(cheap), m_cheap),
        "gn_layerwise_cheap": (gn_with(cheap, layerwise), m_cheap),
        "gn_warm": (gn_with(warm), m_paper),
        "gn_layerwise_warm": (gn_with(warm, layerwise), m_paper),
    }
    gn_paper = variants["gn_paper"][0]

    @eqx.filter_jit
    def solve_only(model, state, batches):
        return gn_paper.solve(model, state, batches)

    @eqx.filter_jit
    def search_only(model, direction, ls_batches, dtype_like):
        phi = gn_paper.line_search_objective(model, direction, ls_batches)
        return gn_paper.search(phi, dtype_like.dtype)

    @eqx.filter_jit
    def accept_only(model, state, solved, searched):
        return gn_paper.accept(model, state, solved, *searched)

    @eqx.filter_jit
    def qgrads_only(model, batches, d):
        def one(batch):
            q = eqx_gn.quadratic_model(apply, model, batch, loss=loss)
            return q.value_and_grad(d)

        return jax.lax.map(one, batches)

    inner = gn_paper.solver.optimizer

    @eqx.filter_jit
    def inner_updates_only(params, grads):
        def body(_, carry):
            p, s = carry
            updates, s = inner.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        return jax.lax.fori_loop(0, k, body, (params, inner.init(params)))

    # ---------------------------------------------------------- decisions
    candidates = {
        "paper (exhaustive, M batches)": (paper, m_paper),
        f"exhaustive, {m_cheap} batches": (paper, m_cheap),
        "stop_on_increase, M batches": (cheap, m_paper),
        f"stop_on_increase, {m_cheap} batches": (cheap, m_cheap),
        "warm walk, M batches": (warm, m_paper),
        f"warm walk, {m_cheap} batches": (warm, m_cheap),
    }

    @eqx.filter_jit
    def decide(model, state, batches, ls):
        solution = gn_paper.solve(model, state, batches)
        direction, dtype = solution.direction, solution.stats.model_end.dtype
        phis = {
            m: gn_paper.line_search_objective(model, direction, (ls[0][:m], ls[1][:m]))
            for m in {m_paper, m_cheap}
        }
        choices = {}
        for name, (search_rule, m) in candidates.items():
            phi = phis[m]
            choices[name] = search_rule.search(
                phi,
                phi(jnp.zeros((), dtype)),
                previous=state.step_size.astype(dtype),
            )
        regret = {name: phis[m_paper](s) for name, (s, _) in choices.items()}
        s_paper, ls_stats = choices["paper (exhaustive, M batches)"]
        new_model, new_state, _ = gn_paper.accept(
            model, state, solution, s_paper, ls_stats
        )
        return (
            new_model,
            new_state,
            {n: c[0] for n, c in choices.items()},
            {n: c[1].num_evaluations for n, c in choices.items()},
            regret,
        )

    state = variants["gn_paper"][0].init(model)
    m_model = model
    records = []
    for _ in range(args.decision_steps):
        x, y = stack(next(train), k)
        ls = stack(next(search), max(m_paper, m_cheap))
        m_model, state, chosen, counts, regret = decide(m_model, state, (x, y), ls)
        records.append(
            {
                "step_size": {n: float(v) for n, v in chosen.items()},
                "evaluations": {n: int(v) for n, v in counts.items()},
                "loss_on_paper_batches": {n: float(v) for n, v in regret.items()},
            }
        )
    agreement = {}
    for name in candidates:
        same = [
            r["step_size"][name] == r["step_size"]["paper (exhaustive, M batches)"]
            for r in records
        ]
        excess = [
            r["loss_on_paper_batches"][name]
            - r["loss_on_paper_batches"]["paper (exhaustive, M batches)"]
            for r in records
        ]
        agreement[name] = {
            "same_step_size_fraction": float(np.mean(same)),
            "mean_excess_loss": float(np.mean(excess)),
            "max_excess_loss": float(np.max(excess)),
            "mean_evaluations": float(
                np.mean([r["evaluations"][name] for r in records])
            ),
            "evaluation_batches": candidates[name][1],
        }

    # ---------------------------------------------------------------- timing
    # At the point the decision run reached: its model and state (warm-started
    # inner iterate, last step size) for every GN variant; AdamW's cost does not
    # depend on the point.
    adam_model, model = model, m_model
    steps = {name: eqx.filter_jit(gn.step) for name, (gn, _) in variants.items()}
    states = {name: state for name in variants}

    def block(tree):
        jax.block_until_ready(eqx.filter(tree, eqx.is_array))

    timers = {}
    adam_state = opt_state

    def run_adamw(x, y, _):
        out = adamw_step(
            adam_model, adam_state, x.reshape(k * b, -1), y.reshape(k * b, -1)
        )
        block(out)

    # The two AdamW layouts take the same step (up to float summation order).
    xc, yc = stack(next(train), k)
    one_batch = adamw_step(
        adam_model, adam_state, xc.reshape(k * b, -1), yc.reshape(k * b, -1)
    )[0]
    micro = adamw_micro_step(adam_model, adam_state, xc, yc)[0]
    adamw_layout_diff = max(
        float(jnp.max(jnp.abs(p - q)))
        for p, q in zip(
            jax.tree.leaves(eqx.filter(one_batch, eqx.is_inexact_array)),
            jax.tree.leaves(eqx.filter(micro, eqx.is_inexact_array)),
            strict=True,
        )
    )
    print(f"AdamW, one batch vs K micro-batches: max |diff| {adamw_layout_diff:.1e}")

    def run_adamw_micro(x, y, _):
        block(adamw_micro_step(adam_model, adam_state, x, y))

    def run_solve(x, y, _):
        block(solve_only(model, states["gn_paper"], (x, y)))

    # The search and accept stages at a fixed direction (the first solve's).
    x0, y0 = stack(next(train), k)
    solved = solve_only(model, states["gn_paper"], (x0, y0))
    model_end = solved.stats.model_end

    def run_search(x, y, ls):
        block(
            search_only(
                model, solved.direction, (ls[0][:m_paper], ls[1][:m_paper]), model_end
            )
        )

    ls0 = stack(next(search), max(m_paper, m_cheap))
    searched = search_only(
        model, solved.direction, (ls0[0][:m_paper], ls0[1][:m_paper]), model_end
    )

    def run_accept(x, y, _):
        block(accept_only(model, states["gn_paper"], solved, searched))

    def run_qgrads(x, y, _):
        block(qgrads_only(model, (x, y), solved.direction))

    def run_inner_updates(x, y, _):
        block(
            inner_updates_only(
                eqx.filter(model, eqx.is_inexact_array), solved.direction
            )
        )

    def runner(name):
        def run(x, y, ls):
            _, m = variants[name]
            # Always from the same point, so every repetition times the same work.
            out = steps[name](model, states[name], (x, y), (ls[0][:m], ls[1][:m]))
            block(out)
            evals.setdefault(name, []).append(int(out[2].line_search_evaluations))

        return run

    evals = {}
    timers = {
        "adamw": run_adamw,
        "adamw_micro": run_adamw_micro,
        "gn_solve": run_solve,
        "gn_search": run_search,
        "gn_accept": run_accept,
        "gn_qgrads": run_qgrads,
        "gn_inner_updates": run_inner_updates,
    }
    timers.update({name: runner(name) for name in variants})
    samples = {name: [] for name in timers}
    for rep in range(args.reps + 1):
        x, y = stack(next(train), k)
        ls = stack(next(search), max(m_paper, m_cheap))
        for name, fn in timers.items():
            start = time.perf_counter()
            fn(x, y, ls)
            elapsed = time.perf_counter() - start
            if rep > 0:  # the first round compiles
                samples[name].append(elapsed)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    ratios = {name: medians[name] / medians["adamw"] for name in medians}
    best_adamw = min(medians["adamw"], medians["adamw_micro"])
    ratios_best = {name: medians[name] / best_adamw for name in medians}

    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"model: {config}, {lm.count_params(model):,} parameters")
    print(f"tokens per step: {k * b * args.seq:,} (K={k} micro-batches of b={b})")
    print(
        f"\n{'step':<22}{'median ms':>12}{'x AdamW':>10}{'x best':>8}{'LS evals':>10}"
    )
    for name in timers:
        mean_evals = f"{np.mean(evals[name]):.1f}" if name in evals else ""
        print(
            f"{name:<22}{1e3 * medians[name]:>12.1f}{ratios[name]:>10.2f}"
            f"{ratios_best[name]:>8.2f}{mean_evals:>10}"
        )
    print(
        "x best: to the faster AdamW layout (one batch of K*b, or K micro-batches)\n"
        "target: a full GN step (gn_paper, gn_warm) <= 2.0x AdamW's best"
    )
    print(
        f"\nline-search decisions over {args.decision_steps} GN steps (same direction each step):"
    )
    print(f"{'search':<36}{'same s':>8}{'mean excess loss':>18}{'evals':>7}")
    for name, a in agreement.items():
        print(
            f"{name:<36}{a['same_step_size_fraction']:>8.2f}{a['mean_excess_loss']:>18.2e}"
            f"{a['mean_evaluations']:>7.1f}"
        )

    result = {
        "benchmark": "step_cost",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
        "args": vars(args),
        "model": {
            **{
                f: getattr(config, f)
                for f in ("vocab_size", "width", "depth", "heads", "ffn", "seq_len")
            },
            "params": lm.count_params(model),
        },
        "tokens_per_step": k * b * args.seq,
        "median_seconds": medians,
        "samples_seconds": samples,
        "ratio_to_adamw": ratios,
        "ratio_to_best_adamw": ratios_best,
        "adamw_layouts_max_abs_param_diff": adamw_layout_diff,
        "mean_line_search_evaluations": {
            n: float(np.mean(v)) for n, v in evals.items()
        },
        "line_search_decisions": agreement,
        "decision_records": records,
    }
    if args.quick:
        print("\n--quick: no JSON written")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}-w{config.width}-d{config.depth}-s{args.seq}-K{k}b{b}"
    tag += "-scan" if args.scan_layers else ""
    tag += f"-bpe{config.vocab_size}" if args.tokenizer == "bpe" else ""
    tag += "-bf16" if args.compute_dtype == "bfloat16" else ""
    path = out / f"step_cost_{jax.default_backend()}_{tag}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
