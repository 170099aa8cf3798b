#!/usr/bin/env bash
# Runs the cargo-fuzz targets (docs/FUZZING.md): scripts/fuzz.sh [TARGET] [SECONDS] [libFuzzer options...]
#   TARGET: open_read_write | format_parse | all (default all); SECONDS per target (default 300).
# Env:  FUZZ_BUILD_FLAGS  extra `cargo fuzz build/run` options. CI uses
#                         "-s none --codegen-units 16": no AddressSanitizer (fuzz/src/lib.rs
#                         caps allocations itself) and parallel codegen, a quicker build and
#                         several times more executions a second, for a short run.
# Installs cargo-fuzz if missing, seeds the corpora from qemu-img images if empty, builds the
# targets once, runs each for SECONDS and prints how many inputs libFuzzer executed. A crash,
# a timeout or an out-of-memory stops the script with a non-zero status; the input is saved in
# fuzz/artifacts/<target>/. Works with the stable toolchain: cargo-fuzz passes nightly-only
# flags (-Zsanitizer=address), which RUSTC_BOOTSTRAP=1 lets a stable rustc accept.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-all}
secs=${2:-300}
shift $(($# < 2 ? $# : 2))
read -r -a build_flags <<<"${FUZZ_BUILD_FLAGS:-}"
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

start=$SECONDS
for t in $targets; do
  cargo fuzz build -O "${build_flags[@]}" "$t"
done
echo "fuzz: built $targets in $((SECONDS - start)) s (cargo fuzz build -O ${build_flags[*]})"

summary=()
for t in $targets; do
  echo "== fuzz $t for ${secs}s"
  log=$(mktemp)
  # Failures land in fuzz/artifacts/$t; the corpus grows in fuzz/corpus/$t. The lines for each
  # new input and the recommended dictionary are left out of the output.
  set +e
  cargo fuzz run -O "${build_flags[@]}" "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -timeout=10 -print_final_stats=1 "$@" 2>&1 |
    tee "$log" | awk '/^###### Recommended dictionary/ { dict = 1 }
      !dict && !/^#[0-9]+[[:space:]]+(NEW|REDUCE)[[:space:]]/ && !/^[[:space:]]+NEW_FUNC/ {
        print; fflush() }
      /^###### End of recommended dictionary/ { dict = 0 }'
  status=${PIPESTATUS[0]}
  set -e
  execs=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -n 1)
  rm -f "$log"
  if [ "$status" != 0 ]; then
    echo "FAIL: fuzz $t exited with status $status after ${execs:-?} executions;" \
      "the input is in fuzz/artifacts/$t/ (docs/FUZZING.md says how to replay it)" >&2
    exit 1
  fi
  echo "fuzz $t: ${execs:-?} executions in ${secs} s, no crash"
  summary+=("$t ${execs:-?} executions")
done
printf -v joined '%s, ' "${summary[@]}"
echo "fuzz: ${joined%, }; no crash"
