#!/usr/bin/env bash
# Checks that attn's C++ sources follow .clang-format; prints the differences
# and exits non-zero if any file would change. Formats nothing.
# Usage: bash scripts/check-format.sh [clang-format binary]   (default clang-format-14)
set -euo pipefail
cd "$(dirname "$0")/.."
clang_format=${1:-${CLANG_FORMAT:-clang-format-14}}
if ! command -v "$clang_format" >/dev/null; then
  echo "check-format: $clang_format not found (Debian package clang-format-14)" >&2
  exit 2
fi
dirs=()
for d in include tests bench examples fuzz tools; do
  [[ -d $d ]] && dirs+=("$d")
done
mapfile -t files < <(find "${dirs[@]}" -type f \( -name '*.hpp' -o -name '*.h' -o -name '*.inl' -o -name '*.cpp' \
                       -o -name '*.cc' \) | sort)
if "$clang_format" --dry-run -Werror "${files[@]}"; then
  echo "check-format: ${#files[@]} files formatted"
else
  echo "check-format: files above differ from .clang-format (fix: $clang_format -i FILE)" >&2
  exit 1
fi
