#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_backward.cpp into fuzz/corpus_backward/.

Each seed lists the fields in the order LLVMFuzzerTestOneInput decodes them,
so every seed starts the fuzzer at a named corner: each storage type, mask,
score modifier and dropout rate, GQA, strided layouts, small tiles, and each
broken argument.
"""
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_backward")
LAYOUTS = {"bhsd": ((0, 0, 0),) * 7, "mixed": ((1, 0, 1), (1, 1, 0), (0, 0, 2), (1, 0, 0),
                                                 (0, 1, 3), (1, 1, 1), (0, 0, 1))}


def seed(name, dbl, B, Hkv, group, Lq, Lk, D, Dv, mask, mod, amp=1, seed_lo=1, scale=None, bq=0,
         bk=0, threads=1, drop=0, cap=8, left=3, right=0, corrupt=None, lengths=None,
         layout="bhsd"):
    b = [dbl, B - 1, Hkv - 1, group - 1, Lq - 1, Lk - 1, D - 1, Dv - 1, mask, mod, amp, seed_lo, 0]
    b += [1, scale + 40] if scale is not None else [0]
    b += [bq, bk, threads, drop, seed_lo, cap - 1, left + 1, right + 1]
    b += [0] if corrupt is None else [14, corrupt - 1]
    b += list(lengths) if lengths else [Lk] * B
    for layout_ in LAYOUTS[layout]:  # (sequence-major, element stride - 1, row padding)
        b += list(layout_)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(bytes(b))


os.makedirs(HERE, exist_ok=True)
seed("float_dense", 0, 1, 1, 1, 16, 16, 8, 8, 0, 0)
seed("float_dense_gqa3_tiles", 0, 2, 2, 3, 31, 29, 16, 12, 0, 0, bq=7, bk=5, threads=2)
seed("float_causal_alibi", 0, 1, 2, 2, 20, 32, 9, 13, 1, 1, bq=8, bk=8)
seed("float_causal_softcap_dropout", 0, 2, 1, 2, 17, 23, 16, 16, 1, 2, amp=2, cap=10, drop=3)
seed("float_window_softcap", 0, 1, 1, 1, 32, 32, 5, 7, 2, 2, left=4, right=2, bk=3,
     layout="mixed")
seed("float_window_left_unbounded", 0, 2, 2, 1, 12, 30, 3, 3, 2, 0, left=-1, right=1)
seed("float_padding_alibi", 0, 2, 1, 3, 9, 27, 11, 4, 3, 1, lengths=(0, 27), bq=2, bk=9)
seed("float_padding_dropout_strided", 0, 2, 2, 2, 25, 18, 7, 16, 3, 0, drop=4,
     lengths=(18, 5), layout="mixed")
seed("float_big_scores", 0, 1, 1, 1, 8, 8, 16, 16, 0, 0, amp=3, scale=60)
seed("float_tall_causal", 0, 1, 1, 1, 32, 5, 4, 4, 1, 0, bq=1, bk=1)
seed("double_dense", 1, 1, 1, 2, 13, 19, 6, 9, 0, 0, threads=2)
seed("double_causal_softcap", 1, 2, 2, 1, 21, 21, 16, 16, 1, 2, cap=3, drop=2)
seed("double_causal_alibi_strided", 1, 1, 1, 3, 10, 30, 8, 5, 1, 1, layout="mixed")
seed("double_window", 1, 2, 1, 1, 30, 30, 4, 4, 2, 0, left=0, right=-1)
seed("double_padding", 1, 2, 2, 2, 7, 11, 12, 2, 3, 0, lengths=(3, 0))
for c, what in enumerate(["dq_short", "dk_over_dq", "dv_over_dout", "dropout_p", "lse_shape",
                          "dropout_offset"], start=1):
    seed("broken_" + what, c % 2, 1, 1, 2, 6, 7, 4, 4, c % 4, 0, corrupt=c)
