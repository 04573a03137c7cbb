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

Training (forward + backward), with --bench-backward build/bench/bench_backward:
attn's forward/<mask>/N and backward/<mask>/N rows against PyTorch's
scaled_dot_product_attention forward + out.backward(dout) on the same shapes
(B = 1, H = 8, D = 128, N = 1024 and 2048, dense and causal, fp32), times in
ms; GFLOP/s count 3.5× the forward's FLOPs (the backward does 2.5×).
--only-backward skips the forward tables (and ONNX Runtime).

Decoding, with --bench-decode build/bench/bench_decode: one query row against a
long cache, Lq = 1, Hq = 32, Hkv = 8, D = 128, Lk = 16384 and 65536, fp32.
attn's decode/masked (masked_attention with causal(), which the engine runs
split-KV) and decode/cache_f32 (cache_attention on a KVCache<float>) rows and
the read bandwidth bench_decode measures in the same run (bandwidth/stream)
against PyTorch's scaled_dot_product_attention on the same shape, timed two
ways: enable_gqa=True on the 8 K/V heads; K/V repeated to 32 heads inside
the timed step (repeat_interleave, as a decoder that repeats per step does);
and a cache stored already repeated (32 heads, the repeat not timed, 4× the
bytes read). The fastest is compared, and named. No causal flag for PyTorch: with
Lq = 1 its is_causal is top-left (key 0 only), while attn's causal() is
bottom-right (every key), so both attend to all Lk keys. GB/s count the K and
V bytes of the 8-head cache (2·Hkv·Lk·D·4) over the time for both.
--only-decode writes only this table (and a plot with --plot).
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
    # The CPU wheel of torch (the default one pulls CUDA libraries). Where
    # PyTorch's own index cannot be reached (a machine that sees only PyPI),
    # PyPI's torch: the same CPU kernels, with CUDA libraries (~3 GB) unused.
    cpu = [pip, "install", "--index-url", "https://download.pytorch.org/whl/cpu", "torch"]
    if subprocess.call(cpu) != 0:
        print("compare_peers: PyTorch's CPU index failed; installing torch from PyPI", flush=True)
        subprocess.check_call([pip, "install", "torch"])
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


