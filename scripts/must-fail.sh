#!/usr/bin/env bash
# Proof that the race replays can see the races they guard against: built with a guard
# compiled out (a test-only switch), every replay test of that guard must fail.
#
#   --cfg qcow2_no_lease  the lease a no-op            -> crates/engine/tests/seed_race.rs,
#                                                         crates/engine/tests/resize_race.rs
#                                                         crates/engine/tests/snapshot_race.rs
#   --cfg qcow2_no_keep   guards die with the future   -> crates/engine/tests/cancel_race.rs
#                         (a blockio::Keep holds nothing)   (memory:: and ring:: cases),
#                                                         crates/io/tests/ring_shutdown.rs
#
# Each build has its own target directory under target/ (the cfg is in RUSTFLAGS, part of
# every crate's fingerprint), at the test profile's settings without debug info.
set -euo pipefail
cd "$(dirname "$0")/.."

must_fail() {
  local cfg=$1 test=$2 package=${3:-qcow2-engine} start=$SECONDS out summary passed failed
  out=$(RUSTFLAGS="--cfg $cfg" CARGO_TARGET_DIR="target/$cfg" CARGO_PROFILE_TEST_DEBUG=0 \
    RUST_BACKTRACE=0 cargo test -q -p "$package" --test "$test" 2>&1 || true)
  summary=$(printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1)
  echo "$cfg build, $test: $summary"
  passed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
  failed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
  if [ -z "$failed" ] || [ "$failed" = 0 ] || [ "$passed" != 0 ]; then
    printf '%s\n' "$out" | tail -n 40
    echo "FAIL: with --cfg $cfg every $test test must fail (passed=$passed failed=$failed)" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -E "^thread '.*' .*panicked" -A1 | grep -vE '^(thread|--)' \
    | sed 's/^/  /' || true
  echo "ok: all $failed $test tests fail with --cfg $cfg ($((SECONDS - start)) s)"
}

must_fail qcow2_no_lease seed_race
must_fail qcow2_no_lease resize_race
must_fail qcow2_no_lease snapshot_race
must_fail qcow2_no_keep cancel_race
must_fail qcow2_no_keep ring_shutdown blockio
