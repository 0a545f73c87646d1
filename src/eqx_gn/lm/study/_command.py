r"""``eqx-gn study``: steps, tokens and time to one hard target validation loss,
for every method at every batch size, every method tuned by the same rule.

**The target.** ``--target``, or set from the first-order baselines (AdamW, Muon,
SOAP, PSGD-Kron among ``--methods``) at the largest batch: each is tuned with no
target over the full ``--steps`` budget (evaluated every ``--eval-every`` steps);
the best one's configuration runs on 3 seeds (`TARGET_SEEDS`) over the whole
budget, and the target is the median of their validation losses at the
evaluation nearest below 80% of the budget (`TARGET_AT`), so the best baseline
needs most of a long budget, its seeds have headroom, and one seed's luck does
not set it. study.json records the rule, the value, the runs and step it came
from and the seeds' curves (``target_source``).

**The budget.** A run at batch ``b`` has ``max(--steps, --steps * B / b)`` steps,
``B`` the ``--budget-batch`` (default: the largest batch): the same tokens at every
batch up to ``B``, and at least ``--steps`` steps above it, so that the large
batches still have room to show their steps; warm-up included; a run stops at the
target.

**Tuning, one rule for all** (`next_point`): at each batch size, largest first,
each method's learning rate is tried at its start (the declared centre at the
largest batch, the rate chosen at the next larger batch below it), x3 and /3;
while every run has missed the target, one more x3 step beyond the end nearer
the start (runs that all missed bracket nothing: a plateau cannot stop the
walk); while the best run lies at an end of what was tried, one more x3 step
beyond; once it has worse runs on both sides, half a step toward the better
neighbour; at most ``--max-runs`` runs (default 12, study.json's
``max_runs``). A tuning run gives up at the step where the best run so far
reached the target. A choice still at an edge, or among runs that all missed,
is reported as a tuning failure. GN's ``K`` is not searched: the micro-batch is
fixed at ``--gn-micro-batch`` sequences and ``K = b / micro-batch``, the
paper's rule (its inner steps grow with the batch).

**Resolution.** Runs with a target are evaluated on a schedule at most
``--eval-resolution`` of the step apart, and at every step once the last two
evaluations extrapolate to the target: steps to the target are exact to one step
(study.json's ``resolution`` says, run by run).

**Seeds.** Every chosen configuration at every batch size runs with ``--seeds``
seeds; the page shows medians and ranges. Tokens count every token a method read,
GN's line-search batches included (`reached`); serial passes count the passes over
one (micro-)batch a run made in sequence to the target (a first-order step 1, or A
with accumulation; a GN step its K inner steps and its line-search evaluations).

**GN as a user runs it.** Each GN method also runs at its runner default (no
``--lr``: no tuned rate) at every batch size on the same seeds (``defaults`` in
study.json, a row ``<method> default`` on the page).

**Layouts.** First-order methods run each step as one batch; GN works in ``K``
micro-batches. With ``--layout-check`` (default on) every first-order method's
chosen configuration at the largest batch runs once more with gradient
accumulation over GN's ``K`` micro-batches, so the page can state time per step
in both layouts.

**Files.** ``OUT/study.json`` holds the settings, the rule, the target and its
source, each method's tuning runs per batch size, the chosen configurations with
their seeds, GN's runner defaults, the claims and every run with its per-step
``curve``; the plots
``steps_to_target.png`` (steps to target against batch size, the critical batch
size figure) and ``loss_curves.png`` go next to it. Each run trains in its own
directory under ``--runs-dir``; a run whose directory has a finished
``summary.json`` that answers for the same target, or that ``study.json``
already holds, is not trained again, so an interrupted study continues where it
stopped. ``--report PATH`` writes the results page from ``study.json`` alone
(`eqx_gn.lm.study._page`).
"""

import argparse
import dataclasses
import json
from pathlib import Path

