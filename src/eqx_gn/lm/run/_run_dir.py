"""The output directory of a run: what it may hold, and the files the run writes.

A run writes ``config.json`` (first), ``metrics.jsonl``, ``summary.json`` and
``checkpoints/`` into its directory, nothing else. The rules that keep a user's
files safe:

- a directory holding none of those files is used as it is (other files in it are
  never touched);
- a directory holding any of them is refused unless it is an eqx-gn run (its
  ``config.json`` is one) and ``resume`` or ``overwrite`` is given;
- ``overwrite`` removes only those files of an eqx-gn run, and refuses any other
  directory;
- ``resume`` continues the run from its newest good checkpoint; where there is no
  run or no checkpoint yet (a job that always passes ``--resume``, killed before its
  first checkpoint), the run starts from step 0 and says so in one line;
- ``out`` naming a file, or a directory that cannot be created or written, is
  refused;
- one run at a time: a run holds an exclusive OS lock on ``.eqx-gn.lock`` in its
  directory for its whole life (taken before anything else is checked, released
  when the run ends or its process dies, so a killed run leaves no stale lock);
  a second run, ``resume`` or ``overwrite`` on a locked directory is refused,
  naming the holder's host and process id. Of a multi-process run, process 0
  holds it.

Every refusal is a [`ConfigError`][eqx_gn.lm.ConfigError] of one line, raised
before any step runs.
"""

import fcntl
import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any, TextIO

from .._errors import ConfigError, setting
from ._config import TrainConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
#: Everything a run writes into its directory.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINTS)
#: The lock file a running run holds (not a run file: never removed).
LOCK_FILE = ".eqx-gn.lock"
#: The key of ``config.json`` that marks an eqx-gn run.
_MARK = "eqx_gn_run"


