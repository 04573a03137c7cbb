#!/usr/bin/env python3
"""ctest check of scripts/plot_bench.py on sample.json, a real bench_attention run.

sample.json: `bench_attention --sweep --benchmark_repetitions=3` filtered to the
roofline/gemm probe row, N = 512 and 1024 at D = 64, and the naive dense row at
N = 65536, which the benchmark skips over its memory limit (a note, error_occurred).

Runs the script on the sample (with its median aggregates) and on a copy
without aggregates (the script must then take the medians itself), and checks
  - both PNGs are written, non-empty PNGs;
  - the table has one row per variant and shape, with the time, GFLOP/s,
    roofline_frac and x_baseline that follow from the JSON's repetitions;
    baselines and the probe have no ratio, every flash row has one;
  - the skipped row is listed under the table with its note;
  - the counters in the sample mean what they say: x_baseline is the naive
    median time over the flash median time, roofline_frac the row's GFLOP/s
    over the probe's;
  - the line styles of 40 series are all different;
  - three files give one panel each (a taller figure) and a table naming each file.
Exits 77 (ctest SKIP_RETURN_CODE) without matplotlib.

Usage: check_plot_bench.py PLOT_BENCH.py SAMPLE.json WORK_DIR
"""

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

SKIP = 77
VARIANTS = ["roofline/gemm", "BM_naive/dense", "BM_naive/causal", "BM_gemm_roofline",
            "BM_flash/dense", "BM_flash/causal"]
SHAPES = ["N:512/D:64", "N:1024/D:64"]


def medians(data):
    """run_name -> {time (ms), GFLOPs, roofline_frac, x_baseline, probe}, the medians of
    the repetitions (None for a counter the row lacks)."""
    runs = {}
    for e in data["benchmarks"]:
        if e.get("run_type") == "iteration" and not e.get("error_occurred"):
            assert e["time_unit"] == "ms", e
            runs.setdefault(e["run_name"], []).append(e)

    def med(entries, key):
        values = [e[key] for e in entries if key in e]
        assert len(values) in (0, len(entries)), (key, entries)
        return statistics.median(values) if values else None

    return {name: {"time": med(es, "real_time"), "GFLOPs": med(es, "GFLOPs"),
                   "roofline_frac": med(es, "roofline_frac"),
                   "x_baseline": med(es, "x_baseline"), "probe": med(es, "probe_GFLOPs")}
            for name, es in runs.items()}


def parse_table(text):
    """variant -> shape -> cells, from the markdown table; and the lines after it."""
    lines = text.splitlines()
    header = "| variant | shape | time | GFLOP/s | fraction of roofline | ratio to baseline |"
    assert lines[0] == header, lines[0]
    table, end = {}, 2
    for end in range(2, len(lines) + 1):
        if end == len(lines) or not lines[end].startswith("|"):
            break
        cells = [c.strip() for c in lines[end].strip("|").split("|")]
        assert cells[1] not in table.get(cells[0], {}), f"duplicate row {cells[:2]}"
        table.setdefault(cells[0], {})[cells[1]] = cells[2:]
    return table, lines[end:]


def ms(cell):
    value, unit = cell.split()
    return float(value) * {"s": 1e3, "ms": 1.0, "µs": 1e-3, "ns": 1e-6}[unit]


def ratio(cell):
    return float(re.fullmatch(r"([0-9.]+)×", cell).group(1))


def close(a, b, tol):
    return abs(a - b) <= tol


def check_sample_counters(expected):
    """The counters the benchmark emitted agree with the times and rates beside them."""
    probe = expected["roofline/gemm/real_time"]["probe"]
    assert probe and probe > 0, "the roofline/gemm row carries probe_GFLOPs"
    for name, row in expected.items():
        assert row["roofline_frac"] is not None, f"{name} has GFLOP/s but no roofline_frac"
        assert close(row["roofline_frac"], row["GFLOPs"] / probe, 0.01 * row["roofline_frac"])
    for mode in ("dense", "causal"):
        for shape in SHAPES:
            flash = expected[f"BM_flash/{mode}/{shape}/real_time"]
            naive = expected[f"BM_naive/{mode}/{shape}/real_time"]
            assert close(flash["x_baseline"], naive["time"] / flash["time"],
                         0.01 * flash["x_baseline"]), (mode, shape, flash, naive)


