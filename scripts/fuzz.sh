#!/usr/bin/env bash
# Runs the cargo-fuzz targets (docs/FUZZING.md): scripts/fuzz.sh [TARGET] [SECONDS] [libFuzzer options...]
#   TARGET: open_read_write | format_parse | all (default all); SECONDS per target (default 300).
# Installs cargo-fuzz if missing, seeds the corpora from qemu-img images if empty, and works with
# the stable toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address), which
# RUSTC_BOOTSTRAP=1 lets a stable rustc accept.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-all}
secs=${2:-300}
shift $(($# < 2 ? $# : 2))
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
[ -n "$(ls -A fuzz/corpus/open_read_write 2>/dev/null)" ] || scripts/fuzz-corpus.sh
case "$(rustc --version)" in
  *nightly*) ;;
  *) export RUSTC_BOOTSTRAP=1 ;;
esac
case "$target" in
  all) targets="open_read_write format_parse" ;;
  *) targets=$target ;;
esac
for t in $targets; do
  echo "== fuzz $t for ${secs}s"
  # Failures land in fuzz/artifacts/$t; the corpus grows in fuzz/corpus/$t.
  cargo fuzz run -O "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -timeout=10 -print_final_stats=1 "$@"
done
