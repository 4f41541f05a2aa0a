"""Markdown table of DiLoCo experiment results (benchmarks/results/*.jsonl).

    python benchmarks/grid_table.py benchmarks/results/*.jsonl
"""

import json
import sys


def main():
    rows = []
    for path in sys.argv[1:]:
        config, summary = {}, {}
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                if e["event"] == "config":
                    config = e
                elif e["event"] == "summary":
                    summary[e["run"]] = e
        name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
        data = "tinyshakespeare" if "shakespeare" in config.get("data", "") or name.startswith("shk") else "embedded"
        shape = f"M={config.get('workers')} H={config.get('inner_steps')} × {config.get('rounds')}"
        if "diloco" in summary:
            d = summary["diloco"]
            moved = d["bytes_up"] + d["bytes_down"]
            outer = f"{config['outer_lr']:.2g} / {config['outer_momentum']:.2g}"
            # Each message against the f32 values alone (4 bytes a parameter, no header).
            workers, rounds, h = config["workers"], config["rounds"], config["inner_steps"]
            params = d["data_parallel_bytes"] / (rounds * h * workers * 8)
            per_message = d["bytes_up"] / (rounds * workers)
            up = f"{4 * params / per_message:.1f}×"
            beta = f"{config.get('feedback_decay', 1.0):g}"
            rows.append((name, data, "DiLoCo", shape, f"{config['codec']} / {config['broadcast_codec']}",
                         f"{config['lr']:g}", outer, beta, f"{d['val_loss']:.4f}", up,
                         f"{d['data_parallel_bytes'] / moved:.0f}×"))
        if "baseline" in summary:
            b = summary["baseline"]
            rows.append((name, data, "data parallel", f"M={config.get('workers')}", "f32 every step",
                         f"{b['lr']:g}", "–", "–", f"{b['val_loss']:.4f}", "–", "1×"))
    print("| experiment | data | method | shape | codec up / down | lr | outer lr / μ | EF β | final val loss | message vs f32 | fewer bytes than DP |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
