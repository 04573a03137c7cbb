#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_serving.cpp into fuzz/corpus_serving/.

Each seed lists the fields in the order LLVMFuzzerTestOneInput decodes them,
then an operation list, so every seed starts the fuzzer at a named corner:
each cache type and mask, decode (1 row) and prefill attends, forks and
frees (copy-on-write), a full pool and cache, varlen, merges, top-k, and
each broken argument.
"""
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_serving")


def append(seq, n):
    return [0, seq, n - 1]


def free(seq):
    return [3, 0, seq]


def fork(seq):
    return [3, 1, seq]


def add():
    return [3, 2, 0]


def attend(lq, ids, corrupt=None, extra=()):
    b = [7, lq - 1, len(ids) - 1]
    b += [0] if corrupt is None else [7, corrupt - 1]
    return b + list(ids) + list(extra)


def varlen(lengths, corrupt=None):
    b = [4, len(lengths) - 1]
    for lq, lk in lengths:
        b += [lq, lk]
    return b + ([0] if corrupt is None else [7, corrupt])


def merge(B, L, lk, m, corrupt=None):
    return [5, B - 1, L - 1, lk - 1, m] + ([0] if corrupt is None else [7, corrupt])


def topk(B, lq, lk, k_best, corrupt=None):
    return [6, B - 1, lq - 1, lk - 1, k_best - 1] + ([0] if corrupt is None else [7, corrupt])


def seed(name, ops, type_=0, Hkv=1, group=1, D=8, Dv=8, mask=1, mod=0, left=3, right=0, cap=32,
         blocks=16, bs=4, amp=1, scale=None, bq=0, bk=0, threads=1, first=2):
    b = [type_, Hkv - 1, group - 1, D - 1, Dv - 1, mask, mod, left + 1, right + 1, cap - 1,
         blocks - 1, bs - 1, amp]
    b += [1, scale + 40] if scale is not None else [0]
    b += [bq, bk, threads, len(name), 0, first - 1, len(ops) - 1]
    for op in ops:
        b += op
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(bytes(b))


os.makedirs(HERE, exist_ok=True)
prefill_decode = [append(0, 6), append(1, 3), attend(1, [0, 1]), append(0, 1), attend(1, [0]),
                  attend(3, [1, 0])]
for t, tname in enumerate(["float", "bf16", "int8"]):
    for m, mname in enumerate(["nomask", "causal"]):
        seed(f"{tname}_{mname}_prefill_decode", prefill_decode, type_=t, Hkv=2, group=2, mask=m)
seed("float_window_gqa3", [append(0, 6), append(0, 6), attend(4, [0]), attend(1, [0])], Hkv=2,
     group=3, mask=2, left=2, right=1, bq=2, bk=3)
seed("float_window_left_unbounded", [append(1, 5), attend(2, [1])], mask=2, left=-1, right=-1)
seed("float_alibi_decode", [append(0, 6), append(1, 2), attend(1, [1, 0, 1])], group=2, mod=1,
     threads=2)
seed("float_fork_cow", [append(0, 5), fork(0), append(2, 2), append(0, 1), attend(1, [0, 2]),
                        free(0), add(), append(0, 3), attend(2, [2, 0])], bs=4, D=5, Dv=3)
seed("int8_fork_free", [append(0, 6), fork(0), free(0), append(1, 1), attend(1, [1])], type_=2,
     D=16, Dv=16, amp=3)
seed("bf16_small_blocks", [append(0, 6), append(0, 6), append(1, 6), attend(1, [1, 0])], type_=1,
     bs=1, blocks=16, D=3, Dv=12)
seed("float_pool_full", [append(0, 6), append(0, 6), append(1, 6), attend(1, [0])], blocks=3,
     bs=4)
seed("float_capacity_full", [append(0, 6), append(0, 6), attend(2, [0])], cap=8)
seed("float_big_scores", [append(0, 6), attend(1, [0])], amp=3, scale=50, D=16)
seed("varlen_causal", [varlen([(3, 5), (0, 4), (6, 6)])], mask=1, Hkv=2, group=2)
seed("varlen_window_empty_keys", [varlen([(2, 0), (5, 9)])], mask=2, left=1, right=2)
seed("varlen_alibi", [varlen([(4, 10), (1, 1)])], mod=1, group=3)
seed("merge_split", [merge(2, 4, 9, 4), merge(1, 1, 3, 0), merge(1, 6, 12, 12)], group=2)
seed("topk_gqa", [topk(2, 6, 16, 4), topk(1, 3, 5, 7), topk(1, 1, 9, 1)], Hkv=2, group=2)
seed("topk_tall_causal", [topk(1, 6, 3, 2)], amp=2)
seed("broken_topk_k_best", [topk(1, 2, 4, 2, corrupt=1)])
seed("broken_topk_indices_width", [topk(1, 2, 4, 3, corrupt=0)])
seed("broken_seq_id", [append(0, 3), attend(1, [0], corrupt=1, extra=[1])])
seed("broken_rows_past_length", [append(0, 2), attend(1, [0], corrupt=2)])
seed("broken_page_outside_pool", [append(0, 6), attend(1, [0], corrupt=3, extra=[0, 1])])
seed("broken_length_past_table", [append(0, 6), attend(1, [0], corrupt=4, extra=[0])])
seed("broken_cu_seqlens_order", [varlen([(3, 5), (2, 2)], corrupt=0)])
seed("broken_cu_seqlens_end", [varlen([(3, 5)], corrupt=1)])
seed("broken_merge_shape", [merge(1, 3, 4, 2, corrupt=1)])
seed("broken_merge_overlap", [merge(1, 3, 4, 2, corrupt=2)])
