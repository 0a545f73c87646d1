r"""``eqx-gn curvature RUN_DIR``: the curvature of a saved run at its latest checkpoint.

`run_curvature` reads the run's ``config.json``, tokenizes its corpus as the run did
(or reads the tokens from the run's cache), restores the parameters of the newest
checkpoint (verified against its recorded digests, as ``--resume`` reads it; a
damaged checkpoint is an error, nothing is moved) and, on the first of the run's
fixed validation batches (the batch ``--curvature-every`` records on), computes with
one PRNG key per tool, split from ``seed`` in this order:

- the largest eigenvalues of the curvature matrix ([`eqx_gn.eigenpairs`][]);
- its spectral density by stochastic Lanczos quadrature
  ([`eqx_gn.spectral_density`][]), smoothed by a Gaussian of width ``sigma`` =
  1/200 of the nodes' range on a grid of 1000 points;
- its trace ([`eqx_gn.trace_estimate`][]), per layerwise block for a run whose GN
  used ``--blocks layerwise`` (the blocks' order of
  [`layerwise_blocks`][eqx_gn.lm.layerwise_blocks]).

The matrix is the full one (not block-diagonal), the GGN by default, or the
empirical or Monte Carlo Fisher. It writes a figure (the density, log scale, with
the top eigenvalues marked) and a JSON file of the numbers beside it.
"""

import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import eigenpairs, spectral_density, trace_estimate
from ._errors import ConfigError, setting
from ._model import count_params, layerwise_blocks
from .data._pipeline import inputs_and_targets
from .run._checkpoint import Checkpointer, CheckpointError
from .run._checks import check_choice, check_integer
from .run._config import TrainConfig
from .run._phase_optimizers import LM_LOSS
from .run._run_dir import CHECKPOINTS, read_run_config

#: ``--matrix`` choices and the ``curvature`` argument of the tools they name.
MATRICES = {
    "ggn": "ggn",
    "empirical-fisher": "empirical_fisher",
    "mc-fisher": "mc_fisher",
}
#: Figure formats, by file suffix.
FORMATS = (".png", ".pdf", ".svg")
#: Points of the smoothed density's grid, and its width as a fraction of the range.
GRID_POINTS, SIGMA_FRACTION = 1000, 1 / 200


def _restored_run(path: Path):
    """``(training, step)``: the run's data loaded and its model restored from the
    newest checkpoint, on this process's devices (the saved mesh is not needed)."""
    from .run._train import _Training

    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    saved = read_run_config(path)
    if saved is None:
        raise ConfigError(f"{path} holds no eqx-gn run (no readable config.json)")
    config = TrainConfig.from_dict(saved["config"]).replace(
        out=str(path),
        resume=False,
        overwrite=False,
        progress=False,
        data_parallel=None,
        fsdp=1,
        distributed=False,
        init_from=None,  # the run's own checkpoint has its parameters
    )
    if not (path / CHECKPOINTS).is_dir():
        raise ConfigError(f"the run in {path} has no checkpoint")
    training = _Training(config)
    training._load_data()
    digest = (saved.get("resolved") or {}).get("corpus_hash")
    if digest is not None and digest != training.splits.corpus_hash:
        raise ConfigError(
            f"the corpus of the run in {path} changed since it was trained (digest "
            f"{digest[:12]} -> {training.splits.corpus_hash[:12]})"
        )
    training._init_model()
    checkpointer = Checkpointer(path / CHECKPOINTS, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"the run in {path} has no checkpoint")
        meta = checkpointer.restore_meta(step)
        template = training._template(meta)
        params, _, _ = checkpointer.restore(step, template, {})
    finally:
        checkpointer.close()
    training.model = eqx.combine(params, training.static)
    return training, step


