"""The ``eqx-gn`` command: train, compare optimizers, plot runs.

Every error the user can fix (a bad flag or value, a missing corpus, a run
directory in the way) is reported as one line on stderr with exit status 2.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

_DESCRIPTION = """\
Train the paper's LLaMA-style language model with Gauss-Newton (GN) or a
first-order baseline, compare optimizers on the same data and budget, and plot
loss curves.

  eqx-gn train                       GN on the tiny model, bundled Shakespeare
  eqx-gn train --optimizer muon      a baseline instead
  eqx-gn compare --optimizers adamw,muon,gn --steps 200 --target-loss 1.9
  eqx-gn plot runs/gn-* runs/muon-*  loss against steps, tokens and time

Run 'eqx-gn COMMAND --help' for the options of a command."""

_TRAIN_EPILOG = """\
Every run first trains with AdamW for --warmup-fraction of its steps (the same
warm-up for every optimizer), then with the chosen optimizer. --batch-size is
the number of sequences per optimizer step for every optimizer; GN splits it
into --micro-batches micro-batches (one inner step each) and draws its line
search batches separately (--ls-batches of --ls-batch-size sequences, counted
as line-search tokens). The output directory gets config.json, metrics.jsonl
(one record per step), summary.json and checkpoints/.

Data parallelism: --mesh data=N splits every batch over N devices. On CPU,
simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N.
Multi-process: start one process per host with --distributed (and
--coordinator-address, --num-processes, --process-id, or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and the
same --out on a shared file system."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _UsageError(Exception):
    """A user error found after parsing: reported in one line, exit status 2."""


def _fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _mesh(text: str) -> int:
    name, _, size = text.partition("=")
    if name.strip() != "data" or not size.strip().isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(
            f"expected data=N with N >= 1 devices, got {text!r}"
        )
    return int(size)


def _defaults() -> dict[str, Any]:
    from ._train import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _add_train_options(parser: argparse.ArgumentParser, *, compare: bool) -> None:
    from ._model import CONFIGS
    from ._train import DEFAULT_LEARNING_RATES, OPTIMIZERS

    d = _defaults()
    S = argparse.SUPPRESS

    data = parser.add_argument_group("data")
    data.add_argument(
        "--text",
        metavar="PATH",
        default=S,
        help="a UTF-8 text file (documents separated by form feeds) or a directory "
        "of .txt files (default: Shakespeare's plays, bundled)",
    )
    data.add_argument(
        "--tokenizer",
        choices=("byte", "bpe"),
        default=S,
        help=f"byte-level (vocabulary 257) or BPE trained on the training split "
        f"(default: {d['tokenizer']})",
    )
    data.add_argument(
        "--vocab-size",
        type=_positive_int,
        metavar="N",
        default=S,
        help="BPE vocabulary size, end-of-document token included",
    )
    data.add_argument(
        "--val-fraction",
        type=_finite_float,
        metavar="F",
        default=S,
        help=f"fraction of the documents held out for validation "
        f"(default: {d['val_fraction']})",
    )
    data.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=S,
        help="tokenizer and token cache (default: $EQX_GN_CACHE or ~/.cache/eqx_gn)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=list(CONFIGS),
        default=S,
        help=f"model shape (default: {d['model']})",
    )
    model.add_argument(
        "--seq-len",
        type=_positive_int,
        metavar="N",
        default=S,
        help="context length in tokens (default: the model's)",
    )

    opt = parser.add_argument_group("optimization")
    if not compare:
        opt.add_argument(
            "--optimizer",
            choices=OPTIMIZERS,
            default=S,
            metavar="NAME",
            help=f"one of {', '.join(OPTIMIZERS)} (default: {d['optimizer']})",
        )
    opt.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"optimizer steps, warm-up included (default: {d['steps']})",
    )
    opt.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"sequences per optimizer step, for every optimizer "
        f"(default: {d['batch_size']})",
    )
    opt.add_argument(
        "--micro-batches",
        type=_positive_int,
        metavar="K",
        default=S,
        help=f"GN: micro-batches (inner steps) per outer step; must divide "
        f"--batch-size (default: {d['micro_batches']})",
    )
    opt.add_argument(
        "--ls-batches",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"GN: line-search batches per step (default: {d['ls_batches']})",
    )
    opt.add_argument(
        "--ls-batch-size",
        type=_positive_int,
        metavar="N",
        default=S,
        help="GN: sequences per line-search batch (default: the micro-batch size)",
    )
    opt.add_argument(
        "--ls-grid",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"GN: step sizes 1, 2^-1/2, ... tried by the line search "
        f"(default: {d['ls_grid']})",
    )
    rates = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
    if compare:
        opt.add_argument(
            "--lr",
            metavar="LR",
            default=S,
            help="learning rate for every optimizer, or per optimizer as "
            f"NAME=LR,NAME=LR (default: {rates})",
        )
    else:
        opt.add_argument(
            "--lr",
            type=_finite_float,
            metavar="LR",
            default=S,
            help=f"peak learning rate of a first-order optimizer, or GN's inner "
            f"learning rate; cosine decay to 0 (default: {rates})",
        )
    opt.add_argument(
        "--weight-decay",
        type=_finite_float,
        metavar="W",
        default=S,
        help=f"decoupled weight decay (default: {d['weight_decay']})",
    )
    opt.add_argument(
        "--b2",
        type=_finite_float,
        metavar="B2",
        default=S,
        help=f"AdamW's second-moment decay (default: {d['b2']})",
    )
    opt.add_argument(
        "--max-grad-norm",
        type=_finite_float,
        metavar="C",
        default=S,
        help=f"clip gradients to this global norm (default: {d['max_grad_norm']})",
    )
    opt.add_argument(
        "--warmup-fraction",
        type=_finite_float,
        metavar="F",
        default=S,
        help=f"fraction of the steps trained with AdamW first "
        f"(default: {d['warmup_fraction']})",
    )
    opt.add_argument(
        "--warmup-lr",
        type=_finite_float,
        metavar="LR",
        default=S,
        help=f"the warm-up's AdamW learning rate (default: {d['warmup_lr']})",
    )

    ev = parser.add_argument_group("evaluation")
    ev.add_argument(
        "--eval-every",
        type=_count,
        metavar="N",
        default=S,
        help=f"steps between validation evaluations; 0: only after the warm-up "
        f"and at the end (default: {d['eval_every']})",
    )
    ev.add_argument(
        "--eval-batches",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"fixed validation batches (default: {d['eval_batches']})",
    )
    ev.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        metavar="N",
        default=S,
        help=f"sequences per validation batch (default: {d['eval_batch_size']})",
    )
    ev.add_argument(
        "--target-loss",
        type=_finite_float,
        metavar="L",
        default=S,
        help="stop when the validation loss reaches L; report steps, tokens and "
        "time to reach it",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--seed", type=_count, metavar="N", default=S, help="random seed (default: 0)"
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        default=S,
        help="output directory (default: runs/"
        + ("compare" if compare else "OPTIMIZER")
        + "-DATE-TIME)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=_count,
        metavar="N",
        default=S,
        help=f"steps between checkpoints; 0: only at the end "
        f"(default: {d['checkpoint_every']})",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        default=S,
        help="continue the run in --out from its last checkpoint",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        default=S,
        help="delete the run in --out and start over",
    )
    run.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=S,
        help="no progress bar",
    )
    run.add_argument("--stop-after", type=_positive_int, default=S, help=S)

    par = parser.add_argument_group("parallelism")
    par.add_argument(
        "--mesh",
        dest="data_parallel",
        type=_mesh,
        metavar="data=N",
        default=S,
        help="split every batch over N devices (default: data=1; with "
        "--distributed, all devices)",
    )
    par.add_argument(
        "--distributed",
        action="store_true",
        default=S,
        help="multi-process run: call jax.distributed.initialize first",
    )
    par.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        default=S,
        help="the coordinator (process 0) (default: $JAX_COORDINATOR_ADDRESS)",
    )
    par.add_argument(
        "--num-processes",
        type=_positive_int,
        metavar="N",
        default=S,
        help="number of processes (default: $JAX_NUM_PROCESSES)",
    )
    par.add_argument(
        "--process-id",
        type=_count,
        metavar="I",
        default=S,
        help="this process's index (default: $JAX_PROCESS_ID)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="eqx-gn",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    train = commands.add_parser(
        "train",
        help="train one model with one optimizer",
        description="Train a language model with one optimizer and print a summary.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_options(train, compare=False)
    compare = commands.add_parser(
        "compare",
        help="run several optimizers on the same data and budget",
        description="Run several optimizers with the same data, model, warm-up and\n"
        "budget, each into OUT/NAME, then print a table (final validation loss;\n"
        "steps, tokens and time to --target-loss) and plot the loss curves into OUT.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "--optimizers",
        required=True,
        metavar="NAMES",
        help="comma-separated optimizer names, e.g. adamw,muon,gn",
    )
    _add_train_options(compare, compare=True)
    plot = commands.add_parser(
        "plot",
        help="plot loss curves of runs",
        description="Plot validation and training loss of runs against steps, "
        "tokens and training time into loss_vs_{steps,tokens,time}.png.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument(
        "--out",
        metavar="DIR",
        help="where the PNG files go (default: the run directory, or the runs' "
        "common parent directory)",
    )
    plot.add_argument("--title", help="figure title")
    return parser


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _UsageError(f"${name} must be an integer, got {value!r}") from None


def _config_values(args: argparse.Namespace, default_out: str) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "optimizers")}
    if values.get("distributed"):
        if "num_processes" not in values:
            values["num_processes"] = _env_int("JAX_NUM_PROCESSES")
        if "process_id" not in values:
            values["process_id"] = _env_int("JAX_PROCESS_ID")
        if "out" not in values:
            raise _UsageError("--distributed needs --out (the same for every process)")
    if "out" not in values:
        if values.get("resume"):
            raise _UsageError("--resume needs --out, the directory of the run")
        values["out"] = default_out
    return values


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_summary(summary: dict[str, Any]) -> None:
    s = summary
    lines = [
        f"{s['optimizer']} on the {s['model']} model ({s['num_params']:,} parameters): "
        f"{s['steps']} steps ({s['warmup_steps']} AdamW warm-up)",
        f"  final validation loss  {_fmt(s['final_val_loss'])} "
        f"(best {_fmt(s['best_val_loss'])}, last training loss "
        f"{_fmt(s['final_train_loss'])})",
        f"  tokens                 {s['tokens']:,} training"
        + (f" + {s['ls_tokens']:,} line search" if s["ls_tokens"] else ""),
        f"  time                   {s['time_s']:.1f} s training, "
        f"{s['compile_s']:.1f} s compiling, {s['eval_s']:.1f} s evaluating; "
        f"{s['wall_s']:.1f} s wall-clock",
    ]
    if s["target_loss"] is not None:
        if s["target_reached"]:
            lines.append(
                f"  target {s['target_loss']:g}            reached at step "
                f"{s['steps_to_target']} ({s['tokens_to_target']:,} tokens, "
                f"{s['time_to_target']:.1f} s)"
            )
        else:
            lines.append(f"  target {s['target_loss']:g}            not reached")
    if not s["completed"]:
        lines.append("  stopped early (--stop-after); continue with --resume")
    lines.append(
        f"  files                  {s['out']}/ (config.json, metrics.jsonl, "
        "summary.json, checkpoints/)"
    )
    print("\n".join(lines), flush=True)


