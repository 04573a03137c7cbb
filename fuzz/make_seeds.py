#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_attention.cpp into fuzz/corpus/.

Each seed lists the fields in the order LLVMFuzzerTestOneInput decodes them,
so every seed starts the fuzzer at a named corner: each storage type, mask
and score modifier, strided layouts, small tiles, and two broken arguments.
"""
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def seed(name, types, B, Hkv, group, Lq, Lk, D, Dv, mask, mod, amp, seed_lo, scale=None,
         bq=0, bk=0, threads=1, lse=1, cap=20, corrupt=None, lengths=None, mask_b=0, mask_h=0,
         density=2, bias_b=0, layouts=((0, 0, 0),) * 4):
    b = [types, B - 1, Hkv - 1, group - 1, Lq - 1, Lk - 1, D - 1, Dv - 1, mask, mod, amp, seed_lo, 0]
    b += [1, scale] if scale is not None else [0]
    b += [bq, bk, threads, lse, cap - 1]
    b += [0] if corrupt is None else [14, corrupt - 1]
    b += list(lengths) if lengths else [Lk] * B
    b += [mask_b, mask_h, density, bias_b]
    for layout in layouts:  # (sequence-major, element stride - 1, row padding) of q, k, v, out
        b += list(layout)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(bytes(b))


os.makedirs(HERE, exist_ok=True)
seed("dense_float", 0, 1, 2, 2, 37, 33, 16, 16, 0, 0, 1, 1)
seed("causal_double_gqa_bshd", 1, 2, 1, 3, 20, 39, 9, 13, 1, 1, 1, 2, bq=7, bk=5, threads=2,
     layouts=((1, 0, 1), (1, 1, 0), (1, 0, 0), (1, 0, 2)))
seed("half_padding_softcap", 2, 2, 2, 1, 12, 40, 24, 8, 3, 2, 2, 3, lengths=(40, 0), bq=4, bk=9)
seed("bf16_boolmask_bias", 3, 2, 3, 1, 25, 18, 5, 7, 4, 3, 1, 4, mask_b=1, mask_h=1, density=1,
     bias_b=1, layouts=((0, 1, 3), (0, 0, 0), (1, 1, 1), (0, 1, 2)))
seed("mixed_custom_alibi_softcap", 4, 1, 1, 2, 30, 30, 17, 19, 5, 4, 3, 5, scale=70, bk=11)
seed("half_to_float_top_left", 5, 1, 3, 1, 40, 6, 3, 22, 2, 0, 0, 6, threads=0)
seed("float_causal_padding_tall", 0, 2, 1, 1, 40, 9, 11, 4, 6, 1, 3, 7, lengths=(3, 9), bq=5, bk=2)
seed("float_broken_scale", 0, 1, 1, 1, 5, 6, 4, 4, 0, 0, 1, 8, corrupt=4)
seed("double_broken_overlap", 1, 1, 2, 1, 8, 8, 8, 8, 1, 0, 1, 9, corrupt=2)
