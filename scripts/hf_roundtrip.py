#!/usr/bin/env python3
"""Proves Tessera checkpoints and Hugging Face `transformers` agree, both ways.

1. Tessera → transformers: `tessera model init` writes a random tiny model (grouped-query
   attention, untied head) with its byte-level tokenizer; `AutoModelForCausalLM` and
   `AutoTokenizer` load the directory as is; tokens and logits must match Tessera's.
2. transformers → Tessera: a random `LlamaForCausalLM` (tied and untied) is saved with
   `save_pretrained`; Tessera loads it and its logits must match.

Every comparison requires max |Δlogits| ≤ 1e-4. Run with `scripts/hf-roundtrip`, which installs
transformers into the project venv first.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESSERA = os.environ.get("TESSERA_BIN", os.path.join(ROOT, "target", "release", "tessera"))
TOLERANCE = 1e-4
TEXT = "Many hands, one model: Ünï ✓"  # 32 bytes: the tiny context


def tessera(*args):
    return subprocess.check_output([TESSERA, *args], text=True)


def tessera_logits(ckpt, text):
    out = json.loads(tessera("model", "logits", "--checkpoint", ckpt, "--text", text))
    return out["tokens"], torch.tensor(out["logits"], dtype=torch.float32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


RESULTS = []


def check(name, a, b):
    diff = (a - b).abs().max().item()
    status = "ok" if diff <= TOLERANCE else "FAIL"
    print(f"{status:>4}  {name}: max |Δlogits| = {diff:.3e}")
    RESULTS.append(diff <= TOLERANCE)
    return diff <= TOLERANCE


def main():
    ok = True
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Tessera writes, transformers reads.
        ours = os.path.join(tmp, "tessera-tiny")
        tessera("model", "init", "--model", "tiny", "--seed", "3", "--out", ours)
        tok = AutoTokenizer.from_pretrained(ours)
        model = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
        model.eval()
        tokens, logits = tessera_logits(ours, TEXT)
        hf_tokens = tok(TEXT)["input_ids"]
        same = hf_tokens == tokens and tok.decode(tokens) == TEXT
        if not same:
            print(f"FAIL  tokenizer: transformers {hf_tokens[:12]}… vs tessera {tokens[:12]}…")
        else:
            print(f"  ok  tokenizer: {len(tokens)} identical tokens, decode round-trips")
        RESULTS.append(same)
        ok &= same
        ok &= check("tessera → transformers (GQA, untied)", logits, hf_logits(model, tokens))

        # 1b. A grown checkpoint (wider, more heads, deeper) is an ordinary Llama to transformers,
        #     and computes what the model it grew from did.
        with open(os.path.join(ours, "config.json")) as f:
            target = json.load(f)
        target.update(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=3)
        target_path = os.path.join(tmp, "target.json")
        with open(target_path, "w") as f:
            json.dump(target, f)
        grown_dir = os.path.join(tmp, "tessera-grown")
        tessera("grow", "--checkpoint", ours, "--to", target_path, "--out", grown_dir, "--seed", "5")
        grown = AutoModelForCausalLM.from_pretrained(grown_dir, dtype=torch.float32).eval()
        g_tokens, g_logits = tessera_logits(grown_dir, TEXT)
        ok &= check("grown: tessera → transformers", g_logits, hf_logits(grown, g_tokens))
        ok &= check("grown: same function as before growing", hf_logits(model, tokens), hf_logits(grown, g_tokens))

        # 2. transformers writes, Tessera reads.
        for tied in (False, True):
            config = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2 if not tied else 6, max_position_embeddings=64, rope_theta=5000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=tied, eos_token_id=tok.eos_token_id,
            )
            hf = LlamaForCausalLM(config).eval()
            with torch.no_grad():  # non-trivial norm gains, so the norms are exercised
                for name, p in hf.named_parameters():
                    if name.endswith("norm.weight"):
                        p.uniform_(0.5, 1.5)
            theirs = os.path.join(tmp, f"hf-{'tied' if tied else 'untied'}")
            hf.save_pretrained(theirs, safe_serialization=True)
            tok.save_pretrained(theirs)
            tokens, logits = tessera_logits(theirs, TEXT)
            ok &= check(f"transformers → tessera ({'tied' if tied else 'GQA, untied'})", logits, hf_logits(hf, tokens))
    print("round trip passed" if ok else "round trip FAILED")
    print(f"roundtrip: {sum(RESULTS)} passed, {len(RESULTS) - sum(RESULTS)} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
