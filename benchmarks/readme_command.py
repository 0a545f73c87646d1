"""The README's main command, as a newcomer runs it: ``eqx-gn train`` with its
defaults (GN on the bundled text), against ``eqx-gn train --optimizer muon`` with
Muon's defaults, and GN's default fraction bracketed (``--lr`` at the fraction
below and above it).

Each run is the CLI itself in a subprocess (``eqx-gn train [flags] --out DIR``),
so what is measured is what the README's reader gets. Finished runs in
``--runs-dir`` are reused (the script can be stopped and started again); the JSON
holds each run's final validation loss, its steps, the tokens it read (line
search included), its rejected GN steps and its learning rate as resolved. A
reused run is not checked against today's code (a run directory records its
settings, not the code that ran them): after a change, use a new ``--runs-dir``.

    python benchmarks/readme_command.py --runs-dir /tmp/readme_runs
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import jax

from eqx_gn import lm

RESULTS = Path(__file__).parent / "results"


def runs(fraction: float) -> dict[str, list[str]]:
    """The runs: each name's extra flags after ``eqx-gn train``."""
    return {
        "gn_default": [],
        "muon_default": ["--optimizer", "muon"],
        # The default fraction's neighbours, and the fraction 1 (the default
        # before the fraction followed the micro-batch).
        "gn_lr_half_default": ["--lr", repr(fraction / 2)],
        "gn_lr_1": ["--lr", "1.0"],
    }


def record(out: Path) -> dict | None:
    try:
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not summary.get("completed"):
        return None
    return {
        "optimizer": summary["optimizer"],
        "learning_rate": config["resolved"]["learning_rate"],
        "final_val_loss": summary["final_val_loss"],
        "steps": summary["steps"],
        "tokens_read": summary["tokens_read"],
        "rejected_steps": summary.get("rejected_steps"),
        "wall_s": summary["wall_s"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("readme_command_runs"))
    p.add_argument("--out", type=Path, default=RESULTS / "readme_command_tiny.json")
    args = p.parse_args()
    default = lm.TrainConfig(optimizer="gn")
    fraction = default.learning_rate
    result = {
        "what": "the README's main command (eqx-gn train, defaults) against Muon's "
        "defaults and GN's default fraction bracketed "
        "(benchmarks/readme_command.py; issue 34)",
        "default_fraction": fraction,
        "micro_batch_tokens": default.micro_batch_tokens,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}",
        "date": datetime.date.today().isoformat(),
        "runs": {},
    }
    for name, flags in runs(fraction).items():
        out = args.runs_dir / name
        if record(out) is None:
            command = ["eqx-gn", "train", *flags, "--out", str(out)]
            if out.exists():
                command.append("--resume")
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True, stdout=sys.stderr)
        result["runs"][name] = {"flags": flags, **record(out)}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        r = result["runs"][name]
        print(f"{name}: lr {r['learning_rate']:.4g} val {r['final_val_loss']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
