#!/usr/bin/env bash
# Runs clang-tidy (checks in .clang-tidy) over attn's headers: each public
# header alone in its own translation unit (each must compile by itself), and
# one unit that instantiates every entry point for float and double, so the
# templates are analysed with real types. Flags come from a compile database
# (cmake -DCMAKE_EXPORT_COMPILE_COMMANDS=ON) of a configure in BUILD_DIR.
# Prints the findings; exits 1 if there are any.
# Usage: bash scripts/run-clang-tidy.sh [BUILD_DIR]   (default build/tidy)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tidy=${CLANG_TIDY:-clang-tidy-14}
command -v "$tidy" >/dev/null || { echo "run-clang-tidy: $tidy not found (Debian clang-tidy-14)" >&2; exit 2; }
build=${1:-build/tidy}
src=$build/tidy-src
mkdir -p "$src"

# One TU per public header, plus the instantiation TU.
units=()
for h in include/attn/*.hpp; do
  name=$(basename "$h" .hpp)
  printf '#include <attn/%s.hpp>\n' "$name" > "$src/header_$name.cpp"
  units+=("$src/header_$name.cpp")
done
cat > "$src/instantiate.cpp" <<'CPP'
// Instantiates attn's entry points with float and double so that clang-tidy
// analyses the template bodies with real types.
#include <attn/attn.hpp>

#include <vector>

template <class T>
void run_all() {
  const attn::index_t B = 2, H = 4, Hkv = 2, L = 33, D = 16;
  const T half = static_cast<T>(0.5), one = static_cast<T>(1);
  std::vector<T> q(static_cast<std::size_t>(B * H * L * D), half),
      k(static_cast<std::size_t>(B * Hkv * L * D), half), v(k.size(), one), o(q.size());
  std::vector<float> lse(static_cast<std::size_t>(B * H * L));
  auto Q = attn::bshd(q.data(), B, L, H, D);
  auto K = attn::bshd(k.data(), B, L, Hkv, D);
  auto V = attn::bshd(v.data(), B, L, Hkv, D);
  auto O = attn::bshd(o.data(), B, L, H, D);
  attn::AttentionOptions opt;
  opt.lse = attn::TensorView<float, 3>(lse.data(), {B, H, L});
  attn::AttentionStats stats;
  opt.stats = &stats;
  attn::scaled_dot_product_attention(Q, K, V, O, opt);
  attn::masked_attention(Q, K, V, O, attn::causal() & attn::key_padding({L, L - 3}),
                         attn::compose(attn::alibi(attn::alibi_slopes(H)), attn::softcap(30.0)),
                         opt);
  std::vector<char> keep(static_cast<std::size_t>(L * L), 1);
  attn::TensorView<const bool, 4> mask(reinterpret_cast<const bool*>(keep.data()), {1, 1, L, L});
  std::vector<T> bias(static_cast<std::size_t>(L * L), static_cast<T>(0));
  attn::TensorView<const T, 4> bias_view(bias.data(), {1, 1, L, L});
  attn::masked_attention(Q, K, V, O, attn::bool_mask(mask) & attn::causal_top_left(),
                         attn::additive_bias(bias_view), opt);
  attn::masked_attention(
      Q, K, V, O,
      attn::custom_mask([](attn::index_t, attn::index_t, attn::index_t qi, attn::index_t ki) {
        return (qi + ki) % 2 == 0;
      }),
      attn::custom_score_mod([](attn::index_t, attn::index_t, attn::index_t, attn::index_t,
                                auto s) { return s * 2; }),
      opt);
  attn::reference::attention(Q, K, V, O, attn::causal(), attn::softcap(5.0), opt);
}

int main() {
  try {
    run_all<float>();
    run_all<double>();
  } catch (const attn::Error&) {
    return 1;
  }
  return 0;
}
CPP
units+=("$src/instantiate.cpp")

# Compile flags from CMake's compile database: the quickstart example's command
# (same include dirs, OpenMP and standard as any attn consumer), file swapped.
CXX=${CXX:-clang++} cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
  -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=ON >/dev/null
python3 - "$build/compile_commands.json" "$src/compile_commands.json" "${units[@]}" <<'PY'
import json, sys
db, out, units = sys.argv[1], sys.argv[2], sys.argv[3:]
ref = next(e for e in json.load(open(db)) if e["file"].endswith("examples/quickstart.cpp"))
cmd = ref["command"].replace(ref["file"], "{}")
json.dump([{"directory": ref["directory"], "file": u, "command": cmd.format(u)} for u in units],
          open(out, "w"), indent=1)
PY

log=$build/clang-tidy.log
: > "$log"
for u in "${units[@]}"; do
  echo "run-clang-tidy: $(basename "$u")" >&2
  "$tidy" -p "$src" --quiet "$root/$u" >> "$log" 2>/dev/null || true
done
findings=$(grep -cE '^[^ ]+:[0-9]+:[0-9]+: (warning|error):' "$log" || true)
# The same header finding shows up once per TU that includes it: print each once.
grep -E '^[^ ]+:[0-9]+:[0-9]+: (warning|error):' "$log" | sort -u > "$build/clang-tidy.findings" || true
unique=$(wc -l < "$build/clang-tidy.findings")
cat "$build/clang-tidy.findings"
echo "run-clang-tidy: $unique distinct findings ($findings in all); full log: $log"
[[ $unique -eq 0 ]]
