"""Issue 18's done-when on a text the tests never saw: GN with the adaptive trust
rule (the runner's default) at inner learning rates 0.0025, 0.01 and 0.04 with K = 8
and K = 32 micro-batches, against AdamW at its default learning rate on the same
tokens, ``tiny`` at 128 sequences a step, 40 steps, every other setting at its
default; ``--fixed`` adds the paper's fixed rule at the same points.

Criterion: each adaptive run rejects at most 2 main steps and ends below AdamW's
final validation loss.

Writes ``benchmarks/results/trust_rule_unseen_text_cpu.json`` (each run's settings,
final validation loss, rejections, and its step sizes and trust scales).

    cat /usr/share/vim/vim90/doc/*.txt > /tmp/vimdoc.txt
    python benchmarks/trust_unseen_text.py /tmp/vimdoc.txt --fixed
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import jax

from eqx_gn import lm

RESULTS = Path(__file__).parent / "results"
LEARNING_RATES = (0.0025, 0.01, 0.04)
MICRO_BATCHES = (8, 32)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text", help="a UTF-8 text file the tests never saw")
    p.add_argument("--fixed", action="store_true", help="also the fixed rule")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--out", type=Path, default=RESULTS / "trust_rule_unseen_text_cpu.json"
    )
    return p.parse_args()


def run(root: Path, name: str, **settings) -> dict:
    config = lm.TrainConfig(
        model="tiny",
        out=str(root / name),
        checkpoint_every=0,
        overwrite=True,
        progress=False,
        **settings,
    )
    try:
        summary = lm.train(config)
    except lm.Diverged:  # the summary is written, with diverged_at
        summary = json.loads((Path(config.out) / "summary.json").read_text())
    lines = (Path(config.out) / "metrics.jsonl").read_text().splitlines()
    main = [r for r in map(json.loads, lines) if r["phase"] == "main"]
    out = {
        "optimizer": config.optimizer,
        "micro_batches": config.micro_batches,
        "lr": config.learning_rate,
        "trust": config.trust_rule,
        "line_search": config.line_search_rule,
        "final_val_loss": summary["final_val_loss"],
        "main_steps": len(main),
        "rejected_steps": sum(bool(r.get("rejected")) for r in main),
        "trust_scale": [r.get("trust_scale") for r in main] if config.is_gn else None,
        "step_size": [r.get("step_size") for r in main] if config.is_gn else None,
        "tokens": main[-1]["tokens"],
        "ls_tokens": summary.get("ls_tokens", 0),
    }
    print(
        f"{name}: final val {out['final_val_loss']:.4f}, "
        f"{out['rejected_steps']} rejected",
        flush=True,
    )
    return out


def main():
    args = parse()
    root = Path(tempfile.mkdtemp(prefix="trust_unseen_"))
    common = dict(text=args.text, batch_size=args.batch_size, steps=args.steps)
    runs = {"adamw": run(root, "adamw", optimizer="adamw", **common)}
    rules = ("adaptive", "fixed") if args.fixed else ("adaptive",)
    for rule in rules:
        for k in MICRO_BATCHES:
            for lr in LEARNING_RATES:
                name = f"gn{'' if rule == 'adaptive' else '-fixed'}-K{k}-lr{lr:g}"
                runs[name] = run(
                    root,
                    name,
                    optimizer="gn",
                    micro_batches=k,
                    lr=lr,
                    trust=rule,
                    **common,
                )
    adamw = runs["adamw"]["final_val_loss"]
    adaptive = {n: r for n, r in runs.items() if r["trust"] == "adaptive"}
    passed = all(
        r["rejected_steps"] <= 2 and r["final_val_loss"] < adamw
        for r in adaptive.values()
    )
    result = {
        "what": f"issue 18 done-when: tiny at {args.batch_size} sequences, "
        f"{args.steps} steps, defaults apart from --lr, on a text the tests never "
        f"saw ({args.text}, byte tokenizer)",
        "command": "python benchmarks/trust_unseen_text.py TEXT"
        + (" --fixed" if args.fixed else ""),
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}",
        "criterion": "adaptive: at most 2 rejected main steps and final validation "
        "loss below AdamW's at each inner lr 0.0025, 0.01, 0.04, at K = 8 and 32",
        "passed": passed,
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"criterion {'met' if passed else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