from ..run._config import ConfigError
from ._protocol import DEFAULT_METHODS, MAX_RUNS, centre, micro_batches
from ._records import Settings
from ._result import FORMAT, READABLE_FORMATS
from ._running import Study


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
    a(
        "--tokenizer",
        default="byte",
        metavar="byte|bpe|PATH",
        help="byte, bpe (trained on the training split) or the path of a Hugging "
        "Face tokenizer.json, as train's --tokenizer",
    )
    a("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    a("--model", default="tiny", help="a name of eqx_gn.lm.CONFIGS")
    a("--seq-len", type=int, default=None, help="default: the model's")
    a(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: adamw, muon, soap, shampoo, psgd, "
        "gn[-layerwise][-prox|-trueloss][-INNER]",
    )
    a("--batch-sizes", default="8,16,32,64,128,256", help="sequences per step")
    a(
        "--steps",
        type=int,
        default=150,
        help="steps of a run at the largest batch (or --budget-batch), warm-up "
        "included; the same tokens at every smaller batch size",
    )
    a(
        "--budget-batch",
        type=int,
        default=None,
        metavar="N",
        help="the batch size whose --steps steps set the tokens of every smaller "
        "batch's budget; a larger batch runs --steps steps, reading more tokens "
        "(default: the largest batch size)",
    )
    a(
        "--max-runs",
        type=int,
        default=MAX_RUNS,
        help="the cap on the runs that tune one method at one batch size",
    )
    a(
        "--seeds",
        type=int,
        default=3,
        help="seeds of each chosen configuration at every batch size",
    )
    a(
        "--target",
        type=float,
        default=None,
        help="target validation loss (default: set from the tuned first-order "
        "baselines at the largest batch)",
    )
    a("--warmup-fraction", type=float, default=0.1)
    a(
        "--eval-every",
        type=int,
        default=1,
        help="evaluation spacing of the runs that set the target",
    )
    a(
        "--eval-resolution",
        type=float,
        default=0.05,
        help="runs with a target: evaluations at most this fraction of the step "
        "apart, and at every step near the target",
    )
    a("--eval-batches", type=int, default=4)
    a("--eval-batch-size", type=int, default=32)
    a("--ls-batches", type=int, default=2)
    a(
        "--gn-micro-batch",
        type=int,
        default=4,
        help="sequences per GN micro-batch: K = batch / this at every batch size",
    )
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
    # Each option's help says its default (but where it explains its own).
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
            continue
        text = action.help or ""
        if "default" not in text:
            shown = f"default: {default}".replace("%", "%%")
            action.help = f"{text} ({shown})" if text else shown


def settings_from(args: argparse.Namespace) -> Settings:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise ConfigError("--methods lists no method")
    for method in methods:
        centre(method)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    if args.max_runs < 3:
        raise ConfigError(f"--max-runs must be >= 3 (the start, x3 and /3), got "
                          f"{args.max_runs}")  # fmt: skip
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.budget_batch is not None and args.budget_batch < 1:
        raise ConfigError(f"--budget-batch must be >= 1, got {args.budget_batch}")
    if args.gn_micro_batch < 1:
        raise ConfigError(f"--gn-micro-batch must be >= 1, got {args.gn_micro_batch}")
    batches = tuple(sorted(set(_ints(args.batch_sizes, "--batch-sizes"))))
    for method in methods:
        for b in batches:
            micro_batches(method, b, args.gn_micro_batch)
        reference = args.budget_batch or max(batches)
        for b in batches:
            if b < reference and args.steps * reference % b:
                raise ConfigError(
                    f"--batch-sizes {b} does not divide --steps x "
                    + ("--budget-batch" if args.budget_batch else "the largest batch")
                    + f" ({args.steps} x {reference}): runs at each batch size "
                    "read the same tokens"
                )
    # Every other setting of the study is the option of the same name.
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if f.name not in ("methods", "batch_sizes")
    }
    return Settings(**given, methods=methods, batch_sizes=batches)


def _report_as_written(result: dict, out: Path, args: argparse.Namespace) -> int:
    from ._page import print_tables, write_report

    print(f"{out / 'study.json'} is of format {result['format']!r}, an earlier "
          "edition: reported as written, nothing re-walked")  # fmt: skip
    print_tables(result)
    if args.report:
        write_report([out, *map(Path, args.report_with)], Path(args.report))
        print(f"wrote {args.report}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``eqx-gn study``."""
    out = Path(args.out)
    settings = settings_from(args)
    saved = out / "study.json"
    if args.report_only and saved.exists():
        study_json = json.loads(saved.read_text())
        if study_json.get("format") != FORMAT and (
            study_json.get("format") in READABLE_FORMATS
        ):
            # An earlier edition's runs followed its own rule: walking them by
            # this one would ask for runs it never had. Its tables and page come
            # from its study.json as written.
            return _report_as_written(study_json, out, args)
        # The study's own settings: a report needs no repeat of its command line.
        recorded = study_json["settings"]
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
        from ..run._train import train
    study = Study(settings, out, runs_dir, train, log=lambda s: print(s, flush=True))
    result = study.execute()
    if study.missing:
        print(f"not run (--report-only): {len(study.missing)} runs, e.g. "
              f"{study.missing[0]}", flush=True)  # fmt: skip
    from ._page import print_tables, write_report

    print_tables(result)
    print(f"wrote {out / 'study.json'} ({len(result['runs'])} runs)")
    if args.report:
        write_report([out, *map(Path, args.report_with)], Path(args.report))
        print(f"wrote {args.report}")
    return 0
