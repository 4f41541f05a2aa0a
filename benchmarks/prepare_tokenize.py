#!/usr/bin/env python3
"""Tokens per second per core: `tessera data prepare` against Hugging Face `tokenizers` from
Python (`Tokenizer.encode_batch`) on the same documents with the same tokenizer, in one run.

The documents are web-like text built from the corpus given (default: tinyshakespeare from
../shared/data): its paragraphs, each made unique by a numbered header so deduplication keeps
them all, written as JSONL. tessera's time is the whole preparation (reading, deduplication,
the split, tokenizing, writing shards and the manifest); Python's is `encode_batch` alone, on
texts already in memory. Both run with 1 thread, then with every core.

    .venv/bin/python benchmarks/prepare_tokenize.py [--mb 64] [--tokenizers gpt2 llama3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus(source: Path, mb: int, out: Path) -> int:
    paragraphs = [p.strip() for p in source.read_text().split("\n\n") if p.strip()]
    docs, size, i = [], 0, 0
    while size < mb << 20:
        # A document: a header and about 2 KB of consecutive paragraphs.
        start = (i * 37) % len(paragraphs)
        body = "\n\n".join(paragraphs[start : start + 12])
        text = f"Page {i}: from paragraph {start}\n\n{body}"
        docs.append(json.dumps({"id": f"doc-{i}", "text": text}))
        size += len(text)
        i += 1
    out.write_text("\n".join(docs) + "\n")
    return i


PY_ENCODE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["text"] for l in open(sys.argv[2])]
best = None
for _ in range(2):
    t = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=False)
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
print(json.dumps({"tokens": sum(len(e.ids) for e in enc), "seconds": best}))
"""


def python_rate(tokenizer: Path, data: Path, threads: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run(
        [sys.executable, "-c", PY_ENCODE, str(tokenizer), str(data)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def tessera_rate(binary: Path, tokenizer: Path, data: Path, threads: int, work: Path) -> dict:
    best = None
    for attempt in range(2):
        out = work / f"out-{threads}-{attempt}"
        t = time.perf_counter()
        subprocess.run(
            [str(binary), "data", "prepare", str(data), "--tokenizer", str(tokenizer), "--out", str(out),
             "--threads", str(threads), "--validation-per-mille", "5"],
            check=True, capture_output=True,
        )
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["stats"]
    # tessera adds one end-of-text token per document; Python's count has none.
    tokens = s["train_tokens"] + s["validation_tokens"] - s["train_documents"] - s["validation_documents"]
    return {"tokens": tokens, "seconds": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="megabytes of text")
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--tokenizers", nargs="+", default=["gpt2", "llama3"])
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/tessera")
    args = ap.parse_args()
    tokdir = Path(subprocess.run([str(ROOT / "scripts/fetch-tokenizers")], check=True, capture_output=True,
                                 text=True).stdout.strip())
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "web.jsonl"
        n = corpus(args.source, args.mb, data)
        print(f"{n} documents, {data.stat().st_size / 2**20:.1f} MiB of JSONL; {cores} cores")
        print(f"{'tokenizer':<9} {'threads':>7} {'python tok/s/core':>18} {'tessera tok/s/core':>19} {'ratio':>6}")
        for name in args.tokenizers:
            tokenizer = tokdir / name / "tokenizer.json"
            for threads in sorted({1, cores}):
                py = python_rate(tokenizer, data, threads)
                ts = tessera_rate(args.binary, tokenizer, data, threads, work)
                if py["tokens"] != ts["tokens"]:
                    print(f"  warning: token counts differ: python {py['tokens']}, tessera {ts['tokens']}")
                py_rate = py["tokens"] / py["seconds"] / threads
                ts_rate = ts["tokens"] / ts["seconds"] / threads
                print(f"{name:<9} {threads:>7} {py_rate:>18,.0f} {ts_rate:>19,.0f} {ts_rate / py_rate:>5.2f}x")


if __name__ == "__main__":
    main()
