#!/usr/bin/env python3
"""Plots attn's Google Benchmark results and prints them as a markdown table.

Reads JSON files written by any bench_* executable with
``--benchmark_out=FILE --benchmark_out_format=json`` and writes two PNGs:

  <prefix>_time.png     time per call against sequence length N, log-log, one line
                        per variant (benchmark family, capture label and every argument
                        but N), with O(N^2) and O(N) guide lines;
  <prefix>_gflops.png   GFLOP/s against N; GEMM roofline rows (names containing
                        "roofline" or "gemm") are drawn dashed, as the reference.

N is read from the "N:<n>" part of each benchmark name; rows without one are
skipped, and so are rows whose name matches --exclude (default: peak-memory
rows, "peak_rss" or "memory", whose time is that of a child process). With repetitions the median is used:
the "median" aggregate when the file has one, else the median of the
repetitions. The table (stdout, or the file given with --table) gives, per
variant and shape, the time, the GFLOP/s and the ratios to the baselines in
the same file at the same shape: the naive path of the same variant
("naive", "reference" or "baseline" in the family name) and the GEMM roofline.

Usage: plot_bench.py FILE.json [FILE.json ...] [--out-dir DIR] [--table FILE] [--prefix NAME]
                     [--exclude REGEX]
"""

import argparse
import json
import math
import re
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

# Name parts that are run options, not arguments of the benchmarked function.
OPTION_PART = re.compile(
    r"^(real_time|process_time|manual_time|(min_time|min_warmup_time|repeats|iterations):.*)$")
ROOFLINE = re.compile(r"roofline|gemm", re.IGNORECASE)
NAIVE = re.compile(r"naive|reference|baseline", re.IGNORECASE)
TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class Row:
    """One benchmark instance (one variant at one shape) of one file, at its median."""

    def __init__(self, source, run_name):
        self.source = source  # stem of the JSON file
        self.run_name = run_name
        parts = [p for p in run_name.split("/") if not OPTION_PART.match(p)]
        self.family = parts[0]
        self.labels = [p for p in parts[1:] if ":" not in p]  # e.g. BENCHMARK_CAPTURE names
        self.args = OrderedDict(p.split(":", 1) for p in parts[1:] if ":" in p)
        self.n = int(self.args["N"]) if self.args.get("N", "").isdigit() else None
        self.seconds = None
        self.gflops = None

    @property
    def variant(self):
        return "/".join([self.family] + self.labels)

    @property
    def shape(self):
        """Every argument but N, e.g. "D:64"."""
        return "/".join(f"{k}:{v}" for k, v in self.args.items() if k != "N")

    @property
    def is_roofline(self):
        return bool(ROOFLINE.search(self.variant))

    @property
    def is_naive(self):
        return bool(NAIVE.search(self.family))

    @property
    def is_baseline(self):
        return self.is_roofline or self.is_naive


def gflops_of(entry):
    """The GFLOP/s counter of a benchmark entry (GFLOPs, GFLOP/s, GFLOP_s), or None.
    A counter named plain "GFLOP" is the work per call, not a rate, and is not used."""
    for key, value in entry.items():
        if re.fullmatch(r"gflop(s|/s|_s)", key, re.IGNORECASE) and isinstance(value, (int, float)):
            return float(value)
    return None


def load(path, exclude):
    """Rows of one JSON file, at their medians, in the file's order, less those whose
    name matches the regular expression `exclude`."""
    with open(path) as f:
        data = json.load(f)
    source = Path(path).stem
    repetitions = OrderedDict()  # run_name -> [iteration entries]
    medians = {}  # run_name -> median aggregate entry
    for entry in data.get("benchmarks", []):
        if entry.get("error_occurred"):
            continue
        run_name = entry.get("run_name", entry["name"])
        if exclude and re.search(exclude, run_name):
            continue
        if entry.get("run_type") == "aggregate":
            if entry.get("aggregate_name") == "median":
                medians[run_name] = entry
                repetitions.setdefault(run_name, [])
            continue
        repetitions.setdefault(run_name, []).append(entry)
    rows = []
    for run_name, entries in repetitions.items():
        row = Row(source, run_name)
        if row.n is None:
            continue
        median = medians.get(run_name)
        if median is not None:
            row.seconds = median["real_time"] * TIME_UNIT_SECONDS[median.get("time_unit", "ns")]
            row.gflops = gflops_of(median)
        else:
            row.seconds = statistics.median(
                e["real_time"] * TIME_UNIT_SECONDS[e.get("time_unit", "ns")] for e in entries)
            rates = [g for g in map(gflops_of, entries) if g is not None]
            row.gflops = statistics.median(rates) if rates else None
        rows.append(row)
    skipped = [name for name in repetitions if Row(source, name).n is None]
    if skipped:
        print(f"plot_bench: {source}: skipped {len(skipped)} rows without N "
              f"(e.g. {skipped[0]})", file=sys.stderr)
    return rows


# ------------------------------------------------------------------- table --

def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def find_baselines(row, rows):
    """The naive row of the same variant and the roofline row, same file and shape."""
    same_shape = [r for r in rows if r is not row and r.source == row.source
                  and r.args == row.args]
    naive = next((r for r in same_shape if r.is_naive and not r.is_roofline
                  and r.labels == row.labels), None)
    roofline = next((r for r in same_shape if r.is_roofline), None)
    return naive, roofline