def check(script, sample, work, name):
    out_dir = work / name
    table_path = out_dir / "table.md"
    run = subprocess.run([sys.executable, str(script), str(sample), "--out-dir", str(out_dir),
                          "--table", str(table_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for png in (f"{sample.stem}_time.png", f"{sample.stem}_gflops.png"):
        path = out_dir / png
        assert path.is_file() and path.stat().st_size > 1000, f"{path} missing or empty"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"

    expected = medians(json.loads(sample.read_text()))
    table, after = parse_table(table_path.read_text(encoding="utf-8"))
    assert sorted(table) == sorted(VARIANTS), sorted(table)
    rows = 0
    for variant in VARIANTS:
        shapes = [""] if variant == "roofline/gemm" else SHAPES
        assert sorted(table[variant]) == sorted(shapes), (variant, sorted(table[variant]))
        for shape in shapes:
            cells = table[variant][shape]
            want = expected["/".join(p for p in (variant, shape, "real_time") if p)]
            # time to 3 significant digits, GFLOP/s to 1 decimal, the rest to 2
            assert close(ms(cells[0]), want["time"], 5e-3 * want["time"]), (variant, shape, cells)
            assert close(float(cells[1]), want["GFLOPs"], 0.051), (variant, shape, cells)
            assert close(float(cells[2]), want["roofline_frac"], 0.0051), (variant, shape, cells)
            if variant.startswith("BM_flash"):
                assert close(ratio(cells[3]), want["x_baseline"], 0.0051), (variant, shape, cells)
            else:
                assert cells[3] == "", (variant, shape, cells)  # baselines get no ratio
            rows += 1
    notes = "\n".join(after)
    assert "Not run" in notes, after
    assert re.search(r"`BM_naive/dense/N:65536/D:64/real_time`: naive dense: N² buffers need "
                     r"32\.0 GiB, over the 4 GiB limit", notes), notes
    assert rows == 1 + 5 * len(SHAPES)
    return rows


def check_styles(script):
    """No two of the first 40 series share colour, marker and line style."""
    spec = importlib.util.spec_from_file_location("plot_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    styles = [module.style(i, False) for i in range(40)]
    keys = {(s["color"], s["marker"], s["linestyle"]) for s in styles}
    assert len(keys) == 40, sorted(keys)


def png_size(path):
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    head = path.read_bytes()[16:24]
    return int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")


def check_panels(script, sample, work):
    """Several files (main.sh passes one per binary) give one panel per file: the
    PNGs are written under the 'bench' prefix, and the table names every row with
    its file."""
    out_dir = work / "panels"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("bench_one", "bench_two", "bench_three"):
        copy = out_dir / f"{name}.json"
        copy.write_text(sample.read_text())
        files.append(copy)
    table_path = out_dir / "table.md"
    run = subprocess.run([sys.executable, str(script), *map(str, files), "--out-dir",
                          str(out_dir), "--table", str(table_path)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    for png in ("bench_time.png", "bench_gflops.png"):
        path = out_dir / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    # three files: two rows of panels, so the image is much taller than one plot's
    single = png_size(work / "with_aggregates" / f"{sample.stem}_time.png")
    for png in ("bench_time.png", "bench_gflops.png"):
        size = png_size(out_dir / png)
        assert size[1] > 1.4 * single[1], (png, size, single)
    text = table_path.read_text(encoding="utf-8")
    for f in files:
        assert text.count(f"| {f.stem}: BM_flash/dense |") == len(SHAPES), (f.stem, text)
    return len(files)


def main():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"SKIP: matplotlib is not installed for {sys.executable}")
        return SKIP
    script, sample, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    check_sample_counters(medians(json.loads(sample.read_text())))
    check_styles(script)
    check(script, sample, work, "with_aggregates")

    # The same runs without the aggregate rows: the script takes the medians itself.
    data = json.loads(sample.read_text())
    data["benchmarks"] = [e for e in data["benchmarks"] if e.get("run_type") != "aggregate"]
    bare = work / sample.name
    bare.write_text(json.dumps(data))
    rows = check(script, bare, work, "repetitions_only")
    panels = check_panels(script, sample, work)
    print(f"plot_bench: {rows} table rows checked, with and without aggregates; "
          f"{panels} files as panels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
