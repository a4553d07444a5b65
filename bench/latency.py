#!/usr/bin/env python3
"""Latency figures and a latency-over-time plot from `ab -g` files.

    python3 bench/latency.py OUT.png TITLE NAME=FILE.tsv [NAME=FILE.tsv ...]

Prints one line per run, "NAME p50_ms p99_ms p999_ms requests", and draws,
for every run, the 50th and 99th percentile latency of each second of the
run into OUT.png with matplotlib.
"""

import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    """(start second, total milliseconds) of every request in an ab -g file."""
    rows = []
    with open(path) as file:
        next(file)  # the header
        for line in file:
            fields = line.rstrip("\n").split("\t")
            # starttime, seconds, ctime, dtime, ttime, wait
            rows.append((int(fields[1]), float(fields[4])))
    return rows


def percentile(values, fraction):
    """The value below which `fraction` of the sorted `values` fall."""
    index = min(len(values) - 1, max(0, int(round(fraction * len(values))) - 1))
    return values[index]


def main():
    out, title = sys.argv[1], sys.argv[2]
    runs = [arg.split("=", 1) for arg in sys.argv[3:]]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    for name, path in runs:
        rows = read(path)
        latencies = sorted(ms for _, ms in rows)
        print(
            name,
            f"{percentile(latencies, 0.50):.1f}",
            f"{percentile(latencies, 0.99):.1f}",
            f"{percentile(latencies, 0.999):.1f}",
            len(latencies),
        )
        by_second = defaultdict(list)
        start = min(second for second, _ in rows)
        for second, ms in rows:
            by_second[second - start].append(ms)
        seconds = sorted(by_second)
        for fraction, style in ((0.50, "-"), (0.99, ":")):
            values = [percentile(sorted(by_second[s]), fraction) for s in seconds]
            axes.plot(seconds, values, style, label=f"{name} p{int(fraction * 100)}")
    axes.set_xlabel("seconds into the run")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