def table(rows, many_sources):
    """Markdown table: time, GFLOP/s, speed-up over naive, fraction of the roofline."""
    lines = ["| variant | shape | time | GFLOP/s | speed-up vs naive | vs GEMM roofline |",
             "|---|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r.source, r.shape, r.n, r.is_baseline)):
        naive, roofline = find_baselines(row, rows)
        speedup = (f"{naive.seconds / row.seconds:.2f}×"
                   if naive is not None and not row.is_baseline else "")
        if roofline is not None and not row.is_roofline:
            if row.gflops and roofline.gflops:
                of_roof = f"{row.gflops / roofline.gflops:.2f}× (GFLOP/s)"
            else:
                of_roof = f"{roofline.seconds / row.seconds:.2f}× (time)"
        else:
            of_roof = ""
        variant = f"{row.source}: {row.variant}" if many_sources else row.variant
        shape = "/".join(p for p in (f"N:{row.n}", row.shape) if p)
        gflops = f"{row.gflops:.1f}" if row.gflops is not None else ""
        lines.append(f"| {variant} | {shape} | {format_time(row.seconds)} | {gflops} | "
                     f"{speedup} | {of_roof} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- plots --

def series(rows, many_sources):
    """(label, is_roofline, [(n, row)] sorted by n) per variant and shape."""
    groups = OrderedDict()
    for row in rows:
        label = f"{row.variant} {row.shape}".strip()
        if many_sources:
            label = f"{row.source}: {label}"
        groups.setdefault((label, row.is_roofline), []).append(row)
    return [(label, roof, sorted(rs, key=lambda r: r.n)) for (label, roof), rs in groups.items()]


def style(plt, index, roof):
    """The same colour per series in both plots; rooflines black and dashed."""
    if roof:
        return {"color": "black", "linestyle": "--"}
    return {"color": plt.get_cmap("tab10")(index % 10), "linestyle": "-"}


def n_axis(ax, lines):
    """Log2 N axis with plain numbers at the measured N."""
    ax.set_xscale("log", base=2)
    ns = sorted({r.n for _, _, rs in lines for r in rs})
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")


def plot_time(plt, lines, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, roof, rs) in enumerate(lines):
        ax.plot([r.n for r in rs], [r.seconds * 1e3 for r in rs], marker="o", label=label,
                **style(plt, i, roof))
    # Guide lines through the geometric mean of the times at the smallest N:
    # t = t0·(N/N0)^2 and t = t0·(N/N0).
    ns = sorted({r.n for _, _, rs in lines for r in rs})
    n0 = ns[0]
    at_n0 = [r.seconds * 1e3 for _, _, rs in lines for r in rs if r.n == n0]
    t0 = math.exp(sum(map(math.log, at_n0)) / len(at_n0))
    n1 = ns[-1] if ns[-1] > n0 else 2 * n0
    for power, name in ((2, "O(N²)"), (1, "O(N)")):
        ax.plot([n0, n1], [t0, t0 * (n1 / n0) ** power], color="grey", linestyle=":",
                linewidth=1.2)
        ax.annotate(name, (n1, t0 * (n1 / n0) ** power), color="grey", fontsize=9,
                    xytext=(4, 0), textcoords="offset points", va="center")
    n_axis(ax, lines)
    ax.set_yscale("log")
    ax.set_ylabel("time per call (ms, median)")
    ax.set_title("Time against sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gflops(plt, lines, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn = 0
    for i, (label, roof, rs) in enumerate(lines):
        pts = [(r.n, r.gflops) for r in rs if r.gflops is not None]
        if not pts:
            continue
        drawn += 1
        ax.plot([n for n, _ in pts], [g for _, g in pts], marker="o",
                label=label + (" (roofline)" if roof else ""), **style(plt, i, roof))
    if drawn == 0:
        ax.text(0.5, 0.5, "no GFLOP/s counter in these results", ha="center",
                transform=ax.transAxes)
    n_axis(ax, lines)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GFLOP/s (median)")
    ax.set_title("Throughput against sequence length (dashed: GEMM roofline)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="Google Benchmark JSON output files")
    parser.add_argument("--out-dir", default=".", help="where the PNGs go (default: .)")
    parser.add_argument("--table", help="write the markdown table here instead of stdout")
    parser.add_argument("--prefix", help="PNG name prefix (default: the JSON file's name, "
                        "or 'bench' for several files)")
    parser.add_argument("--exclude", default="peak_rss|memory",
                        help="skip benchmarks whose name matches this regular expression "
                        "(default: peak_rss|memory; '' keeps every row)")
    args = parser.parse_args(argv)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot_bench: matplotlib is not installed for {sys.executable} "
              "(Debian: apt-get install python3-matplotlib; then use /usr/bin/python3)",
              file=sys.stderr)
        return 2

    rows = [row for path in args.json for row in load(path, args.exclude)]
    if not rows:
        print("plot_bench: no benchmark with an N:<n> argument in " + ", ".join(args.json),
              file=sys.stderr)
        return 1
    many_sources = len({r.source for r in rows}) > 1
    prefix = args.prefix or (Path(args.json[0]).stem if len(args.json) == 1 else "bench")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = series(rows, many_sources)
    time_png, gflops_png = out_dir / f"{prefix}_time.png", out_dir / f"{prefix}_gflops.png"
    plot_time(plt, lines, time_png)
    plot_gflops(plt, lines, gflops_png)

    text = table(rows, many_sources)
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
        print(f"plot_bench: wrote {args.table}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(f"plot_bench: wrote {time_png} and {gflops_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