def _table(rows: list[dict[str, Any]]) -> str:
    header = [
        "optimizer",
        "final val",
        "best val",
        "steps",
        "tokens",
        "time (s)",
        "steps to target",
        "tokens to target",
        "time to target (s)",
    ]
    body = [
        [
            s["optimizer"],
            _fmt(s["final_val_loss"]),
            _fmt(s["best_val_loss"]),
            _fmt(s["steps"]),
            _fmt(s["tokens"]),
            _fmt(s["time_s"], ".1f"),
            _fmt(s["steps_to_target"]),
            _fmt(s["tokens_to_target"]),
            _fmt(s["time_to_target"], ".1f"),
        ]
        for s in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def _parse_rates(text: str, optimizers: list[str]) -> dict[str, float]:
    try:
        return dict.fromkeys(optimizers, float(text))
    except ValueError:
        pass
    rates = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in optimizers:
            raise _UsageError(
                f"--lr names {name!r}, which is not among --optimizers "
                f"{','.join(optimizers)}"
            )
        try:
            rates[name] = float(value)
        except ValueError:
            raise _UsageError(f"--lr expects LR or NAME=LR,...; got {item!r}") from None
    return rates


def _train(args: argparse.Namespace) -> int:
    from ._train import TrainConfig, train

    values = _config_values(
        args, f"runs/{getattr(args, 'optimizer', 'gn')}-{_timestamp()}"
    )
    config = TrainConfig(**values)
    try:
        summary = train(config)
    except KeyboardInterrupt:
        sys.stderr.write(
            f"eqx-gn train: interrupted; continue with --resume --out {config.out}\n"
        )
        return 130
    if _is_primary():
        _print_summary(summary)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ._plot import plot_runs
    from ._train import OPTIMIZERS, TrainConfig, train

    optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    if not optimizers:
        raise _UsageError("--optimizers is empty")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise _UsageError(
                f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
            )
    if len(set(optimizers)) != len(optimizers):
        raise _UsageError("--optimizers names an optimizer twice")
    values = _config_values(args, f"runs/compare-{_timestamp()}")
    rates = _parse_rates(values.pop("lr"), optimizers) if "lr" in values else {}
    out = Path(values.pop("out"))
    # Check every configuration before the first run starts.
    configs = [
        TrainConfig(**values, optimizer=name, lr=rates.get(name), out=str(out / name))
        for name in optimizers
    ]
    summaries = []
    for config in configs:
        summaries.append(train(config))
    if not _is_primary():
        return 0
    table = _table(summaries)
    (out / "compare.json").write_text(json.dumps(summaries, indent=2) + "\n")
    paths = plot_runs([c.out for c in configs], out)
    print(table)
    print(f"\nruns in {out}/{{{','.join(optimizers)}}}; plots: ", end="")
    print(", ".join(str(p) for p in paths), flush=True)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ._plot import plot_runs

    runs = [Path(r) for r in args.runs]
    if args.out is not None:
        out = Path(args.out)
    elif len(runs) == 1:
        out = runs[0]
    else:
        out = Path(os.path.commonpath([r.absolute() for r in runs]))
    paths = plot_runs(runs, out, title=args.title)
    print("\n".join(str(p) for p in paths))
    return 0


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``eqx-gn`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"eqx-gn {args.command}"
    from ._train import ConfigError

    command = {"train": _train, "compare": _compare, "plot": _plot}[args.command]
    try:
        return command(args)
    except (ConfigError, _UsageError, FileNotFoundError) as e:
        _fail(prog, str(e))
    except ValueError as e:
        if args.command != "plot":
            raise
        _fail(prog, str(e))
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
