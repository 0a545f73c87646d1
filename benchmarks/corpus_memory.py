"""Peak resident memory of `eqx-gn train --steps 2` on a corpus larger than the
memory it is allowed (issue 21): C4-style gzipped JSON Lines shards of generated
text (the docstrings of stdlib modules, shuffled into documents), byte tokenizer.
The first run tokenizes the corpus into the on-disk cache; the second finds the
cache by its files and reads nothing else. Each run's peak resident set comes
from ``/usr/bin/time``; prints both and writes
``benchmarks/results/corpus_memory.json``.

    python benchmarks/corpus_memory.py [--gigabytes 1.0] [--work /tmp/corpus_memory]
"""

import argparse
import gzip
import inspect
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARDS = 8


def write_corpus(folder: Path, text_bytes: int) -> int:
    """``SHARDS`` gzipped JSON Lines shards of about ``text_bytes`` of text."""
    import argparse as a
    import collections
    import email.message
    import logging
    import tarfile
    import textwrap
    import zipfile

    modules = (a, collections, email.message, logging, tarfile, textwrap, zipfile)
    pieces = [
        doc
        for module in (*modules, shutil)
        for name, member in vars(module).items()
        if not name.startswith("_") and (doc := inspect.getdoc(member))
    ]
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for shard in range(SHARDS):
        path = folder / f"c4-train.{shard:05d}-of-{SHARDS:05d}.json.gz"
        with gzip.open(path, "wt", compresslevel=1) as f:
            while written < text_bytes * (shard + 1) / SHARDS:
                text = "\n\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
                f.write(json.dumps({"text": text, "url": f"doc/{written}"}) + "\n")
                written += len(text.encode())
    return written


def peak_train(corpus: Path, cache: Path, out: Path) -> dict:
    """One `eqx-gn train --steps 2` under /usr/bin/time: its peak RSS and time."""
    peak_file = out.with_suffix(".rss")
    command = [
        "/usr/bin/time", "-f", "%M", "-o", str(peak_file),
        sys.executable, "-m", "eqx_gn.lm._cli", "train",
        "--text", str(corpus / "*.json.gz"), "--steps", "2",
        "--cache-dir", str(cache), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    peak_kib = int(peak_file.read_text().split()[-1])
    return {"peak_rss_gib": peak_kib / 2**20, "wall_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gigabytes", type=float, default=1.0, help="text to generate")
    p.add_argument("--work", default="/tmp/corpus_memory", help="a scratch folder")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    text_bytes = write_corpus(work / "corpus", int(args.gigabytes * 1e9))
    shard_bytes = sum(f.stat().st_size for f in (work / "corpus").iterdir())
    first = peak_train(work / "corpus", work / "cache", work / "run1")
    second = peak_train(work / "corpus", work / "cache", work / "run2")
    cache_bytes = sum(f.stat().st_size for f in (work / "cache").rglob("*.npy"))
    result = {
        "command": "eqx-gn train --text 'CORPUS/*.json.gz' --steps 2 --cache-dir C",
        "text_gb": text_bytes / 1e9,
        "shards_gb": shard_bytes / 1e9,
        "token_cache_gb": cache_bytes / 1e9,
        "first_run_tokenizes": first,
        "second_run_reuses_the_cache": second,
    }
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "corpus_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
