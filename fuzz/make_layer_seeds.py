#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_layers.cpp into fuzz/corpus_layers/.

Each seed lists the fields in the order LLVMFuzzerTestOneInput decodes them,
so the fuzzer starts at named corners: self and cross attention, GQA, fused
PyTorch QKV, every weight form (row-major, gaps, column order, negative and
zero strides) in both layouts, each mask, and each broken argument.
"""
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_layers")


def seed(name, kv=1, group=1, D=4, Dv=4, d_model=8, cross=False, d_kv=6, B=1, Lq=5, Lk=7,
         bias=True, fused=False, mask=0, threads=2, pad=0, corrupt=None, lengths=None,
         constant=False, forms=((0, 0, 1),) * 4):
    b = [kv - 1, group - 1, D - 1, Dv - 1, d_model - 1, int(cross)]
    if cross:
        b += [d_kv - 1]
    b += [B - 1, Lq - 1]
    if cross:
        b += [Lk - 1]
    b += [int(bias)]
    if not cross:
        b += [int(fused)]
    b += [mask, threads - 1, pad]
    b += [0] if corrupt is None else [10, corrupt - 1]
    b += [7, 1]  # generator seed
    b += list(lengths) if lengths else [Lk if cross else Lq] * B
    b += [int(constant)]
    for layout, form, gap in forms:  # Wq, Wk, Wv, Wo: (out_in?, form 0..4, gap - 1)
        b += [layout, form, gap - 1]
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(bytes(b))


os.makedirs(HERE, exist_ok=True)
seed("self_in_out", forms=((0, 0, 1),) * 4)
seed("self_pytorch_gqa_causal", kv=2, group=2, D=3, Dv=5, d_model=10, Lq=23, mask=1, threads=3,
     forms=((1, 0, 1),) * 4)
seed("self_fused_hf_mask", kv=1, group=3, D=4, Dv=4, d_model=12, B=3, Lq=17, fused=True, mask=3,
     lengths=[17, 4, 0], pad=2)
seed("cross_strided_forms", kv=3, group=1, D=2, Dv=3, d_model=7, cross=True, d_kv=5, B=2, Lq=9,
     Lk=20, mask=2, lengths=[20, 3], forms=((0, 1, 3), (1, 2, 1), (0, 3, 1), (1, 3, 2)))
seed("single_column_zero_stride", kv=1, group=1, D=1, Dv=1, d_model=1, Lq=6, constant=True,
     forms=((0, 4, 1),) * 4)
for k, what in enumerate(["lse_over_x", "out_over_x", "wrong_wo", "padding_batch"], start=1):
    seed("broken_" + what, corrupt=k, cross=(k % 2 == 0))
