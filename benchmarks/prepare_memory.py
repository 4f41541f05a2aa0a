#!/usr/bin/env python3
"""Peak resident memory of `tessera data prepare` against the size of its input: the same kind
of documents (400 random words from a fixed 5,000-word vocabulary, unique), 40 MiB and ten times
that, GPT-2's tokenizer, 2 threads, default shards. Memory must not grow with the input.

    python3 benchmarks/prepare_memory.py [--mb 40] [--times 10]
"""

import argparse
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, mb: int) -> None:
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    size, i = 0, 0
    with path.open("w") as f:
        while size < mb << 20:
            text = " ".join(rng.choice(words) for _ in range(400))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            size += len(text)
            i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--times", type=int, default=10)
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/tessera")
    args = ap.parse_args()
    tokdir = Path(subprocess.run([str(ROOT / "scripts/fetch-tokenizers")], check=True, capture_output=True,
                                 text=True).stdout.strip())
    print(f"{'input':>10} {'tokens':>12} {'shards':>7} {'seconds':>8} {'peak RSS':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (args.mb, args.mb * args.times):
            data = Path(tmp) / f"in-{mb}.jsonl"
            write(data, mb)
            out = Path(tmp) / f"out-{mb}"
            run = subprocess.run(
                ["/usr/bin/time", "-f", "%M %e", str(args.binary), "data", "prepare", str(data), "--tokenizer",
                 str(tokdir / "gpt2/tokenizer.json"), "--out", str(out), "--threads", "2"],
                check=True, capture_output=True, text=True,
            )
            kib, seconds = re.findall(r"^(\d+) ([\d.]+)$", run.stderr, re.M)[-1]
            m = json.loads((out / "manifest.json").read_text())
            tokens = m["stats"]["train_tokens"] + m["stats"]["validation_tokens"]
            print(f"{mb:>7} MiB {tokens:>12,} {len(m['shards']):>7} {float(seconds):>8.1f} {int(kib) / 1024:>7.0f} MiB")
            data.unlink()


if __name__ == "__main__":
    main()
