"""The runs of the output directories, read for plotting: the settings, summary
and loss curve of each run.

`load_runs` reads the runs of any of the three kinds of output directory:

- a run directory (``eqx-gn train``): ``config.json``, ``metrics.jsonl``,
  ``summary.json``;
- a compare directory (``eqx-gn compare``): ``compare.json`` and one run
  directory per method;
- a study directory (``benchmarks/study.py``): ``study.json``, whose runs carry
  their curves (or, in the older format, name their run directories).
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..run._console import complete_summary, run_label

#: The methods, in the order a study's best runs are listed (and given colours).
METHODS = (
    "adamw",
    "muon",
    "soap",
    "gn",
    "gn layerwise",
    "gn prox",
    "gn layerwise prox",
    "gn cg",
    "gn layerwise cg",
)
#: The curve fields of a run, as in a study run's ``"curve"``.
CURVE_FIELDS = (
    "step",
    "phase",
    "tokens",
    "ls_tokens",
    "time_s",
    "train_loss",
    "line_search_evaluations",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its settings and its loss curve.

    ``curve`` maps each of `CURVE_FIELDS` and ``val_loss`` to one list entry per
    step (``val_loss`` is ``None`` where the step was not evaluated,
    ``ls_tokens`` is cumulative and 0 before the first GN step;
    ``line_search_evaluations``, a GN step's own count, is ``None`` elsewhere and in
    curves recorded before it was kept).
    """

    name: str
    path: Path
    config: dict[str, Any]
    resolved: dict[str, Any]
    summary: dict[str, Any]
    curve: dict[str, list[Any]]

    @property
    def label(self) -> str:
        return run_label({**self.config, **self.summary})

    @property
    def batch_size(self) -> int | None:
        return self.config.get("batch_size")

    @property
    def lr(self) -> float | int | None:
        lr = self.config.get("lr")
        return lr if lr is not None else self.resolved.get("learning_rate")

    @property
    def warmup_end(self) -> int | None:
        """The last AdamW warm-up step, ``None`` without a warm-up (read from the
        curve's phases, or the resolved or summary ``warmup_steps`` without them)."""
        curve = self.curve
        if any(p is not None for p in curve["phase"]):
            steps = [
                s
                for s, p in zip(curve["step"], curve["phase"], strict=True)
                if p == "warmup"
            ]
            return max(steps) if steps else None
        for settings in (self.resolved, self.summary):
            if settings.get("warmup_steps") is not None:
                end = settings["warmup_steps"]
                return end if end and end in curve["step"] else None
        return None

    @property
    def target(self) -> float | None:
        target = self.config.get("target_loss")
        return target if target is not None else self.summary.get("target_loss")


@dataclasses.dataclass(frozen=True)
class Source:
    """The runs of one directory; ``note`` says which runs of a study were
    chosen (``None`` when all were)."""

    kind: str
    path: Path
    runs: list[Run]
    note: str | None = None
    target: float | None = None


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in order.

    **Raises:** `FileNotFoundError` if the file is missing, `ValueError` if a line
    is not JSON or the file has no records.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
    if not records:
        raise ValueError(f"{path} has no records yet")
    return records


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None


