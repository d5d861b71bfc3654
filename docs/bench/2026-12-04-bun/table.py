#!/usr/bin/env python3
"""The markdown table of docs/BENCHMARKS.md's "Side by side with Bun" from a loadtest/ab
output directory (its binaries.txt and <side>-<round>.jsonl): medians of three rounds, each
column's ratio to side a's, then every run's value.  python3 table.py DIR"""
import json, statistics, sys, os

out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
sides = [l.split(" ", 1)[0] for l in open(os.path.join(out, "binaries.txt")).read().splitlines()]
NAMES = {"a": "Bun", "b": "io_uring, 2 shards", "c": "epoll, 2 shards", "d": "io_uring, 1 shard",
         "e": "epoll, 1 shard", "f": "310a268 (epoll, 2)"}
ROWS = [("connect-19.5k", "server_cpu_us_per_conn", "connect 19,500: CPU per connection (us)", 1),
        ("connect-19.5k", "time_to_all_subscribed_s", "connect 19,500: all subscribed (s)", 1),
        ("idle-19.5k", "server_rss_bytes_per_conn", "idle 19,500: RSS per connection (B)", 1),
        ("idle-19.5k", "server_cpu_pct_idle", "idle 19,500: CPU (% of a core)", 1),
        ("fanout-5k-100", "server_cpu_us_per_delivery", "fan-out 5,000 x 100/s: CPU per delivery (us)", 1),
        ("fanout-5k-100", "latency_p99_us", "fan-out 5,000 x 100/s: p99 (ms)", 1000),
        ("fanout-5k-100", "generator_cpu_pct_run", "fan-out 5,000 x 100/s: generator CPU (%)", 1),
        ("fanout-19.5k-5", "server_cpu_us_per_delivery", "fan-out 19,500 x 5/s: CPU per delivery (us)", 1),
        ("fanout-19.5k-5", "latency_p50_us", "fan-out 19,500 x 5/s: p50 (ms)", 1000),
        ("fanout-19.5k-5", "latency_p99_us", "fan-out 19,500 x 5/s: p99 (ms)", 1000),
        ("fanout-19.5k-5", "generator_cpu_pct_run", "fan-out 19,500 x 5/s: generator CPU (%)", 1)]


def load(side):
    rows = {}
    for r in (1, 2, 3):
        path = os.path.join(out, f"{side}-{r}.jsonl")
        if not os.path.exists(path):
            continue
        for line in open(path):
            j = json.loads(line)
            for k, v in j.items():
                if isinstance(v, (int, float)):
                    rows.setdefault((j.get("label"), k), []).append(v)
    return rows


d = {s: load(s) for s in sides}
print("| metric | " + " | ".join(NAMES.get(s, s) for s in sides) + " |")
print("|---|" + "---:|" * len(sides))
for lab, m, title, div in ROWS:
    base = statistics.median(d[sides[0]][(lab, m)])
    cells = []
    for s in sides:
        v = d[s].get((lab, m), [])
        med = statistics.median(v) / div
        txt = f"{med:.3g}" if med < 10 else f"{med:.1f}"
        if s != sides[0]:
            txt += f" ({statistics.median(v) / base:.2f}x)"
        cells.append(txt)
    print(f"| {title} | " + " | ".join(cells) + " |")
print()
for lab, m, title, div in ROWS:
    print("- " + title + ": " + "; ".join(
        NAMES.get(s, s) + " " + ", ".join(f"{x / div:.4g}" for x in d[s][(lab, m)]) for s in sides))
lost = sum(v for s in sides for (lab, m), vs in d[s].items() if m == "lost" for v in vs)
print(f"\nlost, all runs: {lost}")