def read_run_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` of the eqx-gn run in ``path``, or ``None`` when ``path``
    holds no eqx-gn run."""
    try:
        saved = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)):
        return None
    if _MARK not in saved and "resolved" not in saved:
        return None
    return saved


def _json_damage(path: Path) -> str | None:
    """Where the JSON file ``path`` stops being valid JSON (``line L, column C:
    reason``); ``None`` for a valid or unreadable one."""
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    except (OSError, ValueError):
        return None
    return None


#: The settings whose default the run recorded in config.json's ``resolved`` (under
#: this key) and that a later version may change.
_RECORDED_DEFAULTS = {
    "lr": "learning_rate",
    "line_search": "line_search",
    "trust": "trust",
    "ls_batch_size": "ls_batch_size",
}


def _recorded_defaults(
    previous: TrainConfig, recorded: dict[str, Any]
) -> dict[str, Any]:
    """The settings the run left at their default (``None``) whose recorded value
    (config.json's ``resolved``) differs from what the default resolves to now,
    as ``{name: recorded value}``."""
    pinned = {}
    for name, key in _RECORDED_DEFAULTS.items():
        then = recorded.get(key)
        default = getattr(previous, name) is None
        if default and then is not None and then != previous.resolved(name):
            pinned[name] = then
    return pinned


class RunDirectory:
    """The directory of one run; only the primary process writes into it."""

    def __init__(self, out: str, *, primary: bool):
        self.path = Path(out).expanduser().absolute()
        self.primary = primary
        self._lock: int | None = None
        # Whether the run in the directory is to be removed (overwrite).
        self._overwrite = False

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def prepare(self, config: TrainConfig, *, clear: bool = True) -> None:
        """Check the directory against the rules above, then create it, or (with
        ``overwrite``) empty it of the previous run's files (with ``clear=False``,
        left to `clear`)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{setting('out', str(path))} is a file, not a directory")
        if self.primary:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"cannot create {setting('out', str(path))}: {e.strerror}"
                ) from None
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"{setting('out', str(path))} is not writable")
            self._acquire()
        present = [name for name in RUN_FILES if (path / name).exists()]
        if present:
            saved = read_run_config(path)
            damage = _json_damage(path / CONFIG_FILE)
            if damage is not None:
                # A run whose config.json a half-written edit broke: not a foreign
                # directory, and not one to delete unread.
                raise ConfigError(
                    f"{setting('out', str(path))} holds {', '.join(present)}, but its "
                    f"{CONFIG_FILE} "
                    f"is not valid JSON ({damage}); repair {CONFIG_FILE} to resume "
                    "or overwrite the run, remove the run's files yourself, or "
                    "choose another output directory"
                )
            if saved is None:
                raise ConfigError(
                    f"{setting('out', str(path))} holds {', '.join(present)} but is "
                    "not an eqx-gn run; "
                    "choose another output directory"
                )
            if config.resume:
                self._check_same_run(config, saved)
            elif config.overwrite:
                self._overwrite = True
                if clear:
                    self.clear()
            else:
                raise ConfigError(
                    f"{path} already holds a run; pass {setting('resume', True)} to "
                    f"continue it, {setting('overwrite', True)} to start over, or "
                    "choose another output directory"
                )

    def _acquire(self) -> None:
        """Take the run lock, or refuse in one line naming its holder."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{setting('out', str(self.path))} is in use by another eqx-gn run "
                f"({holder}); wait "
                "for it to end or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, process {os.getpid()}".encode())
        self._lock = fd

    def release(self) -> None:
        """Release the run lock (the OS releases it too if the process dies)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check_same_run(self, config: TrainConfig, saved: dict[str, Any]) -> None:
        try:
            previous = TrainConfig.from_dict(saved["config"])
        except (ConfigError, TypeError) as e:
            raise ConfigError(
                f"cannot resume the run in {self.path}: its config.json is not "
                f"usable ({e})"
            ) from None
        # A setting left at its default runs what the default was when the run
        # started (config.json records it): compared as that value, so that a
        # default changed since cannot silently change the run.
        pinned = _recorded_defaults(previous, saved.get("resolved") or {})
        changed = config.differences(previous.replace(**pinned))
        defaults = {
            name: pinned[name]
            for name in changed
            if name in pinned and getattr(config, name) is None
        }
        if changed:
            details = ", ".join(
                f"{setting(name)}: {old!r} -> {new!r}"
                for name, (old, new) in changed.items()
            )
            advice = ""
            if "steps" in changed:
                # The schedule is part of the run: a longer one is another run.
                advice = (
                    f"; {setting('steps')} is the length of the run's learning-rate "
                    "schedule (its warm-up and cosine decay), so a run cannot be "
                    "extended: to train on from its final parameters, start a new "
                    f"run in another output directory with "
                    f"{setting('init_from', str(self.path))}"
                )
            if defaults:
                advice += (
                    "; the defaults changed since the run started: pass "
                    + " ".join(setting(name, old) for name, old in defaults.items())
                    + " to resume it as it ran"
                )
            raise ConfigError(
                f"cannot resume the run in {self.path} with a different "
                f"configuration ({details}){advice}"
            )

    def clear(self) -> None:
        """Remove the files of the run that ``overwrite`` replaces (if any)."""
        if not (self.primary and self._overwrite):
            return
        self._overwrite = False
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    def write_json(self, name: str, value: dict[str, Any] | list[Any]) -> None:
        """Write ``name`` atomically (a temporary file, then a rename)."""
        if self.primary:
            target = self.path / name
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_text(json.dumps(value, indent=2) + "\n")
            tmp.replace(target)

    def write_config(self, config: TrainConfig, resolved: dict[str, Any]) -> None:
        """``config.json``: the settings and what they resolved to."""
        self.write_json(
            CONFIG_FILE, {_MARK: 1, "config": config.to_dict(), "resolved": resolved}
        )

    def open_metrics(self, offset: int, step: int) -> TextIO | None:
        """``metrics.jsonl`` for appending, cut back to ``offset`` bytes (the length
        it had at the checkpoint of ``step``, the one the run continues from);
        ``None`` off the primary process.

        A file shorter than ``offset``, or with a line that is not a record (cut
        mid-line, garbled), keeps its intact records of steps up to ``step``; one
        `MetricsWarning` line names the damage and the steps whose records are
        lost (the resumed run writes the steps after ``step``).
        """
        if not self.primary:
            return None
        target = self.path / METRICS_FILE
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            data = b""
        kept, damage = _intact_records(data[:offset], step)
        if len(data) < offset:
            damage = f"{len(data)} bytes where step {step} had written {offset}"
        if damage is None:
            with open(target, "a") as f:
                f.truncate(offset)
        else:
            tmp = target.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_bytes(b"".join(line for _, line in kept))
            tmp.replace(target)
            steps = {s for s, _ in kept}
            lost = _ranges([s for s in range(1, step + 1) if s not in steps])
            gap = f"the records of steps {lost} are lost" if lost else "none is lost"
            warnings.warn_explicit(
                f"{target} is damaged ({damage}); kept its {len(kept)} intact "
                f"records up to step {step}, {gap}",
                MetricsWarning,
                "eqx_gn.lm",
                0,
                module="eqx_gn.lm.run._run_dir",
            )
        return open(target, "a")


class MetricsWarning(UserWarning):
    """A damaged ``metrics.jsonl`` was repaired on resume (one line: the damage and
    the steps whose records are lost)."""


def _intact_records(
    data: bytes, step: int
) -> tuple[list[tuple[int, bytes]], str | None]:
    """The records of ``data`` (``metrics.jsonl``'s bytes) of steps up to ``step``
    that read back as JSON records, each ``(step, line)``, and what is wrong with
    the others (``None`` if nothing)."""
    kept: list[tuple[int, bytes]] = []
    damage = None
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError
            record = json.loads(line)
            at = record["step"]
            if not (isinstance(at, int) and 1 <= at <= step):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            damage = damage or f"line {number} is not a whole record"
            continue
        kept.append((at, line))
    return kept, damage


def _ranges(steps: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts: list[tuple[int, int]] = []
    for s in steps:
        if parts and parts[-1][1] == s - 1:
            parts[-1] = (parts[-1][0], s)
        else:
            parts.append((s, s))
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in parts)
