"""``eqx-gn curvature RUN_DIR``: the curvature of a saved run at its latest
checkpoint, against the tools called on the checkpoint's arrays and the run's first
validation batch, read back independently."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest

import eqx_gn
from eqx_gn.lm import TrainConfig, Transformer, apply_lm, get_config, train
from eqx_gn.lm.data._pipeline import batch_iterator, inputs_and_targets
from eqx_gn.lm.data._token_cache import cached_splits
from eqx_gn.lm.run._checkpoint import Checkpointer
from helpers import SMALL

# One AdamW step, then one layerwise GN step.
RUN = dict(
    SMALL, steps=2, batch_size=8, warmup_fraction=0.5, blocks="layerwise",
    eval_batch_size=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("curvature")
    config = TrainConfig(**RUN, cache_dir=str(root / "cache"), out=str(root / "run"))
    train(config)
    return root / "run"


def _restored(run_dir):
    """The model of the newest checkpoint, from its raw arrays (not the runner's
    template), and the run's first validation batch, read from its corpus."""
    config = TrainConfig.from_dict(
        json.loads((run_dir / "config.json").read_text())["config"]
    )
    splits = cached_splits(config.text, cache_dir=config.cache_dir)
    model_config = get_config(
        "tiny", vocab_size=splits.tokenizer.vocab_size, seq_len=config.seq_len
    )
    fresh = Transformer(model_config, jax.random.key(1))
    params, static = eqx.partition(fresh, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        arrays = checkpointer.restore_arrays()
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    for saved, leaf in zip(arrays, leaves, strict=False):
        assert saved.shape == leaf.shape and saved.dtype == leaf.dtype
    model = eqx.combine(jax.tree.unflatten(treedef, arrays[: len(leaves)]), static)
    validation = batch_iterator(
        splits.validation, config.eval_batch_size, config.seq_len, seed=0
    )
    return step, model, inputs_and_targets(np.asarray(next(validation)))


def test_curvature_of_a_saved_run(run_dir, tmp_path, capsys):
    from eqx_gn.lm import _cli

    figure = tmp_path / "figs" / "spectrum.png"
    args = ["--probes", 4, "--iterations", 12, "--top", 3, "--seed", 5]
    assert (
        _cli.main(["curvature", str(run_dir), *map(str, args), "--out", str(figure)])
        == 0
    )
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("step 2: ggn of ") and str(figure) in line
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result = json.loads(figure.with_suffix(".json").read_text())
    assert result["step"] == 2 and result["matrix"] == "ggn"

    # The smoothed density is a density: it integrates to 1 on its grid.
    density = result["density"]
    assert np.trapezoid(density["values"], density["grid"]) == pytest.approx(
        1, abs=1e-3
    )
    assert np.asarray(density["weights"]).sum(axis=1) == pytest.approx(1, abs=1e-5)

    # The numbers are the tools' on the checkpoint's parameters and the batch.
    step, model, batch = _restored(run_dir)
    assert step == 2
    loss = eqx_gn.SoftmaxCrossEntropy()
    k_top, k_density, k_trace = jax.random.split(jax.random.key(5), 3)
    pairs = eqx_gn.eigenpairs(
        apply_lm, model, batch, loss=loss, key=k_top, num_iterations=12,
        num_eigenvalues=3,
    )  # fmt: skip
    np.testing.assert_allclose(result["top_eigenvalues"], pairs.eigenvalues, rtol=1e-5)
    assert result["top_eigenvalues"][0] > 0
    slq = eqx_gn.spectral_density(
        apply_lm, model, batch, loss=loss, key=k_density, num_probes=4,
        num_iterations=12,
    )  # fmt: skip
    np.testing.assert_allclose(density["nodes"], slq.nodes, rtol=1e-4, atol=1e-6)
    blocks = eqx_gn.lm.layerwise_blocks(model)
    trace = eqx_gn.trace_estimate(
        apply_lm, model, batch, loss=loss, key=k_trace, num_probes=4, blocks=blocks
    )
    assert result["blocks"] == ["embedding", "block0", "block1", "head"]
    np.testing.assert_allclose(result["block_traces"], trace.block_traces, rtol=1e-5)
    np.testing.assert_allclose(result["trace"], trace.trace, rtol=1e-5)
    # The largest eigenvalue is at most the trace (G is positive semi-definite).
    assert pairs.eigenvalues[0] < result["trace"] + 4 * result["trace_stderr"]

    # The empirical Fisher of the same batch is another matrix.
    assert _cli.main(["curvature", str(run_dir), *map(str, args), "--matrix",
                      "empirical-fisher", "--out", str(tmp_path / "ef.svg")]) == 0  # fmt: skip
    fisher = json.loads((tmp_path / "ef.json").read_text())
    assert fisher["matrix"] == "empirical-fisher"
    assert fisher["top_eigenvalues"][0] != pytest.approx(result["top_eigenvalues"][0])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp, run: tmp / "nowhere", "is not a directory"),
        (lambda tmp, run: tmp, "holds no eqx-gn run"),
        ("copy_config", "has no checkpoint"),
    ],
)
def test_bad_run_directory_is_one_line(run_dir, tmp_path, capsys, make, message):
    from eqx_gn.lm import _cli

    if make == "copy_config":
        path = tmp_path / "copy"
        path.mkdir()
        (path / "config.json").write_text((run_dir / "config.json").read_text())
    else:
        path = make(tmp_path, run_dir)
    with pytest.raises(SystemExit) as info:
        _cli.main(["curvature", str(path)])
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("eqx-gn curvature: error: ") and message in line
