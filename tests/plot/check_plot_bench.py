#!/usr/bin/env python3
"""ctest check of scripts/plot_bench.py on sample.json, a real bench_attention run.

Runs the script on the sample (with its median aggregates) and on a copy
without aggregates (the script must then take the median of the
repetitions), and checks that both PNGs are written and non-empty and that
the table has one row per variant and N with the time, GFLOP/s and ratios
that follow from the JSON. Exits 77 (ctest SKIP_RETURN_CODE) without
matplotlib.

Usage: check_plot_bench.py PLOT_BENCH.py SAMPLE.json WORK_DIR
"""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

SKIP = 77


def medians(data):
    """run_name -> (median real_time in ms, median GFLOPs) of the repetitions."""
    runs = {}
    for e in data["benchmarks"]:
        if e.get("run_type") == "iteration" and "/N:" in e["run_name"]:
            assert e["time_unit"] == "ms", e
            runs.setdefault(e["run_name"], []).append(e)
    return {name: (statistics.median(e["real_time"] for e in es),
                   statistics.median(e["GFLOPs"] for e in es)) for name, es in runs.items()}


def parse_table(text):
    """variant -> shape -> cells, from the markdown table."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    assert lines[0].startswith("| variant | shape | time | GFLOP/s"), lines[0]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table.setdefault(cells[0], {})[cells[1]] = cells[2:]
    return table


def ms(cell):
    value, unit = cell.split()
    return float(value) * {"s": 1e3, "ms": 1.0, "µs": 1e-3, "ns": 1e-6}[unit]


def ratio(cell):
    return float(re.match(r"([0-9.]+)×", cell).group(1))


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
    table = parse_table(table_path.read_text(encoding="utf-8"))
    variants = ["BM_flash/dense", "BM_naive/dense", "BM_gemm_roofline", "BM_flash/causal",
                "BM_naive/causal"]
    assert sorted(table) == sorted(variants), sorted(table)
    rows = 0
    for variant in variants:
        for n in (512, 1024):
            shape = f"N:{n}/D:64"
            cells = table[variant][shape]
            t, g = expected[f"{variant}/{shape}/real_time"]
            # 3 significant digits in the table
            assert abs(ms(cells[0]) - t) <= 5e-3 * t, (variant, shape, cells[0], t)
            assert abs(float(cells[1]) - g) <= 0.051, (variant, shape, cells[1], g)
            rows += 1
        for n in (512, 1024):
            cells = table[variant][f"N:{n}/D:64"]
            if variant.startswith("BM_flash"):
                mode = variant.split("/")[1]
                t_naive = expected[f"BM_naive/{mode}/N:{n}/D:64/real_time"][0]
                t = expected[f"{variant}/N:{n}/D:64/real_time"][0]
                assert abs(ratio(cells[2]) - t_naive / t) <= 0.006, (variant, n, cells[2])
            else:
                assert cells[2] == "", (variant, n, cells[2])  # baselines get no speed-up
            if variant == "BM_gemm_roofline":
                assert cells[3] == ""
            else:
                g = expected[f"{variant}/N:{n}/D:64/real_time"][1]
                g_roof = expected[f"BM_gemm_roofline/N:{n}/D:64/real_time"][1]
                assert abs(ratio(cells[3]) - g / g_roof) <= 0.006, (variant, n, cells[3])
    assert rows == 10
    return rows


def main():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"SKIP: matplotlib is not installed for {sys.executable}")
        return SKIP
    script, sample, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    check(script, sample, work, "with_aggregates")

    # The same runs without the aggregate rows: the script takes the medians itself.
    data = json.loads(sample.read_text())
    data["benchmarks"] = [e for e in data["benchmarks"] if e.get("run_type") != "aggregate"]
    bare = work / sample.name
    bare.write_text(json.dumps(data))
    rows = check(script, bare, work, "repetitions_only")
    print(f"plot_bench: {rows} table rows checked, with and without aggregates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
