"""The ``eqx-gn`` command: train, compare methods, plot runs.

The options of ``train`` and ``compare`` and their help are generated from the
descriptions of the settings of [`TrainConfig`][eqx_gn.lm.TrainConfig]; values are
checked once, by ``TrainConfig``. Every error the user can fix (a bad flag or value,
a missing corpus, an output directory in the way, a damaged checkpoint) is
reported as one line on stderr with exit status 2.
"""

import argparse
import datetime
import errno
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, NoReturn

from ._errors import ConfigError, Diverged, flag_names
from .run._checkpoint import CheckpointError, NoSpaceError
from .run._config import GN_ONLY, TrainConfig, describe, group_of, settings
from .run._gn_config import CG_DEFAULTS
from .run._methods import method_name, parse_method
from .run._settings import choices_of, value_type

_DESCRIPTION = """\
Train the paper's LLaMA-style language model with Gauss-Newton (GN) or a
first-order baseline, compare methods on the same data and budget, and plot
loss curves.

  eqx-gn train                                  GN on the tiny model, Shakespeare
  eqx-gn train --blocks layerwise --solver prox GN's settings, each on its own
  eqx-gn train --optimizer muon                 a baseline instead
  eqx-gn compare --methods adamw,muon,gn,gn-layerwise-cg --target-loss 1.9
  eqx-gn plot runs/compare-*                    loss against steps, tokens, time

Run 'eqx-gn COMMAND --help' for the options of a command."""

_TRAIN_EPILOG = """\
Every run first trains with AdamW for --warmup-fraction of its steps (the same
warm-up for every optimizer), then with the chosen optimizer. --batch-size is
the number of sequences per optimizer step for every optimizer; GN splits it
into --micro-batches micro-batches and draws its line-search batches apart
(--ls-batches of --ls-batch-size sequences, counted as line-search tokens).
The output directory gets config.json, metrics.jsonl (one record per step),
summary.json and checkpoints/ (and .eqx-gn.lock, held while the run lives): a
directory holding a run needs --resume or --overwrite, one holding files of
those names that are not an eqx-gn run's is refused, and any other files in it
are left alone.

Data parallelism: --mesh data=N splits every batch over N devices. On CPU,
simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N.
Multi-process: start one process per host with --distributed (and
--coordinator-address, --num-processes, --process-id, or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and the
same --out on a shared file system."""

_METHODS_HELP = (
    "comma-separated methods: adamw, muon, soap, shampoo, psgd, or gn followed by "
    "its non-default settings (gn-layerwise, gn-prox, gn-trueloss, gn-cg, "
    "gn-layerwise-prox, gn-soap, ...)"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit status 2, and
    that takes no abbreviated flag (``--runs`` must not mean ``--runs-dir``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _UsageError(Exception):
    """A user error found after parsing: reported in one line, exit status 2."""


def _number(kind: type) -> Any:
    name = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _mesh(text: str) -> dict[str, int]:
    """``data=N``, ``fsdp=M`` or ``data=N,fsdp=M`` -> the settings they give."""
    names = {"data": "data_parallel", "fsdp": "fsdp"}
    values = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        name = name.strip()
        if name not in names or name in values or not size.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"expected data=N, fsdp=M or data=N,fsdp=M, got {text!r}"
            )
        if int(size) < 1:
            raise argparse.ArgumentTypeError(f"{name} needs >= 1 devices, got {text!r}")
        values[name] = int(size)
    return {names[name]: size for name, size in values.items()}


def _add_settings(parser: argparse.ArgumentParser, *, skip: tuple[str, ...]) -> None:
    """One option per setting of `TrainConfig`, in its groups, from its description."""
    groups: dict[str, Any] = {}
    for field in settings():
        if field.name in skip:
            continue
        meta = field.metadata
        name = group_of(field)
        group = groups.get(name)
        if group is None:
            group = groups[name] = parser.add_argument_group(name)
        text, default = describe(field)
        if default is not None and field.name != "out":  # its help says the default
            text += f" (default: {default})"
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        options: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": argparse.SUPPRESS if meta["hidden"] else text,
        }
        kind = value_type(field)
        choices = choices_of(field)
        if kind is bool:
            options["action"] = "store_false" if field.default else "store_true"
        else:
            options["metavar"] = meta["metavar"] or (
                "NAME" if choices else "N" if kind is int else "X"
            )
            if field.name == "data_parallel":
                options["type"] = _mesh
            elif kind in (int, float):
                options["type"] = _number(kind)
            if choices:
                options["choices"] = choices
                options["help"] += f"; one of {', '.join(choices)}"
        group.add_argument(flag, **options)


