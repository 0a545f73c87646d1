"""The curvature guide's figure: how the GN spectrum and the layerwise blocks' traces
evolve over a short layerwise GN run of the tiny model, and the GGN against the
empirical Fisher on one batch at its end.

Trains ``tiny`` with layerwise GN (``eqx-gn train --blocks layerwise
--curvature-every``, every other setting as given below) into a run directory, then
runs ``eqx-gn curvature`` on its final checkpoint with ``--matrix ggn`` and
``--matrix empirical-fisher`` (same probes, same batch, same seed). Draws three
panels: the 3 largest eigenvalues and the trace of the full GN matrix against the
step, the blocks' traces against the step, and the two smoothed spectral densities.

Writes ``benchmarks/results/curvature_figure_tiny.json`` (the run's curvature
records, both matrices' numbers but for the density grids, and the commands) and
``docs/assets/curvature_tiny.png``. ``--figure-only`` redraws the figure from the
JSON and the run directory's curvature files.

    python benchmarks/curvature_figure.py                 # about 5 minutes on a CPU
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curvature_figure_tiny.json"
FIGURE = ROOT / "docs" / "assets" / "curvature_tiny.png"
TRAIN = [
    "--model", "tiny", "--blocks", "layerwise", "--steps", "40",
    "--batch-size", "16", "--micro-batches", "4", "--ls-batches", "1",
    "--warmup-fraction", "0.1", "--eval-every", "10", "--eval-batches", "2",
    "--eval-batch-size", "8", "--curvature-every", "4", "--seed", "0",
    "--no-progress",
]  # fmt: skip
CURVATURE = ["--probes", "8", "--iterations", "40", "--top", "5", "--seed", "0"]
MATRICES = ("ggn", "empirical-fisher")


def _eqx_gn(*args: str) -> str:
    command = [sys.executable, "-m", "eqx_gn.lm._cli", *args]
    print("$", " ".join(["eqx-gn", *args]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr)
    return done.stdout


def run(run_dir: Path) -> dict:
    start = time.perf_counter()
    train_out = _eqx_gn("train", *TRAIN, "--out", str(run_dir), "--overwrite")
    train_s = time.perf_counter() - start
    curvature = {}
    for matrix in MATRICES:
        out = run_dir / f"curvature_{matrix}.png"
        line = _eqx_gn(
            "curvature", str(run_dir), *CURVATURE, "--matrix", matrix, "--out", str(out)
        )
        result = json.loads(out.with_suffix(".json").read_text())
        result.pop("density")  # the grid: in the run directory, not the results
        curvature[matrix] = result | {"line": line.strip()}
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    keep = (
        "step", "phase", "val_loss", "curvature_top", "curvature_trace",
        "curvature_trace_stderr", "curvature_blocks", "curvature_block_traces",
        "curvature_block_trace_stderrs",
    )  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "commands": {
            "train": "eqx-gn train " + " ".join(TRAIN) + " --out RUN",
            **{
                m: f"eqx-gn curvature RUN {' '.join(CURVATURE)} --matrix {m}"
                for m in MATRICES
            },
        },
        "train_wall_s": train_s,
        "train_summary_tail": train_out.strip().splitlines()[-3:],
        "records": [
            {k: r[k] for k in keep if k in r} for r in records if "curvature_top" in r
        ],
        "curvature": curvature,
        "run_dir": str(run_dir),
    }


def draw(results: dict, run_dir: Path, figure: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = results["records"]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(12.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    spectrum, blocks, density = fig.subplots(1, 3)
    for i in range(3):
        spectrum.plot(
            steps,
            [r["curvature_top"][i] for r in records],
            color="C0",
            marker="o" if i == 0 else None,
            markersize=3,
            linewidth=1.5 if i == 0 else 0.7,
            alpha=1.0 if i == 0 else 0.5,
            label="eigenvalues 1-3" if i == 0 else None,
        )
    spectrum.plot(steps, [r["curvature_trace"] for r in records], "C1--", label="trace")
    spectrum.set_yscale("log")
    spectrum.set_xlabel("step")
    spectrum.set_title("GN matrix: top eigenvalues and trace", fontsize=9)
    spectrum.legend(fontsize=8)
    for k, name in enumerate(records[0]["curvature_blocks"]):
        blocks.plot(
            steps,
            [r["curvature_block_traces"][k] for r in records],
            color=f"C{k}",
            marker=".",
            label=name,
        )
    blocks.set_yscale("log")
    blocks.set_xlabel("step")
    blocks.set_title("trace of each layerwise block", fontsize=9)
    blocks.legend(fontsize=8)
    for matrix, color in zip(MATRICES, ("C0", "C3"), strict=True):
        data = json.loads((run_dir / f"curvature_{matrix}.json").read_text())
        values = np.asarray(data["density"]["values"])
        top = data["top_eigenvalues"][0]
        density.plot(
            data["density"]["grid"],
            values,
            color=color,
            label=f"{matrix} (top {top:.3g}, trace {data['trace']:.3g})",
        )
    density.set_yscale("log")
    density.set_ylim(bottom=1e-6)
    density.set_xlabel("eigenvalue")
    density.set_title(
        f"spectral density at step {data['step']}, one validation batch", fontsize=9
    )
    density.legend(fontsize=8)
    for ax in (spectrum, blocks, density):
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("tiny model, layerwise GN (eqx-gn train --curvature-every 4)")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="/tmp/curvature_figure_run")
    parser.add_argument("--figure-only", action="store_true")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if args.figure_only:
        results = json.loads(RESULTS.read_text())
    else:
        results = run(run_dir)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    draw(results, run_dir, FIGURE)
    for matrix in MATRICES:
        print(results["curvature"][matrix]["line"])
    print(f"wrote {RESULTS} and {FIGURE}")


if __name__ == "__main__":
    main()
