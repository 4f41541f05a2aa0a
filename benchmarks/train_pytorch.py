#!/usr/bin/env python3
"""The same training step as `tessera bench train`, in plain Python PyTorch.

Builds the identical Llama (shapes from `tessera model info PRESET --json`), runs forward,
backward, global-norm clipping and AdamW (decay on matrices only) on the same batch and thread
count, and runs `tessera bench train` for the same settings. The two alternate for `--rounds`
rounds (a shared machine's speed drifts); the ratio reported is median Tessera tokens/s ÷
median PyTorch tokens/s, with the per-round ratios. Each side also reports the peak resident
memory of its process during the timed steps (Linux: VmHWM after resetting it), and on a GPU
its model FLOPs utilisation with bf16 autocast. With `--compile` PyTorch is also timed with
`torch.compile` (its default mode), and Tessera's tokens/s is reported against both.

    .venv/bin/python benchmarks/train_pytorch.py --models nano,micro,small --threads 2
    python benchmarks/train_pytorch.py --device cuda --models micro,small --steps 50
    python benchmarks/train_pytorch.py --device cuda --models phase1 --batch-size 4 --seq-len 2048 --compile
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, h = c["hidden_size"], c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or h
        hd = c.get("head_dim") or d // h
        self.h, self.kv, self.hd = h, kv, hd
        self.embed = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList()
        for _ in range(c["num_hidden_layers"]):
            layer = nn.Module()
            layer.ln1 = nn.Parameter(torch.ones(d))
            layer.ln2 = nn.Parameter(torch.ones(d))
            layer.q = nn.Linear(d, h * hd, bias=False)
            layer.k = nn.Linear(d, kv * hd, bias=False)
            layer.v = nn.Linear(d, kv * hd, bias=False)
            layer.o = nn.Linear(h * hd, d, bias=False)
            layer.gate = nn.Linear(d, c["intermediate_size"], bias=False)
            layer.up = nn.Linear(d, c["intermediate_size"], bias=False)
            layer.down = nn.Linear(c["intermediate_size"], d, bias=False)
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = None if c["tie_word_embeddings"] else nn.Linear(d, c["vocab_size"], bias=False)
        inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(c["max_position_embeddings"]).float(), inv_freq)
        emb = torch.cat([angles, angles], -1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def rope(self, x, t):
        cos, sin = self.cos[:t], self.sin[:t]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def forward(self, idx):
        b, t = idx.shape
        eps = self.c["rms_norm_eps"]
        d = self.c["hidden_size"]
        x = self.embed(idx)
        for L in self.layers:
            n = F.rms_norm(x, (d,), L.ln1, eps)
            q = L.q(n).view(b, t, self.h, self.hd).transpose(1, 2)
            k = L.k(n).view(b, t, self.kv, self.hd).transpose(1, 2)
            v = L.v(n).view(b, t, self.kv, self.hd).transpose(1, 2)
            q, k = self.rope(q, t), self.rope(k, t)
            if self.kv != self.h:
                rep = self.h // self.kv
                k = k[:, :, None].expand(b, self.kv, rep, t, self.hd).reshape(b, self.h, t, self.hd)
                v = v[:, :, None].expand(b, self.kv, rep, t, self.hd).reshape(b, self.h, t, self.hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + L.o(y.transpose(1, 2).contiguous().view(b, t, self.h * self.hd))
            n = F.rms_norm(x, (d,), L.ln2, eps)
            x = x + L.down(F.silu(L.gate(n)) * L.up(n))
        x = F.rms_norm(x, (d,), self.norm, eps)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench_pytorch(config, batch, seq_len, steps, warmup, device, bf16, compiled=False):
    torch.manual_seed(0)
    model = Llama(config).to(device)
    forward = torch.compile(model) if compiled else model
    t = seq_len or config["max_position_embeddings"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), eps=1e-8, fused=device == "cuda",
    )
    data = torch.randint(0, config["vocab_size"], (batch * 4, t + 1), device=device)

    def step(i):
        rows = data[(torch.arange(batch, device=device) + i * batch) % data.shape[0]]
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.item()

    for i in range(warmup):
        step(i)
    before = status_mib("VmRSS:") if reset_peak_rss() else None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = status_mib("VmHWM:") if before is not None else None
    return steps * batch * t / elapsed, (before, peak)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="nano,micro")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    ap.add_argument("--compile", action="store_true", help="also time PyTorch under torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", choices=["bf16", "f32"], help="default: bf16 autocast on cuda, f32 on cpu")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: tessera's table)")
    ap.add_argument("--tessera", default=os.path.join(root, "target", "release", "tessera"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if args.device == "cuda" else "f32")
    bf16 = precision == "bf16"
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.threads} CPU threads"
    seq = f" × {args.seq_len}" if args.seq_len else ""
    print(f"torch {torch.__version__}, {where}, batch {args.batch_size}{seq}, {precision}")
    print(f"{args.rounds} alternating rounds of {args.steps} timed steps each; medians")
    print("peak RSS: the process's peak resident memory during the timed steps; step: that peak less")
    print("its resident memory when they began (what the steps themselves add)")
    print(f"{'model':<8} {'pytorch tok/s':>14} {'tessera tok/s':>14} {'ratio':>7} {'pytorch RSS':>12} "
          f"{'tessera RSS':>12} {'RSS ratio':>9} {'pytorch step':>12} {'tessera step':>12} "
          f"{'pytorch MFU':>11} {'tessera MFU':>11} {'compile tok/s':>13} {'vs compile':>10}  per-round ratios")
    for name in args.models.split(","):
        info = json.loads(subprocess.check_output([args.tessera, "model", "info", name, "--json"]))
        flops_per_token = info["train_flops_per_token"]
        py_runs, rs_runs, py_rss, rs_rss, py_step, rs_step, rs_mfu, co_runs = [], [], [], [], [], [], [], []
        for _ in range(args.rounds):
            tps, rss = bench_pytorch(info["config"], args.batch_size, args.seq_len, args.steps, args.warmup,
                                     args.device, bf16)
            if args.compile:
                co_runs.append(bench_pytorch(info["config"], args.batch_size, args.seq_len, args.steps,
                                             args.warmup, args.device, bf16, compiled=True)[0])
            py_runs.append(tps)
            py_rss.append(rss[1])
            py_step.append(rss[1] - rss[0] if None not in rss else None)
            cmd = [
                args.tessera, "bench", "train", "--models", name, "--json", "--threads", str(args.threads),
                "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--device", args.device, "--precision", precision,
            ]
            if args.seq_len:
                cmd += ["--seq-len", str(args.seq_len)]
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            r = json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])
            rs_runs.append(r["tokens_per_s"])
            flops_per_token = r["gflops"] * 1e9 / r["tokens_per_s"]  # at this sequence length
            rs_rss.append(r.get("peak_rss_mib"))
            before = r.get("rss_before_mib")
            rs_step.append(rs_rss[-1] - before if None not in (before, rs_rss[-1]) else None)
            rs_mfu.append(r.get("mfu"))
        py, rs = statistics.median(py_runs), statistics.median(rs_runs)
        ratios = ", ".join(f"{r / p:.3f}" for r, p in zip(rs_runs, py_runs))
        peak_py = max((x for x in py_rss if x is not None), default=None)
        peak_rs = max((x for x in rs_rss if x is not None), default=None)
        mib = lambda x: "–" if x is None else f"{x:.0f} MiB"
        step_py = max((x for x in py_step if x is not None), default=None)
        step_rs = max((x for x in rs_step if x is not None), default=None)
        rss_ratio = f"{peak_rs / peak_py:.3f}" if peak_py and peak_rs else "–"
        # Tessera's own table gives the peak; the same peak turns PyTorch's tokens/s into MFU.
        mfus = [m for m in rs_mfu if m is not None]
        peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else (
            statistics.median(rs_runs) * flops_per_token / statistics.median(mfus) if mfus else None)
        py_mfu = f"{100 * py * flops_per_token / peak_flops:.1f}%" if peak_flops else "–"
        rs_mfu_s = f"{100 * statistics.median(mfus):.1f}%" if mfus else "–"
        co = statistics.median(co_runs) if co_runs else None
        co_s = f"{co:>13.0f} {rs / co:>10.3f}" if co else f"{'–':>13} {'–':>10}"
        print(f"{name:<8} {py:>14.0f} {rs:>14.0f} {rs / py:>7.3f} {mib(peak_py):>12} {mib(peak_rs):>12} "
              f"{rss_ratio:>9} {mib(step_py):>12} {mib(step_rs):>12} {py_mfu:>11} {rs_mfu_s:>11} {co_s}  {ratios}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
