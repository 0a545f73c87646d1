r"""``eqx-gn study``: steps, tokens and time to one target validation loss, for every
method at every batch size, under the same tuning budget.

**The budget.** ``--runs N`` runs per method per batch size, the same ``N`` for
every method, spent by one rule (`plan_grid`, then `refine`):

1. *The grid*, ``N - 1`` points of the method's declared search space
   (`SEARCH_SPACES`). A first-order method (AdamW, Muon, SOAP, PSGD-Kron) searches
   its learning rate: ``N - 1`` values ``centre * 3**(i - (N - 2) / 2)``. A GN
   method searches its inner learning rate and ``K``, the micro-batches (inner
   steps) per outer step: the same ``N - 1`` learning rates, with ``K`` alternating
   between its two values from the largest down (for ``N = 3``: the two corners
   ``(lr_low, K_high)`` and ``(lr_high, K_low)`` of a 2 x 2 grid).
2. *One refinement run*, chosen by the same rule for every method (`refine`): the
   best run so far (fewest steps to the target, then the lowest validation loss)
   keeps every setting but its learning rate, which moves one grid step (x3) to the
   side where no run with those settings is; with runs on both sides, half a step
   (x3^(1/2)) toward the better neighbour; with runs on neither side, toward the
   method's declared centre.
3. *Seeds*: the chosen configuration of every method at the largest batch size is
   trained again with ``--seeds - 1`` more seeds, against the same target.

**The target** is ``--target``, or AdamW's best validation loss over its ``N``
runs at the largest batch size (trained first, with no target). Every other run
stops when it reaches the target; steps, tokens and time to the target are read
off each run's curve (first evaluation at or below it). Tokens count every token
the method read: GN's line-search batches included (`reached`).

**Layouts.** First-order methods run each step as one batch; GN works in ``K``
micro-batches. With ``--layout-check`` (default on) every first-order method's
chosen configuration at the largest batch runs once more with gradient
accumulation over GN's chosen ``K`` micro-batches (the same step, GN's layout), so
the page can state time per step in both layouts.

**Files.** ``OUT/study.json`` holds the settings, the search spaces, the target,
the chosen run per method and batch size, the claims, and every run (its
``method``, ``batch_size``, ``seed``, ``role``, ``hyperparameters``,
``steps_to_target``, ``tokens_to_target``, ``time_to_target``, ``final_val_loss``,
``config``, ``resolved``, ``summary`` and per-step ``curve``); the plots
``steps_to_target.png`` and ``loss_curves.png`` go next to it. Each run trains
in its own directory under ``--runs-dir``; a run whose directory has a finished
``summary.json``, or that ``study.json`` already holds, is not trained again.
``--report PATH`` writes the results page from ``study.json`` alone
(`eqx_gn.lm._study_report`).
"""

import argparse
import json
from pathlib import Path

