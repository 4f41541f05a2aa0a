"""Serving throughput: `tessera serve` against Hugging Face `transformers` generation on the same
checkpoint and machine, for one stream and for N concurrent streams.

    python scripts/bench_serve.py [--model micro] [--streams 16] [--tokens 128] [--device cpu] [--attested]

Both generate exactly --tokens new tokens per stream (greedy; the server with `ignore_eos`,
transformers with min_new_tokens): tokens/s counts generated tokens over wall time, prompt
processing included. transformers runs one stream with its KV cache, and N streams as one padded
batch (`generate` on N prompts at once) — the strongest simple baseline it offers.

With --attested it also measures what attested serving costs, against a plain server on the same
checkpoint in the same run: the server started with --insecure-dev-tee (the software stand-in:
the TEE's own report time is not in it) signs every completion; the time of a report, and the
latency of a one-token completion plain, signed, and sealed both ways (the client seals and opens
with pyhpke, as docs/examples/sealed_openai.py does), median of --latency-requests each; and the
N-stream throughput with signing on.
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


def start_server(ckpt, tmp, args, name, extra=()):
    db = tmp / f"{name}.sqlite"
    key = subprocess.run([BIN, "keys", "create", "bench", "--rpm", "1000000", "--db", str(db)],
                         check=True, capture_output=True, text=True).stdout.strip()
    addr = tmp / f"{name}.addr"
    proc = subprocess.Popen([BIN, "serve", "--checkpoint", str(ckpt), "--db", str(db), "--addr", "127.0.0.1:0",
                             "--addr-file", str(addr), "--slots", str(args.streams), "--device", args.device,
                             "--model-id", "bench", "--rate-per-address", "0",
                             *(["--dtype", args.dtype] if args.dtype else []),
                             *(["--threads", str(args.serve_threads)] if args.serve_threads else []), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if addr.exists() and addr.read_text():
            break
        if proc.poll() is not None:
            sys.exit(proc.stderr.read())
        time.sleep(0.1)
    return proc, f"http://{addr.read_text().strip()}", key


def serve_bench(ckpt, tmp, args, name="plain", extra=()):
    proc, base, key = start_server(ckpt, tmp, args, name, extra)
    try:
        url = f"{base}/v1/completions"

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


def latency_bench(ckpt, tmp, args):
    """Median milliseconds: a report; a one-token completion plain, signed, and sealed both ways."""
    import statistics
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "examples"))
    import blake3
    from sealed_openai import SUITE

    body = json.dumps({"model": "bench", "prompt": "To be", "max_tokens": 1, "temperature": 0,
                       "ignore_eos": True}).encode()

    def timed(fn):
        fn()
        times = []
        for _ in range(args.latency_requests):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def call(base, key, data, headers=None):
        req = urllib.request.Request(f"{base}/v1/completions", data=data, method="POST",
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                                              **(headers or {})})
        with urllib.request.urlopen(req) as r:
            return r.read(), r.headers

    plain_proc, plain, plain_key = start_server(ckpt, tmp, args, "latency-plain")
    tee_proc, tee, tee_key = start_server(ckpt, tmp, args, "latency-tee", ["--insecure-dev-tee"])
    try:
        out = {"plain_ms": timed(lambda: call(plain, plain_key, body))}
        _, headers = call(tee, tee_key, body)
        assert headers.get("x-tessera-response-signature"), "the attested server did not sign"
        out["signed_ms"] = timed(lambda: call(tee, tee_key, body))
        nonce = os.urandom(32).hex()

        def report():
            with urllib.request.urlopen(f"{tee}/v1/attestation/report?nonce={nonce}") as r:
                return json.loads(r.read())
        attestation = report()
        out["report_ms"] = timed(report)
        server_key = SUITE.kem.deserialize_public_key(bytes.fromhex(attestation["sealing_key"]))

        def sealed():
            ours = SUITE.kem.derive_key_pair(os.urandom(32))
            public = ours.public_key.to_public_bytes()
            enc, sender = SUITE.create_sender_context(server_key, info=b"tessera/v1/serve-request")
            wire = enc + sender.seal(body, aad=public)
            raw, _ = call(tee, tee_key, wire, {"x-tessera-seal-to": public.hex(),
                                                "content-type": "application/vnd.tessera.sealed"})
            recipient = SUITE.create_recipient_context(raw[:32], ours.private_key, info=b"tessera/v1/serve-response")
            return json.loads(recipient.open(raw[32:], aad=blake3.blake3(wire).digest() + bytes(8)))
        assert sealed()["usage"]["completion_tokens"] == 1
        out["sealed_ms"] = timed(sealed)
        return out
    finally:
        for p in (plain_proc, tee_proc):
            p.terminate()
            p.wait(timeout=30)


def hf_bench(ckpt, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(ckpt)
    bf16 = args.dtype == "bf16" or (args.dtype is None and device.type == "cuda")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if bf16 else torch.float32).to(device).eval()
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
    ap.add_argument("--dtype", choices=["f32", "bf16"],
                    help="weights and matrix multiplies on both sides (default: f32 on the CPU; on a GPU, bf16 for "
                         "transformers and tessera's default, bf16 products of f32 weights)")
    ap.add_argument("--checkpoint", help="a checkpoint to serve (default: a fresh --model)")
    ap.add_argument("--attested", action="store_true",
                    help="also measure signing, sealing and reports (--insecure-dev-tee) against plain serving")
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--serve-threads", type=int, help="libtorch threads for tessera serve (default: its own)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-serve-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else tmp / "ckpt"
    if not args.checkpoint:
        subprocess.run([BIN, "model", "init", "--model", args.model, "--tokenizer", "byte", "--out", str(ckpt)],
                       check=True, capture_output=True)
    s1, sn = serve_bench(ckpt, tmp, args)
    attested = None
    if args.attested:
        a1, an = serve_bench(ckpt, tmp, args, "attested", ["--insecure-dev-tee"])
        attested = {"serve_1": a1, "serve_n": an, **latency_bench(ckpt, tmp, args)}
        print(f"attested serving (--insecure-dev-tee; no TEE time in it), against plain in the same run:")
        print(f"  1 stream {a1:.1f} tokens/s ({a1 / s1:.2f}× plain), {args.streams} streams {an:.1f} tokens/s "
              f"({an / sn:.2f}× plain)")
        print(f"  one-token completion, median of {args.latency_requests}: plain {attested['plain_ms']:.2f} ms, "
              f"signed {attested['signed_ms']:.2f} ms (+{attested['signed_ms'] - attested['plain_ms']:.2f}), "
              f"sealed both ways {attested['sealed_ms']:.2f} ms (+{attested['sealed_ms'] - attested['plain_ms']:.2f}); "
              f"a report {attested['report_ms']:.2f} ms")
    try:
        import transformers
    except ImportError:
        print(f"tessera serve, {args.model} on {args.device}: 1 stream {s1:.1f} tokens/s, {args.streams} streams "
              f"{sn:.1f} tokens/s; transformers is not installed here, so no baseline")
        return
    import torch
    h1, hn = hf_bench(str(ckpt), args)
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), {args.dtype or 'default'} weights, "
          f"{args.tokens} new tokens per stream, greedy")
    print(f"{'':28} {'tessera serve':>14} {'transformers':>14} {'ratio':>7}")
    print(f"{'1 stream, tokens/s':28} {s1:>14.1f} {h1:>14.1f} {s1 / h1:>6.2f}×")
    print(f"{f'{args.streams} streams, tokens/s (total)':28} {sn:>14.1f} {hn:>14.1f} {sn / hn:>6.2f}×")
    print(f"(transformers {transformers.__version__}, torch {torch.__version__})")
    print(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype, "tokens": args.tokens,
                      "streams": args.streams,
                      "serve_1": s1, "serve_n": sn, "hf_1": h1, "hf_n": hn, "attested": attested}))


if __name__ == "__main__":
    main()