def time_attn(bench, threads, reps):
    filt = "BM_flash(_bf16)?/(dense|causal)/N:(2048|4096)/D:(64|128)/real_time|peak/"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([bench, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          "--benchmark_min_time=0.1", f"--benchmark_repetitions={reps}"],
                         env=env, capture_output=True, text=True, check=True)
    data = json.loads(res.stdout)
    out, peaks = {}, {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate":
            continue
        name = b["name"]
        if name.startswith("peak/"):  # peak/bf16/amx_bf16/iterations:1 -> peak/bf16/amx_bf16
            key = "/".join(name.split("/")[:3])
            peaks[key] = max(peaks.get(key, 0.0), b["GFLOPs"])
            continue
        parts = name.split("/")  # BM_flash/dense/N:4096/D:64/real_time
        kind = "bf16" if parts[0] == "BM_flash_bf16" else "fp32"
        n, d = int(parts[2][2:]), int(parts[3][2:])
        key = (kind, parts[1] == "causal", n, d)
        out[key] = max(out.get(key, 0.0), b["GFLOPs"])  # GFLOP/s of the best repetition, as the peers
    return out, peaks


BACKWARD_SHAPES = [(False, 1024), (False, 2048), (True, 1024), (True, 2048)]  # D = 128


def time_attn_backward(bench, threads, reps):
    filt = "^(forward|backward)/(dense|causal)/N:(1024|2048)/"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([bench, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          "--benchmark_min_time=0.1", f"--benchmark_repetitions={reps}"],
                         env=env, capture_output=True, text=True, check=True)
    out = {}
    for b in json.loads(res.stdout)["benchmarks"]:
        if b.get("run_type") == "aggregate":
            continue
        parts = b["name"].split("/")  # backward/causal/N:2048/real_time
        scale = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[b["time_unit"]]
        key = (parts[0], parts[1] == "causal", int(parts[2][2:]))
        out[key] = min(out.get(key, float("inf")), b["real_time"] * scale)  # best repetition
    return out


def time_torch_backward(threads, reps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for causal, n in BACKWARD_SHAPES:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, HEADS, n, 128, generator=g).requires_grad_() for _ in range(3))
        dout = torch.randn(1, HEADS, n, 128, generator=g)

        def fwd_bwd():
            for t in (q, k, v):
                t.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

        with torch.no_grad():
            out[("forward", causal, n)] = best_time(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
        out[("both", causal, n)] = best_time(fwd_bwd, reps)
    return out, torch.__version__


def backward_table(bench, threads, reps):
    attn = time_attn_backward(bench, threads, reps)
    torch_r, torch_v = time_torch_backward(threads, reps)
    lines = ["", f"Training: attention forward + backward, B = 1, H = 8, D = 128, fp32, {threads} threads, "
             f"one sitting on {cpu_name()}. attn: bench_backward (best of its repetitions); PyTorch {torch_v}: "
             "`scaled_dot_product_attention` then `out.backward(dout)` (best of its runs). "
             "Times in ms; GFLOP/s count 3.5× the forward's FLOPs.", "",
             "| shape | attn fwd | attn bwd | attn bwd / fwd | attn fwd + bwd | PyTorch fwd + bwd | "
             "PyTorch bwd / fwd | attn GFLOP/s | PyTorch GFLOP/s | attn speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for causal, n in BACKWARD_SHAPES:
        af, ab = attn.get(("forward", causal, n)), attn.get(("backward", causal, n))
        tf, tb = torch_r.get(("forward", causal, n)), torch_r.get(("both", causal, n))
        if not (af and ab and tf and tb):
            continue
        fl = 3.5 * flops(causal, n, 128) * 1e-9
        lines.append(f"| {'causal' if causal else 'dense'} N = {n} | {af * 1e3:.1f} | {ab * 1e3:.1f} | "
                     f"{ab / af:.2f} | {(af + ab) * 1e3:.1f} | {tb * 1e3:.1f} | {(tb - tf) / tf:.2f} | "
                     f"{fl / (af + ab):.0f} | {fl / tb:.0f} | {tb / (af + ab):.2f}× |")
    return "\n".join(lines) + "\n"


DECODE_LK = [16384, 65536]
DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128


def decode_bytes(lk):
    return 2.0 * DECODE_HKV * lk * DECODE_D * 4  # K and V, fp32


def time_attn_decode(bench, threads, reps):
    filt = "^(bandwidth/stream|decode/(masked|cache_f32)/Lk:(16384|65536))"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([bench, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          "--benchmark_min_time=0.1", f"--benchmark_repetitions={reps}"],
                         env=env, capture_output=True, text=True, check=True)
    out, stream = {}, 0.0
    for b in json.loads(res.stdout)["benchmarks"]:
        if b.get("run_type") == "aggregate":
            continue
        name = b["name"]
        if name.startswith("bandwidth/stream"):
            stream = max(stream, b["GBps"])
            continue
        parts = name.split("/")  # decode/masked/Lk:16384/real_time
        scale = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[b["time_unit"]]
        key = (parts[1], int(parts[2][3:]))
        out[key] = min(out.get(key, float("inf")), b["real_time"] * scale)  # best repetition
    return out, stream


def time_torch_decode(threads, reps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    group = DECODE_HQ // DECODE_HKV
    out = {}
    for lk in DECODE_LK:
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, DECODE_HQ, 1, DECODE_D, generator=g)
        k, v = (torch.randn(1, DECODE_HKV, lk, DECODE_D, generator=g) for _ in range(2))
        with torch.no_grad():
            try:
                out[("enable_gqa", lk)] = best_time(
                    lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
            except TypeError:  # older PyTorch: no enable_gqa
                pass
            out[("repeat", lk)] = best_time(
                lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                       v.repeat_interleave(group, dim=1)), reps)
            kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out[("pre-repeated", lk)] = best_time(lambda: F.scaled_dot_product_attention(q, kr, vr), reps)
            del kr, vr
        del k, v
    return out, torch.__version__


def decode_table(bench, threads, reps, plot=""):
    attn, stream = time_attn_decode(bench, threads, reps)
    torch_r, torch_v = time_torch_decode(threads, reps)
    lines = ["", f"Decoding: Lq = 1, Hq = {DECODE_HQ}, Hkv = {DECODE_HKV}, D = {DECODE_D}, fp32, {threads} threads, "
             f"one sitting on {cpu_name()}. Read bandwidth measured in the same run (bench_decode's "
             f"bandwidth/stream): {stream:.1f} GB/s. attn: bench_decode's decode/masked (masked_attention, "
             "causal) and decode/cache_f32 (cache_attention on a KVCache<float>), best of its repetitions; "
             f"PyTorch {torch_v}: `scaled_dot_product_attention` with enable_gqa=True, with K/V "
             "repeat_interleave'd to Hq inside the step, and on a cache stored repeated (repeat not timed); "
             "the fastest (named), best of its runs. GB/s = K+V bytes of the Hkv-head cache / time.", "",
             "| Lk | K+V MiB | attn masked ms | attn masked GB/s | attn cache ms | attn cache GB/s | "
             "PyTorch ms | PyTorch GB/s | PyTorch form (other forms, ms) | attn masked / PyTorch (GB/s) | "
             "attn, fraction of stream | PyTorch, fraction of stream |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for lk in DECODE_LK:
        by = decode_bytes(lk)
        am, ac = attn.get(("masked", lk)), attn.get(("cache_f32", lk))
        forms = {f: torch_r[(f, lk)] for f in ("enable_gqa", "repeat", "pre-repeated") if (f, lk) in torch_r}
        if not (am and forms):
            continue
        best = min(forms, key=forms.get)
        tt = forms[best]
        other = ", ".join(f"{f} {t * 1e3:.1f}" for f, t in forms.items() if f != best)
        gb = lambda t: by / t * 1e-9 if t else 0.0
        frac = lambda t: f"{gb(t) / stream:.0%}" if t and stream else "–"
        lines.append(f"| {lk} | {by / 2**20:.0f} | {am * 1e3:.2f} | {gb(am):.1f} | "
                     + (f"{ac * 1e3:.2f} | {gb(ac):.1f}" if ac else "– | –")
                     + f" | {tt * 1e3:.2f} | {gb(tt):.1f} | {best} ({other or '–'}) | {tt / am:.2f}× | "
                     f"{frac(am)} | {frac(tt)} |")
        rows.append((f"Lk = {lk}\nPyTorch: {best}", gb(am), gb(ac), gb(tt)))
    text = "\n".join(lines) + "\n"
    if plot and rows:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("compare_peers: no matplotlib, no plot")
            return text
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.27
        xs = range(len(rows))
        for i, (label, idx) in enumerate((("attn masked_attention", 1), ("attn KVCache<float>", 2),
                                          ("PyTorch SDPA, fastest form", 3))):
            ax.bar([x + (i - 1) * w for x in xs], [r[idx] for r in rows], w, label=label)
        if stream:
            ax.axhline(stream, color="gray", ls="--", lw=1, label="read bandwidth (stream)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r[0] for r in rows])
        ax.set_ylabel("K+V GB/s")
        ax.set_title(f"Decode, Hq 32 / Hkv 8, D 128, fp32, {threads} threads", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return text


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
    ap.add_argument("--bench-backward", default="", help="bench_backward: add the forward + backward table")
    ap.add_argument("--only-backward", action="store_true", help="only the forward + backward table")
    ap.add_argument("--bench-decode", default="", help="bench_decode: add the decode table")
    ap.add_argument("--only-decode", action="store_true", help="only the decode table (plot with --plot)")
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
    if args.only_decode:
        if not args.bench_decode:
            sys.exit("compare_peers: --only-decode needs --bench-decode")
        text = decode_table(args.bench_decode, args.threads, args.reps, args.plot)
        with open(args.out, "w") as f:
            f.write(text)
        print(text)
        return
    if args.only_backward:
        if not args.bench_backward:
            sys.exit("compare_peers: --only-backward needs --bench-backward")
        text = backward_table(args.bench_backward, args.threads, args.reps)
        with open(args.out, "w") as f:
            f.write(text)
        print(text)
        return
    attn, peaks = time_attn(args.bench, args.threads, args.reps)
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
    if args.bench_backward:
        text += backward_table(args.bench_backward, args.threads, args.reps)
    if args.bench_decode:
        text += decode_table(args.bench_decode, args.threads, args.reps)
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
        if bf16_peak:
            ax.axhline(bf16_peak, color="gray", ls=":", lw=1, label=f"bf16 peak ({bf16_isa})")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r[0].replace(", ", "\n") for r in rows], fontsize=7)
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"Attention forward, {args.threads} threads, {cpu_name()}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