from ._config import ConfigError
from ._study_protocol import DEFAULT_METHODS, plan_grid, search_space
from ._study_records import Settings
from ._study_runs import Study


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"{flag} takes integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``eqx-gn study``."""
    parser.epilog = __doc__.split("\n\n", 1)[1].replace("``", "")
    a = parser.add_argument
    a(
        "--text",
        default=None,
        metavar="PATH",
        help="a UTF-8 text file or a directory of .txt files (default: Shakespeare)",
    )
    a("--tokenizer", default="byte", choices=("byte", "bpe"))
    a("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    a("--model", default="tiny", help="a name of eqx_gn.lm.CONFIGS")
    a("--seq-len", type=int, default=None, help="default: the model's")
    a(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: adamw, muon, soap, psgd, gn[-layerwise][-prox]",
    )
    a("--batch-sizes", default="8,16,32,128", help="sequences per step")
    a("--steps", type=int, default=100, help="steps per run, warm-up included")
    a(
        "--runs",
        type=int,
        default=3,
        help="N, runs per method per batch size: N - 1 grid points and one "
        "refinement run (default 3)",
    )
    a(
        "--seeds",
        type=int,
        default=3,
        help="seeds of each method's chosen configuration at the largest batch",
    )
    a(
        "--target",
        type=float,
        default=None,
        help="target validation loss (default: AdamW's best at the largest batch)",
    )
    a("--warmup-fraction", type=float, default=0.1)
    a("--eval-every", type=int, default=5)
    a("--eval-batches", type=int, default=4)
    a("--eval-batch-size", type=int, default=32)
    a("--ls-batches", type=int, default=2)
    a("--seed", type=int, default=0)
    a(
        "--timing-rounds",
        type=int,
        default=3,
        help="rounds of short timing runs of the chosen configurations at the "
        "largest batch, interleaved so that load falls alike (0: none)",
    )
    a(
        "--no-layout-check",
        dest="layout_check",
        action="store_false",
        help="skip the first-order runs with GN's micro-batch layout",
    )
    a("--out", default="runs/study", help="where study.json and the plots go")
    a("--runs-dir", default=None, help="per-run directories (default: OUT/runs)")
    a(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs study.json or --runs-dir hold (with "
        "the settings OUT/study.json records, when there is one: the study's "
        "other options are then ignored)",
    )
    a(
        "--report",
        default=None,
        metavar="PATH",
        help="write the results page (markdown) from study.json to PATH",
    )
    a("--report-with", action="append", default=[], metavar="DIR",
      help="another study directory whose study.json the page also reports "
      "(repeatable)")  # fmt: skip


def settings_from(args: argparse.Namespace) -> Settings:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise ConfigError("--methods lists no method")
    for method in methods:
        search_space(method)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    if args.runs < 2:
        raise ConfigError(f"--runs must be >= 2 (a grid point and a refinement), "
                          f"got {args.runs}")  # fmt: skip
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    batches = tuple(sorted(set(_ints(args.batch_sizes, "--batch-sizes"))))
    for method in methods:
        for point in plan_grid(method, args.runs):
            k = point.micro_batches
            bad = [b for b in batches if k and b % k]
            if bad:
                raise ConfigError(
                    f"--batch-sizes {bad[0]} is not divisible by {method}'s K={k}"
                )
    return Settings(
        text=args.text,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        model=args.model,
        seq_len=args.seq_len,
        methods=methods,
        batch_sizes=batches,
        steps=args.steps,
        runs=args.runs,
        seeds=args.seeds,
        target=args.target,
        warmup_fraction=args.warmup_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        eval_batch_size=args.eval_batch_size,
        ls_batches=args.ls_batches,
        seed=args.seed,
        layout_check=args.layout_check,
        timing_rounds=args.timing_rounds,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``eqx-gn study``."""
    out = Path(args.out)
    settings = settings_from(args)
    saved = out / "study.json"
    if args.report_only and saved.exists():
        # The study's own settings: a report needs no repeat of its command line.
        recorded = json.loads(saved.read_text())["settings"]
        settings = Settings(
            **{
                **recorded,
                "methods": tuple(recorded["methods"]),
                "batch_sizes": tuple(recorded["batch_sizes"]),
            }
        )
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    if args.report_only and not saved.exists() and not runs_dir.is_dir():
        raise ConfigError(
            f"no study in {out}: it holds neither study.json nor a runs directory "
            f"({runs_dir}); run the study first, or point --out at one"
        )
    if args.report_only:
        train = None
    else:
        from ._train import train
    study = Study(settings, out, runs_dir, train, log=lambda s: print(s, flush=True))
    result = study.execute()
    if study.missing:
        print(f"not run (--report-only): {len(study.missing)} runs, e.g. "
              f"{study.missing[0]}", flush=True)  # fmt: skip
    from ._study_report import print_tables, write_report

    print_tables(result)
    print(f"wrote {out / 'study.json'} ({len(result['runs'])} runs)")
    if args.report:
        write_report([out, *map(Path, args.report_with)], Path(args.report))
        print(f"wrote {args.report}")
    return 0
