#!/usr/bin/env python3
"""Times attn's bench_attention against PyTorch's scaled_dot_product_attention and
ONNX Runtime's com.microsoft.MultiHeadAttention on the same shapes and threads,
in one sitting, and writes a markdown table (and a plot, when matplotlib is there).

Optional: no test needs it. The peers live in a virtual environment OUTSIDE the
repository, created only on request:

    python3 scripts/compare_peers.py --setup            # ~/.cache/attn-peers, pip install
    python3 scripts/compare_peers.py --bench build/bench/bench_attention \\
        --out docs/peers.md --plot docs/peers.png

With --errors BF16_ERROR (the bench/bf16_error tool), it instead writes the
bf16 error table: attn's bf16 outputs (every instruction set the CPU runs) and
PyTorch's bf16 SDPA against an fp64 reference on the same bf16 inputs.

Shapes (B = 1, H = 8): dense D = 64 N = 4096, D = 128 N = 2048 and 4096;
causal D = 64 and 128 at N = 4096; fp32, and bf16 for attn and PyTorch (ONNX
Runtime's CPU MultiHeadAttention has no bf16). FLOP = 4·B·H·N²·D dense and
4·B·H·D·N(N+1)/2 causal (only the kept pairs), as bench_attention counts them.
"""
import argparse
import json
import os
import subprocess
import sys
import time

VENV = os.path.expanduser("~/.cache/attn-peers")
PACKAGES = ["numpy", "onnx", "onnxruntime", "matplotlib"]
HEADS = 8
SHAPES = [  # (causal, N, D)
    (False, 4096, 64),
    (False, 2048, 128),
    (False, 4096, 128),
    (True, 4096, 64),
    (True, 4096, 128),
]


def flops(causal, n, d):
    pairs = n * (n + 1) / 2 if causal else n * n
    return 4.0 * HEADS * pairs * d


def setup(venv):
    if os.path.abspath(venv).startswith(os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))):
        sys.exit("compare_peers: the venv must live outside the repository")
    subprocess.check_call([sys.executable, "-m", "venv", venv])
    pip = os.path.join(venv, "bin", "pip")
    # The CPU wheel of torch (the default one pulls CUDA libraries).
    subprocess.check_call([pip, "install", "--index-url", "https://download.pytorch.org/whl/cpu", "torch"])
    subprocess.check_call([pip, "install"] + PACKAGES)


def in_venv_or_reexec(venv):
    try:
        import torch  # noqa: F401
        import onnxruntime  # noqa: F401
        return
    except ImportError:
        py = os.path.join(venv, "bin", "python")
        if not os.path.exists(py) or os.path.abspath(sys.prefix) == os.path.abspath(venv):
            sys.exit(f"compare_peers: torch/onnxruntime missing; run with --setup (venv {venv})")
        os.execv(py, [py] + sys.argv)


def best_time(fn, reps, min_time=0.2):
    fn()  # warm-up
    best = float("inf")
    start = time.perf_counter()
    done = 0
    while done < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        done += 1
        if done >= 50:
            break
    return best


def time_torch(threads, reps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for causal, n, d in SHAPES:
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn(1, HEADS, n, d, generator=g).to(dtype) for _ in range(3))
            with torch.no_grad():
                t = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
            out[(name, causal, n, d)] = flops(causal, n, d) / t * 1e-9
    return out, torch.__version__


def time_ort(threads, reps):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = {}
    for causal, n, d in SHAPES:
        hidden = HEADS * d
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                num_heads=HEADS, unidirectional=1 if causal else 0)
        io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, n, hidden]) for x in "qkv"]
        graph = helper.make_graph([node], "mha", io,
                                  [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, n, hidden])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        feeds = {x: rng.standard_normal((1, n, hidden), dtype=np.float32) for x in "qkv"}
        t = best_time(lambda: sess.run(None, feeds), reps)
        out[("fp32", causal, n, d)] = flops(causal, n, d) / t * 1e-9
    return out, ort.__version__


ERROR_SHAPES = [(False, 1024, 64), (False, 1024, 128), (True, 1024, 64), (True, 1024, 128)]


