#!/usr/bin/env bash
# The lease models (crates/alloc/tests/loom_model.rs and shuttle_model.rs, over the crate's
# own LeaseTable, Allocator, Gates and Reservations): loom explores every interleaving within
# a preemption bound, shuttle runs random and PCT schedules of larger scenarios. Each must
# pass. Built again with --cfg qcow2_no_lease (the lease a no-op), every model test must fail
# with an invariant violation, but `cancelled_allocation`, which guards the reservation and
# the gate of a cancelled write (not a lease); built with --cfg qcow2_no_keep (the guards of
# a cancelled request die with its future, before its I/O lands), every cancellation test
# (named cancelled_*) must: the proof that the models can see the races.
#
# Then the engine's own request paths under shuttle (crates/engine/tests/shuttle_engine.rs).
#
# Usage: scripts/models.sh [loom|shuttle|all]   (default: all)
# Env:   LOOM_MAX_PREEMPTIONS      loom's preemption bound (default 3, in loom_model.rs)
#        QCOW2_SHUTTLE_ITERATIONS  schedules per scenario and scheduler (default 10000)
#
# One target directory per model under target/ (--cfg loom or --cfg shuttle must reach every
# crate, async-lock's included, so it goes in RUSTFLAGS, and RUSTFLAGS is part of every
# crate's fingerprint). The no-lease build shares it: --cfg qcow2_no_lease only matters to
# qcow2-alloc, so it is given to that crate alone through a per-package profile rustflags
# (cargo's unstable profile-rustflags, unlocked on stable by RUSTC_BOOTSTRAP=1 for that
# command only, as scripts/fuzz.sh does for ASan); switching rebuilds qcow2-alloc and the
# test, not the dependencies. Only qcow2-alloc, its dependencies and its dev-dependencies are
# built (keep divan and the like out of them), at the test profile's opt-level 1 (loom
# explores for a minute on it), without debug info (nothing here reads a backtrace).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export RUST_BACKTRACE=0

# run MODEL [CFG [TEST ARGS...]]: runs the model's tests (built with --cfg CFG for
# qcow2-alloc alone when given), output in $out, status in $status.
run() {
  local model=$1 cfg=${2:-} cargo_test=(cargo test)
  [ -z "$cfg" ] || cargo_test=(env RUSTC_BOOTSTRAP=1 cargo test -Zprofile-rustflags
    --config "profile.test.package.qcow2-alloc.rustflags=[\"--cfg\", \"$cfg\"]")
  status=0
  out=$(RUSTFLAGS="--cfg $model" CARGO_TARGET_DIR="target/$model" CARGO_PROFILE_TEST_DEBUG=0 \
    "${cargo_test[@]}" -q -p qcow2-alloc --features "$model" --test "${model}_model" \
    -- --nocapture "${@:3}" 2>&1) || status=$?
}

# must_fail MODEL CFG WHAT [TEST ARGS...]: with --cfg CFG, every test selected must fail with
# an invariant violation.
must_fail() {
  local model=$1 cfg=$2 what=$3 start=$SECONDS
  echo "== $model model $what (must fail)"
  run "$model" "$cfg" "${@:4}"
  local summary passed failed violations
  summary=$(printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1)
  passed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
  failed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
  # The failures must be invariant violations, not some other panic.
  violations=$(printf '%s\n' "$out" | grep -cE '^I[0-9/I]+ violated' || true)
  printf '%s\n' "$out" | grep -E '^I[0-9/I]+ violated' | sed -E 's/([^I0-9])[0-9]+/\1N/g' | sort | uniq -c || true
  echo "$cfg $model build: $summary"
  if [ -z "$failed" ] || [ "$failed" = 0 ] || [ "$passed" != 0 ] || [ "$violations" -lt "$failed" ]; then
    printf '%s\n' "$out" | tail -n 60
    echo "FAIL: $what every selected $model model test must report a violation" \
      "(passed=$passed failed=$failed violations=$violations)" >&2
    exit 1
  fi
  echo "ok: all $failed selected $model model tests report a violation $what ($((SECONDS - start)) s)"
}

check_model() {
  local model=$1 start=$SECONDS
  echo "== $model model"
  run "$model"
  printf '%s\n' "$out" | grep -oE "$model [a-z_]+: .*" || true
  if [ "$status" != 0 ]; then
    printf '%s\n' "$out" | tail -n 60
    echo "FAIL: the $model model failed" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1
  echo "$model model: ok in $((SECONDS - start)) s"

  must_fail "$model" qcow2_no_lease "without leases" --skip cancelled_allocation
  must_fail "$model" qcow2_no_keep "without keeps" cancelled
}

# The engine's own request paths under shuttle (crates/engine/tests/shuttle_engine.rs): they
# must pass; built with qcow2-alloc's leases as no-ops, shuttle must find a violation from one
# of three fixed seeds (a violation needs one unlucky schedule among thousands; the seeds make
# the run replay).
engine_cmd() {
  RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR="target/shuttle" CARGO_PROFILE_TEST_DEBUG=0 \
    "$@" -q -p qcow2-engine --features shuttle,testing --test shuttle_engine -- --nocapture
}

check_engine() {
  local start=$SECONDS status=0 found=0 seed
  echo "== the engine's request paths under shuttle"
  out=$(engine_cmd cargo test 2>&1) || status=$?
  printf '%s\n' "$out" | grep -oE 'shuttle engine [a-z_]+: .*' || true
  if [ "$status" != 0 ]; then
    printf '%s\n' "$out" | tail -n 60
    echo "FAIL: the engine under shuttle" >&2
    exit 1
  fi
  echo "engine under shuttle: ok in $((SECONDS - start)) s"
  echo "== the engine under shuttle without leases (must report a violation)"
  start=$SECONDS
  for seed in 11 12 13; do
    out=$(QCOW2_SHUTTLE_SEED=$seed QCOW2_SHUTTLE_ITERATIONS=4000 engine_cmd env RUSTC_BOOTSTRAP=1 \
      cargo test -Zprofile-rustflags \
      --config 'profile.test.package.qcow2-alloc.rustflags=["--cfg", "qcow2_no_lease"]' 2>&1) || true
    n=$(printf '%s\n' "$out" | grep -c 'lease violated' || true)
    echo "seed $seed: $n scenarios report a lease violation"
    found=$((found + n))
  done
  if [ "$found" = 0 ]; then
    echo "FAIL: without leases, shuttle found no violation in the engine" >&2
    exit 1
  fi
  echo "ok: $found violations without leases ($((SECONDS - start)) s)"
}

case "$what" in
  loom) check_model loom ;;
  shuttle) check_model shuttle; check_engine ;;
  all) check_model loom; check_model shuttle; check_engine ;;
  *) echo "usage: $0 [loom|shuttle|all]" >&2; exit 2 ;;
esac
