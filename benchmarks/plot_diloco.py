"""Loss curves from `tessera bench diloco --json-out` files (benchmarks/diloco_grid.sh).

    python benchmarks/plot_diloco.py OUT.png "TITLE" RESULTS.jsonl...

Each file contributes its DiLoCo curve (labelled by workers, H and codecs) and, if it holds
one, its data-parallel baseline. Needs matplotlib (`pip install matplotlib` in .venv).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(path):
    config, runs, baseline_lr, finished, last_round = {}, {}, None, False, None
    with open(path) as f:
        for line in f:
            event = json.loads(line)
            if event["event"] == "config":
                config = event
            elif event["event"] == "summary" and event["run"] == "baseline":
                baseline_lr = event.get("lr")
            elif event["event"] == "summary":
                finished = True
            elif event["event"] == "eval":
                runs.setdefault(event["run"], []).append((event["tokens"], event["val_loss"]))
                last_round = event.get("round", last_round)
    label = (
        f"DiLoCo M={config.get('workers')} H={config.get('inner_steps')} "
        f"{config.get('codec')} up / {config.get('broadcast_codec')} down, lr {config.get('lr')}"
    )
    if config.get("feedback_decay", 1.0) != 1.0:
        label += f", EF β {config['feedback_decay']:g}, outer lr {config['outer_lr']:g} μ {config['outer_momentum']:g}"
    if runs.get("diloco") and not finished:
        label += f" (stopped after round {last_round} of {config.get('rounds')})"
    out = []
    if runs.get("diloco"):
        out.append((label, runs["diloco"], "-"))
    if runs.get("baseline"):
        out.append((f"data parallel M={config.get('workers')}, lr {baseline_lr}", runs["baseline"], "--"))
    return out


def main():
    out, title, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    fig, ax = plt.subplots(figsize=(8, 5))
    for path in paths:
        for label, points, style in curves(path):
            xs, ys = zip(*points)
            ax.plot([x / 1e6 for x in xs], ys, style, label=label)
    ax.set_xlabel("tokens trained (millions, all workers)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