def bf16_errors(tool, threads, out_path):
    """Max |error| and RMS error over max |reference|, attn's bf16 per ISA and PyTorch's
    bf16 SDPA, against torch's fp64 SDPA on the same bf16-representable inputs."""
    import tempfile

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    lines = ["bf16 storage (q, k, v, out), B = 1, H = 8, inputs N(0, 1) rounded to bf16; error of the",
             "bf16 output against fp64 attention on the same inputs, as max |err| / max |ref| and",
             "RMS err / RMS ref. PyTorch " + torch.__version__ + " `scaled_dot_product_attention` in bf16.", "",
             "| shape | attn ISA | attn max | attn RMS | PyTorch max | PyTorch RMS | attn / PyTorch (RMS) |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for causal, n, d in ERROR_SHAPES:
            g = torch.Generator().manual_seed(7)
            q, k, v = (torch.randn(1, HEADS, n, d, generator=g).to(torch.bfloat16) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
            with torch.no_grad():
                pt = F.scaled_dot_product_attention(q, k, v, is_causal=causal).double()
            prefix = os.path.join(tmp, "x")
            for name, t in (("q", q), ("k", k), ("v", v)):
                t.float().numpy().tofile(f"{prefix}.{name}")
            isas = subprocess.run([tool, prefix, str(n), str(d), str(int(causal))], check=True,
                                  capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout.split()
            scale = ref.abs().max().item()
            rms_ref = ref.pow(2).mean().sqrt().item()
            pt_max = (pt - ref).abs().max().item() / scale
            pt_rms = (pt - ref).pow(2).mean().sqrt().item() / rms_ref
            shape = f"{'causal' if causal else 'dense'} N = {n}, D = {d}"
            for isa in isas:
                a = torch.from_numpy(np.fromfile(f"{prefix}.out.{isa}", dtype=np.float32)).double()
                a = a.reshape(ref.shape)
                a_max = (a - ref).abs().max().item() / scale
                a_rms = (a - ref).pow(2).mean().sqrt().item() / rms_ref
                lines.append(f"| {shape} | {isa} | {a_max:.2e} | {a_rms:.2e} | {pt_max:.2e} | {pt_rms:.2e} | "
                             f"{a_rms / pt_rms:.2f}× |")
    text = "\n".join(lines) + "\n"
    with open(out_path, "w") as f:
        f.write(text)
    print(text)


def time_attn(bench, threads):
    filt = "BM_flash(_bf16)?/(dense|causal)/N:(2048|4096)/D:(64|128)/real_time|peak/"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([bench, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          "--benchmark_min_time=0.1"], env=env, capture_output=True, text=True, check=True)
    data = json.loads(res.stdout)
    out, peaks = {}, {}
    for b in data["benchmarks"]:
        name = b["name"]
        if name.startswith("peak/"):  # peak/bf16/amx_bf16/iterations:1 -> peak/bf16/amx_bf16
            peaks["/".join(name.split("/")[:3])] = b["GFLOPs"]
            continue
        parts = name.split("/")  # BM_flash/dense/N:4096/D:64/real_time
        kind = "bf16" if parts[0] == "BM_flash_bf16" else "fp32"
        n, d = int(parts[2][2:]), int(parts[3][2:])
        out[(kind, parts[1] == "causal", n, d)] = b["GFLOPs"]  # GFLOP/s (a rate counter)
    return out, peaks


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the venv and install the peers")
    ap.add_argument("--venv", default=VENV)
    ap.add_argument("--bench", default="build/bench/bench_attention")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="peers.md")
    ap.add_argument("--plot", default="")
    ap.add_argument("--errors", default="", metavar="BF16_ERROR",
                    help="write the bf16 error table instead, using this bench/bf16_error binary")
    args = ap.parse_args()
    if args.setup:
        setup(args.venv)
        return
    in_venv_or_reexec(args.venv)
    if args.errors:
        bf16_errors(args.errors, args.threads, args.out)
        return
    attn, peaks = time_attn(args.bench, args.threads)
    torch_r, torch_v = time_torch(args.threads, args.reps)
    ort_r, ort_v = time_ort(args.threads, args.reps)
    fp32_peak = max((g for k, g in peaks.items() if k.startswith("peak/fp32/")), default=0)
    # bf16 rows against the products attn runs for bf16: AMX tiles where the CPU has them.
    bf16_isa = "amx_bf16" if peaks.get("peak/bf16/amx_bf16") else "avx512_bf16"
    bf16_peak = peaks.get(f"peak/bf16/{bf16_isa}", 0)

    lines = [f"Attention forward, B = 1, H = 8, {args.threads} threads, one sitting on {cpu_name()}.",
             f"Ceilings measured in the same run: fp32 FMA peak {fp32_peak:.0f} GFLOP/s"
             + (f", bf16 product peak ({bf16_isa}) {bf16_peak:.0f} GFLOP/s" if bf16_peak else "") + ".",
             f"PyTorch {torch_v} `scaled_dot_product_attention`; ONNX Runtime {ort_v} "
             "`com.microsoft.MultiHeadAttention` (unidirectional=1 for causal). GFLOP/s:", "",
             "| shape | dtype | attn | PyTorch | ONNX Runtime | attn / PyTorch | attn / ORT | attn, fraction of peak |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for kind in ("fp32", "bf16"):
        for causal, n, d in SHAPES:
            key = (kind, causal, n, d)
            a, t, o = attn.get(key), torch_r.get(key), ort_r.get(key)
            peak = bf16_peak if kind == "bf16" and bf16_peak else fp32_peak
            fmt = lambda x: f"{x:.0f}" if x else "–"
            ratio = lambda x, y: f"{x / y:.2f}×" if x and y else "–"
            shape = f"{'causal' if causal else 'dense'} N = {n}, D = {d}"
            lines.append(f"| {shape} | {kind} | {fmt(a)} | {fmt(t)} | {fmt(o)} | {ratio(a, t)} | {ratio(a, o)} | "
                         + (f"{a / peak:.0%}" if a and peak else "–") + " |")
            rows.append((f"{shape}\n{kind}", a or 0, t or 0, o or 0))
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("compare_peers: no matplotlib, no plot")
            return
        fig, ax = plt.subplots(figsize=(11, 4))
        w = 0.27
        xs = range(len(rows))
        for i, (label, idx) in enumerate((("attn", 1), ("PyTorch SDPA", 2), ("ONNX Runtime MHA", 3))):
            ax.bar([x + (i - 1) * w for x in xs], [r[idx] for r in rows], w, label=label)
        if fp32_peak:
            ax.axhline(fp32_peak, color="gray", ls="--", lw=1, label="fp32 FMA peak")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r[0] for r in rows], fontsize=7)
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"Attention forward, {args.threads} threads, {cpu_name()}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
