// fuzz/fuzz_dist.cpp — libFuzzer target: the hostile views of fuzz_shapes
// against the MPI entry points (ring_attention, ulysses_attention) on a
// one-rank communicator, so their agreed argument checks are fuzzed with the
// same promises: refuse before writing, never overflow, match the reference.
// Linked with MPI by scripts/ci-fuzz.sh (skipped when MPI is absent).
#define ATTN_FUZZ_MPI 1
#include "fuzz_shapes.cpp"