def curve_of(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """A run's curve from its ``metrics.jsonl`` records (see `Run`): one entry per
    record for each of `CURVE_FIELDS` and ``val_loss``, ``ls_tokens`` carried
    forward from the last record that has it (0 before the first GN step). The
    study's records (``study.json``) hold this curve too."""
    curve: dict[str, list[Any]] = {name: [] for name in (*CURVE_FIELDS, "val_loss")}
    ls_tokens = 0
    for r in records:
        if r.get("ls_tokens") is not None:
            ls_tokens = r["ls_tokens"]
        for name in CURVE_FIELDS:
            curve[name].append(r.get(name))
        curve["ls_tokens"][-1] = ls_tokens
        curve["val_loss"].append(r.get("val_loss"))
    return curve


def read_run(run_dir: str | Path) -> Run:
    """The run in ``run_dir``: configuration, summary (completed from the metrics
    where an older runner left keys out; ``{}`` while the run has none) and curve."""
    path = Path(run_dir)
    records = load_metrics(path)
    config_file = path / "config.json"
    saved = _read_json(config_file) if config_file.is_file() else {}
    config, resolved = saved.get("config", {}), saved.get("resolved", {})
    summary_file = path / "summary.json"
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    summary = complete_summary(summary, config, records)
    return Run(
        name=path.name,
        path=path,
        config=config,
        resolved=resolved,
        summary=summary,
        curve=curve_of(records),
    )


def _run_dir(parent: Path, out: str | None, name: str | None) -> Path | None:
    """A run directory named by a compare or study entry: its recorded ``out``
    if that holds a run, else the directory of that name under ``parent`` (so a
    moved results directory still plots)."""
    candidates = []
    if out:
        candidates += [parent / Path(out).name, Path(out)]
    if name:
        candidates.append(parent / name)
    for candidate in candidates:
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _read_compare(path: Path) -> Source:
    entries = _read_json(path / "compare.json")
    runs = []
    for entry in entries:
        run_dir = _run_dir(path, entry.get("out"), entry.get("optimizer"))
        if run_dir is None:
            raise FileNotFoundError(
                f"{path}/compare.json names the run {entry.get('out')!r}, which has "
                "no metrics.jsonl"
            )
        runs.append(read_run(run_dir))
    if not runs:
        raise ValueError(f"{path}/compare.json lists no runs")
    return Source("compare", path, runs)


#: Keys of a study run that override its summary's.
_STUDY_OUTCOME = (
    "steps_to_target",
    "tokens_to_target",
    "time_to_target",
    "final_val_loss",
    "best_val_loss",
)


def _study_run(path: Path, entry: Mapping[str, Any], target: float | None) -> Run:
    """A run of ``study.json``: the new format carries ``config``, ``resolved``,
    ``summary`` and ``curve``; the old one has the summary's keys at the top and
    names its run directory in ``out``."""
    name = str(entry.get("name") or Path(entry.get("out") or "run").name)
    if "curve" in entry:
        config = dict(entry.get("config") or {})
        # The entry's own outcome is measured against the study's target, which
        # the run's summary may not have had.
        summary = dict(entry.get("summary") or {})
        summary |= {k: entry[k] for k in _STUDY_OUTCOME if k in entry}
        curve = {
            key: list(entry["curve"].get(key) or [])
            for key in (*CURVE_FIELDS, "val_loss")
        }
        n = len(curve["step"])
        for key in (*CURVE_FIELDS, "val_loss"):
            if len(curve[key]) != n:
                if (
                    key in ("ls_tokens", "phase", "val_loss", "line_search_evaluations")
                    and not curve[key]
                ):
                    curve[key] = [0 if key == "ls_tokens" else None] * n
                else:
                    raise ValueError(
                        f"{path}/study.json, run {name}: curve {key!r} has "
                        f"{len(curve[key])} entries for {n} steps"
                    )
        last = 0
        for i, value in enumerate(curve["ls_tokens"]):
            last = value if value is not None else last
            curve["ls_tokens"][i] = last
        resolved = dict(entry.get("resolved") or {})
    else:
        run_dir = _run_dir(path, entry.get("out"), entry.get("name"))
        if run_dir is None:
            raise FileNotFoundError(
                f"{path}/study.json: run {name} has no curve and its run directory "
                f"{entry.get('out')!r} is missing"
            )
        run = read_run(run_dir)
        config, resolved, curve = run.config, run.resolved, run.curve
        summary = {**run.summary, **entry}
    for key, field in (("method", "optimizer"), ("batch_size", "batch_size")):
        if entry.get(key) is not None and field not in config:
            config[field] = entry[key]
    if entry.get("seed") is not None:
        config["seed"] = entry["seed"]
    if "lr" not in config and entry.get("lr") is not None:
        config["lr"] = entry["lr"]
    hyper = entry.get("hyperparameters") or {}
    if "lr" not in config and hyper.get("lr") is not None:
        config["lr"] = hyper["lr"]
    if target is not None:
        config.setdefault("target_loss", target)
    summary = complete_summary({**summary, "label": entry.get("label")}, config)
    return Run(
        name=name,
        path=path / name,
        config=config,
        resolved=resolved,
        summary=summary,
        curve=curve,
    )


def _rank(run: Run) -> tuple[float, float]:
    steps = run.summary.get("steps_to_target")
    best = run.summary.get("best_val_loss")
    if best is None:
        best = min((v for v in run.curve["val_loss"] if v is not None), default=None)
    return (
        math.inf if steps is None else float(steps),
        math.inf if best is None else float(best),
    )


#: The roles of the runs a study chooses from (first edition: grid and refinement
#: runs; second: its tuning runs).
_SEARCH_ROLES = ("grid", "refine", "tune")


def _read_study(path: Path, *, batch_size: int | None, select: str) -> Source:
    study = _read_json(path / "study.json")
    target = study.get("target", study.get("target_loss"))
    entries = study.get("runs") or []
    if not entries:
        raise ValueError(f"{path}/study.json lists no runs")
    runs = [_study_run(path, entry, target) for entry in entries]
    sizes = sorted({r.batch_size for r in runs if r.batch_size is not None})
    largest = batch_size is None and len(sizes) > 1
    if batch_size is None:
        # The largest batch size at which every method ran (a study may add a
        # larger one for some methods only), else the largest.
        methods = {r.label for r in runs}
        complete = [
            b for b in sizes if {r.label for r in runs if r.batch_size == b} == methods
        ]
        batch_size = (complete or sizes or [None])[-1]
    elif batch_size not in sizes:
        raise ValueError(
            f"{path}/study.json has no runs at batch size {batch_size} "
            f"(it has {', '.join(map(str, sizes)) or 'none'})"
        )
    chosen = [r for r in runs if r.batch_size == batch_size]
    where = "at the largest batch of all methods" if largest else ""
    if select == "all":
        return Source("study", path, chosen, f"study: all runs {where}".strip(), target)
    if select != "best":
        raise ValueError(f"select must be 'best' or 'all', got {select!r}")
    # One run per method: the run the study chose (its ``chosen`` entries), else
    # the fewest steps to the target (then the lowest validation loss) among the
    # runs it chose from (``role`` grid or refine: not the seed, layout or timing
    # reruns of a chosen configuration) and of the first seed, so that repeated
    # seeds of a configuration do not pick the luckiest one.
    names = {
        str(entry["run"])
        for row in (study.get("chosen") or {}).values()
        for size, entry in (row or {}).items()
        if str(size) == str(batch_size)
        and isinstance(entry, Mapping)
        and "run" in entry
    }
    roles = {str(e.get("name")): e.get("role") for e in entries if "role" in e}
    if names:
        chosen = [r for r in chosen if r.name in names]
    else:
        chosen = [r for r in chosen if roles.get(r.name, "grid") in _SEARCH_ROLES]
    best: dict[str, Run] = {}
    for run in chosen:
        seeds = [r.config.get("seed") or 0 for r in chosen if r.label == run.label]
        if (run.config.get("seed") or 0) != min(seeds):
            continue
        if run.label not in best or _rank(run) < _rank(best[run.label]):
            best[run.label] = run
    note = f"study: best run per method {where}".strip()
    order = list(METHODS)
    chosen = sorted(
        best.values(),
        key=lambda r: order.index(r.label) if r.label in order else len(order),
    )
    return Source("study", path, chosen, note, target)


def load_runs(
    path: str | Path, *, batch_size: int | None = None, select: str = "best"
) -> Source:
    """The runs of a run, compare or study directory.

    For a study, the runs at ``batch_size`` sequences per step (default: the
    largest at which every method ran), all of them (``select="all"``) or the best of each method
    (``"best"``: the run the study chose, from its ``chosen`` entries; without
    them, the fewest steps to the target, then lowest validation loss, among the
    grid and refinement runs, never a seed, layout or timing rerun).

    **Raises:** `FileNotFoundError`, in one line naming ``path``, if it is none of
    the three; `ValueError` if a file in it is malformed.
    """
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return Source("run", path, [read_run(path)])
    if (path / "compare.json").is_file():
        return _read_compare(path)
    if (path / "study.json").is_file():
        return _read_study(path, batch_size=batch_size, select=select)
    what = "does not exist" if not path.exists() else "holds none of them"
    raise FileNotFoundError(
        f"{path} is not a run directory, compare directory or study directory "
        f"(metrics.jsonl, compare.json or study.json; it {what})"
    )


def labels_for(runs: Sequence[Run]) -> list[str]:
    """One label per run: its method (``"gn layerwise prox"``), with the batch
    size, learning rate, seed and finally the name added where labels repeat."""
    labels = [r.label for r in runs]
    extras = (
        ("batch", lambda r: r.batch_size, "{}"),
        ("lr", lambda r: r.lr, "{:g}"),
        ("micro-batches", lambda r: r.config.get("micro_batches"), "{}"),
        ("seed", lambda r: r.config.get("seed"), "{}"),
    )
    for what, value, spec in extras:
        if len(set(labels)) == len(labels):
            return labels
        repeated = {x for x in labels if labels.count(x) > 1}
        for x in repeated:
            group = [i for i, y in enumerate(labels) if y == x]
            values = [value(runs[i]) for i in group]
            if len(set(values)) > 1:
                for i, v in zip(group, values, strict=True):
                    labels[i] += f", {what} {'?' if v is None else spec.format(v)}"
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({r.name})" for label, r in zip(labels, runs, strict=True)]
    return labels
