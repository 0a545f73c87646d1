"""What the language-model runner prints: the summary of a run, the table of a
comparison, and the start and evaluation lines of a run without a progress bar.

Every function here takes plain dictionaries (a run's ``summary.json``, its
``config.json``, its metrics records) and returns a string; none prints or reads
a file, so each can be tested on hand-made values.

Summaries written before the ``label``/``blocks``/``solver``/``rejected_steps``
keys existed are completed by `complete_summary` from the run's configuration and
metrics records.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ._methods import parse_method

#: Default GN settings, left out of a label ("gn" rather than "gn full inner").
_DEFAULT_BLOCKS = "full"
_DEFAULT_SOLVER = "inner"
_DEFAULT_INNER = "muon"


def gn_settings(settings: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The ``(blocks, solver)`` of a GN run's configuration or summary, reading
    the method names ``"gn-layerwise"``, ``"gn-prox"``, ``"gn-layerwise-cg"``
    (old optimizer names, and the study's method names) too; ``(None, None)`` for
    a first-order run."""
    parsed = _parsed(settings)
    if parsed is None:
        return None, None
    return settings.get("blocks") or parsed["blocks"], (
        settings.get("solver") or parsed["solver"]
    )


def _parsed(settings: Mapping[str, Any]) -> dict[str, str] | None:
    """`parse_method` of the settings' optimizer or method name; None for a
    first-order run (or a name no runner wrote)."""
    optimizer = str(settings.get("optimizer") or settings.get("method") or "")
    if optimizer.split("-")[0] != "gn":
        return None
    try:
        return parse_method(optimizer)
    except ConfigError:
        return {"optimizer": "gn", "blocks": _DEFAULT_BLOCKS,
                "solver": _DEFAULT_SOLVER, "inner": _DEFAULT_INNER}  # fmt: skip


def corpus_name(text: str | None) -> str:
    """The corpus of a configuration's ``text``, for titles and the start line:
    ``"Shakespeare"`` for the bundled plays (``None``), else the file or
    directory name."""
    if text is None:
        return "Shakespeare"
    return Path(text).name or str(text)


def run_label(settings: Mapping[str, Any]) -> str:
    """The name of a run's method: ``"adamw"``, ``"gn"``, ``"gn layerwise prox"``.

    ``settings`` is a configuration (``config.json``'s ``"config"``), a summary or a
    study run: its ``label`` if it has one, else the optimizer followed by the GN
    block structure and solver where they are not the defaults (full, inner).
    """
    if settings.get("label"):
        return str(settings["label"])
    optimizer = settings.get("optimizer") or settings.get("method")
    if not optimizer:
        return "?"
    blocks, solver = gn_settings(settings)
    if blocks is None:
        return str(optimizer)
    inner = settings.get("inner") or _parsed(settings)["inner"]
    parts = ["gn"]
    if blocks != _DEFAULT_BLOCKS:
        parts.append(str(blocks))
    if solver != _DEFAULT_SOLVER:
        parts.append(str(solver))
    if inner != _DEFAULT_INNER:
        parts.append(str(inner))
    return " ".join(parts)