#: The flags spelled otherwise than ``--`` and the setting's name with dashes, by
#: setting: errors name settings by these under the command line.
_FLAGS = {f.name: f.metadata["flag"] for f in settings() if f.metadata["flag"]}


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
    _add_settings(train, skip=())
    compare = commands.add_parser(
        "compare",
        help="run several methods on the same data and budget",
        description="Run several methods with the same data, model, warm-up and\n"
        "budget, each into OUT/METHOD, then print a table (final validation loss,\n"
        "rejected GN steps, line-search tokens; steps, tokens and time to\n"
        "--target-loss) and plot the loss curves into OUT.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "--methods",
        "--optimizers",
        dest="methods",
        required=True,
        metavar="NAMES",
        help=_METHODS_HELP,
    )
    compare.add_argument(
        "--lr",
        metavar="LR",
        default=argparse.SUPPRESS,
        help="learning rate for every method, or per method as METHOD=LR,... "
        "(default: each optimizer's)",
    )
    _add_settings(compare, skip=("optimizer", "blocks", "solver", "inner", "lr"))
    from .study._command import add_arguments as add_study_arguments

    study = commands.add_parser(
        "study",
        help="steps, tokens and time to a target loss, per method and batch size",
        description="The study: every method at every batch size under the same "
        "tuning budget, against one target validation loss; writes OUT/study.json "
        "and its plots, and with --report the results page.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_arguments(study)
    plot = commands.add_parser(
        "plot",
        help="plot loss curves of runs, comparisons and studies",
        description="Plot validation and training loss of runs against steps, "
        "tokens read and training time into loss_vs_{steps,tokens,time}.FORMAT, "
        "and for runs with curvature records (--curvature-every) their top GN "
        "eigenvalues, trace and block traces against steps into curvature.FORMAT. "
        "Each DIR is a run, a compare output or a study output directory.",
    )
    plot.add_argument("runs", nargs="+", metavar="DIR", help="directories to plot")
    plot.add_argument(
        "--out",
        metavar="DIR",
        help="where the figures go (default: the directory, or the directories' "
        "common parent)",
    )
    plot.add_argument("--title", help="figure title (default: from the runs)")
    plot.add_argument("--log-y", action="store_true", help="log-scale loss axis")
    plot.add_argument(
        "--batch-size",
        type=_number(int),
        metavar="N",
        help="study directories: plot the runs at this batch size (default: the "
        "largest every method ran)",
    )
    plot.add_argument(
        "--all-runs",
        action="store_true",
        help="study directories: every run at that batch size, not each method's best",
    )
    plot.add_argument(
        "--format",
        dest="formats",
        default="png",
        metavar="FORMATS",
        help="comma-separated figure formats among png, pdf, svg (default: png)",
    )
    curvature = commands.add_parser(
        "curvature",
        help="spectrum, top eigenvalues and trace of a saved run's curvature",
        description="At the latest checkpoint of the run in RUN_DIR, on the first "
        "of its fixed validation batches: the spectral density (stochastic Lanczos "
        "quadrature), the largest eigenvalues and the trace (per layerwise block for "
        "a layerwise GN run) of the full GN matrix or a Fisher. Writes a figure and "
        "the numbers as JSON beside it, and prints one line.",
    )
    curvature.add_argument("run", metavar="RUN_DIR", help="the run's directory")
    curvature.add_argument(
        "--matrix",
        choices=("ggn", "empirical-fisher", "mc-fisher"),
        default="ggn",
        help="the curvature matrix (default: ggn, the GN matrix)",
    )
    for flag, default, metavar, text in (
        ("--probes", 8, "P", "random probes of the density and the trace "),
        (
            "--iterations",
            40,
            "M",
            "Lanczos steps per probe and for the top eigenvalues ",
        ),
        ("--top", 5, "K", "largest eigenvalues reported "),
        ("--seed", 0, "S", ""),
    ):
        curvature.add_argument(
            flag,
            type=_number(int),
            default=default,
            metavar=metavar,
            help=f"{text}(default: {default})",
        )
    curvature.add_argument(
        "--out",
        metavar="FIGURE",
        help="the figure, .png, .pdf or .svg (default: RUN_DIR/curvature.png); the "
        "JSON goes beside it",
    )
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
    """The settings given on the command line (the others keep their defaults)."""
    skip = ("command", "methods", "lr") if args.command == "compare" else ("command",)
    values = {k: v for k, v in vars(args).items() if k not in skip}
    values.update(values.pop("data_parallel", {}))
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


def applicable(values: dict[str, Any], method: dict[str, str]) -> dict[str, Any]:
    """``values`` without the settings that do not apply to ``method`` (the
    optimizer, blocks and solver of `parse_method`): a comparison's
    ``--line-search`` is for its GN methods, its ``--cg-damping`` for its CG ones."""
    drop: tuple[str, ...] = ()
    if method["optimizer"] != "gn":
        drop = GN_ONLY
    elif method["solver"] != "cg":
        drop = tuple(CG_DEFAULTS)
    return {k: v for k, v in values.items() if k not in drop}


def _parse_rates(text: str, methods: list[str]) -> dict[str, float]:
    try:
        return dict.fromkeys(methods, float(text))
    except ValueError:
        pass
    rates = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in methods:
            raise _UsageError(
                f"--lr names {name!r}, which is not among --methods {','.join(methods)}"
            )
        try:
            rates[name] = float(value)
        except ValueError:
            raise _UsageError(
                f"--lr expects LR or METHOD=LR,...; got {item!r}"
            ) from None
    return rates


#: The settings a method's name is made of, with their defaults, in
#: `method_name`'s order.
_METHOD_DEFAULTS = {
    name: TrainConfig.__dataclass_fields__[name].default
    for name in ("optimizer", "blocks", "solver", "inner")
}


def _train(args: argparse.Namespace) -> int:
    from .run._console import summary_text
    from .run._train import train

    given = {**_METHOD_DEFAULTS, **vars(args)}
    method = method_name(*(given[k] for k in _METHOD_DEFAULTS))
    config = TrainConfig(**_config_values(args, f"runs/{method}-{_timestamp()}"))
    previous = signal.signal(signal.SIGINT, _quiet_interrupt)
    try:
        summary = train(config)
    except KeyboardInterrupt:
        sys.stderr.write(
            f"eqx-gn train: interrupted; continue with --resume --out {config.out}\n"
        )
        # Exit now, and silently: orbax's writer threads (a checkpoint the interrupt
        # cut short) print tracebacks at interpreter shutdown or keep the process
        # waiting on them. A checkpoint cut short is never committed, so --resume
        # ignores it; the lock goes with the process.
        _exit_quietly(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise _UsageError(
            f"no space left on the device of {e.filename or config.out}; the last "
            "checkpoint is untouched; free space and continue with --resume"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if _is_primary():
        print(summary_text(summary), flush=True)
    return 0


def _exit_quietly(status: int) -> NoReturn:
    """Exit at once, with nothing more on stderr (what is written is flushed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os._exit(status)


def _quiet_interrupt(signum, frame) -> None:
    """Ctrl-C during ``train``: the run stops before its next step (never in the
    middle of a checkpoint write, which orbax's writer threads report at length or
    wait on); a second Ctrl-C interrupts at once, with background threads
    silenced."""
    del signum, frame
    from .run._train import STEPPING, STOP_REQUESTED

    if STEPPING.is_set() and not STOP_REQUESTED.is_set():
        STOP_REQUESTED.set()
        return
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    raise KeyboardInterrupt


def _compare(args: argparse.Namespace) -> int:
    from .results._loss_curves import plot_runs
    from .run._console import compare_table
    from .run._train import train

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if not methods:
        raise _UsageError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise _UsageError("--methods names a method twice")
    settings_of = {name: parse_method(name) for name in methods}
    values = _config_values(args, f"runs/compare-{_timestamp()}")
    rates = _parse_rates(args.lr, methods) if "lr" in vars(args) else {}
    out = Path(values.pop("out"))
    # Check every configuration before the first run starts.
    configs = [
        TrainConfig(
            **applicable(values, settings_of[name]),
            **settings_of[name],
            lr=rates.get(name),
            out=str(out / name),
        )
        for name in methods
    ]
    summaries = [train(config) for config in configs]
    if not _is_primary():
        return 0
    (out / "compare.json").write_text(json.dumps(summaries, indent=2) + "\n")
    paths = plot_runs([out], out)
    print(compare_table(summaries))
    print(f"\nruns in {out}/{{{','.join(methods)}}}; plots: ", end="")
    print(", ".join(str(p) for p in paths), flush=True)
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study._command import main as study_main

    return study_main(args)


def _plot(args: argparse.Namespace) -> int:
    from .results._loss_curves import plot_runs

    runs = [Path(r) for r in args.runs]
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    for fmt in formats:
        if fmt not in ("png", "pdf", "svg"):
            raise _UsageError(f"--format {fmt!r}: choose among png, pdf, svg")
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise _UsageError(
                f"--out {out} is a file; plot writes its figures into a directory"
            )
    elif len(runs) == 1:
        out = runs[0]
    else:
        out = Path(os.path.commonpath([r.absolute() for r in runs]))
    try:
        paths = plot_runs(
            runs,
            out,
            title=args.title,
            log_y=args.log_y,
            formats=formats or ("png",),
            batch_size=args.batch_size,
            select="all" if args.all_runs else "best",
        )
    except PermissionError as e:
        raise _UsageError(
            f"cannot write the figures into {out} ({e.strerror}); choose a "
            "writable directory with --out"
        ) from None
    print("\n".join(str(p) for p in paths))
    return 0


def _curvature(args: argparse.Namespace) -> int:
    from ._inspect_curvature import run_curvature, summary_line

    result = run_curvature(
        args.run,
        out=args.out,
        probes=args.probes,
        iterations=args.iterations,
        top=args.top,
        matrix=args.matrix,
        seed=args.seed,
    )
    print(summary_line(result), flush=True)
    return 0


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _one_line_warnings(prog: str) -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        (file or sys.stderr).write(f"{prog}: warning: {text}\n")

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Run the ``eqx-gn`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"eqx-gn {args.command}"
    _one_line_warnings(prog)
    command = {
        "train": _train,
        "compare": _compare,
        "study": _study,
        "plot": _plot,
        "curvature": _curvature,
    }[args.command]
    try:
        with flag_names(_FLAGS):
            return command(args)
    except NoSpaceError as e:
        # The failed write's threads would print the same at shutdown.
        sys.stderr.write(f"{prog}: error: {e}\n")
        _exit_quietly(2)
    except (ConfigError, CheckpointError, _UsageError, FileNotFoundError) as e:
        _fail(prog, str(e))
    except Diverged as e:
        sys.stderr.write(f"{prog}: {' '.join(str(e).split())}\n")
        return 1
    except ValueError as e:
        if args.command != "plot":
            raise
        _fail(prog, str(e))
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


def _fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
