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
            rows.append((name, data, "DiLoCo", shape, f"{config['codec']} / {config['broadcast_codec']}",
                         f"{config['lr']:g}", f"{d['val_loss']:.4f}", f"{d['data_parallel_bytes'] / moved:.0f}×"))
        if "baseline" in summary:
            b = summary["baseline"]
            rows.append((name, data, "data parallel", f"M={config.get('workers')}", "f32 every step",
                         f"{b['lr']:g}", f"{b['val_loss']:.4f}", "1×"))
    print("| experiment | data | method | shape | codec up / down | lr | final val loss | fewer bytes than DP |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
