#!/usr/bin/env python3
"""Markdown table of `tessera bench arena --json-out` results, losses against `honest-plain`.

    python benchmarks/arena_table.py RESULTS.jsonl [MORE.jsonl ...]
"""
import json
import sys

rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
ref = next((r["final_val_loss"] for r in rows if r["scenario"] == "honest-plain"), None)


def pct(x):
    return "–" if x is None else f"{100 * x:.2f}%"


def flagged(r, side):
    """What a side's scored submissions were flagged for, e.g. `wrong_data 2 / 225`."""
    if not r["scored"] or f"{side}_flags" not in r:
        return "–"
    flags = ", ".join(f"{k} {v}" for k, v in sorted(r[f"{side}_flags"].items())) or "none"
    return f"{flags} / {r[f'{side}_scored']}"


print("| scenario | aggregation | val loss | vs honest mean | attacker submissions | rejected (reason: count) "
      "| attackers' rewards | every honest above every attacker | honest flagged (of scored) | attackers flagged "
      "| validator cost (fwd windows / train) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    loss = r["final_val_loss"]
    ratio = "–" if ref is None else ("diverged" if loss == float("inf") else f"{loss / ref:.4f}×")
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "–"
    scored = r["scored"]
    ranking = "–" if not scored or r["attackers"] == 0 else ("yes" if r["honest_above_attackers"] else
                                                            f"no (best attacker #{r['best_attacker_rank']}, "
                                                            f"worst honest #{r['worst_honest_rank']})")
    print(f"| {r['scenario']} | {r['aggregation']}{' + scored' if scored else ''} | {loss:.4f} | {ratio} "
          f"| {r['attacker_submissions']} | {rejected} | {pct(r['attacker_reward_fraction']) if scored else '–'} "
          f"| {ranking} | {flagged(r, 'honest')} | {flagged(r, 'attacker')} | {pct(r['validator_flop_fraction'])} |")