def complete_summary(
    summary: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``summary`` with the keys an older runner did not write filled in.

    ``label``, ``blocks`` and ``solver`` come from the configuration (or the
    summary's optimizer name); ``rejected_steps`` (GN steps with step size 0) and
    ``ls_tokens`` from the metrics records, when they are given; a first-order run
    has ``rejected_steps`` ``None``.
    """
    out = dict(summary)
    settings = {**(config or {}), **{k: v for k, v in out.items() if v is not None}}
    blocks, solver = gn_settings(settings)
    out.setdefault("blocks", blocks)
    out.setdefault("solver", solver)
    if not out.get("label"):
        out["label"] = run_label(settings)
    if records is not None:
        if out.get("rejected_steps") is None and blocks is not None:
            out["rejected_steps"] = sum(bool(r.get("rejected")) for r in records)
        if out.get("ls_tokens") is None:
            ls = [r["ls_tokens"] for r in records if r.get("ls_tokens") is not None]
            out["ls_tokens"] = max(ls, default=0)
    out.setdefault("rejected_steps", None)
    return out


def fmt(value: Any, spec: str = ".4f") -> str:
    """A table cell: ``"-"`` for ``None``, floats by ``spec``, integers with
    thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _gn_steps(s: Mapping[str, Any]) -> int | None:
    steps, warmup = s.get("steps"), s.get("warmup_steps")
    if steps is None or warmup is None:
        return None
    return max(steps - warmup, 0)


def _rejected(s: Mapping[str, Any]) -> str:
    """``"8/18"``: rejected GN steps of all GN steps; ``"-"`` without GN steps."""
    rejected = s.get("rejected_steps")
    if rejected is None:
        return "-"
    total = _gn_steps(s)
    return f"{rejected}/{total}" if total is not None else str(rejected)


def rejection_advice(summary: Mapping[str, Any]) -> str:
    """What more than a third of GN's steps rejected says. In
    ``benchmarks/lr_robustness.py`` (``tiny``, five batch sizes and K) GN at its
    default ``--lr`` rejected at most a quarter of its steps; at 4 times the
    default 24% to 70%, and far below it up to 34%: the rejections do not say
    which way the rate is off, so the advice names both."""
    del summary
    return (
        "many steps rejected: no step size the search tried lowered the loss on "
        "its batches; GN rejects more at a --lr far from its default, above it "
        "(directions too long) or below it (decreases too small for the search's "
        "batches to see)"
    )


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary printed at the end of ``eqx-gn train``: method, model, losses,
    tokens read (training and line search), rejected GN steps, time, the target
    and where the files are. Keys an old summary lacks are left out."""
    s = summary
    label = run_label(s)
    head = f"{label} on the {s.get('model', '?')} model"
    if s.get("num_params") is not None:
        head += f" ({s['num_params']:,} parameters)"
    head += f": {fmt(s.get('steps'))} steps"
    if s.get("warmup_steps"):
        head += f" ({s['warmup_steps']:,} AdamW warm-up)"
    lines = [
        head,
        f"  final validation loss  {fmt(s.get('final_val_loss'))} "
        f"(best {fmt(s.get('best_val_loss'))}, last training loss "
        f"{fmt(s.get('final_train_loss'))})",
    ]
    tokens, ls_tokens = s.get("tokens"), s.get("ls_tokens") or 0
    if tokens is not None:
        if ls_tokens:
            lines.append(
                f"  tokens                 {tokens:,} training + {ls_tokens:,} "
                f"line search = {tokens + ls_tokens:,} read"
            )
        else:
            lines.append(f"  tokens                 {tokens:,} training")
    rejected = s.get("rejected_steps")
    if rejected is not None:
        total = _gn_steps(s)
        of = f" of {total:,}" if total is not None else ""
        lines.append(
            f"  rejected GN steps      {rejected:,}{of} (line search chose step size 0)"
        )
        if total and rejected > max(2, total // 3):
            lines.append("  " + rejection_advice(s))
    if s.get("time_s") is not None:
        time = f"  time                   {s['time_s']:.1f} s training"
        extra = [
            f"{s[k]:.1f} s {what}"
            for k, what in (("compile_s", "compiling"), ("eval_s", "evaluating"))
            if s.get(k) is not None
        ]
        if extra:
            time += ", " + ", ".join(extra)
        if s.get("wall_s") is not None:
            time += f"; {s['wall_s']:.1f} s wall-clock"
        lines.append(time)
    target = s.get("target_loss")
    if target is not None:
        if s.get("steps_to_target") is not None:
            lines.append(
                f"  target {target:<16g}reached at step {s['steps_to_target']:,} "
                f"({fmt(s.get('tokens_to_target'))} tokens read, "
                f"{fmt(s.get('time_to_target'), '.1f')} s)"
            )
        else:
            lines.append(f"  target {target:<16g}not reached")
    if s.get("diverged_at") is not None:
        lines.append(f"  diverged at step {s['diverged_at']:,}")
    elif s.get("completed") is False:
        lines.append("  stopped early (--stop-after); continue with --resume")
    if s.get("out"):
        lines.append(
            f"  files                  {s['out']}/ (config.json, metrics.jsonl, "
            "summary.json, checkpoints/)"
        )
    return "\n".join(lines)


#: The compare table's columns: (header, summary key or function, format).
_COLUMNS: tuple[tuple[str, Any, str], ...] = (
    ("method", run_label, ""),
    ("final val", "final_val_loss", ".4f"),
    ("best val", "best_val_loss", ".4f"),
    ("steps", "steps", ""),
    ("rejected", _rejected, ""),
    ("tokens", "tokens", ""),
    ("ls tokens", "ls_tokens", ""),
    ("time (s)", "time_s", ".1f"),
    ("steps to target", "steps_to_target", ""),
    ("tokens to target", "tokens_to_target", ""),
    ("time to target (s)", "time_to_target", ".1f"),
)


def compare_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The table ``eqx-gn compare`` prints: one row per run, named by its label.

    ``rejected`` is rejected GN steps (step size 0) of all GN steps, ``ls tokens``
    the tokens the GN line search read on top of the training tokens; both are
    ``-`` for a first-order run.
    """
    header = [name for name, _, _ in _COLUMNS]
    body = []
    for s in summaries:
        first_order = gn_settings(s)[0] is None and not s.get("ls_tokens")
        row = []
        for name, key, spec in _COLUMNS:
            if callable(key):
                row.append(key(s))
            elif name == "ls tokens" and first_order:
                row.append("-")
            else:
                row.append(fmt(s.get(key), spec or ".4f"))
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def _count(n: int) -> str:
    """``1,234,567 (1.2M)``: a count with an abbreviation when it is large."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{suffix})"
    return f"{n:,}"


def start_line(info: Mapping[str, Any]) -> str:
    """The line a run prints when it starts (with or without a progress bar).

    ``info`` has ``label``, ``model``, ``num_params``, ``corpus`` (a name),
    ``train_tokens`` and ``validation_tokens`` (the corpus splits),
    ``tokens_per_step``, ``steps`` and ``devices``; a missing key is left out.
    """
    parts = [str(info.get("label") or "?")]
    model = f"{info['model']} model" if info.get("model") else "model"
    if info.get("num_params") is not None:
        model += f", {_count(info['num_params'])} parameters"
    parts.append(model)
    if info.get("corpus") is not None:
        corpus = f"corpus {info['corpus']}"
        splits = [
            f"{info[key]:,} {name}"
            for key, name in (
                ("train_tokens", "training"),
                ("validation_tokens", "validation"),
            )
            if info.get(key) is not None
        ]
        if splits:
            corpus += f" ({' + '.join(splits)} tokens)"
        parts.append(corpus)
    if info.get("steps") is not None:
        budget = f"{info['steps']:,} steps"
        if info.get("tokens_per_step") is not None:
            per = info["tokens_per_step"]
            budget += f" x {per:,} tokens = {info['steps'] * per:,} training tokens"
        parts.append(budget)
    elif info.get("tokens_per_step") is not None:
        parts.append(f"{info['tokens_per_step']:,} tokens per step")
    if info.get("devices") is not None:
        devices = info["devices"]
        parts.append(f"{devices} device{'s' if devices != 1 else ''}")
    return "start: " + "; ".join(parts)


def eval_line(record: Mapping[str, Any], total_steps: int) -> str:
    """The line a run without a progress bar prints at each evaluation.

    ``record`` is the step's metrics record (``step``, ``val_loss``,
    ``train_loss``, ``tokens``, ``time_s``, and on GN steps ``ls_tokens`` and
    ``rejected``), optionally with ``rejected_since_eval``: the number of rejected
    GN steps (step size 0) since the previous evaluation, this step included.
    Without that key, a rejected step is marked on its own.
    """
    width = len(str(total_steps))
    parts = [f"step {record['step']:>{width}}/{total_steps}"]
    if record.get("phase") == "warmup":
        parts[0] += " (warm-up)"
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    if record.get("train_loss") is not None:
        parts.append(f"train {record['train_loss']:.4f}")
    if record.get("tokens") is not None:
        tokens = f"tokens {record['tokens']:,}"
        if record.get("ls_tokens"):
            tokens += f" + {record['ls_tokens']:,} line search"
        parts.append(tokens)
    if record.get("time_s") is not None:
        parts.append(f"time {record['time_s']:.1f} s")
    rejected = record.get("rejected_since_eval")
    if rejected:
        parts.append(
            f"{rejected} GN step{'s' if rejected != 1 else ''} rejected since the "
            "last evaluation"
        )
    elif rejected is None and record.get("rejected"):
        parts.append("GN step rejected (step size 0)")
    return "  ".join(parts)
