#!/usr/bin/env python3
"""Plots attn's Google Benchmark results and prints them as a markdown table.

Reads JSON files written by any bench_* executable with
``--benchmark_out=FILE --benchmark_out_format=json`` and writes two PNGs:

  <prefix>_time.png     time per call against sequence length N, log-log, one line
                        per variant (benchmark family, capture label and every argument
                        but N), with O(N^2) and O(N) guide lines;
  <prefix>_gflops.png   GFLOP/s against N; GEMM roofline rows (names containing
                        "roofline" or "gemm") are drawn black and dashed, and the
                        `roofline/gemm` probe rows (no N) as one horizontal line.

With several files (scripts/main.sh passes one per binary) each figure has one panel
per file, with its own guides, roofline probe and legend. Lines cycle through 10 colours, then change marker and line style, so series stay
distinguishable past ten. N is read from the "N:<n>" part of each benchmark name;
rows without one are left out of the plots (but kept in the table), and so are rows
whose name matches --exclude (default: peak-memory rows, "peak_rss" or "memory",
whose time is that of a child process). With repetitions the median is used: the
"median" aggregate when the file has one, else the median of the repetitions.

The table (stdout, or the file given with --table) gives per variant and shape the
time, GFLOP/s and the counters the benchmarks emit themselves: roofline_frac (row
GFLOP/s over the run's GEMM roofline probe) and x_baseline (the baseline's time
over this row's, same shape, same run). Rows the benchmarks skipped over their
sweep limits (error_occurred) are listed under the table with their note.

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
        self.roofline_frac = None  # counters the benchmark emitted, at their median
        self.x_baseline = None

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


def gflops_of(entry):
    """The GFLOP/s counter of a benchmark entry (GFLOPs, GFLOP/s, GFLOP_s), or None.
    A counter named plain "GFLOP" is the work per call, not a rate, and is not used."""
    for key, value in entry.items():
        if re.fullmatch(r"gflop(s|/s|_s)", key, re.IGNORECASE) and isinstance(value, (int, float)):
            return float(value)
    return None


def counter_of(entry, name):
    """A numeric counter of a benchmark entry, or None when the row has none."""
    value = entry.get(name)
    return float(value) if isinstance(value, (int, float)) else None


def median_of(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load(path, exclude):
    """(rows, notes) of one JSON file: the rows at their medians, in the file's order,
    less those whose name matches the regular expression `exclude`; the notes of the
    rows skipped with an error, as (run_name, message), each once."""
    with open(path) as f:
        data = json.load(f)
    source = Path(path).stem
    repetitions = OrderedDict()  # run_name -> [iteration entries]
    medians = {}  # run_name -> median aggregate entry
    notes = OrderedDict()  # run_name -> error message
    for entry in data.get("benchmarks", []):
        run_name = entry.get("run_name", entry["name"])
        if exclude and re.search(exclude, run_name):
            continue
        if entry.get("error_occurred"):
            notes.setdefault(run_name, entry.get("error_message", ""))
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
        median = medians.get(run_name)
        if median is not None:
            row.seconds = median["real_time"] * TIME_UNIT_SECONDS[median.get("time_unit", "ns")]
            row.gflops = gflops_of(median)
            row.roofline_frac = counter_of(median, "roofline_frac")
            row.x_baseline = counter_of(median, "x_baseline")
        elif entries:
            row.seconds = statistics.median(
                e["real_time"] * TIME_UNIT_SECONDS[e.get("time_unit", "ns")] for e in entries)
            row.gflops = median_of(map(gflops_of, entries))
            row.roofline_frac = median_of(counter_of(e, "roofline_frac") for e in entries)
            row.x_baseline = median_of(counter_of(e, "x_baseline") for e in entries)
        else:
            continue
        rows.append(row)
    return rows, [(name, message) for name, message in notes.items() if name not in repetitions]


# ------------------------------------------------------------------- table --

def format_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(rows, notes, many_sources):
    """Markdown table: time, GFLOP/s, fraction of the GEMM roofline and ratio to the
    baseline as the benchmarks emitted them; then the rows that were not run."""
    lines = ["| variant | shape | time | GFLOP/s | fraction of roofline | ratio to baseline |",
             "|---|---|---:|---:|---:|---:|"]
    order = {id(row): i for i, row in enumerate(rows)}
    # Per file, shape and N, in the file's order (the probe first, baselines before the
    # rows that compare with them).
    for row in sorted(rows, key=lambda r: (r.source, r.shape, r.n or 0, order[id(r)])):
        variant = f"{row.source}: {row.variant}" if many_sources else row.variant
        shape = "/".join(p for p in (f"N:{row.n}" if row.n else "", row.shape) if p)
        gflops = f"{row.gflops:.1f}" if row.gflops is not None else ""
        frac = f"{row.roofline_frac:.2f}" if row.roofline_frac is not None else ""
        ratio = f"{row.x_baseline:.2f}×" if row.x_baseline is not None else ""
        lines.append(f"| {variant} | {shape} | {format_time(row.seconds)} | {gflops} | "
                     f"{frac} | {ratio} |")
    if notes:
        lines += ["", "Not run (over the sweep limits of bench/bench_support.hpp):", ""]
        lines += [f"- {source + ': ' if many_sources else ''}`{name}`: {message}"
                  for source, name, message in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- plots --

def series(rows, many_sources):
    """(label, is_roofline, [(n, row)] sorted by n) per variant and shape, for the rows
    with an N."""
    groups = OrderedDict()
    for row in rows:
        if row.n is None:
            continue
        label = f"{row.variant} {row.shape}".strip()
        if many_sources:
            label = f"{row.source}: {label}"
        groups.setdefault((label, row.is_roofline), []).append(row)
    return [(label, roof, sorted(rs, key=lambda r: r.n)) for (label, roof), rs in groups.items()]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def style(index, roof):
    """Line style of series `index`: one of 10 colours, and past each ten the next
    marker and line style, so no two of the first 80 series look alike (the same
    style in both plots). GEMM rooflines are black and dashed, markers still cycling."""
    group = index // 10
    marker = MARKERS[group % len(MARKERS)]
    if roof:
        return {"color": "black", "linestyle": "--", "marker": MARKERS[index % len(MARKERS)]}
    return {"color": f"C{index % 10}", "linestyle": LINESTYLES[group % len(LINESTYLES)],
            "marker": marker}


def figure(plt, lines):
    """A figure tall enough for one legend entry per series, and wider past 20 series
    so that the plot keeps its width beside the legend."""
    return plt.subplots(figsize=(10 if len(lines) <= 20 else 13, max(5.5, 0.2 * len(lines) + 1.0)))


def n_axis(ax, lines):
    """Log2 N axis with plain numbers at the measured N."""
    ax.set_xscale("log", base=2)
    ns = sorted({r.n for _, _, rs in lines for r in rs})
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")


def draw_time(ax, lines, legend_below):
    """Time per call against N on log-log axes, with O(N²) and O(N) guide lines."""
    for i, (label, roof, rs) in enumerate(lines):
        ax.plot([r.n for r in rs], [r.seconds * 1e3 for r in rs], label=label,
                **style(i, roof))
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
    ax.grid(True, which="both", alpha=0.3)
    legend(ax, legend_below)


def draw_gflops(ax, lines, probes, legend_below):
    """GFLOP/s against N; `probes`: GFLOP/s of the roofline/gemm rows, drawn as one
    line at their median. Returns whether anything was drawn."""
    drawn = 0
    for i, (label, roof, rs) in enumerate(lines):
        pts = [(r.n, r.gflops) for r in rs if r.gflops is not None]
        if not pts:
            continue
        drawn += 1
        ax.plot([n for n, _ in pts], [g for _, g in pts],
                label=label + (" (roofline)" if roof else ""), **style(i, roof))
    if probes:
        drawn += 1
        probe = statistics.median(probes)
        runs = f", median of {len(probes)} files" if len(probes) > 1 else ""
        ax.axhline(probe, color="black", linestyle="-", linewidth=2, alpha=0.6,
                   label=f"roofline/gemm (2048³ sgemm): {probe:.0f} GFLOP/s{runs}")
    if drawn == 0:
        ax.text(0.5, 0.5, "no GFLOP/s counter in these results", ha="center",
                transform=ax.transAxes)
    n_axis(ax, lines)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GFLOP/s (median)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        legend(ax, legend_below)
    return drawn


def legend(ax, below):
    if below:  # panels: the legend under its own axes, two columns
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def plot_time(plt, lines, path):
    fig, ax = figure(plt, lines)
    draw_time(ax, lines, False)
    ax.set_title("Time against sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gflops(plt, lines, probes, path):
    fig, ax = figure(plt, lines)
    draw_gflops(ax, lines, probes, False)
    ax.set_title("Throughput against sequence length (black: GEMM rooflines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panels(plt, panels, kind, path):
    """One panel per results file (one benchmark binary), two columns, each panel
    with its own series, guides or roofline, and legend. `panels`: (title, lines,
    probes) per file. kind: "time" or "gflops"."""
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    most = max(len(lines) for _, lines, _ in panels)
    height = 5.0 + 0.12 * most  # room for the legend under each panel
    fig, axes = plt.subplots(rows, cols, figsize=(16, rows * height), squeeze=False)
    for ax, (title, lines, probes) in zip(axes.flat, panels):
        if kind == "time":
            draw_time(ax, lines, True)
        else:
            draw_gflops(ax, lines, probes, True)
        ax.set_title(title)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Time against sequence length, log-log (dotted: O(N²) and O(N))"
                 if kind == "time" else
                 "Throughput against sequence length (black line: the file's GEMM roofline probe)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # keep the panels' titles clear of the suptitle
    fig.savefig(path, dpi=90)
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

    rows, notes = [], []
    for path in args.json:
        file_rows, file_notes = load(path, args.exclude)
        rows += file_rows
        notes += [(Path(path).stem, name, message) for name, message in file_notes]
    if not any(row.n is not None for row in rows):
        print("plot_bench: no benchmark with an N:<n> argument in " + ", ".join(args.json),
              file=sys.stderr)
        return 1
    many_sources = len({r.source for r in rows}) > 1
    prefix = args.prefix or (Path(args.json[0]).stem if len(args.json) == 1 else "bench")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    time_png, gflops_png = out_dir / f"{prefix}_time.png", out_dir / f"{prefix}_gflops.png"
    if many_sources:  # one panel per file: a single plot of every series is unreadable
        panels = []
        for source in OrderedDict((r.source, None) for r in rows):
            mine = [r for r in rows if r.source == source]
            lines = series(mine, False)
            if lines:
                probes = [r.gflops for r in mine
                          if r.n is None and r.variant == "roofline/gemm" and r.gflops]
                panels.append((source, lines, probes))
        plot_panels(plt, panels, "time", time_png)
        plot_panels(plt, panels, "gflops", gflops_png)
    else:
        lines = series(rows, many_sources)
        plot_time(plt, lines, time_png)
        probes = [r.gflops for r in rows
                  if r.n is None and r.variant == "roofline/gemm" and r.gflops]
        plot_gflops(plt, lines, probes, gflops_png)

    text = table(rows, notes, many_sources)
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
        print(f"plot_bench: wrote {args.table}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(f"plot_bench: wrote {time_png} and {gflops_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
