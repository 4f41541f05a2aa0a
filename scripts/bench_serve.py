"""Serving throughput: `tessera serve` against Hugging Face `transformers` generation on the same
checkpoint and machine, for one stream and for N concurrent streams.

    python scripts/bench_serve.py [--model micro] [--streams 16] [--tokens 128] [--device cpu]

Both generate exactly --tokens new tokens per stream (greedy; the server with `ignore_eos`,
transformers with min_new_tokens): tokens/s counts generated tokens over wall time, prompt
processing included. transformers runs one stream with its KV cache, and N streams as one padded
batch (`generate` on N prompts at once) — the strongest simple baseline it offers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BIN = os.environ.get("TESSERA_BIN", "target/release/tessera")
PROMPTS = ["To be, or not to be", "The hub merged", "Once upon a time", "First Citizen:",
           "A quick brown fox", "Tokens per second", "Hello there", "In the beginning"]


def post(url, key, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def serve_bench(ckpt, tmp, args):
    db = tmp / "serve.sqlite"
    key = subprocess.run([BIN, "keys", "create", "bench", "--rpm", "1000000", "--db", str(db)],
                         check=True, capture_output=True, text=True).stdout.strip()
    addr = tmp / "addr"
    proc = subprocess.Popen([BIN, "serve", "--checkpoint", str(ckpt), "--db", str(db), "--addr", "127.0.0.1:0",
                             "--addr-file", str(addr), "--slots", str(args.streams), "--device", args.device,
                             "--model-id", "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if addr.exists() and addr.read_text():
                break
            if proc.poll() is not None:
                sys.exit(proc.stderr.read())
            time.sleep(0.1)
        url = f"http://{addr.read_text().strip()}/v1/completions"

        def one(i):
            out = post(url, key, {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens,
                                  "temperature": 0, "ignore_eos": True})
            assert out["usage"]["completion_tokens"] == args.tokens, out["usage"]

        one(0)  # warm up
        t = time.perf_counter()
        for i in range(args.repeats):
            one(i)
        single = args.repeats * args.tokens / (time.perf_counter() - t)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        multi = args.streams * args.tokens / (time.perf_counter() - t)
        return single, multi
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def hf_bench(ckpt, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"

    def gen(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == args.tokens
        if device.type == "cuda":
            torch.cuda.synchronize()

    gen([PROMPTS[0]])
    t = time.perf_counter()
    for i in range(args.repeats):
        gen([PROMPTS[i % len(PROMPTS)]])
    single = args.repeats * args.tokens / (time.perf_counter() - t)
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(args.streams)]
    gen(batch)
    t = time.perf_counter()
    gen(batch)
    multi = args.streams * args.tokens / (time.perf_counter() - t)
    return single, multi


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="micro")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", help="a checkpoint to serve (default: a fresh --model)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-serve-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else tmp / "ckpt"
    if not args.checkpoint:
        subprocess.run([BIN, "model", "init", "--model", args.model, "--tokenizer", "byte", "--out", str(ckpt)],
                       check=True, capture_output=True)
    s1, sn = serve_bench(ckpt, tmp, args)
    try:
        import transformers
    except ImportError:
        print(f"tessera serve, {args.model} on {args.device}: 1 stream {s1:.1f} tokens/s, {args.streams} streams "
              f"{sn:.1f} tokens/s; transformers is not installed here, so no baseline")
        return
    import torch
    h1, hn = hf_bench(str(ckpt), args)
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), {args.tokens} new tokens per stream, greedy")
    print(f"{'':28} {'tessera serve':>14} {'transformers':>14} {'ratio':>7}")
    print(f"{'1 stream, tokens/s':28} {s1:>14.1f} {h1:>14.1f} {s1 / h1:>6.2f}×")
    print(f"{f'{args.streams} streams, tokens/s (total)':28} {sn:>14.1f} {hn:>14.1f} {sn / hn:>6.2f}×")
    print(f"(transformers {transformers.__version__}, torch {torch.__version__})")
    print(json.dumps({"model": args.model, "device": args.device, "tokens": args.tokens, "streams": args.streams,
                      "serve_1": s1, "serve_n": sn, "hf_1": h1, "hf_n": hn}))


if __name__ == "__main__":
    main()
