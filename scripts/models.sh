#!/usr/bin/env bash
# The lease models (crates/alloc/tests/loom_model.rs and shuttle_model.rs, over the crate's
# own LeaseTable, Allocator and Gates): loom explores every interleaving within a preemption
# bound, shuttle runs random and PCT schedules of larger scenarios. Each must pass. Built
# again with --cfg qcow2_no_lease (the lease a no-op), every model test must fail with an
# invariant violation: the proof that the models can see the race.
#
# Usage: scripts/models.sh [loom|shuttle|all]   (default: all)
# Env:   LOOM_MAX_PREEMPTIONS      loom's preemption bound (default 3, in loom_model.rs)
#        QCOW2_SHUTTLE_ITERATIONS  schedules per scenario and scheduler (default 10000)
#
# Each build has its own target directory under target/ (the cfgs change every crate's
# flags; sharing one directory would rebuild everything at each switch). Only qcow2-alloc,
# its dependencies and its dev-dependencies are built (keep divan and the like out of them),
# with the test profile's opt-level 1 (loom explores for a minute on it) but without debug
# info: nothing here reads a backtrace, and four cold builds of it cost minutes in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export RUST_BACKTRACE=0

# cargo_test MODEL CFGS TARGET_DIR [ARGS...]: the model's `cargo test`, one build per directory.
cargo_test() {
  local model=$1 cfgs=$2 dir=$3
  shift 3
  RUSTFLAGS="$cfgs" CARGO_TARGET_DIR="$dir" CARGO_PROFILE_TEST_DEBUG=0 \
    cargo test -q -p qcow2-alloc --features "$model" --test "${model}_model" "$@"
}

# build MODEL...: compiles each model's two test binaries (with and without leases) at once.
# They share nothing, and one small build alone leaves a core idle for much of its time:
# together they took 195 s here where one after the other took about 240.
build() {
  local start=$SECONDS pids=() logs=() i
  for model in "$@"; do
    for v in "" "-nolease"; do
      local cfgs="--cfg $model" log
      [ -z "$v" ] || cfgs="$cfgs --cfg qcow2_no_lease"
      log=$(mktemp)
      cargo_test "$model" "$cfgs" "target/$model$v" --no-run >"$log" 2>&1 &
      pids+=($!)
      logs+=("$log")
    done
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      cat "${logs[$i]}"
      echo "FAIL: building the model tests failed" >&2
      exit 1
    fi
    rm -f "${logs[$i]}"
  done
  echo "== model tests built in $((SECONDS - start)) s ($*, with and without leases)"
}

# run MODEL CFGS TARGET_DIR: runs the model's tests, output in $out, status in $status.
run() {
  status=0
  out=$(cargo_test "$@" -- --nocapture 2>&1) || status=$?
}

check_model() {
  local model=$1 start=$SECONDS
  echo "== $model model"
  run "$model" "--cfg $model" "target/$model"
  printf '%s\n' "$out" | grep -oE "$model [a-z_]+: .*" || true
  if [ "$status" != 0 ]; then
    printf '%s\n' "$out" | tail -n 60
    echo "FAIL: the $model model failed" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1
  echo "$model model: ok in $((SECONDS - start)) s"

  echo "== $model model without leases (must fail)"
  start=$SECONDS
  run "$model" "--cfg $model --cfg qcow2_no_lease" "target/$model-nolease"
  local summary passed failed violations
  summary=$(printf '%s\n' "$out" | grep -E '^test result:' | tail -n 1)
  passed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')
  failed=$(printf '%s\n' "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
  # The failures must be invariant violations, not some other panic.
  violations=$(printf '%s\n' "$out" | grep -cE '^I[0-9]+ violated' || true)
  printf '%s\n' "$out" | grep -E '^I[0-9]+ violated' | sort | uniq -c || true
  echo "no-lease $model build: $summary"
  if [ -z "$failed" ] || [ "$failed" = 0 ] || [ "$passed" != 0 ] || [ "$violations" -lt "$failed" ]; then
    printf '%s\n' "$out" | tail -n 60
    echo "FAIL: without leases every $model model test must report a violation" \
      "(passed=$passed failed=$failed violations=$violations)" >&2
    exit 1
  fi
  echo "ok: all $failed $model model tests report a violation without leases ($((SECONDS - start)) s)"
}

case "$what" in
  loom) build loom; check_model loom ;;
  shuttle) build shuttle; check_model shuttle ;;
  all) build loom shuttle; check_model loom; check_model shuttle ;;
  *) echo "usage: $0 [loom|shuttle|all]" >&2; exit 2 ;;
esac