def run_curvature(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    probes: int = 8,
    iterations: int = 40,
    top: int = 5,
    matrix: str = "ggn",
    seed: int = 0,
) -> dict[str, Any]:
    """Compute, draw and write the curvature of the run in ``run_dir`` (see the
    module docstring); returns what the JSON file holds. ``out`` is the figure's
    path (default ``run_dir/curvature.png``); the JSON goes beside it with the
    suffix ``.json``. Raises `ConfigError` (one line) for a directory that holds no
    run or no checkpoint, and for bad settings."""
    check_choice("matrix", matrix, tuple(MATRICES))
    check_integer("probes", probes, 2)
    check_integer("iterations", iterations)
    check_integer("top", top)
    if top > iterations:
        raise ConfigError(
            f"{setting('top', top)} must be at most {setting('iterations', iterations)}"
        )
    path = Path(run_dir).expanduser().absolute()
    figure = path / "curvature.png" if out is None else Path(out).expanduser()
    if figure.suffix not in FORMATS:
        raise ConfigError(
            f"figure {figure}: its suffix must be one of {', '.join(FORMATS)}"
        )
    try:
        training, step = _restored_run(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    config = training.config
    model = training.model
    batch = inputs_and_targets(training.eval_batches[0])
    blocks = (
        layerwise_blocks(model)
        if config.is_gn and config.gn.blocks == "layerwise"
        else None
    )
    key_top, key_density, key_trace = jax.random.split(jax.random.key(seed), 3)
    common = dict(loss=LM_LOSS, curvature=MATRICES[matrix])
    pairs = eigenpairs(
        training.apply,
        model,
        batch,
        key=key_top,
        num_iterations=iterations,
        num_eigenvalues=top,
        **common,
    )
    density = spectral_density(
        training.apply,
        model,
        batch,
        key=key_density,
        num_probes=probes,
        num_iterations=iterations,
        **common,
    )
    trace = trace_estimate(
        training.apply,
        model,
        batch,
        key=key_trace,
        num_probes=probes,
        blocks=blocks,
        **common,
    )
    nodes = np.asarray(density.nodes, np.float64)
    low, high = float(nodes.min()), float(nodes.max())
    sigma = max(high - low, 1e-12) * SIGMA_FRACTION
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, GRID_POINTS)
    smoothed = density.density(jnp.asarray(grid, density.nodes.dtype), sigma)
    result: dict[str, Any] = {
        "run": str(path),
        "step": step,
        "matrix": matrix,
        "num_params": count_params(model),
        "batch_shape": list(training.eval_batches[0].shape),
        "seed": seed,
        "probes": probes,
        "iterations": iterations,
        "top_eigenvalues": _floats(pairs.eigenvalues),
        "top_residual_norms": _floats(pairs.residual_norms),
        "trace": float(trace.trace),
        "trace_stderr": float(trace.trace_stderr),
        "density": {
            "sigma": sigma,
            "grid": _floats(grid),
            "values": _floats(smoothed),
            "nodes": np.asarray(density.nodes).tolist(),
            "weights": np.asarray(density.weights).tolist(),
        },
    }
    if blocks is not None:
        result["blocks"] = list(blocks.names)
        result["block_traces"] = _floats(trace.block_traces)
        result["block_trace_stderrs"] = _floats(trace.block_trace_stderrs)
    figure.parent.mkdir(parents=True, exist_ok=True)
    draw_density(result, config.label).savefig(figure, dpi=150)
    numbers = figure.with_suffix(".json")
    numbers.write_text(json.dumps(result, indent=1) + "\n")
    result["figure"], result["json"] = str(figure), str(numbers)
    return result


def _floats(values) -> list[float]:
    return [float(x) for x in np.asarray(values).ravel()]


def draw_density(result: dict[str, Any], label: str):
    """The `matplotlib.figure.Figure` of a `run_curvature` result: the smoothed
    spectral density (log y axis) with the top eigenvalues as dotted lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    density = result["density"]
    values = np.asarray(density["values"])
    ax.plot(density["grid"], values, color="C0", label="SLQ density")
    for i, value in enumerate(result["top_eigenvalues"]):
        ax.axvline(
            value,
            color="C3",
            linestyle=":",
            linewidth=0.8,
            label="top eigenvalues (Lanczos)" if i == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_ylim(max(values.max() * 1e-8, values[values > 0].min()), values.max() * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(
        f"{label}, step {result['step']}: {result['matrix']} on one validation "
        f"batch, trace {result['trace']:.4g} ± {result['trace_stderr']:.2g}",
        fontsize=9,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def summary_line(result: dict[str, Any]) -> str:
    """One line: step, matrix, top eigenvalues, trace, where the files went."""
    top = ", ".join(f"{x:.4g}" for x in result["top_eigenvalues"])
    return (
        f"step {result['step']}: {result['matrix']} of {result['num_params']:,} "
        f"parameters, top eigenvalues {top}; trace {result['trace']:.4g} ± "
        f"{result['trace_stderr']:.2g}; {result['figure']}, {result['json']}"
    )
